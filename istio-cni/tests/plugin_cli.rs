//! The plugin binary as a container runtime runs it: bad input gets a CNI error JSON on
//! stdout and a non-zero exit, and nothing is done.

use std::io::Write;
use std::process::{Command, Stdio};

fn plugin(command: &str, stdin: &str, netns: Option<&str>) -> (bool, serde_json::Value) {
    let mut env = vec![("CNI_COMMAND", command)];
    env.extend(netns.map(|ns| ("CNI_NETNS", ns)));
    run(&env, stdin).expect("the plugin hung")
}

/// Runs the plugin as a runtime does, with `env` besides the usual `CNI_*`; a plugin
/// still running after 20 s is killed and reported as hung.
fn run(env: &[(&str, &str)], stdin: &str) -> Result<(bool, serde_json::Value), &'static str> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_istio-cni"));
    cmd.env_clear()
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("run plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the plugin hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    Ok((out.status.success(), json))
}

#[test]
fn malformed_stdin_unknown_versions_and_missing_netns_are_cni_errors() {
    let (ok, out) = plugin("ADD", "{oops", Some("/var/run/netns/x"));
    assert!(!ok);
    assert_eq!(out["code"], 6, "{out}");
    let (ok, out) = plugin(
        "ADD",
        r#"{"cniVersion":"0.1.0","name":"n","type":"istio-cni"}"#,
        Some("/var/run/netns/x"),
    );
    assert!(!ok);
    assert_eq!(out["code"], 1, "{out}");
    let chained = r#"{"cniVersion":"1.0.0","name":"n","type":"istio-cni","prevResult":{"cniVersion":"1.0.0","ips":[]}}"#;
    let (ok, out) = plugin("ADD", chained, None);
    assert!(!ok);
    assert_eq!(out["code"], 4, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("CNI_NETNS"),
        "{out}"
    );
}

#[test]
fn version_lists_what_the_plugin_supports() {
    let (ok, out) = plugin("VERSION", r#"{"cniVersion":"1.0.0"}"#, None);
    assert!(ok);
    let versions: Vec<&str> = out["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&v), "{out}");
    }
}

#[test]
fn an_excluded_namespace_is_decided_before_any_network_call_and_others_fail_in_time() {
    // An API server that takes connections and never answers, and no agent at all.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n",
            silent.local_addr().unwrap()
        ),
    )
    .unwrap();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "net", "type": "istio-cni",
        "kubeconfig": kubeconfig,
        "agent_socket": dir.path().join("no-agent.sock"),
        "exclude_namespaces": ["kube-system"],
        "timeout_seconds": 2,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/24"}]},
    })
    .to_string();

    let add = |args| {
        run(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_ARGS", args),
            ],
            &conf,
        )
    };
    let (ok, out) = add("IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1")
        .expect("a kube-system pod must not wait on the API server");
    assert!(ok, "a kube-system pod failed: {out}");
    assert_eq!(out["ips"][0]["address"], "10.0.0.5/24", "{out}");

    // A pod elsewhere may be in the mesh: without an answer the plugin cannot tell, so
    // it fails (the runtime retries) once its timeout is up, and never hangs.
    let (ok, out) = add("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=sleep")
        .expect("the plugin must give up after its timeout");
    assert!(!ok);
    assert_eq!(out["code"], 11, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("Kubernetes API"),
        "{out}"
    );
    drop(silent);
}
