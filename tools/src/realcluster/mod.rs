//! A real Kubernetes cluster on this machine, as processes: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler on the host (TLS between all of them,
//! RBAC on), and worker nodes each in a network namespace and a mount namespace of
//! their own, running Debian's containerd and runc and a real kubelet, with a real CNI
//! plugin chain in the node's own `/etc/cni/net.d`; kube-proxy and CoreDNS run on it
//! as pods, as in kind. The binaries come from the Go modules `cluster/go.mod` pins
//! (`cargo xtask cluster-e2e` builds them), the images from `cargo xtask`'s image
//! definitions, imported into each node's containerd (there is no registry).
//!
//! Layout (all under one root directory, [`Layout`]):
//!
//! ```text
//!  host netns ─ ambk-host 172.30.0.1 ─┐            control plane: etcd (127.0.0.1),
//!                                     │            kube-apiserver (172.30.0.1:6443)
//!  netns ambk-net: bridge ambk-br ────┼──────────┐
//!                                     │          │
//!  netns ambk-w1: eth0 172.30.0.11    │   netns ambk-w2: eth0 172.30.0.12
//!   containerd, kubelet, cni0 ─ pods  │    containerd, kubelet, cni0 ─ pods
//!   10.244.1.0/24                         10.244.2.0/24
//! ```
//!
//! Everything it creates can be found again from the root directory and the names
//! above, so [`teardown::down`] removes a cluster left by an earlier run (`--keep`, or
//! a crash) as well as its own.

pub mod addons;
pub mod controlplane;
pub mod daemon;
pub mod net;
pub mod node;
pub mod pki;
pub mod teardown;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::incluster::Kubectl;

/// What went wrong bringing the cluster up or down.
#[derive(Debug)]
pub enum Error {
    /// A command failed: what it was for, and what it said.
    Command(String),
    /// A file could not be read or written.
    Io(PathBuf, std::io::Error),
    /// Something did not become ready in time: what, and the last thing it said.
    Timeout(String),
    /// Anything else, said plainly.
    Setup(String),
}

impl Error {
    pub fn io(path: &Path, e: std::io::Error) -> Error {
        Error::Io(path.to_path_buf(), e)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Command(s) | Error::Setup(s) => f.write_str(s),
            Error::Io(p, e) => write!(f, "{}: {e}", p.display()),
            Error::Timeout(s) => write!(f, "timed out: {s}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Names and addresses of the cluster's network.
pub const NET_NS: &str = "ambk-net";
pub const BRIDGE: &str = "ambk-br";
pub const HOST_IF: &str = "ambk-host";
/// The host's address on the cluster network: the API server's.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
pub const NODE_PREFIX: u8 = 24;
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` service's address (the first of the service range).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const CLUSTER_DOMAIN: &str = "cluster.local";
pub const API_PORT: u16 = 6443;
/// Every name this module gives a netns, interface or cgroup starts so.
pub const PREFIX: &str = "ambk-";

/// One worker node: its name, number (from 1), address and pod range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub index: u8,
}

impl NodeSpec {
    /// Node `index` (1-based) of a cluster named `cluster`, kind's way:
    /// `<cluster>-worker`, `<cluster>-worker2`, ...
    pub fn worker(cluster: &str, index: u8) -> NodeSpec {
        let suffix = if index == 1 {
            String::new()
        } else {
            index.to_string()
        };
        NodeSpec {
            name: format!("{cluster}-worker{suffix}"),
            index,
        }
    }

    /// The node's network namespace (also the stem of its cgroups).
    pub fn netns(&self) -> String {
        format!("{PREFIX}w{}", self.index)
    }

    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, 0, 10 + self.index)
    }

    /// The node's pod range, `10.244.<index>.0/24`.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    /// The node's end of its link in the switch namespace.
    pub fn uplink(&self) -> String {
        format!("{PREFIX}w{}-up", self.index)
    }
}

/// Where everything of a cluster lives.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }

    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn pids(&self) -> PathBuf {
        self.root.join("pids")
    }

    /// `<root>/<name>.kubeconfig`; `admin` is the administrator's (what `kubectl`
    /// on the host uses).
    pub fn kubeconfig(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.kubeconfig"))
    }

    pub fn node(&self, node: &NodeSpec) -> PathBuf {
        self.root.join("nodes").join(&node.name)
    }

    /// The host's netfilter rules before the cluster was made ([`teardown::host_rules`]).
    pub fn host_rules_before(&self) -> PathBuf {
        self.root.join("host-rules.before")
    }

    /// The sysctls the kubelets change, as they were before the first one started.
    pub fn saved_sysctls(&self) -> PathBuf {
        self.root.join("sysctls.saved")
    }
}

/// The Go-built binaries (`cargo xtask cluster-e2e` builds them into its cache).
#[derive(Clone, Debug)]
pub struct Components {
    pub dir: PathBuf,
}

impl Components {
    /// The path of `name`, which must exist.
    pub fn bin(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        if path.exists() {
            Ok(path)
        } else {
            Err(Error::Setup(format!(
                "{} is missing: `cargo xtask cluster-e2e` builds it",
                path.display()
            )))
        }
    }
}

/// What `cargo xtask cluster-e2e` hands the cluster: where the built components and
/// image archives are, the images' references by name (`pause`, `kube-proxy`,
/// `coredns`, `pilot`, `curl`, `go-httpbin`, `ztunnel`, `istio-cni`), the charts and
/// helm, and the versions built (for the report).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Manifest {
    pub root: PathBuf,
    pub components: PathBuf,
    pub archives: Vec<PathBuf>,
    pub images: BTreeMap<String, String>,
    /// Istio's `manifests/charts`, from its Go module.
    pub istio_charts: PathBuf,
    /// This checkout's `charts/`.
    pub charts: PathBuf,
    pub helm: PathBuf,
    pub versions: BTreeMap<String, String>,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Setup(format!("{}: {e}", path.display())))
    }

    /// The reference of image `name`.
    pub fn image(&self, name: &str) -> Result<&str> {
        self.images
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| Error::Setup(format!("the manifest names no image {name:?}")))
    }

    /// The worker nodes: two, so that pods' traffic crosses from one to the other as
    /// in Istio's own kind tests.
    pub fn node_specs(&self) -> Vec<NodeSpec> {
        (1..=2).map(|i| NodeSpec::worker(CLUSTER_NAME, i)).collect()
    }
}

/// The cluster's name (its nodes are `<name>-worker`, `<name>-worker2`).
pub const CLUSTER_NAME: &str = "ambient";

/// A running cluster.
pub struct Cluster {
    pub layout: Layout,
    pub nodes: Vec<node::Node>,
    pub kubectl: Kubectl,
}

/// Brings a cluster up from `manifest`, replacing whatever an earlier run left at
/// its root: network, control plane, nodes (images imported), then kube-proxy and
/// CoreDNS; returns when every node is Ready and both add-ons are rolled out.
pub fn up(manifest: &Manifest) -> Result<Cluster> {
    let layout = Layout::new(&manifest.root);
    teardown::down(&layout, false)?;
    std::fs::create_dir_all(&layout.root).map_err(|e| Error::io(&layout.root, e))?;
    let rules = layout.host_rules_before();
    std::fs::write(&rules, teardown::host_rules()).map_err(|e| Error::io(&rules, e))?;
    let components = Components {
        dir: manifest.components.clone(),
    };
    let specs = manifest.node_specs();
    net::switch_up()?;
    for spec in &specs {
        net::node_up(spec, &specs)?;
    }
    let creds = controlplane::credentials(&layout)?;
    controlplane::start(&layout, &components, &creds)?;
    let kubectl = Kubectl {
        program: components.bin("kubectl")?,
        kubeconfig: layout.kubeconfig("admin"),
    };
    teardown::save_sysctls(&layout)?;
    let mut nodes = Vec::new();
    for spec in &specs {
        nodes.push(node::start(
            &layout,
            &components,
            &creds,
            spec,
            &manifest.archives,
            manifest.image("pause")?,
        )?);
    }
    let kubectl_run = |what: &str, args: &[&str], input: Option<&str>| {
        kubectl
            .run_with_input(args, input)
            .map_err(|e| Error::Command(format!("{what}: {e}")))
    };
    wait_for(
        "every node to be Ready",
        Duration::from_secs(120),
        Duration::from_secs(2),
        || {
            kubectl.run(&[
                "wait",
                "--for=condition=Ready",
                "node",
                "--all",
                "--timeout=5s",
            ])
        },
    )?;
    kubectl_run(
        "installing kube-proxy",
        &["apply", "-f", "-"],
        Some(&addons::kube_proxy(manifest.image("kube-proxy")?)),
    )?;
    kubectl_run(
        "installing CoreDNS",
        &["apply", "-f", "-"],
        Some(&addons::coredns(manifest.image("coredns")?)),
    )?;
    for object in ["daemonset/kube-proxy", "deployment/coredns"] {
        kubectl_run(
            &format!("waiting for {object}"),
            &[
                "rollout",
                "status",
                "-n",
                "kube-system",
                object,
                "--timeout=180s",
            ],
            None,
        )?;
    }
    Ok(Cluster {
        layout,
        nodes,
        kubectl,
    })
}

/// Runs `cmd`; its stdout, or [`Error::Command`] saying `what` failed and why.
pub fn run(what: &str, cmd: &mut Command) -> Result<String> {
    e2e::output(cmd, None).map_err(|e| Error::Command(format!("{what}: {e}")))
}

/// `ip args...`.
pub fn ip(args: &[&str]) -> Result<String> {
    run(
        &format!("ip {}", args.join(" ")),
        Command::new("ip").args(args),
    )
}

/// Polls `f` every `every` until it answers `Ok` or `within` passes; the timeout
/// names `what` and the last error.
pub fn wait_for<T>(
    what: &str,
    within: Duration,
    every: Duration,
    mut f: impl FnMut() -> std::result::Result<T, String>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Timeout(format!("{what} (after {within:?}): {e}")))
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_named_as_kind_names_them_and_get_their_own_ranges() {
        let w1 = NodeSpec::worker("ambient", 1);
        let w2 = NodeSpec::worker("ambient", 2);
        assert_eq!(w1.name, "ambient-worker");
        assert_eq!(w2.name, "ambient-worker2");
        assert_eq!(w1.ip().to_string(), "172.30.0.11");
        assert_eq!(w2.pod_cidr(), "10.244.2.0/24");
        // Interface names must fit IFNAMSIZ (15 characters).
        assert!(w2.uplink().len() <= 15 && w2.netns().starts_with(PREFIX));
        assert!(HOST_IF.len() <= 15 && BRIDGE.len() <= 15);
    }
}
