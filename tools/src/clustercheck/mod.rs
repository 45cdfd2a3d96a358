//! The checks `cargo xtask cluster-e2e` makes on a real cluster (see
//! `tools/src/bin/cluster_e2e.rs`), in the order an operator's days go:
//!
//! 1. [`install`]: Istio's base and istiod (ambient profile), then Istio's own
//!    istio-cni chart with Istio's agent beside our ztunnel, and the sample
//!    applications, which Istio's agent enrolls;
//! 2. [`migration`]: `helm upgrade istio-cni` to our chart under a prober;
//! 3. [`dayone`]: what the specification's "Observing" section checks, and more;
//! 4. [`kinds`]: pods of every kind beside the mesh;
//! 5. [`policy`]: Istio's AuthorizationPolicy and PeerAuthentication through the API
//!    server;
//! 6. [`upgrade`]: `helm upgrade` of both our charts to a new image tag;
//! 7. [`restarts`]: the kubelet, containerd, and a node's power cut;
//! 8. [`uninstall`]: `helm uninstall` of ztunnel, then istio-cni, and installing both
//!    again.
//!
//! Each part prints its checks with their evidence and goes on after a failure
//! where it can; a part that cannot start says why and the run moves to the next.

pub mod dayone;
pub mod evidence;
pub mod install;
pub mod kinds;
pub mod migration;
pub mod policy;
pub mod report;
pub mod restarts;
pub mod uninstall;
pub mod upgrade;

use std::path::PathBuf;
use std::time::Duration;

use crate::incluster::{Kubectl, Prober, NAMESPACE};
use crate::realcluster::{Cluster, Manifest, NodeSpec};
pub use report::{eventually, Report};

/// Where Istio and our charts are installed.
pub const ISTIO_NS: &str = "istio-system";

/// The longest a client may go unanswered while ztunnel restarts on its node: the
/// new ztunnel opens its listeners beside the old one, which drains; requests fail
/// only between the old one closing a pod's connections and the client's retry.
pub const ZTUNNEL_RESTART_BOUND: Duration = Duration::from_secs(10);

/// One run of the checks on one cluster.
pub struct Run<'a> {
    pub m: &'a Manifest,
    pub cluster: Cluster,
    pub report: Report,
    /// Where captures and diagnostics go.
    pub out: PathBuf,
}

impl Run<'_> {
    pub fn k(&self) -> &Kubectl {
        &self.cluster.kubectl
    }

    /// Records one check (see [`Report::check`]).
    pub fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        self.report.check(name, result)
    }

    /// Worker `i` (0: where the clients run; 1: where httpbin runs).
    pub fn node(&self, i: usize) -> NodeSpec {
        self.cluster.nodes[i.min(self.cluster.nodes.len() - 1)]
            .spec
            .clone()
    }

    /// The reference of image `name` (empty when the manifest has none: the pod
    /// using it then fails to start, and its check says so).
    pub fn image(&self, name: &str) -> String {
        self.m.image(name).unwrap_or_default().to_string()
    }

    /// The current pods of sleep and httpbin (they change with rollouts and reboots).
    pub fn pods(&self) -> Result<(String, String), String> {
        let k = self.k();
        Ok((
            k.pod_of(NAMESPACE, "sleep")?,
            k.pod_of(NAMESPACE, "httpbin")?,
        ))
    }

    pub fn captures(&self) -> PathBuf {
        self.out.join("captures")
    }

    /// istioctl, built beside the cluster's components.
    pub fn istioctl(&self) -> PathBuf {
        self.m.components.join("istioctl")
    }
}

/// `kubectl apply -f -` of `yaml`.
pub fn apply(k: &Kubectl, yaml: &str) -> Result<String, String> {
    k.run_with_input(&["apply", "-f", "-"], Some(yaml))
}

/// Waits until every Deployment of `deployments` in `namespace` is Available.
pub fn available(
    k: &Kubectl,
    namespace: &str,
    deployments: &[&str],
    within: &str,
) -> Result<String, String> {
    let mut args = vec!["wait", "-n", namespace, "--for=condition=Available"];
    let names: Vec<String> = deployments.iter().map(|d| format!("deploy/{d}")).collect();
    args.extend(names.iter().map(String::as_str));
    let timeout = format!("--timeout={within}");
    args.push(&timeout);
    k.run(&args)
}

/// The redirection annotation of pod `pod` in `namespace`, eventually `want`.
pub fn annotation_becomes(
    k: &Kubectl,
    namespace: &str,
    pod: &str,
    want: &str,
    within: Duration,
) -> Result<String, String> {
    eventually(within, || {
        let v = k.jsonpath(
            namespace,
            &format!("pod/{pod}"),
            "{.metadata.annotations.ambient\\.istio\\.io/redirection}",
        )?;
        (v == want)
            .then(|| format!("{namespace}/{pod}: ambient.istio.io/redirection={v:?}"))
            .ok_or_else(|| {
                format!("{namespace}/{pod}: ambient.istio.io/redirection is {v:?}, not {want:?}")
            })
    })
}

/// A prober in pod `pod` (a request every 200 ms for up to `seconds`), once its first
/// five requests are made.
pub fn running_prober(k: &Kubectl, pod: &str, seconds: u64) -> Result<Prober, String> {
    let prober = Prober::start(k, pod, seconds)?;
    eventually(Duration::from_secs(20), || {
        (prober.count() >= 5)
            .then_some(())
            .ok_or_else(|| "the prober made no request".to_string())
    })?;
    Ok(prober)
}
