//! From Istio's own istio-cni to ours, as a cluster running Istio makes the move: the
//! applications were enrolled by Istio's agent (beside our ztunnel, which speaks ZDS
//! to it), then `helm upgrade istio-cni` to our chart under the same release name.
//!
//! Measured while it happens: a prober in the client pod (no request may fail), a
//! capture of everything to and from httpbin on the client's node link (nothing in
//! the clear), the host probe rule and set on httpbin's node sampled every quarter
//! second (never missing: the kubelet's probes keep working), and a pod started on
//! the client's node while no agent runs there (captured before its first byte).

use std::time::{Duration, Instant};

use super::evidence::{self, capture, only_tls_to_15008, Sampler};
use super::{
    annotation_becomes, apply, available, eventually, install, running_prober, Run, ISTIO_NS,
};
use crate::incluster::{client, outage, request, request_from, Client, EARLY_REQUESTS, NAMESPACE};
use e2e::observe;

/// The last plugin entry of a node's primary config list: Istio's agent writes
/// `cni_agent_run_dir`, ours `agent_socket`.
fn plugin_entry(node: &crate::realcluster::node::Node) -> Result<serde_json::Value, String> {
    let files = evidence::conf_files(node)?;
    let (name, list) = files
        .first()
        .ok_or_else(|| format!("no config list on {}", node.spec.name))?;
    evidence::plugins(list)
        .last()
        .cloned()
        .ok_or_else(|| format!("{name}: no plugins"))
}

fn keys(entry: &serde_json::Value) -> String {
    entry
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

/// Istio's agent enrolled the applications, and our ztunnel carries their traffic.
pub fn before(r: &mut Run) -> bool {
    r.report.part("Istio's istio-cni agent with our ztunnel");
    for i in 0..r.cluster.nodes.len() {
        let node = r.cluster.nodes[i].clone();
        let entry = plugin_entry(&node).and_then(|e| {
            if e["type"] == "istio-cni" && e.get("cni_agent_run_dir").is_some() {
                Ok(format!("{}: Istio's entry ({})", node.spec.name, keys(&e)))
            } else {
                Err(format!("{}: not Istio's entry: {e}", node.spec.name))
            }
        });
        r.check("the chain ends with Istio's plugin", entry);
    }
    let Ok((sleep, httpbin)) = r.pods() else {
        return r.check("the applications' pods", Err("not found".into()));
    };
    let k = r.k().clone();
    for pod in [&sleep, &httpbin] {
        r.check(
            "Istio's agent set the redirection annotation",
            annotation_becomes(&k, NAMESPACE, pod, "enabled", Duration::from_secs(60)),
        );
    }
    let answered = eventually(Duration::from_secs(60), || request(&k, &sleep));
    r.check(
        "sleep -> httpbin answers 200 (Istio's agent, our ztunnel)",
        answered.map(|()| "200".into()),
    );
    let (src, dst) = (
        observe::spiffe("cluster.local", NAMESPACE, "sleep"),
        observe::spiffe("cluster.local", NAMESPACE, "httpbin"),
    );
    r.check(
        "our ztunnel got both pods from Istio's agent over ZDS and carried the request over mTLS",
        eventually(Duration::from_secs(30), || {
            let log = evidence::logs(&k, ISTIO_NS, "app=ztunnel")?;
            observe::check_mtls_access_log(&log, &src, &dst)?;
            Ok(log
                .lines()
                .filter(|l| l.contains("inpod") || l.contains(&format!("src.identity=\"{src}\"")))
                .take(4)
                .collect::<Vec<_>>()
                .join("\n"))
        }),
    )
}

/// `helm upgrade istio-cni` from Istio's chart to ours, measured.
pub fn run(r: &mut Run) -> bool {
    r.report
        .part("migration: helm upgrade istio-cni from Istio's chart to ours");
    let k = r.k().clone();
    let Ok((sleep, httpbin)) = r.pods() else {
        return r.check("the applications' pods", Err("not found".into()));
    };
    let Ok(httpbin_ip) = evidence::pod_ip(&k, &httpbin) else {
        return r.check("httpbin's address", Err("none".into()));
    };
    let (client_node, server_node) = (r.node(0), r.node(1));
    let old_agent = match k.pod_on_node(ISTIO_NS, "k8s-app=istio-cni-node", &client_node.name) {
        Ok(p) => p,
        Err(e) => return r.check("Istio's agent on the client's node", Err(e)),
    };
    let cap = capture(
        &client_node,
        &format!("host {httpbin_ip}"),
        &r.captures(),
        "migration",
    );
    let probe_ns = server_node.netns();
    let probe_ip = httpbin_ip.clone();
    let probes = Sampler::start(Duration::from_millis(250), move || {
        evidence::host_probe_rule_and_member(&probe_ns, &probe_ip)
    });
    let prober = match running_prober(&k, &sleep, 400) {
        Ok(p) => p,
        Err(e) => return r.check("a prober in sleep", Err(e)),
    };

    // The upgrade runs (and waits for the rollout) while a pod joins the client's node.
    let (hub, tag) = match install::ours(r) {
        Ok(v) => v,
        Err(e) => return r.check("our images", Err(e)),
    };
    let chart = r.m.charts.join("istio-cni").display().to_string();
    let helm = r.m.helm.clone();
    let kubeconfig = r.cluster.layout.kubeconfig("admin");
    let started = Instant::now();
    let upgrade = std::thread::spawn(move || {
        let args = [
            "upgrade",
            "istio-cni",
            &chart,
            "--set",
            &format!("hub={hub}"),
            "--set",
            &format!("tag={tag}"),
            "--namespace",
            ISTIO_NS,
            "--wait",
            "--timeout",
            "5m",
        ];
        e2e::output(
            std::process::Command::new(helm)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(args),
            None,
        )
        .map(|_| format!("helm {} ({:.0?})", args.join(" "), started.elapsed()))
    });
    // The old agent on the client's node stops: a pod created now finds no agent.
    let gap = crate::realcluster::wait_for(
        "Istio's agent on the client's node to stop",
        Duration::from_secs(240),
        Duration::from_millis(100),
        || {
            let deleting = k.jsonpath(
                ISTIO_NS,
                &format!("pod/{old_agent}"),
                "{.metadata.deletionTimestamp}",
            );
            match deleting {
                Ok(t) if !t.is_empty() => Ok(()),
                Err(e) if e.contains("NotFound") || e.contains("not found") => Ok(()),
                _ => Err("still running".to_string()),
            }
        },
    );
    let joiner = Client {
        name: "joiner",
        namespace: NAMESPACE,
        image: &r.image("curl"),
        node: Some(&client_node.name),
        script: Some(EARLY_REQUESTS),
        ..Client::default()
    };
    let joined = gap
        .map_err(|e| e.to_string())
        .and_then(|()| apply(&k, &client(&joiner)));
    let upgraded = upgrade
        .join()
        .unwrap_or_else(|_| Err("the helm thread panicked".into()));
    r.check(
        "helm upgrade istio-cni: Istio's chart to ours, same release",
        upgraded,
    );
    let joiner_up = joined.and_then(|_| available(&k, NAMESPACE, &["joiner"], "240s"));
    std::thread::sleep(Duration::from_secs(5));
    let probed = prober.stop();
    let o = outage(&probed);
    r.check(
        "migration under a prober: no request failed",
        if o.total >= 10 && o.failed == 0 {
            Ok(format!(
                "{} requests over {:.0?}, none failed",
                o.total,
                started.elapsed()
            ))
        } else {
            Err(format!(
                "{} requests, {} failed, longest stretch unanswered {} ms",
                o.total, o.failed, o.longest_ms
            ))
        },
    );
    r.check(
        &format!(
            "host probe rule and set on {} (httpbin's node) never missing during the migration",
            server_node.name
        ),
        probes.stop(),
    );
    let joiner_pod = joiner_up.and_then(|_| k.pod_of(NAMESPACE, "joiner"));
    let captured = joiner_pod.clone().and_then(|p| {
        annotation_becomes(&k, NAMESPACE, &p, "enabled", Duration::from_secs(60))?;
        eventually(Duration::from_secs(30), || request_from(&k, NAMESPACE, &p))?;
        let first = k.run(&["logs", "-n", NAMESPACE, &p, "--tail=-1"])?;
        Ok(format!(
            "{p}: created while no agent ran on {}; enrolled, and answered; its first requests (time, status):\n{}",
            client_node.name,
            first.lines().take(4).collect::<Vec<_>>().join("\n")
        ))
    });
    r.check(
        "a pod started during the migration is in the mesh",
        captured,
    );
    r.check(
        &format!(
            "tcpdump on {}: everything to or from httpbin was TLS to 15008",
            client_node.name
        ),
        only_tls_to_15008(cap, &httpbin_ip, false),
    );
    for i in 0..r.cluster.nodes.len() {
        let node = r.cluster.nodes[i].clone();
        let entry = plugin_entry(&node).and_then(|e| {
            if e.get("agent_socket").is_some() && e.get("cni_agent_run_dir").is_none() {
                Ok(format!("{}: our entry ({})", node.spec.name, keys(&e)))
            } else {
                Err(format!("{}: not our entry: {e}", node.spec.name))
            }
        });
        r.check(
            "the chain's istio-cni entry is ours",
            entry.and_then(|e| Ok(e + "\n" + &evidence::chain_of(&node)?)),
        );
        r.check(
            &format!(
                "no pod left uncaptured on {}: istio-cni diagnose finds every pod healthy",
                node.spec.name
            ),
            evidence::diagnose(&k, &node.spec.name, None),
        );
    }
    // Its requests would only blur the later parts' counts.
    let _ = k.run(&[
        "delete",
        "deploy",
        "-n",
        NAMESPACE,
        "joiner",
        "--wait=false",
    ]);
    true
}
