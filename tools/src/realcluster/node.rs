//! A worker node: a network namespace (its address on the cluster network) and a
//! mount namespace of its own, in which the node's paths are private: `/etc`, `/opt`
//! and `/var/lib` are overlays of the host's (so `/etc/cni/net.d`, `/opt/cni/bin` and
//! the runtime's `/var/lib/cni` are the node's, where the charts' defaults point, and
//! the host's stay untouched), `/run` and `/var/log` are the node's own. The cluster's
//! root directory is outside those paths (containerd's overlay snapshots cannot live
//! on an overlay). In it run Debian's containerd (with runc and the
//! CRI, calling the CNI chain in `/etc/cni/net.d`) and a real kubelet, registered
//! under the node's name with a client certificate and serving the API server with a
//! certificate the API server verifies.
//!
//! The mount namespace is held by a `sleep` process (the "holder"); every process of
//! the node is started inside it (`nsenter`), so its mounts disappear with the node's
//! last process and nothing of them reaches the host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::pki::{kubeconfig, CertSpec, Usage};
use super::{
    controlplane, daemon, wait_for, Components, Error, Layout, NodeSpec, Result, CLUSTER_DOMAIN,
    DNS_SERVICE_IP, HOST_IP,
};

/// The CNI plugins of the node's primary network, from Debian's
/// containernetworking-plugins.
pub const CNI_PLUGINS: [&str; 4] = ["bridge", "host-local", "loopback", "portmap"];
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// The primary network's config list, as a CNI-provider installs it.
pub const CONFLIST: &str = "10-ambient-bridge.conflist";

/// A running node: its spec, its directory and the holder of its mount namespace.
#[derive(Clone, Debug)]
pub struct Node {
    pub spec: NodeSpec,
    pub dir: PathBuf,
    pub holder: u32,
}

/// The node's primary CNI configuration: a bridge with host-local addresses from the
/// node's range, the node as gateway, no masquerade (nothing leaves the machine),
/// and portmap, as a simple CNI provider installs it.
pub fn conflist(node: &NodeSpec, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ambient-bridge",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{ "subnet": node.pod_cidr() }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    })
    .to_string()
}

/// containerd's configuration for the node: its state in the node's directory, the
/// CRI with runc under cgroupfs (the machine has cgroups v1 and no systemd), the
/// node's CNI directories, and the sandbox image that was imported (there is no
/// registry). Without CAP_SYS_RESOURCE nothing may lower an `oom_score_adj`, so the
/// CRI clamps the kubelet's requests to containerd's own.
pub fn containerd_config(dir: &Path, pause_image: &str) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#,
        root = dir.join("containerd").display(),
    )
}

/// The kubelet's configuration: webhook authentication and authorization against
/// the API server, cgroupfs under a cgroup root of the node's own (two kubelets
/// share the machine's hierarchies), cgroups v1 accepted (kubelet 1.35 and later
/// refuse it otherwise), cluster DNS at CoreDNS's service address, and no image
/// garbage collection or disk eviction (images cannot be pulled again here).
pub fn kubelet_config(node: &NodeSpec, dir: &Path, ca: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{ip}"
port: 10250
readOnlyPort: 0
healthzBindAddress: "127.0.0.1"
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: "{ca}"
authorization:
  mode: Webhook
tlsCertFile: "{dir}/kubelet-server.crt"
tlsPrivateKeyFile: "{dir}/kubelet-server.key"
rotateCertificates: false
serverTLSBootstrap: false
cgroupDriver: cgroupfs
cgroupRoot: "/{cgroup}"
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
containerRuntimeEndpoint: "unix://{socket}"
clusterDNS: ["{dns}"]
clusterDomain: "{domain}"
resolvConf: "{dir}/resolv.conf"
staticPodPath: ""
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
"#,
        ip = node.ip(),
        ca = ca.display(),
        dir = dir.display(),
        cgroup = node.netns(),
        socket = CONTAINERD_SOCKET,
        dns = DNS_SERVICE_IP,
        domain = CLUSTER_DOMAIN,
    )
}

/// The script the holder runs in the node's new mount namespace before it sleeps.
/// Mounts made afterwards are shared within the node (containers' `HostToContainer`
/// and `Bidirectional` mounts need that) and never reach the host (the namespace is
/// a slave of the host's).
pub fn holder_script(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "set -e
mount --make-rslave /
for p in etc opt var/lib; do
  q=$(echo $p | tr / -)
  mkdir -p {d}/$q.upper {d}/$q.work
  mount -t overlay ambk-$q -o lowerdir=/$p,upperdir={d}/$q.upper,workdir={d}/$q.work /$p
done
mkdir -p /etc/cni/net.d /opt/cni/bin
mount --bind {d}/cni-conf /etc/cni/net.d
mount --bind {d}/cni-bin /opt/cni/bin
mount -t tmpfs -o mode=0755 ambk-run /run
mount --bind {d}/log /var/log
mount --make-rshared /
touch {d}/holder.ready
# PID 1 of the node: orphans are reparented here, and an ignored SIGCHLD has the
# kernel reap them.
trap '' CHLD
exec sleep infinity
"
    )
}

/// `cmd` run inside the node's namespaces (network, mount and PID: `nsenter` forks
/// it into the node's PID namespace and waits for it).
pub fn in_node(holder: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg("--target")
        .arg(holder.to_string())
        .args(["--mount", "--net", "--pid", "--"])
        .arg(program);
    cmd
}

/// The cgroup v1 hierarchies (the kubelet wants its root in every one, the named
/// `name=systemd` one too; cgroup2 is not used on a v1 machine).
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

fn mkdirs(dirs: &[PathBuf]) -> Result<()> {
    for d in dirs {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Brings node `spec` up (its network namespace must exist): files, credentials,
/// the mount namespace, containerd, the images, then the kubelet.
pub fn start(
    layout: &Layout,
    components: &Components,
    creds: &controlplane::Credentials,
    spec: &NodeSpec,
    images: &[PathBuf],
    pause_image: &str,
) -> Result<Node> {
    let dir = layout.node(spec);
    write_files(spec, &dir, creds, pause_image)?;
    for h in cgroup_hierarchies() {
        let d = h.join(spec.netns());
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let holder = start_holder(layout, spec, &dir)?;
    start_containerd(layout, spec, &dir, holder, images)?;
    let node = Node {
        spec: spec.clone(),
        dir,
        holder,
    };
    start_kubelet(layout, components, &node)?;
    Ok(node)
}

/// Starts the node's kubelet.
pub fn start_kubelet(layout: &Layout, components: &Components, node: &Node) -> Result<()> {
    let (spec, dir) = (&node.spec, &node.dir);
    let mut kubelet = in_node(node.holder, components.bin("kubelet")?);
    kubelet
        .arg("--config")
        .arg(dir.join("kubelet.yaml"))
        .arg("--kubeconfig")
        .arg(dir.join("kubelet.kubeconfig"))
        .arg("--root-dir")
        .arg(dir.join("kubelet"))
        .arg("--cert-dir")
        .arg(dir.join("kubelet/pki"))
        .args(["--hostname-override", &spec.name])
        .args(["--node-ip", &spec.ip().to_string()]);
    daemon::spawn(layout, &format!("{}-kubelet", spec.name), kubelet).map(drop)
}

/// `systemctl restart kubelet`: the kubelet stopped (SIGTERM) and started again;
/// containers and the runtime keep running.
pub fn restart_kubelet(layout: &Layout, components: &Components, node: &Node) -> Result<()> {
    daemon::stop(layout, &format!("{}-kubelet", node.spec.name))?;
    start_kubelet(layout, components, node)
}

/// `systemctl restart containerd`: the runtime stopped (SIGTERM) and started again;
/// containers keep running under their shims, and the kubelet reconnects.
pub fn restart_containerd(layout: &Layout, node: &Node) -> Result<()> {
    daemon::stop(layout, &format!("{}-containerd", node.spec.name))?;
    start_containerd(layout, &node.spec, &node.dir, node.holder, &[])
}

/// A node's power cut and reboot. Every process of the node dies at once (daemons,
/// shims, every pod's processes); what dies with the kernel goes too: the node's
/// `/run` (containerd's state, the pods' network namespaces, the agents' sockets),
/// every netfilter rule, ipset and conntrack entry of the node's network namespace,
/// and the pods' bridge. What is on disk stays: `/etc` (the CNI config list, with the
/// plugin if it was there), `/opt/cni/bin`, `/var/lib`, containerd's images and the
/// kubelet's state. Then the node starts as a node boots: containerd, then the kubelet,
/// which starts every pod again in new sandboxes. Returns the node's new state.
pub fn power_cycle(layout: &Layout, components: &Components, node: &Node) -> Result<Node> {
    let spec = &node.spec;
    super::teardown::kill_node(spec)?;
    super::teardown::reap();
    let ns = spec.netns();
    let reset = "nft flush ruleset 2>/dev/null; \
         for t in raw mangle nat filter security; do \
           for x in iptables-legacy ip6tables-legacy; do $x -t $t -F 2>/dev/null; $x -t $t -X 2>/dev/null; done; \
         done; \
         ipset destroy 2>/dev/null; conntrack -F 2>/dev/null; \
         ip link del cni0 2>/dev/null; true";
    super::run(
        &format!("resetting {}'s kernel state", spec.name),
        Command::new("ip").args(["netns", "exec", &ns, "sh", "-c", reset]),
    )?;
    let _ = std::fs::remove_file(node.dir.join("holder.ready"));
    let holder = start_holder(layout, spec, &node.dir)?;
    start_containerd(layout, spec, &node.dir, holder, &[])?;
    let booted = Node {
        spec: spec.clone(),
        dir: node.dir.clone(),
        holder,
    };
    start_kubelet(layout, components, &booted)?;
    Ok(booted)
}

/// The node's directory: its CNI plugins and config, containerd's and the kubelet's
/// configuration, and the kubelet's certificates (client, as `system:node:<name>`;
/// serving, for its address) with its kubeconfig.
fn write_files(
    spec: &NodeSpec,
    dir: &Path,
    creds: &controlplane::Credentials,
    pause_image: &str,
) -> Result<()> {
    mkdirs(&[
        dir.join("cni-conf"),
        dir.join("cni-bin"),
        dir.join("ipam"),
        dir.join("log"),
        dir.join("kubelet"),
    ])?;
    for plugin in CNI_PLUGINS {
        let from = Path::new(DEBIAN_CNI_DIR).join(plugin);
        let to = dir.join("cni-bin").join(plugin);
        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
    }
    write(
        &dir.join("cni-conf").join(CONFLIST),
        &conflist(spec, &dir.join("ipam")),
    )?;
    write(
        &dir.join("containerd.toml"),
        &containerd_config(dir, pause_image),
    )?;
    // Pods that ask for the node's DNS (CoreDNS itself) get a resolver that answers
    // nothing: no name outside the cluster resolves, and none leaves the machine.
    write(&dir.join("resolv.conf"), &format!("nameserver {HOST_IP}\n"))?;
    write(
        &dir.join("kubelet.yaml"),
        &kubelet_config(spec, dir, &creds.ca.cert_path()),
    )?;
    let user = format!("system:node:{}", spec.name);
    let client = creds.ca.issue(&CertSpec::client(
        &format!("{}-kubelet-client", spec.name),
        &user,
        &["system:nodes"],
    ))?;
    let server = creds.ca.issue(&CertSpec::server(
        &format!("{}-kubelet-server", spec.name),
        &[&spec.name],
        &[spec.ip().into()],
        Usage::Server,
    ))?;
    for (from, to) in [
        (&server.cert, "kubelet-server.crt"),
        (&server.key, "kubelet-server.key"),
    ] {
        std::fs::copy(from, dir.join(to)).map_err(|e| Error::io(from, e))?;
    }
    write(
        &dir.join("kubelet.kubeconfig"),
        &kubeconfig(
            &controlplane::api_url(),
            creds.ca.cert_pem(),
            &user,
            &client,
        ),
    )
}

/// Starts the holder of the node's mount namespace; its pid once the node's mounts
/// are in place.
fn start_holder(layout: &Layout, spec: &NodeSpec, dir: &Path) -> Result<u32> {
    let name = format!("{}-holder", spec.name);
    let mut holder = Command::new("nsenter");
    // A PID namespace of the node's own, as a machine has: PID 1 in the node's
    // network namespace (Istio's agent finds the node's netns as /proc/1/ns/net), and
    // a /proc showing only the node's processes.
    holder
        .arg(format!("--net=/run/netns/{}", spec.netns()))
        .args(["--", "unshare", "--mount", "--propagation", "slave"])
        .args(["--pid", "--fork", "--mount-proc"])
        .args(["sh", "-c", &holder_script(dir)]);
    let pid = daemon::spawn(layout, &name, holder)?;
    wait_for(
        &format!("{}'s mount namespace", spec.name),
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            if dir.join("holder.ready").exists() {
                Ok(())
            } else if !daemon::alive(pid) {
                Err(daemon::log_tail(layout, &name, 5))
            } else {
                Err("not yet".into())
            }
        },
    )?;
    // `unshare` forks the node's PID 1 and waits for it: the namespaces to enter are
    // that child's.
    let children = format!("/proc/{pid}/task/{pid}/children");
    let init = std::fs::read_to_string(&children)
        .map_err(|e| Error::io(Path::new(&children), e))?
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| Error::Setup(format!("{}: no PID 1 under unshare {pid}", spec.name)))?;
    Ok(init)
}

/// `ctr` in the node, on the CRI's namespace of its containerd.
fn ctr(holder: u32, args: &[&str]) -> Command {
    let mut cmd = in_node(holder, "ctr");
    cmd.args(["--address", CONTAINERD_SOCKET, "--namespace", "k8s.io"])
        .args(args);
    cmd
}

/// Gives image `from` a second name `to` in the node's containerd, as pushing a new
/// tag to a registry would (same content, a new reference for the pods to ask for).
pub fn tag_image(node: &Node, from: &str, to: &str) -> Result<()> {
    super::run(
        &format!("tagging {from} as {to} on {}", node.spec.name),
        &mut ctr(node.holder, &["images", "tag", "--force", from, to]),
    )
    .map(drop)
}

/// Starts the node's containerd and imports `images` into it (the CRI's namespace).
fn start_containerd(
    layout: &Layout,
    spec: &NodeSpec,
    dir: &Path,
    holder: u32,
    images: &[PathBuf],
) -> Result<()> {
    let mut containerd = in_node(holder, "containerd");
    containerd.arg("--config").arg(dir.join("containerd.toml"));
    daemon::spawn(layout, &format!("{}-containerd", spec.name), containerd)?;
    let ctr = |args: &[&str]| ctr(holder, args);
    wait_for(
        &format!("{}'s containerd", spec.name),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || e2e::output(&mut ctr(&["version"]), None),
    )?;
    for archive in images {
        let mut import = ctr(&["images", "import"]);
        import.arg(archive);
        super::run(
            &format!(
                "importing {} into {}'s containerd",
                archive.display(),
                spec.name
            ),
            &mut import,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_network_gives_the_node_range_and_never_masquerades() {
        let node = NodeSpec::worker("ambient", 2);
        let conf: serde_json::Value =
            serde_json::from_str(&conflist(&node, Path::new("/x/ipam"))).unwrap();
        let bridge = &conf["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.2.0/24");
        assert_eq!(bridge["ipam"]["dataDir"], "/x/ipam");
    }

    #[test]
    fn the_kubelet_accepts_cgroups_v1_under_its_own_root_and_never_collects_images() {
        let node = NodeSpec::worker("ambient", 1);
        let text = kubelet_config(&node, Path::new("/n"), Path::new("/pki/ca.crt"));
        let doc: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(doc["failCgroupV1"], false);
        assert_eq!(doc["cgroupRoot"], "/ambk-w1");
        assert_eq!(doc["cgroupDriver"], "cgroupfs");
        assert_eq!(doc["imageGCHighThresholdPercent"], 100);
        assert_eq!(doc["address"], "172.30.0.11");
        assert_eq!(doc["clusterDNS"][0], "10.96.0.10");
        assert_eq!(doc["authorization"]["mode"], "Webhook");
    }

    #[test]
    fn containerd_restricts_oom_scores_and_uses_the_nodes_cni_dirs() {
        let text = containerd_config(Path::new("/n"), "localhost/k8s/pause:3.10");
        assert!(text.contains("restrict_oom_score_adj = true"));
        assert!(text.contains(r#"sandbox_image = "localhost/k8s/pause:3.10""#));
        assert!(text.contains(r#"conf_dir = "/etc/cni/net.d""#));
        assert!(text.contains(r#"root = "/n/containerd""#));
        assert!(text.contains("SystemdCgroup = false"));
    }
}
