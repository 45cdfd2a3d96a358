//! Both binaries tell their build version and the protocol versions they speak, the
//! way operators' scripts ask Istio's components (`version`, `--version`), and print
//! it first thing at startup. Built from one workspace, they tell the same version.

fn run(binary: &str, args: &[&str]) -> String {
    let bin = e2e::bin_path(binary);
    e2e::sh(&bin.to_string_lossy(), args).trim().to_string()
}

/// The value of `Key:"…"` in a `version.BuildInfo{…}` line.
fn field<'a>(info: &'a str, key: &str) -> &'a str {
    let start = info
        .find(&format!("{key}:\""))
        .unwrap_or_else(|| panic!("no {key} in {info:?}"))
        + key.len()
        + 2;
    let len = info[start..].find('"').expect("closing quote");
    &info[start..start + len]
}

#[test]
fn both_binaries_tell_the_same_build_version_and_their_protocol_versions() {
    let zt = run("ztunnel", &["version"]);
    let cni = run("istio-cni", &["version"]);
    for info in [&zt, &cni] {
        assert!(info.starts_with("version.BuildInfo{"), "{info}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(field(&zt, "Version"), version);
    assert_eq!(field(&cni, "Version"), version);
    assert_eq!(field(&zt, "ZdsVersion"), "V1");
    assert_eq!(field(&cni, "ZdsVersion"), field(&zt, "ZdsVersion"));
    assert_eq!(field(&cni, "PluginEventVersion"), "1");
    assert_eq!(run("ztunnel", &["--version"]), format!("ztunnel {version}"));
    assert_eq!(
        run("istio-cni", &["--version"]),
        format!("istio-cni {version}")
    );
}

/// The agent enrolls the pods of its node: started without `NODE_NAME` it says so
/// and exits, before it touches anything (no socket, no rule, no port).
#[test]
fn the_agent_refuses_to_start_without_its_node_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("ztunnel.sock");
    let out = std::process::Command::new(e2e::bin_path("istio-cni"))
        .env_remove("NODE_NAME")
        .env_remove("CNI_COMMAND")
        .env("ZTUNNEL_UDS", &socket)
        .output()
        .expect("run istio-cni");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NODE_NAME is not set"), "{stderr}");
    assert!(!socket.exists(), "nothing is served");
}
