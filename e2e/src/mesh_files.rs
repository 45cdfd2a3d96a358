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
            ztunnel::create_root("cluster.local", std::time::Duration::from_secs(86400), &dir)
                .expect("create test root");
        }
        files
    }

    /// Writes the local config atomically (write, then rename), as an operator's
    /// tooling would.
    pub fn write_mesh_config(&self, yaml: &str) {
        let files = self.mesh_files();
        let tmp = files.config.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, &files.config).expect("rename config");
    }
}

/// A workload entry for `pod` (all its addresses): identity
/// `spiffe://cluster.local/ns/ambient-demo/sa/<pod name>`, `protocol` HBONE or TCP,
/// plus `extra` YAML lines (indented 2).
pub fn workload(pod: &TestPod, protocol: &str, extra: &str) -> String {
    let ips: Vec<String> = pod.ips.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "- name: {name}\n  namespace: {NAMESPACE}\n  serviceAccount: {name}\n  workloadIps: [{ips}]\n  protocol: {protocol}\n{extra}",
        name = pod.name,
        ips = ips.join(", ")
    )
}

/// The SPIFFE identity a test pod gets from [`workload`].
pub fn identity_of(pod: &TestPod) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{}", pod.name)
}
