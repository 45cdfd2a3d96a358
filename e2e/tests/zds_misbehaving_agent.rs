//! A misbehaving agent (the test, speaking raw ZDS) against a real ztunnel process:
//! every bad message gets an error ack and a log line; ztunnel neither crashes nor
//! leaks a descriptor, and keeps serving good requests. Root only.

use std::os::fd::AsFd;
use std::time::Duration;

use e2e::{TestNode, Ztunnel};
use protocol::message::decode_hello;
use protocol::zds::WorkloadInfo;
use protocol::{Ack, Netns, Request, SeqpacketConn, SeqpacketListener, WorkloadUid};

async fn exchange(
    conn: &SeqpacketConn,
    bytes: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Ack {
    conn.send(bytes, fd).await.expect("send");
    Ack::decode(
        conn.recv_timeout(Duration::from_secs(5))
            .await
            .expect("an ack"),
    )
    .expect("a valid ack")
}

fn expect_err(ack: Ack, needle: &str) {
    match ack {
        Ack::Err(e) => assert!(e.contains(needle), "error ack {e:?} lacks {needle:?}"),
        Ack::Ok => panic!("expected an error ack about {needle:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_error_acks_and_nothing_leaks() {
    let node = TestNode::new(17);
    let pod = node.add_pod("sleep");
    let listener = SeqpacketListener::bind(&node.zds_socket(), 0o600).unwrap();
    let mut zt = Ztunnel::start(&node, 1);
    let conn = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("ztunnel connects")
        .unwrap();
    decode_hello(conn.recv_timeout(Duration::from_secs(5)).await.unwrap()).expect("hello V1");
    let netns = pod.netns();
    let uid = WorkloadUid::new("uid-1");
    let add = Request::Add {
        uid: uid.clone(),
        info: WorkloadInfo {
            name: "sleep".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
        },
        netns: pod.netns(),
    }
    .encode();
    let fds_before = zt.open_fds();

    expect_err(
        exchange(&conn, &[0xff, 0xff, 0xff], None).await,
        "malformed",
    );
    expect_err(exchange(&conn, &add, None).await, "no network-namespace fd");
    let del = Request::<Netns>::Del { uid: uid.clone() }.encode();
    expect_err(
        exchange(&conn, &del, Some(netns.as_fd())).await,
        "carries a file descriptor",
    );
    let not_netns = std::fs::File::open("/dev/null").unwrap();
    expect_err(
        exchange(&conn, &add, Some(not_netns.as_fd())).await,
        "not a network namespace",
    );
    expect_err(exchange(&conn, &vec![0u8; 20_000], None).await, "truncated");
    let snapshot_sent = Request::<Netns>::SnapshotSent.encode();
    assert_eq!(exchange(&conn, &snapshot_sent, None).await, Ack::Ok);
    expect_err(
        exchange(&conn, &snapshot_sent, None).await,
        "second SnapshotSent",
    );
    let keep = Request::<Netns>::Keep { uid: uid.clone() }.encode();
    expect_err(exchange(&conn, &keep, None).await, "after SnapshotSent");

    assert!(zt.is_running(), "ztunnel died on bad input:\n{}", zt.logs());
    assert_eq!(zt.open_fds(), fds_before, "ztunnel leaked descriptors");
    assert!(
        zt.count(&["bad ZDS message from the agent"]) >= 4,
        "{}",
        zt.logs()
    );

    // Still in service: a good Add brings the pod's listeners up.
    assert_eq!(exchange(&conn, &add, Some(netns.as_fd())).await, Ack::Ok);
    assert_eq!(pod.ports_of("ztunnel"), [15001, 15006, 15008]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_reconnects_after_the_agent_drops_the_stream() {
    let node = TestNode::new(18);
    let listener = SeqpacketListener::bind(&node.zds_socket(), 0o600).unwrap();
    let zt = Ztunnel::start(&node, 1);
    let first = listener.accept().await.unwrap();
    // An agent that reads the hello and hangs up, as one that rejects the version would.
    decode_hello(first.recv_timeout(Duration::from_secs(5)).await.unwrap()).unwrap();
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("ztunnel reconnects")
        .unwrap();
    decode_hello(second.recv_timeout(Duration::from_secs(5)).await.unwrap()).unwrap();
    zt.wait_for(&["handling new stream"], 2).await;
    zt.wait_for(&["closed the stream right after our hello"], 1)
        .await;
}
