//! Kubernetes-driven enrollment, end to end: the agent (`istio-cni` in Kubernetes mode)
//! watches the API test server through a kubeconfig; tests act only through the API
//! server, as a user with kubectl would. Real netns, real CNI, real processes. Root.

use std::time::Duration;

use e2e::app::{echo_server, request, seen_peer};
use e2e::cluster::{Cluster, AMBIENT};
use e2e::node::normalize_save;

const T: Duration = Duration::from_secs(3);
const SPEC_SAVE: &str = include_str!("../../istio-cni/testdata/spec-iptables-save.txt");
const ZTUNNEL_PORTS: [u16; 3] = [15001, 15006, 15008];

fn captured(pod: &e2e::TestPod) -> bool {
    pod.iptables_save().contains("ISTIO_PRERT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelling_a_namespace_enrolls_its_running_pods_and_unlabelling_takes_them_out() {
    let cluster = Cluster::new(51, false).await;
    cluster.namespace("demo", &[]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let b = cluster.add_pod("demo", "httpbin", &[]);
    let agent = cluster.start_agent(1);
    let zt = cluster.start_ztunnel(1);
    zt.wait_for(&["pod received snapshot sent"], 1).await;
    let server = echo_server(&b, 8080).await;

    // Unlabelled: untouched.
    agent.wait_for(&["ZDS server listening"], 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!captured(&a) && !captured(&b));
    assert_eq!(cluster.annotation(&a), None);

    cluster.label_namespace("demo", AMBIENT.0, Some(AMBIENT.1));
    for pod in [&a, &b] {
        cluster.wait_annotation(pod, Some("enabled"), &agent).await;
        assert_eq!(pod.iptables_save(), normalize_save(SPEC_SAVE));
        assert_eq!(pod.ports_of("ztunnel"), ZTUNNEL_PORTS);
    }
    let response = request(&a, server.addr, T).await.expect("a -> b");
    assert_eq!(seen_peer(&response), Some(a.ip));
    zt.wait_for(&["direction=\"outbound\"", "pod=sleep"], 1)
        .await;

    // One pod opts out.
    cluster.label_pod(&a, AMBIENT.0, Some("none"));
    cluster.wait_annotation(&a, None, &agent).await;
    assert!(!captured(&a), "a's rules remain:\n{}", a.iptables_save());
    assert_eq!(a.policy_routing(), "");
    assert!(captured(&b), "b must stay in the mesh");

    // The namespace leaves: the rest goes too.
    cluster.label_namespace("demo", AMBIENT.0, None);
    cluster.wait_annotation(&b, None, &agent).await;
    assert!(!captured(&b));
    let before = zt.count(&["direction=\"outbound\""]);
    let response = request(&a, server.addr, T).await.expect("direct a -> b");
    assert_eq!(seen_peer(&response), Some(a.ip));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        zt.count(&["direction=\"outbound\""]),
        before,
        "traffic still went through ztunnel"
    );
}
