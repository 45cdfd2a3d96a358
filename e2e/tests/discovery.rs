//! Discovering running pods' netns from /proc: processes placed in cgroups laid out as
//! kubelet lays them out (`…/pod<uid>/<container>`), in the pods' network namespaces.
//! Root only.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use e2e::cgroups::{CgroupRoot, PodProcess};
use e2e::TestNode;
use istio_cni::discovery::find_pod_netns;

fn uid(n: u32) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n)
}

#[test]
fn running_pods_are_found_by_cgroup_uid_and_confirmed_by_ip() {
    let node = TestNode::new(40);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("other"));
    let root = CgroupRoot::new();
    let (ua, ub, uh, unone) = (uid(1), uid(2), uid(3), uid(4));
    let _procs = [
        PodProcess::start(&root, &ua, Some(&a.netns_name)),
        PodProcess::start(&root, &ub, Some(&b.netns_name)),
        // A hostNetwork pod: its processes share the host netns.
        PodProcess::start(&root, &uh, None),
    ];
    let wrong_ip: IpAddr = "10.9.9.9".parse().unwrap();
    let wanted = HashMap::from([
        (ua.clone(), vec![a.ip]),
        (ub.clone(), vec![wrong_ip]),
        (uh.clone(), vec![wrong_ip]),
        (unone.clone(), vec![b.ip]),
    ]);
    let found = find_pod_netns(Path::new("/proc"), &wanted, &HashSet::new()).unwrap();
    assert_eq!(found.keys().collect::<Vec<_>>(), [&ua], "only a is found");
    assert_eq!(found[&ua].id(), a.netns().id(), "a's netns, not another");
    // A torn-down sandbox is never found again, whatever still runs in it.
    let retired = HashSet::from([a.netns().id()]);
    let found = find_pod_netns(Path::new("/proc"), &wanted, &retired).unwrap();
    assert!(found.is_empty(), "a retired sandbox was found");
}
