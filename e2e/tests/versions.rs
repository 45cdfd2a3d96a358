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
