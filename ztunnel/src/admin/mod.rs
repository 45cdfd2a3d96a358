//! What operators look at: readiness on 15021 (`/healthz/ready`, with a body saying
//! what the node waits for and how each pod and certificate stands) and the admin
//! endpoint (`/config_dump` on `ADMIN_ADDR`, by default `localhost:15000`): the mesh
//! state ztunnel holds, its certificates, its pods and its xDS connection, as JSON.
//! Both are served by [`crate::http`].

pub mod readiness;

use std::fmt::Write;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::http::{self, Limits};
use crate::identity::manager::{humantime, CertState};
use crate::inpod::statemanager::StateManager;
use crate::proxy::MeshConfig;
use crate::state::policy::{Action, Scope};
use crate::state::workload::GatewayDestination;
use crate::xds::XdsStatus;
use readiness::Readiness;

/// Everything the views read.
#[derive(Clone)]
pub struct NodeView {
    pub readiness: Arc<Readiness>,
    pub pods: StateManager,
    pub mesh: Option<Arc<MeshConfig>>,
    pub xds: Option<Arc<XdsStatus>>,
}

fn cert_line(state: &CertState) -> String {
    match state {
        CertState::Pending => "being fetched".into(),
        CertState::Valid {
            not_after,
            generation,
            renewal_error,
        } => {
            let mut s = format!(
                "valid until {} (generation {generation})",
                humantime(*not_after)
            );
            if let Some(e) = renewal_error {
                let _ = write!(s, "; renewal failing: {e}");
            }
            s
        }
        CertState::Expired { error, .. } => format!("EXPIRED: {error}"),
        CertState::Failing { error, attempts } => {
            format!("FAILING ({attempts} attempts): {error}")
        }
    }
}

impl NodeView {
    /// `/healthz/ready`: the status, and a body for people.
    pub async fn readiness_body(&self) -> (bool, String) {
        let mut body = String::new();
        let ready = match self.readiness.status() {
            Ok(()) => {
                body.push_str("ready\n");
                true
            }
            Err(pending) => {
                let _ = writeln!(body, "not ready: waiting for {}", pending.join(", "));
                false
            }
        };
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
                let _ = writeln!(body, "  {id}: {}", cert_line(&st));
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
        (ready, body)
    }

    /// `/config_dump`.
    pub async fn config_dump(&self) -> Value {
        let mut dump = json!({});
        if let Some(mesh) = &self.mesh {
            let state = mesh.store.get();
            let gateway = |g: Option<&crate::state::workload::GatewayAddress>| {
                g.map(|g| {
                    let dest = match &g.destination {
                        GatewayDestination::Address(a) => a.to_string(),
                        GatewayDestination::Hostname(h) => h.to_string(),
                    };
                    json!({"destination": dest, "hboneMtlsPort": g.hbone_mtls_port})
                })
            };
            let mut workloads: Vec<Value> = state
                .workloads()
                .map(|w| {
                    json!({
                        "uid": &*w.uid.0, "name": w.name, "namespace": w.namespace,
                        "identity": w.identity().to_string(),
                        "workloadIps": w.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                        "protocol": format!("{:?}", w.protocol).to_uppercase(),
                        "node": w.node, "network": w.network, "status": format!("{:?}", w.status),
                        "waypoint": gateway(w.waypoint.as_deref()),
                        "authorizationPolicies": w.authorization_policies.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
                        "services": w.services.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            workloads.sort_by_key(|w| w["uid"].as_str().unwrap_or_default().to_string());
            let mut services: Vec<Value> = state
                .services()
                .map(|e| {
                    let s = &e.service;
                    json!({
                        "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
                        "vips": s.vips.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                        "ports": s.ports.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                        "endpoints": e.endpoints.keys().map(|u| u.0.to_string()).collect::<Vec<_>>(),
                        "waypoint": gateway(s.waypoint.as_ref()),
                    })
                })
                .collect();
            services.sort_by_key(|s| s["hostname"].as_str().unwrap_or_default().to_string());
            let mut policies: Vec<Value> = state
                .policies()
                .all()
                .map(|p| {
                    json!({
                        "name": p.name, "namespace": p.namespace,
                        "scope": match p.scope { Scope::Global => "Global", Scope::Namespace => "Namespace", Scope::WorkloadSelector => "WorkloadSelector" },
                        "action": match p.action { Action::Allow => "Allow", Action::Deny => "Deny" },
                        "dryRun": p.dry_run, "rules": p.rules.len(),
                    })
                })
                .collect();
            policies.sort_by_key(|p| format!("{}/{}", p["namespace"], p["name"]));
            let certificates: Vec<Value> = mesh
                .certs
                .states()
                .into_iter()
                .map(|(id, st)| {
                    let (state, detail) = match &st {
                        CertState::Pending => ("Pending", Value::Null),
                        CertState::Valid { .. } => ("Valid", json!(cert_line(&st))),
                        CertState::Expired { .. } => ("Expired", json!(cert_line(&st))),
                        CertState::Failing { .. } => ("Failing", json!(cert_line(&st))),
                    };
                    json!({"identity": id.to_string(), "state": state, "detail": detail})
                })
                .collect();
            dump["workloads"] = json!(workloads);
            dump["services"] = json!(services);
            dump["policies"] = json!(policies);
            dump["certificates"] = json!(certificates);
            dump["certificateSource"] = json!(mesh.certs.describe_source());
        }
        dump["pods"] = json!(self
            .pods
            .pods()
            .await
            .into_iter()
            .map(|p| json!({
                "uid": p.uid.to_string(), "name": p.info.name, "namespace": p.info.namespace,
                "serviceAccount": p.info.service_account, "running": p.running, "error": p.error,
            }))
            .collect::<Vec<_>>());
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

/// Serves `/healthz/ready` until the task is dropped.
pub async fn serve_readiness(listener: TcpListener, limits: Limits, view: NodeView) {
    http::serve(listener, "readiness endpoint", limits, move |req| {
        let view = view.clone();
        async move { readiness(&req, &view).await }
    })
    .await
}

async fn readiness<B>(req: &Request<B>, view: &NodeView) -> Response<Full<Bytes>> {
    if req.uri().path() != "/healthz/ready" {
        return http::text(StatusCode::NOT_FOUND, "not found\n");
    }
    let (ready, body) = view.readiness_body().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    http::text(status, body)
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve_admin(listener: TcpListener, limits: Limits, view: NodeView) {
    http::serve(listener, "admin endpoint", limits, move |req| {
        let view = view.clone();
        async move {
            match req.uri().path() {
                "/config_dump" => {
                    let body =
                        serde_json::to_vec_pretty(&view.config_dump().await).unwrap_or_default();
                    let mut resp = http::text(StatusCode::OK, body);
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                "/healthz/ready" => readiness(&req, &view).await,
                _ => http::text(
                    StatusCode::NOT_FOUND,
                    "not found: try /config_dump or /healthz/ready\n",
                ),
            }
        }
    })
    .await
}
