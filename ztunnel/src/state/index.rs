//! The mesh state, maintained incrementally: each change from a source (a workload,
//! service or policy added, replaced or removed) updates only the index entries it
//! touches, and a snapshot is a cheap copy of sharded maps ([`super::shards`]). So a
//! push of one workload costs the same in a mesh of 100 workloads as in one of 100,000,
//! and readers keep their snapshot untouched.
//!
//! Two sources can name the same object (the local file and xDS): the control plane's
//! wins, and the file's comes back if the control plane removes its own.

use std::collections::{HashMap as StdHashMap, HashSet as StdHashSet};
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use tracing::warn;

use super::policy::{Policy, PolicyIndex, PolicyKey};
use super::service::{Backend, Endpoint, Service, ServiceEntry};
use super::shards::FastHash;
use super::workload::{NamespacedHostname, NetworkMode, Uid, Workload};
use super::MeshState;

type HashMap<K, V> = StdHashMap<K, V, FastHash>;
type HashSet<K> = StdHashSet<K, FastHash>;

/// Where an object comes from, in rising precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    LocalFile = 0,
    Xds = 1,
}

/// A workload and the endpoints it declares for the services it backs.
#[derive(Clone, Debug)]
pub struct WorkloadEntry {
    pub workload: Arc<Workload>,
    pub endpoints: Arc<[(NamespacedHostname, Endpoint)]>,
}

impl WorkloadEntry {
    pub fn new(workload: Workload, endpoints: Vec<(NamespacedHostname, Endpoint)>) -> Self {
        WorkloadEntry {
            workload: Arc::new(workload),
            endpoints: endpoints.into(),
        }
    }
}

/// One object as each source gives it.
#[derive(Debug)]
struct Slots<T>([Option<T>; 2]);

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots([None, None])
    }
}

impl<T> Slots<T> {
    fn winner(&self) -> Option<&T> {
        self.0[1].as_ref().or(self.0[0].as_ref())
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}

/// The key a pod is matched by: its namespace and name (candidates are then checked
/// exactly), hashed so that a lookup allocates nothing.
pub(super) fn pod_key(namespace: &str, name: &str) -> u64 {
    foldhash::fast::FixedState::with_seed(0x90d).hash_one((namespace, name))
}

/// Replaces `uid`'s entry in a small shared list, or appends it.
fn with<T: Clone>(
    list: Option<&Arc<[T]>>,
    keep: impl Fn(&T) -> bool,
    add: Option<T>,
) -> Option<Arc<[T]>> {
    let mut v: Vec<T> = list
        .map(|l| l.iter().filter(|x| keep(x)).cloned().collect())
        .unwrap_or_default();
    v.extend(add);
    (!v.is_empty()).then(|| v.into())
}

fn update_list<K: Hash + Eq + Clone, T: Clone>(
    map: &mut super::shards::Shards<K, Arc<[T]>>,
    key: K,
    keep: impl Fn(&T) -> bool,
    add: Option<T>,
) {
    match with(map.get(&key), keep, add) {
        Some(list) => {
            map.insert(key, list);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// The owner of the current state: sources change it, [`Index::snapshot`] publishes it.
#[derive(Debug)]
pub struct Index {
    node: Option<String>,
    state: MeshState,
    workloads: HashMap<Uid, Slots<WorkloadEntry>>,
    services: HashMap<NamespacedHostname, Slots<Arc<Service>>>,
    policies: HashMap<PolicyKey, Slots<Arc<Policy>>>,
    /// The endpoints the winning workloads declare, by service.
    staged: HashMap<NamespacedHostname, HashMap<Uid, Endpoint>>,
    /// The services whose own endpoint list names a workload, by workload: rebuilt
    /// when it changes.
    named_by: HashMap<Uid, HashSet<NamespacedHostname>>,
    dirty_services: HashSet<NamespacedHostname>,
    dirty_policies: bool,
}

impl Index {
    /// `node`: this ztunnel's node; only workloads on it can be matched to pods. `None`
    /// matches pods to workloads on any node.
    pub fn new(node: Option<String>) -> Index {
        Index {
            node: node.filter(|n| !n.is_empty()),
            state: MeshState::default(),
            workloads: HashMap::default(),
            services: HashMap::default(),
            policies: HashMap::default(),
            staged: HashMap::default(),
            named_by: HashMap::default(),
            dirty_services: HashSet::default(),
            dirty_policies: false,
        }
    }

    pub fn set_workload(&mut self, source: Source, uid: Uid, value: Option<WorkloadEntry>) {
        let slots = self.workloads.entry(uid.clone()).or_default();
        let before = slots.winner().cloned();
        slots.0[source as usize] = value;
        let after = slots.winner().cloned();
        if slots.is_empty() {
            self.workloads.remove(&uid);
        }
        match (&before, &after) {
            (Some(b), Some(a)) if Arc::ptr_eq(&b.workload, &a.workload) => return,
            (None, None) => return,
            _ => {}
        }
        if let Some(old) = before {
            self.unindex_workload(&old);
        }
        if let Some(new) = after {
            self.index_workload(&new);
        }
    }

    pub fn set_service(
        &mut self,
        source: Source,
        key: NamespacedHostname,
        value: Option<Arc<Service>>,
    ) {
        let slots = self.services.entry(key.clone()).or_default();
        slots.0[source as usize] = value;
        if slots.is_empty() {
            self.services.remove(&key);
        }
        self.dirty_services.insert(key);
    }

    pub fn set_policy(&mut self, source: Source, key: PolicyKey, value: Option<Arc<Policy>>) {
        let slots = self.policies.entry(key.clone()).or_default();
        slots.0[source as usize] = value;
        if slots.is_empty() {
            self.policies.remove(&key);
        }
        self.dirty_policies = true;
    }

    fn is_local(&self, w: &Workload) -> bool {
        self.node.as_ref().is_none_or(|n| *n == w.node)
    }

    fn index_workload(&mut self, e: &WorkloadEntry) {
        let w = &e.workload;
        self.state.by_uid.insert(w.uid.clone(), w.clone());
        if w.network_mode != NetworkMode::HostNetwork {
            for ip in &w.ips {
                update_list(
                    &mut self.state.by_addr,
                    *ip,
                    |x: &Arc<Workload>| x.uid != w.uid,
                    Some(w.clone()),
                );
            }
        }
        if self.is_local(w) {
            let key = pod_key(&w.namespace, &w.name);
            update_list(
                &mut self.state.local,
                key,
                |x: &Arc<Workload>| x.uid != w.uid,
                Some(w.clone()),
            );
        }
        for (svc, ep) in e.endpoints.iter() {
            self.staged
                .entry(svc.clone())
                .or_default()
                .insert(w.uid.clone(), ep.clone());
            self.dirty_services.insert(svc.clone());
        }
        self.touch_naming_services(&w.uid);
    }

    fn touch_naming_services(&mut self, uid: &Uid) {
        if let Some(services) = self.named_by.get(uid) {
            self.dirty_services.extend(services.iter().cloned());
        }
    }

    fn unindex_workload(&mut self, e: &WorkloadEntry) {
        let w = &e.workload;
        self.state.by_uid.remove(&w.uid);
        for ip in &w.ips {
            update_list(
                &mut self.state.by_addr,
                *ip,
                |x: &Arc<Workload>| x.uid != w.uid,
                None,
            );
        }
        let key = pod_key(&w.namespace, &w.name);
        update_list(
            &mut self.state.local,
            key,
            |x: &Arc<Workload>| x.uid != w.uid,
            None,
        );
        for (svc, _) in e.endpoints.iter() {
            if let Some(eps) = self.staged.get_mut(svc) {
                eps.remove(&w.uid);
                if eps.is_empty() {
                    self.staged.remove(svc);
                }
            }
            self.dirty_services.insert(svc.clone());
        }
        // Services pointing at this workload's old version are rebuilt too.
        for svc in &w.services {
            self.dirty_services.insert(svc.clone());
        }
        self.touch_naming_services(&w.uid);
    }

    fn rebuild_service(&mut self, key: &NamespacedHostname) {
        // Out of the VIP index under its old addresses, and of the reverse index of
        // the workloads its own endpoint list names.
        if let Some(old) = self.state.services.remove(key) {
            for uid in old.service.endpoints.keys() {
                if let Some(set) = self.named_by.get_mut(uid) {
                    set.remove(key);
                    if set.is_empty() {
                        self.named_by.remove(uid);
                    }
                }
            }
            for vip in &old.service.vips {
                update_list(
                    &mut self.state.by_vip,
                    vip.address,
                    |x: &Arc<ServiceEntry>| x.service.key() != *key,
                    None,
                );
            }
        }
        let Some(svc) = self.services.get(key).and_then(Slots::winner).cloned() else {
            return;
        };
        for uid in svc.endpoints.keys() {
            self.named_by
                .entry(uid.clone())
                .or_default()
                .insert(key.clone());
        }
        let mut endpoints = svc.endpoints.clone();
        if let Some(staged) = self.staged.get(key) {
            for (uid, ep) in staged {
                endpoints.insert(uid.clone(), ep.clone());
            }
        }
        let backends = endpoints
            .values()
            .filter(|ep| svc.admits(ep.status))
            .filter_map(|ep| {
                Some(Backend {
                    workload: self.state.by_uid.get(&ep.workload_uid)?.clone(),
                    endpoint: ep.clone(),
                })
            })
            .collect();
        let entry = Arc::new(ServiceEntry::new(svc.clone(), endpoints, backends));
        for vip in &svc.vips {
            if let Some(others) = self.state.by_vip.get(&vip.address) {
                if let Some(other) = others
                    .iter()
                    .find(|o| o.service.vips.contains(vip) && o.service.key() != *key)
                {
                    warn!(
                        "mesh state: VIP {vip} belongs to {} and {key}; {key} is used",
                        other.service.key()
                    );
                }
            }
            update_list(
                &mut self.state.by_vip,
                vip.address,
                |x: &Arc<ServiceEntry>| x.service.key() != *key,
                Some(entry.clone()),
            );
        }
        self.state.services.insert(key.clone(), entry);
    }

    /// The state as of now. Only what changed since the last snapshot is rebuilt.
    pub fn snapshot(&mut self) -> MeshState {
        for key in std::mem::take(&mut self.dirty_services) {
            self.rebuild_service(&key);
        }
        if std::mem::take(&mut self.dirty_policies) {
            self.state.policies = Arc::new(PolicyIndex::new(
                self.policies.values().filter_map(Slots::winner).cloned(),
            ));
        }
        self.state.clone()
    }
}
