//! Readiness, as Istio's ztunnel has it: a set of startup blockers (the first mesh
//! state, the agent's first snapshot). Ready once every blocker is released, and from
//! then on: one pod waiting for its workload or certificate never makes the node
//! unready (a rolling upgrade would stall on it); it shows in the body instead.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// The startup blockers still pending.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<String>>,
    shutting_down: Mutex<bool>,
}

/// One startup task the node waits for; [`Blocker::release`] when done.
pub struct Blocker {
    owner: Arc<Readiness>,
    name: String,
}

impl Blocker {
    pub fn release(self) {
        self.owner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

impl Readiness {
    pub fn new() -> Arc<Readiness> {
        Arc::new(Readiness::default())
    }

    /// Adds a blocker named `what` (it appears in the not-ready body).
    pub fn block(self: &Arc<Self>, what: &str) -> Blocker {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(what.to_string());
        Blocker {
            owner: self.clone(),
            name: what.to_string(),
        }
    }

    /// The node is going away: not ready any more.
    pub fn shutdown(&self) {
        *self.shutting_down.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Ready, or what it still waits for.
    pub fn status(&self) -> Result<(), Vec<String>> {
        if *self.shutting_down.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(vec!["shutting down".into()]);
        }
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.is_empty() {
            Ok(())
        } else {
            Err(pending.iter().cloned().collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_blocker_is_released_until_shutdown() {
        let r = Readiness::new();
        let xds = r.block("xDS: the first state");
        let zds = r.block("the agent's first snapshot");
        assert_eq!(r.status().unwrap_err().len(), 2);
        xds.release();
        assert_eq!(
            r.status().unwrap_err(),
            vec!["the agent's first snapshot".to_string()]
        );
        zds.release();
        assert!(r.status().is_ok());
        r.shutdown();
        assert!(r.status().is_err());
    }
}
