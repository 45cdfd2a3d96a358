//! Change notification on directories (inotify): install-cni repairs the node's CNI
//! config the moment another agent rewrites it, and the plugin's kubeconfig follows
//! the agent's token as soon as it rotates, instead of on the next poll.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watches a set of directories for any change to their entries.
pub struct DirWatch {
    fd: AsyncFd<Fd>,
}

impl DirWatch {
    /// Watches `dirs`, which must exist: files created, written, removed, renamed in
    /// or out, or changed in mode.
    pub fn new(dirs: &[&Path]) -> io::Result<DirWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mask = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        for dir in dirs {
            inotify.add_watch(*dir, mask).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("watching {}: {e}", dir.display()),
                )
            })?;
        }
        // SAFETY: the Inotify owns its descriptor, which stays open and keeps its number
        // until the AsyncFd (now its only owner) drops it.
        let fd = unsafe { AsyncFd::register_with_interest(Fd(inotify), Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(DirWatch { fd })
    }

    /// Waits until an entry whose name `interesting` accepts changed (or a watched
    /// directory itself went away), then takes every event already queued, so one
    /// burst of writes is one wake-up. Changes to other entries (a log file that
    /// happens to live there, our own temporary files) never wake the caller.
    pub async fn changed(&self, interesting: impl Fn(&OsStr) -> bool) -> io::Result<()> {
        let mut changed = false;
        loop {
            let mut ready = self.fd.readable().await?;
            // Readiness is cleared only on EAGAIN (by `try_io`), so an event that lands
            // after the queue was drained still wakes the next call.
            loop {
                match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                    Ok(Ok(events)) => {
                        changed |= events
                            .iter()
                            .any(|e| e.name.as_deref().is_none_or(&interesting))
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => break,
                }
            }
            if changed {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_a_rename_and_a_removal_each_wake_the_watcher() {
        let dir = tempfile::tempdir().unwrap();
        let watch = DirWatch::new(&[dir.path()]).unwrap();
        let conflist = |n: &OsStr| n.to_string_lossy().ends_with(".conflist");
        let quiet = tokio::time::timeout(Duration::from_millis(50), watch.changed(conflist)).await;
        assert!(quiet.is_err(), "woke with nothing changed");
        let file = dir.path().join("10-net.conflist");
        std::fs::write(&file, "{}").unwrap();
        tokio::time::timeout(Duration::from_secs(2), watch.changed(conflist))
            .await
            .expect("a write wakes")
            .unwrap();
        let tmp = dir.path().join(".tmp");
        std::fs::write(&tmp, "{}").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(2), watch.changed(conflist))
            .await
            .expect("a rename wakes")
            .unwrap();
        std::fs::remove_file(&file).unwrap();
        tokio::time::timeout(Duration::from_secs(2), watch.changed(conflist))
            .await
            .expect("a removal wakes")
            .unwrap();
        // Writes to other files in the directory do not wake it.
        std::fs::write(dir.path().join("agent.log"), "a line").unwrap();
        std::fs::write(dir.path().join(".tmp2"), "x").unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(100), watch.changed(conflist)).await;
        assert!(quiet.is_err(), "woke for a file nobody asked about");
    }
}
