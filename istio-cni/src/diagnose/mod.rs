//! `istio-cni diagnose [POD]`: the specification's quick checks, automated. Run on a
//! node (or in the agent's pod) as root: for one enrolled pod or all of them, it
//!
//! 1. asks the agent (`/debug/enrollment` on its loopback debug port) what it holds;
//! 2. enters the pod's netns through the descriptor the agent holds
//!    (`/proc/<agent>/fd/<n>`), compares its live rules and policy route with the
//!    expected ones (both families), and lists its listeners on 15001/15006/15008 and
//!    their owner (`ss`);
//! 3. reads ztunnel's `config_dump`, entering ztunnel's netns (the ZDS peer's pid) to
//!    reach its localhost admin port, or at `--ztunnel-admin`;
//! 4. prints a verdict per pod with what to do next ([`verdict`]).
//!
//! Nothing is changed. Exit code 0: healthy; 1: a problem found; 2: could not run.

pub mod report;
pub mod verdict;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use protocol::Netns;
use serde_json::Value;

use crate::rules::{Family, Iptables, Redirection, RuleConfig};
use report::{AgentReport, PodReport};
use verdict::{CertView, PodFindings, Problem, ZtunnelView};

/// ztunnel's admin port, on localhost in its own netns (as Istio's).
pub const ZTUNNEL_ADMIN_PORT: u16 = 15000;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DiagnoseError {
    #[error("cannot ask the agent at {addr} (is istio-cni running on this node? pass --agent ADDR if its debug address (DEBUG_ADDR) is elsewhere): {reason}")]
    Agent { addr: SocketAddr, reason: String },
    #[error("no enrolled pod matches {0:?} (give namespace/name, name or uid)")]
    NoSuchPod(String),
}

/// What to diagnose and where to look.
#[derive(Clone, Debug)]
pub struct Options {
    /// The agent's monitoring address.
    pub agent: SocketAddr,
    /// `namespace/name`, `name` or uid; `None`: every enrolled pod.
    pub pod: Option<String>,
    /// ztunnel's admin address, reached from here; `None`: found through ZDS.
    pub ztunnel_admin: Option<SocketAddr>,
    pub iptables: Iptables,
    /// Where the agent's process is (`/proc`).
    pub proc_root: PathBuf,
}

/// One pod's findings and the problems they show.
#[derive(Debug, serde::Serialize)]
pub struct PodDiagnosis {
    #[serde(flatten)]
    pub findings: PodFindings,
    pub problems: Vec<Problem>,
    pub healthy: bool,
}

/// Runs every check; the pods' diagnoses.
pub async fn run(opts: &Options) -> Result<Vec<PodDiagnosis>, DiagnoseError> {
    let agent_err = |reason: String| DiagnoseError::Agent {
        addr: opts.agent,
        reason,
    };
    let stream = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(opts.agent))
        .await
        .map_err(|_| agent_err("no answer".into()))?
        .map_err(|e| agent_err(e.to_string()))?;
    let body = get(stream, "/debug/enrollment").await.map_err(agent_err)?;
    let report: AgentReport =
        serde_json::from_slice(&body).map_err(|e| agent_err(format!("unexpected answer: {e}")))?;
    let pods: Vec<PodReport> = match &opts.pod {
        None => report.pods.clone(),
        Some(want) => {
            let matched: Vec<PodReport> = report
                .pods
                .iter()
                .filter(|p| {
                    *want == format!("{}/{}", p.namespace, p.name)
                        || *want == p.name
                        || *want == p.uid
                })
                .cloned()
                .collect();
            if matched.is_empty() {
                return Err(DiagnoseError::NoSuchPod(want.clone()));
            }
            matched
        }
    };
    let dump = ztunnel_dump(opts, &report).await;
    let families: Vec<Family> = report
        .families
        .iter()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    let redirection = Arc::new(Redirection::new(
        RuleConfig::default(),
        opts.iptables.clone(),
        &families,
    ));
    let mut out = Vec::new();
    for pod in pods {
        let findings = inspect(opts, &report, pod, &redirection, &dump).await;
        let problems = verdict::problems(&findings);
        out.push(PodDiagnosis {
            healthy: problems.is_empty(),
            findings,
            problems,
        });
    }
    Ok(out)
}

/// ztunnel's config dump, or how ztunnel could not be read.
enum Dump {
    NotConnected,
    Unreachable { admin: String, error: String },
    Read { admin: String, dump: Value },
}

async fn ztunnel_dump(opts: &Options, report: &AgentReport) -> Dump {
    let (admin, stream) = match opts.ztunnel_admin {
        Some(addr) => (
            addr.to_string(),
            tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| "no answer".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
        ),
        None => {
            let Some(pid) = report.ztunnel_pids.last() else {
                return Dump::NotConnected;
            };
            let admin =
                format!("localhost:{ZTUNNEL_ADMIN_PORT} in the netns of ztunnel (pid {pid})");
            let path = opts.proc_root.join(format!("{pid}/ns/net"));
            let stream = connect_in(&path).await;
            (admin, stream)
        }
    };
    let read = async {
        let body = get(stream?, "/config_dump").await?;
        serde_json::from_slice::<Value>(&body).map_err(|e| format!("not JSON: {e}"))
    };
    match read.await {
        Ok(dump) => Dump::Read { admin, dump },
        Err(error) => Dump::Unreachable { admin, error },
    }
}

/// Connects to ztunnel's localhost admin port from inside the netns at `path`.
async fn connect_in(path: &std::path::Path) -> Result<tokio::net::TcpStream, String> {
    let netns = Netns::open(path).map_err(|e| e.to_string())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], ZTUNNEL_ADMIN_PORT));
    let std_stream = tokio::task::spawn_blocking(move || {
        netns
            .run(|| std::net::TcpStream::connect_timeout(&addr, TIMEOUT))
            .map_err(|e| format!("entering ztunnel's netns: {e}"))?
            .map_err(|e| format!("connecting to {addr} there: {e}"))
    })
    .await
    .map_err(|e| e.to_string())??;
    std_stream
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    tokio::net::TcpStream::from_std(std_stream).map_err(|e| e.to_string())
}

/// `GET path` over `stream` (HTTP/1.1); the body of a 200.
async fn get(stream: tokio::net::TcpStream, path: &str) -> Result<Vec<u8>, String> {
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{path}: {status}"));
        }
        Ok(body.to_vec())
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{path}: no answer within {TIMEOUT:?}"))?
}

async fn inspect(
    opts: &Options,
    report: &AgentReport,
    pod: PodReport,
    redirection: &Arc<Redirection>,
    dump: &Dump,
) -> PodFindings {
    let ztunnel = ztunnel_view(&pod, dump);
    let netns = match pod.netns_fd {
        None => Err("the agent holds no netns for the pod".to_string()),
        Some(fd) => {
            let path = opts.proc_root.join(format!("{}/fd/{fd}", report.pid));
            Netns::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|ns| {
                    if Some(ns.id().to_string()) == pod.netns {
                        Ok(ns)
                    } else {
                        Err(format!(
                            "the agent's descriptor {fd} is not the pod's netns any more (re-run)"
                        ))
                    }
                })
        }
    };
    let (netns_id, rules, listeners) = match netns {
        Err(e) => (Err(e), None, None),
        Ok(ns) => {
            let id = ns.id().to_string();
            let ns = Arc::new(ns);
            let (r, n) = (redirection.clone(), ns.clone());
            let rules = tokio::task::spawn_blocking(move || {
                r.verify(&n)
                    .map(|v| v.differences())
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let listeners = tokio::task::spawn_blocking(move || {
                let mut cmd = crate::exec::in_netns(&ns, "ss");
                cmd.arg("-ntlpH");
                crate::exec::run(cmd, None)
                    .map(|out| verdict::parse_ss(&out))
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            (Ok(id), Some(rules), Some(listeners))
        }
    };
    PodFindings {
        pod,
        netns: netns_id,
        rules,
        listeners,
        ztunnel,
    }
}

/// What the dump says of `pod`: its proxy's state and its certificate.
fn ztunnel_view(pod: &PodReport, dump: &Dump) -> ZtunnelView {
    let (admin, dump) = match dump {
        Dump::NotConnected => return ZtunnelView::NotConnected,
        Dump::Unreachable { admin, error } => {
            return ZtunnelView::Unreachable {
                admin: admin.clone(),
                error: error.clone(),
            }
        }
        Dump::Read { admin, dump } => (admin.clone(), dump),
    };
    let Some(state) = dump["workloadState"].get(&pod.uid) else {
        return ZtunnelView::Unknown { admin };
    };
    let trust_domain = state["info"]["trustDomain"]
        .as_str()
        .filter(|t| !t.is_empty())
        .unwrap_or("cluster.local");
    let identity = format!(
        "spiffe://{trust_domain}/ns/{}/sa/{}",
        pod.namespace, pod.service_account
    );
    let certificate = dump["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["identity"] == identity.as_str())
        .map(|c| CertView {
            identity: identity.clone(),
            state: c["state"].as_str().unwrap_or("unknown").to_string(),
            expires: c["certChain"][0]["expirationTime"]
                .as_str()
                .map(str::to_string),
        });
    ZtunnelView::Known {
        admin,
        state: state["state"].as_str().unwrap_or("unknown").to_string(),
        error: state["error"].as_str().map(str::to_string),
        certificate,
    }
}
