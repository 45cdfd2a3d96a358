//! The CNI plugin's kubeconfig, as install-cni writes it: the container runtime runs the
//! plugin on the host, where none of the agent container's paths exist, so the file
//! must carry the server, CA and token itself, and follow the agent's token when it
//! rotates. The API server speaks HTTPS and checks bearer tokens; the plugin runs in a
//! mount namespace where the agent's credential directory is empty. Root only.

use e2e::cluster::{Cluster, AMBIENT};
use e2e::{chained, until};
use std::os::unix::fs::PermissionsExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_works_from_the_host_and_follows_the_agents_token() {
    let cluster = Cluster::new_secure(69, "token-1").await;
    cluster.namespace("demo", &[AMBIENT]);
    let conf_dir = cluster.node.dir.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let primary = conf_dir.join("10-pods.conflist");
    std::fs::write(&primary, cluster.node.conflist().to_string()).unwrap();
    let agent = cluster.start_agent(1);
    let _zt = cluster.start_ztunnel(1);
    until("the plugin is chained", || chained(&primary)).await;

    let kubeconfig = conf_dir.join("ZZZ-istio-cni-kubeconfig");
    let secrets = cluster.agent_secrets();
    let meta = std::fs::symlink_metadata(&kubeconfig).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(
        !text.contains(secrets.to_str().unwrap()),
        "the plugin's kubeconfig points into the agent's container:\n{text}"
    );

    // From here on the plugin runs where the agent's credential files do not exist.
    cluster.node.hide_from_plugins(secrets.clone());
    let installed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&primary).unwrap()).unwrap();
    let args = |name: &str| format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={name}");
    cluster.create_pod_object("demo", "sleep");
    let (sleep, added) =
        cluster
            .node
            .add_pod_with_conflist("sleep", installed.clone(), &args("sleep"));
    added.expect("ADD from the host with the kubeconfig the agent wrote");
    assert!(
        sleep.iptables_save().contains("ISTIO_PRERT"),
        "not captured"
    );
    cluster
        .wait_annotation_of("demo", "sleep", Some("enabled"), &agent)
        .await;

    // The service-account token rotates (kubelet swaps the file); the old one is
    // revoked once the new one is out.
    let tmp = secrets.join(".token.new");
    std::fs::write(&tmp, "token-2").unwrap();
    std::fs::rename(&tmp, secrets.join("token")).unwrap();
    cluster.api.set_tokens(&["token-1", "token-2"]);
    until("the plugin's kubeconfig carries the new token", || {
        std::fs::read_to_string(&kubeconfig)
            .is_ok_and(|t| t.contains("token-2") && !t.contains("token-1"))
    })
    .await;
    cluster.api.set_tokens(&["token-2"]);
    cluster.create_pod_object("demo", "httpbin");
    let (httpbin, added) =
        cluster
            .node
            .add_pod_with_conflist("httpbin", installed, &args("httpbin"));
    added.expect("ADD with the rotated token");
    assert!(
        httpbin.iptables_save().contains("ISTIO_PRERT"),
        "not captured"
    );
}
