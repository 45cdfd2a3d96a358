//! `cargo xtask chaos`: the fault matrix. A node with two enrolled dual-stack pods
//! (`client`, `server`) and a pod outside the mesh (`outside`); the agent in
//! Kubernetes mode behind the API test server; ztunnel fed by the control-plane test
//! server (xDS and CA); a prober ([`prober`]) running mesh→mesh over each family,
//! mesh→non-mesh, non-mesh→mesh and a long-lived connection while one fault at a time
//! is injected ([`Fault`]). Per fault: connections attempted / succeeded / failed,
//! mesh payload bytes seen in plaintext on the client's host-side veth, inbound
//! connections that reached the server's app without passing ztunnel, the time until
//! traffic flows again, crashed processes, and what was left behind ([`report`]).

pub mod prober;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::app::{echo_server, EchoServer};
use e2e::capture::Capture;
use e2e::cluster::{Cluster, KubePod, AMBIENT};
use e2e::node::normalize_save;
use e2e::observe::{SPEC6_SAVE, SPEC_SAVE};
use e2e::{AgentProcess, Ztunnel};
use prober::{addr_of, Flow, Prober, SECRET};
use report::Row;
use standins::controlplane::{ControlPlane, ADDRESS_TYPE};

/// Workload certificates live this long, so that the control plane can be down for
/// longer than a certificate's remaining life within the run.
const CERT_TTL: Duration = Duration::from_secs(6);
/// How long recovery may take before the fault counts as never recovered.
const SETTLE: Duration = Duration::from_secs(30);
const SUBNET_INDEX: u8 = 210;

/// One fault, injected and undone (processes restarted, servers back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    ZtunnelKill,
    AgentKill,
    BothKill,
    ZtunnelUpgrade,
    AgentUpgrade,
    ApiWatchCut,
    ApiErrors,
    ApiDown,
    ControlPlaneStreamCut,
    ControlPlaneDownPastCertLife,
    ConflistOverwritten,
    ConflistDeleted,
    RouteDeleted,
    MalformedInput,
    CaptureRuleDeleted,
}

impl Fault {
    pub const ALL: [Fault; 15] = [
        Fault::ZtunnelKill,
        Fault::AgentKill,
        Fault::BothKill,
        Fault::ZtunnelUpgrade,
        Fault::AgentUpgrade,
        Fault::ApiWatchCut,
        Fault::ApiErrors,
        Fault::ApiDown,
        Fault::ControlPlaneStreamCut,
        Fault::ControlPlaneDownPastCertLife,
        Fault::ConflistOverwritten,
        Fault::ConflistDeleted,
        Fault::RouteDeleted,
        Fault::MalformedInput,
        Fault::CaptureRuleDeleted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::ZtunnelKill => "ztunnel SIGKILL, restarted",
            Fault::AgentKill => "agent SIGKILL, restarted",
            Fault::BothKill => "ztunnel and agent SIGKILL at once, restarted",
            Fault::ZtunnelUpgrade => "ztunnel upgrade (new one starts, old one drains and exits)",
            Fault::AgentUpgrade => "agent upgrade (SIGTERM, new agent, same ztunnel)",
            Fault::ApiWatchCut => "Kubernetes API watches cut",
            Fault::ApiErrors => "Kubernetes API failing 30 requests while pods change",
            Fault::ApiDown => "Kubernetes API server down for 3 s (restart) while pods change",
            Fault::ControlPlaneStreamCut => "control plane stream cut (istiod restart)",
            Fault::ControlPlaneDownPastCertLife => {
                "control plane down longer than a certificate's remaining life"
            }
            Fault::ConflistOverwritten => "CNI conflist overwritten by another CNI",
            Fault::ConflistDeleted => "CNI conflist deleted, then rewritten without us",
            Fault::RouteDeleted => "policy route deleted by hand inside the server pod (NET_ADMIN)",
            Fault::MalformedInput => "malformed ZDS, plugin-event and xDS messages",
            Fault::CaptureRuleDeleted => {
                "outbound capture rule deleted by hand inside the client pod (NET_ADMIN)"
            }
        }
    }

    /// Whether the run's verdict depends on this fault's must-be-0 columns. A process
    /// with NET_ADMIN inside a pod can undo the pod's redirection itself (a capture
    /// rule, the policy route that keeps replies to ztunnel's transparent connections
    /// inside the pod): its traffic is then outside the mesh until the agent's drift
    /// repair puts it back. That window is measured and printed, but it is not
    /// something the data plane can close: the pod's owner holds the keys.
    pub fn gated(self) -> bool {
        !matches!(self, Fault::CaptureRuleDeleted | Fault::RouteDeleted)
    }
}

/// How long and how hard.
#[derive(Clone, Debug)]
pub struct Options {
    /// Times each fault is injected.
    pub rounds: u32,
    /// Probing after each fault has recovered.
    pub window: Duration,
    /// Between two connections of one flow.
    pub gap: Duration,
    pub faults: Vec<Fault>,
}

impl Options {
    /// The full matrix.
    pub fn full() -> Options {
        Options {
            rounds: 3,
            window: Duration::from_secs(3),
            gap: Duration::from_millis(5),
            faults: Fault::ALL.to_vec(),
        }
    }

    /// Each gated fault once, few probes: part of `cargo xtask test`.
    pub fn short() -> Options {
        Options {
            rounds: 1,
            window: Duration::from_millis(500),
            gap: Duration::from_millis(20),
            faults: Fault::ALL.into_iter().filter(|f| f.gated()).collect(),
        }
    }
}

/// The node under test.
pub struct World {
    pub cluster: Cluster,
    cp: ControlPlane,
    client: Arc<KubePod>,
    server: Arc<KubePod>,
    outside: Arc<KubePod>,
    agent: AgentProcess,
    zt: Ztunnel,
    starts: u32,
    conflist: PathBuf,
    _servers: Vec<EchoServer>,
    /// "panicked at" lines seen so far in the logs.
    panics: usize,
    /// Processes that did not exit when told to.
    stuck: u64,
}

impl World {
    pub async fn new() -> World {
        let cluster = Cluster::dual_stack(SUBNET_INDEX, false).await;
        cluster.namespace("demo", &[AMBIENT]);
        cluster.namespace("plain", &[]);
        // The node's primary CNI config, which install-cni chains onto.
        let conf_dir = cluster.node.dir.path().join("net.d");
        std::fs::create_dir_all(&conf_dir).expect("conf dir");
        let conflist = conf_dir.join("10-chaos.conflist");
        std::fs::write(
            &conflist,
            serde_json::to_vec_pretty(cluster.node.conflist()).expect("conflist"),
        )
        .expect("write conflist");
        let cp = cluster.node.control_plane().await;
        cp.set_cert_ttl(CERT_TTL);
        let client = Arc::new(cluster.add_pod("demo", "client", &[]));
        let server = Arc::new(cluster.add_pod("demo", "server", &[]));
        let outside = Arc::new(cluster.add_pod("plain", "outside", &[]));
        cp.push_workloads(&[client.workload("demo"), server.workload("demo")]);
        let servers = vec![
            echo_server(&server, 8080).await,
            echo_server(&outside, 8080).await,
        ];
        let agent = start_agent(&cluster, 1);
        let zt = start_ztunnel(&cluster, &cp, 1);
        let world = World {
            cluster,
            cp,
            client,
            server,
            outside,
            agent,
            zt,
            starts: 1,
            conflist,
            _servers: servers,
            panics: 0,
            stuck: 0,
        };
        world.healthy().await;
        world
    }

    /// Every flow the prober runs.
    pub fn flows(&self) -> (Vec<Flow>, Flow) {
        let flow =
            |from: &Arc<KubePod>, to: &KubePod, v6: bool, secret: bool, to_mesh: bool| Flow {
                from: from.clone(),
                to: addr_of(to, v6, 8080),
                secret,
                to_mesh,
                timed: secret && !v6,
            };
        (
            vec![
                flow(&self.client, &self.server, false, true, true),
                flow(&self.client, &self.server, true, true, true),
                flow(&self.client, &self.outside, false, false, false),
                flow(&self.outside, &self.server, false, false, true),
                flow(&self.outside, &self.server, true, false, true),
            ],
            flow(&self.client, &self.server, false, true, true),
        )
    }

    /// Waits until both mesh pods are enabled (ztunnel acked them).
    async fn healthy(&self) {
        for pod in [&self.client, &self.server] {
            self.cluster
                .wait_annotation(pod, Some("enabled"), &self.agent)
                .await;
        }
    }

    fn next(&mut self) -> u32 {
        self.starts += 1;
        self.starts
    }

    async fn inject(&mut self, fault: Fault, round: u32) {
        match fault {
            Fault::ZtunnelKill => {
                self.zt.kill();
                let n = self.next();
                self.zt = start_ztunnel(&self.cluster, &self.cp, n);
            }
            Fault::AgentKill => {
                self.agent.kill();
                let n = self.next();
                self.agent = start_agent(&self.cluster, n);
            }
            Fault::BothKill => {
                self.agent.kill();
                self.zt.kill();
                let n = self.next();
                self.agent = start_agent(&self.cluster, n);
                self.zt = start_ztunnel(&self.cluster, &self.cp, n);
            }
            Fault::ZtunnelUpgrade => {
                let n = self.next();
                let new = start_ztunnel(&self.cluster, &self.cp, n);
                new.wait_readiness(200).await;
                let mut old = std::mem::replace(&mut self.zt, new);
                old.signal_terminate();
                let deadline = Instant::now() + Duration::from_secs(15);
                while old.is_running() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if old.is_running() {
                    eprintln!("the old ztunnel did not exit after SIGTERM");
                    self.stuck += 1;
                }
            }
            Fault::AgentUpgrade => {
                self.agent.terminate();
                let n = self.next();
                self.agent = start_agent(&self.cluster, n);
            }
            Fault::ApiWatchCut => self.cluster.api.drop_watches(),
            Fault::ApiErrors => {
                self.cluster.api.fail_next(30);
                for pod in [&self.client, &self.server] {
                    self.cluster
                        .label_pod(pod, "chaos-round", Some(&round.to_string()));
                }
                // The agent goes through the failures, then the API heals.
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.cluster.api.fail_next(0);
            }
            Fault::ApiDown => {
                self.cluster.api.set_down(true);
                for pod in [&self.client, &self.server] {
                    self.cluster
                        .label_pod(pod, "chaos-down", Some(&round.to_string()));
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.cluster.api.set_down(false);
            }
            Fault::ControlPlaneStreamCut => self.cp.restart().await,
            Fault::ControlPlaneDownPastCertLife => {
                self.cp.stop().await;
                tokio::time::sleep(CERT_TTL + Duration::from_secs(2)).await;
                self.cp.restart().await;
            }
            Fault::ConflistOverwritten => {
                self.write_foreign_conflist();
                self.wait_chained().await;
            }
            Fault::ConflistDeleted => {
                let _ = std::fs::remove_file(&self.conflist);
                tokio::time::sleep(Duration::from_millis(300)).await;
                self.write_foreign_conflist();
                self.wait_chained().await;
            }
            Fault::RouteDeleted => self.server.delete_policy_route(),
            Fault::MalformedInput => self.malformed().await,
            Fault::CaptureRuleDeleted => {
                self.client.delete_outbound_redirect();
            }
        }
    }

    /// "Another CNI" writes its config, without our entry.
    fn write_foreign_conflist(&self) {
        let _ = std::fs::write(
            &self.conflist,
            serde_json::to_vec_pretty(self.cluster.node.conflist()).unwrap_or_default(),
        );
    }

    async fn wait_chained(&self) {
        let deadline = Instant::now() + SETTLE;
        while !std::fs::read_to_string(&self.conflist).is_ok_and(|c| c.contains("istio-cni")) {
            if Instant::now() > deadline {
                eprintln!("install-cni did not chain the plugin back");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Garbage to the agent's ZDS socket and plugin-event socket, and a resource that
    /// does not decode pushed to ztunnel over xDS (then removed).
    async fn malformed(&self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if let Ok(conn) = protocol::SeqpacketConn::connect(&self.cluster.node.zds_socket()).await {
            let _ = conn.send(b"\xff\x00not a ZdsHello", None).await;
            let _ = tokio::time::timeout(Duration::from_millis(500), conn.recv()).await;
        }
        let plugin = self.cluster.node.dir.path().join("pluginevent.sock");
        if let Ok(mut s) = tokio::net::UnixStream::connect(&plugin).await {
            let _ = s.write_all(b"{\"not\": \"an event\"\n\x00\xff").await;
            let _ = s.shutdown().await;
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut answer)).await;
        }
        self.cp.push_raw(
            ADDRESS_TYPE,
            vec![(
                "chaos/garbage".into(),
                prost_types::Any {
                    type_url: ADDRESS_TYPE.into(),
                    value: vec![0xff, 0xff, 0xff, 0x0f],
                },
            )],
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.cp.remove(ADDRESS_TYPE, &["chaos/garbage"]);
    }

    /// New "panicked at" lines in any log, and managed processes that are not running
    /// (with the end of their log, to say why).
    fn crashes(&mut self) -> (u64, Vec<String>) {
        let mut why = Vec::new();
        for (name, p) in [("ztunnel", &mut self.zt), ("agent", &mut self.agent)] {
            if !p.is_running() {
                let logs = p.logs();
                let tail: Vec<&str> = logs.lines().rev().take(5).collect();
                why.push(format!(
                    "{name} (pid {}) exited with {:?}: {}",
                    p.pid(),
                    p.exit_code(),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ));
            }
        }
        (self.count_crashes(), why)
    }

    fn count_crashes(&mut self) -> u64 {
        let mut panics = 0;
        if let Ok(dir) = std::fs::read_dir(self.cluster.node.dir.path()) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".log") && !name.contains("tcpdump") {
                    panics += std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .matches("panicked at")
                        .count();
                }
            }
        }
        let new = panics.saturating_sub(self.panics) as u64;
        self.panics = panics.max(self.panics);
        let dead = [self.zt.is_running(), self.agent.is_running()]
            .iter()
            .filter(|r| !**r)
            .count() as u64;
        new + dead + std::mem::take(&mut self.stuck)
    }

    /// What is left behind that should not be: netns beyond the three pods', probe
    /// set entries beyond the mesh pods' addresses, pod rules other than the
    /// specification's, `grown` fds.
    async fn leaks(&self, fds_before: &[(u32, Fds)]) -> Vec<String> {
        let fds_now = self.fds().await;
        let mut out = Vec::new();
        let prefix = format!("zt{}-", self.cluster.node.id);
        let pods: BTreeSet<String> = [&self.client, &self.server, &self.outside]
            .iter()
            .map(|p| p.netns_name.clone())
            .collect();
        let extra: Vec<String> = e2e::sh("ip", &["netns", "list"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix) && !pods.contains(*n))
            .map(str::to_string)
            .collect();
        if !extra.is_empty() {
            out.push(format!("netns {}", extra.join(", ")));
        }
        let mut want: BTreeSet<IpAddr> = BTreeSet::new();
        for p in [&self.client, &self.server] {
            want.extend(p.ips.iter().copied());
        }
        let mut have: BTreeSet<IpAddr> = BTreeSet::new();
        for family in ["v4", "v6"] {
            let set = format!("{}-{family}", self.cluster.probe_set);
            let saved = std::process::Command::new("ipset")
                .args(["save", &set])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            have.extend(
                saved
                    .lines()
                    .filter_map(|l| l.strip_prefix(&format!("add {set} ")))
                    .filter_map(|rest| rest.split_whitespace().next()?.parse::<IpAddr>().ok()),
            );
        }
        if have != want {
            out.push(format!("probe set holds {have:?}, expected {want:?}"));
        }
        for p in [&self.client, &self.server] {
            if p.iptables_save() != normalize_save(SPEC_SAVE)
                || p.ip6tables_save() != normalize_save(SPEC6_SAVE)
            {
                out.push(format!(
                    "rules of {} differ from the specification's",
                    p.name
                ));
            }
        }
        if self.outside.iptables_save().contains("ISTIO") {
            out.push("rules in the pod outside the mesh".into());
        }
        for (pid, before) in fds_before {
            let now = fds_now.iter().find(|(p, _)| p == pid).map(|(_, n)| n);
            if let Some(now) = now.filter(|n| n.len() > before.len()) {
                let who = if *pid == self.zt.pid() {
                    "ztunnel"
                } else {
                    "the agent"
                };
                out.push(format!(
                    "{} fds in {who} (pid {pid}: {})",
                    now.len() - before.len(),
                    now.extra_over(before)
                ));
            }
            if let Some(now) = now.filter(|n| n.api_connections > API_CONNECTIONS) {
                out.push(format!(
                    "{} connections to the Kubernetes API (at most {API_CONNECTIONS})",
                    now.api_connections
                ));
            }
        }
        out
    }

    /// The agent's and ztunnel's pids and open fds: the fewest of a few samples, since
    /// both open some for a moment now and then (the drift check's `iptables-save`
    /// pipes, a netns it looks into).
    async fn fds(&self) -> Vec<(u32, Fds)> {
        let mut least: Vec<(u32, Fds)> = Vec::new();
        for _ in 0..5 {
            for pid in [self.agent.pid(), self.zt.pid()] {
                let Some(n) = Fds::of(pid, self.cluster.api.addr.port()) else {
                    continue;
                };
                match least.iter_mut().find(|(p, _)| *p == pid) {
                    Some((_, m)) if n.len() < m.len() => *m = n,
                    Some(_) => {}
                    None => least.push((pid, n)),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        least
    }

    /// Waits until every fault of the run has been undone: pods enabled, mesh traffic
    /// flowing.
    async fn settle(&self, prober: &Prober, since: Instant) -> bool {
        let deadline = Instant::now() + SETTLE;
        // Every flow working again, for a while: what one fault leaves failing must
        // not be counted against the next.
        while !prober.stats.steady(since, Duration::from_millis(500)) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.healthy().await;
        true
    }
}

/// A process's open fds by kind ("socket", "pipe", "anon_inode:[eventfd]", a path),
/// so that a leak says what leaked. Its TCP connections to the Kubernetes API server
/// are counted apart: the API client keeps a pool of them, and a connection that went
/// idle when a watch restarted stays there until the pool's idle timeout (90 s),
/// which is not a leak; those are bounded instead (see [`API_CONNECTIONS`]).
#[derive(Clone, Debug, Default)]
struct Fds {
    kinds: BTreeMap<String, usize>,
    api_connections: usize,
}

/// At most this many connections to the API server: the two watches, and a pool of
/// idle connections the size of the client's concurrency.
const API_CONNECTIONS: usize = 4;

/// Socket inodes of TCP connections whose remote port is `port`, from the process's
/// view of its netns.
fn tcp_inodes_to(pid: u32, port: u16) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let remote_port = cols
                .get(2)
                .and_then(|r| r.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if let (Some(true), Some(inode)) = (remote_port.map(|p| p == port), cols.get(9)) {
                out.insert(inode.to_string());
            }
        }
    }
    out
}

impl Fds {
    fn of(pid: u32, api_port: u16) -> Option<Fds> {
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        let api = tcp_inodes_to(pid, api_port);
        let mut fds = Fds::default();
        for entry in dir.flatten() {
            let target = std::fs::read_link(entry.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "gone".into());
            // "socket:[123]" and "pipe:[456]" differ only by inode.
            let kind = match target.split_once(":[") {
                Some(("socket", inode)) if api.contains(inode.trim_end_matches(']')) => {
                    fds.api_connections += 1;
                    continue;
                }
                Some((k, _)) if !target.starts_with('/') => k.to_string(),
                _ => target,
            };
            *fds.kinds.entry(kind).or_insert(0) += 1;
        }
        Some(fds)
    }

    /// Every fd but the pooled API connections.
    fn len(&self) -> usize {
        self.kinds.values().sum()
    }

    /// "+1 socket, +1 pipe": the kinds this holds more of than `before`.
    fn extra_over(&self, before: &Fds) -> String {
        let extra: Vec<String> = self
            .kinds
            .iter()
            .filter_map(|(k, n)| {
                let was = before.kinds.get(k).copied().unwrap_or(0);
                (*n > was).then(|| format!("+{} {k}", n - was))
            })
            .collect();
        extra.join(", ")
    }
}

fn start_agent(cluster: &Cluster, n: u32) -> AgentProcess {
    cluster.start_agent_with(n, |cmd| {
        cmd.env("DRIFT_CHECK_INTERVAL", "1");
    })
}

fn start_ztunnel(cluster: &Cluster, cp: &ControlPlane, n: u32) -> Ztunnel {
    let env = cp.env();
    Ztunnel::start_with(&cluster.node, n, |cmd| {
        for (k, v) in &env {
            cmd.env(k, v);
        }
    })
}

/// Runs `opts`, printing progress; one row per fault and round.
pub async fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Vec<Row> {
    let mut world = World::new().await;
    let (flows, long) = world.flows();
    let prober = Prober::start(flows, long, opts.gap);
    // Warm up: pools, certificates, the first connections.
    let warm = Instant::now();
    world.settle(&prober, warm).await;
    tokio::time::sleep(opts.window).await;
    let baseline = prober.stats.take();
    progress(&format!(
        "baseline: {} connections, {} failed",
        baseline.attempted, baseline.failed
    ));
    let mut rows = Vec::new();
    let total = opts.faults.len() as u32 * opts.rounds;
    let mut i = 0;
    for round in 1..=opts.rounds {
        for &fault in &opts.faults {
            i += 1;
            prober.pause().await;
            let fds_before = world.fds().await;
            let _ = world.count_crashes();
            prober.resume();
            let capture =
                Capture::on_host_veth(&world.client, "tcp", world.cluster.node.dir.path());
            let _ = prober.stats.take();
            let at = Instant::now();
            world.inject(fault, round).await;
            let recovered = world.settle(&prober, at).await;
            tokio::time::sleep(opts.window).await;
            let window = prober.stats.take();
            let wire = capture.stop();
            prober.pause().await;
            let (crashed, why) = world.crashes();
            for w in &why {
                progress(&format!("  {w}"));
            }
            let mut leaked = world.leaks(&fds_before).await;
            if !recovered {
                leaked.push(format!("traffic not back within {SETTLE:?}"));
            }
            prober.resume();
            let row = Row {
                fault: fault.name().to_string(),
                gated: fault.gated(),
                attempted: window.attempted,
                succeeded: window.succeeded,
                failed: window.failed,
                plaintext_bytes: (wire.ascii.matches(SECRET).count() * SECRET.len()) as u64,
                inbound_bypass: window.bypass,
                recovery_ms: prober::recovery(&window, at).map(|d| d.as_millis() as u64),
                crashed,
                leaked,
            };
            progress(&format!(
                "[{i}/{total}] {}: {} ({} ok, {} failed){}",
                fault.name(),
                row.behaviour(),
                row.succeeded,
                row.failed,
                if row.violations().is_empty() {
                    String::new()
                } else {
                    format!(" — {}", row.violations().join("; "))
                }
            ));
            rows.push(row);
        }
    }
    prober.stop().await;
    rows
}
