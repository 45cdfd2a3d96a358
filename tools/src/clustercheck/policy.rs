//! Istio's policy APIs through the API server, as Istio documents them: istiod
//! turns `AuthorizationPolicy` and `PeerAuthentication` objects into the policies
//! it sends our ztunnel, which enforces them at httpbin's end. Each case is shown by
//! requests that succeed and fail; each denial by ztunnel's access log and
//! `istio_tcp_connections_failed_total{response_flags="DENY"}`.

use std::time::Duration;

use super::{apply, available, eventually, Run, ISTIO_NS};
use crate::incluster::{client, request_from, Client, Kubectl, NAMESPACE};

/// A namespace outside the mesh (no `istio.io/dataplane-mode` label).
const OUTSIDE: &str = "ambient-outside";

fn principal(sa: &str) -> String {
    format!("cluster.local/ns/{NAMESPACE}/sa/{sa}")
}

/// An AuthorizationPolicy: `selector` (an `app` label) or none (every workload of
/// its namespace; the mesh in the root namespace), `from` principals, `ports`.
fn authorization(
    name: &str,
    namespace: &str,
    action: &str,
    selector: Option<&str>,
    from: &str,
    ports: Option<&str>,
) -> String {
    let selector = selector
        .map(|app| format!("  selector:\n    matchLabels:\n      app: {app}\n"))
        .unwrap_or_default();
    let to = ports
        .map(|p| format!("      to:\n        - operation:\n            ports: [\"{p}\"]\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{selector}  action: {action}\n  rules:\n    - from:\n        - source:\n            principals: [\"{p}\"]\n{to}",
        p = principal(from),
    )
}

const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: ambient-demo\nspec:\n  mtls:\n    mode: STRICT\n";

/// Who asks: a pod in a namespace.
#[derive(Clone)]
struct From {
    who: &'static str,
    namespace: &'static str,
    pod: String,
}

/// A policy case: its name, the policy, each client's outcome (`true`: answered),
/// and the address whose denial the access log must show.
type Case<'a> = (&'a str, String, Vec<(&'a From, bool)>, &'a str);

/// Waits until every client's request has the outcome wanted (`true`: answered).
fn outcomes(k: &Kubectl, want: &[(&From, bool)]) -> Result<String, String> {
    eventually(Duration::from_secs(60), || {
        let mut lines = Vec::new();
        for (from, ok) in want {
            let got = request_from(k, from.namespace, &from.pod);
            match (got, ok) {
                (Ok(()), true) => lines.push(format!("{}: 200", from.who)),
                (Err(e), false) => lines.push(format!(
                    "{}: refused ({})",
                    from.who,
                    e.lines().last().unwrap_or("").trim()
                )),
                (Ok(()), false) => return Err(format!("{} was still answered", from.who)),
                (Err(e), true) => return Err(format!("{} was refused: {e}", from.who)),
            }
        }
        Ok(lines.join("; "))
    })
}

fn denials(k: &Kubectl, ztunnel: &str) -> f64 {
    super::evidence::ztunnel_metric(
        k,
        ztunnel,
        "istio_tcp_connections_failed_total",
        &[("response_flags", "DENY")],
    )
    .unwrap_or(0.0)
}

/// The access log's newest denial of a connection from `ip` on `ztunnel`.
fn denial_logged(k: &Kubectl, ztunnel: &str, ip: &str) -> Result<String, String> {
    let log = k.run(&["logs", "-n", ISTIO_NS, ztunnel, "--tail=-1"])?;
    log.lines()
        .rev()
        .find(|l| {
            l.contains("connection complete")
                && l.contains(&format!("src.addr={ip}:"))
                && l.contains("denied by policy")
        })
        .map(str::to_string)
        .ok_or_else(|| format!("no access log line of a denied connection from {ip}"))
}

pub fn run(r: &mut Run) {
    r.report
        .part("Istio's AuthorizationPolicy and PeerAuthentication");
    let k = r.k().clone();
    let (node0, node1) = (r.node(0).name, r.node(1).name);
    let image = r.image("curl");
    let ns = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {OUTSIDE}\n");
    let other = Client {
        name: "other",
        namespace: NAMESPACE,
        image: &image,
        node: Some(&node0),
        ..Client::default()
    };
    let outside = Client {
        name: "outside",
        namespace: OUTSIDE,
        image: &image,
        node: Some(&node0),
        ..Client::default()
    };
    let started = apply(&k, &ns)
        .and_then(|_| apply(&k, &client(&other)))
        .and_then(|_| apply(&k, &client(&outside)))
        .and_then(|_| available(&k, NAMESPACE, &["other"], "120s"))
        .and_then(|_| available(&k, OUTSIDE, &["outside"], "120s"))
        .and_then(|_| {
            Ok((
                k.pod_of(NAMESPACE, "sleep")?,
                k.pod_of(NAMESPACE, "other")?,
                k.pod_of(OUTSIDE, "outside")?,
                k.pod_on_node(ISTIO_NS, "app=ztunnel", &node1)?,
            ))
        });
    let (sleep, other, outside, ztunnel) = match started {
        Ok(v) => v,
        Err(e) => {
            r.check(
                "clients for the policies (other in the mesh, outside not)",
                Err(e),
            );
            return;
        }
    };
    let ip = |ns: &str, pod: &str| {
        k.jsonpath(ns, &format!("pod/{pod}"), "{.status.podIP}")
            .unwrap_or_default()
    };
    let (sleep_ip, other_ip, outside_ip) = (
        ip(NAMESPACE, &sleep),
        ip(NAMESPACE, &other),
        ip(OUTSIDE, &outside),
    );
    let sleep = From {
        who: "sleep (sa/sleep)",
        namespace: NAMESPACE,
        pod: sleep,
    };
    let other = From {
        who: "other (sa/other)",
        namespace: NAMESPACE,
        pod: other,
    };
    let outside = From {
        who: "outside (no mesh)",
        namespace: OUTSIDE,
        pod: outside,
    };
    r.check(
        "no policy: all three clients answered (PERMISSIVE takes plaintext)",
        outcomes(&k, &[(&sleep, true), (&other, true), (&outside, true)]),
    );

    // Each case: a policy applied, the outcomes, the denied client's evidence.
    let cases: [Case; 4] = [
        (
            "AuthorizationPolicy DENY, namespace scope (no selector), from principal sa/sleep",
            authorization("deny-sleep", NAMESPACE, "DENY", None, "sleep", None),
            vec![(&sleep, false), (&other, true)],
            &sleep_ip,
        ),
        (
            "AuthorizationPolicy ALLOW, workload selector app=httpbin, from principal sa/other, to port 8080",
            authorization("allow-other", NAMESPACE, "ALLOW", Some("httpbin"), "other", Some("8080")),
            vec![(&other, true), (&sleep, false)],
            &sleep_ip,
        ),
        (
            "the same ALLOW to port 9090 only: sa/other on 8080 no longer matches",
            authorization("allow-other", NAMESPACE, "ALLOW", Some("httpbin"), "other", Some("9090")),
            vec![(&other, false)],
            &other_ip,
        ),
        (
            "AuthorizationPolicy DENY in the root namespace (istio-system: mesh-wide), from principal sa/other",
            authorization("mesh-deny-other", ISTIO_NS, "DENY", None, "other", None),
            vec![(&other, false), (&sleep, true)],
            &other_ip,
        ),
    ];
    for (i, (name, yaml, want, denied_ip)) in cases.into_iter().enumerate() {
        // The root-namespace case stands alone: the namespace's policies go first.
        if i == 3 {
            let _ = k.run(&["delete", "authorizationpolicy", "-n", NAMESPACE, "--all"]);
        }
        let before = denials(&k, &ztunnel);
        let result = apply(&k, &yaml).and_then(|_| outcomes(&k, &want)).and_then(|seen| {
            let logged = eventually(Duration::from_secs(20), || denial_logged(&k, &ztunnel, denied_ip))?;
            let after = eventually(Duration::from_secs(20), || {
                let n = denials(&k, &ztunnel);
                (n > before).then_some(n).ok_or_else(|| format!("istio_tcp_connections_failed_total{{response_flags=\"DENY\"}} stayed {before}"))
            })?;
            Ok(format!(
                "{seen}\naccess log: {logged}\nistio_tcp_connections_failed_total{{response_flags=\"DENY\"}} on {ztunnel}: {before} -> {after}"
            ))
        });
        r.check(name, result);
    }
    let _ = k.run(&[
        "delete",
        "authorizationpolicy",
        "-n",
        ISTIO_NS,
        "mesh-deny-other",
    ]);
    let _ = k.run(&["delete", "authorizationpolicy", "-n", NAMESPACE, "--all"]);
    r.check(
        "every policy deleted: all three answered again",
        outcomes(&k, &[(&sleep, true), (&other, true), (&outside, true)]),
    );

    let before = denials(&k, &ztunnel);
    let strict = apply(&k, STRICT).and_then(|_| outcomes(&k, &[(&outside, false), (&sleep, true)])).and_then(|seen| {
        let logged = eventually(Duration::from_secs(20), || denial_logged(&k, &ztunnel, &outside_ip))?;
        let after = denials(&k, &ztunnel);
        if after <= before {
            return Err(format!("istio_tcp_connections_failed_total{{response_flags=\"DENY\"}} stayed {before}"));
        }
        Ok(format!(
            "{seen}\naccess log: {logged}\nistio_tcp_connections_failed_total{{response_flags=\"DENY\"}}: {before} -> {after}"
        ))
    });
    r.check("PeerAuthentication STRICT: plaintext from outside the mesh refused on 15006, mTLS answered", strict);
    // The kubelet's readiness probes reach httpbin from the node, not through ztunnel.
    std::thread::sleep(Duration::from_secs(8));
    r.check(
        "under STRICT, the kubelet's readiness probes to httpbin keep passing (host probe rule)",
        k.pod_of(NAMESPACE, "httpbin")
            .and_then(|p| {
                k.jsonpath(
                    NAMESPACE,
                    &format!("pod/{p}"),
                    "{.status.conditions[?(@.type==\"Ready\")].status}",
                )
                .map(|s| (p, s))
            })
            .and_then(|(p, ready)| {
                (ready == "True")
                    .then(|| format!("{p}: Ready={ready}"))
                    .ok_or(format!("{p}: Ready={ready}"))
            }),
    );
    let _ = k.run(&["delete", "peerauthentication", "-n", NAMESPACE, "strict"]);
    let _ = k.run(&["delete", "deploy", "-n", NAMESPACE, "other"]);
    let _ = k.run(&["delete", "namespace", OUTSIDE, "--wait=false"]);
}
