//! The node agent, assembled in one place: the enrollment and its seams, the host
//! probe set, the adoption of pods enrolled before it started, the ZDS server, the
//! background repairs and drift checks, the CNI plugin's event socket, and the HTTP
//! endpoints (`/readyz`, `/metrics`, `/debug/enrollment`).
//!
//! `istio-cni` (its `main`), the e2e harness and the demo all start the agent through
//! [`Agent::start`]; they differ only in the [`AgentConfig`] (which parts are served,
//! on which paths and ports) and the [`Startup`] (the annotation writer, the pods to
//! adopt). What stays in `main` is what needs Kubernetes: the pod watch, the plugin's
//! installation into the node's CNI chain, and the decision at shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use protocol::{Netns, SeqpacketListener};
use tokio::task::JoinHandle;

use crate::diagnose::report::AgentReport;
use crate::enrollment::{
    Adopt, EnrollError, Enrollment, Locate, Parts, Pod, ProcSandboxes, StatusWriter,
};
use crate::http::{Limits, Reply, Routes};
use crate::metrics::{Gauges, SharedMetrics};
use crate::rules::hostprobe::HostProbes;
use crate::rules::{Family, Iptables, Redirection, RuleConfig};
use crate::zds_server::ZdsServer;

/// Everything the agent is configured with.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where ztunnel connects (`/var/run/ztunnel/ztunnel.sock`).
    pub zds_socket: PathBuf,
    /// Permission bits of the socket file: never world-writable.
    pub zds_socket_mode: u32,
    /// Bound on each ZDS write and each ack.
    pub zds_timeout: Duration,
    pub rules: RuleConfig,
    pub iptables: Iptables,
    /// Where pods' processes are looked up (`/proc`).
    pub proc_root: PathBuf,
    /// The address families redirected (`AMBIENT_IPV6` adds IPv6 to IPv4). A pod with an
    /// address of another family is refused.
    pub families: Vec<Family>,
    /// How often every enrolled pod's rules are re-verified and repaired (jittered);
    /// `None`: only on reconciles.
    pub drift_check_interval: Option<Duration>,
    /// The name prefix of the host probe set (`HOST_PROBE_SET`), which lets the
    /// kubelet's probes to captured pods go around ztunnel. `None`: no probe set, for
    /// harnesses whose pods get no kubelet probes (it lives in the node's netns).
    pub host_probe_set: Option<String>,
    /// Where the CNI plugin reports sandboxes (`PLUGIN_EVENT_SOCKET`); `None`: not
    /// served, pods are enrolled by [`Enrollment::enroll`] only.
    pub plugin_event_socket: Option<PathBuf>,
    /// `/readyz` (`AGENT_READINESS_ADDR`); `None`: not served.
    pub readiness_addr: Option<SocketAddr>,
    /// `/metrics` (`MONITORING_ADDR`); `None`: not served.
    pub monitoring_addr: Option<SocketAddr>,
    /// `/debug/enrollment` (`DEBUG_ADDR`), loopback only; `None`: not served.
    pub debug_addr: Option<SocketAddr>,
    /// What the HTTP endpoints enforce.
    pub http_limits: Limits,
}

impl AgentConfig {
    /// The agent's defaults around `zds_socket`, with `iptables` for the pods' rules:
    /// IPv4 and IPv6, drift checks every minute; no probe set, plugin socket or HTTP
    /// endpoint until the caller names them.
    pub fn new(zds_socket: PathBuf, iptables: Iptables) -> AgentConfig {
        AgentConfig {
            zds_socket,
            zds_socket_mode: 0o600,
            zds_timeout: Duration::from_secs(5),
            rules: RuleConfig::default(),
            iptables,
            proc_root: PathBuf::from("/proc"),
            families: vec![Family::V4, Family::V6],
            drift_check_interval: Some(Duration::from_secs(60)),
            host_probe_set: None,
            plugin_event_socket: None,
            readiness_addr: None,
            monitoring_addr: None,
            debug_addr: None,
            http_limits: Limits::default(),
        }
    }
}

/// What the agent is handed by its surroundings when it starts.
#[derive(Default)]
pub struct Startup {
    /// Writes the pods' `ambient.istio.io/redirection` annotations (Kubernetes);
    /// `None` without an API server.
    pub status: Option<Arc<dyn StatusWriter>>,
    /// The pods this node enrolled before the agent (re)started: they go into the
    /// snapshot before any ztunnel can connect.
    pub adopt: Vec<Adopt>,
    /// The enrollment's event counters; shared with install-cni's, which count on the
    /// same `/metrics`.
    pub metrics: SharedMetrics,
    /// Whether the plugin is in the node's CNI chain: `/readyz` and
    /// `istio_cni_install_ready` answer from it. `None`: install-cni is off (ready).
    pub install_ready: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl Startup {
    /// Adopts `pods` by their netns paths (a harness's own record of what it enrolled).
    pub fn adopting(pods: &[Pod]) -> Startup {
        Startup {
            adopt: pods
                .iter()
                .map(|p| Adopt {
                    info: p.info(),
                    ips: p.ips.clone(),
                    locate: Locate::Path(p.netns_path.clone()),
                    annotation: None,
                })
                .collect(),
            ..Startup::default()
        }
    }
}

/// A running agent. Dropping it stops serving.
pub struct Agent {
    enrollment: Enrollment,
    zds: ZdsServer,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("ZDS socket: {0}")]
    Bind(#[from] protocol::Error),
    #[error("ZDS socket mode {0:o} is world-writable; refusing")]
    WorldWritable(u32),
    #[error("DEBUG_ADDR {0} is not a loopback address: the debug endpoint lists every pod on the node, and the agent runs on the host network; give it 127.0.0.1:<port>")]
    DebugNotLoopback(SocketAddr),
    #[error("opening the node's netns for the host probe set: {0}")]
    NodeNetns(std::io::Error),
    #[error("adopting the pods enrolled before this agent started: {0}")]
    Adopt(#[from] EnrollError),
    #[error("binding the CNI plugin's event socket {path}: {source}")]
    PluginSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Http(std::io::Error),
}

impl Agent {
    /// Starts the agent: adopts `startup.adopt`, then binds the ZDS socket and serves,
    /// so the first ztunnel to connect gets every adopted pod in its snapshot; then
    /// the plugin's socket and the HTTP endpoints, each bound before anything is
    /// served (a port already taken stops the agent here, rather than leaving the
    /// kubelet's probe to ask another program).
    pub async fn start(cfg: &AgentConfig, startup: Startup) -> Result<Agent, AgentError> {
        if cfg.zds_socket_mode & 0o002 != 0 {
            return Err(AgentError::WorldWritable(cfg.zds_socket_mode));
        }
        if let Some(addr) = cfg.debug_addr.filter(|a| !a.ip().is_loopback()) {
            return Err(AgentError::DebugNotLoopback(addr));
        }
        let probes = match &cfg.host_probe_set {
            Some(prefix) => {
                let node = Netns::current().map_err(AgentError::NodeNetns)?;
                let sets = cfg
                    .families
                    .iter()
                    .map(|f| HostProbes::new(&cfg.rules, cfg.iptables.clone(), *f, prefix))
                    .collect();
                Some((sets, node))
            }
            None => None,
        };
        let zds = ZdsServer::new(cfg.zds_timeout);
        let enrollment = Enrollment::new(Parts {
            redirect: Arc::new(Redirection::new(
                cfg.rules.clone(),
                cfg.iptables.clone(),
                &cfg.families,
            )),
            ztunnel: Arc::new(zds.clone()),
            sandboxes: Arc::new(ProcSandboxes {
                proc_root: cfg.proc_root.clone(),
            }),
            probes,
            status: startup.status,
            metrics: startup.metrics,
        });
        enrollment.adopt(startup.adopt).await?;
        let listener = SeqpacketListener::bind(&cfg.zds_socket, cfg.zds_socket_mode)?;
        let mut agent = Agent {
            tasks: vec![
                tokio::spawn(zds.clone().serve(listener, Arc::new(enrollment.clone()))),
                tokio::spawn(enrollment.clone().run_repairs()),
            ],
            enrollment,
            zds,
        };
        if let Some(interval) = cfg.drift_check_interval {
            let checks = agent.enrollment.clone().run_drift_checks(interval);
            agent.tasks.push(tokio::spawn(checks));
        }
        if let Some(path) = &cfg.plugin_event_socket {
            let events =
                crate::cni::server::bind(path).map_err(|source| AgentError::PluginSocket {
                    path: path.clone(),
                    source,
                })?;
            let serve = crate::cni::server::serve(events, agent.enrollment.clone());
            agent.tasks.push(tokio::spawn(serve));
        }
        agent.serve_http(cfg, startup.install_ready).await?;
        Ok(agent)
    }

    /// `/readyz`, `/metrics` (the enrollment's counters, and the state gauges read
    /// from their owners at each scrape) and `/debug/enrollment`, where configured.
    async fn serve_http(
        &mut self,
        cfg: &AgentConfig,
        install_ready: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    ) -> Result<(), AgentError> {
        let mut endpoints: Vec<(&'static str, SocketAddr, Routes)> = Vec::new();
        if let Some(addr) = cfg.readiness_addr {
            let ready = install_ready.clone();
            let routes: Routes = Arc::new(move |path| match path {
                "/readyz" if ready.as_ref().is_none_or(|r| r()) => {
                    Some(Reply::text(StatusCode::OK, "ready\n"))
                }
                "/readyz" => Some(Reply::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: CNI plugin not installed\n",
                )),
                _ => None,
            });
            endpoints.push(("readiness endpoint /readyz", addr, routes));
        }
        if let Some(addr) = cfg.monitoring_addr {
            let (pods, zds) = (self.enrollment.clone(), self.zds.clone());
            let gauges = Gauges {
                pods: Box::new(move || pods.pod_counts()),
                ztunnels: Box::new(move || zds.connections()),
                install_ready: install_ready
                    .map(|r| Box::new(move || r()) as Box<dyn Fn() -> bool + Send + Sync>),
            };
            let metrics = self.enrollment.metrics().clone();
            let routes: Routes = Arc::new(move |path| match path {
                "/metrics" | "/stats/prometheus" => Some(Reply {
                    status: StatusCode::OK,
                    content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body: metrics.encode(&gauges),
                }),
                _ => None,
            });
            endpoints.push(("monitoring endpoint", addr, routes));
        }
        if let Some(addr) = cfg.debug_addr {
            // What `istio-cni diagnose` needs to find pods and ztunnel.
            let (enrollment, zds) = (self.enrollment.clone(), self.zds.clone());
            let proc_root = cfg.proc_root.clone();
            let routes: Routes = Arc::new(move |path| match path {
                "/debug/enrollment" => {
                    // Pids as the node's procfs numbers them: diagnose on the node (or
                    // in this pod, through the same mount) opens the agent's fds and
                    // enters ztunnel's netns by them.
                    let report = AgentReport {
                        pid: crate::discovery::own_pid_in(&proc_root)
                            .map_or(std::process::id(), |p| p as u32),
                        ztunnel_pids: zds.ztunnel_pids(&proc_root),
                        families: enrollment
                            .families()
                            .iter()
                            .map(ToString::to_string)
                            .collect(),
                        pods: enrollment.report(),
                    };
                    Some(Reply {
                        status: StatusCode::OK,
                        content_type: "application/json",
                        body: serde_json::to_string(&report).unwrap_or_default(),
                    })
                }
                _ => None,
            });
            endpoints.push(("debug endpoint", addr, routes));
        }
        let mut bound = Vec::new();
        for (name, addr, routes) in endpoints {
            let listener = crate::http::bind(name, addr)
                .await
                .map_err(AgentError::Http)?;
            bound.push((listener, routes));
        }
        for (listener, routes) in bound {
            let serve = crate::http::serve(listener, cfg.http_limits, routes);
            self.tasks.push(tokio::spawn(serve));
        }
        Ok(())
    }

    pub fn enrollment(&self) -> &Enrollment {
        &self.enrollment
    }

    /// The ZDS server ztunnel connects to.
    pub fn zds(&self) -> &ZdsServer {
        &self.zds
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
