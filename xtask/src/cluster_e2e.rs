//! `cargo xtask cluster-e2e [--keep] [--down] [--release]`: the system on a real
//! Kubernetes cluster on this machine, beside Istio's istiod.
//!
//! 1. Sets the machine up (containerd, runc and umoci from Debian; the suite's tools;
//!    the Debian root filesystems of the images).
//! 2. Builds the cluster's components from their Go modules (`gobuild.rs`, cached by
//!    version outside the checkout) and our two binaries (the suite's debug build, or
//!    release with `--release`).
//! 3. Assembles every image (`images.rs`): Kubernetes' and Istio's, cached beside the
//!    components; ours, every run.
//! 4. Runs `tools/src/bin/cluster_e2e.rs`, which brings the cluster up (etcd, the API
//!    server, the controller manager and the scheduler on the host; two worker
//!    nodes, each with containerd and a kubelet in namespaces of its own),
//!    installs Istio's charts and ours with helm, makes the checks, collects
//!    diagnostics into `target/cluster-e2e/` on failure and removes the cluster.
//!
//! `--keep` leaves the cluster running and prints how to reach it; a later run
//! replaces it; `--down` removes it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::images::{self, Base, ImageDef};
use crate::setup::{self, For, Problem};
use crate::{gobuild, tools};

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub keep: bool,
    pub down: bool,
    pub release: bool,
    pub root: PathBuf,
}

/// Where the cluster lives (`AMBIENT_CLUSTER_DIR` overrides it): on disk (containerd's
/// images are there), outside any checkout, and outside the paths a node overlays
/// (`/etc`, `/opt`, `/var/lib`: containerd's overlay snapshots cannot live on an
/// overlay).
pub const DEFAULT_ROOT: &str = "/var/tmp/ambient-inpod-cluster";

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut opts = Options {
            keep: false,
            down: false,
            release: false,
            root: std::env::var_os("AMBIENT_CLUSTER_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| DEFAULT_ROOT.into()),
        };
        for a in args {
            match a.as_str() {
                "--keep" => opts.keep = true,
                "--down" => opts.down = true,
                "--release" => opts.release = true,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(opts)
    }
}

/// The Go toolchain, which must be new enough for the modules' `go` lines.
fn check_go(module_dir: &Path) -> Result<(), Problem> {
    let out = Command::new("go")
        .arg("version")
        .output()
        .map_err(|e| Problem(format!(
            "the cluster is built from Go modules and `go` cannot run ({e}): install Go 1.26 or later (https://go.dev/dl)"
        )))?;
    let have = String::from_utf8_lossy(&out.stdout).into_owned();
    let go_mod = std::fs::read_to_string(module_dir.join("go.mod"))
        .map_err(|e| Problem(format!("cluster/go.mod: {e}")))?;
    let want = go_mod
        .lines()
        .find_map(|l| l.strip_prefix("go "))
        .unwrap_or("1.26")
        .trim()
        .to_string();
    let version = |s: &str| -> Vec<u32> { s.split('.').filter_map(|p| p.parse().ok()).collect() };
    let have_v = have
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.strip_prefix("go"))
        .map(version)
        .unwrap_or_default();
    if have_v < version(&want) {
        return Err(Problem(format!(
            "cluster/go.mod needs Go {want}; this machine has {}: install Go {want} or later",
            have.trim()
        )));
    }
    Ok(())
}

/// The reference of one of the cluster's images.
fn cluster_reference(def: &ImageDef, c: &gobuild::Components) -> String {
    let v = &c.versions;
    let (hub, tag) = match def.name {
        "pause" => (images::K8S_HUB, "3.10".to_string()),
        "kube-proxy" => (images::K8S_HUB, v.kubernetes.clone()),
        "coredns" => (images::K8S_HUB, v.coredns.clone()),
        // The distroless variant, which Istio's ambient profile asks for (the image is
        // built on the `cc` base, distroless in content too).
        "pilot" | "install-cni" => (
            images::ISTIO_HUB,
            format!("{}-distroless", v.istio_tag(&c.istio_minor)),
        ),
        "go-httpbin" => (images::APPS_HUB, v.httpbin.clone()),
        _ => (images::APPS_HUB, tools::DEBIAN.to_string()),
    };
    format!("{hub}/{}:{tag}", def.name)
}

/// The cluster's images as one archive, cached beside the components (they change
/// only with them and with the Debian roots).
fn cluster_images(c: &gobuild::Components) -> Result<(PathBuf, Vec<(String, String)>), Problem> {
    let named: Vec<(String, String)> = images::CLUSTER
        .iter()
        .map(|d| (d.name.to_string(), cluster_reference(d, c)))
        .collect();
    let dir = c
        .bin
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .join("images");
    let archive = dir.join("cluster-images.tar");
    let roots: String = ["agent-rootfs", "apps-rootfs"]
        .iter()
        .map(|r| {
            std::fs::read_to_string(tools::dir().join(r).join(".packages")).unwrap_or_default()
        })
        .collect();
    let stamp = format!("{:?}\n{named:?}\n{roots}", images::CLUSTER);
    let stamp_file = dir.join(".stamp");
    if archive.exists() && std::fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
        return Ok((archive, named));
    }
    eprintln!("xtask: assembling the cluster's images (Kubernetes', Istio's, the samples')");
    images::assemble(
        &dir.join("layout"),
        &images::CLUSTER,
        &c.bin,
        |d| cluster_reference(d, c),
        &archive,
    )?;
    std::fs::write(&stamp_file, stamp).map_err(|e| Problem(format!("{}: {e}", dir.display())))?;
    Ok((archive, named))
}

/// Our images, from this build, into `target/cluster-e2e/images`.
fn our_images(
    target: &Path,
    release: bool,
    cargo: &impl Fn() -> Command,
) -> anyhow::Result<(PathBuf, Vec<(String, String)>)> {
    let mut zt = cargo();
    zt.args(["build", "--bins", "-p", "ztunnel"]);
    if release {
        zt.arg("--release");
    }
    crate::run(zt)?;
    let agent = crate::dist::static_agent(target, cargo(), release)?;
    let profile = if release { "release" } else { "debug" };
    let out = target.join("cluster-e2e/images");
    let programs = out.join("programs");
    std::fs::create_dir_all(&programs)?;
    std::fs::copy(
        target.join(profile).join("ztunnel"),
        programs.join("ztunnel"),
    )?;
    std::fs::copy(&agent, programs.join("istio-cni"))?;
    let opts = images::Options::default();
    let archive = out.join("ours.tar");
    images::assemble(
        &out.join("layout"),
        &images::OURS,
        &programs,
        |d| opts.reference(d.name),
        &archive,
    )?;
    let named = images::OURS
        .iter()
        .map(|d| (d.name.to_string(), opts.reference(d.name)))
        .collect();
    Ok((archive, named))
}

/// Runs it all; `e2e` runs the e2e binary `cluster_e2e` with arguments.
pub fn run(
    args: &[String],
    root: &Path,
    target: &Path,
    cargo: impl Fn() -> Command,
    e2e: impl FnOnce(&[String]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let opts = Options::parse(args).map_err(|e| Problem(format!("cluster-e2e: {e}")))?;
    if opts.down {
        return e2e(&[
            "down".into(),
            "--root".into(),
            opts.root.display().to_string(),
        ]);
    }
    setup::ensure(For::Cluster)?;
    tools::ensure()?;
    tools::ensure_rootfs(&[images::AGENT_BASE, images::APPS_BASE, Base::Cc])?;
    check_go(&gobuild::module_dir(root))?;
    let components = gobuild::ensure(root)?;
    let (cluster_archive, mut named) = cluster_images(&components)?;
    let (our_archive, ours) = our_images(target, opts.release, &cargo)?;
    named.extend(ours);
    let v = &components.versions;
    let manifest = serde_json::json!({
        "root": opts.root,
        "components": components.bin,
        "archives": [cluster_archive, our_archive],
        "images": named.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "istio_charts": components.istio_src.join("manifests/charts"),
        "charts": root.join("charts"),
        "helm": tools::dir().join("helm"),
        "versions": {
            "kubernetes": v.kubernetes,
            "istio": format!("{} ({})", v.istio_tag(&components.istio_minor), v.istio),
            "etcd": v.etcd,
            "coredns": v.coredns,
            "go-httpbin": v.httpbin,
            "containerd": probe_version("containerd", &["--version"]),
            "runc": probe_version("runc", &["--version"]),
        },
    });
    let dir = target.join("cluster-e2e");
    std::fs::create_dir_all(&dir)?;
    let manifest_path = dir.join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)?;
    let mut e2e_args = vec![
        "run".to_string(),
        "--manifest".into(),
        manifest_path.display().to_string(),
        "--out".into(),
        dir.display().to_string(),
    ];
    if opts.keep {
        e2e_args.push("--keep".into());
    }
    e2e(&e2e_args)
}

/// The first line a program prints of its version.
fn probe_version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_are_parsed_and_bad_ones_refused() {
        let o = Options::parse(&[]).unwrap();
        assert_eq!((o.keep, o.down, o.release), (false, false, false));
        let o = Options::parse(&args(&["--keep", "--release"])).unwrap();
        assert_eq!((o.keep, o.release), (true, true));
        assert!(Options::parse(&args(&["--nodes", "9"])).is_err());
        assert!(Options::parse(&args(&["--docker"])).is_err());
    }
}
