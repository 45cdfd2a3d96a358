//! What ztunnel knows about the mesh: workloads, services and policies, indexed for the
//! lookups the data path makes per connection.
//!
//! The domain model is Istio's ztunnel's ([`workload`], [`service`], [`policy`]). Sources
//! translate into it through one [`StateBuilder`]: the local file ([`localconfig`],
//! [`translate`]) today, xDS next. Nothing outside this module names a file-schema type.
//!
//! - [`MeshState`]: one immutable, validated snapshot with its indexes.
//! - [`Store`]: the current snapshot. An update builds a whole new snapshot off the data
//!   path and swaps it in at once: readers see the old state or the new, never half, and
//!   hold no lock while they use it.
//! - [`watch`]: reloads the local file when it changes.

pub mod addr;
pub mod builder;
pub mod index;
pub mod localconfig;
pub mod policy;
pub mod service;
mod shards;
pub mod sources;
pub mod translate;
pub mod watch;
pub mod workload;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

pub use builder::{BuildError, Objects, StateBuilder};
pub use index::{Index, Source, WorkloadEntry};
pub use policy::PolicyIndex;
pub use service::{Pick, ServiceEntry};
use shards::Shards;
pub use sources::Sources;
use workload::{GatewayAddress, GatewayDestination};
pub use workload::{NamespacedHostname, Protocol, Uid, Workload};

/// Where a connection to some address goes.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A workload: over HBONE if it is in the mesh.
    Workload(Arc<Workload>, SocketAddr),
    /// Through a waypoint: HBONE to the waypoint at `addr`, asking it for `target`
    /// (the address the connection was made to).
    Waypoint {
        waypoint: Arc<Workload>,
        addr: SocketAddr,
        target: SocketAddr,
    },
    /// The destination has a waypoint that cannot be found: the connection fails
    /// rather than skip the waypoint (and the L7 policy enforced there).
    NoWaypoint { target: SocketAddr, reason: String },
    /// A service VIP with nothing to serve the connection: it fails. Passing it on to
    /// the VIP would let kube-proxy deliver it, in plaintext, to a pod.
    NoEndpoint {
        service: NamespacedHostname,
        port: u16,
        reason: &'static str,
    },
    /// Nothing known (or a passthrough service): plain TCP to the address itself.
    Passthrough(SocketAddr),
    /// A service endpoint known by hostname only (DNS resolution): the workload, to
    /// be reached at its hostname's address, resolved when connecting, on `port`.
    Hostname { workload: Arc<Workload>, port: u16 },
}

/// One snapshot of the mesh: immutable, cheap to copy (see [`index`]).
#[derive(Clone, Debug, Default)]
pub struct MeshState {
    by_uid: Shards<Uid, Arc<Workload>>,
    /// Address -> the workloads there, in any network (host-network workloads are not
    /// found by address).
    by_addr: Shards<IpAddr, Arc<[Arc<Workload>]>>,
    /// Hash of (namespace, name) -> this node's workloads of that name: how pods are
    /// matched.
    local: Shards<u64, Arc<[Arc<Workload>]>>,
    services: Shards<NamespacedHostname, Arc<ServiceEntry>>,
    /// VIP -> the services there, in any network.
    by_vip: Shards<IpAddr, Arc<[Arc<ServiceEntry>]>>,
    policies: Arc<PolicyIndex>,
}

impl MeshState {
    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_uid.values()
    }

    /// The workloads of this node (all of them without a node name).
    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.local.values().flat_map(|l| l.iter())
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.by_uid.get(uid)
    }

    /// The workload at `ip` in `network`: of several, the best ranked (the later of
    /// equals), as in Istio.
    pub fn workload_at(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        let mut best: Option<&Arc<Workload>> = None;
        for w in self
            .by_addr
            .get(&ip)?
            .iter()
            .filter(|w| *w.network == *network)
        {
            if best.is_none_or(|b| w.address_rank() >= b.address_rank()) {
                best = Some(w);
            }
        }
        best
    }

    pub fn service(&self, key: &NamespacedHostname) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    /// The service whose VIP is `ip` in `network`.
    pub fn service_at(&self, network: &str, ip: IpAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_vip.get(&ip)?.iter().rev().find(|s| {
            s.service
                .vips
                .iter()
                .any(|v| v.address == ip && *v.network == *network)
        })
    }

    /// The workload of a pod the agent enrolled: this node's workload with exactly the
    /// pod's namespace, name and service account, as Istio matches them. An empty
    /// service account matches no workload: it would otherwise lend the pod whichever
    /// identity the workload of that name carries.
    pub fn pod_workload(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
    ) -> Option<&Arc<Workload>> {
        self.local
            .get(&index::pod_key(namespace, name))?
            .iter()
            .find(|w| {
                w.namespace == namespace && w.name == name && w.service_account == service_account
            })
    }

    pub fn policies(&self) -> &PolicyIndex {
        &self.policies
    }

    pub fn workload_count(&self) -> usize {
        self.by_uid.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Where a connection from `src` to `dst` goes, as Istio's ztunnel routes it: a
    /// service with a waypoint goes through the waypoint; another service VIP picks
    /// an endpoint (or fails); a workload address is that workload, through its
    /// waypoint if it has one (unless the connection comes from that waypoint);
    /// anything else passes through. Addresses are looked up in `src`'s network.
    pub fn resolve(&self, src: &Workload, dst: SocketAddr) -> Destination {
        if let Some(svc) = self.service_at(&src.network, dst.ip()) {
            if let Some(gw) = &svc.service.waypoint {
                if !self.is_waypoint_of(gw, src) {
                    return self.via_waypoint(gw, src, dst);
                }
            }
            return match svc.pick(src, dst) {
                Pick::Upstream(w, addr) => Destination::Workload(w, addr),
                Pick::OriginalDestination => self.resolve_address(src, dst),
                Pick::Hostname(workload, port) => Destination::Hostname { workload, port },
                Pick::None(reason) => Destination::NoEndpoint {
                    service: svc.service.key(),
                    port: dst.port(),
                    reason,
                },
            };
        }
        self.resolve_address(src, dst)
    }

    fn resolve_address(&self, src: &Workload, dst: SocketAddr) -> Destination {
        match self.workload_at(&src.network, dst.ip()) {
            Some(w) => match &w.waypoint {
                Some(gw) if !self.is_waypoint_of(gw, src) => self.via_waypoint(gw, src, dst),
                _ => Destination::Workload(w.clone(), dst),
            },
            None => Destination::Passthrough(dst),
        }
    }

    fn via_waypoint(&self, gw: &GatewayAddress, src: &Workload, dst: SocketAddr) -> Destination {
        match self.waypoint(gw, src, dst) {
            Ok((waypoint, addr)) => Destination::Waypoint {
                waypoint,
                addr,
                target: dst,
            },
            Err(reason) => Destination::NoWaypoint {
                target: dst,
                reason,
            },
        }
    }

    /// The waypoint workload (and its HBONE address) that carries a connection from
    /// `src` to `original`: a service (picked among its endpoints) or a workload,
    /// named by address or hostname.
    pub fn waypoint(
        &self,
        gw: &GatewayAddress,
        src: &Workload,
        original: SocketAddr,
    ) -> Result<(Arc<Workload>, SocketAddr), String> {
        let port = gw.hbone_mtls_port;
        match &gw.destination {
            GatewayDestination::Address(na) => {
                if let Some(svc) = self.service_at(&na.network, na.address) {
                    return svc.pick_waypoint(src, original, port).ok_or_else(|| {
                        format!(
                            "waypoint service {} has no usable endpoint",
                            svc.service.key()
                        )
                    });
                }
                match self.workload_at(&na.network, na.address) {
                    Some(w) => Ok((w.clone(), SocketAddr::new(na.address, port))),
                    None => Err(format!("waypoint {na} not found")),
                }
            }
            GatewayDestination::Hostname(nh) => match self.service(nh) {
                Some(svc) => svc
                    .pick_waypoint(src, original, port)
                    .ok_or_else(|| format!("waypoint service {nh} has no usable endpoint")),
                None => Err(format!("waypoint {nh} not found")),
            },
        }
    }

    /// Whether traffic to `ip` (in `network`) is meant to go through `waypoint`: the
    /// service or workload there names it as its waypoint.
    pub fn routes_through(&self, network: &str, ip: IpAddr, waypoint: &Workload) -> bool {
        let gw = match self.service_at(network, ip) {
            Some(svc) => svc.service.waypoint.as_ref(),
            None => self
                .workload_at(network, ip)
                .and_then(|w| w.waypoint.as_deref()),
        };
        gw.is_some_and(|gw| self.is_waypoint_of(gw, waypoint))
    }

    /// Whether `w` is (one of) the waypoint(s) `gw` names.
    pub fn is_waypoint_of(&self, gw: &GatewayAddress, w: &Workload) -> bool {
        match &gw.destination {
            GatewayDestination::Address(na) => {
                if let Some(svc) = self.service_at(&na.network, na.address) {
                    return svc.has_backend(w);
                }
                self.workload_at(&na.network, na.address)
                    .is_some_and(|x| x.uid == w.uid)
            }
            GatewayDestination::Hostname(nh) => {
                self.service(nh).is_some_and(|svc| svc.has_backend(w))
            }
        }
    }
}

/// The current snapshot. Readers take an `Arc` and keep a consistent view for as long
/// as they hold it; an update swaps the whole snapshot and notifies subscribers.
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

    /// The current snapshot. The lock is held only to clone the pointer.
    pub fn get(&self) -> Arc<MeshState> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in `state` (built beforehand: the lock is held only for the swap).
    pub fn replace(&self, state: MeshState) {
        let state = Arc::new(state);
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            state,
        );
        // The old snapshot is freed here, outside the lock, unless readers still hold it.
        drop(old);
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
    use crate::state::service::{Endpoint, Service};
    use crate::state::workload::HealthStatus;

    fn w(uid: &str, name: &str, ips: &[&str], node: &str) -> Arc<Workload> {
        Arc::new(wl(uid, name, ips, node))
    }

    fn wl(uid: &str, name: &str, ips: &[&str], node: &str) -> Workload {
        Workload {
            uid: Uid::from(uid),
            name: name.into(),
            namespace: "ns".into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            node: node.into(),
            protocol: Protocol::Hbone,
            ..Workload::default()
        }
        .with_defaults(workload::DEFAULT_TRUST_DOMAIN)
    }

    fn entry(w: Arc<Workload>, eps: Vec<(NamespacedHostname, Endpoint)>) -> WorkloadEntry {
        WorkloadEntry {
            workload: w,
            endpoints: eps.into(),
        }
    }

    fn svc(name: &str, vip: &str) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            namespace: "ns".into(),
            hostname: format!("{name}.ns.svc.cluster.local"),
            vips: vec![vip.parse().unwrap()],
            ports: [(80, 8080)].into(),
            endpoints: Default::default(),
            subject_alt_names: vec![],
            waypoint: None,
            load_balancer: None,
            ip_families: None,
            canonical: false,
        })
    }

    fn ep(uid: &str, status: HealthStatus) -> Endpoint {
        Endpoint {
            workload_uid: Uid::from(uid),
            port: Default::default(),
            status,
        }
    }

    #[test]
    fn defaults_are_filled_and_pods_match_only_this_nodes_workloads() {
        let mut b = StateBuilder::new(Some("node-1".into()));
        b.workload_with(w("u1", "a", &["10.0.0.1"], "node-1"), vec![])
            .unwrap();
        b.workload_with(w("u2", "b", &["10.0.0.2"], "node-2"), vec![])
            .unwrap();
        let s = b.build().unwrap();
        let a = s.pod_workload("ns", "a", "default").unwrap();
        assert_eq!(
            a.identity().to_string(),
            "spiffe://cluster.local/ns/ns/sa/default"
        );
        assert!(
            s.pod_workload("ns", "a", "other").is_none(),
            "the service account must match"
        );
        assert!(
            s.pod_workload("ns", "a", "").is_none(),
            "no service account given: no identity lent"
        );
        assert!(
            s.pod_workload("ns", "b", "default").is_none(),
            "b runs on another node"
        );
        // Every node's workloads are still destinations.
        assert!(s.workload_at("", "10.0.0.2".parse().unwrap()).is_some());
        let anywhere = {
            let mut b = StateBuilder::new(None);
            b.workload_with(w("u2", "b", &["10.0.0.2"], "node-2"), vec![])
                .unwrap();
            b.build().unwrap()
        };
        assert!(anywhere.pod_workload("ns", "b", "default").is_some());
    }

    #[test]
    fn endpoints_join_their_workloads_and_unhealthy_ones_are_left_out() {
        let key = svc("s", "/10.96.0.1").key();
        let mut b = StateBuilder::new(None);
        b.workload_with(
            w("u1", "a", &["10.0.0.1"], ""),
            vec![(key.clone(), ep("u1", HealthStatus::Healthy))],
        )
        .unwrap();
        b.workload_with(
            w("u2", "b", &["10.0.0.2"], ""),
            vec![(key.clone(), ep("u2", HealthStatus::Unhealthy))],
        )
        .unwrap();
        // The service names an endpoint whose workload is unknown.
        let mut s = (*svc("s", "/10.96.0.1")).clone();
        s.endpoints
            .insert(Uid::from("gone"), ep("gone", HealthStatus::Healthy));
        b.service(Arc::new(s)).unwrap();
        let s = b.build().unwrap();
        let entry = s.service_at("", "10.96.0.1".parse().unwrap()).unwrap();
        assert_eq!(entry.endpoints.len(), 3);
        let names: Vec<_> = entry
            .backends
            .iter()
            .map(|b| b.workload.name.as_str())
            .collect();
        assert_eq!(names, ["a"]);
        let src = w("src", "src", &[], "");
        for _ in 0..3 {
            assert!(matches!(
                s.resolve(&src, "10.96.0.1:80".parse().unwrap()),
                Destination::Workload(w, a) if w.name == "a" && a.port() == 8080
            ));
        }
        assert!(matches!(
            s.resolve(&src, "10.96.0.1:81".parse().unwrap()),
            Destination::NoEndpoint { port: 81, .. }
        ));
        assert!(matches!(
            s.resolve(&src, "1.2.3.4:80".parse().unwrap()),
            Destination::Passthrough(_)
        ));
    }

    #[test]
    fn addresses_are_per_network() {
        let mut b = StateBuilder::new(None);
        let mut remote = wl("u1", "a", &["10.0.0.1"], "");
        remote.network = "net-2".into();
        b.workload_with(Arc::new(remote), vec![]).unwrap();
        b.service(svc("s", "net-2/10.96.0.1")).unwrap();
        let s = b.build().unwrap();
        let local_src = w("src", "src", &[], "");
        assert!(matches!(
            s.resolve(&local_src, "10.0.0.1:80".parse().unwrap()),
            Destination::Passthrough(_)
        ));
        assert!(matches!(
            s.resolve(&local_src, "10.96.0.1:80".parse().unwrap()),
            Destination::Passthrough(_)
        ));
        let mut remote_src = (*local_src).clone();
        remote_src.network = "net-2".into();
        assert!(matches!(
            s.resolve(&remote_src, "10.0.0.1:80".parse().unwrap()),
            Destination::Workload(..)
        ));
    }

    #[test]
    fn keys_are_unique() {
        let mut b = StateBuilder::new(None);
        b.workload_with(w("u1", "a", &["10.0.0.1"], ""), vec![])
            .unwrap();
        assert_eq!(
            b.workload_with(w("u1", "b", &["10.0.0.2"], ""), vec![]),
            Err(BuildError::DuplicateWorkload(Uid::from("u1")))
        );
        b.service(svc("s", "/10.96.0.1")).unwrap();
        assert!(matches!(
            b.service(svc("s", "/10.96.0.2")),
            Err(BuildError::DuplicateService(_))
        ));
        let err = b.service(svc("t", "/10.96.0.1")).unwrap_err().to_string();
        assert!(
            err.contains("/10.96.0.1") && err.contains("s.ns") && err.contains("t.ns"),
            "{err}"
        );
    }

    #[test]
    fn a_pod_in_the_mesh_wins_a_shared_address() {
        let mut b = StateBuilder::new(None);
        let mut vm = wl(
            "c/networking.istio.io/WorkloadEntry/ns/vm",
            "vm",
            &["10.0.0.1"],
            "",
        );
        vm.protocol = Protocol::Hbone;
        let mut pod = wl("Kubernetes//Pod/ns/p", "p", &["10.0.0.1"], "");
        pod.protocol = Protocol::Tcp;
        b.workload_with(Arc::new(pod), vec![]).unwrap();
        b.workload_with(Arc::new(vm), vec![]).unwrap();
        let s = b.build().unwrap();
        assert_eq!(
            s.workload_at("", "10.0.0.1".parse().unwrap()).unwrap().name,
            "p"
        );
    }

    #[test]
    fn changes_apply_incrementally_and_earlier_snapshots_stay_as_they_were() {
        let key = svc("s", "/10.96.0.1").key();
        let mut index = Index::new(None);
        index.set_service(Source::Xds, key.clone(), Some(svc("s", "/10.96.0.1")));
        let a = w("u1", "a", &["10.0.0.1"], "");
        index.set_workload(
            Source::Xds,
            a.uid.clone(),
            Some(entry(
                a,
                vec![(key.clone(), ep("u1", HealthStatus::Healthy))],
            )),
        );
        let before = index.snapshot();
        // a moves to another address; b joins the service; a policy arrives.
        let a2 = w("u1", "a", &["10.0.0.9"], "");
        index.set_workload(
            Source::Xds,
            a2.uid.clone(),
            Some(entry(
                a2,
                vec![(key.clone(), ep("u1", HealthStatus::Healthy))],
            )),
        );
        let b = w("u2", "b", &["10.0.0.2"], "");
        index.set_workload(
            Source::Xds,
            b.uid.clone(),
            Some(entry(
                b,
                vec![(key.clone(), ep("u2", HealthStatus::Healthy))],
            )),
        );
        let after = index.snapshot();
        let at = |s: &MeshState, ip: &str| {
            s.workload_at("", ip.parse().unwrap())
                .map(|w| w.name.clone())
        };
        assert_eq!(
            (at(&before, "10.0.0.1"), at(&before, "10.0.0.9")),
            (Some("a".into()), None)
        );
        assert_eq!(
            (at(&after, "10.0.0.1"), at(&after, "10.0.0.9")),
            (None, Some("a".into()))
        );
        let backends = |s: &MeshState| {
            let mut v: Vec<String> = s
                .service(&key)
                .unwrap()
                .backends
                .iter()
                .map(|b| format!("{}@{}", b.workload.name, b.workload.ips[0]))
                .collect();
            v.sort();
            v
        };
        assert_eq!(backends(&before), ["a@10.0.0.1"]);
        assert_eq!(backends(&after), ["a@10.0.0.9", "b@10.0.0.2"]);
        // The local file's object comes back when the control plane drops its own.
        let local = w("u2", "b-from-file", &["10.0.0.3"], "");
        index.set_workload(
            Source::LocalFile,
            local.uid.clone(),
            Some(entry(local, vec![])),
        );
        assert_eq!(index.snapshot().workload("u2").unwrap().name, "b");
        index.set_workload(Source::Xds, Uid::from("u2"), None);
        let s = index.snapshot();
        assert_eq!(s.workload("u2").unwrap().name, "b-from-file");
        assert_eq!(backends(&s), ["a@10.0.0.9"]);
        index.set_workload(Source::LocalFile, Uid::from("u2"), None);
        index.set_service(Source::Xds, key.clone(), None);
        let s = index.snapshot();
        assert!(s.workload("u2").is_none() && s.service(&key).is_none());
        assert!(s.service_at("", "10.96.0.1".parse().unwrap()).is_none());
    }
}
