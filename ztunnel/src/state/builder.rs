//! Builds a [`MeshState`] from one consistent set of domain objects, refusing any key
//! given twice (a file must say one thing). Sources translate into [`Objects`]; the
//! local file is checked here before it is used. Objects are shared (`Arc`) with every
//! snapshot built from them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::index::{Index, Source, WorkloadEntry};
use super::policy::{Policy, PolicyKey};
use super::service::{Endpoint, Service};
use super::workload::{NamespacedHostname, NetworkAddress, Uid};
use super::MeshState;

/// What one source says about the mesh, translated into the domain model.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub workloads: Vec<WorkloadEntry>,
    pub services: Vec<Arc<Service>>,
    pub policies: Vec<Arc<Policy>>,
}

/// A set of objects that cannot be one snapshot, naming the key at fault.
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

/// Collects objects, checking that no key is given twice, then builds the snapshot.
#[derive(Debug)]
pub struct StateBuilder {
    index: Index,
    uids: HashSet<Uid>,
    services: HashSet<NamespacedHostname>,
    vips: HashMap<NetworkAddress, NamespacedHostname>,
    policies: HashSet<PolicyKey>,
}

impl StateBuilder {
    /// `node`: this ztunnel's node (see [`Index::new`]).
    pub fn new(node: Option<String>) -> StateBuilder {
        StateBuilder {
            index: Index::new(node),
            uids: HashSet::new(),
            services: HashSet::new(),
            vips: HashMap::new(),
            policies: HashSet::new(),
        }
    }

    /// Adds everything `objects` holds.
    pub fn add(&mut self, objects: &Objects) -> Result<(), BuildError> {
        for w in &objects.workloads {
            self.workload(w.clone())?;
        }
        for s in &objects.services {
            self.service(s.clone())?;
        }
        for p in &objects.policies {
            self.policy(p.clone())?;
        }
        Ok(())
    }

    pub fn workload(&mut self, w: WorkloadEntry) -> Result<(), BuildError> {
        let uid = w.workload.uid.clone();
        if !self.uids.insert(uid.clone()) {
            return Err(BuildError::DuplicateWorkload(uid));
        }
        self.index.set_workload(Source::LocalFile, uid, Some(w));
        Ok(())
    }

    /// A workload with its endpoints (tests and callers without a translator).
    pub fn workload_with(
        &mut self,
        w: Arc<super::Workload>,
        endpoints: Vec<(NamespacedHostname, Endpoint)>,
    ) -> Result<(), BuildError> {
        self.workload(WorkloadEntry {
            workload: w,
            endpoints: endpoints.into(),
        })
    }

    pub fn service(&mut self, s: Arc<Service>) -> Result<(), BuildError> {
        let key = s.key();
        if !self.services.insert(key.clone()) {
            return Err(BuildError::DuplicateService(key));
        }
        for vip in &s.vips {
            if let Some(first) = self.vips.insert(vip.clone(), key.clone()) {
                return Err(BuildError::DuplicateVip {
                    vip: vip.to_string(),
                    first: first.to_string(),
                    second: key.to_string(),
                });
            }
        }
        self.index.set_service(Source::LocalFile, key, Some(s));
        Ok(())
    }

    pub fn policy(&mut self, p: Arc<Policy>) -> Result<(), BuildError> {
        let key = p.key();
        if !self.policies.insert(key.clone()) {
            return Err(BuildError::DuplicatePolicy(key));
        }
        self.index.set_policy(Source::LocalFile, key, Some(p));
        Ok(())
    }

    pub fn build(mut self) -> Result<MeshState, BuildError> {
        Ok(self.index.snapshot())
    }
}
