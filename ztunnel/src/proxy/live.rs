//! The pod's live inbound connections, with what their authorization was decided on,
//! so that a policy change can re-check them and close those now denied.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::authz::{self, Conn, Decision};
use crate::identity::Identity;
use crate::state::{MeshState, Workload};

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

struct Entry {
    attrs: Attrs,
    cancel: CancellationToken,
    reason: Arc<Mutex<String>>,
}

#[derive(Default)]
pub struct LiveConns {
    conns: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
}

/// Registration of one connection; unregisters on drop. It owns its place in the
/// table, so a connection is registered before ztunnel connects to the app and a
/// policy pushed meanwhile is applied to it.
pub struct Registration {
    owner: Arc<LiveConns>,
    id: u64,
    pub cancel: CancellationToken,
    reason: Arc<Mutex<String>>,
}

impl Registration {
    /// Whether a policy change denied the connection since it was registered.
    pub fn denied(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Why the connection was cancelled.
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.owner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl LiveConns {
    pub fn register(self: &Arc<Self>, attrs: Attrs) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let reason = Arc::new(Mutex::new(String::new()));
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Entry {
                attrs,
                cancel: cancel.clone(),
                reason: reason.clone(),
            },
        );
        Registration {
            owner: self.clone(),
            id,
            cancel,
            reason,
        }
    }

    /// Re-decides every live connection to `dst` under `state`; closes the denied. A
    /// pod whose workload left the mesh state has nothing to allow its connections:
    /// they are closed.
    pub fn recheck(&self, state: &MeshState, dst: Option<&Workload>) {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for entry in conns.values() {
            let decision = match dst {
                Some(dst) => entry.attrs.decide(state, dst),
                None => Decision::Deny {
                    policy: "the pod's workload left the mesh state".into(),
                },
            };
            if let Decision::Deny { policy } = decision {
                info!(src = %entry.attrs.src_ip, dst_port = entry.attrs.dst_port, %policy, "policy change denies a live connection; closing it");
                *entry.reason.lock().unwrap_or_else(|p| p.into_inner()) =
                    format!("denied by policy {policy} after a config change");
                entry.cancel.cancel();
            }
        }
    }
}
