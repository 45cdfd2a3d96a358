//! The agent keeps every enrolled pod's redirection as it should be: rules or routes
//! changed by hand inside a pod are found by the periodic check, put back, logged with
//! the difference and counted; a pod whose sandbox vanished without a CNI DEL is
//! reported once (log, metric, an event on the pod) and not retried forever. Read
//! through the agent's metrics endpoint, as Prometheus would. Kubernetes mode, real
//! netns, real processes. Root only.

use std::time::{Duration, Instant};

use e2e::cluster::{Cluster, AMBIENT};
use e2e::node::normalize_save;
use e2e::observe::SPEC_SAVE;
use e2e::prom;
use e2e::AgentProcess;

async fn metrics(agent: &AgentProcess) -> String {
    let addr = agent.listening_addr("monitoring endpoint listening").await;
    let (status, body) = e2e::http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn scrape_until(agent: &AgentProcess, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = metrics(agent).await;
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}; last scrape:\n{text}\nagent log:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    prom::sum(text, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_routes_changed_by_hand_are_restored_within_an_interval_logged_and_counted() {
    let cluster = Cluster::new(44, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let agent = cluster.start_agent_with(1, |cmd| {
        cmd.env("DRIFT_CHECK_INTERVAL", "1");
    });
    let _zt = cluster.start_ztunnel(1);
    cluster.wait_annotation(&a, Some("enabled"), &agent).await;
    let routing = a.policy_routing();
    assert_eq!(a.iptables_save(), normalize_save(SPEC_SAVE));

    // The agent's own view, before anything drifts.
    let text = scrape_until(&agent, "the pod enabled and ztunnel connected", |t| {
        value(t, "istio_cni_pods", &[("state", "enabled")]) == 1.0
            && value(t, "ztunnel_connected", &[]) == 1.0
    })
    .await;
    assert!(
        value(
            &text,
            "nodeagent_reconcile_events_total",
            &[("type", "add"), ("result", "success")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "istio_cni_enrollment_duration_seconds_count",
            &[("trigger", "watch")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(value(&text, "istio_cni_install_ready", &[]), 0.0, "{text}");
    assert_eq!(value(&text, "istio_cni_rule_drift_found_total", &[]), 0.0);

    // Someone deletes the outbound redirect inside the pod, and then the policy
    // route. One edit at a time: a check that ran between two quick edits would find
    // them in two rounds, or find one and repair both (each round reads the rules,
    // then the routes).
    let found = "istio_cni_rule_drift_found_total";
    let repaired = "istio_cni_rule_drift_repaired_total";
    let rule = a.delete_outbound_redirect();
    assert_ne!(a.iptables_save(), normalize_save(SPEC_SAVE));
    let text = scrape_until(&agent, "the rule's drift repaired", |t| {
        value(t, repaired, &[]) == 1.0
    })
    .await;
    assert_eq!(value(&text, found, &[]), 1.0);
    assert_eq!(a.iptables_save(), normalize_save(SPEC_SAVE));

    a.delete_policy_route();
    assert_ne!(a.policy_routing(), routing);
    let text = scrape_until(&agent, "the route's drift repaired", |t| {
        value(t, repaired, &[]) == 2.0
    })
    .await;
    assert_eq!(value(&text, found, &[]), 2.0);
    assert_eq!(a.iptables_save(), normalize_save(SPEC_SAVE));
    assert_eq!(a.policy_routing(), routing);
    // The log names what was missing, each time.
    let drifted = agent.lines(&["redirection drifted"]);
    assert_eq!(drifted.len(), 2, "{}", agent.logs());
    assert!(
        drifted[0].contains(&format!("IPv4 missing: nat: -A {rule}")),
        "{}",
        drifted[0]
    );
    assert!(
        drifted[1].contains("IPv4 missing: ip route local 0.0.0.0/0 dev lo table 100"),
        "{}",
        drifted[1]
    );
    agent.wait_for(&["redirection repaired"], 2).await;

    // Intact rules are not counted (nor rewritten) by the next rounds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let text = metrics(&agent).await;
    assert_eq!(value(&text, found, &[]), 2.0, "{text}");
    assert_eq!(agent.count(&["redirection drifted"]), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_sandbox_vanished_is_reported_once_with_an_event_and_not_retried() {
    let cluster = Cluster::new(45, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let mut a = cluster.add_pod("demo", "sleep", &[]);
    let b = cluster.add_pod("demo", "httpbin", &[]);
    let agent = cluster.start_agent_with(1, |cmd| {
        cmd.env("DRIFT_CHECK_INTERVAL", "1");
    });
    let _zt = cluster.start_ztunnel(1);
    for pod in [&a, &b] {
        cluster.wait_annotation(pod, Some("enabled"), &agent).await;
    }
    scrape_until(&agent, "both pods enabled", |t| {
        value(t, "istio_cni_pods", &[("state", "enabled")]) == 2.0
    })
    .await;

    // a's sandbox disappears and no CNI DEL reaches the agent.
    a.vanish();
    // The counter and the state gauge are two metrics: wait for both.
    let text = scrape_until(&agent, "a reported unrepairable", |t| {
        value(t, "istio_cni_rule_drift_unrepairable_total", &[]) == 1.0
            && value(t, "istio_cni_pods", &[("state", "unrepairable")]) == 1.0
    })
    .await;
    assert_eq!(
        value(&text, "istio_cni_pods", &[("state", "unrepairable")]),
        1.0
    );
    assert_eq!(value(&text, "istio_cni_pods", &[("state", "enabled")]), 1.0);
    let gave_up = agent.lines(&["giving up on the pod's redirection"]);
    assert_eq!(gave_up.len(), 1, "{}", agent.logs());
    assert!(
        gave_up[0].contains("demo/sleep") && gave_up[0].contains("is gone"),
        "{}",
        gave_up[0]
    );
    // An event on the pod, where `kubectl describe pod` shows it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let event = loop {
        let events = cluster.api.events("demo");
        if let Some(e) = events
            .into_iter()
            .find(|e| e["reason"] == "AmbientRedirectionUnrepairable")
        {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no event; agent log:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["involvedObject"]["kind"], "Pod");
    assert_eq!(event["involvedObject"]["name"], "sleep");
    assert_eq!(event["involvedObject"]["uid"], a.uid.as_str());

    // Not retried: three more rounds change nothing; b is untouched.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let text = metrics(&agent).await;
    assert_eq!(
        value(&text, "istio_cni_rule_drift_unrepairable_total", &[]),
        1.0,
        "{text}"
    );
    assert_eq!(agent.count(&["giving up on the pod's redirection"]), 1);
    assert_eq!(cluster.api.events("demo").len(), 1);
    assert_eq!(value(&text, "istio_cni_rule_drift_found_total", &[]), 0.0);
    assert_eq!(b.iptables_save(), normalize_save(SPEC_SAVE));
}
