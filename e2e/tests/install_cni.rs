//! install-cni as the agent does it on a node: the plugin put last in the primary
//! conflist, repaired when the primary CNI rewrites it, removed on uninstall with the
//! original file restored byte for byte; `/readyz` follows. Root only (the agent runs
//! in Kubernetes mode).

use e2e::cluster::Cluster;
use e2e::{chained, until};

async fn readyz(agent: &e2e::AgentProcess) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = agent
        .listening_addr("readiness endpoint /readyz listening")
        .await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_is_chained_last_repaired_and_uninstalled_byte_for_byte() {
    let cluster = Cluster::new(63, false).await;
    let conf_dir = cluster.node.dir.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let primary = conf_dir.join("10-bridge.conflist");
    let original = "{\"cniVersion\":\"1.0.0\",\"name\":\"pods\",\"plugins\":[{\"type\":\"bridge\",\"bridge\":\"cni0\"},{\"type\":\"portmap\"}]}\n";
    std::fs::write(&primary, original).unwrap();

    let mut agent = cluster.start_agent(1);
    until("the plugin is chained", || chained(&primary)).await;
    let bin = cluster.node.dir.path().join("cni-bin/istio-cni");
    assert!(bin.exists(), "plugin binary installed");
    let kubeconfig = conf_dir.join("istio-cni-kubeconfig");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kubeconfig).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(readyz(&agent).await, 200);

    // The primary CNI rewrites its config without us: repaired.
    std::fs::write(&primary, original).unwrap();
    until("the chain is repaired", || chained(&primary)).await;
    agent
        .wait_for(&["chain entry was missing; repaired"], 1)
        .await;

    // Uninstall (DaemonSet removal): back to exactly what was there.
    agent.terminate();
    assert_eq!(std::fs::read_to_string(&primary).unwrap(), original);
    assert!(!bin.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_is_json_but_not_a_network_config_is_reported_and_left_alone() {
    let cluster = Cluster::new(70, false).await;
    let conf_dir = cluster.node.dir.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let primary = conf_dir.join("10-bridge.conflist");
    std::fs::write(&primary, "[]").unwrap();

    let mut agent = cluster.start_agent(1);
    agent
        .wait_for(
            &[
                "10-bridge.conflist is not a valid CNI config",
                "not a JSON object",
            ],
            1,
        )
        .await;
    assert!(agent.is_running(), "the agent died:\n{}", agent.logs());
    assert_eq!(
        std::fs::read_to_string(&primary).unwrap(),
        "[]",
        "written anyway"
    );
    assert_eq!(
        readyz(&agent).await,
        503,
        "ready without the plugin in the chain"
    );

    // The primary CNI writes its real config: we chain onto it as soon as it lands.
    let original =
        "{\"cniVersion\":\"1.0.0\",\"name\":\"pods\",\"plugins\":[{\"type\":\"bridge\"}]}";
    std::fs::write(&primary, original).unwrap();
    until("the plugin is chained", || chained(&primary)).await;
    assert_eq!(readyz(&agent).await, 200);
    agent.terminate();
    assert_eq!(std::fs::read_to_string(&primary).unwrap(), original);
}
