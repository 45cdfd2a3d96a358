//! The in-cluster half of `cargo xtask cluster-e2e`:
//!
//! - `cluster_e2e run --manifest <file> [--keep] [--out <dir>]`: brings a real
//!   cluster up on this machine (`e2e::realcluster`), installs Istio's `base` and
//!   `istiod` (ambient profile) and our two charts with helm as the README tells a
//!   user, then checks what the specification's "Observing" section checks and more,
//!   printing each check with its evidence; on failure it collects diagnostics into
//!   `--out`; then it removes the cluster (unless `--keep`) and checks nothing is left.
//! - `cluster_e2e down --root <dir>`: removes a cluster an earlier run kept.
//!
//! Exit code 0 when every check passed, 1 when one failed, 2 on bad arguments.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use e2e::incluster::{self, apps, outage, request, Kubectl, Prober, NAMESPACE};
use e2e::observe;
use e2e::realcluster::{self, teardown, Cluster, Layout, Manifest, NodeSpec};

const ISTIO_NS: &str = "istio-system";
/// The longest a client may go unanswered while ztunnel restarts on its node: the
/// new ztunnel opens its listeners beside the old one, which drains; requests fail
/// only between the old one closing a pod's connections and the client's retry.
const ZTUNNEL_RESTART_BOUND: Duration = Duration::from_secs(10);

/// The checks made so far: printed as they are made, counted at the end.
struct Report {
    results: Vec<(String, bool)>,
    start: Instant,
}

impl Report {
    fn new() -> Report {
        Report {
            results: Vec::new(),
            start: Instant::now(),
        }
    }

    /// Records and prints one check; `Ok` carries its evidence.
    fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        let at = self.start.elapsed().as_secs();
        let (ok, text) = match &result {
            Ok(evidence) => (true, evidence.as_str()),
            Err(why) => (false, why.as_str()),
        };
        println!("[{at:>4}s] {} {name}", if ok { "ok  " } else { "FAIL" });
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            println!("          {line}");
        }
        self.results.push((name.to_string(), ok));
        ok
    }

    fn failed(&self) -> usize {
        self.results.iter().filter(|(_, ok)| !ok).count()
    }
}

/// Retries `f` for up to `within`.
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

fn helm(m: &Manifest, layout: &Layout, args: &[&str]) -> Result<String, String> {
    e2e::output(
        Command::new(&m.helm)
            .arg("--kubeconfig")
            .arg(layout.kubeconfig("admin"))
            .args(args),
        None,
    )
}

/// The images' hub and tag (`localhost/ambient-inpod/ztunnel:0.1.0`: hub, tag).
fn hub_and_tag(reference: &str) -> Result<(String, String), String> {
    let (repo, tag) = reference
        .rsplit_once(':')
        .ok_or_else(|| format!("{reference} has no tag"))?;
    let (hub, _) = repo
        .rsplit_once('/')
        .ok_or_else(|| format!("{reference} has no hub"))?;
    Ok((hub.to_string(), tag.to_string()))
}

/// Installs as the README tells a user: Istio's base and istiod (ambient profile),
/// then our istio-cni and ztunnel charts, each with `--wait`; only the images' hub
/// and tag are set.
fn install(m: &Manifest, cluster: &Cluster, report: &mut Report) -> bool {
    // The ambient profile asks for Istio's distroless variant, `<tag>-distroless`.
    let (istio_hub, istio_tag) = match m
        .image("pilot")
        .map_err(|e| e.to_string())
        .and_then(hub_and_tag)
    {
        Ok((hub, tag)) => (hub, tag.trim_end_matches("-distroless").to_string()),
        Err(e) => return report.check("Istio's images", Err(e)),
    };
    let (hub, tag) = match m
        .image("ztunnel")
        .map_err(|e| e.to_string())
        .and_then(hub_and_tag)
    {
        Ok(v) => v,
        Err(e) => return report.check("our images", Err(e)),
    };
    let istio = |p: &str| m.istio_charts.join(p).display().to_string();
    let ours = |p: &str| m.charts.join(p).display().to_string();
    let step = |name: &str, args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(
            ["--namespace", ISTIO_NS, "--wait", "--timeout", "5m"]
                .iter()
                .map(|a| a.to_string()),
        );
        (name.to_string(), all)
    };
    let (base, istiod) = (istio("base"), istio("istio-control/istio-discovery"));
    let (cni, ztunnel) = (ours("istio-cni"), ours("ztunnel"));
    let (istio_hub, istio_tag) = (
        format!("global.hub={istio_hub}"),
        format!("global.tag={istio_tag}"),
    );
    let (hub, tag) = (format!("hub={hub}"), format!("tag={tag}"));
    let steps = [
        step(
            "helm install istio-base (Istio's base chart)",
            &["install", "istio-base", &base, "--create-namespace"],
        ),
        step(
            "helm install istiod (Istio's istio-discovery chart, ambient profile)",
            &[
                "install",
                "istiod",
                &istiod,
                "--set",
                "profile=ambient",
                "--set",
                &istio_hub,
                "--set",
                &istio_tag,
            ],
        ),
        step(
            "helm install istio-cni (our chart)",
            &["install", "istio-cni", &cni, "--set", &hub, "--set", &tag],
        ),
        step(
            "helm install ztunnel (our chart)",
            &["install", "ztunnel", &ztunnel, "--set", &hub, "--set", &tag],
        ),
    ];
    for (name, args) in steps {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let result = helm(m, &cluster.layout, &args)
            .map(|_| format!("helm {} ({:.0?})", args.join(" "), started.elapsed()));
        if !report.check(&name, result) {
            return false;
        }
    }
    report.check(
        "istiod, istio-cni-node and ztunnel running",
        cluster
            .kubectl
            .run(&["get", "pods", "-n", ISTIO_NS, "-o", "wide"]),
    )
}

/// The plugin types of every config list in a node's CNI conf dir.
fn chain_of(node: &realcluster::node::Node) -> Result<String, String> {
    let dir = node.dir.join("cni-conf");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
    {
        // What the runtime loads (the plugin's kubeconfig lives beside them).
        let name = entry.file_name().to_string_lossy().into_owned();
        if ![".conflist", ".conf", ".json"]
            .iter()
            .any(|x| name.ends_with(x))
        {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let types: Vec<String> = v["plugins"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(|p| p["type"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if types.last().map(String::as_str) != Some("istio-cni") {
            return Err(format!(
                "{} on {}: the chain {types:?} does not end with istio-cni",
                entry.file_name().to_string_lossy(),
                node.spec.name
            ));
        }
        out.push(format!(
            "{}: {} (/etc/cni/net.d/{})",
            node.spec.name,
            types.join(" -> "),
            entry.file_name().to_string_lossy()
        ));
    }
    if out.is_empty() {
        return Err(format!("no config list in {}", dir.display()));
    }
    Ok(out.join("\n"))
}

/// Logs of every pod labelled `selector` in `namespace`.
fn logs(k: &Kubectl, namespace: &str, selector: &str) -> Result<String, String> {
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

/// A pod's IP.
fn pod_ip(k: &Kubectl, pod: &str) -> Result<String, String> {
    k.jsonpath(NAMESPACE, &format!("pod/{pod}"), "{.status.podIP}")
}

/// A tcpdump in a node's network namespace on its link to the other node: what
/// crosses between the nodes, as an operator would capture it on the node.
struct NodeCapture {
    capture: e2e::capture::Capture,
    file: PathBuf,
}

fn capture(node: &NodeSpec, filter: &str, dir: &Path) -> NodeCapture {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.netns(), "tcpdump", "-i", "eth0"]);
    NodeCapture {
        capture: e2e::capture::Capture::start(cmd, &node.name, filter, dir),
        file: dir.join(format!("{}.pcap", node.name)),
    }
}

/// What a capture between the two pods shows: every packet to or from httpbin's
/// 15008 and none of the application's plaintext; with `new_connection`, TLS
/// handshakes too (a pooled HBONE connection made earlier carries later requests
/// without one).
fn only_tls_to_15008(
    c: NodeCapture,
    httpbin_ip: &str,
    new_connection: bool,
) -> Result<String, String> {
    let file = c.file.clone();
    let captured = c.capture.stop();
    let packets: Vec<&str> = captured
        .packets
        .lines()
        .filter(|l| l.contains(" IP "))
        .collect();
    if packets.is_empty() {
        return Err("no packet between the two pods was captured".into());
    }
    let hbone = format!("{httpbin_ip}.15008");
    let other: Vec<&&str> = packets.iter().filter(|l| !l.contains(&hbone)).collect();
    if !other.is_empty() {
        return Err(format!(
            "{} of {} packets between the pods are not to or from {hbone}:\n{}",
            other.len(),
            packets.len(),
            other
                .iter()
                .take(5)
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    for plaintext in ["GET /get", "HTTP/1.1", "User-Agent: curl"] {
        if captured.ascii.contains(plaintext) {
            return Err(format!("the capture holds plaintext: {plaintext:?}"));
        }
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
        packets.iter().take(3).map(|s| s.to_string()).collect::<Vec<_>>().join("\n")
    ))
}

/// ztunnel's certificates, from istioctl's JSON view of its config dump: every one
/// chains to istiod's root (the `istio-ca-root-cert` ConfigMap), not a local CA.
fn certificates_from_istiod(
    k: &Kubectl,
    istioctl: &Path,
    ztunnel_pod: &str,
) -> Result<String, String> {
    let root = k.jsonpath(
        NAMESPACE,
        "configmap/istio-ca-root-cert",
        "{.data.root-cert\\.pem}",
    )?;
    let json = e2e::output(
        Command::new(istioctl)
            .arg("--kubeconfig")
            .arg(&k.kubeconfig)
            .args([
                "ztunnel-config",
                "certificates",
                ztunnel_pod,
                "-n",
                ISTIO_NS,
                "-o",
                "json",
            ]),
        None,
    )?;
    let certs: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("istioctl's JSON: {e}\n{json}"))?;
    let certs = certs.as_array().ok_or("istioctl printed no list")?;
    if certs.is_empty() {
        return Err("ztunnel holds no certificate".into());
    }
    let normal = |s: &str| s.split_whitespace().collect::<String>();
    // The dump carries each PEM base64-encoded, as Istio's ztunnel's does.
    let pem = |b64: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let mut lines = Vec::new();
    for c in certs {
        let identity = c["identity"].as_str().unwrap_or("?");
        let roots: Vec<String> = c["rootCerts"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|x| x["pem"].as_str())
                    .map(pem)
                    .collect()
            })
            .unwrap_or_default();
        if !roots
            .iter()
            .any(|r| !r.is_empty() && normal(r) == normal(&root))
        {
            return Err(format!(
                "{identity}'s root is not istiod's (istio-ca-root-cert)"
            ));
        }
        lines.push(format!(
            "{identity}: {} in its chain, root = istiod's",
            c["certChain"].as_array().map(Vec::len).unwrap_or(0)
        ));
    }
    Ok(lines.join("\n"))
}

fn istioctl(istioctl: &Path, k: &Kubectl, args: &[&str]) -> Result<String, String> {
    e2e::output(
        Command::new(istioctl)
            .arg("--kubeconfig")
            .arg(&k.kubeconfig)
            .args(args),
        None,
    )
}

const DENY_SLEEP: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: ambient-demo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/ambient-demo/sa/sleep"]
"#;

fn checks(m: &Manifest, cluster: &Cluster, report: &mut Report, out: &Path) {
    let k = &cluster.kubectl;
    let istioctl_bin = m.components.join("istioctl");
    let nodes: Vec<&NodeSpec> = cluster.nodes.iter().map(|n| &n.spec).collect();
    for node in &cluster.nodes {
        report.check(
            &format!("{}: the CNI chain ends with our plugin", node.spec.name),
            chain_of(node),
        );
    }
    let placement = (nodes.len() >= 2).then(|| (nodes[0].name.as_str(), nodes[1].name.as_str()));
    let (Ok(curl), Ok(httpbin_image)) = (m.image("curl"), m.image("go-httpbin")) else {
        report.check(
            "sample images",
            Err("the manifest names no curl or go-httpbin image".into()),
        );
        return;
    };
    let ns_yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    istio.io/dataplane-mode: ambient\n"
    );
    let deployed = k
        .run_with_input(&["apply", "-f", "-"], Some(&ns_yaml))
        .and_then(|_| {
            k.run_with_input(
                &["apply", "-n", NAMESPACE, "-f", "-"],
                Some(&apps(curl, httpbin_image, placement)),
            )
        })
        .and_then(|_| {
            k.run(&[
                "wait",
                "-n",
                NAMESPACE,
                "--for=condition=Available",
                "deploy/sleep",
                "deploy/httpbin",
                "--timeout=300s",
            ])
        })
        .and_then(|_| k.run(&["get", "pods", "-n", NAMESPACE, "-o", "wide"]));
    if !report.check(
        "sleep and httpbin started by the kubelets in an ambient namespace",
        deployed,
    ) {
        return;
    }
    let pods = k
        .pod_of(NAMESPACE, "sleep")
        .and_then(|s| Ok((s, k.pod_of(NAMESPACE, "httpbin")?)));
    let Ok((sleep, httpbin)) = pods else {
        report.check("pods found", pods.map(|_| String::new()));
        return;
    };
    for pod in [&sleep, &httpbin] {
        let annotated = eventually(Duration::from_secs(60), || {
            let v = k.jsonpath(
                NAMESPACE,
                &format!("pod/{pod}"),
                "{.metadata.annotations.ambient\\.istio\\.io/redirection}",
            )?;
            (v == "enabled")
                .then(|| format!("{pod}: ambient.istio.io/redirection={v}"))
                .ok_or_else(|| format!("{pod}: ambient.istio.io/redirection is {v:?}"))
        });
        report.check("the redirection annotation", annotated);
    }
    let ztunnel_log = || logs(k, ISTIO_NS, "app=ztunnel");
    report.check(
        "ztunnel's log: in-pod mode, both pods' netns received",
        eventually(Duration::from_secs(30), || {
            let log = ztunnel_log()?;
            observe::check_inpod_log(&log, 2)?;
            Ok(log
                .lines()
                .filter(|l| l.contains("inpod"))
                .take(8)
                .collect::<Vec<_>>()
                .join("\n"))
        }),
    );
    for (what, selector) in [
        ("ztunnel", "app=ztunnel"),
        ("istio-cni-node", "k8s-app=istio-cni-node"),
    ] {
        report.check(
            &format!("{what}'s log is plain text (no terminal colour codes)"),
            logs(k, ISTIO_NS, selector).and_then(|log| {
                if log.contains('\u{1b}') {
                    Err(format!(
                        "escape codes in: {}",
                        log.lines().find(|l| l.contains('\u{1b}')).unwrap_or("")
                    ))
                } else {
                    Ok(format!(
                        "{} lines, none with an escape code",
                        log.lines().count()
                    ))
                }
            }),
        );
    }
    let debug_image = m.image("istio-cni").unwrap_or_default();
    report.check(
        "ss -ntlp in the sleep pod: ztunnel listens on 15001, 15006, 15008",
        k.debug(NAMESPACE, &sleep, debug_image, "ss-check", &["ss", "-ntlp"])
            .and_then(|ss| observe::check_listeners(&ss).map(|()| ss)),
    );
    report.check(
        "iptables-save in the sleep pod: the specification's rules",
        k.debug(
            NAMESPACE,
            &sleep,
            debug_image,
            "rules-check",
            &["sh", "-c", "iptables-nft-save; iptables-legacy-save"],
        )
        .and_then(|save| {
            observe::check_rules(&save)?;
            Ok(save
                .lines()
                .filter(|l| l.starts_with("-A ISTIO"))
                .collect::<Vec<_>>()
                .join("\n"))
        }),
    );
    report.check(
        "istio-cni diagnose in the agent's pod: the sleep pod is healthy",
        k.pod_on_node(ISTIO_NS, "k8s-app=istio-cni-node", &nodes[0].name)
            .and_then(|agent| {
                k.run(&[
                    "exec",
                    "-n",
                    ISTIO_NS,
                    &agent,
                    "--",
                    "istio-cni",
                    "diagnose",
                    &format!("{NAMESPACE}/{sleep}"),
                ])
            })
            .and_then(|out| {
                if out.contains("HEALTHY") {
                    Ok(out)
                } else {
                    Err(out)
                }
            }),
    );
    let (Ok(sleep_ip), Ok(httpbin_ip)) = (pod_ip(k, &sleep), pod_ip(k, &httpbin)) else {
        report.check("pod addresses", Err("no podIP".into()));
        return;
    };
    let dir = out.join("captures");
    let _ = std::fs::create_dir_all(&dir);
    let filter = format!("host {sleep_ip} and host {httpbin_ip}");
    let cap = capture(nodes[0], &filter, &dir);
    let answered = eventually(Duration::from_secs(60), || {
        request(k, &sleep).map(|()| format!("curl {} from {sleep}: 200", incluster::URL))
    });
    let answered_ok = report.check("sleep -> httpbin answers 200", answered);
    report.check(
        &format!(
            "tcpdump on {}: only TLS to 15008 between the pods",
            nodes[0].name
        ),
        if answered_ok {
            only_tls_to_15008(cap, &httpbin_ip, true)
        } else {
            Err("no request was answered".into())
        },
    );
    let (src, dst) = (
        observe::spiffe("cluster.local", NAMESPACE, "sleep"),
        observe::spiffe("cluster.local", NAMESPACE, "httpbin"),
    );
    report.check(
        "mutual TLS: both identities in ztunnel's access log",
        eventually(Duration::from_secs(30), || {
            let log = ztunnel_log()?;
            observe::check_mtls_access_log(&log, &src, &dst)?;
            Ok(log
                .lines()
                .filter(|l| l.contains(&format!("src.identity=\"{src}\"")))
                .take(2)
                .collect::<Vec<_>>()
                .join("\n"))
        }),
    );
    let ztunnel_on = |node: &str| k.pod_on_node(ISTIO_NS, "app=ztunnel", node);
    let source_ztunnel = ztunnel_on(&nodes[0].name).unwrap_or_default();
    let destination_ztunnel = ztunnel_on(&nodes[nodes.len() - 1].name).unwrap_or_default();
    report.check(
        "ztunnel's metrics (through the API server's pod proxy): Istio's TCP metrics with both identities",
        eventually(Duration::from_secs(20), || {
            let text = k.run(&[
                "get",
                "--raw",
                &format!("/api/v1/namespaces/{ISTIO_NS}/pods/{destination_ztunnel}:15020/proxy/stats/prometheus"),
            ])?;
            text.lines()
                .find(|l| {
                    l.starts_with("istio_tcp_connections_opened_total{")
                        && l.contains("reporter=\"destination\"")
                        && l.contains(&format!("source_principal=\"{src}\""))
                        && l.contains(&format!("destination_principal=\"{dst}\""))
                })
                .map(str::to_string)
                .ok_or_else(|| "no istio_tcp_connections_opened_total from sleep to httpbin".to_string())
        }),
    );
    report.check(
        "certificates issued by istiod's CA (istioctl ztunnel-config certificates)",
        certificates_from_istiod(k, &istioctl_bin, &source_ztunnel),
    );
    for (what, args, want) in [
        (
            "workloads",
            vec![
                "ztunnel-config",
                "workloads",
                source_ztunnel.as_str(),
                "-n",
                ISTIO_NS,
            ],
            vec!["sleep", "httpbin", "HBONE"],
        ),
        (
            "certificates",
            vec![
                "ztunnel-config",
                "certificates",
                source_ztunnel.as_str(),
                "-n",
                ISTIO_NS,
            ],
            vec![
                "spiffe://cluster.local/ns/ambient-demo/sa/sleep",
                "Leaf",
                "Available",
            ],
        ),
    ] {
        report.check(
            &format!("istioctl ztunnel-config {what} reads our ztunnel"),
            istioctl(&istioctl_bin, k, &args).and_then(|text| {
                match want.iter().find(|w| !text.contains(*w)) {
                    Some(w) => Err(format!("no {w:?} in:\n{text}")),
                    None => Ok(text),
                }
            }),
        );
    }
    // A connection held open (httpbin answers after 8 s) shows in ztunnel's view.
    let held = k
        .command(&[
            "exec",
            "-n",
            NAMESPACE,
            &sleep,
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "20",
            "http://httpbin:8000/delay/8",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    report.check(
        "istioctl ztunnel-config connections reads our ztunnel",
        eventually(Duration::from_secs(6), || {
            let text = istioctl(
                &istioctl_bin,
                k,
                &[
                    "ztunnel-config",
                    "connections",
                    &source_ztunnel,
                    "-n",
                    ISTIO_NS,
                ],
            )?;
            let row = text.lines().find(|l| {
                l.contains(&sleep) && l.to_lowercase().contains("outbound") && l.contains("httpbin")
            });
            match row {
                Some(_) => Ok(text),
                None => Err(format!(
                    "no outbound connection of {sleep} to httpbin in:\n{text}"
                )),
            }
        }),
    );
    if let Ok(mut child) = held {
        let _ = child.wait();
    }
    report.check(
        "istiod takes ztunnel's node metadata (no missing-version warning)",
        logs(k, ISTIO_NS, "app=istiod").and_then(|log| {
            match log
                .lines()
                .find(|l| l.contains("Istio Version is not found") && l.contains("ztunnel"))
            {
                Some(line) => Err(line.to_string()),
                None => Ok(format!(
                    "{} lines of istiod's log, none about ztunnel's version",
                    log.lines().count()
                )),
            }
        }),
    );
    // An L4 AuthorizationPolicy from istiod: sleep is denied, then allowed again.
    let denied = k
        .run_with_input(&["apply", "-f", "-"], Some(DENY_SLEEP))
        .and_then(|_| {
            eventually(Duration::from_secs(60), || match request(k, &sleep) {
                Ok(()) => Err("still answered 200".into()),
                Err(e) => Ok(format!("refused: {}", e.lines().last().unwrap_or(""))),
            })
        });
    report.check(
        "an AuthorizationPolicy (DENY sleep) denies the request",
        denied,
    );
    let allowed = k
        .run(&[
            "delete",
            "authorizationpolicy",
            "-n",
            NAMESPACE,
            "deny-sleep",
        ])
        .and_then(|_| {
            eventually(Duration::from_secs(60), || {
                request(k, &sleep).map(|()| "200 again".to_string())
            })
        });
    report.check("the policy deleted, the request works again", allowed);

    for (ds, component, bound) in [
        ("ztunnel", "ztunnel", Some(ZTUNNEL_RESTART_BOUND)),
        ("istio-cni-node", "istio-cni", None),
    ] {
        let cap = capture(nodes[0], &filter, &dir);
        let prober = match Prober::start(k, &sleep, 240) {
            Ok(p) => p,
            Err(e) => {
                report.check(&format!("{component} rollout restart"), Err(e));
                continue;
            }
        };
        let _ = eventually(Duration::from_secs(20), || {
            (prober.count() >= 5)
                .then_some(())
                .ok_or_else(|| "prober not started".to_string())
        });
        let started = Instant::now();
        let restarted = k
            .run(&["rollout", "restart", "-n", ISTIO_NS, &format!("ds/{ds}")])
            .and_then(|_| {
                k.run(&[
                    "rollout",
                    "status",
                    "-n",
                    ISTIO_NS,
                    &format!("ds/{ds}"),
                    "--timeout=300s",
                ])
            });
        let took = started.elapsed();
        std::thread::sleep(Duration::from_secs(5));
        let probes = prober.stop();
        let o = outage(&probes);
        let verdict = restarted.and_then(|_| {
            if o.total < 10 {
                return Err(format!("only {} requests were made", o.total));
            }
            let within = match bound {
                Some(b) => o.longest_ms <= b.as_millis() as u64,
                None => o.failed == 0,
            };
            let summary = format!(
                "rolled out in {took:.0?}; {} requests, {} failed, longest stretch unanswered {} ms",
                o.total, o.failed, o.longest_ms
            );
            if within {
                Ok(summary)
            } else {
                Err(format!(
                    "{summary} (allowed: {})",
                    bound.map(|b| format!("{b:?}")).unwrap_or_else(|| "none failed".into())
                ))
            }
        });
        report.check(
            &format!("{component} rollout restart under a prober: failures within bound"),
            verdict,
        );
        report.check(
            &format!("{component} rollout restart: no plaintext between the pods"),
            only_tls_to_15008(cap, &httpbin_ip, false),
        );
    }
    app_rollout(k, report, &sleep);
}

/// A new pod of the client (its Deployment restarted, as users roll out a new
/// version): enrolled by the CNI plugin before its container starts, its first
/// request answered over mTLS, the old pod's proxy drained.
fn app_rollout(k: &Kubectl, report: &mut Report, old: &str) {
    let result = k
        .run(&["rollout", "restart", "-n", NAMESPACE, "deploy/sleep"])
        .and_then(|_| {
            k.run(&[
                "rollout", "status", "-n", NAMESPACE, "deploy/sleep", "--timeout=120s",
            ])
        })
        .and_then(|_| {
            eventually(Duration::from_secs(60), || {
                let pods = k.run(&[
                    "get", "pod", "-n", NAMESPACE, "-l", "app=sleep", "-o",
                    "jsonpath={range .items[*]}{.metadata.name} {.metadata.annotations.ambient\\.istio\\.io/redirection} {.status.phase}{\"\\n\"}{end}",
                ])?;
                let new: Vec<&str> = pods
                    .lines()
                    .filter(|l| !l.starts_with(old) && l.ends_with("Running"))
                    .collect();
                match new.as_slice() {
                    [line] if line.contains(" enabled ") => {
                        Ok(line.split_whitespace().next().unwrap_or("").to_string())
                    }
                    _ => Err(format!("sleep's pods: {pods}")),
                }
            })
        })
        .and_then(|new| {
            // Its very first request: the pod was in the mesh before its app started.
            request(k, &new).map_err(|e| format!("{new}'s first request: {e}"))?;
            let log = logs(k, ISTIO_NS, "app=ztunnel")?;
            if !log.contains("ztunnel::inpod::statemanager: pod delete request, draining proxy") {
                return Err("ztunnel never drained the old pod's proxy".into());
            }
            Ok(format!(
                "{new}: ambient.istio.io/redirection=enabled, its first request answered 200; \
                 ztunnel drained {old}'s proxy"
            ))
        });
    report.check(
        "a new client pod (kubectl rollout restart deploy/sleep): enrolled at once, old one drained",
        result,
    );
}

/// Everything an operator would look at, into `out`.
fn collect(cluster: &Cluster, out: &Path) {
    let _ = std::fs::create_dir_all(out);
    let k = &cluster.kubectl;
    let save = |name: &str, text: Result<String, String>| {
        let text = text.unwrap_or_else(|e| e);
        let _ = std::fs::write(out.join(name), text);
    };
    save("pods.txt", k.run(&["get", "pods", "-A", "-o", "wide"]));
    save(
        "events.txt",
        k.run(&["get", "events", "-A", "--sort-by=.lastTimestamp"]),
    );
    save("nodes.txt", k.run(&["describe", "nodes"]));
    for (name, ns, selector) in [
        ("istio-cni-node.log", ISTIO_NS, "k8s-app=istio-cni-node"),
        ("ztunnel.log", ISTIO_NS, "app=ztunnel"),
        ("istiod.log", ISTIO_NS, "app=istiod"),
        ("kube-proxy.log", "kube-system", "k8s-app=kube-proxy"),
        ("coredns.log", "kube-system", "k8s-app=kube-dns"),
    ] {
        save(
            name,
            k.run(&[
                "logs",
                "-n",
                ns,
                "-l",
                selector,
                "--tail=-1",
                "--prefix",
                "--all-containers",
            ]),
        );
    }
    // The processes' own logs (kubelets, containerd, the control plane) and each
    // node's CNI conf dir.
    let _ = Command::new("cp")
        .arg("-r")
        .arg(cluster.layout.logs())
        .arg(out.join("processes"))
        .status();
    for node in &cluster.nodes {
        let _ = Command::new("cp")
            .arg("-r")
            .arg(node.dir.join("cni-conf"))
            .arg(out.join(format!("{}-cni-net.d", node.spec.name)))
            .status();
    }
    println!("diagnostics in {}", out.display());
}

fn down(layout: &Layout, report: &mut Report) {
    let started = Instant::now();
    let rules_before = std::fs::read_to_string(layout.host_rules_before()).ok();
    let removed = teardown::down(layout, false).map_err(|e| e.to_string());
    report.check(
        "teardown: no process, mount, cgroup, netns, interface, route or host rule left",
        removed.and_then(|()| {
            let mut left = teardown::leftovers(&layout.root);
            if let Some(before) = &rules_before {
                left.extend(teardown::rule_changes(before, &teardown::host_rules()));
            }
            if left.is_empty() {
                Ok(format!("removed in {:.1?}", started.elapsed()))
            } else {
                Err(left.join("\n"))
            }
        }),
    );
}

fn run(manifest: &Path, keep: bool, out: &Path) -> ExitCode {
    let m = match Manifest::read(manifest) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut report = Report::new();
    println!(
        "versions: {}",
        m.versions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cluster = match realcluster::up(&m) {
        Ok(c) => c,
        Err(e) => {
            report.check("a cluster on this machine", Err(e.to_string()));
            let layout = Layout::new(&m.root);
            let _ = std::fs::create_dir_all(out);
            let _ = Command::new("cp")
                .arg("-r")
                .arg(layout.logs())
                .arg(out.join("processes"))
                .status();
            println!("diagnostics in {}", out.display());
            if !keep {
                down(&layout, &mut report);
            }
            return ExitCode::FAILURE;
        }
    };
    report.check(
        "a cluster on this machine: nodes Ready, kube-proxy and CoreDNS running",
        cluster
            .kubectl
            .run(&["get", "nodes", "-o", "wide"])
            .and_then(|n| {
                Ok(n + &cluster
                    .kubectl
                    .run(&["get", "pods", "-n", "kube-system", "-o", "wide"])?)
            }),
    );
    if install(&m, &cluster, &mut report) {
        checks(&m, &cluster, &mut report, out);
    }
    if report.failed() > 0 {
        collect(&cluster, out);
    }
    if keep {
        println!(
            "\nThe cluster stays. Try:\n  export KUBECONFIG={kubeconfig}\n  {kubectl} get pods -A -o wide\n  {kubectl} exec -n {NAMESPACE} deploy/sleep -- curl -s {url}\n  {istioctl} ztunnel-config workloads -n {ISTIO_NS} daemonset/ztunnel\n  {kubectl} logs -n {ISTIO_NS} -l app=ztunnel\n  ip netns exec {netns} tcpdump -ni eth0 port 15008\nThe processes' logs are in {logs}. `cargo xtask cluster-e2e --down` removes it all.",
            kubeconfig = cluster.layout.kubeconfig("admin").display(),
            kubectl = cluster.kubectl.program.display(),
            url = incluster::URL,
            istioctl = m.components.join("istioctl").display(),
            netns = cluster.nodes[0].spec.netns(),
            logs = cluster.layout.logs().display(),
        );
    } else {
        down(&cluster.layout, &mut report);
    }
    let failed = report.failed();
    println!(
        "\n{} passed, {failed} failed, in {:.0?}",
        report.results.len() - failed,
        report.start.elapsed()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

const USAGE: &str = "usage: cluster_e2e run --manifest <file> [--keep] [--out <dir>]
       cluster_e2e down --root <dir>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    let command = it.next().map(String::as_str);
    let (mut manifest, mut keep, mut out, mut root) = (None, false, None, None);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--manifest" => manifest = it.next().map(PathBuf::from),
            "--keep" => keep = true,
            "--out" => out = it.next().map(PathBuf::from),
            "--root" => root = it.next().map(PathBuf::from),
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match (command, manifest) {
        (Some("run"), Some(manifest)) => run(
            &manifest,
            keep,
            &out.unwrap_or_else(|| PathBuf::from("target/cluster-e2e")),
        ),
        (Some("down"), _) if root.is_some() => {
            let mut report = Report::new();
            let layout = Layout::new(root.unwrap_or_default());
            down(&layout, &mut report);
            if report.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
