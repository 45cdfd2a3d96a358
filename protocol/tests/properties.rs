//! Property tests: whatever bytes (and whatever fd) a peer sends, decoding a ZDS
//! datagram returns a message or an error, never panics, and never leaks the fd.
//! `PROPTEST_CASES` sets the number of cases (256 by default; `cargo xtask proptest`
//! runs many more).

use std::os::fd::OwnedFd;

use proptest::prelude::*;
use prost::Message;
use protocol::message::decode_hello;
use protocol::zds::{self, workload_request::Payload};
use protocol::{Ack, Datagram, Request};

/// A descriptor to attach: something that is not a netns, or a real netns.
fn fd(kind: u8) -> Option<OwnedFd> {
    match kind % 3 {
        0 => None,
        1 => std::fs::File::open("/dev/null").ok().map(OwnedFd::from),
        _ => std::fs::File::open("/proc/self/ns/net")
            .ok()
            .map(OwnedFd::from),
    }
}

/// Well-formed requests with arbitrary field values, so decoding gets past protobuf.
fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
    (0u8..5, ".{0,40}", ".{0,20}").prop_map(|(kind, uid, name)| {
        let payload = match kind {
            0 => Some(Payload::Add(zds::AddWorkload {
                uid,
                workload_info: Some(zds::WorkloadInfo {
                    name: name.clone(),
                    namespace: name,
                    service_account: String::new(),
                }),
            })),
            1 => Some(Payload::Del(zds::DelWorkload { uid })),
            2 => Some(Payload::Keep(zds::KeepWorkload { uid })),
            3 => Some(Payload::SnapshotSent(zds::SnapshotSent {})),
            _ => None,
        };
        zds::WorkloadRequest { payload }.encode_to_vec()
    })
}

/// Whether any of this process's fds refers to `path`.
fn open_anywhere(path: &std::path::Path) -> bool {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
}

proptest! {
    #[test]
    fn prop_any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512), kind in any::<u8>()) {
        let _ = Request::decode(Datagram { bytes: bytes.clone(), fd: fd(kind) });
        let _ = Ack::decode(Datagram { bytes: bytes.clone(), fd: fd(kind) });
        let _ = decode_hello(Datagram { bytes, fd: fd(kind) });
    }

    #[test]
    fn prop_well_formed_requests_with_any_fd_never_leak_it(bytes in request_bytes(), kind in any::<u8>()) {
        let _ = Request::decode(Datagram { bytes: bytes.clone(), fd: fd(kind) });
        // A file of our own, so no other thread's fds can be mistaken for a leak.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attached");
        std::fs::write(&path, b"").unwrap();
        let attached = std::fs::File::open(&path).ok().map(OwnedFd::from);
        prop_assert!(open_anywhere(&path));
        drop(Request::decode(Datagram { bytes, fd: attached }));
        prop_assert!(!open_anywhere(&path), "the attached fd was leaked");
    }
}
