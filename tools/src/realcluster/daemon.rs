//! The cluster's long-lived processes: each started in a session of its own (so it
//! outlives the command that started it when the cluster is kept, and a Ctrl-C to
//! that command does not reach it), its output in `logs/<name>.log`, its pid in
//! `pids/<name>.pid` for [`super::teardown`].

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{Error, Layout, Result};

/// Starts `cmd` as daemon `name`; returns its pid.
pub fn spawn(layout: &Layout, name: &str, mut cmd: Command) -> Result<u32> {
    let logs = layout.logs();
    let pids = layout.pids();
    for d in [&logs, &pids] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let log = log_path(layout, name);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| Error::io(&log, e))?;
    let err = out.try_clone().map_err(|e| Error::io(&log, e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it is
    // the only call made between fork and exec.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(Into::into));
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::Setup(format!("starting {name} ({cmd:?}): {e}")))?;
    let pid = child.id();
    // Not waited for here (dropping the handle leaves the process running): the
    // daemon is stopped by teardown, which reaps it, or reaped by init once this
    // process has exited.
    drop(child);
    let pidfile = pids.join(format!("{name}.pid"));
    std::fs::write(&pidfile, pid.to_string()).map_err(|e| Error::io(&pidfile, e))?;
    Ok(pid)
}

pub fn log_path(layout: &Layout, name: &str) -> PathBuf {
    layout.logs().join(format!("{name}.log"))
}

/// The last `lines` lines of daemon `name`'s log.
pub fn log_tail(layout: &Layout, name: &str, lines: usize) -> String {
    let text = std::fs::read_to_string(log_path(layout, name)).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stops daemon `name` as a service manager does: SIGTERM, then SIGKILL after 20 s,
/// to its whole process group (a daemon started inside a node runs as the child of
/// the `nsenter` that entered the node's PID namespace, in the group `spawn` made);
/// returns once no process of the group is left.
pub fn stop(layout: &Layout, name: &str) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    let pidfile = layout.pids().join(format!("{name}.pid"));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .map_err(|e| Error::io(&pidfile, e))?
        .trim()
        .parse()
        .map_err(|e| Error::Setup(format!("{}: {e}", pidfile.display())))?;
    let group = nix::unistd::Pid::from_raw(-pid);
    let _ = kill(group, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while group_alive(pid) {
        if std::time::Instant::now() > deadline {
            let _ = kill(group, Signal::SIGKILL);
        }
        super::teardown::reap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    super::teardown::reap();
    Ok(())
}

/// Whether any live process is in process group `pgid`.
fn group_alive(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_string();
                let f: Vec<&str> = rest.split_whitespace().collect();
                // state, ppid, pgrp
                Some(f.first()? != &"Z" && f.get(2)?.parse::<i32>().ok()? == pgid)
            })
            .unwrap_or(false)
    })
}

/// Whether process `pid` is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}
