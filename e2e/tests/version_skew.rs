//! Version skew between the components, both protocols, both directions: a peer from
//! a newer release either works or fails with a clear, actionable message on both
//! sides (never a hang, never a silent downgrade), and a peer that speaks only V1 (as
//! Istio's components do) works.
//!
//! - ZDS: ztunnel announces its version in its hello; the agent refuses any but V1,
//!   naming both versions, and closes; ztunnel says the agent closed right after its
//!   hello. An agent from a newer release could send a message kind V1 lacks: ztunnel
//!   nacks it, saying so, and keeps the stream.
//! - Plugin events: the plugin's request carries its version; the agent answers every
//!   version up to its own in that version and refuses a newer one ("upgrade the
//!   agent"), which the plugin reports as the pod's CNI error; a plugin given an answer
//!   in a version it does not speak fails the ADD, saying which.
//!
//! Real agent, plugin and ztunnel processes; the other side is the test speaking the
//! raw protocol. Root only.

use std::time::Duration;

use e2e::cluster::{Cluster, AMBIENT};
use e2e::{TestNode, Ztunnel};
use protocol::message::decode_hello;
use protocol::zds::{self, Version, WorkloadInfo};
use protocol::{Ack, Request, SeqpacketConn, SeqpacketListener, WorkloadUid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(5);

/// Connects to the agent's ZDS socket as a ztunnel would, announcing `version`.
async fn ztunnel_hello(cluster: &Cluster, version: i32) -> SeqpacketConn {
    let conn = SeqpacketConn::connect(&cluster.node.zds_socket())
        .await
        .expect("connect to the agent's ZDS socket");
    let hello = zds::ZdsHello { version };
    conn.send(&prost::Message::encode_to_vec(&hello), None)
        .await
        .expect("hello");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_from_a_newer_zds_version_is_refused_clearly_and_a_v1_only_one_is_served() {
    let cluster = Cluster::new(87, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let pod = cluster.add_pod("demo", "sleep", &[]);
    let agent = cluster.start_agent(1);
    e2e::zds_listening(&cluster.node.zds_socket()).await;

    // A ztunnel announcing V2: refused at once, both versions named in the log.
    let future = ztunnel_hello(&cluster, 2).await;
    match tokio::time::timeout(WAIT, future.recv()).await {
        Ok(Err(protocol::Error::Closed)) => {}
        other => panic!("the agent should close a V2 stream at once, got {other:?}"),
    }
    agent
        .wait_for(&["ztunnel hello rejected", "ZDS version 2"], 1)
        .await;
    let line = agent.lines(&["ztunnel hello rejected"]).remove(0);
    assert!(
        line.contains("run istio-cni and ztunnel from one release"),
        "{line}"
    );

    // One that speaks only V1, as Istio's ztunnel: gets the node's pods (in the
    // snapshot, or right after it) and enables them by acking.
    let v1 = ztunnel_hello(&cluster, Version::V1 as i32).await;
    let served = tokio::spawn(async move {
        let mut adds = 0;
        while let Ok(datagram) = v1.recv().await {
            let request = Request::decode(datagram).expect("a V1 request");
            if matches!(request, Request::Add { .. }) {
                adds += 1;
            }
            if v1.send(&Ack::Ok.encode(), None).await.is_err() {
                break;
            }
        }
        adds
    });
    cluster.wait_annotation(&pod, Some("enabled"), &agent).await;
    drop(agent);
    let adds = tokio::time::timeout(WAIT, served)
        .await
        .expect("the stream ends with the agent")
        .expect("the V1 peer");
    assert_eq!(adds, 1, "one enrolled pod on the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_says_when_an_agent_refuses_its_version_nacks_newer_messages_and_serves_v1() {
    let node = TestNode::new(97);
    let pod = node.add_pod("sleep");
    let listener = SeqpacketListener::bind(&node.zds_socket(), 0o600).expect("bind");
    let zt = Ztunnel::start(&node, 1);
    let accept = || async {
        tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("ztunnel connects")
            .expect("accept")
    };

    // An agent that does not speak ztunnel's version closes right after the hello:
    // ztunnel says so, and tries again (backing off) rather than hang.
    let refused = accept().await;
    decode_hello(refused.recv_timeout(WAIT).await.expect("hello")).expect("ztunnel announces V1");
    drop(refused);
    zt.wait_for(
        &["closed the stream right after our hello", "ZDS version V1"],
        1,
    )
    .await;

    let conn = accept().await;
    decode_hello(conn.recv_timeout(WAIT).await.expect("hello")).expect("ztunnel announces V1");

    // A WorkloadRequest whose payload is a kind V1 does not have (field 15).
    conn.send(&[0x7a, 0x02, 0x08, 0x01], None)
        .await
        .expect("send");
    let ack = Ack::decode(conn.recv_timeout(WAIT).await.expect("an ack")).expect("ack");
    match ack {
        Ack::Err(e) => assert!(e.contains("a kind added in a newer release"), "{e}"),
        Ack::Ok => panic!("an unknown message kind must not be acked as done"),
    }
    zt.wait_for(&["bad ZDS message from the agent", "newer release"], 1)
        .await;

    // The same stream, V1 messages as Istio's agent sends them: served.
    let add = Request::Add {
        uid: WorkloadUid::new("uid-1"),
        info: WorkloadInfo {
            name: "sleep".into(),
            namespace: "demo".into(),
            service_account: "sleep".into(),
        },
        netns: pod.netns(),
    };
    conn.send(&add.encode(), add.fd()).await.expect("add");
    let ack = Ack::decode(conn.recv_timeout(WAIT).await.expect("an ack")).expect("ack");
    assert_eq!(ack, Ack::Ok);
    conn.send(&Request::<protocol::Netns>::SnapshotSent.encode(), None)
        .await
        .expect("snapshot sent");
    let ack = Ack::decode(conn.recv_timeout(WAIT).await.expect("an ack")).expect("ack");
    assert_eq!(ack, Ack::Ok);
    e2e::observe::check_listeners(&pod.exec(&["ss", "-Htnl"])).unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_event_versions_ahead_are_refused_clearly_on_both_sides() {
    let cluster = Cluster::new(88, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let agent = cluster.start_agent(1);
    let _zt = cluster.start_ztunnel(1);
    e2e::zds_listening(&cluster.node.zds_socket()).await;

    // A plugin from a newer release: refused, in this agent's version, saying what
    // to do; the agent logs it.
    let answer = cluster
        .plugin_request(serde_json::json!({
            "version": 2, "command": "add", "podName": "p", "podNamespace": "demo",
            "podUid": "u", "serviceAccount": "sa", "netns": "/proc/self/ns/net",
        }))
        .await;
    assert_eq!(answer["version"], 1, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("plugin-event version 2") && error.contains("upgrade the agent"),
        "{answer}"
    );
    agent.wait_for(&["plugin-event version 2"], 1).await;

    // Our plugin given an answer from a newer agent: the ADD fails and says why.
    drop(agent);
    let socket = cluster.node.dir.path().join("pluginevent.sock");
    let _ = std::fs::remove_file(&socket);
    let fake = tokio::net::UnixListener::bind(&socket).expect("bind the fake agent");
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = fake.accept().await {
            let mut request = Vec::new();
            let _ = stream.read_to_end(&mut request).await;
            let _ = stream
                .write_all(b"{\"version\":2,\"error\":\"\",\"status\":\"enabled\"}\n")
                .await;
        }
    });
    let pod = cluster.sandbox_before_plugin("demo", "sleep");
    let added = cluster.plugin_add(&pod);
    server.abort();
    let error = added.expect_err("the ADD must fail").to_string();
    assert!(
        error.contains("plugin-event version 2")
            && error.contains("this plugin speaks only up to 1"),
        "{error}"
    );
}
