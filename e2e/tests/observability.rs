//! What an operator of Istio ambient looks at on ztunnel, read the way their tools read
//! it: Prometheus metrics on the stats port (`istio_tcp_*` with Istio's labels, bytes
//! visible while a connection is open), the admin `config_dump` (keys compared with a
//! fixture of Istio's field names), live log levels, and `/quitquitquit`. Real pods,
//! real processes. Root only.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use e2e::app::{connect, echo_server, request};
use e2e::mesh_files::{identity_of, workload, NAMESPACE};
use e2e::prom;
use e2e::{Mesh, TestNode, TestPod, Ztunnel};

const T: Duration = Duration::from_secs(5);

/// A mesh workload with the names dashboards group by.
fn named_workload(pod: &TestPod, services: &str) -> String {
    format!(
        "{}  workloadName: {name}-v1\n  canonicalName: {name}\n  canonicalRevision: v1\n",
        workload(pod, "HBONE", services),
        name = pod.name
    )
}

/// Polls the stats endpoint until `done` holds for the scrape; returns that scrape.
async fn scrape_until(zt: &Ztunnel, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = zt.metrics().await;
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_metrics_grow_while_bytes_flow_and_carry_istios_labels() {
    let node = TestNode::new(41);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    node.write_mesh_config(&format!(
        "workloads:\n{}{}",
        named_workload(&a, ""),
        named_workload(&b, "")
    ));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[]).await;
    let server = echo_server(&b, 8080).await;
    let (sa, sb) = (identity_of(&a), identity_of(&b));
    let pair = |reporter: &'static str| {
        vec![
            ("reporter", reporter),
            ("source_workload", "sleep-v1"),
            ("source_canonical_service", "sleep"),
            ("source_workload_namespace", NAMESPACE),
            ("destination_workload", "httpbin-v1"),
            ("destination_canonical_service", "httpbin"),
            ("destination_workload_namespace", NAMESPACE),
            ("connection_security_policy", "mutual_tls"),
        ]
    };

    // A long-lived connection: its bytes are visible before it closes.
    let mut held = connect(&a, server.addr, T).await.expect("a -> b");
    held.write_all(&[b'x'; 1000]).await.unwrap();
    let mut echoed = Vec::new();
    let mut buf = [0u8; 2048];
    while echoed.iter().filter(|&&c| c == b'x').count() < 1000 {
        let n = tokio::time::timeout(T, held.read(&mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert!(n > 0, "closed early");
        echoed.extend_from_slice(&buf[..n]);
    }
    for reporter in ["source", "destination"] {
        let labels = pair(reporter);
        let text = scrape_until(&zt, "the open connection's bytes", |t| {
            prom::sum(t, "istio_tcp_received_bytes_total", &labels) >= 1000.0
                && prom::sum(t, "istio_tcp_sent_bytes_total", &labels) >= 1000.0
        })
        .await;
        assert_eq!(
            prom::sum(&text, "istio_tcp_connections_opened_total", &labels),
            1.0,
            "{text}"
        );
        assert_eq!(
            prom::sum(&text, "istio_tcp_connections_closed_total", &labels),
            0.0,
            "closed before it closed:\n{text}"
        );
    }
    let text = zt.metrics().await;
    let principals = [
        ("source_principal", sa.as_str()),
        ("destination_principal", sb.as_str()),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
    ];
    for reporter in ["source", "destination"] {
        let mut labels = pair(reporter);
        labels.extend(principals);
        assert_eq!(
            prom::sum(&text, "istio_tcp_connections_opened_total", &labels),
            1.0,
            "{reporter}: principals missing:\n{text}"
        );
    }
    drop(held);
    scrape_until(&zt, "the connection closed", |t| {
        prom::sum(t, "istio_tcp_connections_closed_total", &pair("source")) == 1.0
            && prom::sum(
                t,
                "istio_tcp_connections_closed_total",
                &pair("destination"),
            ) == 1.0
    })
    .await;

    // N more connections: opened rises by N on both sides.
    const N: usize = 5;
    for _ in 0..N {
        request(&a, server.addr, T).await.expect("a -> b");
    }
    scrape_until(&zt, "N more connections opened and closed", |t| {
        ["source", "destination"].iter().all(|r| {
            prom::sum(t, "istio_tcp_connections_opened_total", &pair(r)) == (1 + N) as f64
                && prom::sum(t, "istio_tcp_connections_closed_total", &pair(r)) == (1 + N) as f64
        })
    })
    .await;

    // A denied connection is counted as failed, flagged DENY, by the side that denied it.
    node.write_mesh_config(&format!(
        "workloads:\n{}{}policies:\n- {{name: deny-8080, namespace: {NAMESPACE}, scope: Namespace, action: Deny, dryRun: false, rules: [[[{{destinationPorts: [8080]}}]]]}}\n",
        named_workload(&a, ""),
        named_workload(&b, "")
    ));
    zt.wait_for(&["local config reloaded"], 1).await;
    // Refused: an error, or a close before any answer.
    assert!(request(&a, server.addr, T)
        .await
        .map_or(true, |answer| answer.is_empty()));
    let denied = [
        ("reporter", "destination"),
        ("destination_workload", "httpbin-v1"),
        ("response_flags", "DENY"),
    ];
    let text = scrape_until(&zt, "the denied connection counted", |t| {
        prom::sum(t, "istio_tcp_connections_failed_total", &denied) == 1.0
    })
    .await;
    assert_eq!(
        prom::sum(&text, "istio_tcp_connections_closed_total", &denied),
        1.0,
        "{text}"
    );
    // The workload manager's and the process's own metrics are there too.
    assert_eq!(
        prom::sum(&text, "workload_manager_active_proxy_count", &[]),
        2.0
    );
    assert_eq!(
        prom::sum(&text, "workload_manager_proxies_started_total", &[]),
        2.0
    );
    assert!(prom::sum(&text, "process_open_fds", &[]) > 0.0, "{text}");
    assert_eq!(
        prom::sum(&text, "istio_build", &[("component", "ztunnel")]),
        1.0
    );
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// `v`'s keys against the fixture's section: every required key there, no key that
/// is neither required, optional nor a documented extra.
fn check_keys(fixture: &Value, section: &str, v: &Value) {
    let list = |k: &str| -> BTreeSet<String> {
        fixture[section][k]
            .as_array()
            .unwrap_or_else(|| panic!("fixture lacks {section}.{k}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let (required, optional, extra) = (list("required"), list("optional"), list("extra"));
    let got = keys(v);
    let missing: Vec<_> = required.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "{section}: missing {missing:?} in {v:#}"
    );
    let unknown: Vec<_> = got
        .iter()
        .filter(|k| !required.contains(*k) && !optional.contains(*k) && !extra.contains(*k))
        .collect();
    assert!(
        unknown.is_empty(),
        "{section}: keys Istio does not have {unknown:?} in {v:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_has_istios_sections_and_keys_and_lists_pods_certs_and_connections() {
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/istio_ztunnel_config_dump_keys.json"))
            .expect("fixture");
    let node = TestNode::new(42);
    let (a, b) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let svc = format!("\"{NAMESPACE}/httpbin.{NAMESPACE}.svc.cluster.local\": {{80: 8080}}");
    node.write_mesh_config(&format!(
        "workloads:\n{}{}services:\n- {{name: httpbin, namespace: {NAMESPACE}, hostname: httpbin.{NAMESPACE}.svc.cluster.local, vips: [\"/10.96.42.10\"], ports: {{80: 8080}}}}\npolicies:\n- {{name: allow-sleep, namespace: {NAMESPACE}, scope: Namespace, action: Allow, dryRun: false, rules: [[[{{principals: [{{Exact: \"{sa}\"}}]}}]]]}}\n",
        named_workload(&a, ""),
        named_workload(&b, &svc),
        sa = identity_of(&a).trim_start_matches("spiffe://"),
    ));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&a, &b], &[]).await;
    let server = echo_server(&b, 8080).await;
    // A live connection, to be listed under both pods.
    let mut held = connect(&a, server.addr, T).await.expect("a -> b");
    held.write_all(b"hi\n").await.unwrap();
    let mut first = [0u8; 5];
    held.read_exact(&mut first).await.unwrap();

    let dump = zt.config_dump().await;
    check_keys(&fixture, "top", &dump);
    let workloads = dump["workloads"].as_array().expect("workloads");
    for w in workloads {
        check_keys(&fixture, "workload", w);
    }
    let names: BTreeSet<&str> = workloads
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["sleep", "httpbin"]), "{dump:#}");
    let services = dump["services"].as_array().expect("services");
    assert_eq!(services.len(), 1, "{dump:#}");
    check_keys(&fixture, "service", &services[0]);
    let endpoints = services[0]["endpoints"].as_object().expect("endpoints");
    assert_eq!(endpoints.len(), 1, "{dump:#}");
    for e in endpoints.values() {
        check_keys(&fixture, "endpoint", e);
    }
    let policies = dump["policies"].as_array().expect("policies");
    assert_eq!(policies.len(), 1, "{dump:#}");
    check_keys(&fixture, "policy", &policies[0]);

    // One certificate per enrolled identity, with its chain, valid now.
    let certs = dump["certificates"].as_array().expect("certificates");
    let identities: BTreeSet<&str> = certs
        .iter()
        .filter_map(|c| c["identity"].as_str())
        .collect();
    assert_eq!(
        identities,
        BTreeSet::from([identity_of(&a).as_str(), identity_of(&b).as_str()]),
        "{dump:#}"
    );
    let now = time::OffsetDateTime::now_utc();
    for c in certs {
        check_keys(&fixture, "certificate", c);
        assert_eq!(c["state"], "Available", "{c:#}");
        let chain = c["certChain"].as_array().expect("certChain");
        assert!(!chain.is_empty(), "{c:#}");
        for cert in chain {
            check_keys(&fixture, "cert", cert);
            let pem = base64::engine::general_purpose::STANDARD
                .decode(cert["pem"].as_str().unwrap())
                .expect("pem is base64");
            assert!(
                String::from_utf8_lossy(&pem).starts_with("-----BEGIN CERTIFICATE-----"),
                "{cert:#}"
            );
            let rfc3339 = &time::format_description::well_known::Rfc3339;
            let expires =
                time::OffsetDateTime::parse(cert["expirationTime"].as_str().unwrap(), rfc3339)
                    .expect("expirationTime is RFC 3339");
            let from = time::OffsetDateTime::parse(cert["validFrom"].as_str().unwrap(), rfc3339)
                .expect("validFrom is RFC 3339");
            assert!(from <= now && now < expires, "{cert:#}");
        }
    }

    // Per pod: Up, who it is, and its live connections.
    let states = dump["workloadState"].as_object().expect("workloadState");
    assert_eq!(states.len(), 2, "{dump:#}");
    let mut outbound = Vec::new();
    let mut inbound = Vec::new();
    for s in states.values() {
        check_keys(&fixture, "workloadState", s);
        check_keys(&fixture, "workloadInfo", &s["info"]);
        assert_eq!(s["state"], "Up", "{s:#}");
        assert_eq!(s["info"]["trustDomain"], "cluster.local", "{s:#}");
        for c in s["connections"]["outbound"].as_array().unwrap() {
            check_keys(&fixture, "connection", c);
            outbound.push((s["info"]["name"].clone(), c.clone()));
        }
        for c in s["connections"]["inbound"].as_array().unwrap() {
            check_keys(&fixture, "connection", c);
            inbound.push((s["info"]["name"].clone(), c.clone()));
        }
    }
    let local = held.local_addr().unwrap().to_string();
    assert_eq!(outbound.len(), 1, "{dump:#}");
    assert_eq!(outbound[0].0, "sleep");
    assert_eq!(outbound[0].1["src"], local.as_str());
    assert_eq!(
        outbound[0].1["originalDst"],
        server.addr.to_string().as_str()
    );
    assert_eq!(
        outbound[0].1["actualDst"],
        format!("{}:15008", b.ip).as_str()
    );
    assert_eq!(inbound.len(), 1, "{dump:#}");
    assert_eq!(inbound[0].0, "httpbin");
    assert_eq!(inbound[0].1["actualDst"], server.addr.to_string().as_str());

    drop(held);
    let deadline = Instant::now() + T;
    loop {
        let dump = zt.config_dump().await;
        let listed: usize = dump["workloadState"]
            .as_object()
            .unwrap()
            .values()
            .map(|s| {
                s["connections"]["inbound"].as_array().unwrap().len()
                    + s["connections"]["outbound"].as_array().unwrap().len()
            })
            .sum();
        if listed == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "closed connection still listed: {dump:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_levels_change_live_and_reset_and_quitquitquit_drains_and_exits() {
    let node = TestNode::new(43);
    let (a, b, c) = (
        node.add_pod("sleep"),
        node.add_pod("httpbin"),
        node.add_pod("late"),
    );
    node.write_mesh_config(&format!(
        "workloads:\n{}{}{}",
        named_workload(&a, ""),
        named_workload(&b, ""),
        named_workload(&c, "")
    ));
    let mesh = Mesh::start_in_mesh(&node, &[&a], &[]).await;
    let zt = &mesh.ztunnel;
    let debug_lines = || zt.count(&["DEBUG", "ztunnel::inpod", "request: add"]);
    assert_eq!(debug_lines(), 0, "debug before asked:\n{}", zt.logs());

    let (status, body) = zt.admin_get("/logging").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("current log level is info"), "{body}");

    let (status, body) = zt.admin_post("/logging?level=ztunnel::inpod=debug").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ztunnel::inpod=debug"), "{body}");
    mesh.enroll(&b).await;
    zt.wait_for(&["DEBUG", "ztunnel::inpod", "request: add"], 1)
        .await;
    // Only that target: the access log's debug (none) and other targets stay at info.
    assert_eq!(zt.count(&["DEBUG", "ztunnel::proxy"]), 0, "{}", zt.logs());

    let (status, body) = zt.admin_post("/logging?level=nonsense=loud").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("is not a level"), "{body}");

    let (status, body) = zt.admin_post("/logging?reset").await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("ztunnel::inpod=debug"), "{body}");
    let before = debug_lines();
    mesh.enroll(&c).await;
    zt.wait_for(&["received netns, starting proxy"], 3).await;
    assert_eq!(
        debug_lines(),
        before,
        "debug lines after reset:\n{}",
        zt.logs()
    );

    // /quitquitquit is POST only; then ztunnel drains its pods and exits 0.
    let (status, _) = zt.admin_get("/quitquitquit").await;
    assert_eq!(status, 405);
    let (status, body) = zt.admin_post("/quitquitquit").await;
    assert_eq!(status, 200, "{body}");
    let Mesh {
        agent: _agent,
        ztunnel: mut zt,
    } = mesh;
    let deadline = Instant::now() + Duration::from_secs(10);
    while zt.is_running() {
        assert!(Instant::now() < deadline, "still running:\n{}", zt.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(zt.exit_code(), Some(0), "{}", zt.logs());
    assert!(
        zt.logs()
            .contains("shutdown requested on the admin endpoint"),
        "{}",
        zt.logs()
    );
}
