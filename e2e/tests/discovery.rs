//! Discovering running pods' netns from /proc: processes placed in cgroups laid out as
//! kubelet lays them out (`…/pod<uid>/<container>`), in the pods' network namespaces.
//! Root only; the cgroups live under a private directory of the `pids` hierarchy and
//! are removed with their processes at the end.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use e2e::TestNode;
use istio_cni::discovery::find_pod_netns;

const HIERARCHY: &str = "/sys/fs/cgroup/pids";

/// A process in a netns (or the host's) inside a pod-like cgroup; killed and removed on
/// drop.
struct PodProcess {
    child: Child,
    root: PathBuf,
}

impl PodProcess {
    fn start(root: &Path, uid: &str, netns: Option<&str>) -> PodProcess {
        let leaf = root.join(format!("kubepods/besteffort/pod{uid}/ctr"));
        std::fs::create_dir_all(&leaf).expect("create cgroup (is the pids hierarchy mounted?)");
        let child = match netns {
            Some(ns) => Command::new("ip")
                .args(["netns", "exec", ns, "sleep", "60"])
                .spawn(),
            None => Command::new("sleep").arg("60").spawn(),
        }
        .expect("start process");
        std::fs::write(leaf.join("cgroup.procs"), child.id().to_string()).expect("join cgroup");
        PodProcess {
            child,
            root: root.to_path_buf(),
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_tree(&self.root);
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

/// Removes the test's cgroup root once the processes (dropped earlier) are gone.
struct CgroupRoot(PathBuf);

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        remove_tree(&self.0);
    }
}

fn uid(n: u32) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n)
}

#[test]
fn running_pods_are_found_by_cgroup_uid_and_confirmed_by_ip() {
    let node = TestNode::new(40);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("other"));
    let root = PathBuf::from(HIERARCHY).join(format!("zt-e2e-{}", std::process::id()));
    let _root = CgroupRoot(root.clone());
    let (ua, ub, uh, unone) = (uid(1), uid(2), uid(3), uid(4));
    let _procs = [
        PodProcess::start(&root.join("a"), &ua, Some(&a.netns_name)),
        PodProcess::start(&root.join("b"), &ub, Some(&b.netns_name)),
        // A hostNetwork pod: its processes share the host netns.
        PodProcess::start(&root.join("h"), &uh, None),
    ];
    let wrong_ip: IpAddr = "10.9.9.9".parse().unwrap();
    let wanted = HashMap::from([
        (ua.clone(), vec![a.ip]),
        (ub.clone(), vec![wrong_ip]),
        (uh.clone(), vec![wrong_ip]),
        (unone.clone(), vec![b.ip]),
    ]);
    let found = find_pod_netns(Path::new("/proc"), &wanted).unwrap();
    assert_eq!(found.keys().collect::<Vec<_>>(), [&ua], "only a is found");
    assert_eq!(found[&ua].id(), a.netns().id(), "a's netns, not another");
}
