//! Typed ZDS messages: what a datagram means, checked beyond what protobuf can say.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};

use prost::Message;

use crate::zds::{self, workload_request::Payload, workload_response};
use crate::{Datagram, Error, Netns};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: zds::Version = zds::Version::V1;

/// What both binaries' `version` subcommands print (and their first startup line):
/// the shape of Istio's `version.BuildInfo{…}` (operators' scripts read `Version:"…"`
/// from it), with the workspace's version, the build profile, the ZDS version, and
/// `extra` fields of the binary's own.
pub fn build_info(extra: &[(&str, &str)]) -> String {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut fields = vec![
        ("Version", env!("CARGO_PKG_VERSION")),
        ("BuildProfile", profile),
        ("ZdsVersion", PROTOCOL_VERSION.as_str_name()),
    ];
    fields.extend_from_slice(extra);
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}:\"{v}\"")).collect();
    format!("version.BuildInfo{{{}}}", fields.join(", "))
}

/// A pod's uid as Kubernetes assigns it. Its `Debug` form, `WorkloadUid("…")`, is the
/// one operators grep for in ztunnel's logs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadUid(String);

impl WorkloadUid {
    pub fn new(uid: impl Into<String>) -> Self {
        WorkloadUid(uid.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkloadUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request from the agent to ztunnel. `N` is how the netns travels: ztunnel receives
/// an owned [`Netns`]; the agent sends from whatever handle it keeps (e.g. `Arc<Netns>`).
#[derive(Debug)]
pub enum Request<N = Netns> {
    Add {
        uid: WorkloadUid,
        info: zds::WorkloadInfo,
        netns: N,
    },
    Keep {
        uid: WorkloadUid,
    },
    Del {
        uid: WorkloadUid,
    },
    SnapshotSent,
}

impl<N> Request<N> {
    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Add { .. } => "AddWorkload",
            Request::Keep { .. } => "KeepWorkload",
            Request::Del { .. } => "DelWorkload",
            Request::SnapshotSent => "SnapshotSent",
        }
    }

    pub fn uid(&self) -> Option<&WorkloadUid> {
        match self {
            Request::Add { uid, .. } | Request::Keep { uid } | Request::Del { uid } => Some(uid),
            Request::SnapshotSent => None,
        }
    }

    /// The protobuf bytes of this request (the fd travels beside them, see [`Request::fd`]).
    pub fn encode(&self) -> Vec<u8> {
        let payload = match self {
            Request::Add { uid, info, .. } => Payload::Add(zds::AddWorkload {
                uid: uid.0.clone(),
                workload_info: Some(info.clone()),
            }),
            Request::Keep { uid } => Payload::Keep(zds::KeepWorkload { uid: uid.0.clone() }),
            Request::Del { uid } => Payload::Del(zds::DelWorkload { uid: uid.0.clone() }),
            Request::SnapshotSent => Payload::SnapshotSent(zds::SnapshotSent {}),
        };
        zds::WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    }
}

impl<N: AsFd> Request<N> {
    /// The fd to attach: the netns on an Add, nothing otherwise.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Request::Add { netns, .. } => Some(netns.as_fd()),
            _ => None,
        }
    }
}

impl Request<Netns> {
    /// Decodes a received datagram. On error any attached fd is closed (it is dropped
    /// with the datagram), so a bad message never leaks a descriptor.
    pub fn decode(datagram: Datagram) -> Result<Self, Error> {
        let Datagram { bytes, fd } = datagram;
        let msg = zds::WorkloadRequest::decode(bytes.as_slice())?;
        let payload = msg.payload.ok_or(Error::MissingPayload)?;
        let request = match payload {
            Payload::Add(add) => {
                if add.uid.is_empty() {
                    return Err(Error::EmptyUid {
                        kind: "AddWorkload",
                    });
                }
                let fd = fd.ok_or_else(|| Error::MissingNetns {
                    uid: add.uid.clone(),
                })?;
                let netns = Netns::from_fd(fd).map_err(Error::BadNetns)?;
                return Ok(Request::Add {
                    uid: WorkloadUid(add.uid),
                    info: add.workload_info.unwrap_or_default(),
                    netns,
                });
            }
            Payload::Keep(keep) => Request::Keep {
                uid: non_empty(keep.uid, "KeepWorkload")?,
            },
            Payload::Del(del) => Request::Del {
                uid: non_empty(del.uid, "DelWorkload")?,
            },
            Payload::SnapshotSent(_) => Request::SnapshotSent,
        };
        if fd.is_some() {
            return Err(Error::UnexpectedFd {
                kind: request.kind(),
            });
        }
        Ok(request)
    }
}

fn non_empty(uid: String, kind: &'static str) -> Result<WorkloadUid, Error> {
    if uid.is_empty() {
        Err(Error::EmptyUid { kind })
    } else {
        Ok(WorkloadUid(uid))
    }
}

/// ztunnel's answer to one request: success, or the reason it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    Ok,
    Err(String),
}

impl Ack {
    pub fn encode(&self) -> Vec<u8> {
        let error = match self {
            Ack::Ok => String::new(),
            Ack::Err(e) => e.clone(),
        };
        zds::WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(zds::Ack { error })),
        }
        .encode_to_vec()
    }

    pub fn decode(datagram: Datagram) -> Result<Self, Error> {
        if datagram.fd.is_some() {
            return Err(Error::UnexpectedFd {
                kind: "WorkloadResponse",
            });
        }
        let msg = zds::WorkloadResponse::decode(datagram.bytes.as_slice())?;
        match msg.payload {
            Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(Ack::Ok),
            Some(workload_response::Payload::Ack(ack)) => Ok(Ack::Err(ack.error)),
            None => Err(Error::MissingPayload),
        }
    }

    pub fn into_result(self) -> Result<(), String> {
        match self {
            Ack::Ok => Ok(()),
            Ack::Err(e) => Err(e),
        }
    }
}

/// The hello ztunnel sends first on every connection.
pub fn encode_hello(version: zds::Version) -> Vec<u8> {
    zds::ZdsHello {
        version: version as i32,
    }
    .encode_to_vec()
}

/// Checks a received hello: it must announce exactly [`PROTOCOL_VERSION`].
pub fn decode_hello(datagram: Datagram) -> Result<(), Error> {
    if datagram.fd.is_some() {
        return Err(Error::UnexpectedFd { kind: "ZdsHello" });
    }
    let hello = zds::ZdsHello::decode(datagram.bytes.as_slice())?;
    if hello.version != PROTOCOL_VERSION as i32 {
        return Err(Error::UnsupportedVersion {
            got: hello.version,
            want: PROTOCOL_VERSION as i32,
        });
    }
    Ok(())
}
