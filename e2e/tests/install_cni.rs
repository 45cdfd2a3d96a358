//! install-cni as the agent does it on a node: the plugin put last in the primary
//! conflist, repaired when the primary CNI rewrites it, removed on uninstall with the
//! original file restored byte for byte; `/readyz` follows. An upgrade (the agent's
//! DaemonSet still there when it stops) leaves everything in place; an uninstall (the
//! DaemonSet gone) takes everything of istio-cni off the node, and only that. Root
//! only (the agent runs in Kubernetes mode).

use e2e::cluster::{Cluster, AMBIENT};
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
    let kubeconfig = conf_dir.join("ZZZ-istio-cni-kubeconfig");
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
    cluster.uninstall_daemonset();
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
    cluster.uninstall_daemonset();
    agent.terminate();
    assert_eq!(std::fs::read_to_string(&primary).unwrap(), original);
}

/// What the node keeps across an agent's exit. An upgrade (the DaemonSet still
/// there): the plugin, its chain entry and kubeconfig, and the host probe rules stay,
/// so new pods wait for the next agent. An uninstall (`helm uninstall`: the DaemonSet
/// gone), stopping an agent that found everything installed by its predecessor: no
/// file of istio-cni's is left in the CNI bin and conf dirs or the socket dirs, the
/// host probe set and rules are gone, and the enrolled pod keeps its rules and is
/// told so in an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_plugin_and_an_uninstall_takes_everything_of_ours_off_the_node() {
    let cluster = Cluster::new(64, false).await;
    let conf_dir = cluster.node.dir.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let primary = conf_dir.join("10-bridge.conflist");
    let original =
        "{\"cniVersion\":\"1.0.0\",\"name\":\"pods\",\"plugins\":[{\"type\":\"bridge\"}]}";
    std::fs::write(&primary, original).unwrap();
    cluster.namespace("demo", &[AMBIENT]);
    let pod = cluster.add_pod("demo", "sleep", &[]);
    let mut old = cluster.start_agent(1);
    let _zt = cluster.start_ztunnel(1);
    cluster.wait_annotation(&pod, Some("enabled"), &old).await;
    until("the plugin is chained", || chained(&primary)).await;
    let bin = cluster.node.dir.path().join("cni-bin/istio-cni");
    let kubeconfig = conf_dir.join("ZZZ-istio-cni-kubeconfig");
    let set = format!("{}-v4", cluster.probe_set);
    let probe_set = || {
        std::process::Command::new("ipset")
            .args(["list", &set])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    assert!(probe_set().contains(&pod.ip.to_string()));

    // An upgrade: the agent stops, its DaemonSet stays.
    old.terminate();
    assert!(
        old.count(&["istio-cni stays installed on this node", "still present"]) == 1,
        "{}",
        old.logs()
    );
    assert!(chained(&primary) && bin.exists() && kubeconfig.exists());
    assert!(
        probe_set().contains(&pod.ip.to_string()),
        "the probe set went with the agent"
    );

    // The next agent finds all in place (it writes nothing), then is uninstalled.
    let mut new = cluster.start_agent(2);
    new.listening_addr("readiness endpoint /readyz listening")
        .await;
    cluster.wait_annotation(&pod, Some("enabled"), &new).await;
    let rules_before = pod.iptables_save();
    cluster.uninstall_daemonset();
    new.terminate();
    assert!(
        new.count(&["removing istio-cni from this node", "is gone"]) == 1,
        "{}",
        new.logs()
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&primary).unwrap())
            .unwrap(),
        serde_json::from_str::<serde_json::Value>(original).unwrap(),
        "our entry is still in the chain"
    );
    let left = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        left(&conf_dir),
        ["10-bridge.conflist"],
        "left in the conf dir"
    );
    assert!(
        left(&cluster.node.dir.path().join("cni-bin")).is_empty(),
        "left in the bin dir"
    );
    assert!(!cluster.node.dir.path().join("pluginevent.sock").exists());
    assert!(!cluster.node.zds_socket().exists());
    assert!(
        probe_set().is_empty(),
        "the host probe set is still there:\n{}",
        probe_set()
    );
    assert_eq!(
        pod.iptables_save(),
        rules_before,
        "the pod's own rules changed"
    );
    let events = cluster.api.events("demo");
    assert!(
        events.iter().any(|e| e["reason"] == "IstioCNIUninstalled"
            && e["involvedObject"]["name"] == "sleep"
            && e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("keeps its traffic redirection")),
        "no event on the pod: {events:?}\n{}",
        new.logs()
    );
}

/// `helm uninstall istio-cni` first runs the chart's pre-delete hook, `istio-cni
/// announce-uninstall`, with the agent's service account, before helm deletes that
/// account and its RBAC (after which the agents cannot record events): every
/// redirected pod in the cluster gets the event, no other pod does, and it exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uninstall_hook_tells_every_redirected_pod_and_no_other() {
    let cluster = Cluster::new(65, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    cluster.namespace("plain", &[]);
    let sleep = cluster.add_pod("demo", "sleep", &[]);
    let _web = cluster.add_pod("plain", "web", &[]);
    let agent = cluster.start_agent(1);
    let _zt = cluster.start_ztunnel(1);
    cluster
        .wait_annotation(&sleep, Some("enabled"), &agent)
        .await;

    let out = std::process::Command::new(e2e::bin_path("istio-cni"))
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .arg("announce-uninstall")
        .env("NO_COLOR", "1")
        .output()
        .expect("istio-cni announce-uninstall");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("told 1 redirected pods"), "{stdout}");
    let told: Vec<_> = cluster
        .api
        .events("demo")
        .into_iter()
        .chain(cluster.api.events("plain"))
        .filter(|e| e["reason"] == "IstioCNIUninstalled")
        .map(|e| {
            e["involvedObject"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(told, ["sleep"]);

    // With no API server to ask, it still exits 0 (an uninstall is never blocked).
    let out = std::process::Command::new(e2e::bin_path("istio-cni"))
        .arg("--kubeconfig")
        .arg(cluster.node.dir.path().join("missing-kubeconfig"))
        .arg("announce-uninstall")
        .output()
        .expect("istio-cni announce-uninstall");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("could not announce the uninstall"));
}
