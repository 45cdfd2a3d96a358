//! `cargo xtask cluster-e2e` and `cargo xtask images` on a machine without what they
//! need (here nothing is found at all: an empty `PATH` and an empty tools directory):
//! they stop at once, with exit code 2, naming every missing prerequisite and its
//! package. Never creates anything.

use std::process::Command;
use std::time::{Duration, Instant};

fn run_bare(task: &str) -> (i32, String, Duration) {
    let empty = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg(task)
        .env_clear()
        .env("PATH", empty.path())
        .env("AMBIENT_TOOLS_DIR", empty.path())
        .output()
        .expect("run xtask");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn cluster_e2e_without_its_prerequisites_names_each_and_stops_at_once() {
    let (code, err, took) = run_bare("cluster-e2e");
    assert_eq!(code, 2, "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    if err.contains("run as root") {
        return; // Not root: refused before anything else, as it should be.
    }
    for what in ["`containerd`", "`ctr`", "`umoci`", "`nsenter`"] {
        assert!(err.contains(what), "{what} not named:\n{err}");
    }
}

#[test]
fn images_without_umoci_says_so_and_stops_at_once() {
    let (code, err, took) = run_bare("images");
    assert_eq!(code, 2, "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    if err.contains("run as root") {
        return;
    }
    assert!(err.contains("`umoci`"), "{err}");
    assert!(!err.contains("containerd"), "images need no runtime: {err}");
}
