//! The data path on loopback, without root: pod proxies whose sockets a [`Loopback`]
//! factory makes in the test's own netns. It stands in for the pod network: the
//! listeners bind free loopback ports, a client says where its connection was meant
//! to go (what nat or TPROXY would have told), and the pods' addresses (10.0.0.x) are
//! routed to loopback servers. The kernel's part (rules, marks, transparent sockets)
//! stays with the root e2e tests.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::zds::WorkloadInfo;
use protocol::WorkloadUid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::seam::{BoxFuture, SocketFactory, Upstream};
use super::socket::ListenerOpts;
use super::*;
use crate::identity::ca::LocalCa;
use crate::state::policy::{Action, Match, Policy, Scope};
use crate::state::{MeshState, StateBuilder, Workload};

/// A pod's sockets on loopback.
#[derive(Default)]
struct Loopback {
    /// The pod's three listeners: outbound, inbound plaintext, HBONE.
    listening: Mutex<Vec<SocketAddr>>,
    /// A pod-network address → the loopback address serving it.
    routes: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// A client's port → where its connection was meant to go.
    meant: Mutex<HashMap<u16, SocketAddr>>,
    /// Every address the proxy connected to, as it asked for it.
    connects: Mutex<Vec<SocketAddr>>,
}

impl Loopback {
    fn port(&self, direction: Direction) -> SocketAddr {
        let i = match direction {
            Direction::Outbound => 0,
            Direction::InboundPlaintext => 1,
            Direction::InboundHbone => 2,
        };
        self.listening.lock().unwrap()[i]
    }

    fn route(&self, from: SocketAddr, to: SocketAddr) {
        self.routes.lock().unwrap().insert(from, to);
    }

    fn connects_to(&self, dest: SocketAddr) -> usize {
        let connects = self.connects.lock().unwrap();
        connects.iter().filter(|d| **d == dest).count()
    }

    /// A client connection to the listener of `direction`, meant for `dest`.
    async fn client(&self, direction: Direction, dest: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        self.meant.lock().unwrap().insert(port, dest);
        socket.connect(self.port(direction)).await.unwrap()
    }
}

impl SocketFactory for Loopback {
    fn make_there(&self, make: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()> {
        make()
    }

    fn listeners(
        &self,
        _ipv6: bool,
        _specs: [(u16, ListenerOpts); 3],
    ) -> io::Result<[std::net::TcpListener; 3]> {
        let bind = || -> io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let all = [bind()?, bind()?, bind()?];
        let mut listening = self.listening.lock().unwrap();
        for l in &all {
            listening.push(l.local_addr()?);
        }
        Ok(all)
    }

    fn connect(
        &self,
        dest: SocketAddr,
        _how: Upstream,
        timeout: Duration,
    ) -> BoxFuture<io::Result<TcpStream>> {
        self.connects.lock().unwrap().push(dest);
        let real = self.routes.lock().unwrap().get(&dest).copied();
        Box::pin(async move {
            let real = real.ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))?;
            tokio::time::timeout(timeout, TcpStream::connect(real))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
        })
    }

    fn destination(&self, stream: &TcpStream, _direction: Direction) -> io::Result<SocketAddr> {
        let port = stream.peer_addr()?.port();
        let meant = self.meant.lock().unwrap().get(&port).copied();
        meant.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}

/// An app: echoes what it reads until the client's FIN, then says how many bytes it
/// got and closes. Counts its connections.
async fn app() -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            *count.lock().unwrap() += 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut total = 0;
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n;
                            if conn.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = conn.write_all(format!("[{total}]").as_bytes()).await;
            });
        }
    });
    (addr, accepted)
}

const A_IP: [u8; 4] = [10, 0, 0, 1];
const B_IP: [u8; 4] = [10, 0, 0, 2];

fn at(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from(ip), port)
}

fn workload(name: &str, ip: [u8; 4]) -> Arc<Workload> {
    Arc::new(Workload {
        uid: name.into(),
        name: name.into(),
        namespace: "ns".into(),
        trust_domain: "cluster.local".into(),
        service_account: format!("sa-{name}"),
        ips: vec![IpAddr::from(ip)],
        node: "node-1".into(),
        protocol: crate::state::Protocol::Hbone,
        ..Workload::default()
    })
}

/// Two mesh workloads on this node, `a` (10.0.0.1) and `b` (10.0.0.2), and `policies`.
fn state(policies: Vec<Policy>) -> MeshState {
    let mut b = StateBuilder::new(Some("node-1".into()));
    b.workload_with(workload("a", A_IP), vec![]).unwrap();
    b.workload_with(workload("b", B_IP), vec![]).unwrap();
    for p in policies {
        b.policy(Arc::new(p)).unwrap();
    }
    b.build().unwrap()
}

/// A DENY policy for namespace `ns` on the destination port `port`.
fn deny_port(port: u16) -> Policy {
    Policy {
        name: format!("deny-{port}"),
        namespace: "ns".into(),
        scope: Scope::Namespace,
        action: Action::Deny,
        rules: vec![vec![vec![Match {
            destination_ports: vec![port],
            ..Match::default()
        }]]],
        dry_run: false,
    }
}

/// The mesh of [`state`] without policies, and a local CA.
fn mesh(hbone: HboneConfig) -> Arc<MeshConfig> {
    let (cert, key) = LocalCa::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
    let ca = LocalCa::from_pem(&cert, &key).unwrap();
    Arc::new(MeshConfig {
        store: crate::state::Store::new(state(vec![])),
        certs: crate::identity::manager::CertManager::new(
            Arc::new(ca),
            Duration::from_secs(3600),
            crate::tls::provider(),
        ),
        hbone,
        pod_wait: Duration::from_secs(2),
    })
}

/// A pod's proxy on loopback, with its own metrics and connection table.
struct Pod {
    proxy: PodProxy,
    sockets: Arc<Loopback>,
    cfg: Arc<ProxyConfig>,
}

impl Pod {
    async fn start(name: &str, mesh: Option<Arc<MeshConfig>>, max_connections: usize) -> Pod {
        let cfg = Arc::new(ProxyConfig {
            mark: 0,
            reuse_port: false,
            drain_grace: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            ipv6: false,
            keepalive: None,
            mesh: mesh.clone(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            connections: Arc::default(),
            max_connections_per_pod: max_connections,
        });
        let info = WorkloadInfo {
            name: name.into(),
            namespace: "ns".into(),
            service_account: format!("sa-{name}"),
        };
        let sockets = Arc::new(Loopback::default());
        let ctx = PodContext {
            uid: WorkloadUid::new(name),
            mesh: mesh.map(|m| PodMesh::new(m, info.clone())),
            info,
            sockets: sockets.clone(),
            budget: budget::Budget::new(max_connections),
            cfg: cfg.clone(),
        };
        let proxy = PodProxy::start(ctx).await.unwrap();
        Pod {
            proxy,
            sockets,
            cfg,
        }
    }

    fn pool(&self) -> &pool::Pool {
        &self.proxy.ctx.mesh.as_ref().unwrap().pool
    }

    /// The sum of metric `name` over the lines whose labels contain every one of
    /// `labels`.
    fn metric(&self, name: &str, labels: &[&str]) -> u64 {
        self.cfg
            .metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

/// Writes `msg`, closes the write half, and reads until the proxy closes.
async fn exchange(mut conn: TcpStream, msg: &[u8]) -> String {
    conn.write_all(msg).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got))
        .await
        .expect("the proxy closes the connection")
        .unwrap_or_default();
    String::from_utf8_lossy(&got).into_owned()
}

/// Waits (up to 10 s) until `cond` holds: state, not time.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// Pod `a` without a mesh (at most `max` connections), and an app outside the mesh
/// at the address returned.
async fn outside_the_mesh(max: usize) -> (Pod, SocketAddr, Arc<Mutex<usize>>) {
    let a = Pod::start("a", None, max).await;
    let (app, accepted) = app().await;
    let dest = "203.0.113.9:80".parse().unwrap();
    a.sockets.route(dest, app);
    (a, dest, accepted)
}

#[tokio::test]
async fn outbound_passthrough_relays_a_half_closed_connection_and_counts_its_bytes() {
    let (a, dest, accepted) = outside_the_mesh(16).await;
    let conn = a.sockets.client(Direction::Outbound, dest).await;
    // The client's FIN reaches the app, whose reply still comes back after it.
    assert_eq!(exchange(conn, b"hello").await, "hello[5]");
    assert_eq!(*accepted.lock().unwrap(), 1);
    assert_eq!(a.sockets.connects_to(dest), 1);
    until("the connection is closed and listed no more", || {
        a.cfg.connections.list().is_empty()
    })
    .await;
    let source = "reporter=\"source\"";
    assert_eq!(a.metric("istio_tcp_connections_opened_total", &[source]), 1);
    assert_eq!(a.metric("istio_tcp_connections_closed_total", &[source]), 1);
    assert_eq!(a.metric("istio_tcp_received_bytes_total", &[source]), 5);
    assert_eq!(a.metric("istio_tcp_sent_bytes_total", &[source]), 8);
    assert_eq!(a.metric("istio_tcp_connections_failed_total", &[]), 0);
}

#[tokio::test]
async fn outbound_refuses_a_connection_aimed_at_ztunnel_itself() {
    let a = Pod::start("a", None, 16).await;
    for port in [INBOUND_HBONE_PORT, OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT] {
        let conn = a.sockets.client(Direction::Outbound, at(B_IP, port)).await;
        assert_eq!(exchange(conn, b"x").await, "", "port {port}");
    }
    // Nor one made straight to the outbound listener (its own original destination).
    let own = a.sockets.port(Direction::Outbound);
    let conn = a.sockets.client(Direction::Outbound, own).await;
    assert_eq!(exchange(conn, b"x").await, "");
    assert!(a.sockets.connects.lock().unwrap().is_empty());
    assert_eq!(a.metric("istio_tcp_connections_failed_total", &[]), 4);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_connect_failure() {
    let a = Pod::start("a", None, 16).await;
    let nowhere = "203.0.113.9:81".parse().unwrap();
    let conn = a.sockets.client(Direction::Outbound, nowhere).await;
    assert_eq!(exchange(conn, b"x").await, "");
    assert_eq!(a.sockets.connects_to(nowhere), 1);
    let flags = "response_flags=\"CONNECT\"";
    until("the failure is counted", || {
        a.metric("istio_tcp_connections_failed_total", &[flags]) == 1
    })
    .await;
}

#[tokio::test]
async fn a_pod_over_its_connection_cap_is_refused_until_one_closes() {
    let (a, dest, _) = outside_the_mesh(1).await;
    let mut held = a.sockets.client(Direction::Outbound, dest).await;
    held.write_all(b"1").await.unwrap();
    let mut echo = [0u8; 1];
    held.read_exact(&mut echo).await.unwrap();
    let refused = a.sockets.client(Direction::Outbound, dest).await;
    assert_eq!(exchange(refused, b"2").await, "");
    let flags = "response_flags=\"OVERFLOW\"";
    assert_eq!(a.metric("istio_tcp_connections_failed_total", &[flags]), 1);
    assert_eq!(exchange(held, b"").await, "[1]");
    until("the share is given back", || a.proxy.ctx.budget.open() == 0).await;
    let again = a.sockets.client(Direction::Outbound, dest).await;
    assert_eq!(exchange(again, b"3").await, "3[1]");
}

#[tokio::test]
async fn inbound_plaintext_reaches_the_app_and_is_listed_while_open() {
    let b = Pod::start("b", Some(mesh(HboneConfig::default())), 16).await;
    let (app, _) = app().await;
    let dest = at(B_IP, 80);
    b.sockets.route(dest, app);
    let mut conn = b.sockets.client(Direction::InboundPlaintext, dest).await;
    conn.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    conn.read_exact(&mut echo).await.unwrap();
    let listed = b.cfg.connections.list();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].inbound);
    assert_eq!(listed[0].original_dst, dest);
    assert_eq!(listed[0].uid, WorkloadUid::new("b"));
    assert_eq!(exchange(conn, b"").await, "[4]");
    until("the connection is listed no more", || {
        b.cfg.connections.list().is_empty()
    })
    .await;
    let labels = [
        "reporter=\"destination\"",
        "destination_workload_namespace=\"ns\"",
        "connection_security_policy=\"unknown\"",
    ];
    assert_eq!(b.metric("istio_tcp_received_bytes_total", &labels), 4);
}

/// Pods `a` and `b` in one mesh, `b`'s 15008 and app (ports 80 and 81) reachable
/// from `a`.
async fn two_pods(hbone: HboneConfig) -> (Pod, Pod, Arc<Mutex<usize>>) {
    let mesh = mesh(hbone);
    let a = Pod::start("a", Some(mesh.clone()), 16).await;
    let b = Pod::start("b", Some(mesh), 16).await;
    let (app, accepted) = app().await;
    a.sockets.route(
        at(B_IP, INBOUND_HBONE_PORT),
        b.sockets.port(Direction::InboundHbone),
    );
    b.sockets.route(at(B_IP, 80), app);
    b.sockets.route(at(B_IP, 81), app);
    (a, b, accepted)
}

#[tokio::test]
async fn outbound_to_a_mesh_pod_goes_over_hbone_proving_both_identities() {
    let (a, b, accepted) = two_pods(HboneConfig::default()).await;
    let conn = a.sockets.client(Direction::Outbound, at(B_IP, 80)).await;
    assert_eq!(exchange(conn, b"secret").await, "secret[6]");
    assert_eq!(*accepted.lock().unwrap(), 1);
    // a reached b's 15008, never the app's port in the clear.
    assert_eq!(a.sockets.connects_to(at(B_IP, INBOUND_HBONE_PORT)), 1);
    assert_eq!(a.sockets.connects_to(at(B_IP, 80)), 0);
    let mtls = "connection_security_policy=\"mutual_tls\"";
    let client_side = [
        "reporter=\"source\"",
        mtls,
        "source_principal=\"spiffe://cluster.local/ns/ns/sa/sa-a\"",
        "destination_principal=\"spiffe://cluster.local/ns/ns/sa/sa-b\"",
    ];
    let server_side = [
        "reporter=\"destination\"",
        mtls,
        "source_principal=\"spiffe://cluster.local/ns/ns/sa/sa-a\"",
        "destination_principal=\"spiffe://cluster.local/ns/ns/sa/sa-b\"",
    ];
    until("both sides counted the bytes", || {
        a.metric("istio_tcp_received_bytes_total", &client_side) == 6
            && b.metric("istio_tcp_received_bytes_total", &server_side) == 6
    })
    .await;
}

#[tokio::test]
async fn the_pool_reuses_a_connection_and_opens_another_when_one_is_full() {
    let hbone = HboneConfig {
        max_streams_per_connection: 2,
        ..HboneConfig::default()
    };
    let (a, _b, accepted) = two_pods(hbone).await;
    for i in 0..3 {
        let conn = a.sockets.client(Direction::Outbound, at(B_IP, 80)).await;
        assert_eq!(exchange(conn, b"x").await, "x[1]", "connection {i}");
    }
    assert_eq!(
        a.pool().opened.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Three at once: two streams fill the first connection, the third opens another.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = a.sockets.client(Direction::Outbound, at(B_IP, 80)).await;
        conn.write_all(b"y").await.unwrap();
        let mut echo = [0u8; 1];
        conn.read_exact(&mut echo).await.unwrap();
        held.push(conn);
    }
    assert_eq!(
        a.pool().opened.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(a.sockets.connects_to(at(B_IP, INBOUND_HBONE_PORT)), 2);
    assert_eq!(*accepted.lock().unwrap(), 6);
}

#[tokio::test]
async fn an_idle_pool_connection_is_not_reused() {
    let hbone = HboneConfig {
        idle_timeout: Duration::ZERO,
        ..HboneConfig::default()
    };
    let (a, _b, _) = two_pods(hbone).await;
    for _ in 0..2 {
        let conn = a.sockets.client(Direction::Outbound, at(B_IP, 80)).await;
        assert_eq!(exchange(conn, b"x").await, "x[1]");
        until("the stream is done", || a.cfg.connections.list().is_empty()).await;
    }
    assert_eq!(
        a.pool().opened.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn hbone_without_a_mesh_is_closed_never_passed_on() {
    let b = Pod::start("b", None, 16).await;
    let (app, accepted) = app().await;
    b.sockets.route(at(B_IP, 80), app);
    let conn = b
        .sockets
        .client(Direction::InboundHbone, at(B_IP, 80))
        .await;
    assert_eq!(exchange(conn, b"GET / HTTP/1.1\r\n\r\n").await, "");
    assert_eq!(*accepted.lock().unwrap(), 0);
    assert!(b.sockets.connects.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_denied_connect_never_reaches_the_app() {
    let (a, b, accepted) = two_pods(HboneConfig::default()).await;
    let mesh = b.cfg.mesh.clone().unwrap();
    mesh.store.replace(state(vec![deny_port(81)]));
    let conn = a.sockets.client(Direction::Outbound, at(B_IP, 81)).await;
    assert_eq!(exchange(conn, b"x").await, "");
    assert_eq!(*accepted.lock().unwrap(), 0);
    assert_eq!(b.sockets.connects_to(at(B_IP, 81)), 0);
    let denied = ["reporter=\"destination\"", "response_flags=\"DENY\""];
    assert_eq!(b.metric("istio_tcp_connections_failed_total", &denied), 1);
    // Another port is still allowed.
    let conn = a.sockets.client(Direction::Outbound, at(B_IP, 80)).await;
    assert_eq!(exchange(conn, b"x").await, "x[1]");
}

#[tokio::test]
async fn a_policy_pushed_while_a_connection_is_open_closes_it() {
    let (a, b, _) = two_pods(HboneConfig::default()).await;
    let mut conn = a.sockets.client(Direction::Outbound, at(B_IP, 80)).await;
    conn.write_all(b"1").await.unwrap();
    let mut echo = [0u8; 1];
    conn.read_exact(&mut echo).await.unwrap();
    let mesh = b.cfg.mesh.clone().unwrap();
    mesh.store.replace(state(vec![deny_port(80)]));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest));
    assert!(closed.await.is_ok(), "the connection is closed");
    assert!(rest.is_empty(), "{rest:?}");
    let denied = ["reporter=\"destination\"", "response_flags=\"DENY\""];
    until("the denial is counted", || {
        b.metric("istio_tcp_connections_closed_total", &denied) == 1
    })
    .await;
}

#[tokio::test]
async fn an_endpoint_known_by_hostname_only_is_resolved_and_reached() {
    use crate::state::service::{Endpoint, Service};
    use crate::state::workload::HealthStatus;
    use crate::state::NamespacedHostname;
    let (app, accepted) = app().await;
    // A service at 10.96.0.9:80 whose one endpoint, outside the mesh, is known by its
    // hostname only (a ServiceEntry with DNS resolution): `localhost`, at the app's
    // port.
    let mesh = mesh(HboneConfig::default());
    let mut b = StateBuilder::new(Some("node-1".into()));
    b.workload_with(workload("a", A_IP), vec![]).unwrap();
    let key = NamespacedHostname::new("ns", "ext.example.com");
    let endpoint = Endpoint {
        workload_uid: "ext".into(),
        port: Default::default(),
        status: HealthStatus::Healthy,
    };
    let external = Workload {
        uid: "ext".into(),
        name: "ext".into(),
        namespace: "ns".into(),
        hostname: "localhost".into(),
        ..Workload::default()
    };
    b.workload_with(Arc::new(external), vec![(key, endpoint)])
        .unwrap();
    b.service(Arc::new(Service {
        name: "ext".into(),
        namespace: "ns".into(),
        hostname: "ext.example.com".into(),
        vips: vec!["/10.96.0.9".parse().unwrap()],
        ports: [(80, app.port())].into(),
        ..Service::default()
    }))
    .unwrap();
    mesh.store.replace(b.build().unwrap());
    let a = Pod::start("a", Some(mesh), 16).await;
    a.sockets.route(app, app);
    let vip = "10.96.0.9:80".parse().unwrap();
    let conn = a.sockets.client(Direction::Outbound, vip).await;
    assert_eq!(exchange(conn, b"x").await, "x[1]");
    assert_eq!(*accepted.lock().unwrap(), 1);
    // Reached at the address its hostname resolved to, in plain TCP (not in the mesh).
    assert_eq!(a.sockets.connects_to(app), 1);
    let labels = [
        "destination_workload=\"unknown\"",
        "connection_security_policy=\"unknown\"",
    ];
    until("the connection is counted", || {
        a.metric("istio_tcp_connections_closed_total", &labels) == 1
    })
    .await;
}
