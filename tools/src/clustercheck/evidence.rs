//! What the checks read to decide: packet captures on the nodes' links, the nodes'
//! CNI configuration, pods' logs and addresses, istioctl's and ztunnel's views, and a
//! sampler that watches a piece of node state while something else happens.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ISTIO_NS;
use crate::incluster::{Kubectl, NAMESPACE};
use crate::realcluster::{self, NodeSpec, NET_NS};

/// A tcpdump on a node's link to the other nodes, taken in the switch's namespace:
/// what crosses between the nodes, as an operator would capture it, and still
/// running while the node itself restarts.
pub struct NodeCapture {
    capture: e2e::capture::Capture,
    file: PathBuf,
}

pub fn capture(node: &NodeSpec, filter: &str, dir: &Path, name: &str) -> NodeCapture {
    let _ = std::fs::create_dir_all(dir);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", NET_NS, "tcpdump", "-i", &node.uplink()]);
    let label = format!("{}-{name}", node.name);
    NodeCapture {
        capture: e2e::capture::Capture::start(cmd, &label, filter, dir),
        file: dir.join(format!("{label}.pcap")),
    }
}

/// The packets of a stopped capture (`tcpdump -nn` lines with an IP header) and
/// whether their contents hold an HTTP request or answer in the clear.
fn read(c: NodeCapture) -> (PathBuf, Vec<String>, Option<&'static str>) {
    let file = c.file.clone();
    let captured = c.capture.stop();
    let packets = captured
        .packets
        .lines()
        .filter(|l| l.contains(" IP "))
        .map(str::to_string)
        .collect();
    let plaintext = ["GET /get", "HTTP/1.1", "User-Agent: curl"]
        .into_iter()
        .find(|p| captured.ascii.contains(p));
    (file, packets, plaintext)
}

/// The first five of `lines`, one per line.
fn first_five(lines: &[&String]) -> String {
    lines
        .iter()
        .take(5)
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a capture of traffic to and from httpbin shows: every packet to or from its
/// 15008 and none of the application's plaintext; with `new_connection`, TLS
/// handshakes too (a pooled HBONE connection made earlier carries later requests
/// without one).
pub fn only_tls_to_15008(
    c: NodeCapture,
    httpbin_ip: &str,
    new_connection: bool,
) -> Result<String, String> {
    let (file, packets, plaintext) = read(c);
    if packets.is_empty() {
        return Err("no packet to or from httpbin was captured".into());
    }
    let hbone = format!("{httpbin_ip}.15008");
    let other: Vec<&String> = packets.iter().filter(|l| !l.contains(&hbone)).collect();
    if !other.is_empty() {
        return Err(format!(
            "{} of {} packets are not to or from {hbone}:\n{}",
            other.len(),
            packets.len(),
            first_five(&other)
        ));
    }
    if let Some(p) = plaintext {
        return Err(format!("the capture holds plaintext: {p:?}"));
    }
    // TLS records start the TCP payload: a handshake record is 0x16 0x03.
    let handshakes = e2e::output(
        Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&file)
            .arg("tcp[((tcp[12:1] & 0xf0) >> 2):2] = 0x1603"),
        None,
    )
    .map(|s| s.lines().count())
    .unwrap_or(0);
    if new_connection && handshakes == 0 {
        return Err("no TLS handshake record was seen".into());
    }
    Ok(format!(
        "{} packets, all to or from {hbone}, {handshakes} carrying TLS handshake records, no plaintext; e.g.:\n{}",
        packets.len(),
        packets.iter().take(3).cloned().collect::<Vec<_>>().join("\n")
    ))
}

/// What a capture shows when traffic may fail but must never leave in the clear: no
/// packet to or from the application's port, no plaintext; with `hbone_seen`, some
/// traffic to or from 15008 too (so the silence is not for want of traffic).
pub fn no_plaintext(c: NodeCapture, app_port: u16, hbone_seen: bool) -> Result<String, String> {
    let (_, packets, plaintext) = read(c);
    let port = format!(".{app_port}");
    let clear: Vec<&String> = packets
        .iter()
        .filter(|l| {
            l.split_whitespace()
                .filter(|w| w.contains('.'))
                .any(|w| w.trim_end_matches(':').ends_with(&port))
        })
        .collect();
    if !clear.is_empty() {
        return Err(format!(
            "{} packets to or from port {app_port}:\n{}",
            clear.len(),
            first_five(&clear)
        ));
    }
    if let Some(p) = plaintext {
        return Err(format!("the capture holds plaintext: {p:?}"));
    }
    let hbone = packets.iter().filter(|l| l.contains(".15008")).count();
    if hbone_seen && hbone == 0 {
        return Err(format!(
            "{} packets captured, none to or from 15008: no traffic was seen",
            packets.len()
        ));
    }
    Ok(format!(
        "{} packets captured, none to or from port {app_port}, none in the clear; {hbone} to or from 15008",
        packets.len()
    ))
}

/// The plugin types of every config list in a node's CNI conf dir, each of which
/// must end with istio-cni.
pub fn chain_of(node: &realcluster::node::Node) -> Result<String, String> {
    let lists = conf_lists(node)?;
    if lists.is_empty() {
        return Err(format!("no config list on {}", node.spec.name));
    }
    let mut out = Vec::new();
    for (name, types) in lists {
        if types.last().map(String::as_str) != Some("istio-cni") {
            return Err(format!(
                "{name} on {}: the chain {types:?} does not end with istio-cni",
                node.spec.name
            ));
        }
        out.push(format!(
            "{}: {} (/etc/cni/net.d/{name})",
            node.spec.name,
            types.join(" -> ")
        ));
    }
    Ok(out.join("\n"))
}

/// Every network config list in a node's CNI conf dir: its name and plugin types.
pub fn conf_lists(node: &realcluster::node::Node) -> Result<Vec<(String, Vec<String>)>, String> {
    Ok(conf_files(node)?
        .into_iter()
        .map(|(name, v)| {
            let types = plugins(&v)
                .iter()
                .filter_map(|p| p["type"].as_str().map(String::from))
                .collect();
            (name, types)
        })
        .collect())
}

/// The plugin entries of a parsed config list.
pub fn plugins(list: &serde_json::Value) -> &[serde_json::Value] {
    list["plugins"].as_array().map_or(&[], Vec::as_slice)
}

/// Every network config file in a node's CNI conf dir (what the runtime loads; the
/// plugin's kubeconfig lives beside them), parsed, in name order.
pub fn conf_files(
    node: &realcluster::node::Node,
) -> Result<Vec<(String, serde_json::Value)>, String> {
    let dir = node.dir.join("cni-conf");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ![".conflist", ".conf", ".json"]
            .iter()
            .any(|x| name.ends_with(x))
        {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        out.push((name, v));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Logs of every pod labelled `selector` in `namespace`.
pub fn logs(k: &Kubectl, namespace: &str, selector: &str) -> Result<String, String> {
    k.run(&[
        "logs",
        "-n",
        namespace,
        "-l",
        selector,
        "--tail=-1",
        "--prefix",
    ])
}

/// The IP of pod `pod` in the applications' namespace.
pub fn pod_ip(k: &Kubectl, pod: &str) -> Result<String, String> {
    k.jsonpath(NAMESPACE, &format!("pod/{pod}"), "{.status.podIP}")
        .and_then(|ip| {
            if ip.is_empty() {
                Err(format!("{pod} has no IP"))
            } else {
                Ok(ip)
            }
        })
}

pub fn istioctl(istioctl: &Path, k: &Kubectl, args: &[&str]) -> Result<String, String> {
    e2e::output(
        Command::new(istioctl)
            .arg("--kubeconfig")
            .arg(&k.kubeconfig)
            .args(args),
        None,
    )
}

/// `istio-cni diagnose` in the agent's pod on `node` (every pod it enrolled, or
/// `pod`): its report when every pod is healthy.
pub fn diagnose(k: &Kubectl, node: &str, pod: Option<&str>) -> Result<String, String> {
    let agent = k.pod_on_node(ISTIO_NS, "k8s-app=istio-cni-node", node)?;
    let mut args = vec![
        "exec",
        "-n",
        ISTIO_NS,
        agent.as_str(),
        "--",
        "istio-cni",
        "diagnose",
    ];
    let named = pod.map(|p| format!("{NAMESPACE}/{p}"));
    if let Some(p) = &named {
        args.push(p);
    }
    let out = k.run(&args)?;
    if out.contains("HEALTHY") && !out.contains("UNHEALTHY") {
        Ok(out)
    } else {
        Err(out)
    }
}

/// The pods `istio-cni diagnose --json` on `node` reports enrolled, with their
/// states (`captured`, `unlocated`, ...).
pub fn enrolled(k: &Kubectl, node: &str) -> Result<Vec<(String, String)>, String> {
    let agent = k.pod_on_node(ISTIO_NS, "k8s-app=istio-cni-node", node)?;
    // Exit code 1 (a pod unhealthy) still prints the report on stdout.
    let out = k
        .command(&[
            "exec",
            "-n",
            ISTIO_NS,
            &agent,
            "--",
            "istio-cni",
            "diagnose",
            "--json",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("kubectl exec: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "istio-cni diagnose --json: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(v["pods"]
        .as_array()
        .map(|pods| {
            pods.iter()
                .map(|p| {
                    let s = |f: &str| p["pod"][f].as_str().unwrap_or_default().to_string();
                    (s("name"), s("state"))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// One of ztunnel's metrics from the pod `ztunnel` (through the API server's pod
/// proxy): the sum of the samples of `name` whose labels hold every one of `labels`.
pub fn ztunnel_metric(
    k: &Kubectl,
    ztunnel: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<f64, String> {
    let text = k.run(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{ISTIO_NS}/pods/{ztunnel}:15020/proxy/stats/prometheus"),
    ])?;
    Ok(e2e::prom::sum(&text, name, labels))
}

/// When a sample was taken, and what it said.
type Sample = (Instant, Result<(), String>);

/// Watches a piece of state every `every` on a thread of its own until stopped:
/// each sample is what `probe` said then.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(
        every: Duration,
        probe: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (flag, sink) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let r = probe();
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), r));
                std::thread::sleep(every);
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// Stops sampling; `Ok` (how many samples, over how long) when every sample was.
    pub fn stop(mut self) -> Result<String, String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let samples = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            return Err("no sample was taken".into());
        };
        let span = last.0.duration_since(first.0);
        let bad: Vec<String> = samples
            .iter()
            .filter_map(|(at, r)| {
                r.as_ref()
                    .err()
                    .map(|e| format!("at +{:.1?}: {e}", at.duration_since(first.0)))
            })
            .collect();
        if bad.is_empty() {
            Ok(format!(
                "{} samples over {span:.0?}, every one as it should be",
                samples.len()
            ))
        } else {
            Err(format!(
                "{} of {} samples over {span:.0?} were not:\n{}",
                bad.len(),
                samples.len(),
                bad.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
            ))
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Whether node `ns`'s host probe rule and set are in place with `ip` in the set:
/// the rule in the nat table (either iptables backend) and the address in
/// `istio-inpod-probes-v4`.
pub fn host_probe_rule_and_member(ns: &str, ip: &str) -> Result<(), String> {
    let run = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let set = run(&["ipset", "list", "istio-inpod-probes-v4"]);
    if !set.lines().any(|l| l.split_whitespace().next() == Some(ip)) {
        return Err(format!("{ip} is not in istio-inpod-probes-v4"));
    }
    let rules =
        run(&["iptables-nft-save", "-t", "nat"]) + &run(&["iptables-legacy-save", "-t", "nat"]);
    if !rules
        .lines()
        .any(|l| l.starts_with("-A ISTIO_POSTRT") && l.contains("istio-inpod-probes-v4"))
    {
        return Err("no ISTIO_POSTRT rule for istio-inpod-probes-v4".into());
    }
    Ok(())
}
