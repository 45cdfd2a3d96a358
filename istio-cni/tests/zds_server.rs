//! The agent's ZDS server against fake ztunnels (the test speaking raw ZDS): snapshot,
//! routing of Adds and Dels, acks, version and timeout handling. No root needed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use istio_cni::zds_server::{AddOutcome, SnapshotEntry, SnapshotSource, ZdsError, ZdsServer};
use protocol::message::encode_hello;
use protocol::zds::{Version, WorkloadInfo};
use protocol::{Ack, Error, Netns, Request, SeqpacketConn, SeqpacketListener, WorkloadUid};

/// A snapshot source that hands out a fixed list and records the answers.
#[derive(Default)]
struct Source {
    pods: Mutex<Vec<(WorkloadUid, SnapshotEntry)>>,
    answers: Mutex<Vec<(String, Result<(), String>)>>,
}

impl SnapshotSource for Source {
    fn snapshot(&self) -> Vec<(WorkloadUid, SnapshotEntry)> {
        self.pods.lock().unwrap().clone()
    }

    fn snapshot_answered(
        &self,
        uid: &WorkloadUid,
        _entry: &SnapshotEntry,
        result: Result<(), &ZdsError>,
    ) {
        self.answers
            .lock()
            .unwrap()
            .push((uid.to_string(), result.map_err(ToString::to_string)));
    }
}

struct Fixture {
    server: ZdsServer,
    source: Arc<Source>,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _serve: tokio::task::JoinHandle<()>,
}

fn fixture(timeout: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let listener = SeqpacketListener::bind(&path, 0o600).unwrap();
    let server = ZdsServer::new(timeout);
    let source = Arc::new(Source::default());
    let serve = tokio::spawn(server.clone().serve(listener, source.clone()));
    Fixture {
        server,
        source,
        path,
        _dir: dir,
        _serve: serve,
    }
}

fn netns() -> Arc<Netns> {
    Arc::new(Netns::current().unwrap())
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
    }
}

/// A fake ztunnel: connects and says hello.
async fn ztunnel(path: &std::path::Path) -> SeqpacketConn {
    let conn = SeqpacketConn::connect(path).await.unwrap();
    conn.send(&encode_hello(Version::V1), None).await.unwrap();
    conn
}

async fn next(conn: &SeqpacketConn) -> Request {
    Request::decode(conn.recv_timeout(Duration::from_secs(5)).await.unwrap()).unwrap()
}

async fn ack(conn: &SeqpacketConn) {
    conn.send(&Ack::Ok.encode(), None).await.unwrap();
}

#[tokio::test]
async fn a_new_ztunnel_gets_the_snapshot_with_fds_then_snapshot_sent() {
    let f = fixture(Duration::from_secs(5));
    let ns = netns();
    *f.source.pods.lock().unwrap() = vec![
        (
            WorkloadUid::new("a"),
            SnapshotEntry::Add {
                info: info("a"),
                netns: ns.clone(),
            },
        ),
        (WorkloadUid::new("b"), SnapshotEntry::Keep),
    ];
    let zt = ztunnel(&f.path).await;
    match next(&zt).await {
        Request::Add {
            uid,
            info: got,
            netns,
        } => {
            assert_eq!(uid.as_str(), "a");
            assert_eq!(got, info("a"));
            assert_eq!(
                netns.id(),
                ns.id(),
                "the fd ztunnel receives is the pod's netns"
            );
        }
        other => panic!("expected Add, got {other:?}"),
    }
    zt.send(&Ack::Err("listeners: address in use".into()).encode(), None)
        .await
        .unwrap();
    assert!(matches!(next(&zt).await, Request::Keep { uid } if uid.as_str() == "b"));
    ack(&zt).await;
    assert!(matches!(next(&zt).await, Request::SnapshotSent));
    ack(&zt).await;
    f.server.wait_for_connections(1).await;
    // Each answer goes back to the source, a refusal with ztunnel's reason.
    let answers = f.source.answers.lock().unwrap().clone();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0].0, "a");
    assert!(
        answers[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("address in use"),
        "{answers:?}"
    );
    assert_eq!(answers[1], ("b".to_string(), Ok(())));
}

async fn connected(f: &Fixture, n: usize) -> SeqpacketConn {
    let zt = ztunnel(&f.path).await;
    assert!(matches!(next(&zt).await, Request::SnapshotSent));
    ack(&zt).await;
    f.server.wait_for_connections(n).await;
    zt
}

#[tokio::test]
async fn adds_go_to_the_newest_ztunnel_and_dels_to_all() {
    let f = fixture(Duration::from_secs(5));
    let old = connected(&f, 1).await;
    let new = connected(&f, 2).await;

    let server = f.server.clone();
    let add =
        tokio::spawn(async move { server.add(WorkloadUid::new("p"), info("p"), netns()).await });
    assert!(matches!(next(&new).await, Request::Add { .. }));
    ack(&new).await;
    assert_eq!(add.await.unwrap().unwrap(), AddOutcome::Acked);

    let server = f.server.clone();
    let del = tokio::spawn(async move { server.del(&WorkloadUid::new("p")).await });
    for zt in [&old, &new] {
        assert!(matches!(next(zt).await, Request::Del { uid } if uid.as_str() == "p"));
        ack(zt).await;
    }
    del.await.unwrap().unwrap();
    // The old one saw no Add at all.
    let nothing = old.recv_timeout(Duration::from_millis(100)).await;
    assert!(matches!(nothing, Err(Error::Timeout { .. })), "{nothing:?}");
}

#[tokio::test]
async fn without_ztunnel_an_add_reports_so_and_sends_nothing() {
    let f = fixture(Duration::from_secs(5));
    let outcome = f
        .server
        .add(WorkloadUid::new("p"), info("p"), netns())
        .await
        .unwrap();
    assert_eq!(outcome, AddOutcome::NoZtunnel);
    // The next ztunnel hears only what the source says (the enrollment keeps the pod).
    let zt = ztunnel(&f.path).await;
    assert!(matches!(next(&zt).await, Request::SnapshotSent));
}

#[tokio::test]
async fn error_acks_garbage_acks_and_silence_are_reported_to_the_caller() {
    let f = fixture(Duration::from_millis(300));
    let zt = connected(&f, 1).await;

    let server = f.server.clone();
    let add =
        tokio::spawn(async move { server.add(WorkloadUid::new("p"), info("p"), netns()).await });
    next(&zt).await;
    zt.send(&Ack::Err("no room".into()).encode(), None)
        .await
        .unwrap();
    let err = add.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, ZdsError::Rejected { error, .. } if error == "no room"),
        "{err}"
    );

    let server = f.server.clone();
    let add =
        tokio::spawn(async move { server.add(WorkloadUid::new("q"), info("q"), netns()).await });
    next(&zt).await;
    zt.send(&[0xff, 0xff], None).await.unwrap();
    let err = add.await.unwrap().unwrap_err();
    assert!(matches!(err, ZdsError::Protocol(Error::Decode(_))), "{err}");

    // No answer at all: the caller gets a timeout, the connection is dropped.
    let server = f.server.clone();
    let add =
        tokio::spawn(async move { server.add(WorkloadUid::new("r"), info("r"), netns()).await });
    next(&zt).await;
    let err = add.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(matches!(zt.recv().await, Err(Error::Closed)));
}

#[tokio::test]
async fn a_ztunnel_speaking_another_version_is_refused() {
    let f = fixture(Duration::from_secs(5));
    let zt = SeqpacketConn::connect(&f.path).await.unwrap();
    zt.send(&[0x08, 0x02], None).await.unwrap();
    assert!(matches!(
        zt.recv_timeout(Duration::from_secs(5)).await,
        Err(Error::Closed)
    ));
    assert_eq!(f.server.connections(), 0);
}
