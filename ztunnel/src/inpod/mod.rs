//! In-pod mode: ztunnel receives pods' network namespaces from the node agent over ZDS
//! and runs a proxy inside each.
//!
//! - [`workloadmanager`]: the ZDS client (connect, hello, messages, acks, reconnect).
//! - [`statemanager`]: one proxy per pod uid, snapshot reconciliation, retries.
//! - [`netns`]: the proxy's sockets made inside a pod's netns (its
//!   `proxy::seam::SocketFactory`).

pub mod netns;
pub mod statemanager;
pub mod workloadmanager;
