//! How many connections one peer may hold open on a listener, shared by both binaries'
//! HTTP endpoints. A global cap alone lets one client take every slot (a slow client
//! holds a slot until its header deadline; two hundred of them hold them all), and
//! then the kubelet's readiness probe is refused and the node goes NotReady. With a
//! cap per peer address, a pod can take only its share, and the probe, which comes
//! from another address, still finds a slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The open connections per peer address, each bounded.
#[derive(Debug)]
pub struct PeerSlots {
    per_peer: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One peer's slot, given back when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    slots: Arc<PeerSlots>,
    peer: IpAddr,
}

impl PeerSlots {
    /// At most `per_peer` connections from one address (at least one).
    pub fn new(per_peer: usize) -> Arc<PeerSlots> {
        Arc::new(PeerSlots {
            per_peer: per_peer.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `peer`, or `None` when it holds its share already. An IPv4 peer
    /// seen on a dual-stack socket (`::ffff:a.b.c.d`) counts as its IPv4 address.
    pub fn try_acquire(self: &Arc<Self>, peer: IpAddr) -> Option<PeerSlot> {
        let peer = peer.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(peer).or_insert(0);
        if *n >= self.per_peer {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            slots: self.clone(),
            peer,
        })
    }

    /// How many addresses hold a slot.
    pub fn peers(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// The share one peer gets of an endpoint's `max_connections`: an eighth, at least one.
pub fn per_peer_share(max_connections: usize) -> usize {
    (max_connections / 8).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_gets_its_share_and_others_are_unaffected() {
        let slots = PeerSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.try_acquire(a).unwrap();
        let second = slots.try_acquire(a).unwrap();
        assert!(slots.try_acquire(a).is_none(), "a's share is taken");
        // The same address seen through a dual-stack socket is the same peer.
        assert!(slots
            .try_acquire("::ffff:10.0.0.1".parse().unwrap())
            .is_none());
        let other = slots.try_acquire(b).unwrap();
        drop(first);
        let again = slots.try_acquire(a).unwrap();
        drop((second, again, other));
        assert_eq!(slots.peers(), 0, "nothing is kept for peers that left");
        assert_eq!(per_peer_share(64), 8);
        assert_eq!(per_peer_share(4), 1);
    }
}
