//! ztunnel with a control plane: the in-repo control-plane test server (delta ADS and
//! the CA, istiod's protos over gRPC and TLS) drives a real ztunnel process serving real
//! pods in network namespaces. Workloads, services and policies come over xDS;
//! certificates through CreateCertificate. Root only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e::app::{connect, echo_server, exchange, request, seen_peer};
use e2e::capture::Capture;
use e2e::mesh_files::{identity_of, NAMESPACE as NS};
use e2e::{TestNode, TestPod, Ztunnel};
use istio_cni::{Agent, EnrollStatus, Startup};
use standins::controlplane::{ip_bytes, ControlPlane, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use standins::waypoint::Waypoint;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use ztunnel::proto::istio::security as xsec;
use ztunnel::proto::istio::workload as xwl;

const T: Duration = Duration::from_secs(5);

/// The agent and a ztunnel pointed at `cp`; `pods` enrolled (acked).
async fn start(node: &TestNode, cp: &ControlPlane, pods: &[&TestPod]) -> (Agent, Ztunnel) {
    let agent = Agent::start(&node.agent_config(), Startup::default())
        .await
        .expect("agent");
    let env = cp.env();
    let zt = Ztunnel::start_with(node, 1, |cmd| {
        for (k, v) in &env {
            cmd.env(k, v);
        }
    });
    agent.zds().wait_for_connections(1).await;
    for p in pods {
        let status = agent.enrollment().enroll(&p.pod()).await.expect("enroll");
        assert_eq!(status, EnrollStatus::Enabled, "{}", p.name);
    }
    (agent, zt)
}

/// Whether ztunnel's config_dump holds a workload with `uid`.
fn knows_workload(dump: &serde_json::Value, uid: &str) -> bool {
    dump["workloads"]
        .as_array()
        .is_some_and(|ws| ws.iter().any(|w| w["uid"] == uid))
}

fn uid(pod: &TestPod) -> String {
    format!("Kubernetes//Pod/{NS}/{}", pod.name)
}

fn deny_port(name: &str, port: u32) -> xsec::Authorization {
    xsec::Authorization {
        name: name.into(),
        namespace: NS.into(),
        scope: xsec::Scope::Namespace as i32,
        action: xsec::Action::Deny as i32,
        rules: vec![xsec::Rule {
            clauses: vec![xsec::Clause {
                matches: vec![xsec::Match {
                    destination_ports: vec![port],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

/// A request that must fail (refused, or answered by nobody).
async fn refused(from: &TestPod, to: SocketAddr, within: Duration) {
    let r = request(from, to, within).await;
    assert!(
        r.as_ref().map(|x| seen_peer(x).is_none()).unwrap_or(true),
        "{} -> {to} was served: {r:?}",
        from.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_from_xds_talk_hbone_with_ca_certificates_and_a_removed_one_is_cut_off() {
    let node = TestNode::new(90);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let cp = node.control_plane().await;
    cp.push_workloads(&[a.workload(NS), b.workload(NS)]);
    let (_agent, zt) = start(&node, &cp, &[&a, &b]).await;
    let server = echo_server(&b, 8080).await;

    let response = request(&a, server.addr, T).await.expect("a -> b");
    assert_eq!(seen_peer(&response), Some(a.ip));
    zt.wait_for(
        &[
            "direction=\"outbound\"",
            &format!("src.identity=\"{}\"", identity_of(&a)),
            &format!("dst.identity=\"{}\"", identity_of(&b)),
        ],
        1,
    )
    .await;
    // Both certificates came from CreateCertificate, asked for on the workloads'
    // behalf, with the token.
    let csrs = cp.csrs();
    for p in [&a, &b] {
        assert!(
            csrs.iter().any(|c| c.impersonated_identity.as_deref()
                == Some(identity_of(p).as_str())
                && c.authorization.as_deref() == Some("Bearer token-1")),
            "{csrs:#?}"
        );
    }
    // istiod saw a ztunnel: its node, its cluster, an ACK.
    let first = cp
        .wait_for_request("opening the Address subscription", |r| {
            r.type_url == ADDRESS_TYPE && r.response_nonce.is_empty()
        })
        .await;
    assert_eq!(
        first.node_id.as_deref(),
        Some("ztunnel~10.0.0.250~ztunnel-test.istio-system~istio-system.svc.cluster.local")
    );
    assert_eq!(
        first.node_metadata.get("NODE_NAME"),
        Some(&node.node_name())
    );
    assert_eq!(first.cluster_id.as_deref(), Some("test-cluster"));
    assert_eq!(first.authorization.as_deref(), Some("Bearer token-1"));
    cp.wait_for_request("an ACK", |r| {
        r.type_url == ADDRESS_TYPE && !r.response_nonce.is_empty() && r.error.is_none()
    })
    .await;
    let dump = zt.config_dump().await;
    let uids: Vec<&str> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["uid"].as_str())
        .collect();
    assert!(
        uids.contains(&uid(&a).as_str()) && uids.contains(&uid(&b).as_str()),
        "{dump:#}"
    );
    let certs = dump["certificates"].as_array().unwrap();
    assert_eq!(
        certs.iter().filter(|c| c["state"] == "Available").count(),
        2,
        "{dump:#}"
    );

    // b removed: a's ztunnel no longer knows b's address (plain TCP, as Istio's does),
    // and b's ztunnel no longer knows its own pod: it refuses the plaintext.
    cp.remove(ADDRESS_TYPE, &[&uid(&b)]);
    zt.wait_config("b's workload gone", |d| !knows_workload(d, &uid(&b)))
        .await;
    refused(&a, server.addr, Duration::from_secs(8)).await;
    zt.wait_for(&["refused: no workload for pod ambient-demo/httpbin"], 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_deny_policy_blocks_and_closes_and_its_removal_restores() {
    let node = TestNode::new(91);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let cp = node.control_plane().await;
    cp.push_workloads(&[a.workload(NS), b.workload(NS)]);
    let (_agent, zt) = start(&node, &cp, &[&a, &b]).await;
    let server = echo_server(&b, 8080).await;
    let held = connect(&a, server.addr, T).await.expect("a -> b");
    let mut held = BufReader::new(held);
    let mut line = String::new();
    held.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("peer="), "{line}");

    cp.push_policies(&[deny_port("deny-8080", 8080)]);
    // The live connection is re-checked and closed; new ones are denied.
    let mut rest = String::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), held.read_to_string(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "still open: {closed:?}"
    );
    refused(&a, server.addr, T).await;
    zt.wait_for(&["denied by policy ambient-demo/deny-8080"], 1)
        .await;

    cp.remove(AUTHORIZATION_TYPE, &[&format!("{NS}/deny-8080")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = request(&a, server.addr, T).await {
            if seen_peer(&r) == Some(a.ip) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "access not restored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_resource_is_nacked_by_name_and_everything_else_keeps_serving() {
    let node = TestNode::new(92);
    let (a, b, c) = (
        node.add_pod("sleep"),
        node.add_pod("httpbin"),
        node.add_pod("echo"),
    );
    let cp = node.control_plane().await;
    cp.push_workloads(&[a.workload(NS), b.workload(NS)]);
    let (agent, zt) = start(&node, &cp, &[&a, &b]).await;
    let (server_b, server_c) = (echo_server(&b, 8080).await, echo_server(&c, 8080).await);
    request(&a, server_b.addr, T).await.expect("a -> b");

    // One response: an undecodable resource, a bad update of b (a 3-byte address), and
    // a good new workload c.
    let mut bad_b = b.workload(NS);
    bad_b.addresses.push(vec![1, 2, 3]);
    let encode = |w: xwl::Workload| prost_types::Any {
        type_url: ADDRESS_TYPE.into(),
        value: prost::Message::encode_to_vec(&xwl::Address {
            r#type: Some(xwl::address::Type::Workload(w)),
        }),
    };
    cp.push_raw(
        ADDRESS_TYPE,
        vec![
            (
                "garbage".into(),
                prost_types::Any {
                    type_url: ADDRESS_TYPE.into(),
                    value: vec![0xff, 0xff, 0xff],
                },
            ),
            (uid(&b), encode(bad_b)),
            (uid(&c), encode(c.workload(NS))),
        ],
    );
    let nack = cp.wait_for_request("a NACK", |r| r.error.is_some()).await;
    let msg = nack.error.unwrap();
    assert!(
        msg.contains("garbage: ")
            && msg.contains(&format!("{}: addresses", uid(&b)))
            && !msg.contains(&uid(&c)),
        "{msg}"
    );
    zt.wait_config("a NACK", |d| d["xds"]["nacks"].as_u64() >= Some(1))
        .await;
    // c (valid, beside them) is applied; b keeps its last good state.
    let status = agent.enrollment().enroll(&c.pod()).await.expect("enroll c");
    assert_eq!(status, EnrollStatus::Enabled);
    let to_c = request(&a, server_c.addr, T).await.expect("a -> c");
    assert_eq!(seen_peer(&to_c), Some(a.ip));
    let to_b = request(&a, server_b.addr, T).await.expect("a -> b still");
    assert_eq!(seen_peer(&to_b), Some(a.ip));
    let (_, body) = zt.readiness_detail().await;
    assert!(
        body.contains("1 NACKs") && body.contains("garbage"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_control_plane_gone_ztunnel_keeps_serving_then_resumes_and_converges() {
    let node = TestNode::new(93);
    let (a, b, c) = (
        node.add_pod("sleep"),
        node.add_pod("httpbin"),
        node.add_pod("echo"),
    );
    let mut cp = node.control_plane().await;
    cp.push_workloads(&[a.workload(NS), b.workload(NS)]);
    let (agent, zt) = start(&node, &cp, &[&a, &b]).await;
    let server_b = echo_server(&b, 8080).await;
    let server_c = echo_server(&c, 8080).await;
    let held = connect(&a, server_b.addr, T).await.expect("a -> b");
    let mut held = BufReader::new(held);
    let mut line = String::new();
    held.read_line(&mut line).await.unwrap();
    let proxies_started = zt.count(&["received netns, starting proxy"]);

    cp.stop().await;
    zt.wait_for(&["xDS stream ended"], 1).await;
    // The last state and the cached certificates keep serving.
    let r = request(&a, server_b.addr, T)
        .await
        .expect("a -> b without istiod");
    assert_eq!(seen_peer(&r), Some(a.ip));
    // Meanwhile the mesh changes: c joins.
    cp.push_workloads(&[c.workload(NS)]);
    let streams = cp.streams_opened();
    cp.restart().await;
    // ztunnel comes back (backoff) and says what it holds, so only news is sent.
    let resumed = cp
        .wait_for_request("a resumed Address subscription", |r| {
            r.type_url == ADDRESS_TYPE
                && r.response_nonce.is_empty()
                && r.initial_resource_versions.contains_key(&uid(&b))
        })
        .await;
    assert!(resumed.initial_resource_versions.contains_key(&uid(&a)));
    assert!(cp.streams_opened() > streams);
    assert_eq!(
        agent.enrollment().enroll(&c.pod()).await.expect("enroll c"),
        EnrollStatus::Enabled
    );
    let to_c = request(&a, server_c.addr, T)
        .await
        .expect("a -> c after resuming");
    assert_eq!(seen_peer(&to_c), Some(a.ip));
    // No proxy was restarted: the connection held all along still works.
    assert_eq!(
        zt.count(&["received netns, starting proxy"]),
        proxies_started + 1
    );
    use tokio::io::AsyncWriteExt;
    held.get_mut().write_all(b"still here\n").await.unwrap();
    line.clear();
    held.read_line(&mut line).await.unwrap();
    assert_eq!(line, "still here\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_outage_past_expiry_refuses_new_mtls_and_recovers_when_the_ca_returns() {
    let node = TestNode::new(94);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let cp = node.control_plane().await;
    cp.set_cert_ttl(Duration::from_secs(4));
    cp.push_workloads(&[a.workload(NS), b.workload(NS)]);
    let (_agent, zt) = start(&node, &cp, &[&a, &b]).await;
    let server = echo_server(&b, 8080).await;
    request(&a, server.addr, T).await.expect("a -> b");

    cp.set_ca_down(true);
    tokio::time::sleep(Duration::from_secs(6)).await;
    refused(&a, server.addr, T).await;
    zt.wait_for(&["expired", "could not be renewed"], 1).await;
    let (status, body) = zt.readiness_detail().await;
    assert_eq!(
        status, 200,
        "a node with failing certificates stays ready: {body}"
    );
    assert!(
        body.contains("EXPIRED") && body.contains("UNAVAILABLE")
            || body.contains("EXPIRED") && body.contains("down"),
        "{body}"
    );
    let dump = zt.config_dump().await;
    assert!(
        dump["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["state"]
                .as_str()
                .is_some_and(|s| s.starts_with("Unavailable: expired"))),
        "{dump:#}"
    );

    cp.set_ca_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = request(&a, server.addr, T).await {
            if seen_peer(&r) == Some(a.ip) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after the CA came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_workload_comes_later_waits_and_one_with_none_is_refused_never_plaintext() {
    let node = TestNode::new(95);
    let (a, b, c) = (
        node.add_pod("sleep"),
        node.add_pod("httpbin"),
        node.add_pod("stranger"),
    );
    let cp = node.control_plane().await;
    cp.push_workloads(&[b.workload(NS)]);
    // a and c are enrolled (their Adds acked) before istiod knows their workloads.
    let (_agent, zt) = start(&node, &cp, &[&b, &a, &c]).await;
    let server = echo_server(&b, 8080).await;
    let capture_a = Capture::on_host_veth(&a, "tcp", node.dir.path());
    let capture_c = Capture::on_host_veth(&c, "tcp", node.dir.path());

    let (first, ()) = tokio::join!(exchange(&a, server.addr, "secret-of-a\n", T), async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        cp.push_workloads(&[a.workload(NS)]);
    });
    let first = first.expect("a's first connection waited for its workload, then went through");
    assert_eq!(seen_peer(&first), Some(a.ip));

    let started = Instant::now();
    let none = exchange(&c, server.addr, "secret-of-c\n", Duration::from_secs(10)).await;
    assert!(
        none.as_ref()
            .map(|r| seen_peer(r).is_none())
            .unwrap_or(true),
        "{none:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "refused before waiting: {:?}",
        started.elapsed()
    );
    zt.wait_for(&["refused: no workload for pod ambient-demo/stranger"], 1)
        .await;

    for (capture, secret) in [(capture_a, "secret-of-a"), (capture_c, "secret-of-c")] {
        let wire = capture.stop();
        assert!(
            !wire.ascii.contains(secret),
            "{secret} crossed the wire in plaintext:\n{}",
            wire.packets
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_a_waypoint_is_reached_through_it_and_fails_without_it() {
    let node = TestNode::new(96);
    let (a, b, wp) = (
        node.add_pod("sleep"),
        node.add_pod("httpbin"),
        node.add_pod("waypoint"),
    );
    let cp = node.control_plane().await;
    let mut b_wl = b.workload(NS);
    let svc_key = format!("{NS}/httpbin.{NS}.svc.cluster.local");
    b_wl.services.insert(
        svc_key,
        xwl::PortList {
            ports: vec![xwl::Port {
                service_port: 80,
                target_port: 8080,
            }],
        },
    );
    // The waypoint: a workload of its own (not captured: it speaks HBONE itself),
    // behind the waypoint service.
    let mut wp_wl = wp.workload(NS);
    wp_wl.services.insert(
        format!("{NS}/waypoint.{NS}.svc.cluster.local"),
        xwl::PortList {
            ports: vec![xwl::Port {
                service_port: 15008,
                target_port: 15008,
            }],
        },
    );
    cp.push_workloads(&[a.workload(NS), b_wl, wp_wl]);
    let vip: std::net::IpAddr = "10.96.96.10".parse().unwrap();
    let service = |name: &str, vip: std::net::IpAddr, port: u32, waypoint: bool| xwl::Service {
        name: name.into(),
        namespace: NS.into(),
        hostname: format!("{name}.{NS}.svc.cluster.local"),
        addresses: vec![xwl::NetworkAddress {
            network: String::new(),
            address: ip_bytes(vip),
        }],
        ports: vec![xwl::Port {
            service_port: port,
            target_port: port,
        }],
        waypoint: waypoint.then(|| xwl::GatewayAddress {
            destination: Some(xwl::gateway_address::Destination::Hostname(
                xwl::NamespacedHostname {
                    namespace: NS.into(),
                    hostname: format!("waypoint.{NS}.svc.cluster.local"),
                },
            )),
            hbone_mtls_port: 15008,
        }),
        ..Default::default()
    };
    let mut httpbin = service("httpbin", vip, 80, true);
    httpbin.ports[0].target_port = 8080;
    cp.push_services(&[
        httpbin,
        service("waypoint", "10.96.96.99".parse().unwrap(), 15008, false),
    ]);
    let (_agent, zt) = start(&node, &cp, &[&a, &b]).await;
    let server = echo_server(&b, 8080).await;
    let waypoint_id: ztunnel::identity::Identity = identity_of(&wp).parse().unwrap();
    let b_id: ztunnel::identity::Identity = identity_of(&b).parse().unwrap();
    let standin = Waypoint::start(
        &node.mesh_root(),
        &wp.netns_path,
        waypoint_id.clone(),
        server.addr,
        b_id,
    )
    .await;

    let response = request(&a, SocketAddr::new(vip, 80), T)
        .await
        .expect("a -> the service, through its waypoint");
    // b's app sees the waypoint as its client; the waypoint saw a's request for the VIP.
    assert_eq!(seen_peer(&response), Some(wp.ip), "{response}");
    let seen = standin.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authority, "10.96.96.10:80");
    assert_eq!(
        seen[0].client.as_ref().map(|i| i.to_string()),
        Some(identity_of(&a))
    );
    zt.wait_for(
        &[
            "direction=\"outbound\"",
            &format!("dst.identity=\"{waypoint_id}\""),
        ],
        1,
    )
    .await;

    // The waypoint gone: the connection fails; it never goes straight to b.
    standin.stop();
    drop(standin);
    refused(&a, SocketAddr::new(vip, 80), T).await;
    // Whether the pool had noticed the waypoint's connection close ("connect to") or
    // not ("connection error"), the failure is the waypoint's, over HBONE.
    zt.wait_for(
        &[
            "direction=\"outbound\"",
            &format!("dst.identity=\"{waypoint_id}\""),
            "error=\"HBONE: ",
        ],
        1,
    )
    .await;
    // The waypoint's service without endpoints: no waypoint, no connection.
    cp.remove(ADDRESS_TYPE, &[&uid(&wp)]);
    zt.wait_config("the waypoint's workload gone", |d| {
        !knows_workload(d, &uid(&wp))
    })
    .await;
    refused(&a, SocketAddr::new(vip, 80), T).await;
    zt.wait_for(&["refused: the destination's waypoint"], 1)
        .await;
}

/// istiod is trusted only with a certificate from the configured root carrying the
/// name ztunnel dials (or `ALT_XDS_HOSTNAME`): anything else gets no stream at all.
#[tokio::test(flavor = "multi_thread")]
async fn istiods_certificate_must_chain_to_the_root_and_carry_the_name_dialled() {
    let node = TestNode::new(98);
    let cp = node.control_plane().await;
    let other_root = node.dir.path().join("other-root");
    ztunnel::create_root(
        "cluster.local",
        Duration::from_secs(86400),
        &other_root,
        false,
    )
    .expect("another root");
    let port = cp.addr.port();
    let with = |n: u32, changes: Vec<(&str, String)>| {
        let mut env = cp.env();
        for (k, v) in changes {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v));
        }
        Ztunnel::start_with(&node, n, move |cmd| {
            for (k, v) in &env {
                cmd.env(k, v);
            }
        })
    };
    // The certificate names istiod.istio-system.svc and 127.0.0.1, not "localhost".
    let wrong_name = with(
        1,
        vec![("XDS_ADDRESS", format!("https://localhost:{port}"))],
    );
    let wrong_root = with(
        2,
        vec![(
            "XDS_ROOT_CA",
            other_root.join("ca.crt").display().to_string(),
        )],
    );
    let alt_name = with(
        3,
        vec![
            ("XDS_ADDRESS", format!("https://localhost:{port}")),
            ("ALT_XDS_HOSTNAME", "istiod.istio-system.svc".into()),
        ],
    );
    /// Polls the readiness body until it holds `needle`; returns the status and body.
    async fn body_with(zt: &Ztunnel, needle: &str) -> (u16, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = zt.readiness_detail().await;
            if body.contains(needle) {
                return (status, body);
            }
            assert!(Instant::now() < deadline, "never {needle:?}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    body_with(&alt_name, "xds: connected").await;
    for (zt, why) in [
        (&wrong_name, "certificate not valid for name \"localhost\""),
        (&wrong_root, "invalid peer certificate"),
    ] {
        let (status, body) = body_with(zt, why).await;
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("xds: DISCONNECTED"), "{body}");
    }
    assert_eq!(
        cp.streams_opened(),
        1,
        "only the ALT_XDS_HOSTNAME ztunnel's"
    );
}
