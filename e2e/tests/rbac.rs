//! The istio-cni chart's RBAC is exactly what the agent and its CNI plugin call.
//!
//! Every e2e cluster's API server enforces the chart's ClusterRole (from its reviewed
//! rendering, `charts/istio-cni/tests/golden-default.yaml`), so a call the code makes
//! without RBAC fails the tests that exercise it, as it would fail on a real cluster.
//! This test goes the other way: one scenario that takes every path that calls the
//! API (startup list, the watches, the plugin's look-ups, the annotation, an event,
//! the look-up of its DaemonSet and node when it stops),
//! after which the set of calls seen must equal what the chart grants: a rule nothing
//! uses fails here. Root only.

use std::time::{Duration, Instant};

use e2e::charts;
use e2e::cluster::{Cluster, AMBIENT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_rbac_is_exactly_the_api_calls_it_makes() {
    let cluster = Cluster::new(86, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    // Found running at startup (the list, then the watches).
    let mut a = cluster.add_pod("demo", "sleep", &[]);
    let mut agent = cluster.start_agent_with(1, |cmd| {
        cmd.env("DRIFT_CHECK_INTERVAL", "1");
    });
    let _zt = cluster.start_ztunnel(1);
    cluster.wait_annotation(&a, Some("enabled"), &agent).await;

    // Started through the CNI chain: the plugin looks the pod and its namespace up.
    cluster.create_pod_object("demo", "httpbin");
    let (_b, added) = cluster.start_sandbox("demo", "httpbin");
    added.unwrap_or_else(|e| panic!("CNI ADD: {e}\nagent log:\n{}", agent.logs()));
    cluster
        .wait_annotation_of("demo", "httpbin", Some("enabled"), &agent)
        .await;

    // A sandbox gone without a DEL: an event on the pod.
    a.vanish();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.api.events("demo").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no event; agent log:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Stopped: it asks for its DaemonSet, and (as the DaemonSet has a node selector)
    // for its node.
    agent.terminate();
    assert_eq!(
        agent.count(&["istio-cni stays installed on this node"]),
        1,
        "{}",
        agent.logs()
    );

    let granted = charts::grants(&charts::agent_rules());
    let called = cluster.api.calls();
    let unused: Vec<_> = granted.difference(&called).collect();
    let ungranted: Vec<_> = called.difference(&granted).collect();
    assert!(
        unused.is_empty() && ungranted.is_empty(),
        "the chart grants what nothing calls: {unused:?}\n\
         the code calls what the chart does not grant: {ungranted:?}\nagent log:\n{}",
        agent.logs()
    );
}
