//! The local file, translated into the domain model: each entry becomes a builder
//! call, and every error names the entry it is in.

use std::sync::Arc;

use ipnet::IpNet;

use super::builder::{BuildError, Objects, StateBuilder};
use super::index::WorkloadEntry;
use super::localconfig::{
    LocalConfig, LocalGateway, LocalMatch, LocalPolicy, LocalService, LocalServiceAccountMatch,
    LocalStringMatch, LocalWorkload,
};
use super::policy::{Match, Policy, PolicyKey, ServiceAccountMatch, StringMatch};
use super::service::{Endpoint, LoadBalancer, Service};
use super::workload::{
    ApplicationTunnel, GatewayAddress, GatewayDestination, Locality, NamespacedHostname,
    NetworkAddress, Uid, Workload,
};

/// What is wrong, and where in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub location: String,
    pub message: String,
}

fn at(location: &str) -> impl Fn(String) -> Invalid + '_ {
    move |message| Invalid {
        location: location.to_string(),
        message,
    }
}

/// Translates `cfg` into domain objects, checked for consistency on their own (keys
/// unique, VIPs unshared); workloads without a trust domain get `trust_domain`
/// (ztunnel's `TRUST_DOMAIN`). Returns the warnings worth an operator's attention
/// (things that load, but cannot mean what they seem to).
pub fn translate(cfg: LocalConfig, trust_domain: &str) -> Result<(Objects, Vec<String>), Invalid> {
    let mut check = StateBuilder::new(None);
    let mut objects = Objects::default();
    let mut warnings = Vec::new();
    for (i, w) in cfg.workloads.into_iter().enumerate() {
        let loc = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
        let (workload, endpoints) = workload(w).map_err(at(&loc))?;
        let entry = WorkloadEntry::new(workload.with_defaults(trust_domain), endpoints);
        check
            .workload(entry.clone())
            .map_err(|e| at(&loc)(explain(e)))?;
        objects.workloads.push(entry);
    }
    for (i, s) in cfg.services.into_iter().enumerate() {
        let loc = format!("services[{i}] ({}/{})", s.namespace, s.name);
        let service = Arc::new(service(s).map_err(at(&loc))?);
        check
            .service(service.clone())
            .map_err(|e| at(&loc)(explain(e)))?;
        objects.services.push(service);
    }
    for (i, p) in cfg.policies.into_iter().enumerate() {
        let loc = format!("policies[{i}] ({}/{})", p.namespace, p.name);
        let policy = policy(p, &mut |w| warnings.push(format!("{loc}: {w}"))).map_err(at(&loc))?;
        let policy = Arc::new(policy);
        check
            .policy(policy.clone())
            .map_err(|e| at(&loc)(explain(e)))?;
        objects.policies.push(policy);
    }
    check.build().map_err(|e| Invalid {
        location: "services".into(),
        message: explain(e),
    })?;
    Ok((objects, warnings))
}

fn explain(e: BuildError) -> String {
    match e {
        BuildError::DuplicateWorkload(uid) if uid.0.is_empty() => "a second workload without a uid: give each workload a unique uid (Istio's ztunnel keys workloads by uid and would keep only the last)".into(),
        other => other.to_string(),
    }
}

fn gateway(g: Option<LocalGateway>, field: &str) -> Result<Option<GatewayAddress>, String> {
    let Some(g) = g else { return Ok(None) };
    let destination = match g.destination.parse::<NetworkAddress>() {
        Ok(addr) => GatewayDestination::Address(addr),
        Err(_) => GatewayDestination::Hostname(g.destination.parse().map_err(|_| {
            format!(
                "{field}.destination: {:?} is neither \"<network>/<ip>\" nor \"<namespace>/<hostname>\"",
                g.destination
            )
        })?),
    };
    Ok(Some(GatewayAddress {
        destination,
        hbone_mtls_port: g.hbone_mtls_port,
    }))
}

type Endpoints = Vec<(NamespacedHostname, Endpoint)>;

fn workload(w: LocalWorkload) -> Result<(Workload, Endpoints), String> {
    let uid = Uid::from(w.uid.as_str());
    let mut endpoints = Vec::new();
    let mut services = Vec::new();
    for (key, ports) in w.services {
        let svc: NamespacedHostname = key.parse().map_err(|e| format!("services: {e}"))?;
        endpoints.push((
            svc.clone(),
            Endpoint {
                workload_uid: uid.clone(),
                port: Arc::new(ports),
                status: w.status,
            },
        ));
        services.push(svc);
    }
    let workload = Workload {
        uid,
        name: w.name,
        namespace: w.namespace,
        trust_domain: w.trust_domain,
        service_account: w.service_account,
        network: w.network,
        ips: w
            .workload_ips
            .into_iter()
            .map(|ip| super::addr::refuse_mapped_ip("workloadIps", ip))
            .collect::<Result<_, _>>()?,
        waypoint: gateway(w.waypoint, "waypoint")?.map(Box::new),
        network_gateway: gateway(w.network_gateway, "networkGateway")?.map(Box::new),
        protocol: w.protocol,
        network_mode: w.network_mode,
        workload_name: w.workload_name,
        workload_type: w.workload_type,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        hostname: w.hostname,
        node: w.node,
        native_tunnel: w.native_tunnel,
        application_tunnel: w.application_tunnel.map(|t| ApplicationTunnel {
            protocol: t.protocol,
            port: t.port,
        }),
        authorization_policies: w
            .authorization_policies
            .into_iter()
            .map(PolicyKey)
            .collect(),
        status: w.status,
        cluster_id: w.cluster_id,
        locality: Locality {
            region: w.locality.region,
            zone: w.locality.zone,
            subzone: w.locality.subzone,
        },
        services,
        capacity: w.capacity,
    };
    Ok((workload, endpoints))
}

fn service(s: LocalService) -> Result<Service, String> {
    let vips = s
        .vips
        .iter()
        .map(|v| {
            v.parse::<NetworkAddress>()
                .map_err(|e| format!("vips: {e}"))
                .and_then(|a| {
                    super::addr::refuse_mapped_ip("vips", a.address)?;
                    Ok(a)
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Service {
        vips,
        ports: s.ports,
        endpoints: s
            .endpoints
            .into_values()
            .map(|ep| {
                let uid = Uid::from(ep.workload_uid.as_str());
                let endpoint = Endpoint {
                    workload_uid: uid.clone(),
                    port: Arc::new(ep.port),
                    status: ep.status,
                };
                (uid, endpoint)
            })
            .collect(),
        subject_alt_names: s.subject_alt_names,
        waypoint: gateway(s.waypoint, "waypoint")?,
        load_balancer: s.load_balancer.map(|lb| LoadBalancer {
            routing_preferences: lb.routing_preferences,
            mode: lb.mode,
            health_policy: lb.health_policy,
        }),
        ip_families: s.ip_families,
        canonical: s.canonical,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
    })
}

fn string_match(m: LocalStringMatch) -> StringMatch {
    match m {
        LocalStringMatch::Exact(x) => StringMatch::Exact(x),
        LocalStringMatch::Prefix(x) => StringMatch::Prefix(x),
        LocalStringMatch::Suffix(x) => StringMatch::Suffix(x),
        LocalStringMatch::Presence() => StringMatch::Presence,
    }
}

fn strings(v: Vec<LocalStringMatch>) -> Vec<StringMatch> {
    v.into_iter().map(string_match).collect()
}

fn accounts(v: Vec<LocalServiceAccountMatch>) -> Vec<ServiceAccountMatch> {
    v.into_iter()
        .map(|a| ServiceAccountMatch {
            namespace: a.namespace,
            service_account: a.service_account,
        })
        .collect()
}

fn nets(field: &str, v: Vec<String>) -> Result<Vec<IpNet>, String> {
    v.into_iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map_err(|_| match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => format!(
                        "{field}: {s:?} is an address, not a CIDR: write {s}/{}",
                        if ip.is_ipv4() { 32 } else { 128 }
                    ),
                    Err(_) => format!("{field}: {s:?} is not a CIDR"),
                })
                .and_then(|net| super::addr::refuse_mapped_net(field, net))
        })
        .collect()
}

fn rbac_match(m: LocalMatch, warn: &mut dyn FnMut(String)) -> Result<Match, String> {
    let principals = strings(m.principals);
    let not_principals = strings(m.not_principals);
    for p in principals.iter().chain(&not_principals) {
        if let StringMatch::Exact(x) | StringMatch::Prefix(x) = p {
            if x.starts_with("spiffe://") {
                warn(format!(
                    "principal {x:?} never matches: principals are written without \"spiffe://\""
                ));
            }
        }
    }
    Ok(Match {
        namespaces: strings(m.namespaces),
        not_namespaces: strings(m.not_namespaces),
        service_accounts: accounts(m.service_accounts),
        not_service_accounts: accounts(m.not_service_accounts),
        principals,
        not_principals,
        source_ips: nets("sourceIps", m.source_ips)?,
        not_source_ips: nets("notSourceIps", m.not_source_ips)?,
        destination_ips: nets("destinationIps", m.destination_ips)?,
        not_destination_ips: nets("notDestinationIps", m.not_destination_ips)?,
        destination_ports: m.destination_ports,
        not_destination_ports: m.not_destination_ports,
    })
}

fn policy(p: LocalPolicy, warn: &mut dyn FnMut(String)) -> Result<Policy, String> {
    let rules = p
        .rules
        .into_iter()
        .map(|rule| {
            rule.into_iter()
                .map(|clause| {
                    clause
                        .into_iter()
                        .map(|m| rbac_match(m, warn))
                        .collect::<Result<Vec<_>, _>>()
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Policy {
        name: p.name,
        namespace: p.namespace,
        scope: p.scope,
        action: p.action,
        rules,
        dry_run: p.dry_run,
    })
}
