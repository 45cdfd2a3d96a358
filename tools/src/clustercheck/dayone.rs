//! Day one: what the specification's "Observing" section checks, on the cluster our
//! charts now run: the chain, the annotation, ztunnel's in-pod log, the pods'
//! listeners and rules, `istio-cni diagnose`, traffic on the wire, mutual TLS in the
//! access log and metrics, istioctl's views, and both DaemonSets restarted under a
//! prober.

use std::path::Path;
use std::time::{Duration, Instant};

use super::evidence::{self, capture, logs, only_tls_to_15008};
use super::{annotation_becomes, eventually, running_prober, Run, ISTIO_NS, ZTUNNEL_RESTART_BOUND};
use crate::incluster::{self, outage, request, Kubectl, NAMESPACE};
use e2e::observe;

pub fn run(r: &mut Run) {
    r.report.part("day one: what an operator looks at");
    for i in 0..r.cluster.nodes.len() {
        let node = r.cluster.nodes[i].clone();
        r.check(
            &format!("{}: the CNI chain ends with our plugin", node.spec.name),
            evidence::chain_of(&node),
        );
    }
    let Ok((sleep, httpbin)) = r.pods() else {
        r.check("the applications' pods", Err("not found".into()));
        return;
    };
    let k = r.k().clone();
    for pod in [&sleep, &httpbin] {
        r.check(
            "the redirection annotation",
            annotation_becomes(&k, NAMESPACE, pod, "enabled", Duration::from_secs(60)),
        );
    }
    let ztunnel_log = || logs(&k, ISTIO_NS, "app=ztunnel");
    r.check(
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
        r.check(
            &format!("{what}'s log is plain text (no terminal colour codes)"),
            logs(&k, ISTIO_NS, selector).and_then(|log| {
                match log.lines().find(|l| l.contains('\u{1b}')) {
                    Some(l) => Err(format!("escape codes in: {l}")),
                    None => Ok(format!(
                        "{} lines, none with an escape code",
                        log.lines().count()
                    )),
                }
            }),
        );
    }
    let debug_image = r.image("istio-cni");
    r.check(
        "ss -ntlp in the sleep pod: ztunnel listens on 15001, 15006, 15008",
        k.debug(
            NAMESPACE,
            &sleep,
            &debug_image,
            "ss-check",
            &["ss", "-ntlp"],
        )
        .and_then(|ss| observe::check_listeners(&ss).map(|()| ss)),
    );
    r.check(
        "iptables-save in the sleep pod: the specification's rules",
        k.debug(
            NAMESPACE,
            &sleep,
            &debug_image,
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
    let (client_node, server_node) = (r.node(0), r.node(1));
    r.check(
        "istio-cni diagnose in the agent's pod: the sleep pod is healthy",
        evidence::diagnose(&k, &client_node.name, Some(&sleep)),
    );
    let Ok(httpbin_ip) = evidence::pod_ip(&k, &httpbin) else {
        r.check("httpbin's address", Err("none".into()));
        return;
    };
    let filter = format!("host {httpbin_ip}");
    let cap = capture(&client_node, &filter, &r.captures(), "dayone");
    let answered = eventually(Duration::from_secs(60), || {
        request(&k, &sleep).map(|()| format!("curl {} from {sleep}: 200", incluster::URL))
    });
    let answered_ok = r.check("sleep -> httpbin answers 200", answered);
    r.check(
        &format!(
            "tcpdump on {}'s link: only TLS to 15008 between the pods",
            client_node.name
        ),
        if answered_ok {
            // Not necessarily a new connection: the migration's prober left one pooled.
            only_tls_to_15008(cap, &httpbin_ip, false)
        } else {
            Err("no request was answered".into())
        },
    );
    let (src, dst) = (
        observe::spiffe("cluster.local", NAMESPACE, "sleep"),
        observe::spiffe("cluster.local", NAMESPACE, "httpbin"),
    );
    r.check(
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
    let source_ztunnel = ztunnel_on(&client_node.name).unwrap_or_default();
    let destination_ztunnel = ztunnel_on(&server_node.name).unwrap_or_default();
    r.check(
        "ztunnel's metrics (through the API server's pod proxy): Istio's TCP metrics with both identities",
        eventually(Duration::from_secs(20), || {
            let labels = [
                ("reporter", "destination"),
                ("source_principal", src.as_str()),
                ("destination_principal", dst.as_str()),
            ];
            let n = evidence::ztunnel_metric(&k, &destination_ztunnel, "istio_tcp_connections_opened_total", &labels)?;
            if n >= 1.0 {
                let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                Ok(format!("istio_tcp_connections_opened_total{{{}}} {n}", shown.join(",")))
            } else {
                Err("no istio_tcp_connections_opened_total from sleep to httpbin".into())
            }
        }),
    );
    let istioctl = r.istioctl();
    r.check(
        "certificates issued by istiod's CA (istioctl ztunnel-config certificates)",
        certificates_from_istiod(&k, &istioctl, &source_ztunnel),
    );
    for (what, want) in [
        ("workloads", vec!["sleep", "httpbin", "HBONE"]),
        (
            "certificates",
            vec![
                "spiffe://cluster.local/ns/ambient-demo/sa/sleep",
                "Leaf",
                "Available",
            ],
        ),
    ] {
        r.check(
            &format!("istioctl ztunnel-config {what} reads our ztunnel"),
            evidence::istioctl(
                &istioctl,
                &k,
                &["ztunnel-config", what, &source_ztunnel, "-n", ISTIO_NS],
            )
            .and_then(|text| match want.iter().find(|w| !text.contains(*w)) {
                Some(w) => Err(format!("no {w:?} in:\n{text}")),
                None => Ok(text),
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
    r.check(
        "istioctl ztunnel-config connections reads our ztunnel",
        eventually(Duration::from_secs(6), || {
            let text = evidence::istioctl(
                &istioctl,
                &k,
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
    r.check(
        "istiod takes ztunnel's node metadata (no missing-version warning)",
        logs(&k, ISTIO_NS, "app=istiod").and_then(|log| {
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
    for (ds, component, bound) in [
        ("ztunnel", "ztunnel", Some(ZTUNNEL_RESTART_BOUND)),
        ("istio-cni-node", "istio-cni", None),
    ] {
        rollout_restart(r, &sleep, &httpbin_ip, ds, component, bound);
    }
    app_rollout(r, &sleep);
}

/// `kubectl rollout restart ds/<ds>` under a prober in sleep and a capture on the
/// client's node: failures within `bound` (none when `None`), nothing in the clear.
fn rollout_restart(
    r: &mut Run,
    sleep: &str,
    httpbin_ip: &str,
    ds: &str,
    component: &str,
    bound: Option<Duration>,
) {
    let k = r.k().clone();
    let cap = capture(
        &r.node(0),
        &format!("host {httpbin_ip}"),
        &r.captures(),
        &format!("restart-{ds}"),
    );
    let prober = match running_prober(&k, sleep, 240) {
        Ok(p) => p,
        Err(e) => {
            r.check(&format!("{component} rollout restart"), Err(e));
            return;
        }
    };
    let started = Instant::now();
    let ds = format!("ds/{ds}");
    let restarted = k
        .run(&["rollout", "restart", "-n", ISTIO_NS, &ds])
        .and_then(|_| k.run(&["rollout", "status", "-n", ISTIO_NS, &ds, "--timeout=300s"]));
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let verdict = restarted
        .and_then(|_| within_bound(&prober.stop(), bound, &format!("rolled out in {took:.0?}")));
    r.check(
        &format!("{component} rollout restart under a prober: failures within bound"),
        verdict,
    );
    r.check(
        &format!("{component} rollout restart: no plaintext between the pods"),
        only_tls_to_15008(cap, httpbin_ip, false),
    );
}

/// A prober's outcome against `bound` (the longest stretch unanswered; `None`: no
/// failure at all).
pub fn within_bound(
    probes: &[incluster::Probe],
    bound: Option<Duration>,
    what: &str,
) -> Result<String, String> {
    let o = outage(probes);
    if o.total < 10 {
        return Err(format!("only {} requests were made", o.total));
    }
    let within = match bound {
        Some(b) => o.longest_ms <= b.as_millis() as u64,
        None => o.failed == 0,
    };
    let summary = format!(
        "{what}; {} requests, {} failed, longest stretch unanswered {} ms",
        o.total, o.failed, o.longest_ms
    );
    if within {
        Ok(summary)
    } else {
        Err(format!(
            "{summary} (allowed: {})",
            bound
                .map(|b| format!("{b:?}"))
                .unwrap_or_else(|| "none failed".into())
        ))
    }
}

/// A new pod of the client (its Deployment restarted, as users roll out a new
/// version): enrolled by the CNI plugin before its container starts, its first
/// request answered over mTLS, the old pod's proxy drained.
fn app_rollout(r: &mut Run, old: &str) {
    let k = r.k().clone();
    let result = k
        .run(&["rollout", "restart", "-n", NAMESPACE, "deploy/sleep"])
        .and_then(|_| k.run(&["rollout", "status", "-n", NAMESPACE, "deploy/sleep", "--timeout=120s"]))
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
            request(&k, &new).map_err(|e| format!("{new}'s first request: {e}"))?;
            let log = logs(&k, ISTIO_NS, "app=ztunnel")?;
            if !log.contains("ztunnel::inpod::statemanager: pod delete request, draining proxy") {
                return Err("ztunnel never drained the old pod's proxy".into());
            }
            Ok(format!(
                "{new}: ambient.istio.io/redirection=enabled, its first request answered 200; \
                 ztunnel drained {old}'s proxy"
            ))
        });
    r.check(
        "a new client pod (kubectl rollout restart deploy/sleep): enrolled at once, old one drained",
        result,
    );
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
    let json = evidence::istioctl(
        istioctl,
        k,
        &[
            "ztunnel-config",
            "certificates",
            ztunnel_pod,
            "-n",
            ISTIO_NS,
            "-o",
            "json",
        ],
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
