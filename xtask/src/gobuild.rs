//! The cluster's components, built from the Go modules that `cluster/go.mod` pins (one
//! k8s.io release for every k8s.io module; `replace` lines point Kubernetes' staging
//! modules at that release): etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubelet, kube-proxy, kubectl, CoreDNS, Istio's pilot-discovery,
//! istioctl, install-cni (its node agent) and istio-cni (its plugin), go-httpbin (the sample echo server), and the pause
//! program from the Kubernetes module's C source.
//!
//! They go into a cache outside the checkout, `<cache>/cluster/<key>/bin`, where the
//! key is a hash of everything the build depends on (go.mod, go.sum, our two small
//! mains, the Go version and the build flags): a second run with nothing changed
//! builds nothing. Go's own module and build caches (`GOMODCACHE`, `GOCACHE`) are
//! outside the checkout too.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::setup::Problem;
use crate::tools::ran;

/// Build flags, part of the cache key: static binaries (the images carry no C
/// library for them), no paths of this machine inside, no symbol tables.
const GO_FLAGS: [&str; 2] = ["-trimpath", "-buildvcs=false"];
/// Istio's own build tags.
const ISTIO_TAGS: &str = "vtprotobuf,disable_pgv";
/// Bumped when the recipe below changes, so old caches are not taken for new ones.
const RECIPE: &str = "cluster components v2";

/// Kubernetes' commands.
pub const KUBERNETES: [&str; 6] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];
/// Istio's commands: istiod, istioctl, and its node agent and CNI plugin (for the
/// migration from Istio's own agent). `go build` names each after its package.
pub const ISTIO: [(&str, &str); 4] = [
    (
        "pilot-discovery",
        "istio.io/istio/pilot/cmd/pilot-discovery",
    ),
    ("istioctl", "istio.io/istio/istioctl/cmd/istioctl"),
    ("istio-cni", "istio.io/istio/cni/cmd/istio-cni"),
    ("install-cni", "istio.io/istio/cni/cmd/install-cni"),
];

/// The versions the build took, from `cluster/go.mod`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    /// `v1.36.3`
    pub kubernetes: String,
    /// The Istio module's version (a pseudo-version: Istio publishes no tags).
    pub istio: String,
    pub etcd: String,
    pub coredns: String,
    pub httpbin: String,
}

impl Versions {
    /// The tag Istio's images get: Istio's minor version (from its `VERSION` file)
    /// and the commit, `1.31-dev.eed52ebb66ad`.
    pub fn istio_tag(&self, istio_minor: &str) -> String {
        let commit = self.istio.rsplit('-').next().unwrap_or("unknown");
        format!("{istio_minor}-dev.{commit}")
    }
}

/// What was built: where, and from which versions.
#[derive(Clone, Debug)]
pub struct Components {
    pub bin: PathBuf,
    pub versions: Versions,
    /// The Istio module's source (its charts).
    pub istio_src: PathBuf,
    /// Istio's minor version, from its `VERSION` file.
    pub istio_minor: String,
}

/// `cluster/` in the workspace.
pub fn module_dir(root: &Path) -> PathBuf {
    root.join("cluster")
}

/// Where built components are cached (beside the suite's tools).
pub fn cache_dir() -> PathBuf {
    crate::tools::dir()
        .parent()
        .map(|p| p.join("cluster"))
        .unwrap_or_else(|| PathBuf::from("/var/cache/ambient-inpod/cluster"))
}

fn go(module: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(module).env("CGO_ENABLED", "0");
    cmd
}

/// (version, source directory) of module `path` as `cluster/go.mod` resolves it.
fn module(module_dir: &Path, path: &str) -> Result<(String, PathBuf), Problem> {
    let mut cmd = go(module_dir);
    cmd.args(["mod", "download", "-json", path]);
    let text = ran(&mut cmd, &format!("finding the module {path}"))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Problem(format!("go mod download -json {path}: {e}")))?;
    match (v["Version"].as_str(), v["Dir"].as_str()) {
        (Some(version), Some(dir)) => Ok((version.to_string(), PathBuf::from(dir))),
        _ => Err(Problem(format!(
            "go mod download -json {path} named no version or directory: {text}"
        ))),
    }
}

/// The cache key: a hash of every input of the build.
fn key(module_dir: &Path) -> Result<String, Problem> {
    let mut input = Vec::new();
    for f in [
        "go.mod",
        "go.sum",
        "cmd/etcd/main.go",
        "cmd/coredns/main.go",
    ] {
        let path = module_dir.join(f);
        input
            .extend(std::fs::read(&path).map_err(|e| Problem(format!("{}: {e}", path.display())))?);
    }
    let mut version = Command::new("go");
    version.arg("version");
    input.extend(ran(&mut version, "go version")?.trim().as_bytes());
    input.extend(format!("{RECIPE} {GO_FLAGS:?} {ISTIO_TAGS}").into_bytes());
    let digest = crate::dist::sha256(&input)
        .map_err(|e| Problem(format!("hashing the build's inputs: {e}")))?;
    Ok(digest[..16].to_string())
}

/// `-ldflags` for Kubernetes' commands: the version they report (the API server's is
/// what clients and istiod read), as Kubernetes' own build sets it.
pub fn kubernetes_ldflags(version: &str) -> String {
    let v = version.trim_start_matches('v');
    let mut parts = v.split('.');
    let (major, minor) = (parts.next().unwrap_or("0"), parts.next().unwrap_or("0"));
    let mut flags = vec!["-s".to_string(), "-w".to_string()];
    for pkg in [
        "k8s.io/client-go/pkg/version",
        "k8s.io/component-base/version",
    ] {
        for (k, val) in [
            ("gitVersion", version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
            ("buildDate", "1970-01-01T00:00:00Z"),
        ] {
            flags.push(format!("-X {pkg}.{k}={val}"));
        }
    }
    flags.join(" ")
}

/// `-ldflags` for Istio's commands: the version and hub they report.
pub fn istio_ldflags(tag: &str, commit: &str) -> String {
    let pkg = "istio.io/istio/pkg/version";
    format!(
        "-s -w -X {pkg}.buildVersion={tag} -X {pkg}.buildGitRevision={commit} \
         -X {pkg}.buildStatus=Clean -X {pkg}.buildTag={tag} -X {pkg}.buildHub={}",
        crate::images::ISTIO_HUB
    )
}

fn build(
    module_dir: &Path,
    out: &Path,
    ldflags: &str,
    tags: Option<&str>,
    pkgs: &[&str],
) -> Result<(), Problem> {
    let mut cmd = go(module_dir);
    cmd.arg("build").args(GO_FLAGS);
    if let Some(t) = tags {
        cmd.arg(format!("-tags={t}"));
    }
    cmd.arg(format!("-ldflags={ldflags}"))
        .arg("-o")
        .arg(format!("{}/", out.display()));
    cmd.args(pkgs);
    eprintln!("xtask: go build {}", pkgs.join(" "));
    crate::run(cmd).map_err(|e| Problem(format!("building the cluster's components: {e:#}")))
}

/// Builds what is missing and returns the components; `GOFLAGS`, `GOPROXY` and the
/// Go caches are the caller's.
pub fn ensure(root: &Path) -> Result<Components, Problem> {
    let module_dir = module_dir(root);
    let (kubernetes, kubernetes_src) = module(&module_dir, "k8s.io/kubernetes")?;
    let (istio, istio_src) = module(&module_dir, "istio.io/istio")?;
    let versions = Versions {
        kubernetes,
        istio,
        etcd: module(&module_dir, "go.etcd.io/etcd/server/v3")?.0,
        coredns: module(&module_dir, "github.com/coredns/coredns")?.0,
        httpbin: module(&module_dir, "github.com/mccutchen/go-httpbin/v2")?.0,
    };
    let istio_minor = std::fs::read_to_string(istio_src.join("VERSION"))
        .map(|v| v.trim().to_string())
        .map_err(|e| Problem(format!("Istio's VERSION file: {e}")))?;
    let dir = cache_dir().join(key(&module_dir)?);
    let bin = dir.join("bin");
    let components = Components {
        bin: bin.clone(),
        versions: versions.clone(),
        istio_src,
        istio_minor: istio_minor.clone(),
    };
    if dir.join(".complete").exists() {
        eprintln!(
            "xtask: the cluster's components are built ({})",
            bin.display()
        );
        return Ok(components);
    }
    let tmp = dir.join("bin.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Problem(format!("{}: {e}", tmp.display())))?;
    let start = std::time::Instant::now();
    let k8s: Vec<String> = KUBERNETES
        .iter()
        .map(|c| format!("k8s.io/kubernetes/cmd/{c}"))
        .collect();
    let k8s: Vec<&str> = k8s.iter().map(String::as_str).collect();
    build(
        &module_dir,
        &tmp,
        &kubernetes_ldflags(&versions.kubernetes),
        None,
        &k8s,
    )?;
    build(
        &module_dir,
        &tmp,
        "-s -w",
        None,
        &[
            "./cmd/etcd",
            "./cmd/coredns",
            "github.com/mccutchen/go-httpbin/v2/cmd/go-httpbin",
        ],
    )?;
    let tag = versions.istio_tag(&istio_minor);
    let commit = versions
        .istio
        .rsplit('-')
        .next()
        .unwrap_or("unknown")
        .to_string();
    let istio_pkgs: Vec<&str> = ISTIO.iter().map(|(_, p)| *p).collect();
    build(
        &module_dir,
        &tmp,
        &istio_ldflags(&tag, &commit),
        Some(ISTIO_TAGS),
        &istio_pkgs,
    )?;
    // The sandbox's pause process is C in Kubernetes' tree; static, so the image needs
    // nothing else.
    let pause_c = kubernetes_src.join("build/pause/linux/pause.c");
    let mut cc = Command::new("gcc");
    cc.args(["-Os", "-static", "-DVERSION=3.10", "-o"])
        .arg(tmp.join("pause"))
        .arg(&pause_c);
    crate::run(cc).map_err(|e| Problem(format!("compiling {}: {e:#}", pause_c.display())))?;
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::rename(&tmp, &bin).map_err(|e| Problem(format!("{}: {e}", bin.display())))?;
    std::fs::write(dir.join(".complete"), format!("{versions:?}\n"))
        .map_err(|e| Problem(format!("{}: {e}", dir.display())))?;
    eprintln!(
        "xtask: built the cluster's components in {:.0?} ({})",
        start.elapsed(),
        bin.display()
    );
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_reports_the_pinned_version() {
        let flags = kubernetes_ldflags("v1.36.3");
        assert!(flags.contains("-X k8s.io/component-base/version.gitVersion=v1.36.3"));
        assert!(flags.contains("-X k8s.io/client-go/pkg/version.gitMinor=36"));
        assert!(flags.contains("-X k8s.io/component-base/version.gitMajor=1"));
    }

    #[test]
    fn istio_images_are_tagged_with_its_minor_version_and_commit() {
        let v = Versions {
            kubernetes: "v1.36.3".into(),
            istio: "v0.0.0-20260827124520-eed52ebb66ad".into(),
            etcd: String::new(),
            coredns: String::new(),
            httpbin: String::new(),
        };
        assert_eq!(v.istio_tag("1.31"), "1.31-dev.eed52ebb66ad");
        let flags = istio_ldflags("1.31-dev.x", "x");
        assert!(flags.contains("istio.io/istio/pkg/version.buildVersion=1.31-dev.x"));
    }

    /// One k8s.io release for every k8s.io module: the `replace` lines pin Kubernetes'
    /// staging modules to the release matching k8s.io/kubernetes.
    #[test]
    fn go_mod_pins_one_kubernetes_release() {
        let go_mod = include_str!("../../cluster/go.mod");
        let release = go_mod
            .lines()
            .find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes v1."))
            .and_then(|v| v.split_whitespace().next())
            .expect("go.mod requires k8s.io/kubernetes");
        let staging = format!("v0.{release}");
        let replaced: Vec<&str> = go_mod
            .lines()
            .filter(|l| l.contains(" => k8s.io/"))
            .collect();
        assert!(replaced.len() > 20, "{replaced:?}");
        for l in &replaced {
            assert!(l.trim_end().ends_with(&staging), "{l} is not at {staging}");
        }
        // The requirements name the same release as the replacements.
        for (module, _) in replaced.iter().filter_map(|l| l.trim().split_once(" => ")) {
            for required in go_mod
                .lines()
                .filter(|l| l.trim().starts_with(&format!("{module} v")))
            {
                assert!(
                    required.contains(&staging),
                    "{required} is not at {staging}"
                );
            }
        }
        for tool in KUBERNETES {
            assert!(
                go_mod.contains(&format!("k8s.io/kubernetes/cmd/{tool}")),
                "{tool}"
            );
        }
        for (_, pkg) in ISTIO {
            assert!(go_mod.contains(pkg), "{pkg}");
        }
    }
}
