//! A test node: a bridge network and pods (network namespaces) wired by real CNI plugins.

/// Which families a node's pods get addresses in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stack {
    V4,
    Dual,
    V6,
}

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use istio_cni::rules::{Backend, Iptables};
use istio_cni::{AgentConfig, Pod};
use protocol::{Netns, WorkloadUid};
use serde_json::Value;

use crate::cni::{self, Invocation};
use crate::sh;

/// A node: one bridge, a private directory, the host settings it changed. Dropping it
/// deletes the bridge and restores `ip_forward` (the bridge plugin turns it on).
pub struct TestNode {
    pub id: String,
    /// The node's subnet is 10.248.<index>.0/24.
    pub index: u8,
    pub dir: tempfile::TempDir,
    bridge: String,
    conflist: Value,
    ip_forward_before: String,
    /// Sandboxes created so far: each gets its own netns name.
    sandboxes: std::sync::atomic::AtomicU32,
    /// Directories CNI plugins must not see (see [`TestNode::hide_from_plugins`]).
    hidden: std::sync::Mutex<Vec<PathBuf>>,
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl TestNode {
    /// `index` (1–250) keeps concurrently running tests on different subnets.
    pub fn new(index: u8) -> TestNode {
        Self::build(index, false, Stack::V4)
    }

    /// A node whose bridge has the gateway address (.1), so the host itself reaches
    /// the pods (as kubelet's probes do).
    pub fn with_gateway(index: u8) -> TestNode {
        Self::build(index, true, Stack::V4)
    }

    /// A node whose pods get an IPv4 and an IPv6 address (`fd00:248:<index>::/64`,
    /// host-local's second range), optionally with the gateway on the bridge.
    pub fn dual_stack(index: u8, gateway: bool) -> TestNode {
        Self::build(index, gateway, Stack::Dual)
    }

    /// A node whose pods get only an IPv6 address.
    pub fn ipv6_only(index: u8, gateway: bool) -> TestNode {
        Self::build(index, gateway, Stack::V6)
    }

    fn build(index: u8, gateway: bool, stack: Stack) -> TestNode {
        crate::require_root();
        let id = format!("{index}{}", std::process::id() % 100_000);
        let dir = tempfile::Builder::new()
            .prefix("ztunnel-e2e-")
            .tempdir()
            .expect("temp dir");
        let bridge = format!("ztbr{id}");
        let v4 = format!("10.248.{index}.0/24");
        let v6 = format!("fd00:248:{index}::/64");
        let subnets: Vec<&str> = match stack {
            Stack::V4 => vec![&v4],
            Stack::Dual => vec![&v4, &v6],
            Stack::V6 => vec![&v6],
        };
        let mut conflist = cni::bridge_conflist(
            &format!("e2e-{id}"),
            &bridge,
            &subnets,
            &dir.path().join("ipam"),
        );
        conflist["plugins"][0]["isGateway"] = serde_json::json!(gateway);
        if stack != Stack::V4 {
            // The bridge made in advance, with duplicate address detection off, so its
            // IPv6 gateway address is usable at once (the bridge plugin reuses it).
            sh("ip", &["link", "add", &bridge, "type", "bridge"]);
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{bridge}/accept_dad"), "0");
            sh("ip", &["link", "set", &bridge, "up"]);
        }
        let ip_forward_before = std::fs::read_to_string(IP_FORWARD).unwrap_or_default();
        TestNode {
            id,
            index,
            dir,
            bridge,
            conflist,
            ip_forward_before,
            sandboxes: Default::default(),
            hidden: Default::default(),
        }
    }

    /// From now on, CNI plugins run in a private mount namespace where `dir` is an
    /// empty directory: what a container runtime on the host sees of a path that only
    /// exists inside the agent's container.
    pub fn hide_from_plugins(&self, dir: PathBuf) {
        self.hidden
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir);
    }

    /// An address on the node's subnet (host-local hands out .2 upwards; tests pin
    /// higher ones with `IP=` in `CNI_ARGS`).
    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::from([10, 248, self.index, host])
    }

    /// An IPv6 address on the node's IPv6 subnet (`fd00:248:<index>::<host>`).
    pub fn ip6(&self, host: u16) -> IpAddr {
        format!("fd00:248:{}::{host:x}", self.index)
            .parse()
            .expect("an IPv6 address")
    }

    /// Where the agent serves ZDS and ztunnel connects.
    pub fn zds_socket(&self) -> PathBuf {
        self.dir.path().join("ztunnel.sock")
    }

    /// The prefix of the node's host probe sets (`<prefix>-v4`, `-v6`), which the
    /// agent keeps to its captured pods' IPs in the machine's netns; the node's drop
    /// removes them.
    pub fn probe_set(&self) -> String {
        format!("zt-e2e-{}", self.id)
    }

    /// Removes the node's host probe rules and sets from the machine's netns (an
    /// agent leaves them, as it does on a real node across restarts).
    pub fn remove_host_probes(&self) {
        let Ok(host) = protocol::Netns::current() else {
            return;
        };
        let iptables = Iptables {
            backend: Backend::detect().unwrap_or(Backend::Nft),
            lock_wait: Duration::from_secs(5),
        };
        for family in istio_cni::rules::Family::ALL {
            let probes = istio_cni::rules::hostprobe::HostProbes::new(
                &istio_cni::rules::RuleConfig::default(),
                iptables.clone(),
                family,
                &self.probe_set(),
            );
            let _ = probes.uninstall(&host);
        }
    }

    /// The agent configuration for this node (backend matching the host): the ZDS
    /// socket in the node's directory, the node's host probe set, its metrics and
    /// debug endpoints on free loopback ports.
    pub fn agent_config(&self) -> AgentConfig {
        let iptables = Iptables {
            backend: Backend::detect().expect("an iptables backend"),
            lock_wait: Duration::from_secs(5),
        };
        let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        AgentConfig {
            host_probe_set: Some(self.probe_set()),
            monitoring_addr: Some(any_port),
            debug_addr: Some(any_port),
            ..AgentConfig::new(self.zds_socket(), iptables)
        }
    }

    /// Starts a pod through a chain that ends with `plugin` (our `istio-cni`), with
    /// `args` as `CNI_ARGS`. The pod comes back even when ADD failed (the error is
    /// what the chain printed), so that dropping it cleans up.
    pub fn add_pod_via_chain(
        &self,
        name: &str,
        plugin: serde_json::Value,
        args: &str,
    ) -> (TestPod, Result<(), String>) {
        self.add_pod_at(name, plugin, args, &[])
    }

    /// Like [`TestNode::add_pod_via_chain`], the sandbox getting exactly `ips` (one per
    /// family: host-local's `args.cni.ips`), so the control plane can know them first.
    pub fn add_pod_at(
        &self,
        name: &str,
        plugin: serde_json::Value,
        args: &str,
        ips: &[IpAddr],
    ) -> (TestPod, Result<(), String>) {
        let mut conflist = self.conflist.clone();
        if !ips.is_empty() {
            let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
            conflist["plugins"][0]["args"] = serde_json::json!({"cni": {"ips": ips}});
        }
        if let Some(plugins) = conflist["plugins"].as_array_mut() {
            plugins.push(plugin);
        }
        self.add_pod_with_conflist(name, conflist, args)
    }

    /// The node's network config (bridge + host-local), as a primary CNI installs it.
    pub fn conflist(&self) -> &Value {
        &self.conflist
    }

    /// Starts a pod through `conflist` (e.g. the one install-cni wrote), as a runtime
    /// would, with `args` as `CNI_ARGS`.
    pub fn add_pod_with_conflist(
        &self,
        name: &str,
        conflist: Value,
        args: &str,
    ) -> (TestPod, Result<(), String>) {
        let n = self
            .sandboxes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let netns_name = format!("zt{}-{n}-{name}", self.id);
        sh("ip", &["netns", "add", &netns_name]);
        // No duplicate address detection in the pod: its IPv6 address is usable as
        // soon as the CNI plugins return (a runtime would wait for it).
        for conf in ["all", "default"] {
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &netns_name,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{conf}.accept_dad=0"),
                ],
            );
        }
        let mut pod = TestPod {
            name: name.to_string(),
            node: self.node_name(),
            uid: WorkloadUid::new(format!("{}-{name}-uid", self.id)),
            netns_path: PathBuf::from("/var/run/netns").join(&netns_name),
            netns_name,
            ip: IpAddr::from([0, 0, 0, 0]),
            ips: Vec::new(),
            conflist,
            args: args.to_string(),
            hidden: self
                .hidden
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            gone: false,
        };
        let result = cni::add(&cni::loopback_conflist(), &pod.invocation("lo"))
            .and_then(|_| cni::add(&pod.conflist, &pod.invocation("eth0")));
        match result {
            Ok(r) => {
                pod.ips = cni::all_ips(&r);
                pod.ip = *pod.ips.first().expect("pod IP");
                (pod, Ok(()))
            }
            Err(e) => (pod, Err(e.to_string())),
        }
    }

    /// Starts a pod: a netns, then the loopback and bridge plugins, as a runtime would.
    pub fn add_pod(&self, name: &str) -> TestPod {
        let (pod, added) = self.add_pod_with_conflist(name, self.conflist.clone(), "");
        if let Err(e) = added {
            panic!("CNI ADD for {name}: {e}");
        }
        pod
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.remove_host_probes();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
        if !self.ip_forward_before.is_empty() {
            let _ = std::fs::write(IP_FORWARD, &self.ip_forward_before);
        }
    }
}

/// A pod: its netns, address and identity. Dropping it runs CNI DEL and deletes the netns.
pub struct TestPod {
    pub name: String,
    /// The node it runs on, as ztunnel's `NODE_NAME` names it.
    pub node: String,
    pub uid: WorkloadUid,
    pub netns_name: String,
    pub netns_path: PathBuf,
    /// Its first address (IPv4 on a dual-stack node).
    pub ip: IpAddr,
    /// All its addresses, IPv4 first.
    pub ips: Vec<IpAddr>,
    conflist: Value,
    args: String,
    hidden: Vec<PathBuf>,
    /// Its netns was destroyed without a CNI DEL ([`TestPod::vanish`]).
    gone: bool,
}

impl TestPod {
    fn invocation(&self, ifname: &'static str) -> Invocation<'_> {
        Invocation {
            container_id: &self.netns_name,
            netns: &self.netns_path,
            ifname,
            args: &self.args,
            hidden: &self.hidden,
        }
    }

    /// Its IPv6 address, on a dual-stack or IPv6-only node.
    pub fn ip6(&self) -> Option<IpAddr> {
        self.ips.iter().copied().find(IpAddr::is_ipv6)
    }

    /// The sandbox's container id, as the runtime passes it (`CNI_CONTAINERID`).
    pub fn container_id(&self) -> &str {
        &self.netns_name
    }

    /// The netns is destroyed the way a node reboot destroys it: no CNI DEL runs.
    pub fn vanish(&mut self) {
        self.gone = true;
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns_name])
            .status();
    }

    /// The host-side end of the pod's `eth0` (the veth the bridge plugin made).
    pub fn host_veth(&self) -> String {
        // `eth0@ifN`: N is the peer's ifindex in the host netns.
        let link = self.exec(&["ip", "-o", "link", "show", "eth0"]);
        let peer: u32 = link
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.split("@if").nth(1))
            .and_then(|i| i.trim_end_matches(':').parse().ok())
            .unwrap_or_else(|| panic!("no veth peer in {link:?}"));
        let host = sh("ip", &["-o", "link", "show"]);
        host.lines()
            .find(|l| l.starts_with(&format!("{peer}: ")))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(|n| {
                n.trim_end_matches(':')
                    .split('@')
                    .next()
                    .unwrap_or(n)
                    .to_string()
            })
            .unwrap_or_else(|| panic!("no host interface {peer}"))
    }

    pub fn netns(&self) -> Netns {
        Netns::open(&self.netns_path).expect("pod netns")
    }

    /// The pod as the agent's enrollment API takes it.
    pub fn pod(&self) -> Pod {
        Pod {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: "ambient-demo".into(),
            service_account: self.name.clone(),
            netns_path: self.netns_path.clone(),
            ips: self.ips.clone(),
            container_id: Some(self.netns_name.clone()),
        }
    }

    /// Runs a command inside the pod's netns (`ip netns exec`), returning stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.netns_name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Runs a command inside the pod's netns with `input` on its stdin; stdout.
    pub fn exec_with_input(&self, args: &[&str], input: &str) -> String {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns_name]).args(args);
        crate::output(&mut cmd, Some(input)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ss -ntlp` rows as (port, process) pairs.
    pub fn listening(&self) -> Vec<(u16, String)> {
        crate::observe::listeners(&self.exec(&["ss", "-ntlpH"]))
            .into_iter()
            .map(|(port, process)| (port, process.to_string()))
            .collect()
    }

    /// Ports listening in the pod whose owner process line mentions `process`.
    pub fn ports_of(&self, process: &str) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .listening()
            .into_iter()
            .filter(|(_, p)| p.contains(process))
            .map(|(port, _)| port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Deletes the outbound redirect (`-A ISTIO_OUTPUT … --to-ports 15001`) by hand, as
    /// someone with a shell in the pod could; returns the rule as `iptables-save`
    /// shows it, without the `-A `.
    pub fn delete_outbound_redirect(&self) -> String {
        let rule = self
            .iptables_save()
            .lines()
            .find(|l| l.starts_with("-A ISTIO_OUTPUT") && l.ends_with("--to-ports 15001"))
            .expect("the outbound redirect")
            .trim_start_matches("-A ")
            .to_string();
        let mut delete = vec!["iptables", "-t", "nat", "-D"];
        delete.extend(rule.split_whitespace());
        self.exec(&delete);
        rule
    }

    /// Deletes the IPv4 policy route (`local 0.0.0.0/0 dev lo table 100`) by hand.
    pub fn delete_policy_route(&self) {
        self.exec(&[
            "ip",
            "route",
            "del",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ]);
    }

    /// `iptables-save` inside the pod, comment lines dropped and counters zeroed.
    pub fn iptables_save(&self) -> String {
        normalize_save(&self.exec(&["iptables-save"]))
    }

    /// `ip6tables-save` inside the pod, normalized the same way.
    pub fn ip6tables_save(&self) -> String {
        normalize_save(&self.exec(&["ip6tables-save"]))
    }

    /// The pod's ip rules at our priority and its table-100 routes (IPv4).
    pub fn policy_routing(&self) -> String {
        self.exec(&["ip", "rule", "show", "pref", "32764"])
            + &self.exec(&["ip", "route", "show", "table", "100"])
    }

    /// The same for IPv6.
    pub fn policy_routing6(&self) -> String {
        self.exec(&["ip", "-6", "rule", "show", "pref", "32764"])
            + &self.exec(&["ip", "-6", "route", "show", "table", "100"])
    }
}

impl Drop for TestPod {
    fn drop(&mut self) {
        if self.gone {
            return;
        }
        let _ = cni::del(&self.conflist, &self.invocation("eth0"));
        let _ = cni::del(&cni::loopback_conflist(), &self.invocation("lo"));
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns_name])
            .status();
    }
}

/// Drops `#` lines and zeroes `[packets:bytes]` counters of an iptables-save dump.
pub fn normalize_save(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
