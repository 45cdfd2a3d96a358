//! Every connection the node's pod proxies carry right now, for the admin endpoint's
//! `workloadState.<uid>.connections` (what `istioctl ztunnel-config connections`
//! reads). One table for the node: an entry is added when a connection is counted as
//! opened and removed when its [`Tracked`] handle drops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use protocol::WorkloadUid;

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

#[derive(Debug, Default)]
pub struct ConnectionTable {
    conns: Mutex<HashMap<u64, Connection>>,
    next: AtomicU64,
}

/// Keeps a connection listed while it lives.
#[derive(Debug)]
pub struct Tracked {
    table: Arc<ConnectionTable>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.table
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl ConnectionTable {
    pub fn track(self: &Arc<Self>, conn: Connection) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, conn);
        Tracked {
            table: self.clone(),
            id,
        }
    }

    /// The live connections, oldest first.
    pub fn list(&self) -> Vec<Connection> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(u64, Connection)> =
            conns.iter().map(|(id, c)| (*id, c.clone())).collect();
        drop(conns);
        out.sort_by_key(|(id, _)| *id);
        out.into_iter().map(|(_, c)| c).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_listed_while_its_handle_lives() {
        let table = Arc::new(ConnectionTable::default());
        let a: SocketAddr = "10.0.0.1:1234".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let conn = Connection {
            uid: WorkloadUid::new("pod-1"),
            inbound: false,
            src: a,
            original_dst: b,
            actual_dst: "10.0.0.2:15008".parse().unwrap(),
        };
        let first = table.track(conn.clone());
        let second = table.track(Connection {
            inbound: true,
            ..conn.clone()
        });
        assert_eq!(table.list().len(), 2);
        assert_eq!(table.list()[0], conn);
        drop(first);
        assert_eq!(table.list().len(), 1);
        assert!(table.list()[0].inbound);
        drop(second);
        assert!(table.list().is_empty());
    }
}
