//! A one-node "cluster": the Kubernetes API test server, a node whose pods are netns
//! wired by real CNI plugins, each with a process in a kubelet-style cgroup carrying
//! the pod's UID, and the agent (`istio-cni`, Kubernetes mode) and ztunnel as real
//! processes. Tests act through the API server only, as a user with kubectl would.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;

use crate::cgroups::{CgroupRoot, PodProcess};
use crate::kube_api::ApiServer;
use crate::{AgentProcess, TestNode, TestPod, Ztunnel};

pub const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
pub const REDIRECTION: &str = "ambient.istio.io/redirection";

pub struct Cluster {
    pub api: ApiServer,
    pub node: TestNode,
    pub node_name: String,
    pub kubeconfig: PathBuf,
    pub probe_set: String,
    cgroups: CgroupRoot,
}

/// A pod: its netns, its API object's uid, and the process that makes it findable.
pub struct KubePod {
    pub pod: TestPod,
    pub uid: String,
    pub namespace: String,
    _process: PodProcess,
}

impl std::ops::Deref for KubePod {
    type Target = TestPod;
    fn deref(&self) -> &TestPod {
        &self.pod
    }
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

impl Cluster {
    pub async fn new(index: u8, gateway: bool) -> Cluster {
        let node = if gateway {
            TestNode::with_gateway(index)
        } else {
            TestNode::new(index)
        };
        let api = ApiServer::start().await;
        let kubeconfig = node.dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        Cluster {
            node_name: format!("node-{}", node.id),
            probe_set: format!("zt-e2e-{}", node.id),
            api,
            node,
            kubeconfig,
            cgroups: CgroupRoot::new(),
        }
    }

    pub fn namespace(&self, name: &str, pairs: &[(&str, &str)]) {
        self.api.create_namespace(Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: labels(pairs),
                ..Default::default()
            },
            ..Default::default()
        });
    }

    /// Starts a pod on the node (netns through CNI, a process in its cgroup) and then
    /// creates its API object, Running, with its IP.
    pub fn add_pod(&self, namespace: &str, name: &str, pairs: &[(&str, &str)]) -> KubePod {
        let pod = self.node.add_pod(name);
        // A fresh UID: the process's pid and the pod's address make it unique.
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            ip_suffix(&pod)
        );
        let process = PodProcess::start(&self.cgroups, &uid, Some(&pod.netns_name));
        let mut object = self.pod_object(namespace, name, pairs);
        object.metadata.uid = Some(uid.clone());
        object.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(pod.ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: pod.ip.to_string(),
            }]),
            ..Default::default()
        });
        self.api.create_pod(object);
        KubePod {
            pod,
            uid,
            namespace: namespace.into(),
            _process: process,
        }
    }

    /// A pod object scheduled on this node, its service account named after it.
    fn pod_object(&self, namespace: &str, name: &str, pairs: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: labels(pairs),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(self.node_name.clone()),
                service_account_name: Some(name.into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// Our plugin's entry in the node's conflist.
    pub fn plugin_conf(&self) -> serde_json::Value {
        json!({
            "type": "istio-cni",
            "kubeconfig": self.kubeconfig,
            "agent_socket": self.node.dir.path().join("pluginevent.sock"),
            "timeout_seconds": 5,
        })
    }

    /// Creates the pod's API object as the scheduler and kubelet would before the
    /// sandbox exists: on this node, no IP yet. Returns its uid.
    pub fn create_pod_object(&self, namespace: &str, name: &str) -> String {
        let mut object = self.pod_object(namespace, name, &[]);
        object.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..Default::default()
        });
        let pod = self.api.create_pod(object);
        pod.metadata.uid.unwrap_or_default()
    }

    /// Runs the sandbox creation of a pod whose object exists: the CNI chain with our
    /// plugin last, with kubelet's `CNI_ARGS`.
    pub fn start_sandbox(&self, namespace: &str, name: &str) -> (TestPod, Result<(), String>) {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}");
        self.node.add_pod_via_chain(name, self.plugin_conf(), &args)
    }

    pub fn start_agent(&self, n: u32) -> AgentProcess {
        Ztunnel::start_agent(
            &self.node,
            n,
            &self.kubeconfig,
            &self.node_name,
            &self.probe_set,
        )
    }

    pub fn start_ztunnel(&self, n: u32) -> Ztunnel {
        Ztunnel::start(&self.node, n)
    }

    /// Sets (or with `None` removes) a label on a namespace.
    pub fn label_namespace(&self, name: &str, key: &str, value: Option<&str>) {
        self.api
            .patch_namespace(name, json!({"metadata": {"labels": {key: value}}}));
    }

    pub fn label_pod(&self, pod: &KubePod, key: &str, value: Option<&str>) {
        self.api.patch_pod(
            &pod.namespace,
            &pod.name,
            json!({"metadata": {"labels": {key: value}}}),
        );
    }

    /// The pod's redirection annotation.
    pub fn annotation(&self, pod: &KubePod) -> Option<String> {
        self.api
            .pod(&pod.namespace, &pod.name)?
            .metadata
            .annotations?
            .get(REDIRECTION)
            .cloned()
    }

    /// Waits until the annotation is `want` (or absent with `None`).
    pub async fn wait_annotation(&self, pod: &KubePod, want: Option<&str>, agent: &AgentProcess) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.annotation(pod).as_deref() != want {
            assert!(
                Instant::now() < deadline,
                "pod {} annotation stayed {:?}, expected {want:?}; agent log:\n{}",
                pod.name,
                self.annotation(pod),
                agent.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn ip_suffix(pod: &TestPod) -> u64 {
    match pod.ip {
        std::net::IpAddr::V4(v4) => u32::from(v4) as u64,
        std::net::IpAddr::V6(_) => 0,
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The agent installs host probe rules in the machine's own netns: remove them.
        if let Ok(host) = protocol::Netns::current() {
            let iptables = istio_cni::rules::Iptables {
                backend: istio_cni::rules::Backend::detect()
                    .unwrap_or(istio_cni::rules::Backend::Nft),
                lock_wait: Duration::from_secs(5),
            };
            let probes = istio_cni::rules::hostprobe::HostProbes::new(
                &istio_cni::rules::RuleConfig::default(),
                iptables,
                &self.probe_set,
            );
            let _ = probes.uninstall(&host);
        }
    }
}
