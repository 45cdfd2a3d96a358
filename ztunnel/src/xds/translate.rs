//! istiod's resources, translated into the domain model: the second translator beside
//! the local file's. Each resource is translated on its own, and one that cannot be
//! says why (it is NACKed; the rest of its response still applies).
//!
//! Where Istio's ztunnel silently drops a value it cannot read (a CIDR of the wrong
//! length, a port above 65535, a string match with no kind) — which can widen a
//! policy's match — this translator refuses the resource instead.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::proto::istio::security as xsec;
use crate::proto::istio::workload as xwl;
use crate::state::policy::{
    Action, Match, Policy, PolicyKey, Scope, ServiceAccountMatch, StringMatch,
};
use crate::state::service::{
    Endpoint, HealthPolicy, IpFamily, LoadBalancer, LoadBalancerMode, Ports, RoutingScope, Service,
};
use crate::state::workload::{
    ApplicationTunnel, GatewayAddress, GatewayDestination, HealthStatus, Locality,
    NamespacedHostname, NetworkAddress, NetworkMode, Protocol, TunnelProtocol, Uid, Workload,
};

pub type Endpoints = Vec<(NamespacedHostname, Endpoint)>;

/// Shares what many workloads repeat (service names, port maps) instead of holding a
/// copy per workload. Bounded: past its size it starts over.
#[derive(Clone, Debug, Default)]
pub struct Interner {
    strs: std::collections::HashSet<std::sync::Arc<str>, foldhash::fast::RandomState>,
    ports: HashMap<BTreeMap<u16, u16>, Ports, foldhash::fast::RandomState>,
}

const INTERNER_MAX: usize = 100_000;

impl Interner {
    fn str(&mut self, s: &str) -> std::sync::Arc<str> {
        if let Some(held) = self.strs.get(s) {
            return held.clone();
        }
        if self.strs.len() >= INTERNER_MAX {
            self.strs.clear();
        }
        let shared: std::sync::Arc<str> = s.into();
        self.strs.insert(shared.clone());
        shared
    }

    fn ports(&mut self, m: BTreeMap<u16, u16>) -> Ports {
        if let Some(held) = self.ports.get(&m) {
            return held.clone();
        }
        if self.ports.len() >= INTERNER_MAX {
            self.ports.clear();
        }
        let shared = Ports::new(m.clone());
        self.ports.insert(m, shared.clone());
        shared
    }

    /// Takes in what another interner (a copy of this one, used on another thread)
    /// added.
    pub fn absorb(&mut self, other: Interner) {
        for s in other.strs {
            if self.strs.len() >= INTERNER_MAX {
                break;
            }
            self.strs.insert(s);
        }
        for (m, p) in other.ports {
            if self.ports.len() >= INTERNER_MAX {
                break;
            }
            self.ports.entry(m).or_insert(p);
        }
    }

    fn service_name(&mut self, key: &str) -> Result<NamespacedHostname, String> {
        let nh: NamespacedHostname = key.parse().map_err(|e| format!("services: {e}"))?;
        Ok(NamespacedHostname {
            namespace: self.str(&nh.namespace),
            hostname: self.str(&nh.hostname),
        })
    }
}

/// An address from istiod, in its canonical form (an IPv4-mapped IPv6 address as
/// IPv4, the form connections carry).
fn ip(bytes: &[u8], field: &str) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).map_err(|_| field)?)),
        16 => Ok(crate::state::addr::canonical_ip(IpAddr::from(
            <[u8; 16]>::try_from(bytes).map_err(|_| field)?,
        ))),
        n => Err(format!(
            "{field}: an address of {n} bytes (4 or 16 expected)"
        )),
    }
}

fn port(p: u32, field: &str) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("{field}: port {p} is above 65535"))
}

fn ports(list: &[xwl::Port], field: &str) -> Result<BTreeMap<u16, u16>, String> {
    list.iter()
        .map(|p| Ok((port(p.service_port, field)?, port(p.target_port, field)?)))
        .collect()
}

fn enum_value<T: TryFrom<i32>>(v: i32, field: &str) -> Result<T, String> {
    T::try_from(v).map_err(|_| format!("{field}: unknown value {v}"))
}

fn network_address(a: &xwl::NetworkAddress, field: &str) -> Result<NetworkAddress, String> {
    Ok(NetworkAddress {
        network: a.network.clone(),
        address: ip(&a.address, field)?,
    })
}

fn gateway(g: &Option<xwl::GatewayAddress>, field: &str) -> Result<Option<GatewayAddress>, String> {
    let Some(g) = g else { return Ok(None) };
    use xwl::gateway_address::Destination as D;
    let destination = match &g.destination {
        Some(D::Address(a)) => GatewayDestination::Address(network_address(a, field)?),
        Some(D::Hostname(h)) => {
            GatewayDestination::Hostname(NamespacedHostname::new(&h.namespace, &h.hostname))
        }
        None => return Err(format!("{field}: no address or hostname")),
    };
    Ok(Some(GatewayAddress {
        destination,
        hbone_mtls_port: port(g.hbone_mtls_port, field)?,
    }))
}

/// A workload, and the endpoints it declares for the services it backs. Takes the
/// message: its strings move into the domain object instead of being copied.
pub fn workload(w: xwl::Workload, shared: &mut Interner) -> Result<(Workload, Endpoints), String> {
    let uid = Uid::from(w.uid.as_str());
    let status = match enum_value::<xwl::WorkloadStatus>(w.status, "status")? {
        xwl::WorkloadStatus::Healthy => HealthStatus::Healthy,
        xwl::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
    };
    let mut endpoints = Vec::new();
    let mut services = Vec::new();
    for (key, list) in &w.services {
        let svc = shared.service_name(key)?;
        endpoints.push((
            svc.clone(),
            Endpoint {
                workload_uid: uid.clone(),
                port: shared.ports(ports(&list.ports, "services")?),
                status,
            },
        ));
        services.push(svc);
    }
    let protocol = match enum_value::<xwl::TunnelProtocol>(w.tunnel_protocol, "tunnel_protocol")? {
        xwl::TunnelProtocol::None => Protocol::Tcp,
        xwl::TunnelProtocol::Hbone => Protocol::Hbone,
    };
    let network_mode = match enum_value::<xwl::NetworkMode>(w.network_mode, "network_mode")? {
        xwl::NetworkMode::Standard => NetworkMode::Standard,
        xwl::NetworkMode::HostNetwork => NetworkMode::HostNetwork,
    };
    let workload_type = enum_value::<xwl::WorkloadType>(w.workload_type, "workload_type")?
        .as_str_name()
        .to_ascii_lowercase();
    let application_tunnel = match &w.application_tunnel {
        None => None,
        Some(t) => Some(ApplicationTunnel {
            protocol: match enum_value::<xwl::application_tunnel::Protocol>(
                t.protocol,
                "application_tunnel",
            )? {
                xwl::application_tunnel::Protocol::None => TunnelProtocol::None,
                xwl::application_tunnel::Protocol::Proxy => TunnelProtocol::Proxy,
            },
            port: match t.port {
                0 => None,
                p => Some(port(p, "application_tunnel")?),
            },
        }),
    };
    let workload = Workload {
        uid,
        name: w.name,
        namespace: w.namespace,
        trust_domain: w.trust_domain,
        service_account: w.service_account,
        network: w.network,
        ips: w
            .addresses
            .iter()
            .map(|a| ip(a, "addresses"))
            .collect::<Result<_, _>>()?,
        waypoint: gateway(&w.waypoint, "waypoint")?.map(Box::new),
        network_gateway: gateway(&w.network_gateway, "network_gateway")?.map(Box::new),
        protocol,
        network_mode,
        workload_name: w.workload_name,
        workload_type,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        hostname: w.hostname,
        node: w.node,
        native_tunnel: w.native_tunnel,
        application_tunnel,
        authorization_policies: w
            .authorization_policies
            .into_iter()
            .map(PolicyKey)
            .collect(),
        status,
        cluster_id: if w.cluster_id.is_empty() {
            "Kubernetes".into()
        } else {
            w.cluster_id
        },
        locality: w
            .locality
            .map(|l| Locality {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
            })
            .unwrap_or_default(),
        services,
        capacity: w.capacity.unwrap_or(1),
    }
    .with_defaults(crate::state::workload::DEFAULT_TRUST_DOMAIN);
    Ok((workload, endpoints))
}

pub fn service(s: &xwl::Service) -> Result<Service, String> {
    let load_balancer = match &s.load_balancing {
        None => None,
        Some(lb) => {
            use xwl::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
            let routing_preferences = lb
                .routing_preference
                .iter()
                .map(|v| {
                    Ok(match enum_value::<S>(*v, "routing_preference")? {
                        S::Region => RoutingScope::Region,
                        S::Zone => RoutingScope::Zone,
                        S::Subzone => RoutingScope::Subzone,
                        S::Node => RoutingScope::Node,
                        S::Cluster => RoutingScope::Cluster,
                        S::Network => RoutingScope::Network,
                        S::UnspecifiedScope => {
                            return Err("routing_preference: unspecified scope".to_string())
                        }
                    })
                })
                .collect::<Result<_, String>>()?;
            Some(LoadBalancer {
                routing_preferences,
                mode: match enum_value::<M>(lb.mode, "load_balancing.mode")? {
                    M::UnspecifiedMode => LoadBalancerMode::Standard,
                    M::Strict => LoadBalancerMode::Strict,
                    M::Failover => LoadBalancerMode::Failover,
                    M::Passthrough => LoadBalancerMode::Passthrough,
                },
                health_policy: match enum_value::<H>(lb.health_policy, "health_policy")? {
                    H::OnlyHealthy => HealthPolicy::OnlyHealthy,
                    H::AllowAll => HealthPolicy::AllowAll,
                },
            })
        }
    };
    let ip_families = match enum_value::<xwl::IpFamilies>(s.ip_families, "ip_families")? {
        xwl::IpFamilies::Automatic => None,
        xwl::IpFamilies::Ipv4Only => Some(IpFamily::V4),
        xwl::IpFamilies::Ipv6Only => Some(IpFamily::V6),
        xwl::IpFamilies::Dual => Some(IpFamily::Dual),
    };
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips: s
            .addresses
            .iter()
            .map(|a| network_address(a, "addresses"))
            .collect::<Result<_, _>>()?,
        ports: ports(&s.ports, "ports")?,
        endpoints: BTreeMap::new(),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: gateway(&s.waypoint, "waypoint")?,
        load_balancer,
        ip_families,
        canonical: s.canonical,
    })
}

fn string_matches(v: &[xsec::StringMatch], field: &str) -> Result<Vec<StringMatch>, String> {
    use xsec::string_match::MatchType as T;
    v.iter()
        .map(|m| match &m.match_type {
            Some(T::Exact(x)) => Ok(StringMatch::Exact(x.clone())),
            Some(T::Prefix(x)) => Ok(StringMatch::Prefix(x.clone())),
            Some(T::Suffix(x)) => Ok(StringMatch::Suffix(x.clone())),
            Some(T::Presence(_)) => Ok(StringMatch::Presence),
            None => Err(format!("{field}: a string match with no kind")),
        })
        .collect()
}

fn nets(v: &[xsec::Address], field: &str) -> Result<Vec<IpNet>, String> {
    v.iter()
        .map(|a| {
            // The address as sent (a mapped range's prefix counts its 96 bits), then
            // the range made canonical.
            let addr = match a.address.len() {
                16 => IpAddr::from(<[u8; 16]>::try_from(a.address.as_slice()).map_err(|_| field)?),
                _ => ip(&a.address, field)?,
            };
            let len =
                u8::try_from(a.length).map_err(|_| format!("{field}: prefix /{}", a.length))?;
            IpNet::new(addr, len)
                .map(crate::state::addr::canonical_net)
                .map_err(|_| format!("{field}: {addr}/{len} is not a CIDR"))
        })
        .collect()
}

fn accounts(v: &[xsec::ServiceAccountMatch]) -> Vec<ServiceAccountMatch> {
    v.iter()
        .map(|a| ServiceAccountMatch {
            namespace: a.namespace.clone(),
            service_account: a.service_account.clone(),
        })
        .collect()
}

fn ports_of(v: &[u32], field: &str) -> Result<Vec<u16>, String> {
    v.iter().map(|p| port(*p, field)).collect()
}

fn rbac_match(m: &xsec::Match) -> Result<Match, String> {
    Ok(Match {
        namespaces: string_matches(&m.namespaces, "namespaces")?,
        not_namespaces: string_matches(&m.not_namespaces, "not_namespaces")?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: string_matches(&m.principals, "principals")?,
        not_principals: string_matches(&m.not_principals, "not_principals")?,
        source_ips: nets(&m.source_ips, "source_ips")?,
        not_source_ips: nets(&m.not_source_ips, "not_source_ips")?,
        destination_ips: nets(&m.destination_ips, "destination_ips")?,
        not_destination_ips: nets(&m.not_destination_ips, "not_destination_ips")?,
        destination_ports: ports_of(&m.destination_ports, "destination_ports")?,
        not_destination_ports: ports_of(&m.not_destination_ports, "not_destination_ports")?,
    })
}

/// What takes the place of an Authorization ztunnel refuses (a field it cannot read),
/// so that refusing it never widens access: in its scope (its namespace's when the
/// scope itself is unreadable), a refused ALLOW becomes an ALLOW that matches nothing
/// (the scope denies everything, as if the policy allowed nothing), and a refused DENY
/// (or one whose action is unreadable) a DENY of everything. The NACK names the
/// policy and says which stands in.
pub fn stand_in(a: &xsec::Authorization) -> Policy {
    let scope = match enum_value::<xsec::Scope>(a.scope, "scope") {
        Ok(xsec::Scope::Global) => Scope::Global,
        Ok(xsec::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Ok(xsec::Scope::Namespace) | Err(_) => Scope::Namespace,
    };
    let (action, rules) = match enum_value::<xsec::Action>(a.action, "action") {
        Ok(xsec::Action::Allow) => (Action::Allow, Vec::new()),
        Ok(xsec::Action::Deny) | Err(_) => (Action::Deny, vec![Vec::new()]),
    };
    Policy {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    }
}

pub fn policy(a: &xsec::Authorization) -> Result<Policy, String> {
    let rules = a
        .rules
        .iter()
        .map(|r| {
            r.clauses
                .iter()
                .map(|c| {
                    c.matches
                        .iter()
                        .map(rbac_match)
                        .collect::<Result<Vec<_>, _>>()
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Policy {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: match enum_value::<xsec::Scope>(a.scope, "scope")? {
            xsec::Scope::Global => Scope::Global,
            xsec::Scope::Namespace => Scope::Namespace,
            xsec::Scope::WorkloadSelector => Scope::WorkloadSelector,
        },
        action: match enum_value::<xsec::Action>(a.action, "action")? {
            xsec::Action::Allow => Action::Allow,
            xsec::Action::Deny => Action::Deny,
        },
        rules,
        dry_run: a.dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_with(m: xsec::Match) -> xsec::Authorization {
        xsec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            rules: vec![xsec::Rule {
                clauses: vec![xsec::Clause { matches: vec![m] }],
            }],
            ..Default::default()
        }
    }

    fn wl() -> xwl::Workload {
        xwl::Workload {
            uid: "Kubernetes//Pod/ns/a".into(),
            name: "a".into(),
            namespace: "ns".into(),
            addresses: vec![
                vec![10, 0, 0, 1],
                "fd00::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets()
                    .to_vec(),
            ],
            tunnel_protocol: xwl::TunnelProtocol::Hbone as i32,
            services: [(
                "ns/s.ns.svc.cluster.local".to_string(),
                xwl::PortList {
                    ports: vec![xwl::Port {
                        service_port: 80,
                        target_port: 8080,
                    }],
                },
            )]
            .into(),
            waypoint: Some(xwl::GatewayAddress {
                destination: Some(xwl::gateway_address::Destination::Hostname(
                    xwl::NamespacedHostname {
                        namespace: "ns".into(),
                        hostname: "waypoint.ns.svc.cluster.local".into(),
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            workload_type: xwl::WorkloadType::Deployment as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_workload_keeps_everything_and_gets_istios_defaults() {
        let (w, eps) = workload(wl(), &mut Interner::default()).unwrap();
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/ns/sa/default"
        );
        assert_eq!(w.ips.len(), 2);
        assert_eq!(w.protocol, Protocol::Hbone);
        assert_eq!((w.cluster_id.as_str(), w.capacity), ("Kubernetes", 1));
        assert_eq!(w.workload_type, "deployment");
        assert!(matches!(
            &w.waypoint.as_ref().unwrap().destination,
            GatewayDestination::Hostname(h) if &*h.hostname == "waypoint.ns.svc.cluster.local"
        ));
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].1.port[&80], 8080);
    }

    #[test]
    fn unreadable_values_refuse_the_resource_with_the_reason() {
        let mut bad = wl();
        bad.addresses.push(vec![1, 2, 3]);
        assert!(workload(bad, &mut Interner::default())
            .unwrap_err()
            .contains("3 bytes"));
        let mut bad = wl();
        bad.services
            .insert("no-slash".into(), xwl::PortList::default());
        assert!(workload(bad, &mut Interner::default())
            .unwrap_err()
            .contains("<namespace>/<hostname>"));
        let mut bad = wl();
        bad.tunnel_protocol = 9;
        assert!(workload(bad, &mut Interner::default())
            .unwrap_err()
            .contains("tunnel_protocol"));

        let err = policy(&policy_with(xsec::Match {
            source_ips: vec![xsec::Address {
                address: vec![10, 0, 0, 0],
                length: 33,
            }],
            ..Default::default()
        }))
        .unwrap_err();
        assert!(err.contains("source_ips"), "{err}");
        let err = policy(&policy_with(xsec::Match {
            destination_ports: vec![70000],
            ..Default::default()
        }))
        .unwrap_err();
        assert!(err.contains("70000"), "{err}");
        let err = policy(&policy_with(xsec::Match {
            principals: vec![xsec::StringMatch { match_type: None }],
            ..Default::default()
        }))
        .unwrap_err();
        assert!(err.contains("no kind"), "{err}");
        let ok = policy(&policy_with(xsec::Match {
            source_ips: vec![xsec::Address {
                address: vec![10, 0, 0, 0],
                length: 8,
            }],
            service_accounts: vec![xsec::ServiceAccountMatch {
                namespace: "ns".into(),
                service_account: "sa".into(),
            }],
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(ok.rules[0][0][0].source_ips[0].to_string(), "10.0.0.0/8");
        assert_eq!(ok.key().to_string(), "ns/p");
    }

    /// IPv4 sent in its IPv6-mapped form is kept as IPv4, the form connections carry:
    /// otherwise the workload is unknown (plaintext) and the range never matches.
    #[test]
    fn ipv4_mapped_addresses_and_ranges_are_made_ipv4() {
        let mapped = |a: &str| a.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
        let mut w = wl();
        w.addresses = vec![mapped("::ffff:10.0.0.7")];
        let (w, _) = workload(w, &mut Interner::default()).unwrap();
        assert_eq!(w.ips, ["10.0.0.7".parse::<IpAddr>().unwrap()]);
        let p = policy(&policy_with(xsec::Match {
            source_ips: vec![xsec::Address {
                address: mapped("::ffff:10.0.0.0"),
                length: 104,
            }],
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(p.rules[0][0][0].source_ips[0].to_string(), "10.0.0.0/8");
    }

    #[test]
    fn a_service_with_locality_preferences() {
        let s = service(&xwl::Service {
            name: "s".into(),
            namespace: "ns".into(),
            hostname: "s.ns.svc.cluster.local".into(),
            addresses: vec![xwl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 1],
            }],
            ports: vec![xwl::Port {
                service_port: 80,
                target_port: 8080,
            }],
            load_balancing: Some(xwl::LoadBalancing {
                routing_preference: vec![1, 2],
                mode: 1,
                health_policy: 1,
            }),
            ip_families: 3,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.vips[0].to_string(), "/10.96.0.1");
        let lb = s.load_balancer.unwrap();
        assert_eq!(
            lb.routing_preferences,
            [RoutingScope::Region, RoutingScope::Zone]
        );
        assert_eq!(
            (lb.mode, lb.health_policy),
            (LoadBalancerMode::Strict, HealthPolicy::AllowAll)
        );
        assert_eq!(s.ip_families, Some(IpFamily::Dual));
    }
}
