//! What ztunnel knows about the mesh: workloads, services and policies, from the local
//! configuration file, indexed for the lookups the data path makes per connection.
//!
//! - [`localconfig`]: the file's schema.
//! - [`MeshState`]: one immutable, validated snapshot with its indexes.
//! - [`Store`]: the current snapshot, swapped whole on reload; subscribers are told.
//! - [`watch`]: reloads the file when it changes.

pub mod localconfig;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use localconfig::{ConfigError, LocalConfig, Protocol};

use crate::authz::{Policy, PolicySet};
use crate::identity::Identity;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub ips: Vec<IpAddr>,
    pub protocol: Protocol,
    pub node: String,
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    pub authorization_policies: Vec<String>,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: BTreeMap<u16, u16>,
    /// Workloads that back this service.
    pub endpoints: Vec<Arc<Workload>>,
    next: AtomicUsize,
}

impl Service {
    /// `namespace/hostname`, as workloads refer to it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// Picks the next endpoint (round robin) for a connection to `port`, with the
    /// target port it maps to. None when the service has no endpoint or no such port.
    pub fn pick(&self, port: u16) -> Option<(Arc<Workload>, SocketAddr)> {
        if self.endpoints.is_empty() {
            return None;
        }
        let key = self.key();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.endpoints.len()).find_map(|i| {
            let ep = &self.endpoints[(start + i) % self.endpoints.len()];
            let target = ep
                .services
                .get(&key)
                .and_then(|ports| ports.get(&port))
                .or_else(|| self.ports.get(&port))?;
            let ip = *ep.ips.first()?;
            Some((ep.clone(), SocketAddr::new(ip, *target)))
        })
    }
}

/// Where a connection to some address should go.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A workload: tunnel over HBONE if it is in the mesh.
    Workload(Arc<Workload>, SocketAddr),
    /// A service VIP with no endpoint serving the port: the connection fails. Passing
    /// it on to the VIP would let kube-proxy deliver it, in plaintext, to a pod.
    NoEndpoint { service: String, port: u16 },
    /// Nothing known: plain TCP passthrough.
    Unknown(SocketAddr),
}

/// One validated configuration snapshot.
#[derive(Debug, Default)]
pub struct MeshState {
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// namespace -> name -> workload: looked up per connection without allocating.
    by_name: HashMap<String, HashMap<String, Arc<Workload>>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    pub policies: PolicySet,
}

fn invalid(path: &str, location: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_string(),
        location,
        message: message.into(),
    }
}

impl MeshState {
    /// Validates `cfg` and builds the indexes.
    pub fn build(path: &str, cfg: LocalConfig) -> Result<MeshState, ConfigError> {
        let mut state = MeshState::default();
        let mut workloads = Vec::new();
        for (i, w) in cfg.workloads.into_iter().enumerate() {
            let at = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            if w.name.is_empty() || w.namespace.is_empty() {
                return Err(invalid(path, at, "name and namespace are required"));
            }
            let workload = Arc::new(Workload {
                uid: w.uid,
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
                trust_domain: w.trust_domain,
                ips: w.workload_ips,
                protocol: w.protocol,
                node: w.node,
                services: w.services,
                authorization_policies: w.authorization_policies,
            });
            for ip in &workload.ips {
                if state.by_ip.insert(*ip, workload.clone()).is_some() {
                    return Err(invalid(
                        path,
                        at,
                        format!("workloadIps: {ip} is used by two workloads"),
                    ));
                }
            }
            let names = state.by_name.entry(workload.namespace.clone()).or_default();
            if names
                .insert(workload.name.clone(), workload.clone())
                .is_some()
            {
                return Err(invalid(path, at, "two workloads with this namespace/name"));
            }
            workloads.push(workload);
        }
        for (i, s) in cfg.services.into_iter().enumerate() {
            let at = format!("services[{i}] ({}/{})", s.namespace, s.name);
            let key = format!("{}/{}", s.namespace, s.hostname);
            let mut vips = Vec::new();
            for vip in &s.vips {
                let ip = vip.rsplit('/').next().unwrap_or(vip);
                vips.push(ip.parse::<IpAddr>().map_err(|_| {
                    invalid(
                        path,
                        at.clone(),
                        format!("vips: {vip:?} is not \"<network>/<ip>\""),
                    )
                })?);
            }
            let service = Arc::new(Service {
                endpoints: workloads
                    .iter()
                    .filter(|w| w.services.contains_key(&key))
                    .cloned()
                    .collect(),
                name: s.name,
                namespace: s.namespace,
                hostname: s.hostname,
                vips,
                ports: s.ports,
                next: AtomicUsize::new(0),
            });
            for vip in &service.vips {
                if state.by_vip.insert(*vip, service.clone()).is_some() {
                    return Err(invalid(
                        path,
                        at,
                        format!("vips: {vip} is used by two services"),
                    ));
                }
            }
        }
        let mut policies = Vec::new();
        for (i, p) in cfg.policies.iter().enumerate() {
            let at = format!("policies[{i}] ({}/{})", p.namespace, p.name);
            policies.push(Policy::compile(p).map_err(|m| invalid(path, at, m))?);
        }
        state.policies = PolicySet::new(policies);
        Ok(state)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.by_name.get(namespace)?.get(name)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    pub fn workload_count(&self) -> usize {
        self.by_name.values().map(HashMap::len).sum()
    }

    /// Resolves where a connection to `dst` goes: a service VIP picks an endpoint
    /// (round robin) and maps the port; a workload address is that workload.
    pub fn resolve(&self, dst: SocketAddr) -> Destination {
        if let Some(svc) = self.service_by_vip(dst.ip()) {
            return match svc.pick(dst.port()) {
                Some((w, addr)) => Destination::Workload(w, addr),
                None => Destination::NoEndpoint {
                    service: svc.key(),
                    port: dst.port(),
                },
            };
        }
        match self.workload_by_ip(dst.ip()) {
            Some(w) => Destination::Workload(w.clone(), dst),
            None => Destination::Unknown(dst),
        }
    }
}

/// The current snapshot. Readers take an `Arc` and keep a consistent view for as long
/// as they hold it; a reload swaps the whole snapshot and notifies subscribers.
pub struct Store {
    current: RwLock<Arc<MeshState>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Store {
    pub fn new(state: MeshState) -> Arc<Store> {
        Arc::new(Store {
            current: RwLock::new(Arc::new(state)),
            changed: tokio::sync::watch::channel(0).0,
        })
    }

    pub fn get(&self) -> Arc<MeshState> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn replace(&self, state: MeshState) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Ticks on every replacement.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
workloads:
- {name: a, namespace: default, workloadIps: ["10.0.0.1"], protocol: HBONE, services: {"default/svc.default.svc.cluster.local": {80: 8080}}}
- {name: b, namespace: default, workloadIps: ["10.0.0.2"], protocol: HBONE, services: {"default/svc.default.svc.cluster.local": {80: 9090}}}
- {name: c, namespace: default, workloadIps: ["10.0.0.3"]}
services:
- {name: svc, namespace: default, hostname: svc.default.svc.cluster.local, vips: ["/10.96.0.10"], ports: {80: 8080}}
"#;

    fn state(yaml: &str) -> Result<MeshState, ConfigError> {
        MeshState::build("t.yaml", LocalConfig::parse("t.yaml", yaml)?)
    }

    #[test]
    fn a_vip_spreads_over_its_endpoints_with_their_target_ports() {
        let s = state(CFG).unwrap();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            match s.resolve(vip) {
                Destination::Workload(w, addr) => {
                    seen.insert((w.name.clone(), addr.to_string()));
                }
                other => panic!("{other:?}"),
            }
        }
        let want: std::collections::BTreeSet<_> = [
            ("a".to_string(), "10.0.0.1:8080".to_string()),
            ("b".to_string(), "10.0.0.2:9090".to_string()),
        ]
        .into();
        assert_eq!(seen, want);
    }

    #[test]
    fn workloads_resolve_by_ip_and_unknown_addresses_pass_through() {
        let s = state(CFG).unwrap();
        assert!(
            matches!(s.resolve("10.0.0.3:80".parse().unwrap()), Destination::Workload(w, _) if w.protocol == Protocol::Tcp)
        );
        assert!(matches!(
            s.resolve("1.2.3.4:80".parse().unwrap()),
            Destination::Unknown(_)
        ));
        assert_eq!(
            s.workload_by_name("default", "a")
                .unwrap()
                .identity()
                .to_string(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
    }

    #[test]
    fn a_vip_without_an_endpoint_for_the_port_resolves_to_no_endpoint() {
        let s = state(
            r#"
workloads:
- {name: a, namespace: default, workloadIps: ["10.0.0.1"], protocol: HBONE, services: {"default/svc.default.svc.cluster.local": {80: 8080}}}
services:
- {name: svc, namespace: default, hostname: svc.default.svc.cluster.local, vips: ["/10.96.0.10"], ports: {80: 8080}}
- {name: empty, namespace: default, hostname: empty.default.svc.cluster.local, vips: ["/10.96.0.11"], ports: {80: 8080}}
"#,
        )
        .unwrap();
        assert!(matches!(
            s.resolve("10.96.0.11:80".parse().unwrap()),
            Destination::NoEndpoint { port: 80, .. }
        ));
        // The port is not one the service (or its endpoint) serves.
        assert!(matches!(
            s.resolve("10.96.0.10:443".parse().unwrap()),
            Destination::NoEndpoint { port: 443, .. }
        ));
    }

    #[test]
    fn inconsistent_files_are_rejected_with_a_location() {
        let err = state("workloads:\n- {name: a, namespace: n, workloadIps: [\"10.0.0.1\"]}\n- {name: b, namespace: n, workloadIps: [\"10.0.0.1\"]}\n").unwrap_err().to_string();
        assert!(
            err.contains("workloads[1] (n/b)") && err.contains("10.0.0.1"),
            "{err}"
        );
        let err =
            state("services:\n- {name: s, namespace: n, hostname: h, vips: [\"net/not-ip\"]}\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("services[0]") && err.contains("not-ip"),
            "{err}"
        );
    }
}
