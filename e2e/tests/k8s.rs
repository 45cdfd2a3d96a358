//! Kubernetes-driven enrollment, end to end: the agent (`istio-cni` in Kubernetes mode)
//! watches the API test server through a kubeconfig; tests act only through the API
//! server, as a user with kubectl would. Real netns, real CNI, real processes. Root.

use std::time::Duration;

use e2e::app::{echo_server, request, seen_peer};
use e2e::cluster::{Cluster, AMBIENT};
use e2e::node::normalize_save;
use e2e::observe::SPEC_SAVE;

const T: Duration = Duration::from_secs(3);
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
    zt.wait_readiness(200).await;
    let server = echo_server(&b, 8080).await;

    // Unlabelled: untouched.
    e2e::zds_listening(&cluster.node.zds_socket()).await;
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
    zt.wait_for(&["direction=\"outbound\"", "src.workload=\"sleep\""], 1)
        .await;

    // One pod opts out.
    cluster.label_pod(&a, AMBIENT.0, Some("none"));
    cluster.wait_annotation(&a, None, &agent).await;
    assert!(!captured(&a), "a's rules remain:\n{}", a.iptables_save());
    assert_eq!(a.policy_routing(), "");
    zt.wait_metric(e2e::PROXIES_STOPPED, 1.0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !a.ports_of("ztunnel").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "a's listeners remain: {:?}",
            a.listening()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// How many of the agent's open fds refer to `netns`.
fn fds_on(agent: &e2e::AgentProcess, netns: &protocol::Netns) -> usize {
    let want = format!("net:[{}]", netns.id().inode);
    std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .map(|d| {
            d.flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pod_object_unenrolls_it_and_releases_its_netns_but_keeps_it_closed() {
    let cluster = Cluster::new(52, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let b = cluster.add_pod("demo", "httpbin", &[]);
    let agent = cluster.start_agent(1);
    let zt = cluster.start_ztunnel(1);
    cluster.wait_annotation(&a, Some("enabled"), &agent).await;
    let server = echo_server(&b, 8080).await;
    assert!(
        fds_on(&agent, &a.netns()) > 0,
        "the agent holds the pod's netns while enrolled"
    );

    // The object goes first (a deletion with no grace period, or forced): the pod's
    // processes still run until the kubelet stops them, and must not get out in the
    // clear meanwhile (the real cluster found this).
    cluster.api.delete_pod("demo", "sleep");
    agent.wait_for(&["pod unenrolled"], 1).await;
    zt.wait_metric(e2e::PROXIES_STOPPED, 1.0).await;
    assert!(captured(&a), "the ended pod's rules were taken out");
    assert!(
        request(&a, server.addr, Duration::from_secs(1))
            .await
            .is_err(),
        "a deleted pod's last traffic went around ztunnel"
    );
    assert_eq!(
        fds_on(&agent, &a.netns()),
        0,
        "the netns fd was not released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_rediscovers_pods_and_catches_up_with_changes_made_while_down() {
    let cluster = Cluster::new(53, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let b = cluster.add_pod("demo", "httpbin", &[]);
    let mut agent = cluster.start_agent(1);
    let zt = cluster.start_ztunnel(1);
    for pod in [&a, &b] {
        cluster.wait_annotation(pod, Some("enabled"), &agent).await;
    }
    let server = echo_server(&b, 8080).await;

    agent.kill();
    // While the agent is down: b leaves the mesh; ztunnel keeps serving a.
    cluster.label_pod(&b, AMBIENT.0, Some("none"));
    request(&a, server.addr, T)
        .await
        .expect("ztunnel serves while the agent is down");

    let agent = cluster.start_agent(2);
    agent
        .wait_for(&["adopting a pod enrolled before this agent started"], 2)
        .await;
    zt.wait_for(&["pod received snapshot sent"], 2).await;
    cluster.wait_annotation(&b, None, &agent).await;
    assert!(!captured(&b), "b was labelled out while the agent was down");
    assert_eq!(
        a.iptables_save(),
        normalize_save(SPEC_SAVE),
        "a's rules duplicated or lost"
    );
    assert_eq!(
        zt.count(&[&format!("pod WorkloadUid(\"{}\") received netns", a.uid)]),
        1,
        "a's proxy was restarted"
    );
    let response = request(&a, server.addr, T)
        .await
        .expect("a -> b after the restart");
    assert_eq!(seen_peer(&response), Some(a.ip));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ztunnel_pods_are_pending_and_fail_closed_until_it_connects() {
    let cluster = Cluster::new(54, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let b = cluster.add_pod("demo", "httpbin", &[]);
    let agent = cluster.start_agent(1);
    let server = echo_server(&b, 8080).await;
    cluster.wait_annotation(&a, Some("pending"), &agent).await;
    assert!(captured(&a));
    assert!(
        request(&a, server.addr, Duration::from_secs(1))
            .await
            .is_err(),
        "a pending pod's traffic bypassed ztunnel"
    );

    let zt = cluster.start_ztunnel(1);
    for pod in [&a, &b] {
        cluster.wait_annotation(pod, Some("enabled"), &agent).await;
    }
    let response = request(&a, server.addr, T)
        .await
        .expect("a -> b once ztunnel is up");
    assert_eq!(seen_peer(&response), Some(a.ip));
    zt.wait_for(&["direction=\"outbound\""], 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_probe_set_holds_exactly_the_enrolled_ips_and_probes_reach_the_app() {
    let cluster = Cluster::new(55, true).await;
    cluster.namespace("demo", &[AMBIENT]);
    cluster.namespace("plain", &[]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let other = cluster.add_pod("plain", "other", &[]);
    let agent = cluster.start_agent(1);
    let _zt = cluster.start_ztunnel(1);
    cluster.wait_annotation(&a, Some("enabled"), &agent).await;
    let server = echo_server(&a, 8080).await;

    let members = e2e::sh("ipset", &["save", &format!("{}-v4", cluster.probe_set)]);
    let ips: Vec<&str> = members.lines().filter(|l| l.starts_with("add ")).collect();
    assert_eq!(ips.len(), 1, "{members}");
    assert!(
        ips[0].contains(&a.ip.to_string()) && ips[0].contains(&a.uid),
        "{members}"
    );
    assert!(!members.contains(&other.ip.to_string()));

    // A kubelet-style probe: a TCP connect from the host netns to the app.
    let probe = tokio::time::timeout(T, tokio::net::TcpStream::connect(server.addr))
        .await
        .expect("probe connect in time")
        .expect("probe connects");
    use tokio::io::AsyncBufReadExt;
    let mut first = String::new();
    let _ = tokio::time::timeout(T, tokio::io::BufReader::new(probe).read_line(&mut first)).await;
    assert!(
        first.starts_with("peer=169.254.7.127:"),
        "the app should see the probe address: {first}"
    );

    cluster.label_namespace("demo", AMBIENT.0, None);
    cluster.wait_annotation(&a, None, &agent).await;
    let members = e2e::sh("ipset", &["save", &format!("{}-v4", cluster.probe_set)]);
    assert!(!members.lines().any(|l| l.starts_with("add ")), "{members}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_cut_watches_still_converge_without_double_enrollment() {
    let cluster = Cluster::new(56, false).await;
    cluster.namespace("demo", &[]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let b = cluster.add_pod("demo", "httpbin", &[]);
    let agent = cluster.start_agent(1);
    let zt = cluster.start_ztunnel(1);
    zt.wait_readiness(200).await;

    // The API server fails, drops every watch and forgets history while the namespace
    // is labelled: the agent must relist and catch up.
    cluster.api.fail_next(5);
    cluster.api.drop_watches();
    cluster.label_namespace("demo", AMBIENT.0, Some(AMBIENT.1));
    cluster.api.compact();
    for pod in [&a, &b] {
        cluster.wait_annotation(pod, Some("enabled"), &agent).await;
        assert_eq!(pod.iptables_save(), normalize_save(SPEC_SAVE));
    }
    cluster.api.drop_watches();
    cluster.label_pod(&a, "touch", Some("1"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for pod in [&a, &b] {
        assert_eq!(
            agent.count(&["enrolling pod", &pod.uid]),
            1,
            "pod {} enrolled more than once:\n{}",
            pod.name,
            agent.logs()
        );
        assert_eq!(
            zt.count(&[&format!("pod WorkloadUid(\"{}\") received netns", pod.uid)]),
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_starting_while_the_api_server_fails_retries_instead_of_exiting() {
    let cluster = Cluster::new(57, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    // The first requests of the new agent (its initial list among them) fail.
    cluster.api.fail_next(4);
    let mut agent = cluster.start_agent(1);
    let _zt = cluster.start_ztunnel(1);
    cluster.wait_annotation(&a, Some("enabled"), &agent).await;
    assert!(agent.is_running(), "{}", agent.logs());
    assert!(
        agent.count(&["listing this node's pods", "retrying in"]) >= 1,
        "{}",
        agent.logs()
    );
}
