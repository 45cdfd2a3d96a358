//! `cargo xtask <task>`: the project's commands.
//!
//! - `setup`: installs what the demo and the tests need (root; apt-get where there is
//!   one), or says exactly what to install. `demo` and `test` do it first.
//! - `demo [--keep]`: the main job on one machine: a local ambient node (root).
//! - `test`: builds the binaries the end-to-end tests run, then the whole suite
//!   (nextest when installed, else cargo test), then `cluster-e2e`. The e2e tests need
//!   root.
//! - `proptest [cases]`: only the property tests, with many more cases than the suite
//!   runs (default 20000 each; the suite runs 256).
//! - `chaos [--short] [--only <text>]`: the fault matrix (root); `--short` is what the
//!   test suite runs.
//! - `bench [--short]`: builds release binaries, then the system benchmark (root): the
//!   data path through ztunnel against the direct path, interleaved in one run, the
//!   footprint per pod and enrollment times (`tools::bench`); then, unless `--short`,
//!   the criterion benchmarks of every crate. `bench micro [args]`: only criterion.
//! - `images`: both container images as an OCI archive, without an engine
//!   (`images.rs`); `cluster-e2e`: the system on a real Kubernetes cluster on this
//!   machine, beside Istio's istiod, all built from source (`cluster_e2e.rs`).
//! - `dist`: a release of both binaries, one version, with checksums and a manifest of
//!   the protocol versions each speaks (see `dist.rs`).

mod cluster_e2e;
mod dist;
mod gobuild;
mod images;
#[cfg(test)]
mod layers;
mod msrv;
mod setup;
mod tools;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context};
use setup::For;

/// The variables `cargo xtask` runs us with that describe xtask's own package: build
/// scripts that watch them (ring's does) would see them change and rebuild on every
/// call, so the cargo we run does not get them.
const XTASK_PACKAGE_VARS: [&str; 4] = [
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
];

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if XTASK_PACKAGE_VARS.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

fn run(mut cmd: Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The workspace's root.
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else `target/` in the workspace).
fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Everything the test suite needs: the machine's packages and the chart tools.
fn setup_tests() -> anyhow::Result<()> {
    setup::ensure(For::Tests)?;
    tools::ensure()?;
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup_tests()?;
    msrv::check(cargo)?;
    // The e2e tests start the real ztunnel binary: build it first.
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    run(build)?;
    // ... and the agent as it ships: linked statically (it is also the CNI plugin,
    // which runs on the node's C library; see `dist.rs`).
    let agent = dist::static_agent(&target_dir(), cargo(), false)?;
    let mut cmd = cargo();
    cmd.env("E2E_AGENT_BIN", &agent);
    if has_nextest() {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        eprintln!("xtask: cargo-nextest not found, using cargo test (e2e tests run serially)");
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
        cmd.env("RUST_TEST_THREADS", "1");
    }
    cmd.args(extra);
    let suite = run(cmd);
    // Then the same binaries on a real cluster (`cargo xtask cluster-e2e`), whatever
    // the suite said: both results are reported.
    let cluster = if extra.is_empty() {
        cluster_e2e_task(&[])
    } else {
        eprintln!("xtask: test arguments given: the real cluster's run is left out");
        Ok(())
    };
    match (suite, cluster) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(e)) => Err(e.context("cargo xtask cluster-e2e")),
        (Err(s), Err(c)) => Err(s.context(format!("and cargo xtask cluster-e2e: {c:#}"))),
    }
}

/// `cargo xtask cluster-e2e`: see `cluster_e2e.rs`.
fn cluster_e2e_task(args: &[String]) -> anyhow::Result<()> {
    cluster_e2e::run(args, &root(), &target_dir(), cargo, |e2e_args| {
        let mut build = cargo();
        build.args(["build", "-p", "tools", "--bin", "cluster_e2e"]);
        run(build)?;
        let mut cmd = Command::new(target_dir().join("debug/cluster_e2e"));
        cmd.args(e2e_args);
        run(cmd)
    })
}

fn proptest(extra: &[String]) -> anyhow::Result<()> {
    let cases = extra.first().cloned().unwrap_or_else(|| "20000".into());
    anyhow::ensure!(
        cases.parse::<u32>().is_ok(),
        "proptest takes a number of cases, not {cases:?}"
    );
    let mut cmd = cargo();
    if has_nextest() {
        cmd.args(["nextest", "run", "--workspace", "--release", "prop_"]);
    } else {
        cmd.args(["test", "--workspace", "--release", "prop_"]);
    }
    cmd.env("PROPTEST_CASES", cases);
    run(cmd)
}

/// Sets the machine up for `purpose`, builds every binary (the e2e harness runs them),
/// then runs the tools binary `bin` (`tools/src/bin/`) with `extra`.
fn run_tool(purpose: For, bin: &str, extra: &[String]) -> anyhow::Result<()> {
    setup::ensure(purpose)?;
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    run(build)?;
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "-p", "tools", "--bin", bin, "--"]);
    cmd.args(extra);
    run(cmd)
}

fn bench(extra: &[String]) -> anyhow::Result<()> {
    setup::ensure(For::Tests)?;
    let micro = |args: &[String]| {
        let mut cmd = cargo();
        cmd.args(["bench", "--workspace", "--bench", "*"]);
        if !args.is_empty() {
            cmd.arg("--").args(args);
        }
        run(cmd)
    };
    if extra.first().map(String::as_str) == Some("micro") {
        return micro(&extra[1..]);
    }
    // The system benchmark runs the release binaries it sits beside.
    let mut build = cargo();
    build.args(["build", "--release", "--workspace", "--bins"]);
    run(build)?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "tools",
        "--bin",
        "bench",
        "--",
    ]);
    cmd.args(extra);
    run(cmd)?;
    if extra.iter().any(|a| a == "--short") {
        return Ok(());
    }
    micro(&[])
}

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  setup         install what the demo and the tests need (root; apt-get), or say what to install
  demo [--keep] run a local ambient node: CNI chain, agent, ztunnel, two pods, mTLS (root);
                --keep leaves it running until Ctrl-C
  test [args]   build the binaries and run every test (root needed for e2e), then
                cluster-e2e (left out when test arguments are given)
  proptest [n]  only the property tests, n cases each (default 20000)
  chaos [--short] [--only <text>]
                the fault matrix: bypass, crashes and leaks under every fault (root);
                the table goes to the terminal and target/chaos/
  bench [--short] [--out <dir>]
                the system benchmark: ztunnel against the direct path in the same run,
                footprint per pod, enrollment times (root; table, JSON and chart in
                target/bench/), then the criterion benchmarks
  bench micro [criterion args]
                only the criterion benchmarks
  images [--hub <hub>] [--tag <tag>]
                both container images (release builds) as one OCI archive in
                target/images/<tag>/, assembled with umoci: no engine needed
  cluster-e2e [--keep] [--down] [--release]
                a real Kubernetes cluster on this machine (etcd, kube-apiserver,
                controller manager, scheduler; two nodes with containerd and a
                kubelet), built from the Go modules cluster/go.mod pins, with Istio's
                istiod and our charts installed by helm; sleep and httpbin; the
                specification's checks, mTLS, policy, rollout restarts under a
                prober; diagnostics in target/cluster-e2e/ on failure (root)
  dist          release builds of ztunnel and istio-cni (one version), SHA256SUMS and
                manifest.json (protocol versions) in target/dist/<version>/";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup_tests(),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("dist") => dist::run(&target_dir(), cargo)
            .map(|out| println!("xtask: release in {}", out.display())),
        Some("proptest") => proptest(&args[1..]),
        Some("images") => images::Options::parse(&args[1..])
            .map_err(|e| anyhow::Error::from(setup::Problem(format!("images: {e}"))))
            .and_then(|opts| images::build(&target_dir(), &opts, cargo))
            .map(|archive| {
                println!(
                    "xtask: images in {} (ctr images import, skopeo copy oci-archive:...)",
                    archive.display()
                )
            }),
        Some("cluster-e2e") => cluster_e2e_task(&args[1..]),
        Some("demo") => run_tool(For::Demo, "demo", &args[1..]),
        Some("chaos") => run_tool(For::Tests, "chaos", &args[1..]),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // An expected condition: said plainly, no backtrace.
        Err(e) if e.downcast_ref::<setup::Problem>().is_some() => {
            eprintln!("xtask: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
