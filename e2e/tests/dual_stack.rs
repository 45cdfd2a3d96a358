//! Dual-stack: IPv6 is captured, proxied, encrypted and policed exactly like IPv4, and
//! no pod is ever `enabled` with uncaptured IPv6. Real dual-stack (and IPv6-only) pods
//! from the CNI bridge + host-local plugins, real ip6tables, ztunnel and the agent as
//! processes. Root only.

use std::net::IpAddr;
use std::time::Duration;

use e2e::app::{echo_server, exchange, request, seen_peer};
use e2e::capture::Capture;
use e2e::cluster::{Cluster, AMBIENT};
use e2e::mesh_files::{hbone_workloads, identity_of};
use e2e::node::normalize_save;
use e2e::observe::SPEC6_SAVE;
use e2e::{Mesh, TestNode, TestPod, Ztunnel};

const T: Duration = Duration::from_secs(3);

fn v6(pod: &TestPod) -> IpAddr {
    pod.ip6().expect("an IPv6 address")
}

fn mesh_config(pods: &[&TestPod], rest: &str) -> String {
    format!("{}{rest}", hbone_workloads(pods))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_pod_is_captured_in_both_families_and_talks_hbone_over_each() {
    let node = TestNode::dual_stack(80, false);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    node.write_mesh_config(&mesh_config(&[&a, &b], ""));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[]).await;

    assert_eq!(a.ip6tables_save(), normalize_save(SPEC6_SAVE));
    let routing = a.policy_routing6();
    assert!(
        routing.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100")
            && routing.contains("local default dev lo"),
        "{routing}"
    );
    // One dual-stack listener per port, `*:port` as in the specification.
    let ss = a.exec(&["ss", "-ntlpH"]);
    for port in [15001, 15006, 15008] {
        assert!(
            ss.lines()
                .any(|l| l.contains(&format!("*:{port} ")) && l.contains("ztunnel")),
            "no dual-stack listener on {port}:\n{ss}"
        );
    }

    let server = echo_server(&b, 8080).await;
    for family in ["IPv6", "IPv4"] {
        let (src, dst) = match family {
            "IPv6" => (v6(&a), v6(&b)),
            _ => (a.ip, b.ip),
        };
        let capture = Capture::on_host_veth(&a, "tcp", node.dir.path());
        let payload = format!("{family}-secret\n");
        let response = exchange(&a, server.at(dst), &payload, T)
            .await
            .unwrap_or_else(|e| panic!("a -> b over {family}: {e}"));
        assert_eq!(seen_peer(&response), Some(src), "{family}: {response}");
        let wire = capture.stop();
        // tcpdump writes an address and port as `addr.port`.
        let hbone = format!("{dst}.15008");
        assert!(
            wire.packets.contains(&hbone),
            "{family}: no TLS to {hbone}:\n{}",
            wire.packets
        );
        assert!(
            !wire.packets.contains(".8080:"),
            "{family}: plaintext to the app port on the wire:\n{}",
            wire.packets
        );
        assert!(
            !wire.ascii.contains(payload.trim()),
            "{family}: plaintext payload"
        );
        // Istio's fields: `dst.addr` is the HBONE peer (port 15008), `dst.hbone_addr`
        // the app's address inside the tunnel.
        let dst_addr = format!("dst.hbone_addr={}", server.at(dst));
        let src_id = format!("src.identity=\"{}\"", identity_of(&a));
        let dst_id = format!("dst.identity=\"{}\"", identity_of(&b));
        zt.wait_for(&["direction=\"outbound\"", &dst_addr, &src_id, &dst_id], 1)
            .await;
        zt.wait_for(&["direction=\"inbound\"", &dst_addr, &src_id], 1)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_applies_to_ipv6_as_to_ipv4_and_outside_clients_land_on_15006() {
    let node = TestNode::dual_stack(81, false);
    let (a, b, outside, plain) = (
        node.add_pod("sleep"),
        node.add_pod("httpbin"),
        node.add_pod("outside"),
        node.add_pod("legacy"),
    );
    // Deny a's IPv6 address (a /128) and outside's, to b's IPv6 network.
    let policy = format!(
        "policies:\n- name: deny-v6\n  namespace: ambient-demo\n  scope: Namespace\n  action: Deny\n  dryRun: false\n  rules: [[[{{sourceIps: [\"{}/128\", \"{}/128\"], destinationIps: [\"fd00:248:81::/64\"]}}]]]\n",
        v6(&a),
        v6(&outside)
    );
    node.write_mesh_config(&mesh_config(&[&a, &b], &policy));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[]).await;
    let server = echo_server(&b, 8080).await;

    // Mesh client: denied over IPv6, allowed over IPv4.
    let denied = request(&a, server.at(v6(&b)), T).await;
    assert!(
        denied.as_ref().map_or(true, |r| !r.contains("peer=")),
        "the IPv6 deny did not apply: {denied:?}"
    );
    zt.wait_for(
        &[
            "direction=\"inbound\"",
            "denied by policy ambient-demo/deny-v6",
        ],
        1,
    )
    .await;
    let allowed = request(&a, server.at(b.ip), T).await.expect("IPv4 allowed");
    assert_eq!(seen_peer(&allowed), Some(a.ip));

    // A client outside the mesh lands on 15006 (plaintext), where the policy applies.
    let denied = request(&outside, server.at(v6(&b)), T).await;
    assert!(
        denied.as_ref().map_or(true, |r| !r.contains("peer=")),
        "outside over IPv6 was not denied: {denied:?}"
    );
    zt.wait_for(
        &[
            "direction=\"inbound\"",
            &format!("src.addr=[{}]:", v6(&outside)),
            "denied by policy ambient-demo/deny-v6",
        ],
        1,
    )
    .await;
    let ok = request(&outside, server.at(b.ip), T)
        .await
        .expect("outside over IPv4");
    assert_eq!(seen_peer(&ok), Some(outside.ip));

    // A mesh pod reaching a server outside the mesh over IPv6 is passed through.
    let legacy = echo_server(&plain, 9090).await;
    let through = request(&a, legacy.at(v6(&plain)), T)
        .await
        .expect("a -> legacy over IPv6");
    assert_eq!(seen_peer(&through), Some(v6(&a)));
    zt.wait_for(
        &[
            "direction=\"outbound\"",
            &format!("dst.addr={}", legacy.at(v6(&plain))),
            "connection complete",
        ],
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_only_pods_are_captured_and_talk_hbone() {
    let node = TestNode::ipv6_only(82, false);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    assert!(a.ip.is_ipv6() && a.ips.len() == 1, "{:?}", a.ips);
    node.write_mesh_config(&mesh_config(&[&a, &b], ""));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[]).await;
    let server = echo_server(&b, 8080).await;
    let capture = Capture::on_host_veth(&a, "tcp", node.dir.path());
    let response = exchange(&a, server.addr, "v6-only-secret\n", T)
        .await
        .expect("a -> b");
    assert_eq!(seen_peer(&response), Some(a.ip));
    let wire = capture.stop();
    assert!(wire.packets.contains(".15008"), "{}", wire.packets);
    assert!(!wire.ascii.contains("v6-only-secret"));
    zt.wait_for(&["direction=\"inbound\"", "dst.workload=\"httpbin\""], 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_over_ipv6_and_unenrollment_in_both_families() {
    let cluster = Cluster::dual_stack(83, true).await;
    cluster.namespace("demo", &[AMBIENT]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let agent = cluster.start_agent(1);
    let _zt = cluster.start_ztunnel(1);
    cluster.wait_annotation(&a, Some("enabled"), &agent).await;
    let server = echo_server(&a, 8080).await;

    let set6 = e2e::sh("ipset", &["save", &format!("{}-v6", cluster.probe_set)]);
    assert!(
        set6.lines().any(|l| l.starts_with("add ")
            && l.contains(&v6(&a).to_string())
            && l.contains(&a.uid)),
        "{set6}"
    );
    // A kubelet-style probe from the node over IPv6: SNATed to the IPv6 probe address,
    // which the pod's rules pass straight to the app.
    let probe = tokio::time::timeout(T, tokio::net::TcpStream::connect(server.at(v6(&a))))
        .await
        .expect("probe connect in time")
        .expect("probe connects");
    use tokio::io::AsyncBufReadExt;
    let mut first = String::new();
    let _ = tokio::time::timeout(T, tokio::io::BufReader::new(probe).read_line(&mut first)).await;
    assert!(
        first.starts_with("peer=[fd16:9254:7127:1337:ffff:ffff:ffff:ffff]:"),
        "the app should see the IPv6 probe address: {first}"
    );

    // Out of the mesh: both families' rules, routes and set entries go.
    cluster.label_namespace("demo", AMBIENT.0, None);
    cluster.wait_annotation(&a, None, &agent).await;
    assert!(!a.iptables_save().contains("ISTIO") && !a.ip6tables_save().contains("ISTIO"));
    assert_eq!(a.policy_routing() + &a.policy_routing6(), "");
    for family in ["v4", "v6"] {
        let set = e2e::sh(
            "ipset",
            &["save", &format!("{}-{family}", cluster.probe_set)],
        );
        assert!(!set.lines().any(|l| l.starts_with("add ")), "{set}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_with_ipv6_on_a_node_without_ipv6_redirection_is_refused() {
    let cluster = Cluster::dual_stack(84, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let _agent = cluster.start_agent_with(1, |cmd| {
        cmd.env("AMBIENT_IPV6", "false");
    });
    let _zt = cluster.start_ztunnel(1);
    e2e::zds_listening(&cluster.node.zds_socket()).await;

    cluster.create_pod_object("demo", "sleep");
    let (pod, added) = cluster.start_sandbox("demo", "sleep");
    let err = added.expect_err("a dual-stack pod must be refused when IPv6 is not redirected");
    assert!(
        err.contains("IPv6") && err.contains("AMBIENT_IPV6"),
        "the error should say why: {err}"
    );
    assert_ne!(
        cluster.annotation_of("demo", "sleep").as_deref(),
        Some("enabled")
    );
    assert!(!pod.iptables_save().contains("ISTIO"), "nothing half-done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_without_ipv6_refuses_a_pod_with_ipv6() {
    let cluster = Cluster::dual_stack(85, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let agent = cluster.start_agent(1);
    let zt = Ztunnel::start_with(&cluster.node, 1, |cmd| {
        cmd.env("PASSTHROUGH_ONLY", "true")
            .env("IPV6_ENABLED", "false");
    });
    zt.wait_readiness(200).await;
    zt.wait_for(&["IPV6_ENABLED is off", &v6(&a).to_string()], 1)
        .await;
    cluster.wait_annotation(&a, Some("pending"), &agent).await;
    assert!(a.ports_of("ztunnel").is_empty(), "{:?}", a.listening());
}
