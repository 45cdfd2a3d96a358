//! The kubelet probe path, over each address family: the node's probe rules SNAT its
//! connections to enrolled pods to 169.254.7.127 (IPv6:
//! fd16:9254:7127:1337:ffff:ffff:ffff:ffff), which the pod's redirection passes
//! straight to the app. Runs on a private "node" netns wired to a pod netns by a veth,
//! so the machine's own tables are never touched. Root only.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use e2e::sh;
use istio_cni::rules::hostprobe::HostProbes;
use istio_cni::rules::{Applied, Family, Redirection, RuleConfig};
use protocol::{Netns, WorkloadUid};

/// Two netns, "node" and "pod", joined by a veth; deleted on drop.
struct Wired {
    node: String,
    pod: String,
}

impl Wired {
    fn new() -> Wired {
        e2e::require_root();
        let id = std::process::id() % 100_000;
        let (node, pod) = (format!("zt{id}-node"), format!("zt{id}-probed"));
        let wired = Wired { node, pod };
        for ns in [&wired.node, &wired.pod] {
            sh("ip", &["netns", "add", ns]);
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        sh(
            "ip",
            &[
                "-n",
                &wired.node,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &wired.pod,
            ],
        );
        sh(
            "ip",
            &[
                "-n",
                &wired.node,
                "addr",
                "add",
                "10.251.0.1/24",
                "dev",
                "eth0",
            ],
        );
        sh(
            "ip",
            &[
                "-n",
                &wired.pod,
                "addr",
                "add",
                "10.251.0.2/24",
                "dev",
                "eth0",
            ],
        );
        for (ns, addr) in [
            (&wired.node, "fd00:251::1/64"),
            (&wired.pod, "fd00:251::2/64"),
        ] {
            sh(
                "ip",
                &["-n", ns, "addr", "add", addr, "dev", "eth0", "nodad"],
            );
        }
        for ns in [&wired.node, &wired.pod] {
            sh("ip", &["-n", ns, "link", "set", "eth0", "up"]);
        }
        sh(
            "ip",
            &[
                "-n",
                &wired.pod,
                "route",
                "add",
                "default",
                "via",
                "10.251.0.1",
            ],
        );
        sh(
            "ip",
            &[
                "-n",
                &wired.pod,
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd00:251::1",
            ],
        );
        wired
    }

    fn netns(name: &str) -> Netns {
        Netns::open(&PathBuf::from("/var/run/netns").join(name)).unwrap()
    }
}

impl Drop for Wired {
    fn drop(&mut self) {
        for ns in [&self.node, &self.pod] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

/// Connects from `from` to `dst` and returns the peer address the server reported.
fn probe(from: &Netns, dst: SocketAddr) -> std::io::Result<String> {
    from.run(|| {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_millis(700))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?
}

#[test]
fn probes_from_the_node_reach_an_enrolled_pods_app_only_through_the_probe_set() {
    let wired = Wired::new();
    let (node, pod) = (Wired::netns(&wired.node), Wired::netns(&wired.pod));
    let iptables = istio_cni::rules::Iptables {
        backend: istio_cni::rules::Backend::detect().unwrap(),
        lock_wait: Duration::from_secs(5),
    };
    let cfg = RuleConfig::default();
    Redirection::new(cfg.clone(), iptables.clone(), &Family::ALL)
        .apply(&pod)
        .unwrap();

    // The app, on both families: tells each client the address it sees.
    let listener = pod
        .run(|| -> std::io::Result<TcpListener> {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 8080)).into())?;
            s.listen(16)?;
            Ok(s.into())
        })
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let peer = s
                .peer_addr()
                .map(|p| p.ip().to_canonical().to_string())
                .unwrap_or_default();
            let _ = s.write_all(peer.as_bytes());
        }
    });

    for (family, pod_ip, probe_source) in [
        (Family::V4, "10.251.0.2", "169.254.7.127"),
        (
            Family::V6,
            "fd00:251::2",
            "fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
        ),
    ] {
        let pod_ip: IpAddr = pod_ip.parse().unwrap();
        let app = SocketAddr::new(pod_ip, 8080);
        // Enrolled pod, no probe rules: the node's connection is captured (and no
        // ztunnel listens), so it fails.
        assert!(
            probe(&node, app).is_err(),
            "{family}: a node connection bypassed the pod's capture"
        );

        let probes = HostProbes::new(&cfg, iptables.clone(), family, "zt-e2e-probes");
        assert_eq!(probes.install(&node).unwrap(), Applied::Changed);
        assert_eq!(
            probes.install(&node).unwrap(),
            Applied::Unchanged,
            "install is idempotent"
        );
        let uid = WorkloadUid::new("pod-uid-1");
        probes.add(&node, &uid, pod_ip).unwrap();
        assert_eq!(
            probe(&node, app).expect("probe through the set"),
            probe_source
        );

        // A stale pod that once had this IP cannot remove it; the owner can.
        assert!(!probes
            .remove(&node, &WorkloadUid::new("old-pod"), pod_ip)
            .unwrap());
        assert_eq!(probe(&node, app).expect("still there"), probe_source);
        assert!(probes.remove(&node, &uid, pod_ip).unwrap());
        assert!(probe(&node, app).is_err());

        // sync converges to exactly the wanted members of its family.
        let stale: IpAddr = match family {
            Family::V4 => "10.251.0.99".parse().unwrap(),
            Family::V6 => "fd00:251::99".parse().unwrap(),
        };
        let want = BTreeMap::from([
            (pod_ip, uid.clone()),
            ("10.9.9.9".parse().unwrap(), WorkloadUid::new("v4-only")),
            ("fd00:9::9".parse().unwrap(), WorkloadUid::new("v6-only")),
        ]);
        probes.add(&node, &WorkloadUid::new("gone"), stale).unwrap();
        probes.sync(&node, &want).unwrap();
        let members = probes.members(&node).unwrap();
        assert_eq!(members.len(), 2, "{family}: {members:?}");
        assert_eq!(members[&pod_ip], "pod-uid-1");

        probes.uninstall(&node).unwrap();
        let save_cmd = match family {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        };
        let save = sh("ip", &["netns", "exec", &wired.node, save_cmd]);
        assert!(!save.contains("ISTIO_POSTRT"), "{save}");
        let sets = sh("ip", &["netns", "exec", &wired.node, "ipset", "list", "-n"]);
        assert!(!sets.contains("zt-e2e-probes"), "{sets}");
    }
}
