//! Hardening: no plaintext for want of an endpoint, timeouts and keepalives on every
//! connection ztunnel holds, bounded HTTP servers and handshakes, and accept loops
//! that back off. Real pods, real ztunnel and agent processes. Root only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::app::{connect, echo_server, exchange};
use e2e::capture::Capture;
use e2e::cluster::{Cluster, MeshPod, AMBIENT};
use e2e::mesh_files::hbone_workloads;
use e2e::{Mesh, TestNode, Ztunnel};
use istio_cni::{Agent, Startup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_vip_without_an_endpoint_fails_instead_of_going_out_in_plaintext() {
    let node = TestNode::new(72);
    let (sleep, httpbin) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let workloads = hbone_workloads(&[&sleep, &httpbin]);
    node.write_mesh_config(&format!(
        "{workloads}services:\n- name: empty\n  namespace: ambient-demo\n  hostname: empty.ambient-demo.svc.cluster.local\n  vips: [\"/10.96.7.7\"]\n  ports: {{80: 8080}}\n"
    ));
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&sleep, &httpbin], &[]).await;
    let _echo = echo_server(&httpbin, 8080).await;
    // kube-proxy's view of the service differs from ztunnel's (its endpoints lag, or
    // a selector matches a pod the control plane does not list): the VIP DNATs to
    // httpbin. Emulated in the client pod, after the capture rules.
    sleep.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "10.96.7.7/32",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{}:8080", httpbin.ip),
    ]);
    let capture = Capture::on_host_veth(&sleep, "tcp", node.dir.path());
    let vip: SocketAddr = "10.96.7.7:80".parse().unwrap();
    let out = exchange(&sleep, vip, "vip-secret\n", T).await;
    let wire = capture.stop();
    assert!(
        out.as_ref().map_or(true, |r| !r.contains("peer=")),
        "the connection reached an app: {out:?}"
    );
    assert!(
        !wire.ascii.contains("vip-secret"),
        "plaintext on the wire:\n{}",
        wire.packets
    );
    zt.wait_for(&["no healthy upstream", "dst.addr=10.96.7.7:80"], 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_peer_is_found_by_keepalive_and_its_connection_closed() {
    let node = TestNode::new(73);
    let (sleep, server) = (node.add_pod("sleep"), node.add_pod("server"));
    let agent = Agent::start(&node.agent_config(), Startup::default())
        .await
        .unwrap();
    let zt = Ztunnel::start_with(&node, 1, |cmd| {
        cmd.env("PASSTHROUGH_ONLY", "true")
            .env("KEEPALIVE_TIME", "1s")
            .env("KEEPALIVE_INTERVAL", "1s")
            .env("KEEPALIVE_RETRIES", "2");
    });
    agent.zds().wait_for_connections(1).await;
    agent
        .enrollment()
        .enroll(&sleep.pod())
        .await
        .expect("enroll");
    let echo = echo_server(&server, 8080).await;
    let mut stream = connect(&sleep, echo.addr, T).await.expect("connect");
    let mut greeting = [0u8; 64];
    let n = stream.read(&mut greeting).await.unwrap();
    assert!(n > 0, "no greeting");
    let ss = sleep.exec(&["ss", "-tnopH", "state", "established"]);
    let upstream: Vec<&str> = ss
        .lines()
        .filter(|l| l.contains(&format!("{}:8080", server.ip)) && l.contains("ztunnel"))
        .collect();
    assert!(
        !upstream.is_empty() && upstream.iter().all(|l| l.contains("timer:(keepalive")),
        "ztunnel's upstream socket has no keepalive:\n{ss}"
    );

    // The server goes silent without a FIN or RST (its node died, a partition): every
    // packet to it is dropped. Keepalive (1s, then 2 probes 1s apart) finds it.
    server.exec(&["iptables", "-I", "INPUT", "-j", "DROP"]);
    let closed = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut greeting)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the connection to a vanished peer is still open: {closed:?}"
    );
    zt.wait_for(&["direction=\"outbound\"", "timed out"], 1)
        .await;
}

/// A peer at `pod`'s address that completes mTLS and HTTP/2 as `pod`'s identity, then
/// never answers a CONNECT: a stuck or malicious ztunnel.
async fn stuck_hbone_peer(node: &TestNode, pod: &e2e::TestPod) -> tokio::task::JoinHandle<()> {
    use ztunnel::identity::{ca::LocalCa, manager::CertManager, Identity};
    let files = node.mesh_files();
    let ca = LocalCa::from_files(&files.ca_cert, &files.ca_key).expect("test CA");
    let certs = CertManager::new(
        Arc::new(ca),
        Duration::from_secs(3600),
        ztunnel::tls::provider(),
    );
    let cert = certs
        .get(&Identity::new(
            "cluster.local",
            e2e::mesh_files::NAMESPACE,
            &pod.name,
        ))
        .await
        .expect("peer certificate");
    let roots = cert.roots();
    let config = ztunnel::tls::server_config(cert, roots).expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = pod
        .netns()
        .run(|| -> std::io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind("0.0.0.0:15008")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .and_then(|r| r)
        .expect("bind 15008 in the peer pod");
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        let _certs = certs;
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    std::future::pending::<
                        Result<
                            hyper::Response<http_body_util::Empty<bytes::Bytes>>,
                            std::convert::Infallible,
                        >,
                    >()
                    .await
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_connect_is_given_up_on() {
    let node = TestNode::new(74);
    let (sleep, stuck) = (node.add_pod("sleep"), node.add_pod("stuck"));
    let workloads = hbone_workloads(&[&sleep, &stuck]);
    node.write_mesh_config(&workloads);
    // CONNECT_TIMEOUT is 2s in these tests.
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&sleep], &[]).await;
    let _peer = stuck_hbone_peer(&node, &stuck).await;

    let mut stream = connect(&sleep, SocketAddr::new(stuck.ip, 8080), T)
        .await
        .expect("the app's connect succeeds (to ztunnel)");
    let _ = stream.write_all(b"hello\n").await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the app's connection hangs on a peer that never answers: {closed:?}"
    );
    zt.wait_for(&["timed out: the CONNECT response"], 1).await;
}

/// Connections that each send one byte a second and never finish their request.
struct Slowloris {
    open: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Slowloris {
    async fn start(targets: &[SocketAddr], per_target: usize) -> Slowloris {
        Self::start_from(None, targets, per_target).await
    }

    /// Like [`Slowloris::start`], each connection from `source` (another peer than
    /// the one probing).
    async fn start_from(
        source: Option<std::net::IpAddr>,
        targets: &[SocketAddr],
        per_target: usize,
    ) -> Slowloris {
        let open = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for target in targets {
            for _ in 0..per_target {
                let connect = async {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    if let Some(ip) = source {
                        socket.bind(SocketAddr::new(ip, 0))?;
                    }
                    socket.connect(*target).await
                };
                let Ok(Ok(mut stream)) = tokio::time::timeout(T, connect).await else {
                    continue; // refused or dropped at once: that is fine too
                };
                open.fetch_add(1, Ordering::SeqCst);
                let open = open.clone();
                tasks.push(tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    loop {
                        tokio::select! {
                            r = stream.read(&mut buf) => match r {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            },
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                                if stream.write_all(b"G").await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                }));
            }
        }
        Slowloris { open, tasks }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Slowloris {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_off_and_cannot_exhaust_file_descriptors() {
    let cluster = Cluster::new(75, true).await;
    cluster.namespace("demo", &[AMBIENT]);
    let httpbin = cluster.add_pod("demo", "httpbin", &[]);
    cluster
        .push_mesh(
            &[MeshPod {
                namespace: "demo",
                name: "httpbin",
                ips: httpbin.ips.clone(),
            }],
            None,
        )
        .await;
    let agent = cluster.start_agent_with(1, |cmd| {
        cmd.env("HTTP_HEADER_READ_TIMEOUT", "2")
            .env("HTTP_MAX_CONNECTIONS", "16");
    });
    let zt = Ztunnel::start_mesh(
        &cluster.node,
        1,
        &[
            ("HBONE_HANDSHAKE_TIMEOUT", "2s"),
            ("HBONE_MAX_HANDSHAKES", "32"),
            ("HTTP_HEADER_READ_TIMEOUT", "2s"),
            ("HTTP_MAX_CONNECTIONS", "16"),
        ],
    );
    cluster
        .wait_annotation(&httpbin, Some("enabled"), &agent)
        .await;
    let readiness = zt.readiness_addr().await;
    let readyz = agent
        .listening_addr("readiness endpoint /readyz listening")
        .await;
    // Every other endpoint of both binaries, served by the same HTTP module.
    let admin = zt.admin_addr().await;
    let stats = zt.listening_addr("stats endpoint listening").await;
    let monitoring = agent.listening_addr("monitoring endpoint listening").await;
    let hbone = SocketAddr::new(httpbin.ip, 15008);
    let (zt_fds, agent_fds) = (zt.open_fds(), agent.open_fds());

    let attack = Slowloris::start(&[hbone, readiness, readyz, admin, stats, monitoring], 150).await;
    let (mut zt_peak, mut agent_peak) = (0, 0);
    for _ in 0..12 {
        zt_peak = zt_peak.max(zt.open_fds());
        agent_peak = agent_peak.max(agent.open_fds());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // At most the handshake cap on 15008 and the connection cap on each of readiness,
    // admin and stats (plus a margin for what ztunnel opens meanwhile); for the agent,
    // its connection cap on readiness and on monitoring.
    assert!(
        zt_peak <= zt_fds + 32 + 3 * 16 + 16,
        "ztunnel went from {zt_fds} to {zt_peak} open fds"
    );
    assert!(
        agent_peak <= agent_fds + 2 * 16 + 8,
        "the agent went from {agent_fds} to {agent_peak} open fds"
    );
    // The timeouts (2 s) cut off every slow client.
    let deadline = Instant::now() + Duration::from_secs(15);
    while attack.open() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} slow connections are still open",
            attack.open()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(attack);
    assert_eq!(zt.readiness().await, 200, "readiness still answers");
    assert_eq!(e2e::http_get(admin, "/config_dump").await.0, 200);
    assert_eq!(e2e::http_get(stats, "/metrics").await.0, 200);
    assert_eq!(e2e::http_get(monitoring, "/metrics").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_out_of_file_descriptors_backs_off_instead_of_spinning() {
    let cluster = Cluster::new(76, false).await;
    let agent = cluster.start_agent(1);
    let socket = cluster.node.dir.path().join("pluginevent.sock");
    e2e::until("the plugin socket exists", || socket.exists()).await;
    // The agent may open only a few more files than it has now.
    let limit = agent.open_fds() + 12;
    e2e::sh(
        "prlimit",
        &[
            "--pid",
            &agent.pid().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ],
    );
    // Plugin clients that connect and say nothing: the agent accepts them until it is
    // out of fds; the rest wait in the backlog and every accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..40 {
        if let Ok(s) = tokio::net::UnixStream::connect(&socket).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = agent.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = agent.cpu_seconds() - before;
    assert!(
        used < 0.5,
        "the agent burned {used:.2} CPU-seconds in 2 s with its fds exhausted: an accept loop spins"
    );
    assert!(agent.logs().contains("accept failed"), "{}", agent.logs());
    drop(held);
}

/// 200 slow clients from one address (a pod trickling its request headers) hold at
/// most that peer's share of each endpoint: the kubelet's probe, from another address,
/// is answered while they hang on (with one global cap they took every slot, the probe
/// was refused and the node went NotReady).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_slow_clients_of_one_peer_cannot_starve_the_readiness_probe() {
    let cluster = Cluster::new(39, false).await;
    // A primary network for the agent to chain onto: it is ready once it has.
    let conf_dir = cluster.node.dir.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::write(
        conf_dir.join("10-bridge.conflist"),
        "{\"cniVersion\":\"1.0.0\",\"name\":\"pods\",\"plugins\":[{\"type\":\"bridge\"}]}",
    )
    .unwrap();
    let agent = cluster.start_agent(1);
    let zt = Ztunnel::start(&cluster.node, 1);
    let readiness = zt.readiness_addr().await;
    let readyz = agent
        .listening_addr("readiness endpoint /readyz listening")
        .await;
    zt.wait_readiness(200).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while e2e::http_get(readyz, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "the agent never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attacker = "127.0.0.2".parse().unwrap();
    let attack = Slowloris::start_from(Some(attacker), &[readiness, readyz], 200).await;
    assert!(attack.open() > 0, "no slow client got in at all");
    // Within the header deadline (5 s): every slow client still holds its connection.
    for _ in 0..3 {
        let probe = tokio::time::timeout(T, e2e::http_get(readiness, "/healthz/ready"));
        assert_eq!(
            probe.await.expect("ztunnel's probe answered").0,
            200,
            "ztunnel's readiness probe is refused while one peer holds slow connections"
        );
        let probe = tokio::time::timeout(T, e2e::http_get(readyz, "/readyz"));
        assert_eq!(
            probe.await.expect("the agent's probe answered").0,
            200,
            "the agent's readiness probe is refused while one peer holds slow connections"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(attack);
}

/// The agent runs on the host network: what lists every pod on the node is served on
/// loopback only (not on the monitoring port, and a non-loopback DEBUG_ADDR is
/// refused), and a port it cannot bind stops it instead of leaving the kubelet's probe
/// to ask another program.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_pod_inventory_on_loopback_only_and_a_taken_port_stops_it() {
    let cluster = Cluster::new(47, false).await;
    let agent = cluster.start_agent(1);
    let monitoring = agent.listening_addr("monitoring endpoint listening").await;
    let debug = agent.listening_addr("debug endpoint listening").await;
    assert!(debug.ip().is_loopback(), "{debug}");
    assert_eq!(e2e::http_get(monitoring, "/debug/enrollment").await.0, 404);
    assert_eq!(e2e::http_get(monitoring, "/metrics").await.0, 200);
    assert_eq!(e2e::http_get(debug, "/debug/enrollment").await.0, 200);
    drop(agent);

    let exits_with = |mut agent: e2e::AgentProcess| async move {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(code) = agent.exit_code() {
                return (code, agent.logs());
            }
            assert!(
                Instant::now() < deadline,
                "the agent kept running: {}",
                agent.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (code, logs) = exits_with(cluster.start_agent_with(2, |cmd| {
        cmd.env("DEBUG_ADDR", "0.0.0.0:0");
    }))
    .await;
    assert_eq!(code, 1, "{logs}");
    assert!(
        logs.contains("DEBUG_ADDR 0.0.0.0:0 is not a loopback address"),
        "{logs}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, logs) = exits_with(cluster.start_agent_with(3, |cmd| {
        cmd.env("AGENT_READINESS_ADDR", format!("127.0.0.1:{port}"));
    }))
    .await;
    assert_eq!(code, 1, "{logs}");
    assert!(
        logs.contains(&format!("readiness endpoint /readyz on 127.0.0.1:{port}")),
        "{logs}"
    );
}

/// A plugin request naming the node's own network namespace (the node's init
/// process's, or the agent's, which runs on the host network) is refused: no
/// redirection rules land on the node and ztunnel gets no listeners on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_own_network_namespace_is_never_enrolled() {
    let cluster = Cluster::new(99, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let _agent = cluster.start_agent(1);
    let _zt = cluster.start_ztunnel(1);
    e2e::zds_listening(&cluster.node.zds_socket()).await;
    // The init process's may not even open for the agent's capabilities: refused
    // either way; the agent's own opens, and is refused for what it is.
    for (netns, why) in [
        ("/proc/1/ns/net", ""),
        ("/proc/self/ns/net", "the node's own network namespace"),
    ] {
        let answer = cluster
            .plugin_request(serde_json::json!({
                "version": 1, "command": "add", "podName": "p", "podNamespace": "demo",
                "podUid": "u-node", "serviceAccount": "sa", "netns": netns,
            }))
            .await;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            !error.is_empty() && error.contains(why),
            "{netns}: {answer}"
        );
    }
    let host_rules = e2e::sh("iptables-save", &[]);
    assert!(
        !host_rules.contains("ISTIO_PRERT") && !host_rules.contains("ISTIO_OUTPUT"),
        "redirection rules on the node:\n{host_rules}"
    );
}

/// The plugin socket is root's (0600) and, whatever its mode lets through, the agent
/// answers only root or its own user: another user gets no answer and the attempt is
/// logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_socket_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::new(100, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let agent = cluster.start_agent(1);
    let socket = cluster.node.dir.path().join("pluginevent.sock");
    e2e::until("the plugin socket exists", || socket.exists()).await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Opened up (a careless hostPath, a changed mode): the peer check still holds.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(
        cluster.node.dir.path(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // A client running as nobody (65534): only this thread changes user (the raw
    // syscall, not libc's wrapper, which would change every thread of the test).
    let path = socket.clone();
    let answer = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Write};
        // SAFETY: setresuid takes three integers and touches no memory; called
        // through syscall(2) it changes only this thread's credentials, and this
        // thread ends right after.
        let r = unsafe { nix::libc::syscall(nix::libc::SYS_setresuid, 65534, 65534, 65534) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut s = std::os::unix::net::UnixStream::connect(&path)?;
        s.write_all(
            br#"{"version":1,"command":"add","podName":"p","podNamespace":"demo","podUid":"u","serviceAccount":"sa","netns":"/proc/self/ns/net"}"#,
        )?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)?;
        Ok(reply)
    })
    .join()
    .expect("the client thread");
    // Closed without an answer (reset, as the agent never read the request).
    let refused = match &answer {
        Ok(reply) => reply.is_empty(),
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    };
    assert!(refused, "another user got an answer: {answer:?}");
    agent
        .wait_for(
            &[
                "refusing a plugin request from an unexpected user",
                "uid=65534",
            ],
            1,
        )
        .await;
}

/// One pod may hold at most POD_MAX_CONNECTIONS proxied connections: the next is
/// refused at once (closed), logged with the setting's name and counted; a closed
/// connection gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_over_its_connection_cap_is_refused_and_the_refusal_logged_and_counted() {
    use tokio::io::AsyncBufReadExt;
    let node = TestNode::new(101);
    let (sleep, httpbin) = (node.add_pod("sleep"), node.add_pod("httpbin"));
    let workloads = hbone_workloads(&[&sleep, &httpbin]);
    node.write_mesh_config(&workloads);
    let Mesh {
        agent: _agent,
        ztunnel: zt,
    } = Mesh::start_in_mesh(&node, &[&sleep, &httpbin], &[("POD_MAX_CONNECTIONS", "3")]).await;
    let echo = echo_server(&httpbin, 8080).await;
    // Each held connection has its greeting: it reached the app.
    let mut held = Vec::new();
    for _ in 0..3 {
        let s = connect(&sleep, echo.addr, T).await.expect("connect");
        let mut s = tokio::io::BufReader::new(s);
        let mut line = String::new();
        s.read_line(&mut line).await.expect("greeting");
        assert!(line.starts_with("peer="), "{line:?}");
        held.push(s);
    }
    // The fourth from the pod is refused: accepted by the kernel, closed by ztunnel.
    let fourth = connect(&sleep, echo.addr, T).await.expect("connect");
    let mut fourth = tokio::io::BufReader::new(fourth);
    let mut line = String::new();
    let read = tokio::time::timeout(T, fourth.read_line(&mut line)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a fourth connection was proxied: {read:?} {line:?}"
    );
    zt.wait_for(
        &[
            "refused: the pod has 3 proxied connections open",
            "POD_MAX_CONNECTIONS",
        ],
        1,
    )
    .await;
    let metrics = zt.metrics().await;
    assert!(
        metrics.contains("workload_manager_connections_refused_total 1"),
        "{metrics}"
    );
    // One closed: its place is free again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = connect(&sleep, echo.addr, T).await.expect("connect");
        let mut s = tokio::io::BufReader::new(s);
        let mut line = String::new();
        if matches!(
            tokio::time::timeout(T, s.read_line(&mut line)).await,
            Ok(Ok(n)) if n > 0
        ) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was never given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
