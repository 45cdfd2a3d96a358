//! Acceptance tests of in-pod redirection: real network namespaces on a CNI bridge, the
//! real agent library on a real ZDS socket, ztunnel as a real process. Root only.

use std::time::Duration;

use e2e::app::{echo_server, request, seen_peer};
use e2e::node::normalize_save;
use e2e::observe::SPEC_SAVE;
use e2e::{Mesh, TestNode, Ztunnel};
use istio_cni::enrollment::Leaving;
use istio_cni::{Agent, EnrollStatus, Startup};

const T: Duration = Duration::from_secs(3);
const ZTUNNEL_PORTS: [u16; 3] = [15001, 15006, 15008];

async fn enrolled(agent: &Agent, pod: &e2e::TestPod) {
    let status = agent.enrollment().enroll(&pod.pod()).await.expect("enroll");
    assert_eq!(status, EnrollStatus::Enabled, "pod {}", pod.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_pod_has_ztunnel_listeners_and_the_specified_rules() {
    let node = TestNode::new(11);
    let pod = node.add_pod("sleep");
    let Mesh { agent, ztunnel: zt } = Mesh::start(&node, &[&pod]).await;

    assert_eq!(
        pod.ports_of("ztunnel"),
        ZTUNNEL_PORTS,
        "{:?}",
        pod.listening()
    );
    assert_eq!(pod.iptables_save(), normalize_save(SPEC_SAVE));
    let routing = pod.policy_routing();
    assert!(
        routing.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100"),
        "{routing}"
    );
    assert!(routing.contains("local default dev lo"), "{routing}");
    zt.wait_for(
        &["ztunnel::inpod::workloadmanager", "handling new stream"],
        1,
    )
    .await;
    zt.wait_for(
        &["ztunnel::inpod::statemanager", "pod received snapshot sent"],
        1,
    )
    .await;
    zt.wait_for(
        &[
            "ztunnel::inpod::statemanager",
            &format!("pod {:?} received netns, starting proxy", pod.uid),
        ],
        1,
    )
    .await;
    for line in [
        "inpod_enabled: true",
        "inpod_port_reuse: true",
        "inpod_mark: 1337",
    ] {
        assert!(zt.logs().contains(line), "missing startup line {line}");
    }
    // This ztunnel runs without a mesh on purpose: it says so, once and for the pod.
    zt.wait_for(&["PASSTHROUGH_ONLY", "every pod's traffic"], 1)
        .await;
    zt.wait_for(&["PASSTHROUGH_ONLY", "pod=ambient-demo/sleep"], 1)
        .await;

    // What an operator checks (the specification's "Observing" section), as
    // `cargo xtask kind-e2e` checks it on a cluster.
    e2e::observe::check_inpod_log(&zt.logs(), 1).unwrap();
    e2e::observe::check_listeners(&pod.exec(&["ss", "-ntlp"])).unwrap();
    e2e::observe::check_rules(&pod.exec(&["iptables-save"])).unwrap();

    // Enrolling again changes nothing: no duplicated rules, the same proxy.
    enrolled(&agent, &pod).await;
    assert_eq!(pod.iptables_save(), normalize_save(SPEC_SAVE));
    assert_eq!(zt.count(&["received netns, starting proxy"]), 1);
    let verification = agent.enrollment().verify(&pod.uid).await.unwrap().unwrap();
    assert!(verification.is_clean(), "{verification:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_to_pod_traffic_passes_through_ztunnel_on_both_sides() {
    let node = TestNode::new(12);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start(&node, &[&a, &b]).await;
    let server = echo_server(&b, 8080).await;

    let response = request(&a, server.addr, T)
        .await
        .expect("a -> b through ztunnel");
    assert_eq!(
        seen_peer(&response),
        Some(a.ip),
        "b's app must see a's IP: {response}"
    );
    assert!(response.ends_with("hello\n"), "{response}");
    let dst = format!("dst.addr={}", server.addr);
    zt.wait_for(
        &["direction=\"outbound\"", &dst, "src.workload=\"sleep\""],
        1,
    )
    .await;
    zt.wait_for(
        &[
            "direction=\"inbound\"",
            &dst,
            &format!("src.addr={}:", a.ip),
            "dst.workload=\"httpbin\"",
        ],
        1,
    )
    .await;
}

/// Only what belongs to someone: `-A` rules and user chains (an emptied built-in
/// table that iptables-nft leaves behind is not a rule).
fn rules_only(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A") || (l.starts_with(':') && l.contains(" - [")))
        .map(str::to_string)
        .collect()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenroll_removes_rules_routes_listeners_and_traffic_flows_directly() {
    let node = TestNode::new(13);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    // Someone else's chain in the pod: it must survive enrollment and removal.
    a.exec(&["iptables", "-t", "nat", "-N", "OTHER_CNI"]);
    a.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "-j",
        "OTHER_CNI",
    ]);
    let before = rules_only(&a.iptables_save());
    let Mesh { agent, ztunnel: zt } = Mesh::start(&node, &[&a, &b]).await;
    let server = echo_server(&b, 8080).await;
    request(&a, server.addr, T).await.expect("through ztunnel");
    zt.wait_for(&["direction=\"outbound\""], 1).await;
    // The host probe set holds exactly the captured pods' addresses.
    let probe_set = format!("{}-v4", node.probe_set());
    let members = || e2e::sh("ipset", &["list", &probe_set]);
    for pod in [&a, &b] {
        assert!(members().contains(&pod.ip.to_string()), "{}", members());
    }

    for pod in [&a, &b] {
        agent
            .enrollment()
            .remove(&pod.uid, Leaving::OptedOut)
            .await
            .expect("unenroll");
    }
    assert_eq!(rules_only(&a.iptables_save()), before);
    assert!(
        rules_only(&b.iptables_save()).is_empty(),
        "{}",
        b.iptables_save()
    );
    assert_eq!(a.policy_routing(), "");
    for pod in [&a, &b] {
        assert!(!members().contains(&pod.ip.to_string()), "{}", members());
    }
    zt.wait_metric(e2e::PROXIES_STOPPED, 2.0).await;
    wait_until("ztunnel's listeners are gone", || {
        a.ports_of("ztunnel").is_empty() && b.ports_of("ztunnel").is_empty()
    })
    .await;

    let response = request(&a, server.addr, T).await.expect("direct a -> b");
    assert_eq!(seen_peer(&response), Some(a.ip));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        zt.count(&["direction=\"outbound\""]),
        1,
        "traffic after unenroll went through ztunnel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_restart_fails_closed_then_resyncs_from_the_snapshot() {
    let node = TestNode::new(14);
    let (a, b, outside) = (
        node.add_pod("sleep"),
        node.add_pod("httpbin"),
        node.add_pod("outside"),
    );
    let Mesh {
        agent,
        ztunnel: mut zt1,
    } = Mesh::start(&node, &[&a, &b]).await;
    let server = echo_server(&b, 8080).await;
    request(&a, server.addr, T).await.expect("through ztunnel");

    zt1.kill();
    // Fail closed: with ztunnel gone nothing bypasses it, in either direction.
    let out = request(&a, server.addr, Duration::from_secs(1)).await;
    assert!(out.is_err(), "outbound bypassed a dead ztunnel: {out:?}");
    let inb = request(&outside, server.addr, Duration::from_secs(1)).await;
    assert!(inb.is_err(), "inbound bypassed a dead ztunnel: {inb:?}");

    // b leaves the mesh while ztunnel is down.
    agent
        .enrollment()
        .remove(&b.uid, Leaving::OptedOut)
        .await
        .expect("unenroll b");

    let zt2 = Ztunnel::start(&node, 2);
    zt2.wait_readiness(200).await;
    assert_eq!(a.ports_of("ztunnel"), ZTUNNEL_PORTS);
    assert!(
        b.ports_of("ztunnel").is_empty(),
        "b was unenrolled: {:?}",
        b.listening()
    );
    assert_eq!(zt2.count(&["received netns, starting proxy"]), 1);

    let response = request(&a, server.addr, T)
        .await
        .expect("a -> b after restart");
    assert_eq!(seen_peer(&response), Some(a.ip));
    zt2.wait_for(&["direction=\"outbound\"", "src.workload=\"sleep\""], 1)
        .await;
    let response = request(&outside, server.addr, T)
        .await
        .expect("outside -> b, b now out of the mesh");
    assert_eq!(seen_peer(&response), Some(outside.ip));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_keeps_proxies_serving_and_duplicates_no_rule() {
    let node = TestNode::new(15);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let Mesh { agent, ztunnel: zt } = Mesh::start(&node, &[&a, &b]).await;
    let server = echo_server(&b, 8080).await;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = e2e::app::connect(&a, server.addr, T)
        .await
        .expect("long-lived connection");
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    assert_eq!(seen_peer(&line), Some(a.ip));

    drop(agent);
    zt.wait_for(&["reconnecting"], 1).await;
    let agent = Agent::start(&node.agent_config(), Startup::adopting(&[a.pod(), b.pod()]))
        .await
        .unwrap();
    zt.wait_for(&["handling new stream"], 2).await;
    zt.wait_for(&["pod received snapshot sent"], 2).await;
    agent.zds().wait_for_connections(1).await;

    for pod in [&a, &b] {
        assert_eq!(
            pod.iptables_save(),
            normalize_save(SPEC_SAVE),
            "rules of {}",
            pod.name
        );
    }
    assert_eq!(
        zt.count(&["received netns, starting proxy"]),
        2,
        "proxies were restarted"
    );
    // The connection opened before the restart still flows.
    stream.get_mut().write_all(b"still there\n").await.unwrap();
    line.clear();
    tokio::time::timeout(T, stream.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "still there\n");
    request(&a, server.addr, T)
        .await
        .expect("new connection after agent restart");

    // An agent that comes back without b (unenrolled meanwhile): ztunnel drains b
    // once the snapshot is complete. b's in-flight connection keeps flowing for the
    // drain grace period (1s in these tests), then is closed.
    drop(agent);
    let _agent = Agent::start(&node.agent_config(), Startup::adopting(&[a.pod()]))
        .await
        .unwrap();
    zt.wait_for(&["pod received snapshot sent"], 3).await;
    zt.wait_for(&["pod not in snapshot, draining proxy"], 1)
        .await;
    wait_until("b's proxy stops listening", || {
        b.ports_of("ztunnel").is_empty()
    })
    .await;
    assert_eq!(a.ports_of("ztunnel"), ZTUNNEL_PORTS);
    stream.get_mut().write_all(b"in grace\n").await.unwrap();
    line.clear();
    tokio::time::timeout(T, stream.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        line, "in grace\n",
        "in-flight connection cut before its grace period"
    );
    line.clear();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_line(&mut line)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "connection still open after the grace period: {closed:?} {line:?}"
    );
    zt.wait_for(&["drain grace period over, closing connections"], 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ztunnels_overlap_and_traffic_survives_the_old_one_exiting() {
    let node = TestNode::new(16);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let Mesh {
        agent,
        ztunnel: mut old,
    } = Mesh::start(&node, &[&a, &b]).await;
    let server = echo_server(&b, 8080).await;

    let new = Ztunnel::start(&node, 2);
    agent.zds().wait_for_connections(2).await;
    new.wait_metric(e2e::PROXIES_STARTED, 2.0).await;
    let owners: Vec<String> = a
        .listening()
        .into_iter()
        .filter(|(port, _)| *port == 15001)
        .map(|(_, p)| p)
        .collect();
    assert_eq!(owners.len(), 2, "both ztunnels bind 15001: {owners:?}");
    for pid in [old.pid(), new.pid()] {
        assert!(
            owners.iter().any(|o| o.contains(&format!("pid={pid},"))),
            "{owners:?}"
        );
    }

    // Connections open while the old ztunnel is told to stop: some go through it.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut held = Vec::new();
    for _ in 0..8 {
        let s = e2e::app::connect(&a, server.addr, T)
            .await
            .expect("connect");
        let mut s = BufReader::new(s);
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        held.push(s);
    }
    let through_old: usize = [&a, &b]
        .iter()
        .map(|p| {
            p.exec(&["ss", "-ntpH", "state", "established"])
                .matches(&format!("pid={},", old.pid()))
                .count()
        })
        .sum();
    assert!(
        through_old > 0,
        "no held connection went through the old ztunnel"
    );
    old.signal_terminate();
    old.wait_for(&["shutting down: draining every pod proxy"], 1)
        .await;
    for (i, s) in held.iter_mut().enumerate() {
        s.get_mut().write_all(b"upgrade\n").await.unwrap();
        let mut line = String::new();
        tokio::time::timeout(T, s.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            line, "upgrade\n",
            "connection {i} was cut when the old ztunnel began draining"
        );
    }
    old.terminate();
    for i in 0..5 {
        let response = request(&a, server.addr, T)
            .await
            .unwrap_or_else(|e| panic!("request {i} after the old ztunnel exited: {e}"));
        assert_eq!(seen_peer(&response), Some(a.ip));
    }
    new.wait_for(&["direction=\"outbound\"", "src.workload=\"sleep\""], 5)
        .await;
    assert_eq!(a.ports_of("ztunnel").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_listeners_cannot_bind_is_an_error_ack_retried_until_it_works() {
    let node = TestNode::new(19);
    let pod = node.add_pod("sleep");
    let zt = Ztunnel::start(&node, 1);
    assert_eq!(zt.readiness().await, 500, "not ready before the snapshot");
    let agent = Agent::start(&node.agent_config(), Startup::default())
        .await
        .unwrap();
    agent.zds().wait_for_connections(1).await;
    zt.wait_readiness(200).await;

    // Something in the pod already holds 15008 (without SO_REUSEPORT).
    let blocker = pod
        .netns()
        .run(|| std::net::TcpListener::bind("0.0.0.0:15008"))
        .unwrap()
        .unwrap();
    let err = agent.enrollment().enroll(&pod.pod()).await.unwrap_err();
    assert!(err.to_string().contains("15008"), "{err}");
    assert!(
        pod.ports_of("ztunnel").is_empty(),
        "all or nothing: {:?}",
        pod.listening()
    );
    // One pod's trouble does not make the node unready (a rolling upgrade would stall
    // on it); the readiness body says what is wrong with which pod.
    let (status, body) = zt.readiness_detail().await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("/sleep")
            && body.contains("proxy not up (retrying)")
            && body.contains("15008"),
        "{body}"
    );

    drop(blocker);
    zt.wait_for(&["proxy started on retry"], 1).await;
    assert_eq!(pod.ports_of("ztunnel"), ZTUNNEL_PORTS);
    let (_, body) = zt.readiness_detail().await;
    assert!(body.contains("proxy running"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_ztunnel_run_by_an_unexpected_user() {
    use std::os::unix::fs::PermissionsExt;
    let node = TestNode::new(20);
    let agent = Agent::start(&node.agent_config(), Startup::default())
        .await
        .unwrap();
    let zt = Ztunnel::start_as(&node, 1, 65534);
    // Loosen the socket's mode so that only the peer check stands in the way.
    std::fs::set_permissions(node.zds_socket(), std::fs::Permissions::from_mode(0o777)).unwrap();
    zt.wait_for(&["the agent closed the stream before our hello"], 3)
        .await;
    assert_eq!(agent.zds().connections(), 0);
}

/// ztunnel's threads (`/proc/<pid>/status`).
fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_pods_cost_ztunnel_no_thread_each() {
    let node = TestNode::new(21);
    let first = node.add_pod("first");
    let Mesh { agent, ztunnel: zt } = Mesh::start(&node, &[&first]).await;
    let before = threads(zt.pid());
    let pods: Vec<_> = (0..8).map(|i| node.add_pod(&format!("p{i}"))).collect();
    for p in &pods {
        let status = agent.enrollment().enroll(&p.pod()).await.expect("enroll");
        assert_eq!(status, istio_cni::EnrollStatus::Enabled);
        assert_eq!(p.ports_of("ztunnel"), ZTUNNEL_PORTS);
    }
    let after = threads(zt.pid());
    // Sockets are made by entering the pod's netns on the calling thread; a runtime
    // may still start a blocking-pool thread or two meanwhile.
    assert!(
        after <= before + 2,
        "8 more pods took ztunnel from {before} to {after} threads"
    );
}
