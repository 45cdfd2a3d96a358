//! Builds a [`MeshState`] from domain objects. Every source of mesh state (the local
//! file, xDS) translates into calls on a [`StateBuilder`]; the builder owns the rules
//! that do not depend on the source: keys are unique, Istio's defaults are filled in,
//! endpoints are joined to their workloads, and the indexes are made.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::policy::{Policy, PolicyIndex, PolicyKey};
use super::service::{Backend, Endpoint, Service, ServiceEntry};
use super::workload::{NamespacedHostname, NetworkMode, Uid, Workload};
use super::MeshState;

/// A snapshot that cannot be built, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("two workloads have the uid \"{0}\"; a uid identifies one workload")]
    DuplicateWorkload(Uid),
    #[error("the service {0} is defined twice")]
    DuplicateService(NamespacedHostname),
    #[error("the policy {0} is defined twice")]
    DuplicatePolicy(PolicyKey),
    #[error("the VIP {vip} belongs to two services, {first} and {second}")]
    DuplicateVip {
        vip: String,
        first: String,
        second: String,
    },
}

/// Collects workloads, services, endpoints and policies, then builds one immutable,
/// indexed snapshot.
#[derive(Debug, Default)]
pub struct StateBuilder {
    node: Option<String>,
    workloads: Vec<Workload>,
    uids: BTreeMap<Uid, usize>,
    services: BTreeMap<NamespacedHostname, Service>,
    /// Endpoints a workload declares for a service (which may come later, or never).
    staged: Vec<(NamespacedHostname, Endpoint)>,
    policies: BTreeMap<PolicyKey, Policy>,
}

impl StateBuilder {
    /// `node`: this ztunnel's node; only workloads on it can be matched to pods. `None`
    /// (no `NODE_NAME`) matches pods to workloads on any node.
    pub fn new(node: Option<String>) -> StateBuilder {
        StateBuilder {
            node: node.filter(|n| !n.is_empty()),
            ..StateBuilder::default()
        }
    }

    /// Adds a workload. An empty trust domain becomes `cluster.local`, an empty service
    /// account `default`, as Istio's control plane has it.
    pub fn workload(&mut self, mut w: Workload) -> Result<(), BuildError> {
        if self.uids.contains_key(&w.uid) {
            return Err(BuildError::DuplicateWorkload(w.uid));
        }
        if w.trust_domain.is_empty() {
            w.trust_domain = "cluster.local".into();
        }
        if w.service_account.is_empty() {
            w.service_account = "default".into();
        }
        self.uids.insert(w.uid.clone(), self.workloads.len());
        self.workloads.push(w);
        Ok(())
    }

    /// Declares that a workload serves `service` (which may be defined later, or not
    /// at all: then the endpoint is kept out of the snapshot).
    pub fn endpoint(&mut self, service: NamespacedHostname, endpoint: Endpoint) {
        self.staged.push((service, endpoint));
    }

    pub fn service(&mut self, s: Service) -> Result<(), BuildError> {
        let key = s.key();
        if self.services.contains_key(&key) {
            return Err(BuildError::DuplicateService(key));
        }
        self.services.insert(key, s);
        Ok(())
    }

    pub fn policy(&mut self, p: Policy) -> Result<(), BuildError> {
        let key = p.key();
        if self.policies.contains_key(&key) {
            return Err(BuildError::DuplicatePolicy(key));
        }
        self.policies.insert(key, p);
        Ok(())
    }

    pub fn build(self) -> Result<MeshState, BuildError> {
        let mut state = MeshState::default();
        let workloads: Vec<Arc<Workload>> = self.workloads.into_iter().map(Arc::new).collect();
        for w in &workloads {
            state.by_uid.insert(w.uid.clone(), w.clone());
            if w.network_mode != NetworkMode::HostNetwork {
                let addrs = state.by_addr.entry(w.network.clone()).or_default();
                for ip in &w.ips {
                    // Several workloads at one address: the best ranked (the later of
                    // equals) is the one found, as in Istio.
                    match addrs.get(ip) {
                        Some(held) if held.address_rank() > w.address_rank() => {}
                        _ => {
                            addrs.insert(*ip, w.clone());
                        }
                    }
                }
            }
            if self.node.as_ref().is_none_or(|n| *n == w.node) {
                state
                    .local
                    .entry(w.namespace.clone())
                    .or_default()
                    .entry(w.name.clone())
                    .or_default()
                    .push(w.clone());
            }
        }
        let mut staged: HashMap<NamespacedHostname, Vec<Endpoint>> = HashMap::new();
        for (svc, ep) in self.staged {
            staged.entry(svc).or_default().push(ep);
        }
        for (key, mut svc) in self.services {
            for ep in staged.remove(&key).into_iter().flatten() {
                svc.endpoints.insert(ep.workload_uid.clone(), ep);
            }
            let backends = svc
                .endpoints
                .values()
                .filter(|ep| svc.admits(ep.status))
                .filter_map(|ep| {
                    Some(Backend {
                        workload: state.by_uid.get(&ep.workload_uid)?.clone(),
                        endpoint: ep.clone(),
                    })
                })
                .collect();
            let entry = Arc::new(ServiceEntry::new(svc, backends));
            for vip in &entry.service.vips {
                let by_ip = state.by_vip.entry(vip.network.clone()).or_default();
                if let Some(other) = by_ip.insert(vip.address, entry.clone()) {
                    return Err(BuildError::DuplicateVip {
                        vip: vip.to_string(),
                        first: other.service.key().to_string(),
                        second: key.to_string(),
                    });
                }
            }
            state.services.insert(key, entry);
        }
        state.policies = PolicyIndex::new(self.policies.into_values());
        Ok(state)
    }
}
