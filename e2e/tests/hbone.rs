//! Acceptance tests of the mesh data path: HBONE (HTTP/2 CONNECT over mutual TLS)
//! between pods, identities from the local CA, workloads and policies from the local
//! config file. Real network namespaces on a CNI bridge, real processes. Root only.

use std::sync::Arc;
use std::time::Duration;

use e2e::app::{echo_server, exchange, named_echo_server, request, seen_peer};
use e2e::capture::Capture;
use e2e::mesh_files::{identity_of, workload, NAMESPACE};
use e2e::{Mesh, TestNode, TestPod};

const T: Duration = Duration::from_secs(5);

fn config(workloads: &[String], rest: &str) -> String {
    format!("workloads:\n{}{rest}", workloads.concat())
}

fn mesh_workloads(pods: &[&TestPod]) -> Vec<String> {
    pods.iter().map(|p| workload(p, "HBONE", "")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_to_pod_traffic_is_mutual_tls_on_15008_with_both_identities_logged() {
    let node = TestNode::new(31);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    node.write_mesh_config(&config(&mesh_workloads(&[&a, &b]), ""));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[]).await;
    let server = echo_server(&b, 8080).await;

    let capture = Capture::on_pod(&b, "tcp", node.dir.path());
    let payload = "the-app-payload-0123456789\n";
    let response = exchange(&a, server.addr, payload, T)
        .await
        .expect("a -> b over HBONE");
    let wire = capture.stop();

    assert_eq!(
        seen_peer(&response),
        Some(a.ip),
        "b's app must see a's IP: {response}"
    );
    assert!(response.ends_with(payload), "{response}");
    assert!(
        wire.packets.contains(&format!("> {}.15008:", b.ip)),
        "no HBONE on the wire:\n{}",
        wire.packets
    );
    assert!(
        !wire.packets.contains(&format!("{}.8080", b.ip)),
        "plaintext to the app port on the wire:\n{}",
        wire.packets
    );
    assert!(
        !wire.ascii.contains("the-app-payload"),
        "app payload visible on the wire"
    );

    let (sa, sb) = (identity_of(&a), identity_of(&b));
    let (src, dst) = (
        format!("src.identity=\"{sa}\""),
        format!("dst.identity=\"{sb}\""),
    );
    zt.wait_for(
        &[
            "direction=\"outbound\"",
            &src,
            &dst,
            "src.workload=\"sleep\"",
        ],
        1,
    )
    .await;
    e2e::observe::check_mtls_access_log(&zt.logs(), &sa, &sb).unwrap();
    zt.wait_for(
        &[
            "direction=\"inbound\"",
            &src,
            &dst,
            "dst.workload=\"httpbin\"",
            &format!("src.addr={}:", a.ip),
        ],
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_policy_stops_connections_and_removing_it_lets_them_through() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let node = TestNode::new(32);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let workloads = mesh_workloads(&[&a, &b]);
    node.write_mesh_config(&config(&workloads, ""));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[]).await;
    let server = echo_server(&b, 8080).await;

    let held = e2e::app::connect(&a, server.addr, T).await.unwrap();
    let mut held = BufReader::new(held);
    let mut line = String::new();
    held.read_line(&mut line).await.unwrap();

    let deny = format!(
        "policies:\n- {{name: deny-8080, namespace: {NAMESPACE}, scope: Namespace, action: Deny, dryRun: false, rules: [[[{{destinationPorts: [8080]}}]]]}}\n"
    );
    node.write_mesh_config(&config(&workloads, &deny));
    zt.wait_for(&["local config reloaded"], 1).await;
    // The live connection is re-checked and closed.
    line.clear();
    let closed = tokio::time::timeout(T, held.read_line(&mut line))
        .await
        .expect("held connection closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?} {line:?}");
    zt.wait_for(
        &["denied by policy ambient-demo/deny-8080 after a config change"],
        1,
    )
    .await;
    // New connections are refused, and the log names the policy.
    let response = request(&a, server.addr, T).await.unwrap_or_default();
    assert!(
        seen_peer(&response).is_none(),
        "denied connection reached the app: {response}"
    );
    zt.wait_for(
        &[
            "direction=\"inbound\"",
            "denied by policy ambient-demo/deny-8080",
        ],
        1,
    )
    .await;

    node.write_mesh_config(&config(&workloads, ""));
    zt.wait_for(&["local config reloaded"], 2).await;
    let response = request(&a, server.addr, T).await.expect("allowed again");
    assert_eq!(seen_peer(&response), Some(a.ip));

    // A bad edit is logged and changes nothing; a good one keeps live connections.
    let held = e2e::app::connect(&a, server.addr, T).await.unwrap();
    let mut held = BufReader::new(held);
    line.clear();
    held.read_line(&mut line).await.unwrap();
    node.write_mesh_config_unchecked("workloads:\n- name: x\n  colour: red\n");
    zt.wait_for(
        &[
            "local config not reloaded, keeping the last good one",
            "colour",
        ],
        1,
    )
    .await;
    request(&a, server.addr, T)
        .await
        .expect("still served by the last good config");
    node.write_mesh_config(&config(&workloads, "services: []\n"));
    zt.wait_for(&["local config reloaded"], 3).await;
    use tokio::io::AsyncWriteExt;
    held.get_mut().write_all(b"kept\n").await.unwrap();
    line.clear();
    tokio::time::timeout(T, held.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "kept\n", "a reload dropped an established connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_workload_arrives_late_is_enrolled_and_its_connections_wait_for_it() {
    use e2e::capture::Capture;
    let node = TestNode::new(38);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    node.write_mesh_config(&config(&mesh_workloads(&[&b]), ""));
    let Mesh { agent, ztunnel: zt } = Mesh::start_in_mesh(&node, &[&b], &[]).await;
    let server = echo_server(&b, 8080).await;
    // The Add is acked: a's listeners are up (captured), though its workload is not
    // known yet; the node stays ready, the body says what a waits for.
    agent.enrollment().enroll(&a.pod()).await.expect("acked");
    assert_eq!(a.ports_of("ztunnel"), [15001, 15006, 15008]);
    let (status, body) = zt.readiness_detail().await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("sleep") && body.contains("WAITING for its workload"),
        "{body}"
    );
    // The probe's port, open to whoever reaches the pod, says only that it is ready
    // (the detail above is on the localhost admin endpoint).
    assert_eq!(zt.readiness_body().await, (200, "ready\n".to_string()));

    let capture = Capture::on_host_veth(&a, "tcp", node.dir.path());
    // With no workload at all, the connection waits, then is refused: nothing reaches b.
    let started = std::time::Instant::now();
    let refused = e2e::app::exchange(
        &a,
        server.addr,
        "no-workload-yet\n",
        std::time::Duration::from_secs(8),
    )
    .await;
    assert!(refused.is_err(), "served without a workload: {refused:?}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(4),
        "refused before the wait: {:?}",
        started.elapsed()
    );
    zt.wait_for(&["refused: no workload for pod ambient-demo/sleep"], 1)
        .await;

    // A connection made before the workload arrives waits for it, then goes over HBONE.
    let (first, ()) = tokio::join!(
        e2e::app::exchange(&a, server.addr, "waited-for-workload\n", T),
        async {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            node.write_mesh_config(&config(&mesh_workloads(&[&a, &b]), ""));
        }
    );
    let response = first.expect("the first connection waited, then went through");
    assert_eq!(seen_peer(&response), Some(a.ip));
    zt.wait_for(
        &[
            "direction=\"outbound\"",
            &format!("src.identity=\"{}\"", identity_of(&a)),
        ],
        1,
    )
    .await;
    let wire = capture.stop();
    assert!(
        wire.packets.contains(".15008"),
        "no HBONE:\n{}",
        wire.packets
    );
    for payload in ["no-workload-yet", "waited-for-workload"] {
        assert!(
            !wire.ascii.contains(payload),
            "{payload} crossed the wire in plaintext"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_clients_use_15006_and_mesh_pods_reach_non_mesh_servers_in_plaintext() {
    let node = TestNode::new(33);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let (outside, legacy) = (node.add_pod("outside"), node.add_pod("legacy"));
    let mut workloads = mesh_workloads(&[&a, &b]);
    workloads.push(workload(&legacy, "TCP", ""));
    node.write_mesh_config(&config(&workloads, ""));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[]).await;
    let server = echo_server(&b, 8080).await;
    let legacy_server = echo_server(&legacy, 9090).await;

    let response = request(&outside, server.addr, T)
        .await
        .expect("outside -> b through 15006");
    assert_eq!(seen_peer(&response), Some(outside.ip));
    zt.wait_for(
        &[
            "direction=\"inbound\"",
            &format!("src.addr={}:", outside.ip),
            "dst.workload=\"httpbin\"",
        ],
        1,
    )
    .await;
    // Plaintext from outside the mesh proves no identity, so none is logged.
    let from_outside = zt.lines(&[
        "direction=\"inbound\"",
        &format!("src.addr={}:", outside.ip),
    ]);
    assert!(
        from_outside.iter().all(|l| !l.contains("src.identity")),
        "{from_outside:?}"
    );

    let capture = Capture::on_pod(&legacy, "tcp", node.dir.path());
    let response = exchange(&a, legacy_server.addr, "plain-for-legacy\n", T)
        .await
        .expect("a -> legacy");
    let wire = capture.stop();
    assert_eq!(seen_peer(&response), Some(a.ip));
    assert!(
        wire.ascii.contains("plain-for-legacy"),
        "passthrough is plain TCP"
    );
    zt.wait_for(
        &[
            "direction=\"outbound\"",
            &format!("dst.addr={}", legacy_server.addr),
        ],
        1,
    )
    .await;
    let to_legacy = zt.lines(&[
        "direction=\"outbound\"",
        &format!("dst.addr={}", legacy_server.addr),
    ]);
    assert!(
        to_legacy.iter().all(|l| !l.contains("dst.identity")),
        "{to_legacy:?}"
    );
}

/// Opens TLS from `from`'s netns to `to`'s 15008 as `cert`, expecting the server to be
/// `to`; returns the first error either side reported.
async fn handshake_to(
    from: &TestPod,
    to: &TestPod,
    cert: Arc<ztunnel::identity::manager::IdentityCert>,
    roots: Arc<rustls::RootCertStore>,
    expect: ztunnel::identity::Identity,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = e2e::app::connect(from, std::net::SocketAddr::new(to.ip, 15008), T)
        .await
        .map_err(|e| e.to_string())?;
    let cfg = ztunnel::tls::client_config(cert, roots, expect).map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ztunnel::tls::server_name(to.ip), tcp)
        .await
        .map_err(|e| format!("client: {e}"))?;
    // TLS 1.3: the server judges our certificate after we finish; its verdict arrives
    // as an alert on the next read.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(T, tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("server closed".into()),
        Ok(Err(e)) => Err(format!("server: {e}")),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_from_another_root_or_outside_the_trust_domain_are_refused_at_the_handshake() {
    use ztunnel::identity::{ca::LocalCa, manager::CertManager, Identity};
    let node = TestNode::new(34);
    let (b, outside) = (node.add_pod("httpbin"), node.add_pod("outside"));
    node.write_mesh_config(&config(&mesh_workloads(&[&b]), ""));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&b], &[]).await;
    let files = node.mesh_files();
    let mesh_ca = Arc::new(LocalCa::from_files(&files.ca_cert, &files.ca_key).unwrap());
    let mesh = CertManager::new(mesh_ca, Duration::from_secs(3600), ztunnel::tls::provider());
    let (other_cert, other_key) =
        LocalCa::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
    let other = CertManager::new(
        Arc::new(LocalCa::from_pem(&other_cert, &other_key).unwrap()),
        Duration::from_secs(3600),
        ztunnel::tls::provider(),
    );
    let httpbin: Identity = identity_of(&b).parse().unwrap();
    let sleep = Identity::new("cluster.local", NAMESPACE, "sleep");
    let sleep_cert = mesh.get(&sleep).await.unwrap();
    // The mesh root, whichever certificate a client presents.
    let roots = sleep_cert.roots();

    // Sanity: a proper mesh client completes the handshake (and gets HTTP/2 settings).
    handshake_to(
        &outside,
        &b,
        sleep_cert.clone(),
        roots.clone(),
        httpbin.clone(),
    )
    .await
    .expect("a mesh client is accepted");

    let foreign = Identity::new("evil.example", NAMESPACE, "sleep");
    for (client, why) in [
        (other.get(&sleep).await.unwrap(), "invalid peer certificate"),
        (mesh.get(&foreign).await.unwrap(), "outside trust domain"),
    ] {
        let err = handshake_to(&outside, &b, client, roots.clone(), httpbin.clone())
            .await
            .unwrap_err();
        assert!(err.starts_with("server"), "{why}: {err}");
        zt.wait_for(&["TLS handshake failed", why], 1).await;
    }

    // And a client that expects another identity than the server proves gives up.
    let wrong = Identity::new("cluster.local", NAMESPACE, "not-httpbin");
    let err = handshake_to(&outside, &b, sleep_cert, roots, wrong)
        .await
        .unwrap_err();
    assert!(err.contains("not the expected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_vip_spreads_connections_over_its_endpoints() {
    let node = TestNode::new(35);
    let a = node.add_pod("sleep");
    let (b1, b2) = (node.add_pod("echo-1"), node.add_pod("echo-2"));
    let svc = format!("\"{NAMESPACE}/echo.{NAMESPACE}.svc.cluster.local\"");
    let extra = format!("{svc}: {{80: 8080}}");
    let workloads = vec![
        workload(&a, "HBONE", ""),
        workload(&b1, "HBONE", &extra),
        workload(&b2, "HBONE", &extra),
    ];
    let services = format!(
        "services:\n- {{name: echo, namespace: {NAMESPACE}, hostname: echo.{NAMESPACE}.svc.cluster.local, vips: [\"/10.96.35.10\"], ports: {{80: 8080}}}}\n"
    );
    node.write_mesh_config(&config(&workloads, &services));
    let Mesh {
        agent: _agent,
        ztunnel: _zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b1, &b2], &[]).await;
    let _s1 = named_echo_server(&b1, 8080).await;
    let _s2 = named_echo_server(&b2, 8080).await;

    let vip: std::net::SocketAddr = "10.96.35.10:80".parse().unwrap();
    let mut served = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let response = request(&a, vip, T).await.expect("request to the VIP");
        assert_eq!(seen_peer(&response), Some(a.ip), "{response}");
        let server = response.lines().nth(1).unwrap_or_default().to_string();
        *served.entry(server).or_insert(0) += 1;
    }
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        ["server=echo-1", "server=echo-2"],
        "{served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_renewal_keeps_connections_and_new_ones_use_the_new_certificate() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let node = TestNode::new(36);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    node.write_mesh_config(&config(&mesh_workloads(&[&a, &b]), ""));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[("WORKLOAD_CERT_TTL", "4s")]).await;
    let server = echo_server(&b, 8080).await;
    let held = e2e::app::connect(&a, server.addr, T).await.unwrap();
    let mut held = BufReader::new(held);
    let mut line = String::new();
    held.read_line(&mut line).await.unwrap();
    zt.wait_for(&["new HBONE connection", "cert_generation=1"], 1)
        .await;

    zt.wait_for(&["renewed workload certificate", &identity_of(&a)], 1)
        .await;
    held.get_mut().write_all(b"after renewal\n").await.unwrap();
    line.clear();
    tokio::time::timeout(T, held.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        line, "after renewal\n",
        "the established connection survived the renewal"
    );

    let response = request(&a, server.addr, T).await.expect("new connection");
    assert_eq!(seen_peer(&response), Some(a.ip));
    let renewed = zt
        .logs()
        .lines()
        .filter(|l| l.contains("new HBONE connection"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("cert_generation="))
                .and_then(|g| g.parse::<u64>().ok())
        })
        .filter(|generation| *generation > 1)
        .count();
    assert!(
        renewed >= 1,
        "no HBONE connection with the renewed certificate:\n{}",
        zt.logs()
    );

    // Once its last stream ends, a connection with the old certificate is closed (not
    // kept until the pool's idle timeout: with short-lived certificates they would
    // pile up, one per renewal).
    drop(held);
    let hbone_conns = || {
        a.exec(&["ss", "-tnH", "state", "established"])
            .lines()
            .filter(|l| l.contains(&format!("{}:15008", b.ip)))
            .count()
    };
    let deadline = std::time::Instant::now() + T;
    while hbone_conns() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} HBONE connections from a to b:\n{}",
            hbone_conns(),
            a.exec(&["ss", "-tn"])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parallel_connections_share_one_tls_connection() {
    let node = TestNode::new(37);
    let (a, b) = (Arc::new(node.add_pod("sleep")), node.add_pod("httpbin"));
    node.write_mesh_config(&config(&mesh_workloads(&[&a, &b]), ""));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[]).await;
    let server = echo_server(&b, 8080).await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (a, addr) = (a.clone(), server.addr);
        requests.spawn(async move { request(&a, addr, T).await });
    }
    while let Some(response) = requests.join_next().await {
        assert_eq!(seen_peer(&response.unwrap().expect("request")), Some(a.ip));
    }
    zt.wait_for(&["direction=\"inbound\"", "dst.workload=\"httpbin\""], 20)
        .await;
    assert_eq!(
        zt.count(&["new HBONE connection"]),
        1,
        "20 streams should share one connection"
    );
}

/// A DENY that arrives while ztunnel is still connecting to the app (which can take up
/// to the connect timeout) applies to that connection: it is registered for policy
/// re-checks before the connect, not after, so it never reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_pushed_while_connecting_to_the_app_applies_to_that_connection() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let node = TestNode::new(48);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let workloads = mesh_workloads(&[&a, &b]);
    node.write_mesh_config(&config(&workloads, ""));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[("CONNECT_TIMEOUT", "10s")]).await;
    let server = echo_server(&b, 8080).await;
    // ztunnel's connect to the app hangs: the app's SYNs are dropped for now (TCP
    // tries again after 1 s and 3 s).
    let drop_syn = [
        "INPUT", "-p", "tcp", "--dport", "8080", "--syn", "-j", "DROP",
    ];
    b.exec(&[&["iptables", "-I"][..], &drop_syn].concat());
    let client = async {
        let stream = e2e::app::connect(&a, server.addr, Duration::from_secs(15))
            .await
            .expect("the client's connect to ztunnel");
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(15),
            BufReader::new(stream).read_line(&mut line),
        )
        .await;
        (read, line)
    };
    let control = async {
        // The CONNECT reaches httpbin's ztunnel, which is now connecting to the app.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let deny = format!(
            "policies:\n- {{name: deny-8080, namespace: {NAMESPACE}, scope: Namespace, action: Deny, dryRun: false, rules: [[[{{destinationPorts: [8080]}}]]]}}\n"
        );
        node.write_mesh_config(&config(&workloads, &deny));
        zt.wait_for(&["local config reloaded"], 1).await;
        b.exec(&[&["iptables", "-D"][..], &drop_syn].concat());
    };
    let ((read, line), ()) = tokio::join!(client, control);
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a connection denied while ztunnel connected to the app reached it: {read:?} {line:?}"
    );
    zt.wait_for(&["denied by policy ambient-demo/deny-8080"], 1)
        .await;
}
