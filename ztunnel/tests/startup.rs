//! ztunnel's startup: bad configuration stops it with an error that says what is wrong.

use std::process::Command;

fn ztunnel(env: &[(&str, &std::path::Path)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
    cmd.env("READINESS_ADDR", "127.0.0.1:0")
        .env("INPOD_UDS", "/nonexistent/ztunnel.sock");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run ztunnel");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// A directory with a fresh root (`ca.crt`, `ca.key`) and `config.yaml` holding `yaml`.
fn mesh_dir(yaml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    ztunnel::create_root(
        "cluster.local",
        std::time::Duration::from_secs(3600),
        dir.path(),
    )
    .unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    (dir, config)
}

#[test]
fn a_bad_local_config_stops_ztunnel_with_the_field_and_line() {
    let (dir, config) = mesh_dir("workloads:\n- name: a\n  namespace: b\n  colour: red\n");
    let (ok, out) = ztunnel(&[
        ("LOCAL_XDS_PATH", &config),
        ("LOCAL_CA_CERT", &dir.path().join("ca.crt")),
        ("LOCAL_CA_KEY", &dir.path().join("ca.key")),
    ]);
    assert!(!ok, "ztunnel started with a bad config:\n{out}");
    assert!(out.contains("colour") && out.contains("line 4"), "{out}");
}

#[test]
fn a_local_config_without_a_ca_is_refused() {
    let (_dir, config) = mesh_dir("workloads: []\n");
    let (ok, out) = ztunnel(&[("LOCAL_XDS_PATH", &config)]);
    assert!(!ok);
    assert!(out.contains("LOCAL_CA_CERT"), "{out}");
}

#[test]
fn a_ca_key_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, config) = mesh_dir("workloads: []\n");
    let key = dir.path().join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = ztunnel(&[
        ("LOCAL_XDS_PATH", &config),
        ("LOCAL_CA_CERT", &dir.path().join("ca.crt")),
        ("LOCAL_CA_KEY", &key),
    ]);
    assert!(!ok);
    assert!(out.contains("mode 644"), "{out}");
}
