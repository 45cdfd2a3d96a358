//! The ZDS wire format: golden bytes shared with Istio, round trips, hostile input.

use protocol::message::{decode_hello, encode_hello};
use protocol::zds::{Version, WorkloadInfo};
use protocol::{Ack, Datagram, Error, Netns, Request, WorkloadUid};

fn info() -> WorkloadInfo {
    WorkloadInfo {
        name: "n".into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
    }
}

fn datagram(bytes: &[u8]) -> Datagram {
    Datagram {
        bytes: bytes.to_vec(),
        fd: None,
    }
}

fn with_netns(bytes: &[u8]) -> Datagram {
    use std::os::fd::AsFd;
    let netns = Netns::current().unwrap();
    Datagram {
        bytes: bytes.to_vec(),
        fd: Some(netns.as_fd().try_clone_to_owned().unwrap()),
    }
}

const ADD_U1: &[u8] = &[
    0x0a, 0x11, // WorkloadRequest.add, 17 bytes
    0x0a, 0x02, b'u', b'1', // AddWorkload.uid
    0x12, 0x0b, // AddWorkload.workload_info, 11 bytes
    0x0a, 0x01, b'n', // name
    0x12, 0x02, b'n', b's', // namespace
    0x1a, 0x02, b's', b'a', // service_account
];
const DEL_U1: &[u8] = &[0x12, 0x04, 0x12, 0x02, b'u', b'1']; // DelWorkload.uid is field 2
const KEEP_U1: &[u8] = &[0x2a, 0x04, 0x0a, 0x02, b'u', b'1']; // WorkloadRequest.keep is field 5
const SNAPSHOT_SENT: &[u8] = &[0x1a, 0x00];

#[test]
fn golden_bytes_of_every_message() {
    assert_eq!(encode_hello(Version::V1), [0x08, 0x01]);
    assert_eq!(Request::<Netns>::SnapshotSent.encode(), SNAPSHOT_SENT);
    assert_eq!(Ack::Ok.encode(), [0x0a, 0x00]);
    assert_eq!(
        Ack::Err("boom".into()).encode(),
        [0x0a, 0x06, 0x0a, 0x04, b'b', b'o', b'o', b'm']
    );
    let uid = WorkloadUid::new("u1");
    let add = Request::Add {
        uid: uid.clone(),
        info: info(),
        netns: Netns::current().unwrap(),
    };
    assert_eq!(add.encode(), ADD_U1);
    assert_eq!(Request::<Netns>::Del { uid: uid.clone() }.encode(), DEL_U1);
    assert_eq!(Request::<Netns>::Keep { uid }.encode(), KEEP_U1);
}

#[test]
fn requests_decode_from_golden_bytes() {
    match Request::decode(with_netns(ADD_U1)).unwrap() {
        Request::Add {
            uid,
            info: got,
            netns,
        } => {
            assert_eq!(uid, WorkloadUid::new("u1"));
            assert_eq!(got, info());
            assert_eq!(netns.id(), Netns::current().unwrap().id());
        }
        other => panic!("decoded {other:?}"),
    }
    assert!(matches!(
        Request::decode(datagram(DEL_U1)).unwrap(),
        Request::Del { uid } if uid.as_str() == "u1"
    ));
    assert!(matches!(
        Request::decode(datagram(KEEP_U1)).unwrap(),
        Request::Keep { uid } if uid.as_str() == "u1"
    ));
    assert!(matches!(
        Request::decode(datagram(SNAPSHOT_SENT)).unwrap(),
        Request::SnapshotSent
    ));
    assert_eq!(Ack::decode(datagram(&[0x0a, 0x00])).unwrap(), Ack::Ok);
    decode_hello(datagram(&[0x08, 0x01])).unwrap();
}

#[test]
fn rules_the_wire_cannot_express_are_enforced() {
    assert!(matches!(
        Request::decode(datagram(ADD_U1)),
        Err(Error::MissingNetns { uid }) if uid == "u1"
    ));
    assert!(matches!(
        Request::decode(with_netns(DEL_U1)),
        Err(Error::UnexpectedFd {
            kind: "DelWorkload"
        })
    ));
    assert!(matches!(
        Request::decode(with_netns(SNAPSHOT_SENT)),
        Err(Error::UnexpectedFd { .. })
    ));
    assert!(matches!(
        Request::decode(datagram(&[0x12, 0x00])),
        Err(Error::EmptyUid {
            kind: "DelWorkload"
        })
    ));
    // An empty WorkloadRequest decodes in protobuf but has no payload.
    assert!(matches!(
        Request::decode(datagram(&[])),
        Err(Error::MissingPayload)
    ));
    // A hello where a request belongs: field 1 with the wrong wire type.
    assert!(matches!(
        Request::decode(datagram(&[0x08, 0x01])),
        Err(Error::Decode(_))
    ));
    assert!(matches!(
        Ack::decode(datagram(&[])),
        Err(Error::MissingPayload)
    ));
    // A netns fd that is not a netns.
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let bad = Datagram {
        bytes: ADD_U1.to_vec(),
        fd: Some(file.into()),
    };
    assert!(matches!(Request::decode(bad), Err(Error::BadNetns(_))));
}

#[test]
fn a_version_we_do_not_speak_is_a_clear_error() {
    let err = decode_hello(datagram(&[0x08, 0x02])).unwrap_err();
    assert!(matches!(err, Error::UnsupportedVersion { got: 2, want: 1 }));
    assert!(err.to_string().contains("version 2"), "{err}");
    let err = decode_hello(datagram(&[])).unwrap_err();
    assert!(matches!(err, Error::UnsupportedVersion { got: 0, .. }));
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_and_truncated_datagrams_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut decoded_ok = 0;
    for _ in 0..20_000 {
        let len = (rng.next() % 48) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        decoded_ok += Request::decode(datagram(&bytes)).is_ok() as u32;
        let _ = Ack::decode(datagram(&bytes));
        let _ = decode_hello(datagram(&bytes));
    }
    // Most random bytes are not valid requests; the point is none of them panicked.
    assert!(decoded_ok < 20_000);
    for golden in [ADD_U1, DEL_U1, KEEP_U1] {
        for cut in 1..golden.len() {
            let err = Request::decode(with_netns(&golden[..cut])).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Decode(_)
                        | Error::EmptyUid { .. }
                        | Error::UnexpectedFd { .. }
                        | Error::MissingPayload
                ),
                "cut at {cut}: {err:?}"
            );
        }
    }
}
