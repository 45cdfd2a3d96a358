//! Pods created through the CNI chain (bridge, then our istio-cni plugin last), as a
//! container runtime creates them. Root only.

use std::time::Duration;

use e2e::app::{echo_server, request, seen_peer};
use e2e::cluster::{Cluster, AMBIENT};

const T: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_created_through_the_chain_is_captured_before_its_first_byte() {
    let cluster = Cluster::new(61, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    cluster.namespace("plain", &[]);
    let _agent = cluster.start_agent(1);
    let zt = cluster.start_ztunnel(1);
    zt.wait_readiness(200).await;

    cluster.create_pod_object("plain", "httpbin");
    let (server_pod, added) = cluster.start_sandbox("plain", "httpbin");
    added.expect("a pod outside the mesh starts");
    assert!(
        !server_pod.iptables_save().contains("ISTIO"),
        "a non-mesh pod was captured"
    );
    let server = echo_server(&server_pod, 8080).await;

    cluster.create_pod_object("demo", "sleep");
    let (pod, added) = cluster.start_sandbox("demo", "sleep");
    added.expect("ADD for an ambient pod");
    // ADD has returned: the very first connection goes through ztunnel.
    let response = request(&pod, server.addr, T)
        .await
        .expect("first connection");
    assert_eq!(seen_peer(&response), Some(pod.ip));
    zt.wait_for(&["direction=\"outbound\"", "src.workload=\"sleep\""], 1)
        .await;
    let annotated = cluster
        .api
        .pod("demo", "sleep")
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default();
    assert_eq!(
        annotated
            .get("ambient.istio.io/redirection")
            .map(String::as_str),
        Some("enabled")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_agent_down_ambient_pods_fail_to_start_and_others_start() {
    let cluster = Cluster::new(62, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    cluster.namespace("plain", &[]);

    cluster.create_pod_object("demo", "sleep");
    let (pod, added) = cluster.start_sandbox("demo", "sleep");
    let err = added.expect_err("ADD must fail for an ambient pod with no agent");
    assert!(
        err.contains("\"code\":11") && err.contains("agent is unreachable"),
        "{err}"
    );
    assert!(!pod.iptables_save().contains("ISTIO"), "nothing half-done");

    cluster.create_pod_object("plain", "other");
    let (_other, added) = cluster.start_sandbox("plain", "other");
    added.expect("a pod outside the mesh never waits for the agent");
}
