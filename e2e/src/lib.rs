//! A Kubernetes-like node on one Linux machine, for end-to-end tests: pods are network
//! namespaces wired by the real CNI `bridge`, `host-local` and `loopback` plugins (run
//! the way a container runtime runs them), ztunnel is a real process, and the agent is
//! the real `istio-cni` library serving a real Unix socket.
//!
//! Everything a test creates is owned by a guard that removes it on drop, so it is
//! cleaned up when the test fails too. These tests need root.

pub mod app;
pub mod capture;
pub mod cgroups;
pub mod charts;
pub mod cluster;
pub mod cni;
pub mod mesh;
pub mod mesh_files;
pub mod node;
pub mod observe;
pub mod process;
pub mod prom;

pub use mesh::Mesh;
pub use node::{TestNode, TestPod};
pub use process::{AgentProcess, Ztunnel};

use std::path::PathBuf;

/// The runtime of the harness's own binaries (demo, chaos, bench): two workers, as
/// the machine has two CPUs.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Fails the test with a clear message unless running as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these end-to-end tests create network namespaces and iptables rules: run them as root (CI does)"
    );
}

/// Path of a workspace binary (`ztunnel`, `istio-cni`) in this build's target dir, or
/// in `E2E_BIN_DIR` when set: the same tests can then be run against other builds (an
/// older release, to show a test catches what it is meant to).
pub fn bin_path(name: &str) -> PathBuf {
    // The agent as it ships (statically linked; `cargo xtask test` builds it).
    if let Some(bin) = std::env::var_os("E2E_AGENT_BIN").filter(|_| name == "istio-cni") {
        let bin = PathBuf::from(bin);
        assert!(bin.exists(), "E2E_AGENT_BIN: {} is missing", bin.display());
        return bin;
    }
    if let Some(dir) = std::env::var_os("E2E_BIN_DIR") {
        let bin = PathBuf::from(dir).join(name);
        assert!(bin.exists(), "{} is missing", bin.display());
        return bin;
    }
    let exe = std::env::current_exe().expect("current executable");
    // Tests live in target/<profile>/deps/, the demo in target/<profile>/.
    let mut dir = exe
        .parent()
        .expect("the executable lives in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `cargo xtask test` does it)",
        bin.display()
    );
    bin
}

/// Runs `cmd` to completion, with `stdin` (or nothing) on its standard input;
/// returns its stdout, or on failure a message with its status, stdout and stderr.
pub fn output(cmd: &mut std::process::Command, stdin: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("{cmd:?}: writing its input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{cmd:?}: {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs a command, returning stdout; panics with its stderr on failure.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits (up to 15 s) until `cond` holds; `what` names it in the failure.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A proxy started for a pod (ztunnel's metric).
pub const PROXIES_STARTED: &str = "workload_manager_proxies_started_total";
/// A pod's proxy drained: a Del, or a pod left out of a new snapshot (ztunnel's metric).
pub const PROXIES_STOPPED: &str = "workload_manager_proxies_stopped_total";

/// Waits until the agent serves ZDS on `socket` (its socket file is there).
pub async fn zds_listening(socket: &std::path::Path) {
    until("the agent serves ZDS", || socket.exists()).await
}

/// Whether the network config at `path` ends with our `istio-cni` plugin.
pub fn chained(path: &std::path::Path) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["plugins"]
                .as_array()
                .and_then(|p| p.last())
                .map(|p| p["type"] == "istio-cni")
        })
        .unwrap_or(false)
}

/// `GET path` over HTTP/1.1 to `addr` (one connection): the status and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// `POST path` (no body) to `addr`; the status and body.
pub async fn http_post(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "POST", path).await
}

async fn http_request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: ztunnel\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("send request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
