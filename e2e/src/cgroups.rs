//! Processes placed in cgroups laid out as kubelet lays them out (`…/pod<uid>/<ctr>`),
//! so /proc discovery can find a pod's netns. The cgroups live under a private
//! directory of the `pids` hierarchy and are removed with their processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

const HIERARCHY: &str = "/sys/fs/cgroup/pids";

/// The test's private cgroup directory; removed (leaf first) on drop. Declare it
/// before the processes so it is dropped after them.
pub struct CgroupRoot(PathBuf);

impl CgroupRoot {
    pub fn new() -> CgroupRoot {
        CgroupRoot(PathBuf::from(HIERARCHY).join(format!("zt-e2e-{}", std::process::id())))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for CgroupRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        remove_tree(&self.0);
    }
}

/// A process in a netns (or the host's, with `None`) inside a pod-like cgroup; killed
/// and its cgroup removed on drop.
pub struct PodProcess {
    child: Child,
    dir: PathBuf,
}

impl PodProcess {
    pub fn start(root: &CgroupRoot, uid: &str, netns: Option<&str>) -> PodProcess {
        let dir = root.path().join(uid);
        let leaf = dir.join(format!("kubepods/besteffort/pod{uid}/ctr"));
        std::fs::create_dir_all(&leaf).expect("create cgroup (is the pids hierarchy mounted?)");
        // As a pod's pause process runs: as another user than the agent (65535), so
        // that opening its /proc/<pid>/ns/net takes the agent's CAP_SYS_PTRACE.
        let as_pause = [
            "setpriv",
            "--reuid=65535",
            "--regid=65535",
            "--clear-groups",
        ];
        let child = match netns {
            Some(ns) => Command::new("ip")
                .args(["netns", "exec", ns])
                .args(as_pause)
                .args(["sleep", "3600"])
                .spawn(),
            None => Command::new(as_pause[0])
                .args(&as_pause[1..])
                .args(["sleep", "3600"])
                .spawn(),
        }
        .expect("start process");
        std::fs::write(leaf.join("cgroup.procs"), child.id().to_string()).expect("join cgroup");
        PodProcess { child, dir }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_tree(&self.dir);
    }
}

/// cgroup directories can only be removed leaf first, with rmdir.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
