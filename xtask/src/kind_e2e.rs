//! `cargo xtask kind-e2e [--cluster <name>] [--istio-version <v>] [--hub <hub>]
//! [--tag <tag>] [--keep]`: the system on a real Kubernetes cluster.
//!
//! Creates a kind cluster, builds both images and loads them into it, installs Istio's
//! `base` and `istiod` charts from Istio's Helm repository (ambient profile) and our
//! `istio-cni` and `ztunnel` charts in place of Istio's, then runs the in-cluster
//! checks (`e2e/src/bin/kind_e2e.rs`: sleep and httpbin in an ambient namespace, the
//! specification's "Observing" checks, mTLS, rollout restarts of both DaemonSets with
//! traffic flowing), and deletes the cluster unless `--keep`.
//!
//! It checks its prerequisites first (a Docker engine, kind, kubectl, helm) and stops
//! within seconds naming every missing one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::images::{self, flag_value, probe};
use crate::setup::Problem;

/// Istio's official Helm repository.
const ISTIO_REPO: &str = "https://istio-release.storage.googleapis.com/charts";
const DEFAULT_ISTIO: &str = "1.28.0";
const DEFAULT_CLUSTER: &str = "ambient-inpod";

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub cluster: String,
    pub istio_version: String,
    pub keep: bool,
    pub images: images::Options,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut opts = Options {
            cluster: DEFAULT_CLUSTER.into(),
            istio_version: DEFAULT_ISTIO.into(),
            keep: false,
            images: images::Options::default(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--cluster" => opts.cluster = flag_value(&mut it, a)?,
                "--istio-version" => opts.istio_version = flag_value(&mut it, a)?,
                "--keep" => opts.keep = true,
                "--hub" => opts.images.hub = flag_value(&mut it, a)?,
                "--tag" => opts.images.tag = flag_value(&mut it, a)?,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(opts)
    }

    /// kubectl's context for the kind cluster.
    pub fn context(&self) -> String {
        format!("kind-{}", self.cluster)
    }
}

/// One prerequisite: what it is, whether it answers, and how to get it.
struct Prerequisite {
    what: &'static str,
    check: Box<dyn Fn() -> Result<String, String>>,
    how: &'static str,
}

/// A check that runs `program args` and takes its answer as its version.
fn version_of(
    program: impl AsRef<std::ffi::OsStr> + 'static,
    args: &'static [&'static str],
) -> Box<dyn Fn() -> Result<String, String>> {
    Box::new(move || {
        let mut cmd = Command::new(&program);
        cmd.args(args);
        probe(cmd, Duration::from_secs(10))
    })
}

/// The helm to use: the suite's (`cargo xtask setup`), else one on `PATH`.
pub fn helm() -> PathBuf {
    let ours = crate::tools::dir().join("helm");
    if ours.exists() {
        ours
    } else {
        PathBuf::from("helm")
    }
}

fn prerequisites(helm: PathBuf) -> Vec<Prerequisite> {
    vec![
        Prerequisite {
            what: "a Docker engine",
            check: Box::new(images::engine),
            how: "install Docker (or another engine kind supports) and start it; `docker info` must answer",
        },
        Prerequisite {
            what: "kind",
            check: version_of("kind", &["version"]),
            how: "install kind (a single binary from its releases, or `go install sigs.k8s.io/kind@latest`)",
        },
        Prerequisite {
            what: "kubectl",
            check: version_of("kubectl", &["version", "--client"]),
            how: "install kubectl",
        },
        Prerequisite {
            what: "helm",
            check: version_of(helm, &["version"]),
            how: "`cargo xtask setup` installs it, or install helm",
        },
    ]
}

/// Every prerequisite that does not answer, with why and how to get it.
fn missing(prereqs: &[Prerequisite]) -> Vec<String> {
    prereqs
        .iter()
        .filter_map(|p| {
            (p.check)()
                .err()
                .map(|why| format!("  {}: {why}\n    {}", p.what, p.how))
        })
        .collect()
}

/// The commands that set the cluster up, in order (program, then arguments).
pub fn setup_plan(opts: &Options, root: &Path, helm: &Path) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let helm = helm.display().to_string();
    let ctx = opts.context();
    let mut plan = vec![s(&[
        "kind",
        "create",
        "cluster",
        "--name",
        &opts.cluster,
        "--wait",
        "120s",
    ])];
    for image in images::IMAGES {
        plan.push(s(&[
            "kind",
            "load",
            "docker-image",
            &opts.images.reference(image),
            "--name",
            &opts.cluster,
        ]));
    }
    plan.push(s(&[
        &helm,
        "repo",
        "add",
        "istio",
        ISTIO_REPO,
        "--force-update",
    ]));
    let common = [
        "--kube-context",
        &ctx,
        "--namespace",
        "istio-system",
        "--wait",
        "--timeout",
        "5m",
    ];
    let istio = |release: &str, chart: &str, extra: &[&str]| {
        let mut c = s(&[&helm, "upgrade", "--install", release, chart]);
        c.extend(s(&common));
        c.extend(s(&["--version", &opts.istio_version]));
        c.extend(s(extra));
        c
    };
    plan.push(istio("istio-base", "istio/base", &["--create-namespace"]));
    plan.push(istio(
        "istiod",
        "istio/istiod",
        &["--set", "profile=ambient"],
    ));
    for chart in ["istio-cni", "ztunnel"] {
        let mut c = s(&[&helm, "upgrade", "--install", chart]);
        c.push(root.join("charts").join(chart).display().to_string());
        c.extend(s(&common));
        c.extend(s(&[
            "--set",
            &format!("hub={}", opts.images.hub),
            "--set",
            &format!("tag={}", opts.images.tag),
        ]));
        plan.push(c);
    }
    plan
}

fn run_plan(plan: &[Vec<String>]) -> anyhow::Result<()> {
    for step in plan {
        let mut cmd = Command::new(&step[0]);
        cmd.args(&step[1..]);
        crate::run(cmd)?;
    }
    Ok(())
}

/// Runs it all; `checks` runs the in-cluster checks (the e2e binary).
pub fn run(
    args: &[String],
    root: &Path,
    checks: impl FnOnce(&Options) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let opts = Options::parse(args).map_err(|e| Problem(format!("kind-e2e: {e}")))?;
    let helm = helm();
    let missing = missing(&prerequisites(helm.clone()));
    if !missing.is_empty() {
        return Err(Problem(format!(
            "kind-e2e cannot run here; missing:\n{}",
            missing.join("\n")
        ))
        .into());
    }
    images::build(root, &opts.images)?;
    let result = run_plan(&setup_plan(&opts, root, &helm)).and_then(|()| checks(&opts));
    if opts.keep {
        eprintln!(
            "xtask: the cluster stays (kubectl --context {}); `kind delete cluster --name {}` removes it",
            opts.context(),
            opts.cluster
        );
    } else {
        let mut delete = Command::new("kind");
        delete.args(["delete", "cluster", "--name", &opts.cluster]);
        if let Err(e) = crate::run(delete) {
            eprintln!("xtask: {e}");
        }
    }
    result
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
        assert_eq!(o.cluster, DEFAULT_CLUSTER);
        assert_eq!(o.context(), "kind-ambient-inpod");
        assert!(!o.keep);
        let o = Options::parse(&args(&[
            "--cluster",
            "c1",
            "--istio-version",
            "1.27.3",
            "--keep",
            "--hub",
            "h",
            "--tag",
            "t",
        ]))
        .unwrap();
        assert_eq!(
            (o.cluster.as_str(), o.istio_version.as_str(), o.keep),
            ("c1", "1.27.3", true)
        );
        assert_eq!(o.images.reference("ztunnel"), "h/ztunnel:t");
        assert!(Options::parse(&args(&["--cluster"])).is_err());
        assert!(Options::parse(&args(&["--istio-version", "--keep"])).is_err());
        assert!(Options::parse(&args(&["--docker"])).is_err());
    }

    #[test]
    fn the_plan_installs_istiod_from_istio_and_our_charts_in_place_of_istios() {
        let o = Options::parse(&args(&["--tag", "t"])).unwrap();
        let plan = setup_plan(&o, Path::new("/src"), Path::new("/tools/helm"));
        let lines: Vec<String> = plan.iter().map(|c| c.join(" ")).collect();
        assert!(lines[0].starts_with("kind create cluster --name ambient-inpod"));
        assert!(lines.iter().any(|l| l.contains(&format!(
            "kind load docker-image {}/istio-cni:t",
            images::DEFAULT_HUB
        ))));
        assert!(lines.iter().any(|l| l.contains(&format!(
            "kind load docker-image {}/ztunnel:t",
            images::DEFAULT_HUB
        ))));
        let istiod = lines
            .iter()
            .find(|l| l.contains("istio/istiod"))
            .expect("istiod");
        assert!(istiod.contains("profile=ambient") && istiod.contains("--version 1.28.0"));
        // Ours, after istiod, from this checkout; Istio's own istio-cni and ztunnel never.
        let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap();
        assert!(at("/src/charts/istio-cni") > at("istio/istiod"));
        assert!(at("/src/charts/ztunnel") > at("istio/istiod"));
        assert!(!lines
            .iter()
            .any(|l| l.contains("istio/cni") || l.contains("istio/ztunnel")));
        for l in lines.iter().filter(|l| l.contains("upgrade --install")) {
            assert!(
                l.contains("--kube-context kind-ambient-inpod --namespace istio-system --wait"),
                "{l}"
            );
        }
    }

    #[test]
    fn every_missing_prerequisite_is_named_with_how_to_get_it() {
        let prereqs = vec![
            Prerequisite {
                what: "a thing",
                check: Box::new(|| Err("not found".into())),
                how: "install it",
            },
            Prerequisite {
                what: "another",
                check: Box::new(|| Ok("1.0".into())),
                how: "-",
            },
            Prerequisite {
                what: "a third",
                check: version_of("/nonexistent/kind", &["version"]),
                how: "get it",
            },
        ];
        let missing = missing(&prereqs);
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(missing[0].contains("a thing: not found") && missing[0].contains("install it"));
        assert!(missing[1].contains("a third: cannot run"));
    }
}
