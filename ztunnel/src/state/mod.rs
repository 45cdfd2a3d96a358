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

pub mod builder;
pub mod localconfig;
pub mod policy;
pub mod service;
pub mod sources;
pub mod translate;
pub mod watch;
pub mod workload;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

pub use builder::{BuildError, Objects, StateBuilder};
pub use policy::PolicyIndex;
pub use service::{Pick, ServiceEntry};
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
}

/// One validated snapshot of the mesh.
#[derive(Debug, Default)]
pub struct MeshState {
    by_uid: HashMap<Uid, Arc<Workload>>,
    /// network -> address -> workload (host-network workloads are not found by address).
    by_addr: HashMap<String, HashMap<IpAddr, Arc<Workload>>>,
    /// namespace -> name -> this node's workloads of that name: how pods are matched.
    local: HashMap<String, HashMap<String, Vec<Arc<Workload>>>>,
    services: HashMap<NamespacedHostname, Arc<ServiceEntry>>,
    /// network -> VIP -> service.
    by_vip: HashMap<String, HashMap<IpAddr, Arc<ServiceEntry>>>,
    policies: PolicyIndex,
    /// What the builder had to decide between (the same key twice, when merging).
    conflicts: Vec<String>,
}

impl MeshState {
    pub fn conflicts(&self) -> &[String] {
        &self.conflicts
    }

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_uid.values()
    }

    /// The workloads of this node (all of them without a node name).
    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.local
            .values()
            .flat_map(|names| names.values().flatten())
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.by_uid.get(uid)
    }

    /// The workload at `ip` in `network`.
    pub fn workload_at(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_addr.get(network)?.get(&ip)
    }

    pub fn service(&self, key: &NamespacedHostname) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    /// The service whose VIP is `ip` in `network`.
    pub fn service_at(&self, network: &str, ip: IpAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_vip.get(network)?.get(&ip)
    }

    /// The workload of a pod the agent enrolled: this node's workload with the pod's
    /// namespace, name and service account (any service account if the agent gave
    /// none), as Istio matches them.
    pub fn pod_workload(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
    ) -> Option<&Arc<Workload>> {
        self.local
            .get(namespace)?
            .get(name)?
            .iter()
            .find(|w| service_account.is_empty() || w.service_account == service_account)
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
                return self.via_waypoint(gw, src, dst);
            }
            return match svc.pick(src, dst) {
                Pick::Upstream(w, addr) => Destination::Workload(w, addr),
                Pick::OriginalDestination => self.resolve_address(src, dst),
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
                .and_then(|w| w.waypoint.as_ref()),
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
            uid: Uid(uid.into()),
            name: name.into(),
            namespace: "ns".into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            node: node.into(),
            protocol: Protocol::Hbone,
            ..Workload::default()
        }
        .with_defaults()
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
            workload_uid: Uid(uid.into()),
            port: Default::default(),
            status,
        }
    }

    #[test]
    fn defaults_are_filled_and_pods_match_only_this_nodes_workloads() {
        let mut b = StateBuilder::new(Some("node-1".into()));
        b.workload(w("u1", "a", &["10.0.0.1"], "node-1")).unwrap();
        b.workload(w("u2", "b", &["10.0.0.2"], "node-2")).unwrap();
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
            s.pod_workload("ns", "a", "").is_some(),
            "no service account given: any"
        );
        assert!(
            s.pod_workload("ns", "b", "default").is_none(),
            "b runs on another node"
        );
        // Every node's workloads are still destinations.
        assert!(s.workload_at("", "10.0.0.2".parse().unwrap()).is_some());
        let anywhere = {
            let mut b = StateBuilder::new(None);
            b.workload(w("u2", "b", &["10.0.0.2"], "node-2")).unwrap();
            b.build().unwrap()
        };
        assert!(anywhere.pod_workload("ns", "b", "default").is_some());
    }

    #[test]
    fn endpoints_join_their_workloads_and_unhealthy_ones_are_left_out() {
        let mut b = StateBuilder::new(None);
        b.workload(w("u1", "a", &["10.0.0.1"], "")).unwrap();
        b.workload(w("u2", "b", &["10.0.0.2"], "")).unwrap();
        b.endpoint(
            svc("s", "/10.96.0.1").key(),
            ep("u1", HealthStatus::Healthy),
        );
        b.endpoint(
            svc("s", "/10.96.0.1").key(),
            ep("u2", HealthStatus::Unhealthy),
        );
        b.endpoint(
            svc("s", "/10.96.0.1").key(),
            ep("gone", HealthStatus::Healthy),
        );
        b.service(svc("s", "/10.96.0.1")).unwrap();
        let s = b.build().unwrap();
        let entry = s.service_at("", "10.96.0.1".parse().unwrap()).unwrap();
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
        b.workload(Arc::new(remote)).unwrap();
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
        b.workload(w("u1", "a", &["10.0.0.1"], "")).unwrap();
        assert_eq!(
            b.workload(w("u1", "b", &["10.0.0.2"], "")),
            Err(BuildError::DuplicateWorkload(Uid("u1".into())))
        );
        b.service(svc("s", "/10.96.0.1")).unwrap();
        assert!(matches!(
            b.service(svc("s", "/10.96.0.2")),
            Err(BuildError::DuplicateService(_))
        ));
        b.service(svc("t", "/10.96.0.1")).unwrap();
        let err = b.build().unwrap_err().to_string();
        assert!(
            err.contains("/10.96.0.1") && err.contains("s.ns") && err.contains("t.ns"),
            "{err}"
        );
    }

    #[test]
    fn a_pod_in_the_mesh_wins_a_shared_address() {
        let mut b = StateBuilder::new(None);
        let mut entry = wl(
            "c/networking.istio.io/WorkloadEntry/ns/vm",
            "vm",
            &["10.0.0.1"],
            "",
        );
        entry.protocol = Protocol::Hbone;
        let mut pod = wl("Kubernetes//Pod/ns/p", "p", &["10.0.0.1"], "");
        pod.protocol = Protocol::Tcp;
        b.workload(Arc::new(pod)).unwrap();
        b.workload(Arc::new(entry)).unwrap();
        let s = b.build().unwrap();
        assert_eq!(
            s.workload_at("", "10.0.0.1".parse().unwrap()).unwrap().name,
            "p"
        );
    }
}
