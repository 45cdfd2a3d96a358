//! What operators look at, with Istio's ports and paths:
//!
//! - readiness on 15021 (`/healthz/ready`), answered as Istio answers it (`ready`, or
//!   `not ready, pending: <what>`): the port is reachable by anyone who can reach the
//!   pod, so it says nothing about pods, identities or errors;
//! - the admin endpoint on `ADMIN_ADDR` (`localhost:15000`): `/config_dump` (the mesh
//!   state, certificates and pods, in the shape of Istio's, see [`config_dump`]),
//!   `/logging` (levels shown, changed live, reset), `/quitquitquit` (drain and exit),
//!   `/healthz/ready` (readiness with how each pod, certificate and the xDS stream
//!   stand), and `/` (the index);
//! - Prometheus metrics on `STATS_ADDR` (15020): `/metrics` and `/stats/prometheus`.
//!
//! All are served by [`crate::http`].

pub mod config_dump;
pub mod readiness;

use std::collections::HashMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::http::{self, Limits};
use crate::inpod::statemanager::StateManager;
use crate::proxy::connections::ConnectionTable;
use crate::proxy::MeshConfig;
use crate::telemetry::LogLevels;
use crate::xds::XdsStatus;
use config_dump::cert_detail;
use readiness::Readiness;

/// Everything the views read, and what the admin endpoint may act on.
#[derive(Clone)]
pub struct NodeView {
    pub readiness: Arc<Readiness>,
    pub pods: StateManager,
    pub mesh: Option<Arc<MeshConfig>>,
    pub xds: Option<Arc<XdsStatus>>,
    /// The configuration as printed at startup (`key: value`).
    pub config_lines: Arc<Vec<String>>,
    /// `LOCAL_XDS_PATH`, shown as `staticConfig`.
    pub local_config: Option<PathBuf>,
    /// Live log levels (absent when logging was set up by someone else).
    pub logs: Option<Arc<LogLevels>>,
    /// `/quitquitquit` asks for a graceful shutdown through this.
    pub quit: Arc<tokio::sync::Notify>,
    /// The node's live connections, listed per pod in `workloadState`.
    pub connections: Arc<ConnectionTable>,
}

/// Istio's answer to a readiness probe: 200 `ready`, or 500 `not ready, pending:
/// <components, sorted>`.
pub fn probe_answer(status: Result<(), Vec<String>>) -> (StatusCode, String) {
    match status {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(mut pending) => {
            pending.sort();
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("not ready, pending: {}\n", pending.join(", ")),
            )
        }
    }
}

impl NodeView {
    /// The admin endpoint's `/healthz/ready`: the probe's answer, then for people how
    /// each pod, certificate and the xDS stream stand.
    pub async fn readiness_body(&self) -> (StatusCode, String) {
        let (status, mut body) = probe_answer(self.readiness.status());
        let state = self.mesh.as_ref().map(|m| m.store.get());
        let pods = self.pods.pods().await;
        if !pods.is_empty() {
            body.push_str("pods:\n");
        }
        for p in &pods {
            let proxy = match &p.error {
                None => "proxy running".to_string(),
                Some(e) => format!("proxy not up (retrying): {e}"),
            };
            let workload = match &state {
                None => "no mesh (passthrough)".to_string(),
                Some(s) => {
                    match s.pod_workload(&p.info.namespace, &p.info.name, &p.info.service_account) {
                        Some(w) => format!("workload {} ({})", w.uid, w.identity()),
                        None => {
                            "WAITING for its workload (connections wait, then are refused)".into()
                        }
                    }
                }
            };
            let _ = writeln!(
                body,
                "  {}/{} (uid {}): {proxy}; {workload}",
                p.info.namespace, p.info.name, p.uid
            );
        }
        if let Some(mesh) = &self.mesh {
            let certs = mesh.certs.states();
            if !certs.is_empty() {
                let _ = writeln!(
                    body,
                    "certificates (from {}):",
                    mesh.certs.describe_source()
                );
            }
            for (id, st) in certs {
                let _ = writeln!(body, "  {id}: {}", cert_detail(&st));
            }
        }
        if let Some(xds) = &self.xds {
            let x = xds.snapshot();
            let _ = writeln!(
                body,
                "xds: {}, {} resources, {} ACKs, {} NACKs{}{}",
                if x.connected {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                x.resources,
                x.acks,
                x.nacks,
                x.last_nack
                    .map(|n| format!("; last NACK: {n}"))
                    .unwrap_or_default(),
                x.last_error
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default(),
            );
        }
        (status, body)
    }

    /// `/config_dump`.
    pub async fn config_dump(&self) -> Value {
        let mut dump = json!({
            "workloads": [], "services": [], "policies": [], "certificates": [],
        });
        if let Some(mesh) = &self.mesh {
            let state = mesh.store.get();
            let mut workloads: Vec<Value> = state
                .workloads()
                .map(|w| config_dump::workload(w))
                .collect();
            workloads.sort_by_key(|w| w["uid"].as_str().unwrap_or_default().to_string());
            let mut services: Vec<Value> =
                state.services().map(|e| config_dump::service(e)).collect();
            services.sort_by_key(|s| s["hostname"].as_str().unwrap_or_default().to_string());
            let mut policies: Vec<Value> = state
                .policies()
                .all()
                .map(|p| config_dump::policy(p))
                .collect();
            policies.sort_by_key(|p| format!("{}/{}", p["namespace"], p["name"]));
            let mut certificates: Vec<(String, Value)> = mesh
                .certs
                .states()
                .into_iter()
                .map(|(id, st)| {
                    let held = mesh.certs.held(&id);
                    (id.to_string(), config_dump::certificate(&id, &st, held))
                })
                .collect();
            certificates.sort_by(|a, b| a.0.cmp(&b.0));
            dump["workloads"] = json!(workloads);
            dump["services"] = json!(services);
            dump["policies"] = json!(policies);
            dump["certificates"] =
                json!(certificates.into_iter().map(|(_, c)| c).collect::<Vec<_>>());
            dump["certificateSource"] = json!(mesh.certs.describe_source());
        }
        let pods = self.pods.pods().await;
        let state = self.mesh.as_ref().map(|m| m.store.get());
        let connections = self.connections.list();
        dump["workloadState"] = config_dump::workload_state(&pods, &connections, |p| {
            state
                .as_ref()
                .and_then(|s| {
                    s.pod_workload(&p.info.namespace, &p.info.name, &p.info.service_account)
                })
                .map(|w| w.trust_domain.clone())
                .unwrap_or_default()
        });
        dump["staticConfig"] = config_dump::static_config(self.local_config.as_deref());
        dump["version"] = config_dump::version();
        dump["config"] = config_dump::config(&self.config_lines);
        if let Some(xds) = &self.xds {
            let x = xds.snapshot();
            dump["xds"] = json!({
                "connected": x.connected, "resources": x.resources, "acks": x.acks,
                "nacks": x.nacks, "lastNack": x.last_nack, "lastError": x.last_error,
            });
        }
        dump["ready"] = json!(self.readiness.status().is_ok());
        dump
    }
}

/// Serves `/healthz/ready` (Istio's answer, nothing more) until the task is dropped.
pub async fn serve_readiness(listener: TcpListener, limits: Limits, view: NodeView) {
    http::serve(listener, "readiness endpoint", limits, move |req| {
        let view = view.clone();
        async move {
            if req.uri().path() != "/healthz/ready" {
                return http::text(StatusCode::NOT_FOUND, "not found\n");
            }
            let (status, body) = probe_answer(view.readiness.status());
            http::text(status, body)
        }
    })
    .await
}

/// The admin endpoint's `/healthz/ready`: with the detail.
async fn readiness_detail(view: &NodeView) -> Response<Full<Bytes>> {
    let (status, body) = view.readiness_body().await;
    http::text(status, body)
}

const ADMIN_INDEX: &[(&str, &str)] = &[
    ("config_dump", "dump the current ztunnel configuration and state (JSON)"),
    ("logging", "GET: the log levels; POST ?level=<level>|<target>:<level>,...: change them; POST ?reset: back to the startup levels"),
    ("quitquitquit", "POST: drain every pod proxy and exit"),
    ("healthz/ready", "readiness, with how each pod, certificate and xDS stand"),
    ("debug/pprof/profile", "CPU profile: not in this build"),
    ("debug/pprof/heap", "heap profile: not in this build (system allocator)"),
];

const LOGGING_HELP: &str = "usage: GET /logging                              (the current levels)
       POST /logging?level=<level>                (the default level)
       POST /logging?level=<target>:<level>,...   (one target's level, e.g. ztunnel::inpod:debug)
       POST /logging?reset                        (back to the levels ztunnel started with)
levels: off, error, warn, info, debug, trace
";

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut resp = http::text(StatusCode::OK, body);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn logging(req: &Request<Incoming>, view: &NodeView) -> Response<Full<Bytes>> {
    let Some(logs) = &view.logs else {
        return http::text(
            StatusCode::NOT_IMPLEMENTED,
            "log levels are not adjustable here\n",
        );
    };
    let listing =
        |levels: String| http::text(StatusCode::OK, format!("current log level is {levels}\n"));
    match *req.method() {
        Method::GET | Method::HEAD => listing(logs.current()),
        Method::POST => {
            let q = query(req);
            let reset = q.contains_key("reset");
            let level = q.get("level").cloned().unwrap_or_default();
            if !reset && level.is_empty() {
                return listing(logs.current());
            }
            match logs.set(reset, &level) {
                Ok(levels) => listing(levels),
                Err(e) => http::text(StatusCode::BAD_REQUEST, format!("{e}\n\n{LOGGING_HELP}")),
            }
        }
        _ => http::text(StatusCode::METHOD_NOT_ALLOWED, LOGGING_HELP),
    }
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve_admin(listener: TcpListener, limits: Limits, view: NodeView) {
    http::serve(listener, "admin endpoint", limits, move |req| {
        let view = view.clone();
        async move {
            match req.uri().path() {
                "/config_dump" => json_response(&view.config_dump().await),
                "/logging" => logging(&req, &view),
                "/quitquitquit" => {
                    if req.method() != Method::POST {
                        return http::text(StatusCode::METHOD_NOT_ALLOWED, "POST to shut down\n");
                    }
                    // The body, if any, is not needed; read a little so the client
                    // is not cut off mid-request.
                    let _ = Limited::new(req.into_body(), 1024).collect().await;
                    tracing::info!("shutdown requested on the admin endpoint");
                    view.quit.notify_one();
                    http::text(StatusCode::OK, "shutting down: draining every pod proxy\n")
                }
                "/healthz/ready" => readiness_detail(&view).await,
                "/debug/pprof/profile" | "/debug/pprof/heap" => http::text(
                    StatusCode::NOT_IMPLEMENTED,
                    "profiles are not available in this build (system allocator, no profiler)\n",
                ),
                "/" => {
                    let mut body = String::from("ztunnel admin\n\n");
                    for (path, what) in ADMIN_INDEX {
                        let _ = writeln!(body, "/{path:<22} {what}");
                    }
                    http::text(StatusCode::OK, body)
                }
                _ => http::text(StatusCode::NOT_FOUND, "not found: see / for the index\n"),
            }
        }
    })
    .await
}

/// Serves the Prometheus metrics (`/metrics`, and `/stats/prometheus` as Istio's
/// proxies do) until the task is dropped.
pub async fn serve_stats(
    listener: TcpListener,
    limits: Limits,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    http::serve(listener, "stats endpoint", limits, move |req| {
        let metrics = metrics.clone();
        async move {
            match req.uri().path() {
                "/metrics" | "/stats/prometheus" => {
                    let mut resp = http::text(StatusCode::OK, metrics.encode());
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    resp
                }
                _ => http::text(
                    StatusCode::NOT_FOUND,
                    "not found: try /metrics or /stats/prometheus\n",
                ),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe's answer names components, as Istio's does, and nothing about pods,
    /// identities or errors (the port is reachable by anyone who reaches the pod).
    #[test]
    fn the_probe_is_answered_as_istio_answers_it() {
        assert_eq!(probe_answer(Ok(())), (StatusCode::OK, "ready\n".into()));
        assert_eq!(
            probe_answer(Err(vec!["workload state".into(), "certificates".into()])),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "not ready, pending: certificates, workload state\n".into()
            )
        );
    }
}
