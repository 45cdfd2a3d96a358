//! Removing a cluster, found from the machine rather than from memory: every process
//! in a node's network namespace or cgroups or naming the cluster's root, every
//! `ambk-` cgroup, network namespace and link, and the root directory. The same
//! function removes a cluster this process made, one an earlier run kept, and one a
//! crash left; [`leftovers`] says what, if anything, is still there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::node::cgroup_hierarchies;
use super::{ip, Error, Layout, NodeSpec, Result, HOST_IF, PREFIX};

/// The sysctls a kubelet changes at startup (unless told to protect the kernel's
/// defaults, which then makes it refuse to start here): saved before the first
/// kubelet starts, restored by teardown.
pub const KUBELET_SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Records the values of [`KUBELET_SYSCTLS`] (once: an existing record is kept, it
/// holds the values from before any kubelet ran).
pub fn save_sysctls(layout: &Layout) -> Result<()> {
    let path = layout.saved_sysctls();
    if path.exists() {
        return Ok(());
    }
    let mut text = String::new();
    for key in KUBELET_SYSCTLS {
        let file = Path::new("/proc/sys").join(key);
        let value = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        text.push_str(&format!("{key}={}\n", value.trim()));
    }
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

fn restore_sysctls(layout: &Layout) -> Vec<String> {
    let mut problems = Vec::new();
    let text = std::fs::read_to_string(layout.saved_sysctls()).unwrap_or_default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        // Only the keys this module saves are written back.
        if !KUBELET_SYSCTLS.contains(&key) {
            continue;
        }
        let file = Path::new("/proc/sys").join(key);
        if let Err(e) = std::fs::write(&file, value) {
            problems.push(format!("restoring {}: {e}", file.display()));
        }
    }
    problems
}

/// The `ambk-` network namespaces and their inode numbers.
fn cluster_netns() -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let ino = std::fs::metadata(e.path()).ok()?.ino();
                    name.starts_with(PREFIX).then_some((name, ino))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A process of the cluster: why it counts as one.
struct Member {
    pid: i32,
    why: String,
}

fn netns_inode(pid: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let text = link.to_string_lossy();
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Whether a `/proc/<pid>/cgroup` text puts the process under an `ambk-` root.
pub fn in_cluster_cgroup(cgroup: &str) -> bool {
    cgroup.lines().any(|l| {
        l.splitn(3, ':')
            .nth(2)
            .is_some_and(|path| path.starts_with(&format!("/{PREFIX}")))
    })
}

/// Whether a `/proc/<pid>/cgroup` text puts the process under node `root`'s cgroup
/// (`/ambk-w1`, and not `/ambk-w10`).
pub fn in_node_cgroup(cgroup: &str, root: &str) -> bool {
    let top = format!("/{root}");
    cgroup.lines().any(|l| {
        l.splitn(3, ':').nth(2).is_some_and(|path| {
            path == top || path.strip_prefix(&top).is_some_and(|r| r.starts_with('/'))
        })
    })
}

/// Whose processes: a whole cluster's (rooted at a directory), or one node's.
#[derive(Clone, Copy)]
enum Scope<'a> {
    Cluster(&'a Path),
    Node(&'a NodeSpec),
}

/// The programs the cluster starts on the host with its root in their arguments (the
/// control plane, the nodes' runtimes and kubelets, the tools that enter a node).
const DAEMONS: [&str; 9] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "containerd",
    "nsenter",
    "unshare",
    "sh",
];

/// This process and its ancestors: never the cluster's, whatever their arguments say.
fn ancestry() -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    let mut pid = std::process::id() as i32;
    while pid > 1 && out.insert(pid) {
        pid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0);
    }
    out
}

/// Every process of `scope` (never this process or its ancestors): for a cluster, in
/// a node's network namespace or cgroups, or one of [`DAEMONS`] naming its root; for
/// a node, in its network namespace or cgroups.
fn members(scope: Scope<'_>) -> Vec<Member> {
    let mine = ancestry();
    let netns: BTreeSet<u64> = cluster_netns()
        .into_iter()
        .filter(|(name, _)| match scope {
            Scope::Cluster(_) => true,
            Scope::Node(spec) => *name == spec.netns(),
        })
        .map(|(_, ino)| ino)
        .collect();
    let root_text = match scope {
        Scope::Cluster(root) => root.to_string_lossy().into_owned(),
        Scope::Node(_) => String::new(),
    };
    let in_cgroup = |text: &str| match scope {
        Scope::Cluster(_) => in_cluster_cgroup(text),
        Scope::Node(spec) => in_node_cgroup(text, &spec.netns()),
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if mine.contains(&pid) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let why = if netns_inode(pid).is_some_and(|i| netns.contains(&i)) {
            "in a node's network namespace"
        } else if std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|c| in_cgroup(&c))
        {
            "in a node's cgroup"
        } else if !root_text.is_empty()
            && cmdline.contains(&root_text)
            && cmdline
                .split_whitespace()
                .next()
                .and_then(|p| p.rsplit('/').next())
                .is_some_and(|p| DAEMONS.contains(&p))
        {
            "naming the cluster's root"
        } else {
            continue;
        };
        out.push(Member {
            pid,
            why: format!("{why}: {pid} {}", cmdline.trim()),
        });
    }
    out
}

/// Reaps any of this process's children that have exited (daemons it started).
pub fn reap() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(status) = waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

fn kill_all(scope: Scope<'_>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        reap();
        let left = members(scope);
        if left.is_empty() {
            return Vec::new();
        }
        if Instant::now() > deadline {
            return left.into_iter().map(|m| m.why).collect();
        }
        for m in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(m.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills every process of node `spec` at once (SIGKILL), as a power cut stops them:
/// its daemons, the holder of its mount namespace, and every pod's processes.
pub fn kill_node(spec: &NodeSpec) -> Result<()> {
    let left = kill_all(Scope::Node(spec));
    if left.is_empty() {
        Ok(())
    } else {
        Err(Error::Setup(format!(
            "{}'s processes would not die:\n  {}",
            spec.name,
            left.join("\n  ")
        )))
    }
}

/// The `ambk-` cgroup directories of every hierarchy (top level only).
fn cluster_cgroups() -> Vec<PathBuf> {
    cgroup_hierarchies()
        .into_iter()
        .flat_map(|h| {
            std::fs::read_dir(&h)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| {
                            p.is_dir()
                                && p.file_name()
                                    .is_some_and(|n| n.to_string_lossy().starts_with(PREFIX))
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// Removes a cgroup and its children, deepest first.
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Mount points on the host under `root` or made by the cluster (`ambk-` sources).
fn cluster_mounts(root: &Path) -> Vec<String> {
    let root_text = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let point = f.get(4)?;
            let source = l.split(" - ").nth(1)?.split_whitespace().nth(1)?;
            (point.starts_with(&root_text) || source.starts_with(PREFIX)).then(|| point.to_string())
        })
        .collect()
}

fn cluster_links() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim().split('@').next()?.to_string();
            name.starts_with(PREFIX).then_some(name)
        })
        .collect()
}

/// Removes the cluster rooted at `layout` and everything it made on the machine;
/// with `keep_files`, its root directory stays (logs, certificates). Errors name
/// what could not be removed; everything removable is removed first.
pub fn down(layout: &Layout, keep_files: bool) -> Result<()> {
    let mut problems = kill_all(Scope::Cluster(&layout.root));
    for cg in cluster_cgroups() {
        let mut last = None;
        for _ in 0..50 {
            match remove_cgroup(&cg) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(e) = last {
            problems.push(format!("cgroup {}: {e}", cg.display()));
        }
    }
    for (name, _) in cluster_netns() {
        if let Err(e) = ip(&["netns", "del", &name]) {
            problems.push(e.to_string());
        }
    }
    if cluster_links().iter().any(|l| l == HOST_IF) {
        let _ = ip(&["link", "del", HOST_IF]);
    }
    problems.extend(restore_sysctls(layout));
    for point in cluster_mounts(&layout.root).into_iter().rev() {
        let _ = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    if !keep_files && layout.root.exists() {
        if let Err(e) = std::fs::remove_dir_all(&layout.root) {
            problems.push(format!("{}: {e}", layout.root.display()));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Setup(format!(
            "the cluster could not be removed entirely:\n  {}",
            problems.join("\n  ")
        )))
    }
}

/// The host's own netfilter rules (both families, both iptables backends), without
/// counters or timestamps: the cluster must not change them (its nodes' rules live in
/// the nodes' namespaces).
pub fn host_rules() -> String {
    let mut out = String::new();
    for save in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        let text = std::process::Command::new(save)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            // ":CHAIN POLICY [packets:bytes]": the counters change with traffic.
            let line = match line.rsplit_once(" [") {
                Some((head, _)) if line.starts_with(':') => head,
                _ => line,
            };
            out.push_str(&format!("{save}: {line}\n"));
        }
    }
    out
}

/// The lines of `now` that `before` lacks and the other way round, as leftovers.
pub fn rule_changes(before: &str, now: &str) -> Vec<String> {
    let b: BTreeSet<&str> = before.lines().collect();
    let n: BTreeSet<&str> = now.lines().collect();
    n.difference(&b)
        .map(|l| format!("host rule added: {l}"))
        .chain(b.difference(&n).map(|l| format!("host rule removed: {l}")))
        .collect()
}

/// Whatever of a cluster rooted at `root` is still on the machine: processes, mounts,
/// cgroups, network namespaces, links and routes. Empty after [`down`].
pub fn leftovers(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = members(Scope::Cluster(root))
        .into_iter()
        .map(|m| format!("process {}", m.why))
        .collect();
    out.extend(
        cluster_mounts(root)
            .into_iter()
            .map(|m| format!("mount {m}")),
    );
    out.extend(
        cluster_cgroups()
            .into_iter()
            .map(|c| format!("cgroup {}", c.display())),
    );
    out.extend(
        cluster_netns()
            .into_iter()
            .map(|(n, _)| format!("network namespace {n}")),
    );
    out.extend(cluster_links().into_iter().map(|l| format!("link {l}")));
    out.extend(
        ip(&["route", "show"])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(HOST_IF) || l.contains("172.30.0."))
            .map(|l| format!("route {l}")),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_host_rule_is_a_leftover_and_counters_are_not() {
        let before = "iptables-nft-save: :INPUT ACCEPT\niptables-nft-save: -A INPUT -j X\n";
        assert!(rule_changes(before, before).is_empty());
        let now = "iptables-nft-save: :INPUT ACCEPT\niptables-nft-save: -A INPUT -j Y\n";
        let changes = rule_changes(before, now);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes[0].contains("added: iptables-nft-save: -A INPUT -j Y"));
    }

    #[test]
    fn processes_in_a_node_cgroup_are_recognised_and_others_are_not() {
        let pod =
            "12:pids:/ambk-w1/kubepods/besteffort/pod1234/abcd\n11:memory:/ambk-w1/kubepods\n";
        assert!(in_cluster_cgroup(pod));
        let host = "12:pids:/\n11:memory:/user.slice\n0::/init.scope\n";
        assert!(!in_cluster_cgroup(host));
        // A cgroup that only contains the prefix further down is not the cluster's.
        assert!(!in_cluster_cgroup("3:cpu:/system/ambk-w1\n"));
        // One node's: its root and below, not another node's with a longer name.
        assert!(in_node_cgroup(pod, "ambk-w1"));
        assert!(!in_node_cgroup(pod, "ambk-w2"));
        assert!(!in_node_cgroup("4:pids:/ambk-w10/kubepods\n", "ambk-w1"));
        assert!(in_node_cgroup("4:pids:/ambk-w1\n", "ambk-w1"));
    }
}
