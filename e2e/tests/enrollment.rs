//! Enrollment that cannot be skipped: sandbox recreation, node reboot, terminating
//! pods, concurrent enrollment paths and what `enabled` means after ztunnel restarts.
//! The real CNI chain, the agent (Kubernetes mode) and ztunnel as processes, on
//! dual-stack pods; every bypass test looks at the wire on the pod's host-side veth,
//! over both families, as well as at its rules. Root only.

use std::net::IpAddr;
use std::time::Duration;

use e2e::app::{echo_server, exchange, seen_peer, EchoServer};
use e2e::capture::Capture;
use e2e::cluster::{Cluster, MeshPod, AMBIENT};
use e2e::node::normalize_save;
use e2e::observe::{SPEC6_SAVE, SPEC_SAVE};
use e2e::{AgentProcess, TestPod, Ztunnel};

const T: Duration = Duration::from_secs(3);
const ZTUNNEL_PORTS: [u16; 3] = [15001, 15006, 15008];

fn mesh<'a>(pods: &[(&'a str, Vec<IpAddr>)]) -> Vec<MeshPod<'a>> {
    pods.iter()
        .map(|(name, ips)| MeshPod {
            namespace: "demo",
            name,
            ips: ips.clone(),
        })
        .collect()
}

/// Both addresses of host number `n` on the (dual-stack) node.
fn both(cluster: &Cluster, n: u8) -> Vec<IpAddr> {
    vec![cluster.node.ip(n), cluster.node.ip6(n.into())]
}

/// Sends `payload` from `client` to `echo` (served by `server`) over each family,
/// capturing on the client's host-side veth: each exchange must work, go over HBONE
/// (15008), and never show the payload.
async fn encrypted_exchange(
    cluster: &Cluster,
    client: &TestPod,
    server: &TestPod,
    echo: &EchoServer,
    payload: &str,
) {
    let capture = Capture::on_host_veth(client, "tcp", cluster.node.dir.path());
    for ip in &server.ips {
        let dst = echo.at(*ip);
        let response = exchange(client, dst, payload, T)
            .await
            .unwrap_or_else(|e| panic!("{} -> {dst}: {e}", client.name));
        let own = client.ips.iter().find(|c| c.is_ipv4() == ip.is_ipv4());
        assert_eq!(seen_peer(&response).as_ref(), own, "{response}");
        assert!(response.contains(payload.trim()), "{response}");
    }
    let wire = capture.stop();
    assert!(
        wire.packets.contains(".15008"),
        "no HBONE on the wire:\n{}",
        wire.packets
    );
    assert!(
        !wire.ascii.contains(payload.trim()),
        "the payload crossed the wire in plaintext:\n{}",
        wire.packets
    );
}

fn captured_exactly(pod: &TestPod) {
    assert_eq!(
        pod.iptables_save(),
        normalize_save(SPEC_SAVE),
        "rules of {}",
        pod.netns_name
    );
    assert_eq!(
        pod.ip6tables_save(),
        normalize_save(SPEC6_SAVE),
        "IPv6 rules of {}",
        pod.netns_name
    );
    assert_eq!(
        pod.ports_of("ztunnel"),
        ZTUNNEL_PORTS,
        "{:?}",
        pod.listening()
    );
}

/// Creates each pod's object in `demo`, then its sandbox through the chain at its
/// address, and waits until it is `enabled`.
async fn enrolled_through_the_chain(
    cluster: &Cluster,
    agent: &AgentProcess,
    pods: &[(&str, Vec<IpAddr>)],
) -> Vec<TestPod> {
    let mut sandboxes = Vec::new();
    for (name, ips) in pods {
        cluster.create_pod_object("demo", name);
        let (pod, added) = cluster.start_sandbox_at("demo", name, ips);
        added.unwrap_or_else(|e| panic!("ADD {name}: {e}"));
        cluster
            .wait_annotation_of("demo", name, Some("enabled"), agent)
            .await;
        sandboxes.push(pod);
    }
    sandboxes
}

async fn ready(zt: &Ztunnel) {
    zt.wait_readiness(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_sandbox_is_captured_and_only_its_own_del_takes_it_out() {
    let cluster = Cluster::dual_stack(64, false).await;
    let (server_ip, ip1, ip2, ip3) = (
        both(&cluster, 10),
        both(&cluster, 11),
        both(&cluster, 12),
        both(&cluster, 13),
    );
    cluster.namespace("demo", &[AMBIENT]);
    cluster
        .push_mesh(
            &mesh(&[("httpbin", server_ip.clone()), ("sleep", ip1.clone())]),
            None,
        )
        .await;
    let agent = cluster.start_agent(1);
    let zt = cluster.start_ztunnel_mesh(1);
    ready(&zt).await;
    cluster.create_pod_object("demo", "httpbin");
    let (server, added) = cluster.start_sandbox_at("demo", "httpbin", &server_ip);
    added.expect("server ADD");
    let echo = echo_server(&server, 8080).await;
    cluster.create_pod_object("demo", "sleep");
    let (first, added) = cluster.start_sandbox_at("demo", "sleep", &ip1);
    added.expect("first sandbox ADD");
    cluster
        .wait_annotation_of("demo", "sleep", Some("enabled"), &agent)
        .await;
    encrypted_exchange(&cluster, &first, &server, &echo, "first-sandbox-secret\n").await;

    // Kubelet recreates the sandbox (the first one died): same uid, a new netns and
    // addresses, which the control plane pushes.
    cluster
        .push_mesh(
            &mesh(&[("httpbin", server_ip.clone()), ("sleep", ip2.clone())]),
            Some(&zt),
        )
        .await;
    let (second, added) = cluster.start_sandbox_at("demo", "sleep", &ip2);
    added.expect("second sandbox ADD");
    captured_exactly(&second);
    encrypted_exchange(&cluster, &second, &server, &echo, "second-sandbox-secret\n").await;
    assert_eq!(
        cluster.annotation_of("demo", "sleep").as_deref(),
        Some("enabled")
    );

    // A late DEL of the first sandbox (the runtime's cleanup) changes nothing.
    drop(first);
    captured_exactly(&second);
    assert_eq!(
        cluster.annotation_of("demo", "sleep").as_deref(),
        Some("enabled")
    );
    encrypted_exchange(&cluster, &second, &server, &echo, "after-late-del-secret\n").await;

    // Its own DEL: ztunnel drops the pod and it is not `enabled` until the next ADD.
    let drained = zt.metric(e2e::PROXIES_STOPPED).await;
    drop(second);
    assert_eq!(cluster.annotation_of("demo", "sleep"), None);
    zt.wait_metric(e2e::PROXIES_STOPPED, drained + 1.0).await;
    cluster
        .push_mesh(
            &mesh(&[("httpbin", server_ip), ("sleep", ip3.clone())]),
            Some(&zt),
        )
        .await;
    let (third, added) = cluster.start_sandbox_at("demo", "sleep", &ip3);
    added.expect("third sandbox ADD");
    captured_exactly(&third);
    assert_eq!(
        cluster.annotation_of("demo", "sleep").as_deref(),
        Some("enabled")
    );
    encrypted_exchange(&cluster, &third, &server, &echo, "third-sandbox-secret\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_node_reboot_every_pod_is_captured_before_its_first_byte() {
    let cluster = Cluster::dual_stack(65, false).await;
    let node = &cluster.node;
    let before = [
        ("httpbin", both(&cluster, 10)),
        ("sleep", both(&cluster, 11)),
    ];
    let after = [
        ("httpbin", both(&cluster, 20)),
        ("sleep", both(&cluster, 21)),
    ];
    cluster.namespace("demo", &[AMBIENT]);
    cluster.push_mesh(&mesh(&before), None).await;
    let mut agent = cluster.start_agent(1);
    let mut zt = cluster.start_ztunnel_mesh(1);
    ready(&zt).await;
    let mut sandboxes = enrolled_through_the_chain(&cluster, &agent, &before).await;

    // The node reboots: every process stops at once, every pod netns is gone without a
    // CNI DEL, and so are the sockets and the rules of the node's own netns.
    agent.kill();
    zt.kill();
    for pod in &mut sandboxes {
        pod.vanish();
    }
    let _ = std::fs::remove_file(node.zds_socket());
    let _ = std::fs::remove_file(node.dir.path().join("pluginevent.sock"));
    cluster.remove_host_probes();

    // The node is back. The API still shows the pods `enabled`; their sandboxes will
    // come back with new addresses, which the control plane pushes.
    cluster.push_mesh(&mesh(&after), None).await;
    let agent = cluster.start_agent(2);
    let zt = cluster.start_ztunnel_mesh(2);
    ready(&zt).await;
    for (name, _) in &after {
        // No sandbox, so not enabled.
        cluster
            .wait_annotation_of("demo", name, Some("pending"), &agent)
            .await;
    }
    let mut pods = Vec::new();
    for (name, ips) in &after {
        let (pod, added) = cluster.start_sandbox_at("demo", name, ips);
        added.unwrap_or_else(|e| panic!("ADD {name} after the reboot: {e}"));
        captured_exactly(&pod);
        pods.push(pod);
    }
    let echo = echo_server(&pods[0], 8080).await;
    encrypted_exchange(&cluster, &pods[1], &pods[0], &echo, "after-reboot-secret\n").await;
    for (name, _) in &after {
        assert_eq!(
            cluster.annotation_of("demo", name).as_deref(),
            Some("enabled")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_pod_stays_in_the_mesh_until_it_is_gone() {
    let cluster = Cluster::dual_stack(66, false).await;
    let pods = [
        ("httpbin", both(&cluster, 10)),
        ("sleep", both(&cluster, 11)),
        ("job", both(&cluster, 12)),
    ];
    cluster.namespace("demo", &[AMBIENT]);
    cluster.push_mesh(&mesh(&pods), None).await;
    let agent = cluster.start_agent(1);
    let zt = cluster.start_ztunnel_mesh(1);
    ready(&zt).await;
    let mut sandboxes = enrolled_through_the_chain(&cluster, &agent, &pods).await;
    let job = sandboxes.pop().expect("job");
    let sleep = sandboxes.pop().expect("sleep");
    let echo = echo_server(&sandboxes[0], 8080).await;

    // `kubectl delete pod sleep`: a 30 s grace period in which its app still talks.
    cluster.api.begin_delete_pod("demo", "sleep", 30);
    for i in 0..6 {
        encrypted_exchange(
            &cluster,
            &sleep,
            &sandboxes[0],
            &echo,
            &format!("grace-period-secret-{i}\n"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    captured_exactly(&sleep);
    assert_eq!(
        cluster.annotation_of("demo", "sleep").as_deref(),
        Some("enabled")
    );

    // The grace period ends: the runtime tears the sandbox down (CNI DEL), the object
    // goes. ztunnel drops the pod.
    let drained = zt.metric(e2e::PROXIES_STOPPED).await;
    drop(sleep);
    zt.wait_metric(e2e::PROXIES_STOPPED, drained + 1.0).await;
    cluster.api.delete_pod("demo", "sleep");

    // A Job's pod finishes: phase Succeeded takes it out of the mesh at once (ztunnel
    // drops it, the annotation goes), and its rules stay with its netns, as Istio's
    // agent leaves them: nothing of it runs, and nothing may leave it in the clear.
    let drained = zt.metric(e2e::PROXIES_STOPPED).await;
    cluster
        .api
        .set_pod_status("demo", "job", "Succeeded", &job.ips);
    cluster
        .wait_annotation_of("demo", "job", None, &agent)
        .await;
    zt.wait_metric(e2e::PROXIES_STOPPED, drained + 1.0).await;
    assert_eq!(job.iptables_save(), normalize_save(SPEC_SAVE));
    assert_eq!(job.ip6tables_save(), normalize_save(SPEC6_SAVE));
    assert_eq!(
        job.ports_of("ztunnel"),
        Vec::<u16>::new(),
        "ztunnel let it go"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cni_add_racing_the_watch_leaves_one_ruleset_and_one_proxy() {
    let cluster = Cluster::dual_stack(67, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let agent = cluster.start_agent(1);
    let zt = cluster.start_ztunnel(1);
    ready(&zt).await;
    let pods: Vec<_> = (0..6)
        .map(|i| cluster.run_pod("demo", &format!("racer{i}")))
        .collect();
    // For each pod at once: the object appears (the watch enrolls it from /proc) and
    // the runtime's ADD arrives (the plugin enrolls it through the agent's socket).
    std::thread::scope(|s| {
        let adds: Vec<_> = pods
            .iter()
            .map(|pod| {
                cluster.publish(pod, &[]);
                s.spawn(|| cluster.plugin_add(pod))
            })
            .collect();
        for (pod, add) in pods.iter().zip(adds) {
            add.join()
                .expect("plugin thread")
                .unwrap_or_else(|e| panic!("ADD {}: {e}", pod.name));
        }
    });
    for pod in &pods {
        cluster.wait_annotation(pod, Some("enabled"), &agent).await;
        captured_exactly(pod);
        for rules in [pod.policy_routing(), pod.policy_routing6()] {
            assert_eq!(rules.matches("fwmark 0x111/0xfff").count(), 1, "{rules}");
        }
        assert_eq!(
            zt.count(&[&format!("pod WorkloadUid(\"{}\") received netns", pod.uid)]),
            1,
            "{} got more than one proxy",
            pod.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_ztunnel_restart_enabled_means_that_ztunnel_acked_the_pod() {
    let cluster = Cluster::dual_stack(68, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let b = cluster.add_pod("demo", "httpbin", &[]);
    let agent = cluster.start_agent(1);
    let mut zt = cluster.start_ztunnel(1);
    for pod in [&a, &b] {
        cluster.wait_annotation(pod, Some("enabled"), &agent).await;
    }

    zt.kill();
    // Something in b now holds 15008 without SO_REUSEPORT: the next ztunnel cannot
    // listen there, and refuses b in its snapshot.
    let blocker = b
        .netns()
        .run(|| std::net::TcpListener::bind("0.0.0.0:15008"))
        .expect("enter b")
        .expect("bind 15008 in b");
    let zt = cluster.start_ztunnel(2);
    zt.wait_readiness(200).await;
    cluster.wait_annotation(&b, Some("pending"), &agent).await;
    assert_eq!(cluster.annotation(&a).as_deref(), Some("enabled"));
    assert!(b.iptables_save().contains("ISTIO_PRERT"), "b fails closed");

    drop(blocker);
    cluster.wait_annotation(&b, Some("enabled"), &agent).await;
    assert_eq!(b.ports_of("ztunnel"), ZTUNNEL_PORTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_recreated_without_the_plugin_is_found_by_the_watch() {
    let cluster = Cluster::dual_stack(71, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let first = cluster.add_pod("demo", "sleep", &[]);
    let server = cluster.add_pod("demo", "httpbin", &[]);
    let agent = cluster.start_agent(1);
    let zt = cluster.start_ztunnel(1);
    cluster
        .wait_annotation(&first, Some("enabled"), &agent)
        .await;
    let echo = echo_server(&server, 8080).await;

    // Kubelet recreates the sandbox through a chain that lacks our plugin (another CNI
    // rewrote the config, say): no CNI ADD reaches the agent. Kubelet reports the new
    // address; the watch finds the new netns in /proc and enrolls it.
    let second = cluster.run_sandbox("demo", "sleep", Some(&first.uid));
    cluster
        .api
        .set_pod_status("demo", "sleep", "Running", &second.ips);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while second.ports_of("ztunnel") != ZTUNNEL_PORTS {
        assert!(
            std::time::Instant::now() < deadline,
            "the new sandbox was never enrolled; agent log:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    captured_exactly(&second);
    assert!(
        first.ports_of("ztunnel").is_empty(),
        "the old sandbox keeps a proxy"
    );
    let response = exchange(&second, echo.addr, "hello\n", T)
        .await
        .expect("through ztunnel");
    assert_eq!(seen_peer(&response), Some(second.ip));
    zt.wait_for(
        &[
            "direction=\"outbound\"",
            &format!("src.addr={}:", second.ip),
        ],
        1,
    )
    .await;
    assert_eq!(cluster.annotation(&first).as_deref(), Some("enabled"));
}
