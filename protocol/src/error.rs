use std::io;
use std::time::Duration;

/// Everything that can go wrong exchanging ZDS messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} on the ZDS socket failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the peer closed the ZDS connection")]
    Closed,
    #[error("{op} on the ZDS socket timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("datagram truncated: it is larger than the {limit}-byte receive buffer")]
    Truncated { limit: usize },
    #[error("control data truncated: the peer attached more file descriptors than allowed")]
    ControlTruncated,
    #[error("{count} file descriptors attached to one datagram; at most one is allowed")]
    TooManyFds { count: usize },
    #[error("malformed ZDS message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(
        "ZDS message has no payload this build knows: empty, or a kind added in a newer \
         release (run istio-cni and ztunnel from one release)"
    )]
    MissingPayload,
    #[error("AddWorkload for {uid} carries no network-namespace fd")]
    MissingNetns { uid: String },
    #[error("{kind} message carries a file descriptor; only AddWorkload may")]
    UnexpectedFd { kind: &'static str },
    #[error("{kind} message has an empty workload uid")]
    EmptyUid { kind: &'static str },
    #[error(
        "peer speaks ZDS version {got}, this build speaks only version {want} (V1): run \
         istio-cni and ztunnel from one release (upgrade the older one)"
    )]
    UnsupportedVersion { got: i32, want: i32 },
    #[error("the fd attached to AddWorkload is not a network namespace: {0}")]
    BadNetns(io::Error),
}

impl Error {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, source }
    }

    /// True when the connection can no longer be used (as opposed to one bad message).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::Closed | Error::Timeout { .. }
        )
    }
}
