//! The sources of mesh state together: the local file hands over everything it holds
//! at each reload, the control plane its changes as they come; both go into one
//! [`Index`], and each update publishes a new snapshot into the [`Store`]. Where both
//! name the same object, the control plane's wins, as when Istio's ztunnel applies xDS
//! updates over its local config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::builder::Objects;
use super::index::{Index, Source, WorkloadEntry};
use super::policy::{Policy, PolicyKey};
use super::service::Service;
use super::workload::{NamespacedHostname, Uid};
use super::Store;

/// One change from a source.
#[derive(Clone, Debug)]
pub enum Change {
    Workload(Uid, Option<WorkloadEntry>),
    Service(NamespacedHostname, Option<Arc<Service>>),
    Policy(PolicyKey, Option<Arc<Policy>>),
}

#[derive(Default)]
struct LocalHeld {
    workloads: HashMap<Uid, WorkloadEntry>,
    services: HashMap<NamespacedHostname, Arc<Service>>,
    policies: HashMap<PolicyKey, Arc<Policy>>,
}

struct Held {
    index: Index,
    local: LocalHeld,
}

/// The one owner of what the sources hold.
pub struct Sources {
    held: Mutex<Held>,
    store: Arc<Store>,
}

impl Sources {
    /// `node` as for [`Index::new`].
    pub fn new(node: Option<String>, store: Arc<Store>) -> Arc<Sources> {
        Arc::new(Sources {
            held: Mutex::new(Held {
                index: Index::new(node),
                local: LocalHeld::default(),
            }),
            store,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The local file's objects (validated on their own by its loader): what changed
    /// since the last load is applied.
    pub fn set_local(&self, objects: Objects) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Held { index, local } = &mut *held;
        let new = LocalHeld {
            workloads: objects
                .workloads
                .into_iter()
                .map(|w| (w.workload.uid.clone(), w))
                .collect(),
            services: objects.services.into_iter().map(|s| (s.key(), s)).collect(),
            policies: objects.policies.into_iter().map(|p| (p.key(), p)).collect(),
        };
        for uid in local
            .workloads
            .keys()
            .filter(|k| !new.workloads.contains_key(*k))
        {
            index.set_workload(Source::LocalFile, uid.clone(), None);
        }
        for (uid, w) in &new.workloads {
            if local
                .workloads
                .get(uid)
                .is_none_or(|old| *old.workload != *w.workload)
            {
                index.set_workload(Source::LocalFile, uid.clone(), Some(w.clone()));
            }
        }
        for key in local
            .services
            .keys()
            .filter(|k| !new.services.contains_key(*k))
        {
            index.set_service(Source::LocalFile, key.clone(), None);
        }
        for (key, s) in &new.services {
            if local.services.get(key).is_none_or(|old| **old != **s) {
                index.set_service(Source::LocalFile, key.clone(), Some(s.clone()));
            }
        }
        for key in local
            .policies
            .keys()
            .filter(|k| !new.policies.contains_key(*k))
        {
            index.set_policy(Source::LocalFile, key.clone(), None);
        }
        for (key, p) in &new.policies {
            if local.policies.get(key).is_none_or(|old| **old != **p) {
                index.set_policy(Source::LocalFile, key.clone(), Some(p.clone()));
            }
        }
        *local = new;
        self.store.replace(index.snapshot());
    }

    /// The control plane's changes.
    pub fn apply_xds(&self, changes: Vec<Change>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for change in changes {
            match change {
                Change::Workload(uid, w) => held.index.set_workload(Source::Xds, uid, w),
                Change::Service(key, s) => held.index.set_service(Source::Xds, key, s),
                Change::Policy(key, p) => held.index.set_policy(Source::Xds, key, p),
            }
        }
        let snapshot = held.index.snapshot();
        // Published while still holding the lock, so two sources' updates land in order.
        self.store.replace(snapshot);
    }
}
