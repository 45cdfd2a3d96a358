//! Migration from Istio's istio-cni: a node whose pods were enrolled by Istio's agent
//! (its rules and policy routes in each pod, the pod annotated
//! `ambient.istio.io/redirection: enabled`) switches to our agent without a moment of
//! uncaptured traffic. Our agent recognises the rules as its own (they are the
//! specification's, which is Istio's ruleset), leaves them in place and hands the pod
//! to ztunnel: no rule is duplicated, none goes missing, at any moment.
//!
//! Real netns, the real agent and ztunnel, iptables in the pod sampled continuously
//! from before the agent starts until the pod is served. Root only.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::cluster::{Cluster, AMBIENT};
use e2e::node::normalize_save;
use e2e::observe::{INPOD_PORTS, SPEC6_SAVE, SPEC_SAVE};
use serde_json::json;

/// The rule Istio's agent adds with DNS capture on, which ours does not install.
const DNS_CAPTURE: &str = "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p udp -m udp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053";
/// The capture rules: at every moment each is in the pod exactly once.
const CAPTURE: [&str; 3] = [
    "--on-port 15008",
    "--on-port 15006",
    "-j REDIRECT --to-ports 15001",
];

/// A running pod as Istio's agent leaves it enrolled: its ruleset in both families
/// (with `extra` nat rules before the outbound capture, as another Istio release or
/// setting may have), the policy routes, and the annotation.
fn enrolled_by_istio(cluster: &Cluster, name: &str, extra: &[&str]) -> e2e::cluster::KubePod {
    let pod = cluster.run_pod("demo", name);
    let mut v4 = String::new();
    for line in SPEC_SAVE.lines() {
        if line.contains("--to-ports 15001") {
            for e in extra {
                v4.push_str(e);
                v4.push('\n');
            }
        }
        v4.push_str(line);
        v4.push('\n');
    }
    pod.exec_with_input(&["iptables-restore"], &v4);
    pod.exec_with_input(&["ip6tables-restore"], SPEC6_SAVE);
    for (family, any) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        pod.exec_with_input(
            &["ip", family, "-batch", "-"],
            &format!(
                "rule add fwmark 0x111/0xfff pref 32764 lookup 100\n\
                 route replace local {any} dev lo table 100\n"
            ),
        );
    }
    cluster.publish(&pod, &[]);
    cluster.api.patch_pod(
        "demo",
        name,
        json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}}),
    );
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_enrolled_by_istios_agent_are_adopted_with_no_duplicate_and_no_gap() {
    let cluster = Cluster::new(89, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    // Rules exactly ours (the specification's), and rules of an Istio with DNS capture.
    let same = enrolled_by_istio(&cluster, "sleep", &[]);
    let other = enrolled_by_istio(&cluster, "httpbin", &[DNS_CAPTURE]);
    let spec4 = normalize_save(SPEC_SAVE);
    let spec6 = normalize_save(SPEC6_SAVE);
    assert_eq!(same.iptables_save(), spec4);
    assert_eq!(same.ip6tables_save(), spec6);
    assert!(other.iptables_save().contains(DNS_CAPTURE));
    let routes = same.policy_routing();

    // Sample both pods' rules, each pod and family in a thread of its own, from
    // before our agent starts until ztunnel serves both pods and a while after.
    let done = Arc::new(AtomicBool::new(false));
    let samplers: Vec<_> = [&same, &other]
        .into_iter()
        .flat_map(|pod| {
            ["iptables-save", "ip6tables-save"]
                .map(|bin| (pod.name.clone(), pod.netns_name.clone(), bin))
        })
        .map(|(pod, ns, bin)| {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                while !done.load(Ordering::Relaxed) {
                    let out = Command::new("ip")
                        .args(["netns", "exec", &ns, bin])
                        .output()
                        .expect("save");
                    samples.push(normalize_save(&String::from_utf8_lossy(&out.stdout)));
                }
                (pod, bin, samples)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let agent = cluster.start_agent(1);
    let _zt = cluster.start_ztunnel(1);
    // Served: ztunnel's listeners in both pods.
    let deadline = Instant::now() + Duration::from_secs(15);
    for pod in [&same, &other] {
        loop {
            let ports: Vec<u16> = pod.listening().into_iter().map(|(p, _)| p).collect();
            if INPOD_PORTS.iter().all(|p| ports.contains(p)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} is not served; agent log:\n{}",
                pod.name,
                agent.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Past the agent's first verification of the adopted pods, too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, Ordering::Relaxed);
    for sampler in samplers {
        let (pod, bin, samples) = sampler.join().expect("sampler");
        eprintln!("{pod} {bin}: {} samples", samples.len());
        assert!(
            samples.len() >= 10,
            "{pod} {bin}: only {} samples",
            samples.len()
        );
        for (i, save) in samples.iter().enumerate() {
            let at = format!("{pod} {bin}, sample {i} of {}", samples.len());
            match (pod.as_str(), bin) {
                // Rules identical to ours, and IPv6 rules that were: never touched.
                ("sleep", "iptables-save") => assert_eq!(save, &spec4, "{at}"),
                (_, "ip6tables-save") => assert_eq!(save, &spec6, "{at}"),
                // Rules that differ: rewritten, with every capture rule there exactly
                // once at every moment.
                _ => {
                    for rule in CAPTURE {
                        assert_eq!(save.matches(rule).count(), 1, "{at}: {rule:?}\n{save}");
                    }
                }
            }
        }
    }
    // In the end: exactly our rules, once, and Istio's routes kept as they were.
    assert_eq!(
        other.iptables_save(),
        spec4,
        "the DNS capture rule is gone, nothing doubled"
    );
    assert_eq!(same.policy_routing(), routes);
    assert_eq!(other.policy_routing(), routes);
    for pod in [&same, &other] {
        assert_eq!(cluster.annotation(pod).as_deref(), Some("enabled"));
    }
}
