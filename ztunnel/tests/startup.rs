//! ztunnel's startup: bad configuration stops it with an error that says what is wrong.

use std::process::Command;

fn ztunnel(env: &[(&str, &std::path::Path)]) -> (bool, String) {
    let (code, out) = run(&[], env);
    (code == Some(0), out)
}

/// Runs ztunnel with `args` and `env`; its exit code (`None`: killed by a signal) and
/// output.
fn run(args: &[&str], env: &[(&str, &std::path::Path)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
    // xDS off unless a test turns it on: with its default address ztunnel would start
    // and wait for istiod.
    cmd.args(args)
        .env_remove("LOCAL_XDS_PATH")
        .env("XDS_ADDRESS", "")
        .env("READINESS_ADDR", "127.0.0.1:0")
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .env("STATS_ADDR", "127.0.0.1:0")
        .env("INPOD_UDS", "/nonexistent/ztunnel.sock");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run ztunnel");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn without_a_source_of_mesh_state_ztunnel_refuses_to_start() {
    let (code, out) = run(&[], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("no source of mesh state")
            && out.contains("LOCAL_XDS_PATH")
            && out.contains("XDS_ADDRESS is empty"),
        "{out}"
    );
    assert!(!out.contains("listening"), "it served something:\n{out}");
}

#[test]
fn an_oversized_duration_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    for (args, value) in [
        (
            &["--workload-cert-ttl", "999999999999999d"][..],
            "999999999999999d",
        ),
        (
            &["--pod-drain-grace", "999999999999999999h"],
            "999999999999999999h",
        ),
        (&["--connect-timeout", "36501d"], "36501d"),
        (
            &[
                "create-root",
                "--validity",
                "99999999999d",
                "--out-dir",
                out_dir,
            ],
            "99999999999d",
        ),
    ] {
        let (code, out) = run(args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {out}");
        assert!(!out.contains("panicked"), "{args:?}: {out}");
        assert!(out.contains(value), "the error names the value: {out}");
    }
}

/// A directory with a fresh root (`ca.crt`, `ca.key`) and `config.yaml` holding `yaml`.
fn mesh_dir(yaml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    ztunnel::create_root(
        "cluster.local",
        std::time::Duration::from_secs(3600),
        dir.path(),
        false,
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

/// `create-root` never replaces a root by accident, and with `--overwrite` writes a
/// new key 0600 in place of the old file (never through a symlink there, never into a
/// file that keeps looser permissions).
#[test]
fn create_root_refuses_an_existing_root_and_overwrites_only_when_asked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let (code, out) = run(&["create-root", "--out-dir", out_dir], &[]);
    assert_eq!(code, Some(0), "{out}");
    let key = dir.path().join("ca.key");
    let first = std::fs::read(&key).unwrap();
    let (code, out) = run(&["create-root", "--out-dir", out_dir], &[]);
    assert_ne!(code, Some(0), "a second root replaced the first: {out}");
    assert!(
        out.contains("ca.crt exists") && out.contains("--overwrite"),
        "{out}"
    );
    assert_eq!(std::fs::read(&key).unwrap(), first, "the key changed");

    // An old key readable by others, then a key that is a link to another file.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = run(&["create-root", "--overwrite", "--out-dir", out_dir], &[]);
    assert_eq!(code, Some(0), "{out}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the new key kept the old file's mode");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::remove_file(&key).unwrap();
    std::os::unix::fs::symlink(&victim, &key).unwrap();
    let (code, out) = run(&["create-root", "--overwrite", "--out-dir", out_dir], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!std::fs::symlink_metadata(&key).unwrap().is_symlink());
}
