//! The one table of the node's live proxied connections, by pod. It serves two
//! readers:
//!
//! - the admin endpoint's `workloadState.<uid>.connections` (what `istioctl
//!   ztunnel-config connections` reads): each connection once it is counted as
//!   opened, with where it came from and where it goes;
//! - policy: an inbound connection is registered with what its authorization was
//!   decided on before ztunnel connects to the app, so that a policy change re-checks
//!   the pod's connections ([`ConnectionTable::recheck`]) and closes those now denied,
//!   also one still connecting.
//!
//! An entry lives as long as its [`Listed`] handle; a connection that was registered
//! for policy is described in the same entry when it opens.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use protocol::WorkloadUid;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::authz::{self, Conn, Decision};
use crate::identity::Identity;
use crate::state::{MeshState, Workload};

/// One live connection, from its pod's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub uid: WorkloadUid,
    /// The pod is the server.
    pub inbound: bool,
    pub src: SocketAddr,
    /// Where the client meant to go.
    pub original_dst: SocketAddr,
    /// Where the bytes actually go (e.g. the peer's 15008, or a waypoint).
    pub actual_dst: SocketAddr,
}

/// A connection's authorization attributes.
#[derive(Clone, Debug)]
pub struct Attrs {
    pub src_ip: IpAddr,
    pub src_identity: Option<Identity>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

impl Attrs {
    pub fn conn(&self) -> Conn<'_> {
        Conn {
            src_ip: self.src_ip,
            src_identity: self.src_identity.as_ref(),
            dst_ip: self.dst_ip,
            dst_port: self.dst_port,
        }
    }

    pub fn decide(&self, state: &MeshState, dst: &Workload) -> Decision {
        authz::authorize(state.policies(), dst, &self.conn())
    }
}

/// What a policy re-check needs of a connection, and how it closes it.
struct Guard {
    attrs: Attrs,
    cancel: CancellationToken,
    reason: Arc<Mutex<String>>,
}

#[derive(Default)]
struct Entry {
    /// Set once the connection is counted as opened (what the admin view lists).
    conn: Option<Connection>,
    /// Set for a connection under policy (inbound); shared so that a re-check
    /// decides outside the table's lock.
    guard: Option<Arc<Guard>>,
}

#[derive(Default)]
pub struct ConnectionTable {
    pods: Mutex<HashMap<WorkloadUid, HashMap<u64, Entry>>>,
    next: AtomicU64,
}

/// Keeps one connection's entry while it lives; removes it when dropped. For a
/// connection under policy, also how a policy change closes it.
pub struct Listed {
    table: Arc<ConnectionTable>,
    uid: WorkloadUid,
    id: u64,
    /// The connection's policy side, when it is under policy.
    guard: Option<Arc<Guard>>,
}

impl Listed {
    /// Whether a policy change denied the connection since it was registered.
    pub fn denied(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.cancel.is_cancelled())
    }

    /// Ends when a policy change denies the connection; never for one not under
    /// policy.
    pub async fn revoked(&self) {
        match &self.guard {
            Some(g) => g.cancel.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Why the connection was cancelled.
    pub fn reason(&self) -> String {
        self.guard
            .as_ref()
            .map(|g| g.reason.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listed({}#{})", self.uid, self.id)
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut pods = self.table.lock();
        if let Some(conns) = pods.get_mut(&self.uid) {
            conns.remove(&self.id);
            if conns.is_empty() {
                pods.remove(&self.uid);
            }
        }
    }
}

impl ConnectionTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<WorkloadUid, HashMap<u64, Entry>>> {
        // Every mutation is one insert or remove: a panic elsewhere leaves no entry
        // half-written.
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(self: &Arc<Self>, uid: &WorkloadUid, entry: Entry) -> Listed {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let guard = entry.guard.clone();
        let mut pods = self.lock();
        // The pod's key is copied only for its first connection.
        match pods.get_mut(uid) {
            Some(conns) => {
                conns.insert(id, entry);
            }
            None => {
                pods.insert(uid.clone(), HashMap::from([(id, entry)]));
            }
        }
        drop(pods);
        Listed {
            table: self.clone(),
            uid: uid.clone(),
            id,
            guard,
        }
    }

    /// Registers an inbound connection of pod `uid` under policy, before ztunnel
    /// connects to the app: a policy pushed from now on applies to it.
    pub fn register(self: &Arc<Self>, uid: &WorkloadUid, attrs: Attrs) -> Listed {
        let guard = Arc::new(Guard {
            attrs,
            cancel: CancellationToken::new(),
            reason: Arc::default(),
        });
        self.insert(
            uid,
            Entry {
                conn: None,
                guard: Some(guard),
            },
        )
    }

    /// Lists `conn` (counted as opened): in `registered`'s entry when it was
    /// registered for policy (the caller keeps that handle alive), else in a new one
    /// whose handle is returned.
    pub fn track(
        self: &Arc<Self>,
        conn: Connection,
        registered: Option<&Listed>,
    ) -> Option<Listed> {
        if let Some(r) = registered {
            let mut pods = self.lock();
            if let Some(entry) = pods.get_mut(&r.uid).and_then(|c| c.get_mut(&r.id)) {
                entry.conn = Some(conn);
                return None;
            }
        }
        let uid = conn.uid.clone();
        Some(self.insert(
            &uid,
            Entry {
                conn: Some(conn),
                guard: None,
            },
        ))
    }

    /// The live connections, oldest first.
    pub fn list(&self) -> Vec<Connection> {
        let pods = self.lock();
        let mut out: Vec<(u64, Connection)> = pods
            .values()
            .flat_map(|conns| conns.iter())
            .filter_map(|(id, e)| Some((*id, e.conn.clone()?)))
            .collect();
        drop(pods);
        out.sort_by_key(|(id, _)| *id);
        out.into_iter().map(|(_, c)| c).collect()
    }

    /// Re-decides every connection of pod `uid` under policy against `state`, the pod
    /// being `dst`; closes the denied. A pod whose workload left the mesh state has
    /// nothing to allow its connections: they are closed. The decisions are made
    /// outside the table's lock, which every connection of the node takes as it opens
    /// and closes.
    pub fn recheck(&self, uid: &WorkloadUid, state: &MeshState, dst: Option<&Workload>) {
        let guards: Vec<Arc<Guard>> = match self.lock().get(uid) {
            Some(conns) => conns.values().filter_map(|e| e.guard.clone()).collect(),
            None => return,
        };
        for guard in guards {
            let decision = match dst {
                Some(dst) => guard.attrs.decide(state, dst),
                None => Decision::Deny {
                    policy: "the pod's workload left the mesh state".into(),
                },
            };
            if let Decision::Deny { policy } = decision {
                info!(src = %guard.attrs.src_ip, dst_port = guard.attrs.dst_port, %policy, "policy change denies a live connection; closing it");
                *guard.reason.lock().unwrap_or_else(|p| p.into_inner()) =
                    format!("denied by policy {policy} after a config change");
                guard.cancel.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(uid: &str, inbound: bool) -> Connection {
        Connection {
            uid: WorkloadUid::new(uid),
            inbound,
            src: "10.0.0.1:1234".parse().unwrap(),
            original_dst: "10.0.0.2:80".parse().unwrap(),
            actual_dst: "10.0.0.2:15008".parse().unwrap(),
        }
    }

    fn attrs() -> Attrs {
        Attrs {
            src_ip: "10.0.0.1".parse().unwrap(),
            src_identity: None,
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: 80,
        }
    }

    #[test]
    fn a_connection_is_listed_while_its_handle_lives() {
        let table = Arc::new(ConnectionTable::default());
        let first = table.track(conn("pod-1", false), None);
        let second = table.track(conn("pod-1", true), None);
        assert_eq!(table.list().len(), 2);
        assert_eq!(table.list()[0], conn("pod-1", false));
        drop(first);
        assert_eq!(table.list().len(), 1);
        assert!(table.list()[0].inbound);
        drop(second);
        assert!(table.list().is_empty());
        assert!(table.lock().is_empty(), "no pod left behind");
    }

    #[test]
    fn a_registered_connection_is_one_entry_listed_once_it_opens() {
        let table = Arc::new(ConnectionTable::default());
        let uid = WorkloadUid::new("pod-1");
        let registered = table.register(&uid, attrs());
        assert!(table.list().is_empty(), "not opened yet");
        let extra = table.track(conn("pod-1", true), Some(&registered));
        assert!(extra.is_none(), "described in the registered entry");
        assert_eq!(table.list(), [conn("pod-1", true)]);
        assert_eq!(table.lock()[&uid].len(), 1);
        drop(registered);
        assert!(table.list().is_empty());
    }

    #[test]
    fn a_recheck_closes_only_the_pods_connections_under_policy() {
        let table = Arc::new(ConnectionTable::default());
        let (one, two) = (WorkloadUid::new("pod-1"), WorkloadUid::new("pod-2"));
        let a = table.register(&one, attrs());
        let b = table.register(&two, attrs());
        let plain = table.track(conn("pod-1", false), None).unwrap();
        table.recheck(&one, &MeshState::default(), None);
        assert!(a.denied());
        assert!(a.reason().contains("left the mesh state"), "{}", a.reason());
        assert!(!b.denied(), "another pod's connection");
        assert!(!plain.denied(), "not under policy");
    }
}
