//! `cargo xtask kind-e2e` and `cargo xtask images` on a machine without what they
//! need (these machines have no Docker engine; here nothing is found at all: an empty
//! `PATH` and an empty tools directory): they stop at once, with exit code 2, naming
//! every missing prerequisite and how to get it. Never creates anything.

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
fn kind_e2e_without_its_prerequisites_names_each_and_stops_at_once() {
    let (code, err, took) = run_bare("kind-e2e");
    assert_eq!(code, 2, "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for what in ["a Docker engine:", "kind:", "kubectl:", "helm:"] {
        assert!(err.contains(what), "{what} not named:\n{err}");
    }
    assert!(err.contains("cargo xtask setup"), "{err}");
}

#[test]
fn images_without_a_docker_engine_says_so_and_stops_at_once() {
    let (code, err, took) = run_bare("images");
    assert_eq!(code, 2, "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(err.contains("needs a Docker engine"), "{err}");
}
