//! Builds a [`MeshState`] from domain objects. Every source of mesh state (the local
//! file, xDS) translates into [`Objects`]; the builder owns the rules that do not depend
//! on the source: keys are unique, endpoints are joined to their workloads, and the
//! indexes are made. Objects are shared (`Arc`) between the sources and every snapshot
//! built from them, so a rebuild copies pointers, not workloads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::policy::{Policy, PolicyIndex, PolicyKey};
use super::service::{Backend, Endpoint, Service, ServiceEntry};
use super::workload::{NamespacedHostname, NetworkMode, Uid, Workload};
use super::MeshState;

/// What one source says about the mesh, translated into the domain model.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub workloads: Vec<Arc<Workload>>,
    /// Endpoints workloads declare for services (which may be defined by another
    /// source, later, or never: then they are left out).
    pub endpoints: Vec<(NamespacedHostname, Endpoint)>,
    pub services: Vec<Arc<Service>>,
    pub policies: Vec<Arc<Policy>>,
}

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

/// How the builder treats a key given twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Duplicates {
    /// An error (a file must be consistent).
    Refuse,
    /// The later one replaces the earlier (sources merged in order of precedence, and
    /// a control plane that says two things at once), noted in [`MeshState::conflicts`].
    Replace,
}

/// Collects workloads, services, endpoints and policies, then builds one immutable,
/// indexed snapshot.
#[derive(Debug)]
pub struct StateBuilder {
    node: Option<String>,
    duplicates: Duplicates,
    workloads: Vec<Arc<Workload>>,
    uids: HashMap<Uid, usize>,
    services: BTreeMap<NamespacedHostname, Arc<Service>>,
    staged: Vec<(NamespacedHostname, Endpoint)>,
    policies: BTreeMap<PolicyKey, Arc<Policy>>,
    conflicts: Vec<String>,
}

impl StateBuilder {
    /// `node`: this ztunnel's node; only workloads on it can be matched to pods. `None`
    /// (no `NODE_NAME`) matches pods to workloads on any node. Keys given twice are an
    /// error.
    pub fn new(node: Option<String>) -> StateBuilder {
        StateBuilder {
            node: node.filter(|n| !n.is_empty()),
            duplicates: Duplicates::Refuse,
            workloads: Vec::new(),
            uids: HashMap::new(),
            services: BTreeMap::new(),
            staged: Vec::new(),
            policies: BTreeMap::new(),
            conflicts: Vec::new(),
        }
    }

    /// A builder where a key given again replaces the earlier object: for merging
    /// sources (the later source wins) and for what a control plane sends.
    pub fn merging(node: Option<String>) -> StateBuilder {
        StateBuilder {
            duplicates: Duplicates::Replace,
            ..StateBuilder::new(node)
        }
    }

    /// Adds everything `objects` holds.
    pub fn add(&mut self, objects: &Objects) -> Result<(), BuildError> {
        for w in &objects.workloads {
            self.workload(w.clone())?;
        }
        self.staged.extend(objects.endpoints.iter().cloned());
        for s in &objects.services {
            self.service(s.clone())?;
        }
        for p in &objects.policies {
            self.policy(p.clone())?;
        }
        Ok(())
    }

    pub fn workload(&mut self, w: Arc<Workload>) -> Result<(), BuildError> {
        if let Some(&at) = self.uids.get(&w.uid) {
            if self.duplicates == Duplicates::Refuse {
                return Err(BuildError::DuplicateWorkload(w.uid.clone()));
            }
            self.conflicts
                .push(format!("workload {} given twice; the later is used", w.uid));
            self.workloads[at] = w;
            return Ok(());
        }
        self.uids.insert(w.uid.clone(), self.workloads.len());
        self.workloads.push(w);
        Ok(())
    }

    /// Declares that a workload serves `service`.
    pub fn endpoint(&mut self, service: NamespacedHostname, endpoint: Endpoint) {
        self.staged.push((service, endpoint));
    }

    pub fn service(&mut self, s: Arc<Service>) -> Result<(), BuildError> {
        let key = s.key();
        if self.services.contains_key(&key) {
            if self.duplicates == Duplicates::Refuse {
                return Err(BuildError::DuplicateService(key));
            }
            self.conflicts
                .push(format!("service {key} given twice; the later is used"));
        }
        self.services.insert(key, s);
        Ok(())
    }

    pub fn policy(&mut self, p: Arc<Policy>) -> Result<(), BuildError> {
        let key = p.key();
        if self.policies.contains_key(&key) {
            if self.duplicates == Duplicates::Refuse {
                return Err(BuildError::DuplicatePolicy(key));
            }
            self.conflicts
                .push(format!("policy {key} given twice; the later is used"));
        }
        self.policies.insert(key, p);
        Ok(())
    }

    pub fn build(mut self) -> Result<MeshState, BuildError> {
        let mut state = MeshState::default();
        for w in &self.workloads {
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
        for (svc, ep) in std::mem::take(&mut self.staged) {
            staged.entry(svc).or_default().push(ep);
        }
        for (key, svc) in std::mem::take(&mut self.services) {
            let mut endpoints = svc.endpoints.clone();
            for ep in staged.remove(&key).into_iter().flatten() {
                endpoints.insert(ep.workload_uid.clone(), ep);
            }
            let backends = endpoints
                .values()
                .filter(|ep| svc.admits(ep.status))
                .filter_map(|ep| {
                    Some(Backend {
                        workload: state.by_uid.get(&ep.workload_uid)?.clone(),
                        endpoint: ep.clone(),
                    })
                })
                .collect();
            let entry = Arc::new(ServiceEntry::new(svc, endpoints, backends));
            for vip in &entry.service.vips {
                let by_ip = state.by_vip.entry(vip.network.clone()).or_default();
                if let Some(other) = by_ip.insert(vip.address, entry.clone()) {
                    let (first, second) = (other.service.key(), key.clone());
                    if self.duplicates == Duplicates::Refuse {
                        return Err(BuildError::DuplicateVip {
                            vip: vip.to_string(),
                            first: first.to_string(),
                            second: second.to_string(),
                        });
                    }
                    self.conflicts.push(format!(
                        "VIP {vip} belongs to {first} and {second}; {second} is used"
                    ));
                }
            }
            state.services.insert(key, entry);
        }
        state.policies = PolicyIndex::new(self.policies.into_values());
        state.conflicts = self.conflicts;
        Ok(state)
    }
}
