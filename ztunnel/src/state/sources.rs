//! The sources of mesh state together: the local file and the control plane each
//! hand over what they hold (as [`Objects`]); every change rebuilds one snapshot from
//! both and swaps it into the [`Store`]. Where both name the same object, the control
//! plane's wins, as when Istio's ztunnel applies xDS updates over its local config.

use std::sync::{Arc, Mutex};

use tracing::warn;

use super::builder::{Objects, StateBuilder};
use super::{MeshState, Store};

#[derive(Default)]
struct Held {
    local: Option<Objects>,
    xds: Option<Objects>,
}

/// The one owner of what the sources hold.
pub struct Sources {
    node: Option<String>,
    held: Mutex<Held>,
    store: Arc<Store>,
}

impl Sources {
    /// `node` as for [`StateBuilder::new`].
    pub fn new(node: Option<String>, store: Arc<Store>) -> Arc<Sources> {
        Arc::new(Sources {
            node,
            held: Mutex::default(),
            store,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The local file's objects (validated on their own by its loader).
    pub fn set_local(&self, objects: Objects) {
        self.update(|held| held.local = Some(objects));
    }

    /// The control plane's objects.
    pub fn set_xds(&self, objects: Objects) {
        self.update(|held| held.xds = Some(objects));
    }

    fn update(&self, change: impl FnOnce(&mut Held)) {
        // Built under the lock (no await here), so two sources' updates apply in order;
        // readers of the store are never blocked: the swap is a pointer.
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut held);
        let state = merge(self.node.clone(), &held);
        for c in state.conflicts() {
            warn!("mesh state: {c}");
        }
        self.store.replace(state);
    }
}

fn merge(node: Option<String>, held: &Held) -> MeshState {
    let mut b = StateBuilder::merging(node);
    for objects in [&held.local, &held.xds].into_iter().flatten() {
        // A merging builder replaces instead of refusing: adding cannot fail.
        if let Err(e) = b.add(objects) {
            warn!("mesh state: {e}");
        }
    }
    b.build().unwrap_or_else(|e| {
        warn!("mesh state: {e}");
        MeshState::default()
    })
}
