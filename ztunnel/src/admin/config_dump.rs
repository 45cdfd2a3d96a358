//! `/config_dump` in the shape of Istio's ztunnel, so `istioctl ztunnel-config` and
//! other tools written for it read ours: top-level `workloads`, `services`,
//! `policies`, `certificates`, `workloadState`, `staticConfig`, `version` and
//! `config`, with Istio's field names inside each. Ours adds `xds`, `ready` and
//! `certificateSource`.

use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Map, Value};

use crate::identity::manager::{humantime, CertState, IdentityCert};
use crate::identity::Identity;
use crate::inpod::statemanager::PodSummary;
use crate::proxy::connections::Connection;
use crate::state::policy::{Action, Match, Policy, Scope, StringMatch};
use crate::state::service::{IpFamily, LoadBalancerMode};
use crate::state::workload::{
    GatewayAddress, GatewayDestination, HealthStatus, NetworkMode, TunnelProtocol,
};
use crate::state::{Protocol, ServiceEntry, Workload};

fn gateway(g: Option<&GatewayAddress>) -> Value {
    match g {
        None => Value::Null,
        Some(g) => {
            let destination = match &g.destination {
                GatewayDestination::Address(a) => a.to_string(),
                GatewayDestination::Hostname(h) => h.to_string(),
            };
            json!({"destination": destination, "hboneMtlsPort": g.hbone_mtls_port})
        }
    }
}

fn health(s: HealthStatus) -> &'static str {
    match s {
        HealthStatus::Healthy => "Healthy",
        HealthStatus::Unhealthy => "Unhealthy",
    }
}

/// A workload, as Istio's ztunnel dumps one.
pub fn workload(w: &Workload) -> Value {
    let mut v = json!({
        "uid": &*w.uid.0,
        "workloadIps": w.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "protocol": match w.protocol { Protocol::Hbone => "HBONE", Protocol::Tcp => "TCP" },
        "networkMode": match w.network_mode {
            NetworkMode::Standard => "Standard",
            NetworkMode::HostNetwork => "HostNetwork",
        },
        "name": w.name,
        "namespace": w.namespace,
        "trustDomain": w.trust_domain,
        "serviceAccount": w.service_account,
        "network": w.network,
        "workloadName": w.workload_name,
        "workloadType": w.workload_type,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "hostname": w.hostname,
        "node": w.node,
        "nativeTunnel": w.native_tunnel,
        "authorizationPolicies": w.authorization_policies.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
        "status": health(w.status),
        "clusterId": w.cluster_id,
        "locality": {
            "region": w.locality.region,
            "zone": w.locality.zone,
            "subzone": w.locality.subzone,
        },
        "services": w.services.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "capacity": w.capacity,
    });
    if let Some(g) = w.waypoint.as_deref() {
        v["waypoint"] = gateway(Some(g));
    }
    if let Some(g) = w.network_gateway.as_deref() {
        v["networkGateway"] = gateway(Some(g));
    }
    if let Some(t) = &w.application_tunnel {
        v["applicationTunnel"] = json!({
            "protocol": match t.protocol { TunnelProtocol::None => "NONE", TunnelProtocol::Proxy => "PROXY" },
            "port": t.port,
        });
    }
    v
}

fn ports(p: &std::collections::BTreeMap<u16, u16>) -> Value {
    Value::Object(
        p.iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<Map<_, _>>(),
    )
}

/// A service, its endpoints keyed by workload uid.
pub fn service(e: &ServiceEntry) -> Value {
    let s = &e.service;
    let key = s.key().to_string();
    let endpoints: Map<String, Value> = e
        .endpoints
        .iter()
        .map(|(uid, ep)| {
            (
                uid.0.to_string(),
                json!({
                    "workloadUid": &*ep.workload_uid.0,
                    "service": key,
                    "port": ports(&ep.port),
                    "status": health(ep.status),
                }),
            )
        })
        .collect();
    let mut v = json!({
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": s.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ports": ports(&s.ports),
        "endpoints": endpoints,
        "subjectAltNames": s.subject_alt_names,
        "ipFamilies": match s.ip_families {
            None | Some(IpFamily::Dual) => "Dual",
            Some(IpFamily::V4) => "IPv4",
            Some(IpFamily::V6) => "IPv6",
        },
        "canonical": s.canonical,
    });
    if let Some(g) = &s.waypoint {
        v["waypoint"] = gateway(Some(g));
    }
    if let Some(lb) = &s.load_balancer {
        v["loadBalancer"] = json!({
            "mode": match lb.mode {
                LoadBalancerMode::Standard => "Standard",
                LoadBalancerMode::Strict => "Strict",
                LoadBalancerMode::Failover => "Failover",
                LoadBalancerMode::Passthrough => "Passthrough",
            },
            "routingPreferences": lb.routing_preferences.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>(),
            "healthPolicy": format!("{:?}", lb.health_policy),
        });
    }
    v
}

fn string_matches(ms: &[StringMatch]) -> Value {
    Value::Array(
        ms.iter()
            .map(|m| match m {
                StringMatch::Exact(x) => json!({"Exact": x}),
                StringMatch::Prefix(x) => json!({"Prefix": x}),
                StringMatch::Suffix(x) => json!({"Suffix": x}),
                StringMatch::Presence => json!({"Presence": []}),
            })
            .collect(),
    )
}

/// A match, with only the fields it sets (as Istio omits empty ones).
fn policy_match(m: &Match) -> Value {
    let nets = |n: &[ipnet::IpNet]| json!(n.iter().map(ToString::to_string).collect::<Vec<_>>());
    let sas = |s: &[crate::state::policy::ServiceAccountMatch]| {
        json!(s
            .iter()
            .map(|a| json!({"namespace": a.namespace, "serviceAccount": a.service_account}))
            .collect::<Vec<_>>())
    };
    let fields = [
        ("namespaces", string_matches(&m.namespaces)),
        ("notNamespaces", string_matches(&m.not_namespaces)),
        ("serviceAccounts", sas(&m.service_accounts)),
        ("notServiceAccounts", sas(&m.not_service_accounts)),
        ("principals", string_matches(&m.principals)),
        ("notPrincipals", string_matches(&m.not_principals)),
        ("sourceIps", nets(&m.source_ips)),
        ("notSourceIps", nets(&m.not_source_ips)),
        ("destinationIps", nets(&m.destination_ips)),
        ("notDestinationIps", nets(&m.not_destination_ips)),
        ("destinationPorts", json!(m.destination_ports)),
        ("notDestinationPorts", json!(m.not_destination_ports)),
    ];
    Value::Object(
        fields
            .into_iter()
            .filter(|(_, v)| v.as_array().is_none_or(|a| !a.is_empty()))
            .map(|(k, v)| (k.to_string(), v))
            .collect::<Map<String, Value>>(),
    )
}

pub fn policy(p: &Policy) -> Value {
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "scope": match p.scope {
            Scope::Global => "Global",
            Scope::Namespace => "Namespace",
            Scope::WorkloadSelector => "WorkloadSelector",
        },
        "action": match p.action { Action::Allow => "Allow", Action::Deny => "Deny" },
        "rules": p.rules.iter().map(|rule| {
            rule.iter().map(|clause| clause.iter().map(policy_match).collect::<Vec<_>>()).collect::<Vec<_>>()
        }).collect::<Vec<_>>(),
        "dryRun": p.dry_run,
    })
}

fn rfc3339(t: SystemTime) -> String {
    humantime(t)
}

/// One certificate as Istio dumps it: the PEM (base64, as Istio encodes it), the
/// serial number in decimal, and its validity.
fn cert(der: &CertificateDer<'_>) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = b64.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    let (serial, from, to) = match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok((_, c)) => {
            let t = |x: x509_parser::time::ASN1Time| {
                let secs = x.timestamp().max(0) as u64;
                rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            };
            (
                c.tbs_certificate.serial.to_str_radix(10),
                t(c.validity().not_before),
                t(c.validity().not_after),
            )
        }
        Err(e) => (format!("(unparsable: {e})"), String::new(), String::new()),
    };
    json!({
        "pem": b64.encode(pem),
        "serialNumber": serial,
        "validFrom": from,
        "expirationTime": to,
    })
}

/// How a certificate stands, for people: `valid until … (generation n)` (and
/// `renewal failing: …`), `being fetched`, `EXPIRED: …`, `FAILING (n attempts): …`.
pub fn cert_detail(state: &CertState) -> String {
    match state {
        CertState::Pending => "being fetched".into(),
        CertState::Valid {
            not_after,
            generation,
            renewal_error,
        } => match renewal_error {
            None => format!(
                "valid until {} (generation {generation})",
                rfc3339(*not_after)
            ),
            Some(e) => format!(
                "valid until {} (generation {generation}); renewal failing: {e}",
                rfc3339(*not_after)
            ),
        },
        CertState::Expired { error, .. } => format!("EXPIRED: {error}"),
        CertState::Failing { error, attempts } => {
            format!("FAILING ({attempts} attempts): {error}")
        }
    }
}

/// An identity's certificate: Istio's `state` (`Initializing`, `Available`,
/// `Unavailable: <why>`), its chain and roots; `detail` is ours.
pub fn certificate(id: &Identity, state: &CertState, held: Option<Arc<IdentityCert>>) -> Value {
    let name = match state {
        CertState::Pending => "Initializing".to_string(),
        CertState::Valid { .. } => "Available".into(),
        CertState::Expired { not_after, error } => {
            format!("Unavailable: expired at {}: {error}", rfc3339(*not_after))
        }
        CertState::Failing { error, .. } => format!("Unavailable: {error}"),
    };
    let (chain, roots) = match held {
        Some(c) => {
            let (chain, roots) = c.chain_and_roots();
            (
                chain.iter().map(cert).collect(),
                roots.iter().map(cert).collect(),
            )
        }
        None => (Vec::new(), Vec::new()),
    };
    json!({
        "identity": id.to_string(),
        "state": name,
        "certChain": chain,
        "rootCerts": roots,
        "detail": cert_detail(state),
    })
}

/// Per pod, by uid: Istio's `Up` (listeners serving) or `Pending` (being retried),
/// and who the pod is.
pub fn workload_state(
    pods: &[PodSummary],
    connections: &[Connection],
    trust_domain: impl Fn(&PodSummary) -> String,
) -> Value {
    Value::Object(
        pods.iter()
            .map(|p| {
                let listed = |inbound: bool| -> Vec<Value> {
                    connections
                        .iter()
                        .filter(|c| c.uid == p.uid && c.inbound == inbound)
                        .map(|c| {
                            json!({
                                "src": c.src.to_string(),
                                "originalDst": c.original_dst.to_string(),
                                "actualDst": c.actual_dst.to_string(),
                            })
                        })
                        .collect()
                };
                let mut v = json!({
                    "state": if p.running { "Up" } else { "Pending" },
                    "connections": {"inbound": listed(true), "outbound": listed(false)},
                    "info": {
                        "name": p.info.name,
                        "namespace": p.info.namespace,
                        "serviceAccount": p.info.service_account,
                        "trustDomain": trust_domain(p),
                    },
                });
                if let Some(e) = &p.error {
                    v["error"] = json!(e);
                }
                (p.uid.to_string(), v)
            })
            .collect(),
    )
}

/// What this build is, in Istio's `BuildInfo` field names.
pub fn version() -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "gitRevision": "unknown",
        "rustVersion": "unknown",
        "buildProfile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "buildStatus": "unknown",
        "gitTag": "unknown",
        "istioVersion": "unknown",
    })
}

/// The local config file as loaded (`{}` sections when there is none), in JSON.
pub fn static_config(path: Option<&std::path::Path>) -> Value {
    let empty = json!({"workloads": [], "policies": [], "services": []});
    let Some(path) = path else {
        return empty;
    };
    match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_saphyr::from_str::<Value>(&text).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => json!({"error": format!("{}: {e}", path.display())}),
    }
}

/// The effective configuration, from the `key: value` lines printed at startup.
pub fn config(lines: &[String]) -> Value {
    Value::Object(
        lines
            .iter()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}
