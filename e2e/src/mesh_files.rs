//! A node's mesh files: a root CA (made with ztunnel's own `create-root` code) and the
//! local config file ztunnel reads and reloads.

use std::path::PathBuf;

use crate::{TestNode, TestPod};

pub struct MeshFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub config: PathBuf,
}

/// The namespace test pods live in.
pub const NAMESPACE: &str = "ambient-demo";

impl TestNode {
    /// The node's CA and config paths, creating the CA on first use.
    pub fn mesh_files(&self) -> MeshFiles {
        let dir = self.dir.path().join("mesh");
        let files = MeshFiles {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            config: dir.join("config.yaml"),
        };
        if !files.ca_cert.exists() {
            ztunnel::create_root(
                "cluster.local",
                std::time::Duration::from_secs(86400),
                &dir,
                false,
            )
            .expect("create test root");
        }
        files
    }

    /// The node's name, as ztunnel's `NODE_NAME` and the workloads' `node` give it.
    pub fn node_name(&self) -> String {
        format!("node-{}", self.id)
    }

    /// Writes the local config atomically (write, then rename), as an operator's
    /// tooling would. The config must load (in ztunnel's parser, which takes only what
    /// Istio's ztunnel takes): every config a test writes is one an operator could.
    pub fn write_mesh_config(&self, yaml: &str) {
        if let Err(e) = ztunnel::state::watch::load_str("test config", yaml, None) {
            panic!("a test wrote a local config that does not load: {e}\n{yaml}");
        }
        self.write_mesh_config_unchecked(yaml);
    }

    /// Writes a local config as is, valid or not (to test how a bad edit is handled).
    pub fn write_mesh_config_unchecked(&self, yaml: &str) {
        let files = self.mesh_files();
        let tmp = files.config.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, &files.config).expect("rename config");
    }
}

/// A workload entry for `pod` (all its addresses, its node): identity
/// `spiffe://cluster.local/ns/ambient-demo/sa/<pod name>`, `protocol` HBONE or TCP,
/// backing `services` (a flow map's entries, `"ns/host": {80: 8080}`; empty for none).
pub fn workload(pod: &TestPod, protocol: &str, services: &str) -> String {
    let ips: Vec<String> = pod.ips.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "- uid: Kubernetes//Pod/{NAMESPACE}/{name}\n  name: {name}\n  namespace: {NAMESPACE}\n  serviceAccount: {name}\n  node: {node}\n  workloadIps: [{ips}]\n  protocol: {protocol}\n  services: {{{services}}}\n",
        name = pod.name,
        node = pod.node,
        ips = ips.join(", ")
    )
}

/// The `workloads:` list of `pods`, each speaking HBONE and backing no service.
pub fn hbone_workloads(pods: &[&TestPod]) -> String {
    let entries: String = pods.iter().map(|p| workload(p, "HBONE", "")).collect();
    format!("workloads:\n{entries}")
}

/// The SPIFFE identity a test pod gets from [`workload`].
pub fn identity_of(pod: &TestPod) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{}", pod.name)
}

impl TestNode {
    /// The node's mesh root, as the stand-in servers take it.
    pub fn mesh_root(&self) -> standins::MeshRoot {
        let files = self.mesh_files();
        standins::MeshRoot {
            cert: files.ca_cert,
            key: files.ca_key,
        }
    }

    /// A stand-in control plane with the node's mesh root, its files in the node's
    /// directory.
    pub async fn control_plane(&self) -> standins::controlplane::ControlPlane {
        standins::controlplane::ControlPlane::start(&self.mesh_root(), self.dir.path()).await
    }
}

impl TestPod {
    /// The pod as istiod describes it in `namespace` (see
    /// [`standins::controlplane::workload_of`]).
    pub fn workload(&self, namespace: &str) -> ztunnel::proto::istio::workload::Workload {
        standins::controlplane::workload_of(&self.name, &self.ips, &self.node, namespace)
    }
}
