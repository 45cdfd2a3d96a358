//! Finding the network namespaces of pods that already run, without the CNI plugin's
//! help (an agent that starts after its pods, or restarts).
//!
//! Kubelet puts every container's processes in a cgroup whose path carries the pod's
//! UID: `…/kubepods/besteffort/pod<uid>/<container>` with the cgroupfs driver, or
//! `…/kubepods-besteffort-pod<uid with _>.slice/…` with systemd. Scanning /proc for
//! processes of a wanted pod gives its netns; the host netns is skipped (hostNetwork
//! pods share it), and a match is confirmed by an interface in that netns carrying
//! one of the pod's IPs.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::path::Path;

use protocol::{Netns, NetnsId};

/// The pod UID in a `/proc/<pid>/cgroup` file, if the process belongs to a pod.
pub fn pod_uid_in_cgroup(contents: &str) -> Option<String> {
    contents
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .find_map(|segment| {
            let at = segment.rfind("pod")?;
            let candidate = segment[at + 3..]
                .trim_end_matches(".slice")
                .replace('_', "-");
            is_uid(&candidate).then_some(candidate)
        })
}

/// 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Scans `proc_root` (normally `/proc`) for the pods in `wanted` (uid -> pod IPs) and
/// returns the netns of each one found, never one in `exclude` (sandboxes already torn
/// down). Processes that vanish mid-scan are skipped.
/// The pid of the process behind `pidfd` as the procfs at `proc_root` numbers it (its
/// `fdinfo` says so in that procfs's PID namespace): how the agent, in a pod, names
/// ztunnel (in another pod) and itself for `istio-cni diagnose` on the node.
pub fn pid_in(proc_root: &Path, pidfd: &impl std::os::fd::AsRawFd) -> Option<i32> {
    let info = std::fs::read_to_string(
        proc_root
            .join("self/fdinfo")
            .join(pidfd.as_raw_fd().to_string()),
    )
    .ok()?;
    parse_fdinfo_pid(&info)
}

/// The `Pid:` of a pidfd's fdinfo (positive: -1 or 0 mean gone or not visible).
fn parse_fdinfo_pid(info: &str) -> Option<i32> {
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|p: &i32| *p > 0)
}

/// This process's pid as the procfs at `proc_root` numbers it (`<proc_root>/self`).
pub fn own_pid_in(proc_root: &Path) -> Option<i32> {
    std::fs::read_link(proc_root.join("self"))
        .ok()?
        .to_str()?
        .parse()
        .ok()
}

/// The node's own network namespaces, never a pod's: the agent's (it runs on the host
/// network) and that of the node's init process (`<proc_root>/1`, the host's /proc).
pub fn node_netns(proc_root: &Path) -> Vec<NetnsId> {
    [Netns::current(), Netns::open(&proc_root.join("1/ns/net"))]
        .into_iter()
        .filter_map(|n| n.ok().map(|n| n.id()))
        .collect()
}

pub fn find_pod_netns(
    proc_root: &Path,
    wanted: &HashMap<String, Vec<IpAddr>>,
    exclude: &HashSet<NetnsId>,
) -> io::Result<HashMap<String, Netns>> {
    let host = Netns::current()?.id();
    let node = node_netns(proc_root);
    let mut found: HashMap<String, Netns> = HashMap::new();
    let mut rejected: HashSet<(String, NetnsId)> = HashSet::new();
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = entry.path();
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let Some(uid) = pod_uid_in_cgroup(&cgroup) else {
            continue;
        };
        let Some(ips) = wanted.get(&uid) else {
            continue;
        };
        if found.contains_key(&uid) {
            continue;
        }
        let Ok(netns) = Netns::open(&dir.join("ns/net")) else {
            continue;
        };
        if netns.id() == host
            || node.contains(&netns.id())
            || exclude.contains(&netns.id())
            || rejected.contains(&(uid.clone(), netns.id()))
        {
            continue;
        }
        if netns.addresses()?.iter().any(|a| ips.contains(a)) {
            found.insert(uid, netns);
        } else {
            rejected.insert((uid, netns.id()));
        }
    }
    Ok(found)
}

/// The network namespaces some process under `proc_root` is in (one `stat` per
/// process; processes that vanish mid-scan are skipped).
pub fn netns_in_use(proc_root: &Path) -> io::Result<HashSet<NetnsId>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = HashSet::new();
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(meta) = std::fs::metadata(entry.path().join("ns/net")) {
            out.insert(NetnsId {
                dev: meta.dev(),
                inode: meta.ino(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfds_pid_is_read_in_the_procfs_asked() {
        assert_eq!(
            parse_fdinfo_pid("pos:\t0\nflags:\t02000002\nPid:\t4242\nNSpid:\t4242\t1\n"),
            Some(4242)
        );
        // A process gone, or not visible from that procfs.
        assert_eq!(parse_fdinfo_pid("Pid:\t-1\n"), None);
        assert_eq!(parse_fdinfo_pid("Pid:\t0\n"), None);
        assert_eq!(parse_fdinfo_pid("garbage"), None);
        assert_eq!(
            own_pid_in(Path::new("/proc")),
            Some(std::process::id() as i32)
        );
    }

    const UID: &str = "1e054806-e667-4109-a5af-08b3e6ba0c42";

    #[test]
    fn uids_come_from_both_kubelet_cgroup_layouts() {
        let cgroupfs = format!("12:pids:/kubepods/besteffort/pod{UID}/0123abcd\n0::/\n");
        assert_eq!(pod_uid_in_cgroup(&cgroupfs).as_deref(), Some(UID));
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-99.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(pod_uid_in_cgroup(&systemd).as_deref(), Some(UID));
        let guaranteed = format!("0::/kubepods/pod{UID}/c1\n");
        assert_eq!(pod_uid_in_cgroup(&guaranteed).as_deref(), Some(UID));
    }

    #[test]
    fn non_pod_processes_and_garbage_have_no_uid() {
        for s in [
            "0::/\n",
            "9:name=systemd:/system.slice/sshd.service\n",
            "0::/kubepods/podnotauid/c\n",
            "garbage",
            "",
        ] {
            assert_eq!(pod_uid_in_cgroup(s), None, "{s:?}");
        }
    }

    #[test]
    fn the_netns_of_this_process_is_in_use() {
        let here = Netns::current().unwrap().id();
        let used = netns_in_use(Path::new("/proc")).unwrap();
        assert!(used.contains(&here));
    }
}
