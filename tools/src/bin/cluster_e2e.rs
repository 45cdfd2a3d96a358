//! The in-cluster half of `cargo xtask cluster-e2e`:
//!
//! - `cluster_e2e run --manifest <file> [--keep] [--out <dir>]`: brings a real
//!   cluster up on this machine (`tools::realcluster`), installs Istio's `base` and
//!   `istiod` (ambient profile), Istio's own istio-cni chart beside our ztunnel, and
//!   the sample applications, then makes the checks of `tools::clustercheck`: the
//!   migration to our istio-cni chart, day one, pods of every kind, Istio's policy
//!   APIs, an upgrade of both charts, node restarts, and uninstalling; each check is
//!   printed with its evidence; on failure it collects diagnostics into `--out`; then
//!   it removes the cluster (unless `--keep`) and checks nothing is left.
//!   `AMBIENT_CLUSTER_PARTS=policy,upgrade` makes only those parts after installing
//!   (for working on one; the suite makes them all).
//! - `cluster_e2e down --root <dir>`: removes a cluster an earlier run kept.
//!
//! Exit code 0 when every check passed, 1 when one failed, 2 on bad arguments.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use tools::clustercheck::{self, install, Report, Run, ISTIO_NS};
use tools::incluster::{self, NAMESPACE};
use tools::realcluster::{self, teardown, Cluster, Layout, Manifest};

/// The parts after installing, in order.
const PARTS: [&str; 7] = [
    "migration",
    "dayone",
    "kinds",
    "policy",
    "upgrade",
    "restarts",
    "uninstall",
];

/// Installs Istio's control plane, Istio's own istio-cni and our ztunnel, and the
/// applications, then makes every part `wanted` in order; `false` when installing
/// failed.
fn checks(r: &mut Run, wanted: &dyn Fn(&str) -> bool) -> bool {
    r.report
        .part("installing as a cluster running Istio has it, with our ztunnel");
    if !install::control_plane(r) {
        return false;
    }
    // With Istio's own agent the run starts where a user migrating starts; without it
    // (its chart failed) our chart goes in instead and the migration is not made.
    let istios = wanted("migration") && install::istio_cni(r);
    if wanted("migration") && !istios {
        let _ = install::helm(
            r,
            &["uninstall", "istio-cni", "--namespace", ISTIO_NS, "--wait"],
        );
    }
    if !istios && !install::ours_step(r, "install", "istio-cni", None) {
        return false;
    }
    if !install::ours_step(r, "install", "ztunnel", None) {
        return false;
    }
    let pods = r.k().run(&["get", "pods", "-n", ISTIO_NS, "-o", "wide"]);
    r.check("istiod, istio-cni-node and ztunnel running", pods);
    if !install::applications(r) {
        return false;
    }
    if !wanted("migration") {
        r.report.part("migration: left out (AMBIENT_CLUSTER_PARTS)");
    } else if istios && clustercheck::migration::before(r) {
        clustercheck::migration::run(r);
    }
    for part in &PARTS[1..] {
        if !wanted(part) {
            r.report
                .part(&format!("{part}: left out (AMBIENT_CLUSTER_PARTS)"));
            continue;
        }
        match *part {
            "dayone" => clustercheck::dayone::run(r),
            "kinds" => clustercheck::kinds::run(r),
            "policy" => clustercheck::policy::run(r),
            "upgrade" => clustercheck::upgrade::run(r),
            "restarts" => clustercheck::restarts::run(r),
            _ => clustercheck::uninstall::run(r),
        }
    }
    true
}

/// Everything an operator would look at, into `out`.
fn collect(cluster: &Cluster, out: &Path) {
    let _ = std::fs::create_dir_all(out);
    let k = &cluster.kubectl;
    let save = |name: &str, text: Result<String, String>| {
        let text = text.unwrap_or_else(|e| e);
        let _ = std::fs::write(out.join(name), text);
    };
    save("pods.txt", k.run(&["get", "pods", "-A", "-o", "wide"]));
    save(
        "events.txt",
        k.run(&["get", "events", "-A", "--sort-by=.lastTimestamp"]),
    );
    save("nodes.txt", k.run(&["describe", "nodes"]));
    for (name, ns, selector) in [
        ("istio-cni-node.log", ISTIO_NS, "k8s-app=istio-cni-node"),
        ("ztunnel.log", ISTIO_NS, "app=ztunnel"),
        ("istiod.log", ISTIO_NS, "app=istiod"),
        ("kube-proxy.log", "kube-system", "k8s-app=kube-proxy"),
        ("coredns.log", "kube-system", "k8s-app=kube-dns"),
    ] {
        save(
            name,
            k.run(&[
                "logs",
                "-n",
                ns,
                "-l",
                selector,
                "--tail=-1",
                "--prefix",
                "--all-containers",
            ]),
        );
    }
    // The processes' own logs (kubelets, containerd, the control plane) and each
    // node's CNI conf dir.
    let _ = Command::new("cp")
        .arg("-r")
        .arg(cluster.layout.logs())
        .arg(out.join("processes"))
        .status();
    for node in &cluster.nodes {
        let _ = Command::new("cp")
            .arg("-r")
            .arg(node.dir.join("cni-conf"))
            .arg(out.join(format!("{}-cni-net.d", node.spec.name)))
            .status();
    }
    println!("diagnostics in {}", out.display());
}

fn down(layout: &Layout, report: &mut Report) {
    let started = Instant::now();
    let rules_before = std::fs::read_to_string(layout.host_rules_before()).ok();
    let removed = teardown::down(layout, false).map_err(|e| e.to_string());
    report.check(
        "teardown: no process, mount, cgroup, netns, interface, route or host rule left",
        removed.and_then(|()| {
            let mut left = teardown::leftovers(&layout.root);
            if let Some(before) = &rules_before {
                left.extend(teardown::rule_changes(before, &teardown::host_rules()));
            }
            if left.is_empty() {
                Ok(format!("removed in {:.1?}", started.elapsed()))
            } else {
                Err(left.join("\n"))
            }
        }),
    );
}

fn run(manifest: &Path, keep: bool, out: &Path) -> ExitCode {
    let m = match Manifest::read(manifest) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut report = Report::default();
    println!(
        "versions: {}",
        m.versions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cluster = match realcluster::up(&m) {
        Ok(c) => c,
        Err(e) => {
            report.check("a cluster on this machine", Err(e.to_string()));
            let layout = Layout::new(&m.root);
            let _ = std::fs::create_dir_all(out);
            let _ = Command::new("cp")
                .arg("-r")
                .arg(layout.logs())
                .arg(out.join("processes"))
                .status();
            println!("diagnostics in {}", out.display());
            if !keep {
                down(&layout, &mut report);
            }
            return ExitCode::FAILURE;
        }
    };
    report.check(
        "a cluster on this machine: nodes Ready, kube-proxy and CoreDNS running",
        cluster
            .kubectl
            .run(&["get", "nodes", "-o", "wide"])
            .and_then(|n| {
                Ok(n + &cluster
                    .kubectl
                    .run(&["get", "pods", "-n", "kube-system", "-o", "wide"])?)
            }),
    );
    let parts = std::env::var("AMBIENT_CLUSTER_PARTS").unwrap_or_default();
    let wanted = |part: &str| parts.is_empty() || parts.split(',').any(|p| p.trim() == part);
    let mut r = Run {
        m: &m,
        cluster,
        report,
        out: out.to_path_buf(),
    };
    checks(&mut r, &wanted);
    let Run {
        cluster,
        mut report,
        ..
    } = r;
    if report.failed() > 0 {
        collect(&cluster, out);
    }
    if keep {
        println!(
            "\nThe cluster stays. Try:\n  export KUBECONFIG={kubeconfig}\n  {kubectl} get pods -A -o wide\n  {kubectl} exec -n {NAMESPACE} deploy/sleep -- curl -s {url}\n  {istioctl} ztunnel-config workloads -n {ISTIO_NS} daemonset/ztunnel\n  {kubectl} logs -n {ISTIO_NS} -l app=ztunnel\n  ip netns exec {netns} tcpdump -ni {uplink} port 15008\nThe processes' logs are in {logs}. `cargo xtask cluster-e2e --down` removes it all.",
            kubeconfig = cluster.layout.kubeconfig("admin").display(),
            kubectl = cluster.kubectl.program.display(),
            url = incluster::URL,
            istioctl = m.components.join("istioctl").display(),
            netns = realcluster::NET_NS,
            uplink = cluster.nodes[0].spec.uplink(),
            logs = cluster.layout.logs().display(),
        );
    } else {
        down(&cluster.layout, &mut report);
    }
    let failed = report.failed();
    println!(
        "\n{} passed, {failed} failed, in {:.0?}",
        report.passed(),
        report.elapsed()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

const USAGE: &str = "usage: cluster_e2e run --manifest <file> [--keep] [--out <dir>]
       cluster_e2e down --root <dir>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    let command = it.next().map(String::as_str);
    let (mut manifest, mut keep, mut out, mut root) = (None, false, None, None);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--manifest" => manifest = it.next().map(PathBuf::from),
            "--keep" => keep = true,
            "--out" => out = it.next().map(PathBuf::from),
            "--root" => root = it.next().map(PathBuf::from),
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match (command, manifest) {
        (Some("run"), Some(manifest)) => run(
            &manifest,
            keep,
            &out.unwrap_or_else(|| PathBuf::from("target/cluster-e2e")),
        ),
        (Some("down"), _) if root.is_some() => {
            let mut report = Report::default();
            let layout = Layout::new(root.unwrap_or_default());
            down(&layout, &mut report);
            if report.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
