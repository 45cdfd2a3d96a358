//! A node's daemons restarted, and the node power-cut and booted again, on the
//! client's node, with a client there that asks httpbin (on the other node) twice a
//! second from the moment its container starts. A capture on the node's link shows
//! whether any byte to httpbin's port crossed in the clear; after each event every
//! pod of the node runs again, captured (`istio-cni diagnose`), and answered.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::evidence::{self, capture, no_plaintext};
use super::{apply, available, eventually, Run};
use crate::incluster::{client, request, Client, Kubectl, EARLY_REQUESTS, NAMESPACE};
use crate::realcluster::{node, Components};

/// httpbin's port: in the mesh, nothing to it crosses between nodes.
const APP_PORT: u16 = 8080;

/// Every pod on `node`: its containers' IDs, phase and readiness.
fn node_pods(k: &Kubectl, node: &str) -> Result<BTreeMap<String, (String, bool)>, String> {
    let pods = k.run(&[
        "get", "pods", "-A", "--field-selector", &format!("spec.nodeName={node}"), "-o",
        "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {.status.phase}/{.status.conditions[?(@.type==\"Ready\")].status} {.status.containerStatuses[*].containerID}{\"\\n\"}{end}",
    ])?;
    Ok(pods
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, state) = (f.next()?, f.next()?);
            let ids: Vec<&str> = f.collect();
            Some((name.to_string(), (ids.join(","), state == "Running/True")))
        })
        .collect())
}

/// Once every pod that ran on `node` `before` runs again, Ready: with new containers
/// when `new_containers` (after a boot), else the same ones (a daemon's restart must
/// not restart pods).
fn back(
    k: &Kubectl,
    node: &str,
    before: &BTreeMap<String, (String, bool)>,
    new_containers: bool,
) -> Result<String, String> {
    let now = node_pods(k, node)?;
    let mut waiting = Vec::new();
    for (pod, (ids, _)) in before {
        match now.get(pod) {
            None => {} // deleted meanwhile (a pod the checks removed)
            Some((_, false)) => waiting.push(format!("{pod}: not Running and Ready")),
            Some((now_ids, true)) if new_containers && now_ids == ids => {
                waiting.push(format!("{pod}: still its old containers"))
            }
            Some((now_ids, true)) if !new_containers && now_ids != ids => {
                return Err(format!(
                    "{pod}: its containers were restarted ({ids} -> {now_ids})"
                ))
            }
            Some(_) => {}
        }
    }
    if waiting.is_empty() {
        Ok(format!(
            "{} pods on {node} Running and Ready, {}",
            now.len(),
            if new_containers {
                "each in new containers"
            } else {
                "each with the containers it had"
            }
        ))
    } else {
        Err(waiting.join("\n"))
    }
}

pub fn run(r: &mut Run) {
    r.report
        .part("node restarts: kubelet, containerd, a power cut");
    let k = r.k().clone();
    let node = r.node(0).name;
    let image = r.image("curl");
    let early = Client {
        name: "early",
        namespace: NAMESPACE,
        image: &image,
        node: Some(&node),
        script: Some(EARLY_REQUESTS),
        ..Client::default()
    };
    if !r.check(
        "a client asking httpbin twice a second from its start, on the client's node",
        apply(&k, &client(&early)).and_then(|_| available(&k, NAMESPACE, &["early"], "120s")),
    ) {
        return;
    }
    let components = Components {
        dir: r.m.components.clone(),
    };
    type Event = fn(
        &crate::realcluster::Layout,
        &Components,
        &node::Node,
    ) -> crate::realcluster::Result<Option<node::Node>>;
    let events: [(&str, Event); 3] = [
        ("the kubelet restarted", |l, c, n| node::restart_kubelet(l, c, n).map(|()| None)),
        ("containerd restarted", |l, _, n| node::restart_containerd(l, n).map(|()| None)),
        (
            "a power cut and boot (every process gone, pods' netns, rules and sockets lost, then containerd and the kubelet)",
            |l, c, n| node::power_cycle(l, c, n).map(Some),
        ),
    ];
    let Ok(httpbin_ip) = k
        .pod_of(NAMESPACE, "httpbin")
        .and_then(|p| evidence::pod_ip(&k, &p))
    else {
        r.check("httpbin's address", Err("none".into()));
        return;
    };
    for (i, (what, event)) in events.into_iter().enumerate() {
        let boot = i == 2;
        let before = match node_pods(&k, &node) {
            Ok(b) => b,
            Err(e) => {
                r.check(&format!("the pods on {node}"), Err(e));
                return;
            }
        };
        let label = ["kubelet", "containerd", "power-cut"][i];
        let cap = capture(
            &r.node(0),
            &format!("host {httpbin_ip}"),
            &r.captures(),
            &format!("restart-{label}"),
        );
        let started = Instant::now();
        let done = event(&r.cluster.layout, &components, &r.cluster.nodes[0]);
        let result = match done {
            Ok(Some(booted)) => {
                r.cluster.nodes[0] = booted;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        let back = result.and_then(|()| {
            // The statuses the API server holds are the old ones until the kubelet
            // reports: wait for what each pod should become.
            std::thread::sleep(Duration::from_secs(2));
            eventually(Duration::from_secs(300), || back(&k, &node, &before, boot))
        });
        let took = started.elapsed();
        let back_ok = r.check(
            &format!("{node}: {what}; every pod back"),
            back.map(|s| format!("{s}, {took:.0?} after")),
        );
        if back_ok {
            r.check(
                &format!("after {what}: every pod on {node} captured (istio-cni diagnose)"),
                eventually(Duration::from_secs(120), || {
                    evidence::diagnose(&k, &node, None)
                }),
            );
            let answered = eventually(Duration::from_secs(60), || {
                let sleep = k.pod_of(NAMESPACE, "sleep")?;
                request(&k, &sleep).map(|()| format!("{sleep}: 200"))
            });
            let early_log = k.pod_of(NAMESPACE, "early").and_then(|p| {
                let log = k.run(&["logs", "-n", NAMESPACE, &p, "--tail=-1"])?;
                let first_ok = log.lines().position(|l| l.ends_with(" 200"));
                match first_ok {
                    Some(i) => Ok(format!(
                        "{p}: {} requests since its container started, the first 200 at #{}",
                        log.lines().count(),
                        i + 1
                    )),
                    None => Err(format!(
                        "{p} got no answer: {}",
                        log.lines().take(5).collect::<Vec<_>>().join("; ")
                    )),
                }
            });
            r.check(
                &format!("after {what}: requests answered over the mesh"),
                answered.and_then(|a| Ok(format!("{a}\n{}", early_log?))),
            );
        }
        // Let the client keep asking a while longer before the capture stops.
        std::thread::sleep(Duration::from_secs(3));
        r.check(
            &format!("tcpdump on {node}'s link during and after {what}: to httpbin only HBONE (15008), nothing to its port {APP_PORT}, nothing in the clear"),
            no_plaintext(cap, APP_PORT, true),
        );
    }
    let _ = k.run(&["delete", "deploy", "-n", NAMESPACE, "early", "--wait=false"]);
}
