//! `helm uninstall` as docs/install.md tells an operator: ztunnel first, then istio-cni;
//! then both installed again.
//!
//! - Without ztunnel, enrolled pods fail closed: their requests fail, nothing leaves
//!   in the clear; new pods in the ambient namespace still start (enrolled, waiting).
//! - Without istio-cni, every node starts pods in any namespace, uncaptured; no file
//!   of ours is left in a node's CNI dirs, no socket or probe set of ours; pods that
//!   were enrolled keep their redirection (as Istio's do) until they end, and an
//!   event on each says so.
//! - Installed again, every pod is captured again.

use std::time::Duration;

use super::evidence::{self, capture, no_plaintext};
use super::{annotation_becomes, apply, available, eventually, install, Run};
use crate::incluster::{client, request, request_from, Client, Kubectl, NAMESPACE};
use crate::realcluster::node::{self, Node};
use e2e::observe;

const APP_PORT: u16 = 8080;

/// What of istio-cni is still on a node: files in its CNI dirs, its sockets, its
/// host probe sets.
fn ours_on(n: &Node) -> Vec<String> {
    let mut left = Vec::new();
    for dir in ["cni-bin", "cni-conf"] {
        for entry in std::fs::read_dir(n.dir.join(dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains("istio") {
                left.push(format!("{}: file {dir}/{name}", n.spec.name));
            }
        }
    }
    if let Ok(lists) = evidence::conf_lists(n) {
        for (name, types) in lists {
            if types.iter().any(|t| t == "istio-cni") {
                left.push(format!("{}: istio-cni in {name} ({types:?})", n.spec.name));
            }
        }
    }
    let run = |args: &[&str]| {
        let mut cmd = node::in_node(n.holder, args[0]);
        cmd.args(&args[1..]);
        e2e::output(&mut cmd, None).unwrap_or_default()
    };
    for path in [
        "/var/run/istio-cni/pluginevent.sock",
        "/var/run/ztunnel/ztunnel.sock",
    ] {
        if !run(&["sh", "-c", &format!("ls -d {path} 2>/dev/null || true")])
            .trim()
            .is_empty()
        {
            left.push(format!("{}: {path}", n.spec.name));
        }
    }
    let sets = run(&["sh", "-c", "ipset list -n 2>/dev/null || true"]);
    for set in sets.lines().filter(|s| s.starts_with("istio-")) {
        left.push(format!("{}: ipset {set}", n.spec.name));
    }
    left
}

/// A client pod in the ambient namespace started: `Ok(pod)` once Available.
fn start_client(k: &Kubectl, c: &Client) -> Result<String, String> {
    apply(k, &client(c))
        .and_then(|_| available(k, NAMESPACE, &[c.name], "120s"))
        .and_then(|_| k.pod_of(NAMESPACE, c.name))
}

pub fn run(r: &mut Run) {
    r.report
        .part("helm uninstall ztunnel, then istio-cni; then both installed again");
    let k = r.k().clone();
    let Ok((sleep, _)) = r.pods() else {
        r.check("the applications' pods", Err("not found".into()));
        return;
    };
    let (node0, image) = (r.node(0).name, r.image("curl"));
    let cap = capture(
        &r.node(0),
        &format!("port {APP_PORT}"),
        &r.captures(),
        "uninstall",
    );

    // ztunnel first: the pods it served fail closed.
    if !install::uninstall(r, "ztunnel") {
        return;
    }
    r.check(
        "without ztunnel, sleep's requests fail (closed)",
        eventually(Duration::from_secs(60), || match request(&k, &sleep) {
            Ok(()) => Err("still answered 200".into()),
            Err(e) => Ok(format!(
                "refused: {}",
                e.lines().last().unwrap_or("").trim()
            )),
        }),
    );
    let late = Client {
        name: "late",
        namespace: NAMESPACE,
        image: &image,
        node: Some(&node0),
        ..Client::default()
    };
    r.check(
        "without ztunnel, a new pod in the ambient namespace starts (redirected, pending, its traffic held)",
        start_client(&k, &late).and_then(|pod| {
            // `pending`: its rules are in, and it waits for a ztunnel to serve it.
            annotation_becomes(&k, NAMESPACE, &pod, "pending", Duration::from_secs(30))?;
            match request_from(&k, NAMESPACE, &pod) {
                Ok(()) => Err(format!("{pod} was answered without a ztunnel")),
                Err(_) => Ok(format!("{pod}: Running, ambient.istio.io/redirection=pending, its request not answered")),
            }
        }),
    );

    // Then istio-cni: every trace of it leaves every node.
    if !install::uninstall(r, "istio-cni") {
        return;
    }
    for i in 0..r.cluster.nodes.len() {
        let n = r.cluster.nodes[i].clone();
        r.check(
            &format!("{}: nothing of istio-cni left (CNI bin and conf dirs, kubeconfig, sockets, probe sets)", n.spec.name),
            eventually(Duration::from_secs(30), || {
                let left = ours_on(&n);
                if left.is_empty() {
                    let lists = evidence::conf_lists(&n)?;
                    Ok(lists
                        .iter()
                        .map(|(name, types)| format!("{}: /etc/cni/net.d/{name}: {}", n.spec.name, types.join(" -> ")))
                        .collect::<Vec<_>>()
                        .join("\n"))
                } else {
                    Err(left.join("\n"))
                }
            }),
        );
    }
    let debug_image = r.image("istio-cni");
    r.check(
        "a pod enrolled before keeps its redirection rules (as Istio's do), and fails closed",
        k.debug(
            NAMESPACE,
            &sleep,
            &debug_image,
            "rules-after",
            &["sh", "-c", "iptables-nft-save; iptables-legacy-save"],
        )
        .and_then(|save| {
            observe::check_rules(&save)?;
            // Its traffic still goes to 15001, where nothing listens: refused in the
            // pod, and the capture below shows nothing of it on the wire.
            if request(&k, &sleep).is_ok() {
                return Err(format!("{sleep} was answered with no ztunnel"));
            }
            Ok(format!(
                "{sleep}: {} ISTIO rules; its request refused",
                save.lines().filter(|l| l.starts_with("-A ISTIO")).count()
            ))
        }),
    );
    r.check(
        "each enrolled pod says so in an event (reason IstioCNIUninstalled)",
        eventually(Duration::from_secs(20), || {
            let events = k.run(&[
                "get",
                "events",
                "-n",
                NAMESPACE,
                "--field-selector",
                "reason=IstioCNIUninstalled",
                "-o",
                "jsonpath={range .items[*]}{.involvedObject.name}: {.message}{\"\\n\"}{end}",
            ])?;
            if events.contains(&sleep) {
                Ok(events)
            } else {
                Err(format!(
                    "no IstioCNIUninstalled event on {sleep}: {events:?}"
                ))
            }
        }),
    );
    for (what, namespace) in [
        ("the ambient namespace", NAMESPACE),
        ("kube-system", "kube-system"),
    ] {
        let fresh = Client {
            name: "fresh",
            namespace,
            image: &image,
            node: Some(&node0),
            ..Client::default()
        };
        let started = apply(&k, &client(&fresh))
            .and_then(|_| available(&k, namespace, &["fresh"], "120s"))
            .and_then(|_| k.pod_of(namespace, "fresh"))
            .and_then(|pod| {
                let note = k.jsonpath(
                    namespace,
                    &format!("pod/{pod}"),
                    "{.metadata.annotations.ambient\\.istio\\.io/redirection}",
                )?;
                if note.is_empty() {
                    Ok(format!(
                        "{namespace}/{pod}: Running, no redirection annotation"
                    ))
                } else {
                    Err(format!(
                        "{namespace}/{pod}: ambient.istio.io/redirection={note}"
                    ))
                }
            });
        r.check(
            &format!("without istio-cni, a new pod in {what} starts, uncaptured"),
            started,
        );
        let _ = k.run(&["delete", "deploy", "-n", namespace, "fresh", "--wait=false"]);
    }
    r.check(
        "while uninstalled: nothing to httpbin's port crossed in the clear",
        no_plaintext(cap, APP_PORT, false),
    );

    // Installed again: the pods are captured again.
    if !(install::ours_step(r, "install", "istio-cni", None)
        && install::ours_step(r, "install", "ztunnel", None))
    {
        return;
    }
    for i in 0..r.cluster.nodes.len() {
        let n = r.cluster.nodes[i].clone();
        r.check(
            &format!(
                "{}: installed again, the chain ends with our plugin",
                n.spec.name
            ),
            evidence::chain_of(&n),
        );
    }
    r.check(
        "installed again: sleep -> httpbin answers 200 over the mesh",
        eventually(Duration::from_secs(90), || {
            request(&k, &sleep).map(|()| format!("{sleep}: 200"))
        }),
    );
    r.check(
        "installed again: the pod started while ztunnel was gone is served",
        k.pod_of(NAMESPACE, "late").and_then(|pod| {
            eventually(Duration::from_secs(60), || {
                request_from(&k, NAMESPACE, &pod)
            })
            .map(|()| format!("{pod}: 200"))
        }),
    );
    for i in 0..r.cluster.nodes.len() {
        let name = r.node(i).name;
        r.check(
            &format!("installed again: every pod on {name} captured (istio-cni diagnose)"),
            eventually(Duration::from_secs(60), || {
                evidence::diagnose(&k, &name, None)
            }),
        );
    }
    let _ = k.run(&["delete", "deploy", "-n", NAMESPACE, "late", "--wait=false"]);
}
