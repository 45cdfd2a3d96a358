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
