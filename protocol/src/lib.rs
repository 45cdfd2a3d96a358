//! ZDS, the protocol between the node agent (`istio-cni`) and the node proxy (`ztunnel`).
//!
//! - [`zds`]: the protobuf messages, compiled from `proto/zds.proto` (package
//!   `istio.workload.zds`, wire-compatible with Istio).
//! - [`message`]: typed requests and responses, with the rules the wire format cannot
//!   express (an `AddWorkload` carries exactly one fd, nothing else carries any).
//! - [`transport`]: one message per `SOCK_SEQPACKET` datagram over a Unix socket, with
//!   an optional file descriptor attached, truncation detection and timeouts.
//! - [`netns`]: a network-namespace handle, the thing the fd on an `AddWorkload` is.
//! - [`logging`] and [`limits`]: how both binaries' log lines look, and how many
//!   connections one peer may hold on their HTTP endpoints (what they share besides
//!   the wire and their version line).

pub mod error;
pub mod limits;
pub mod logging;
pub mod message;
pub mod netns;
pub mod transport;

/// The generated protobuf types of package `istio.workload.zds`.
pub mod zds {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
}

pub use error::Error;
pub use message::{Ack, Request, WorkloadUid, PROTOCOL_VERSION};
pub use netns::{routable, Netns, NetnsId};
pub use transport::{Datagram, SeqpacketConn, SeqpacketListener, DEFAULT_TIMEOUT};
