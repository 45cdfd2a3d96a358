//! `cargo xtask demo` must keep working: it runs to the end, shows the specification's
//! observations and an mTLS request, and leaves nothing behind, also when interrupted.
//! Root only.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn netns_names() -> Vec<String> {
    e2e::sh("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// What the demo left behind: network namespaces that did not exist before it ran (others,
/// e.g. from a run killed with the machine, are not this run's doing), and the host chain.
fn leftovers(before: &[String]) -> (Vec<String>, String) {
    let netns = netns_names()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    let nat = e2e::sh("iptables-save", &["-t", "nat"]);
    (netns, nat)
}

/// Reads the demo's output until it shows `marker`; all of it so far.
fn read_until(stdout: &mut impl std::io::Read, marker: &str) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while !seen.contains(marker) {
        assert!(
            Instant::now() < deadline,
            "the demo never showed {marker:?}:\n{seen}"
        );
        let n = stdout.read(&mut buf).expect("read");
        assert!(n > 0, "demo ended early:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

/// Ctrl-C (SIGINT): the demo exits 0 and leaves nothing behind.
fn interrupt_and_check_it_cleaned_up(mut child: std::process::Child, before: &[String]) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().expect("wait");
    assert!(status.success(), "interrupted demo exit: {status}");
    let (netns, nat) = leftovers(before);
    assert!(netns.is_empty(), "netns left: {netns:?}");
    assert!(!nat.contains("ISTIO_POSTRT"), "host probe chain left");
}

#[test]
fn the_demo_runs_to_the_end_and_cleans_up() {
    e2e::require_root();
    let before = netns_names();
    let out = Command::new(e2e::bin_path("demo"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "inpod_enabled: true",
        "ztunnel::inpod::statemanager: pod WorkloadUid(",
        "*:15001",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        "-A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        "hello from httpbin; you are 10.248.200.2",
        "hello from httpbin; you are fd00:248:200::2",
        "src.identity=\"spiffe://cluster.local/ns/ambient-demo/sa/sleep\" dst.addr=",
        "dst.identity=\"spiffe://cluster.local/ns/ambient-demo/sa/httpbin\"",
        "ambient.istio.io/redirection=enabled",
        "istio_tcp_connections_opened_total{reporter=\"source\"",
        "verdict     HEALTHY",
    ] {
        assert!(stdout.contains(expected), "demo output lacks {expected:?}:\n{stdout}");
    }
    let (netns, nat) = leftovers(&before);
    assert!(netns.is_empty(), "netns left: {netns:?}");
    assert!(!nat.contains("ISTIO_POSTRT"), "host probe chain left");
}

#[test]
fn an_interrupted_demo_cleans_up_too() {
    e2e::require_root();
    let before = netns_names();
    let mut child = Command::new(e2e::bin_path("demo"))
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the demo");
    // Interrupt once the pods exist.
    let mut stdout = child.stdout.take().expect("stdout");
    read_until(&mut stdout, "httpbin: 10.");
    interrupt_and_check_it_cleaned_up(child, &before);
}

#[test]
fn with_keep_the_node_stays_up_to_be_poked_at_until_ctrl_c() {
    e2e::require_root();
    let before = netns_names();
    let mut child = Command::new(e2e::bin_path("demo"))
        .arg("--keep")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the demo");
    let mut stdout = child.stdout.take().expect("stdout");
    let seen = read_until(&mut stdout, "Ctrl-C removes everything.");
    // What it tells the user to try works: ztunnel's admin API and a pod's netns.
    let admin: std::net::SocketAddr = seen
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("curl -s http://")?
                .strip_suffix("/config_dump")
        })
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no config_dump hint:\n{seen}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, body) = rt.block_on(e2e::http_get(admin, "/config_dump"));
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        dump["workloadState"].as_object().unwrap().len(),
        2,
        "{dump:#}"
    );
    let netns = seen
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("ip netns exec ")?
                .strip_suffix(" bash")
        })
        .unwrap_or_else(|| panic!("no netns hint:\n{seen}"))
        .to_string();
    assert!(netns_names().contains(&netns), "{netns} is not there");
    // The demo is still running, then Ctrl-C cleans up.
    assert!(child.try_wait().unwrap().is_none(), "the demo exited");
    interrupt_and_check_it_cleaned_up(child, &before);
}
