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
use crate::cni::{self, Invocation};
use crate::{AgentProcess, TestNode, TestPod, Ztunnel};
use standins::kube_api::ApiServer;

pub const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
pub const REDIRECTION: &str = "ambient.istio.io/redirection";
/// The namespace the agent runs in (its `POD_NAMESPACE` default), where its
/// DaemonSet is.
pub const AGENT_NAMESPACE: &str = "istio-system";

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
    process: Option<PodProcess>,
}

impl KubePod {
    /// The sandbox disappears without a CNI DEL (its process killed, its netns
    /// removed), as when a runtime's teardown never reached the plugin.
    pub fn vanish(&mut self) {
        drop(self.process.take());
        self.pod.vanish();
    }
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

/// A pod as the control plane describes it to ztunnel (its workload entry).
pub struct MeshPod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub ips: Vec<std::net::IpAddr>,
}

impl Cluster {
    pub async fn new(index: u8, gateway: bool) -> Cluster {
        let node = if gateway {
            TestNode::with_gateway(index)
        } else {
            TestNode::new(index)
        };
        Self::on(node).await
    }

    /// A cluster whose pods are dual-stack (see [`TestNode::dual_stack`]).
    pub async fn dual_stack(index: u8, gateway: bool) -> Cluster {
        Self::on(TestNode::dual_stack(index, gateway)).await
    }

    async fn on(node: TestNode) -> Cluster {
        let api = ApiServer::start().await;
        let kubeconfig = node.dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        Self::with(node, api, kubeconfig)
    }

    /// A cluster whose API server speaks HTTPS and accepts only `token`. The agent's
    /// kubeconfig names its CA and token by path, in a directory
    /// ([`Cluster::agent_secrets`]) that stands for the agent container's own mounts.
    pub async fn new_secure(index: u8, token: &str) -> Cluster {
        let node = TestNode::new(index);
        let api = ApiServer::start_secure(&[token]).await;
        let secrets = node.dir.path().join("agent-secrets");
        std::fs::create_dir_all(&secrets).expect("secrets dir");
        std::fs::write(
            secrets.join("ca.crt"),
            api.ca_pem.clone().unwrap_or_default(),
        )
        .expect("CA");
        std::fs::write(secrets.join("token"), token).expect("token");
        let kubeconfig = node.dir.path().join("kubeconfig");
        let cfg = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{}\n    certificate-authority: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: agent\ncurrent-context: test\nusers:\n- name: agent\n  user:\n    tokenFile: {}\n",
            api.addr,
            secrets.join("ca.crt").display(),
            secrets.join("token").display()
        );
        std::fs::write(&kubeconfig, cfg).expect("kubeconfig");
        Self::with(node, api, kubeconfig)
    }

    /// Where the agent's credentials live (see [`Cluster::new_secure`]).
    pub fn agent_secrets(&self) -> PathBuf {
        self.node.dir.path().join("agent-secrets")
    }

    fn with(node: TestNode, api: ApiServer, kubeconfig: PathBuf) -> Cluster {
        // The agent and its plugin get exactly what the istio-cni chart grants them.
        api.enforce_rbac(&crate::charts::agent_rules());
        let node_name = format!("node-{}", node.id);
        // Installed as the chart installs it: the agent's DaemonSet (which it asks
        // for when it stops: present means an upgrade, and the plugin stays) and the
        // node it runs on.
        let mut ds = crate::charts::daemonset(crate::charts::golden("istio-cni")).clone();
        ds["metadata"]["namespace"] = json!(AGENT_NAMESPACE);
        api.create_daemonset(ds);
        api.create_node(json!({"metadata": {"name": node_name, "labels": {
            "kubernetes.io/os": "linux", "kubernetes.io/hostname": node_name}}}));
        Cluster {
            node_name,
            probe_set: node.probe_set(),
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
    /// Sends a raw plugin-event request to the agent (as the CNI plugin does) and
    /// returns its JSON answer.
    pub async fn plugin_request(&self, body: serde_json::Value) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let wait = Duration::from_secs(5);
        let path = self.node.dir.path().join("pluginevent.sock");
        let deadline = Instant::now() + wait;
        let mut stream = loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "plugin event socket: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let mut bytes = serde_json::to_vec(&body).expect("json");
        bytes.push(b'\n');
        stream.write_all(&bytes).await.expect("write");
        stream.shutdown().await.expect("shutdown");
        let mut reply = Vec::new();
        tokio::time::timeout(wait, stream.read_to_end(&mut reply))
            .await
            .expect("an answer in time")
            .expect("read");
        serde_json::from_slice(&reply).expect("a JSON answer")
    }

    pub fn add_pod(&self, namespace: &str, name: &str, pairs: &[(&str, &str)]) -> KubePod {
        let pod = self.run_pod(namespace, name);
        self.publish(&pod, pairs);
        pod
    }

    /// Starts a pod on the node (netns through CNI, a process in its cgroup), without
    /// its API object yet (see [`Cluster::publish`]).
    pub fn run_pod(&self, namespace: &str, name: &str) -> KubePod {
        self.run_sandbox(namespace, name, None)
    }

    /// Starts a new sandbox for the pod `uid` (kubelet recreating it, here without our
    /// plugin in the chain): a new netns and address, a process in the pod's cgroup.
    pub fn run_sandbox(&self, namespace: &str, name: &str, uid: Option<&str>) -> KubePod {
        let pod = self.node.add_pod(name);
        // A fresh UID: the process's pid and the pod's address make it unique.
        let uid = uid.map(str::to_string).unwrap_or_else(|| {
            format!(
                "{:08x}-0000-4000-8000-{:012x}",
                std::process::id(),
                ip_suffix(&pod)
            )
        });
        let process = PodProcess::start(&self.cgroups, &uid, Some(&pod.netns_name));
        KubePod {
            pod,
            uid,
            namespace: namespace.into(),
            process: Some(process),
        }
    }

    /// Creates the API object of a pod started with [`Cluster::run_pod`]: Running,
    /// with its IP, labelled `pairs`.
    pub fn publish(&self, pod: &KubePod, pairs: &[(&str, &str)]) {
        let mut object = self.pod_object(&pod.namespace, &pod.name, pairs);
        object.metadata.uid = Some(pod.uid.clone());
        object.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(pod.ip.to_string()),
            pod_ips: Some(
                pod.ips
                    .iter()
                    .map(|ip| PodIP { ip: ip.to_string() })
                    .collect(),
            ),
            ..Default::default()
        });
        self.api.create_pod(object);
    }

    /// A pod as kubelet has it just before our plugin runs: its object created
    /// (Pending, no IP yet: the watch leaves it alone) and its sandbox's network up
    /// through the primary CNI; no process in it.
    pub fn sandbox_before_plugin(&self, namespace: &str, name: &str) -> KubePod {
        let uid = self.create_pod_object(namespace, name);
        KubePod {
            pod: self.node.add_pod(name),
            uid,
            namespace: namespace.into(),
            process: None,
        }
    }

    /// Runs our plugin alone on a pod whose network is already up (as the last plugin
    /// of the chain, given the primary's result): the runtime's ADD for the sandbox.
    pub fn plugin_add(&self, pod: &KubePod) -> anyhow::Result<()> {
        let mut conflist = self.node.conflist().clone();
        if let Some(plugins) = conflist["plugins"].as_array_mut() {
            plugins.push(self.plugin_conf());
        }
        let addresses: Vec<_> = pod
            .ips
            .iter()
            .map(|ip| json!({"address": format!("{ip}/{}", if ip.is_ipv4() { 24 } else { 64 })}))
            .collect();
        let prev = json!({"cniVersion": "1.0.0", "ips": addresses});
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.uid
        );
        let inv = Invocation {
            container_id: &pod.netns_name,
            netns: &pod.netns_path,
            ifname: "eth0",
            args: &args,
            hidden: &[],
        };
        cni::add_last(&conflist, &prev, &inv).map(drop)
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
        self.start_sandbox_at(namespace, name, &[])
    }

    /// Like [`Cluster::start_sandbox`], the runtime passing the pod's uid, and with the
    /// addresses pinned to `ips` (one per family) when given, so the control plane can
    /// know them in advance.
    pub fn start_sandbox_at(
        &self,
        namespace: &str,
        name: &str,
        ips: &[std::net::IpAddr],
    ) -> (TestPod, Result<(), String>) {
        let uid = self
            .api
            .pod(namespace, name)
            .and_then(|p| p.metadata.uid)
            .unwrap_or_default();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}"
        );
        let (pod, added) = self.node.add_pod_at(name, self.plugin_conf(), &args, ips);
        if added.is_ok() && self.api.pod(namespace, name).is_some() {
            // Kubelet reports the sandbox's address.
            self.api
                .set_pod_status(namespace, name, "Running", &[pod.ip]);
        }
        (pod, added)
    }

    /// Writes ztunnel's mesh config for `pods` (HBONE workloads, service account named
    /// after the pod), as a control plane pushes it; with `ztunnel`, waits until that
    /// ztunnel has reloaded it.
    pub async fn push_mesh(&self, pods: &[MeshPod<'_>], ztunnel: Option<&Ztunnel>) {
        let reloads = ztunnel.map(|z| z.count(&["local config reloaded"]));
        let mut yaml = String::from("workloads:\n");
        for p in pods {
            let ips: Vec<String> = p.ips.iter().map(|ip| format!("\"{ip}\"")).collect();
            yaml.push_str(&format!(
                "- uid: Kubernetes//Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {name}\n  node: {node}\n  workloadIps: [{ips}]\n  protocol: HBONE\n  services: {{}}\n",
                name = p.name,
                ns = p.namespace,
                node = self.node.node_name(),
                ips = ips.join(", ")
            ));
        }
        self.node.write_mesh_config(&yaml);
        if let (Some(z), Some(n)) = (ztunnel, reloads) {
            z.wait_for(&["local config reloaded"], n + 1).await;
        }
    }

    /// ztunnel number `n` in mesh mode (the node's local config and CA).
    pub fn start_ztunnel_mesh(&self, n: u32) -> Ztunnel {
        Ztunnel::start_mesh(&self.node, n, &[])
    }

    /// Removes the host probe rules and set from the machine's netns (they die with a
    /// reboot; the cluster's drop removes them too).
    pub fn remove_host_probes(&self) {
        self.node.remove_host_probes();
    }

    /// `helm uninstall istio-cni` as the agent sees it: its DaemonSet is gone (an
    /// agent stopped from now on takes the plugin out of the node).
    pub fn uninstall_daemonset(&self) {
        self.api
            .delete_daemonset(AGENT_NAMESPACE, istio_cni::k8s::shutdown::DAEMONSET);
    }

    pub fn start_agent(&self, n: u32) -> AgentProcess {
        self.start_agent_with(n, |_| {})
    }

    /// Like [`Cluster::start_agent`], with a chance to adjust the command.
    pub fn start_agent_with(
        &self,
        n: u32,
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> AgentProcess {
        self.launch_agent(crate::process::agent_command(None), n, adjust)
    }

    /// Starts the agent chrooted in `rootfs` (see [`crate::process::agent_command`]).
    pub fn start_agent_in_rootfs(&self, n: u32, rootfs: &std::path::Path) -> AgentProcess {
        self.launch_agent(crate::process::agent_command(Some(rootfs)), n, |_| {})
    }

    fn launch_agent(
        &self,
        cmd: std::process::Command,
        n: u32,
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> AgentProcess {
        Ztunnel::start_agent(
            cmd,
            &self.node,
            n,
            &self.kubeconfig,
            &self.node_name,
            &self.probe_set,
            adjust,
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
        self.annotation_of(&pod.namespace, &pod.name)
    }

    /// The redirection annotation of the pod object `namespace/name`.
    pub fn annotation_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.api
            .pod(namespace, name)?
            .metadata
            .annotations?
            .get(REDIRECTION)
            .cloned()
    }

    /// Waits until the annotation is `want` (or absent with `None`).
    pub async fn wait_annotation(&self, pod: &KubePod, want: Option<&str>, agent: &AgentProcess) {
        self.wait_annotation_of(&pod.namespace, &pod.name, want, agent)
            .await
    }

    /// [`Cluster::wait_annotation`] by namespace and name.
    pub async fn wait_annotation_of(
        &self,
        namespace: &str,
        name: &str,
        want: Option<&str>,
        agent: &AgentProcess,
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.annotation_of(namespace, name).as_deref() != want {
            assert!(
                Instant::now() < deadline,
                "pod {name} annotation stayed {:?}, expected {want:?}; agent log:\n{}",
                self.annotation_of(namespace, name),
                agent.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn ip_suffix(pod: &TestPod) -> u64 {
    match pod.ip {
        std::net::IpAddr::V4(v4) => u32::from(v4) as u64,
        std::net::IpAddr::V6(v6) => (u128::from(v6) & 0xffff_ffff_ffff) as u64,
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The agent installs host probe rules in the machine's own netns: remove them.
        self.remove_host_probes();
    }
}
