//! The plugin binary as a container runtime runs it: bad input gets a CNI error JSON on
//! stdout and a non-zero exit, and nothing is done.

use std::io::Write;
use std::process::{Command, Stdio};

fn plugin(command: &str, stdin: &str, netns: Option<&str>) -> (bool, serde_json::Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_istio-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd.spawn().expect("run plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), json)
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
