//! How many proxied connections one pod may have open at once (`POD_MAX_CONNECTIONS`).
//! Every pod shares the node's one ztunnel: without a cap, one pod opening connections
//! and holding them idle grows ztunnel's memory until it dies, taking every pod's
//! traffic with it. A connection over the cap is refused at once (closed; on 15008 the
//! CONNECT is answered 503), logged in the access log and counted in
//! `workload_manager_connections_refused_total`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A pod's open proxied connections, against its cap.
#[derive(Debug)]
pub struct Budget {
    open: AtomicUsize,
    max: usize,
}

/// One connection's share; given back when dropped.
#[derive(Debug)]
pub struct Share(Arc<Budget>);

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// A share for one more connection, or `None` when the pod has `max` open.
    pub fn take(self: &Arc<Self>) -> Option<Share> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Share(self.clone()))
    }

    #[cfg(test)]
    pub(super) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// What the access log says of a refused connection.
    pub fn refusal(&self) -> String {
        format!(
            "refused: the pod has {} proxied connections open, its limit (POD_MAX_CONNECTIONS)",
            self.max
        )
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_gets_its_cap_and_a_closed_connection_gives_its_share_back() {
        let b = Budget::new(2);
        let (one, two) = (b.take().unwrap(), b.take().unwrap());
        assert!(b.take().is_none(), "over the cap");
        assert_eq!(b.open(), 2);
        drop(one);
        let three = b.take().unwrap();
        drop((two, three));
        assert_eq!(b.open(), 0);
        assert!(b.refusal().contains("POD_MAX_CONNECTIONS"));
    }
}
