//! What the benchmark reads of a process and of the machine in `/proc`: CPU time, RSS,
//! open fds and threads; and CPU pinning of every thread of a process.

use std::io;

/// Clock ticks per second of `/proc` CPU counters.
fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// utime + stime, in ticks, from the text of `/proc/<pid>/stat`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: the fields that
    // follow start after the last ") ".
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The busy ticks of the whole machine (everything but idle and iowait), from the
/// `cpu ` line of `/proc/stat`.
pub fn parse_machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: in user]
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(busy)
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
pub fn parse_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_stat_cpu_ticks(&stat)
        .ok_or_else(|| io::Error::other(format!("unreadable /proc/{pid}/stat")))?;
    Ok(ticks as f64 / ticks_per_second())
}

/// Busy CPU seconds of the whole machine, all CPUs summed.
pub fn machine_cpu_seconds() -> io::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks =
        parse_machine_busy_ticks(&stat).ok_or_else(|| io::Error::other("unreadable /proc/stat"))?;
    Ok(ticks as f64 / ticks_per_second())
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_rss_bytes(&status).ok_or_else(|| io::Error::other(format!("no VmRSS for {pid}")))
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Threads of a process.
pub fn threads(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

/// Pins every thread of `pid` to `cpus` (`None`: every CPU of the machine). Threads
/// started later inherit the affinity of the thread that starts them.
pub fn pin_process(pid: u32, cpus: Option<&[usize]>) -> io::Result<()> {
    let set = cpu_set(cpus)?;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?
            .file_name()
            .to_string_lossy()
            .parse()
            .map_err(io::Error::other)?;
        // A thread may exit between the listing and the call: skip it.
        match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Pins the calling thread to `cpus` (`None`: every CPU).
pub fn pin_current_thread(cpus: Option<&[usize]>) -> io::Result<()> {
    let set = cpu_set(cpus)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

fn cpu_set(cpus: Option<&[usize]>) -> io::Result<nix::sched::CpuSet> {
    let mut set = nix::sched::CpuSet::new();
    let all: Vec<usize> = (0..online_cpus()).collect();
    for &cpu in cpus.unwrap_or(&all) {
        set.set(cpu)?;
    }
    Ok(set)
}

/// CPUs online.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_texts() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        let machine = "cpu  100 5 50 9000 40 3 7 1 0 0\ncpu0 50 2 25 4500 20 1 3 0 0 0\n";
        assert_eq!(
            parse_machine_busy_ticks(machine),
            Some(100 + 5 + 50 + 3 + 7 + 1)
        );
        assert_eq!(parse_machine_busy_ticks("cpu0 1 2 3\n"), None);
        let status = "Name:\tztunnel\nVmPeak:\t  9000 kB\nVmRSS:\t    7890 kB\nThreads:\t5\n";
        assert_eq!(parse_rss_bytes(status), Some(7890 * 1024));
        assert_eq!(parse_rss_bytes("Name: x\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(fds(me).unwrap() >= 3);
        assert!(threads(me).unwrap() >= 1);
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(machine_cpu_seconds().unwrap() > 0.0);
    }
}
