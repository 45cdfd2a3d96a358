//! Services: virtual addresses in front of workloads, and how a connection to one
//! picks its upstream (Istio's rules: the port must be the service's, endpoints are
//! ranked by locality when the service asks for it, weighted by capacity).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Deserialize;

use super::workload::{
    ApplicationTunnel, GatewayAddress, HealthStatus, NamespacedHostname, NetworkAddress, Uid,
    Workload,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum LoadBalancerMode {
    /// Any endpoint.
    Standard,
    /// Only endpoints that match the client on every routing preference.
    Strict,
    /// The endpoints that match the client on the longest prefix of the preferences.
    Failover,
    /// No endpoint is picked: the connection goes to the address it was made to.
    Passthrough,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

/// What a routing preference compares between the client and an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum RoutingScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

impl RoutingScope {
    fn same(self, a: &Workload, b: &Workload) -> bool {
        match self {
            RoutingScope::Region => a.locality.region == b.locality.region,
            RoutingScope::Zone => a.locality.zone == b.locality.zone,
            RoutingScope::Subzone => a.locality.subzone == b.locality.subzone,
            RoutingScope::Node => a.node == b.node,
            RoutingScope::Cluster => a.cluster_id == b.cluster_id,
            RoutingScope::Network => a.network == b.network,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LoadBalancer {
    pub routing_preferences: Vec<RoutingScope>,
    pub mode: LoadBalancerMode,
    pub health_policy: HealthPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum IpFamily {
    Dual,
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    pub fn accepts(self, ip: IpAddr) -> bool {
        match self {
            IpFamily::Dual => true,
            IpFamily::V4 => ip.is_ipv4(),
            IpFamily::V6 => ip.is_ipv6(),
        }
    }
}

/// Service port -> target port; shared between the copies of an endpoint.
pub type Ports = Arc<BTreeMap<u16, u16>>;

/// A workload behind a service, with its own port mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub workload_uid: Uid,
    /// Service port -> target port, overriding the service's.
    pub port: Ports,
    pub status: HealthStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<NetworkAddress>,
    /// Service port -> target port (0: only endpoints that map the port serve it).
    pub ports: BTreeMap<u16, u16>,
    pub endpoints: BTreeMap<Uid, Endpoint>,
    /// Identities, besides the endpoint's own, an upstream may present.
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
    pub load_balancer: Option<LoadBalancer>,
    pub ip_families: Option<IpFamily>,
    pub canonical: bool,
}

impl Service {
    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname::new(&self.namespace, &self.hostname)
    }

    /// Whether an endpoint in state `status` may be picked at all.
    pub fn admits(&self, status: HealthStatus) -> bool {
        status == HealthStatus::Healthy
            || self
                .load_balancer
                .as_ref()
                .is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll)
    }

    fn passthrough(&self) -> bool {
        self.load_balancer
            .as_ref()
            .is_some_and(|lb| lb.mode == LoadBalancerMode::Passthrough)
    }
}

/// An endpoint with its workload, as the snapshot resolved it.
#[derive(Clone, Debug)]
pub struct Backend {
    pub workload: Arc<Workload>,
    pub endpoint: Endpoint,
}

/// A service in a snapshot: the service, its endpoints (its own and those its
/// workloads declare), and the pickable ones (workload known, health admitted).
#[derive(Debug)]
pub struct ServiceEntry {
    pub service: Arc<Service>,
    pub endpoints: BTreeMap<Uid, Endpoint>,
    pub backends: Vec<Backend>,
    next: AtomicUsize,
}

/// What a connection to a service VIP gets.
#[derive(Clone, Debug)]
pub enum Pick {
    /// This workload, at this address.
    Upstream(Arc<Workload>, SocketAddr),
    /// A passthrough service: the address the connection was made to.
    OriginalDestination,
    /// This workload, which has a hostname and no address (a ServiceEntry endpoint
    /// with DNS resolution): its hostname, resolved when connecting, at this port.
    Hostname(Arc<Workload>, u16),
    /// Nothing can serve it (why, for the log).
    None(&'static str),
}

impl ServiceEntry {
    pub(super) fn new(
        service: Arc<Service>,
        endpoints: BTreeMap<Uid, Endpoint>,
        backends: Vec<Backend>,
    ) -> ServiceEntry {
        ServiceEntry {
            service,
            endpoints,
            backends,
            next: AtomicUsize::new(0),
        }
    }

    /// Picks the upstream of a connection from `src` to `dst` (one of the service's
    /// VIPs).
    pub fn pick(&self, src: &Workload, dst: SocketAddr) -> Pick {
        if self.service.passthrough() {
            return Pick::OriginalDestination;
        }
        let port = dst.port();
        let Some(&svc_target) = self.service.ports.get(&port) else {
            return Pick::None("the service has no such port");
        };
        let serving = |b: &Backend| svc_target != 0 || b.endpoint.port.contains_key(&port);
        let Some(chosen) = self.choose(src, serving) else {
            return Pick::None("no endpoint serves the port");
        };
        let target = match chosen.endpoint.port.get(&port) {
            Some(&p) => p,
            None if svc_target > 0 => svc_target,
            None => match &chosen.workload.application_tunnel {
                Some(ApplicationTunnel { port: Some(_), .. }) => port,
                _ => return Pick::None("no endpoint serves the port"),
            },
        };
        match pick_ip(&chosen.workload, dst.ip(), self.service.ip_families) {
            Some(ip) => Pick::Upstream(chosen.workload.clone(), SocketAddr::new(ip, target)),
            None if chosen.workload.ips.is_empty() && !chosen.workload.hostname.is_empty() => {
                Pick::Hostname(chosen.workload.clone(), target)
            }
            None => Pick::None("the endpoint has no address of a usable family"),
        }
    }

    /// Picks one of this (waypoint) service's endpoints to carry a connection from
    /// `src` to `original`, at its HBONE port `port`: the same ranking, no port
    /// mapping (a waypoint listens for HBONE itself).
    pub fn pick_waypoint(
        &self,
        src: &Workload,
        original: SocketAddr,
        port: u16,
    ) -> Option<(Arc<Workload>, SocketAddr)> {
        let chosen = self.choose(src, |_| true)?;
        let ip = pick_ip(&chosen.workload, original.ip(), self.service.ip_families)?;
        Some((chosen.workload.clone(), SocketAddr::new(ip, port)))
    }

    /// Whether `w` is one of the service's (pickable) endpoints.
    pub fn has_backend(&self, w: &Workload) -> bool {
        self.backends.iter().any(|b| b.workload.uid == w.uid)
    }

    /// One backend among those `eligible`, ranked by locality when the service asks,
    /// weighted by capacity. A backend on another network than `src`'s is reached only
    /// through its network gateway, which this build does not use: it is never
    /// eligible (its address means nothing, or something else, on this network).
    fn choose(&self, src: &Workload, eligible: impl Fn(&Backend) -> bool) -> Option<&Backend> {
        let eligible = |b: &Backend| b.workload.network == src.network && eligible(b);
        let candidates: Vec<&Backend> = match &self.service.load_balancer {
            Some(lb) if lb.mode != LoadBalancerMode::Standard => {
                let ranked: Vec<(usize, &Backend)> = self
                    .backends
                    .iter()
                    .filter(|b| eligible(b))
                    .filter_map(|b| {
                        let rank = lb
                            .routing_preferences
                            .iter()
                            .take_while(|s| s.same(src, &b.workload))
                            .count();
                        let strict_miss = lb.mode == LoadBalancerMode::Strict
                            && rank != lb.routing_preferences.len();
                        (!strict_miss).then_some((rank, b))
                    })
                    .collect();
                let best = ranked.iter().map(|(r, _)| *r).max();
                ranked
                    .into_iter()
                    .filter(|(r, _)| Some(*r) == best)
                    .map(|(_, b)| b)
                    .collect()
            }
            _ => self.backends.iter().filter(|b| eligible(b)).collect(),
        };
        weighted(&candidates, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// The `n`th pick over `candidates` weighted by capacity: over any run of picks as
/// long as the total capacity, each is picked as often as its capacity.
fn weighted<'a>(candidates: &[&'a Backend], n: usize) -> Option<&'a Backend> {
    let total: u64 = candidates
        .iter()
        .map(|b| u64::from(b.workload.capacity))
        .sum();
    if total == 0 {
        return None;
    }
    let mut at = (n as u64) % total;
    candidates.iter().copied().find(|b| {
        let c = u64::from(b.workload.capacity);
        if at < c {
            true
        } else {
            at -= c;
            false
        }
    })
}

/// The workload's address to connect to: the one the connection named, if it is the
/// workload's; else the first the service's families allow, preferring the family the
/// connection was made over.
fn pick_ip(w: &Workload, original: IpAddr, families: Option<IpFamily>) -> Option<IpAddr> {
    if w.ips.contains(&original) {
        return Some(original);
    }
    let allowed: Vec<IpAddr> = w
        .ips
        .iter()
        .copied()
        .filter(|ip| families.is_none_or(|f| f.accepts(*ip)))
        .collect();
    allowed
        .iter()
        .copied()
        .find(|ip| ip.is_ipv6() == original.is_ipv6())
        .or_else(|| allowed.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::workload::Locality;

    fn wl(name: &str, ips: &[&str], zone: &str, capacity: u32) -> Arc<Workload> {
        Arc::new(Workload {
            uid: Uid::from(name),
            name: name.into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            locality: Locality {
                region: "r".into(),
                zone: zone.into(),
                subzone: String::new(),
            },
            capacity,
            ..Workload::default()
        })
    }

    fn backend(w: &Arc<Workload>, ports: &[(u16, u16)]) -> Backend {
        Backend {
            workload: w.clone(),
            endpoint: Endpoint {
                workload_uid: w.uid.clone(),
                port: Arc::new(ports.iter().copied().collect()),
                status: HealthStatus::Healthy,
            },
        }
    }

    fn svc(ports: &[(u16, u16)], lb: Option<LoadBalancer>) -> Service {
        Service {
            name: "s".into(),
            namespace: "n".into(),
            hostname: "s.n.svc.cluster.local".into(),
            vips: vec!["/10.96.0.1".parse().unwrap()],
            ports: ports.iter().copied().collect(),
            endpoints: BTreeMap::new(),
            subject_alt_names: vec![],
            waypoint: None,
            load_balancer: lb,
            ip_families: None,
            canonical: false,
        }
    }

    fn picks(e: &ServiceEntry, src: &Workload, dst: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| match e.pick(src, dst.parse().unwrap()) {
                Pick::Upstream(w, a) => format!("{}@{a}", w.name),
                Pick::OriginalDestination => "original".into(),
                Pick::Hostname(w, port) => format!("{}@{}:{port}", w.name, w.hostname),
                Pick::None(why) => format!("none: {why}"),
            })
            .collect()
    }

    #[test]
    fn ports_come_from_the_endpoint_then_the_service() {
        let (a, b) = (
            wl("a", &["10.0.0.1"], "z1", 1),
            wl("b", &["10.0.0.2"], "z1", 1),
        );
        let e = ServiceEntry::new(
            Arc::new(svc(&[(80, 8080), (90, 0)], None)),
            BTreeMap::new(),
            vec![backend(&a, &[(80, 9090)]), backend(&b, &[])],
        );
        let src = wl("src", &[], "z1", 1);
        assert_eq!(
            picks(&e, &src, "10.96.0.1:80", 2),
            ["a@10.0.0.1:9090", "b@10.0.0.2:8080"]
        );
        // Target port 0: only endpoints mapping the port serve it; b does not.
        assert_eq!(
            picks(&e, &src, "10.96.0.1:90", 1),
            ["none: no endpoint serves the port"]
        );
        // A port the service does not have is refused even if an endpoint maps it.
        let e = ServiceEntry::new(
            Arc::new(svc(&[(80, 8080)], None)),
            BTreeMap::new(),
            vec![backend(&a, &[(81, 1)])],
        );
        assert_eq!(
            picks(&e, &src, "10.96.0.1:81", 1),
            ["none: the service has no such port"]
        );
    }

    #[test]
    fn endpoints_on_another_network_are_never_picked() {
        let here = wl("here", &["10.0.0.1"], "z", 1);
        let mut there = (*wl("there", &["10.0.0.2"], "z", 1)).clone();
        there.network = "remote".into();
        let there = Arc::new(there);
        let e = ServiceEntry::new(
            Arc::new(svc(&[(80, 80)], None)),
            BTreeMap::new(),
            vec![backend(&here, &[]), backend(&there, &[])],
        );
        let src = wl("src", &[], "z", 1);
        assert_eq!(picks(&e, &src, "10.96.0.1:80", 3), ["here@10.0.0.1:80"; 3]);
        let e = ServiceEntry::new(
            Arc::new(svc(&[(80, 80)], None)),
            BTreeMap::new(),
            vec![backend(&there, &[])],
        );
        assert_eq!(
            picks(&e, &src, "10.96.0.1:80", 1),
            ["none: no endpoint serves the port"]
        );
    }

    #[test]
    fn capacity_weights_the_picks() {
        let (a, b) = (
            wl("a", &["10.0.0.1"], "z", 3),
            wl("b", &["10.0.0.2"], "z", 1),
        );
        let e = ServiceEntry::new(
            Arc::new(svc(&[(80, 80)], None)),
            BTreeMap::new(),
            vec![backend(&a, &[]), backend(&b, &[])],
        );
        let got = picks(&e, &wl("src", &[], "z", 1), "10.96.0.1:80", 8);
        assert_eq!(got.iter().filter(|p| p.starts_with("a@")).count(), 6);
        assert_eq!(got.iter().filter(|p| p.starts_with("b@")).count(), 2);
    }

    #[test]
    fn strict_and_failover_rank_by_locality() {
        let near = wl("near", &["10.0.0.1"], "z1", 1);
        let far = wl("far", &["10.0.0.2"], "z2", 1);
        let lb = |mode| LoadBalancer {
            routing_preferences: vec![RoutingScope::Region, RoutingScope::Zone],
            mode,
            health_policy: HealthPolicy::OnlyHealthy,
        };
        let both = |mode| {
            ServiceEntry::new(
                Arc::new(svc(&[(80, 80)], Some(lb(mode)))),
                BTreeMap::new(),
                vec![backend(&near, &[]), backend(&far, &[])],
            )
        };
        let in_z1 = wl("src", &[], "z1", 1);
        let in_z3 = wl("src", &[], "z3", 1);
        let strict = both(LoadBalancerMode::Strict);
        assert_eq!(
            picks(&strict, &in_z1, "10.96.0.1:80", 2),
            ["near@10.0.0.1:80"; 2]
        );
        assert_eq!(
            picks(&strict, &in_z3, "10.96.0.1:80", 1),
            ["none: no endpoint serves the port"]
        );
        let failover = both(LoadBalancerMode::Failover);
        assert_eq!(
            picks(&failover, &in_z1, "10.96.0.1:80", 2),
            ["near@10.0.0.1:80"; 2]
        );
        // Nobody in z3: both match on region only, so both are picked.
        assert_eq!(
            picks(&failover, &in_z3, "10.96.0.1:80", 2),
            ["near@10.0.0.1:80", "far@10.0.0.2:80"]
        );
        let standard = both(LoadBalancerMode::Standard);
        assert_eq!(
            picks(&standard, &in_z1, "10.96.0.1:80", 2),
            ["near@10.0.0.1:80", "far@10.0.0.2:80"]
        );
        let pass = both(LoadBalancerMode::Passthrough);
        assert_eq!(picks(&pass, &in_z1, "10.96.0.1:80", 1), ["original"]);
    }

    #[test]
    fn the_address_family_follows_the_connection_unless_the_service_restricts_it() {
        let dual = wl("d", &["10.0.0.1", "fd00::1"], "z", 1);
        let e = ServiceEntry::new(
            Arc::new(svc(&[(80, 80)], None)),
            BTreeMap::new(),
            vec![backend(&dual, &[])],
        );
        let src = wl("src", &[], "z", 1);
        assert_eq!(picks(&e, &src, "10.96.0.1:80", 1), ["d@10.0.0.1:80"]);
        assert_eq!(picks(&e, &src, "[fd96::1]:80", 1), ["d@[fd00::1]:80"]);
        let mut only6 = svc(&[(80, 80)], None);
        only6.ip_families = Some(IpFamily::V6);
        let e = ServiceEntry::new(Arc::new(only6), BTreeMap::new(), vec![backend(&dual, &[])]);
        assert_eq!(picks(&e, &src, "10.96.0.1:80", 1), ["d@[fd00::1]:80"]);
        let v4 = wl("v4", &["10.0.0.2"], "z", 1);
        let mut only6 = svc(&[(80, 80)], None);
        only6.ip_families = Some(IpFamily::V6);
        let e = ServiceEntry::new(Arc::new(only6), BTreeMap::new(), vec![backend(&v4, &[])]);
        assert_eq!(
            picks(&e, &src, "10.96.0.1:80", 1),
            ["none: the endpoint has no address of a usable family"]
        );
    }

    #[test]
    fn an_endpoint_known_by_hostname_only_is_picked_to_be_resolved() {
        let mut external = (*wl("ext", &[], "z", 1)).clone();
        external.hostname = "api.example.com".into();
        let src = wl("src", &[], "z", 1);
        // The one endpoint `w`, the service mapping port 80 to 8080.
        let pick = |w: Arc<Workload>| {
            let e = ServiceEntry::new(
                Arc::new(svc(&[(80, 8080)], None)),
                BTreeMap::new(),
                vec![backend(&w, &[])],
            );
            picks(&e, &src, "10.96.0.1:80", 1)
        };
        assert_eq!(pick(Arc::new(external)), ["ext@api.example.com:8080"]);
        // No address and no hostname: nothing to reach.
        assert_eq!(
            pick(wl("nowhere", &[], "z", 1)),
            ["none: the endpoint has no address of a usable family"]
        );
    }
}
