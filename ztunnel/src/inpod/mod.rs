//! In-pod mode: ztunnel receives pods' network namespaces from the node agent over ZDS
//! and runs a proxy inside each.
//!
//! - [`workloadmanager`]: the ZDS client (connect, hello, messages, acks, reconnect).
//! - [`statemanager`]: one proxy per pod uid, snapshot reconciliation, retries.
//! - [`netns`]: a socket-making thread inside a pod's netns.
//! - [`packet`]: marks and socket options.

pub mod netns;
pub mod packet;
pub mod statemanager;
pub mod workloadmanager;
