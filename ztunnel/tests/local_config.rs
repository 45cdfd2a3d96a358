//! The local config is Istio's: a file written to Istio's ztunnel schema, using every
//! field it accepts, loads in ours and routes and authorizes connections as Istio's
//! ztunnel would; shapes Istio's parser refuses are refused here too; and every local
//! config example in our docs (docs/local-config.md) loads.

use std::net::SocketAddr;

use ztunnel::authz::{self, Conn, Decision};
use ztunnel::identity::Identity;
use ztunnel::state::service::{HealthPolicy, IpFamily, LoadBalancerMode, RoutingScope};
use ztunnel::state::watch::load_str;
use ztunnel::state::workload::{GatewayDestination, HealthStatus, NetworkMode, TunnelProtocol};
use ztunnel::state::{Destination, MeshState, NamespacedHostname, Protocol};

const FIXTURE: &str = include_str!("../testdata/istio-local-config.yaml");

fn fixture() -> MeshState {
    let (state, warnings) = load_str("istio-local-config.yaml", FIXTURE, Some("node-1"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    state
}

#[test]
fn every_workload_field_istio_accepts_is_loaded_and_kept() {
    let s = fixture();
    assert_eq!(
        (s.workload_count(), s.service_count(), s.policies().len()),
        (8, 6, 4)
    );
    let c = s.workload("Kubernetes//Pod/app/client").unwrap();
    assert_eq!(
        c.identity().to_string(),
        "spiffe://cluster.local/ns/app/sa/client"
    );
    assert_eq!(c.ips.len(), 2);
    assert_eq!(c.protocol, Protocol::Hbone);
    assert_eq!(c.network_mode, NetworkMode::Standard);
    let waypoint = c.waypoint.as_ref().unwrap();
    assert!(
        matches!(&waypoint.destination, GatewayDestination::Address(a) if a.to_string() == "/10.0.9.9")
    );
    assert_eq!(waypoint.hbone_mtls_port, 15008);
    let gateway = c.network_gateway.as_ref().unwrap();
    assert!(matches!(&gateway.destination,
        GatewayDestination::Hostname(h) if h.to_string() == "istio-system/eastwest.istio-system.svc.cluster.local"));
    assert_eq!(gateway.hbone_mtls_port, 15009);
    assert_eq!(
        (
            c.workload_name.as_str(),
            c.workload_type.as_str(),
            c.canonical_name.as_str(),
            c.canonical_revision.as_str(),
            c.cluster_id.as_str(),
            c.node.as_str()
        ),
        (
            "client",
            "deployment",
            "client",
            "v1",
            "Kubernetes",
            "node-1"
        )
    );
    assert_eq!(
        (
            c.locality.region.as_str(),
            c.locality.zone.as_str(),
            c.locality.subzone.as_str()
        ),
        ("r1", "z1", "s1")
    );
    assert_eq!(
        c.application_tunnel.as_ref().map(|t| (t.protocol, t.port)),
        Some((TunnelProtocol::None, None))
    );
    assert_eq!(
        (c.status, c.capacity, c.native_tunnel),
        (HealthStatus::Healthy, 1, false)
    );
    let b = s.workload("Kubernetes//Pod/app/server-b").unwrap();
    assert_eq!(
        b.application_tunnel.as_ref().map(|t| (t.protocol, t.port)),
        Some((TunnelProtocol::Proxy, Some(15088)))
    );
    let a = s.workload("Kubernetes//Pod/app/server-a").unwrap();
    assert_eq!(a.capacity, 2);
    assert_eq!(a.authorization_policies[0].to_string(), "app/only-client");
    assert_eq!(
        a.services,
        ["app/server.app.svc.cluster.local"
            .parse::<NamespacedHostname>()
            .unwrap()]
    );
    // Istio's defaults: trust domain cluster.local, service account default.
    let vm = s
        .workload("cluster1/networking.istio.io/WorkloadEntry/legacy/vm")
        .unwrap();
    assert_eq!(
        vm.identity().to_string(),
        "spiffe://cluster.local/ns/legacy/sa/default"
    );
    assert_eq!(vm.protocol, Protocol::Tcp);
}

#[test]
fn every_service_field_istio_accepts_is_loaded_and_kept() {
    let s = fixture();
    let svc = s
        .service(&"app/server.app.svc.cluster.local".parse().unwrap())
        .unwrap();
    let service = &svc.service;
    assert_eq!(service.vips.len(), 2);
    assert_eq!(
        service.subject_alt_names,
        ["spiffe://cluster.local/ns/app/sa/server"]
    );
    let ui = s
        .service(&"app/ui.app.svc.cluster.local".parse().unwrap())
        .unwrap();
    assert!(matches!(&ui.service.waypoint.as_ref().unwrap().destination,
        GatewayDestination::Hostname(h) if &*h.hostname == "waypoint.app.svc.cluster.local"));
    let lb = service.load_balancer.as_ref().unwrap();
    assert_eq!(
        lb.routing_preferences,
        [RoutingScope::Region, RoutingScope::Zone]
    );
    assert_eq!(
        (lb.mode, lb.health_policy),
        (LoadBalancerMode::Failover, HealthPolicy::OnlyHealthy)
    );
    assert_eq!(service.ip_families, Some(IpFamily::Dual));
    assert!(service.canonical);
    // Endpoints: declared by the service, and by the workloads that back it.
    let mut uids: Vec<_> = svc.endpoints.keys().map(|u| &*u.0).collect();
    uids.sort();
    assert_eq!(
        uids,
        [
            "Kubernetes//Pod/app/server-a",
            "Kubernetes//Pod/app/server-b",
            "Kubernetes//Pod/app/server-c",
            "Kubernetes//Pod/app/server-down"
        ]
    );
    // Pickable: not the unhealthy one, not the one with no workload.
    let mut backends: Vec<_> = svc
        .backends
        .iter()
        .map(|b| b.workload.name.as_str())
        .collect();
    backends.sort();
    assert_eq!(backends, ["server-a", "server-b"]);
}

#[test]
fn pods_are_matched_to_this_nodes_workloads_by_namespace_name_and_account() {
    let s = fixture();
    assert!(s.pod_workload("app", "client", "client").is_some());
    assert!(s.pod_workload("app", "client", "server").is_none());
    assert!(
        s.pod_workload("app", "server-a", "server").is_none(),
        "server-a runs on node-2"
    );
    assert!(s.pod_workload("legacy", "vm", "default").is_some());
}

fn route_from(s: &MeshState, src: &str, dst: &str) -> String {
    let src = s.workload(src).unwrap();
    match s.resolve(src, dst.parse::<SocketAddr>().unwrap()) {
        Destination::Workload(w, addr) => format!("{} {addr}", w.name),
        Destination::Waypoint {
            waypoint,
            addr,
            target,
        } => format!("via {} {addr} to {target}", waypoint.name),
        Destination::NoWaypoint { reason, .. } => format!("fail: {reason}"),
        Destination::NoEndpoint { reason, .. } => format!("fail: {reason}"),
        Destination::Passthrough(addr) => format!("passthrough {addr}"),
        Destination::Hostname { workload, port } => {
            format!("resolve {}:{port}", workload.hostname)
        }
    }
}

fn route(s: &MeshState, dst: &str) -> String {
    route_from(s, "Kubernetes//Pod/app/client", dst)
}

#[test]
fn connections_go_where_istio_would_send_them() {
    let s = fixture();
    #[rustfmt::skip]
    let table: &[(&str, &str)] = &[
        // Failover on [Region, Zone] from r1/z1: server-a (same zone) only.
        ("10.96.0.10:80", "server-a 10.0.2.1:8080"),
        ("10.96.0.10:80", "server-a 10.0.2.1:8080"),
        // Over IPv6 to a dual-stack service: server-a has no IPv6, so its IPv4.
        ("[fd96::10]:80", "server-a 10.0.2.1:8080"),
        // Target port 0: only endpoints that map the port serve it; none does.
        ("10.96.0.10:81", "fail: no endpoint serves the port"),
        ("10.96.0.10:82", "fail: the service has no such port"),
        // A workload address is that workload, whatever the port.
        ("10.0.2.2:8080", "server-b 10.0.2.2:8080"),
        ("[fd00:2::2]:8080", "server-b [fd00:2::2]:8080"),
        // Host-network workloads are never found by address.
        ("10.0.0.10:80", "passthrough 10.0.0.10:80"),
        // Istio's localhost.yaml service: its endpoint, with the workload's port.
        ("127.10.0.1:80", "local 127.0.0.1:8080"),
        // A VIP in another network is not ours to resolve.
        ("127.10.0.2:80", "passthrough 127.10.0.2:80"),
        ("192.0.2.1:443", "passthrough 192.0.2.1:443"),
    ];
    for (dst, want) in table {
        assert_eq!(route(&s, dst), *want, "to {dst}");
    }
}

#[test]
fn traffic_goes_through_waypoints_as_istio_sends_it() {
    let s = fixture();
    // A service with a waypoint: HBONE to the waypoint, asking for the VIP.
    assert_eq!(
        route(&s, "10.96.0.20:80"),
        "via waypoint 10.0.9.9:15008 to 10.96.0.20:80"
    );
    // A waypoint that does not exist: the connection fails.
    assert_eq!(
        route(&s, "10.96.0.21:80"),
        "fail: waypoint app/missing-waypoint.app.svc.cluster.local not found"
    );
    // A workload with a waypoint (client's is /10.0.9.9), addressed directly.
    assert_eq!(
        route_from(&s, "Kubernetes//Pod/app/server-a", "10.0.1.1:8080"),
        "via waypoint 10.0.9.9:15008 to 10.0.1.1:8080"
    );
    // ... unless the connection comes from that waypoint.
    assert_eq!(
        route_from(&s, "Kubernetes//Pod/app/waypoint", "10.0.1.1:8080"),
        "client 10.0.1.1:8080"
    );
    // The same for a service: from its own waypoint, the service's endpoints are
    // picked (ui has none), never the waypoint again.
    assert_eq!(
        route_from(&s, "Kubernetes//Pod/app/waypoint", "10.96.0.20:80"),
        "fail: no endpoint serves the port"
    );
    // The waypoint accepts HBONE for the service and the workload it serves.
    let w = s.workload("Kubernetes//Pod/app/waypoint").unwrap();
    assert!(s.routes_through("", "10.96.0.20".parse().unwrap(), w));
    assert!(s.routes_through("", "10.0.1.1".parse().unwrap(), w));
    assert!(!s.routes_through("", "10.0.2.1".parse().unwrap(), w));
}

/// Decides a connection from `src` (identity `ns/sa`, or plaintext) at `src_ip` to
/// workload `dst_uid` on `port`.
fn decide(
    s: &MeshState,
    src: Option<(&str, &str)>,
    src_ip: &str,
    dst_uid: &str,
    port: u16,
) -> Decision {
    let dst = s.workload(dst_uid).unwrap();
    let id = src.map(|(ns, sa)| Identity::new("cluster.local", ns, sa));
    let conn = Conn {
        src_ip: src_ip.parse().unwrap(),
        src_identity: id.as_ref(),
        dst_ip: dst.ips[0],
        dst_port: port,
    };
    authz::authorize(s.policies(), dst, &conn)
}

/// Source identity (namespace, service account) or plaintext, source address,
/// destination workload uid, port, and the decision.
type Row<'a> = (Option<(&'a str, &'a str)>, &'a str, &'a str, u16, Decision);

#[test]
fn connections_are_allowed_and_denied_as_istio_decides() {
    let s = fixture();
    const A: &str = "Kubernetes//Pod/app/server-a";
    const VM: &str = "cluster1/networking.istio.io/WorkloadEntry/legacy/vm";
    const LOCAL: &str = "cluster1//v1/Pod/default/local";
    let allow = Decision::Allow;
    let not_allowed = Decision::Deny {
        policy: "no ALLOW policy matched".into(),
    };
    let no_plaintext = Decision::Deny {
        policy: "istio-system/no-plaintext".into(),
    };
    #[rustfmt::skip]
    let table: Vec<Row> = vec![
        // only-client, rule 1: (client by principal or account) AND (port 8080 on 10.0.2.0/24).
        (Some(("app", "client")), "10.0.1.1", A, 8080, allow.clone()),
        (Some(("app", "client")), "10.0.1.1", A, 9090, not_allowed.clone()),
        (Some(("app", "banned")), "10.0.1.1", A, 8080, not_allowed.clone()),
        (Some(("other", "client")), "10.0.1.1", A, 8080, not_allowed.clone()),
        // only-client, rule 2: namespaces starting "mon" but not "monkey", from 10.0.7.0/24 or
        // fd00:7::/64 but not 10.0.7.7.
        (Some(("monitoring", "prom")), "10.0.7.1", A, 9090, allow.clone()),
        (Some(("monitoring", "prom")), "fd00:7::5", A, 9090, allow.clone()),
        (Some(("monitoring", "prom")), "10.0.7.7", A, 9090, not_allowed.clone()),
        (Some(("monitoring", "prom")), "10.0.8.1", A, 9090, not_allowed.clone()),
        (Some(("monkey", "prom")), "10.0.7.1", A, 9090, not_allowed.clone()),
        // Plaintext never satisfies a principal, namespace or account match.
        (None, "10.0.7.1", A, 8080, not_allowed.clone()),
        // no-plaintext (global): a peer without identity to 5432 is denied everywhere.
        (None, "10.0.1.1", VM, 5432, no_plaintext.clone()),
        (None, "10.0.1.1", A, 5432, no_plaintext),
        (Some(("app", "client")), "10.0.1.1", VM, 5432, allow.clone()),
        // audit-legacy is a dry run: it decides nothing.
        (None, "10.0.1.1", VM, 80, allow.clone()),
        // Istio's localhost.yaml policy: Allow everything but 9999 in default.
        (Some(("app", "client")), "10.0.1.1", LOCAL, 80, allow),
        (Some(("app", "client")), "10.0.1.1", LOCAL, 9999, not_allowed),
    ];
    for (src, ip, dst, port, want) in table {
        assert_eq!(
            decide(&s, src, ip, dst, port),
            want,
            "{src:?} at {ip} to {dst}:{port}"
        );
    }
}

/// Loads a one-entry config: `entry` under `section`.
fn load_one(section: &str, entry: &str) -> Result<Vec<String>, String> {
    let yaml = format!("{section}:\n{entry}");
    load_str("t.yaml", &yaml, None)
        .map(|(_, warnings)| warnings)
        .map_err(|e| e.to_string())
}

const W: &str = "- {uid: u1, name: a, namespace: n, workloadIps: [\"10.0.0.1\"], services: {}";
const S: &str = "- {name: s, namespace: n, hostname: s.n.svc.cluster.local, vips: [\"/10.96.0.1\"], ports: {80: 80}";
const P: &str = "- {name: p, namespace: n, scope: Global, action: Deny, dryRun: false";

#[test]
fn shapes_istios_parser_refuses_are_refused_with_the_reason() {
    #[rustfmt::skip]
    let table: &[(&str, String, &str)] = &[
        // Required, as in Istio.
        ("policies", "- {name: p, namespace: n, scope: Global, action: Deny, rules: [[[{destinationPorts: [1]}]]]}".into(), "dryRun"),
        ("policies", format!("{P}}}"), "rules"),
        ("workloads", "- {name: a, namespace: n, workloadIps: [\"10.0.0.1\"]}".into(), "services"),
        ("workloads", "- {name: a, workloadIps: [], services: {}}".into(), "namespace"),
        ("workloads", "- {name: a, namespace: n, services: {}}".into(), "workloadIps"),
        ("services", "- {name: s, namespace: n, hostname: h, vips: [\"/10.96.0.1\"]}".into(), "ports"),
        ("services", format!("{S}, endpoints: {{u1: {{workloadUid: u1, port: {{}}}}}}}}"), "status"),
        ("services", format!("{S}, loadBalancer: {{routingPreferences: [], mode: Strict}}}}"), "healthPolicy"),
        // Istio's shapes, not ours of old.
        ("policies", format!("{P}, rules: [[[{{namespaces: [default]}}]]]}}"), "Exact"),
        ("policies", format!("{P}, rules: [[[{{serviceAccounts: [\"n/sa\"]}}]]]}}"), "expected mapping"),
        ("policies", format!("{P}, rules: [[[{{sourceIps: [\"10.0.0.1\"]}}]]]}}"), "write 10.0.0.1/32"),
        ("services", "- {name: s, namespace: n, hostname: h, vips: [\"10.96.0.1\"], ports: {}}".into(), "<network>/<ip>"),
        ("workloads", format!("{W}, waypoint: {{destination: nowhere, hboneMtlsPort: 15008}}}}"), "waypoint.destination"),
        ("workloads", format!("{W}, services: {{\"no-slash\": {{}}}}}}").replace("services: {}, ", ""), "<namespace>/<hostname>"),
        // Names and values are Istio's, exactly.
        ("workloads", format!("{W}, colour: red}}"), "colour"),
        ("workloads", format!("{W}, protocol: hbone}}"), "hbone"),
        ("workloads", format!("{W}, nativeTunnel: yes}}"), "expects true/false"),
        ("workloads", format!("{W}, networkMode: Host}}"), "Host"),
        ("services", format!("{S}, ipFamilies: IPV4}}"), "IPV4"),
        // Unknown keys in a match: Istio ignores them, we refuse them (a typo would
        // silently empty the match).
        ("policies", format!("{P}, rules: [[[{{notDestinationPort: [1]}}]]]}}"), "notDestinationPort"),
        // One uid, one workload.
        ("workloads", format!("{W}}}\n{W}}}"), "two workloads have the uid \"u1\""),
        ("workloads", format!("{W}}}\n{W}}}").replace("uid: u1, ", ""), "give each workload a unique uid"),
    ];
    for (section, entry, want) in table {
        let got = load_one(section, entry);
        match got {
            Err(e) => assert!(e.contains(want), "{entry}: {e}"),
            Ok(_) => panic!("{entry}: loaded, expected an error about {want}"),
        }
    }
    // The valid forms of the same entries load.
    for (section, entry) in [("workloads", W), ("services", S)] {
        load_one(section, &format!("{entry}}}")).unwrap();
    }
    load_one("policies", &format!("{P}, rules: [[[{{namespaces: [{{Exact: default}}], serviceAccounts: [{{namespace: n, serviceAccount: sa}}], sourceIps: [\"10.0.0.1/32\"]}}]]]}}")).unwrap();
}

#[test]
fn a_principal_written_with_its_scheme_loads_with_a_warning() {
    let warnings = load_one(
        "policies",
        &format!(
            "{P}, rules: [[[{{principals: [{{Exact: \"spiffe://cluster.local/ns/a/sa/b\"}}]}}]]]}}"
        ),
    )
    .unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("never matches"), "{warnings:?}");
}

#[test]
fn parse_errors_name_the_line() {
    let err = load_str(
        "c.yaml",
        "workloads:\n- name: a\n  namespace: b\n  colour: red\n",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("c.yaml: ") && err.contains("line 4") && err.contains("colour"),
        "{err}"
    );
}

/// The YAML blocks of docs/local-config.md that are local configs.
fn documented_configs() -> Vec<(usize, String)> {
    let readme = include_str!("../../docs/local-config.md");
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in readme.lines().enumerate() {
        match (&mut current, line.trim_start()) {
            (None, "```yaml") => current = Some((n + 2, String::new())),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some((_, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
        .into_iter()
        .filter(|(_, text)| {
            ["workloads:", "services:", "policies:"]
                .iter()
                .any(|k| text.lines().any(|l| l.starts_with(k)))
        })
        .collect()
}

#[test]
fn every_local_config_example_in_the_docs_loads() {
    let configs = documented_configs();
    assert!(
        !configs.is_empty(),
        "no local config example found in docs/local-config.md"
    );
    for (line, text) in configs {
        if let Err(e) = load_str("docs/local-config.md", &text, None) {
            panic!("the example at docs/local-config.md line {line} does not load: {e}");
        }
    }
}

/// `TRUST_DOMAIN` is the trust domain of the file's workloads that name none; one
/// that names its own keeps it.
#[test]
fn workloads_without_a_trust_domain_take_ztunnels() {
    use ztunnel::state::watch::load_objects;
    let yaml = "workloads:
- {uid: u1, name: a, namespace: n, serviceAccount: sa, workloadIps: [\"10.0.0.1\"], services: {}}
- {uid: u2, name: b, namespace: n, serviceAccount: sa, trustDomain: other.org, workloadIps: [\"10.0.0.2\"], services: {}}
";
    let (objects, _) = load_objects("t.yaml", yaml, "example.org").expect("loads");
    let ids: Vec<String> = objects
        .workloads
        .iter()
        .map(|w| w.workload.identity().to_string())
        .collect();
    assert_eq!(
        ids,
        [
            "spiffe://example.org/ns/n/sa/sa",
            "spiffe://other.org/ns/n/sa/sa"
        ]
    );
}

/// An IPv4 address or range written as IPv6 (`::ffff:…`) is refused, naming the form
/// to write: connections carry IPv4, so it would never match.
#[test]
fn ipv4_written_as_ipv6_is_refused_with_the_form_to_write() {
    let err = load_one(
        "workloads",
        "- {uid: u1, name: a, namespace: n, workloadIps: [\"::ffff:10.0.0.1\"], services: {}}",
    )
    .unwrap_err();
    assert!(err.contains("write 10.0.0.1"), "{err}");
    let err = load_one(
        "services",
        "- {name: s, namespace: n, hostname: s.n.svc.cluster.local, vips: [\"/::ffff:10.96.0.1\"], ports: {80: 80}}",
    )
    .unwrap_err();
    assert!(err.contains("write 10.96.0.1"), "{err}");
    let err = load_one(
        "policies",
        &format!("{P}, rules: [[[{{sourceIps: [\"::ffff:10.0.0.0/104\"]}}]]]}}"),
    )
    .unwrap_err();
    assert!(err.contains("write 10.0.0.0/8"), "{err}");
}
