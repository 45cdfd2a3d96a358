//! What `istio-cni diagnose` found for a pod, and what it makes of it: each problem
//! with what to do next. Pure functions over the findings, so the judgement is
//! unit-tested without a node.

use serde::Serialize;

use super::report::PodReport;

/// The ports ztunnel listens on inside every enrolled pod.
pub const ZTUNNEL_PORTS: [(u16, &str); 3] = [
    (15001, "outbound"),
    (15006, "inbound plaintext"),
    (15008, "inbound HBONE"),
];

/// A listening TCP socket in the pod, and its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub port: u16,
    pub process: Option<String>,
    pub pid: Option<u32>,
}

/// ztunnel's certificate for the pod's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertView {
    pub identity: String,
    pub state: String,
    pub expires: Option<String>,
}

/// What ztunnel's admin API says of the pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum ZtunnelView {
    /// No ztunnel is connected to the agent (and no admin address was given).
    NotConnected,
    /// Its admin API could not be read.
    Unreachable { admin: String, error: String },
    /// It has a proxy for the pod.
    Known {
        admin: String,
        state: String,
        error: Option<String>,
        certificate: Option<CertView>,
    },
    /// It has no proxy for the pod.
    Unknown { admin: String },
}

/// Everything looked at for one pod.
#[derive(Clone, Debug, Serialize)]
pub struct PodFindings {
    pub pod: PodReport,
    /// The netns looked into, or why it could not be.
    pub netns: Result<String, String>,
    /// Differences between the live redirection and the expected one (empty: none),
    /// or why it could not be read. `None` without a netns.
    pub rules: Option<Result<Vec<String>, String>>,
    /// Listening sockets in the pod, or why they could not be listed.
    pub listeners: Option<Result<Vec<Listener>, String>>,
    pub ztunnel: ZtunnelView,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub what: String,
    pub next: String,
}

fn problem(what: impl Into<String>, next: impl Into<String>) -> Problem {
    Problem {
        what: what.into(),
        next: next.into(),
    }
}

/// The problems in `f`, most fundamental first; none means healthy.
pub fn problems(f: &PodFindings) -> Vec<Problem> {
    let mut out = Vec::new();
    let pod = &f.pod;
    if let Some(reason) = &pod.unrepairable {
        out.push(problem(
            format!("the agent gave up on this pod's redirection: {reason}"),
            "if the pod still runs, delete it so that kubelet recreates its sandbox (a new sandbox is enrolled afresh)",
        ));
    }
    match pod.state.as_str() {
        "captured" => {}
        "unlocated" => out.push(problem(
            "the agent has not found this pod's sandbox since it restarted (node reboot?)",
            "wait for kubelet to recreate the sandbox; if the pod is Running, check the agent's log for its uid",
        )),
        "no-sandbox" => out.push(problem(
            "the pod's sandbox was torn down (CNI DEL) and no new one is enrolled yet",
            "wait for kubelet's next sandbox; its CNI ADD enrolls it",
        )),
        other => out.push(problem(
            format!("the pod is not in the mesh (state {other})"),
            "label its namespace istio.io/dataplane-mode=ambient if it should be",
        )),
    }
    if let Err(e) = &f.netns {
        if pod.state == "captured" {
            out.push(problem(
                format!("cannot enter the pod's netns: {e}"),
                "run diagnose as root on the pod's node (or in the istio-cni pod)",
            ));
        }
    }
    match &f.rules {
        Some(Ok(diffs)) => out.extend(diffs.iter().map(|d| {
            problem(
                format!("redirection drifted: {d}"),
                "the agent repairs drift at its next check (DRIFT_CHECK_INTERVAL); if it comes back, something in the pod or on the node rewrites its rules",
            )
        })),
        Some(Err(e)) => out.push(problem(
            format!("cannot read the pod's rules: {e}"),
            "check that iptables and iproute2 work on the node",
        )),
        None => {}
    }
    match &f.listeners {
        Some(Ok(listeners)) => {
            for (port, role) in ZTUNNEL_PORTS {
                match listeners.iter().find(|l| l.port == port) {
                    None => out.push(problem(
                        format!("nothing listens on {port} ({role}) in the pod: its redirected traffic is refused"),
                        "ztunnel is not serving this pod: check that ztunnel runs on the node and its log for the pod's uid",
                    )),
                    Some(l) if l.process.as_deref().is_some_and(|p| p != "ztunnel") => out.push(problem(
                        format!(
                            "port {port} ({role}) is held by {} (pid {}), not ztunnel",
                            l.process.as_deref().unwrap_or("?"),
                            l.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                        ),
                        "the application uses a port ztunnel needs; move it off 15001, 15006 and 15008",
                    )),
                    Some(_) => {}
                }
            }
        }
        Some(Err(e)) => out.push(problem(
            format!("cannot list the pod's listeners: {e}"),
            "check that ss (iproute2) is installed on the node",
        )),
        None => {}
    }
    match &f.ztunnel {
        ZtunnelView::NotConnected => out.push(problem(
            "no ztunnel is connected to the agent",
            "check the ztunnel DaemonSet's pod on this node and its log",
        )),
        ZtunnelView::Unreachable { admin, error } => out.push(problem(
            format!("cannot read ztunnel's admin API at {admin}: {error}"),
            "pass --ztunnel-admin ADDR if ztunnel's admin listens elsewhere",
        )),
        ZtunnelView::Unknown { admin } => out.push(problem(
            format!("ztunnel (admin {admin}) has no proxy for this pod"),
            "ztunnel lost the pod or never got it: its log shows why; restarting the agent resends every pod",
        )),
        ZtunnelView::Known {
            state,
            error,
            certificate,
            ..
        } => {
            if state != "Up" {
                out.push(problem(
                    format!(
                        "ztunnel's proxy for the pod is {state}{}",
                        error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                    "ztunnel retries it; its log says why it cannot start",
                ));
            }
            if let Some(c) = certificate.as_ref().filter(|c| c.state != "Available") {
                out.push(problem(
                    format!("ztunnel's certificate for {} is {}", c.identity, c.state),
                    "check ztunnel's connection to the CA (istiod) in its log",
                ));
            }
        }
    }
    if pod.state == "captured" && pod.annotation.as_deref() != Some("enabled") {
        out.push(problem(
            format!(
                "the pod is annotated {} (ztunnel has not confirmed it): its traffic fails closed",
                pod.annotation.as_deref().unwrap_or("nothing")
            ),
            "see the ztunnel problems above, or its log for the pod's uid",
        ));
    }
    out
}

/// The text report of one pod.
pub fn render(f: &PodFindings, problems: &[Problem]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let p = &f.pod;
    let _ = writeln!(s, "pod {}/{} (uid {})", p.namespace, p.name, p.uid);
    let _ = writeln!(
        s,
        "  enrollment  {}{}, annotation {}",
        p.state,
        if p.acked { ", acked by ztunnel" } else { "" },
        p.annotation.as_deref().unwrap_or("none")
    );
    match &f.netns {
        Ok(id) => {
            let _ = writeln!(s, "  netns       {id}");
        }
        Err(e) => {
            let _ = writeln!(s, "  netns       unavailable: {e}");
        }
    }
    match &f.rules {
        Some(Ok(d)) if d.is_empty() => {
            let _ = writeln!(s, "  rules       as expected (iptables and policy route)");
        }
        Some(Ok(d)) => {
            let _ = writeln!(s, "  rules       {} difference(s)", d.len());
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "  rules       unreadable: {e}");
        }
        None => {}
    }
    if let Some(Ok(listeners)) = &f.listeners {
        let ports: Vec<String> = ZTUNNEL_PORTS
            .iter()
            .map(
                |(port, _)| match listeners.iter().find(|l| l.port == *port) {
                    Some(l) => format!(
                        "{port} {}{}",
                        l.process.as_deref().unwrap_or("?"),
                        l.pid.map(|p| format!("[{p}]")).unwrap_or_default()
                    ),
                    None => format!("{port} -"),
                },
            )
            .collect();
        let _ = writeln!(s, "  listeners   {}", ports.join(", "));
    }
    let zt = match &f.ztunnel {
        ZtunnelView::NotConnected => "none connected".to_string(),
        ZtunnelView::Unreachable { admin, .. } => format!("admin {admin} unreachable"),
        ZtunnelView::Unknown { admin } => format!("admin {admin}: pod unknown"),
        ZtunnelView::Known {
            admin,
            state,
            certificate,
            ..
        } => format!(
            "admin {admin}: proxy {state}{}",
            certificate
                .as_ref()
                .map(|c| format!(
                    "; certificate {} {}{}",
                    c.identity,
                    c.state,
                    c.expires
                        .as_deref()
                        .map(|e| format!(", expires {e}"))
                        .unwrap_or_default()
                ))
                .unwrap_or_default()
        ),
    };
    let _ = writeln!(s, "  ztunnel     {zt}");
    if problems.is_empty() {
        let _ = writeln!(s, "  verdict     HEALTHY");
    } else {
        let _ = writeln!(s, "  verdict     {} PROBLEM(S)", problems.len());
        for pr in problems {
            let _ = writeln!(s, "    - {}\n      next: {}", pr.what, pr.next);
        }
    }
    s
}

/// `ss -ntlpH` output as listeners; lines that do not parse are skipped.
pub fn parse_ss(text: &str) -> Vec<Listener> {
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let port = cols.get(3)?.rsplit(':').next()?.parse().ok()?;
            let users = cols.get(5).copied().unwrap_or("");
            // users:(("ztunnel",pid=123,fd=20),...)
            let process = users
                .split('"')
                .nth(1)
                .filter(|p| !p.is_empty())
                .map(str::to_string);
            let pid = users
                .split("pid=")
                .nth(1)
                .and_then(|r| r.split([',', ')']).next())
                .and_then(|p| p.parse().ok());
            Some(Listener { port, process, pid })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> PodFindings {
        PodFindings {
            pod: PodReport {
                uid: "u1".into(),
                namespace: "demo".into(),
                name: "sleep".into(),
                state: "captured".into(),
                acked: true,
                annotation: Some("enabled".into()),
                ..Default::default()
            },
            netns: Ok("net:[1]".into()),
            rules: Some(Ok(vec![])),
            listeners: Some(Ok(ZTUNNEL_PORTS
                .iter()
                .map(|(port, _)| Listener {
                    port: *port,
                    process: Some("ztunnel".into()),
                    pid: Some(7),
                })
                .collect())),
            ztunnel: ZtunnelView::Known {
                admin: "127.0.0.1:15000".into(),
                state: "Up".into(),
                error: None,
                certificate: None,
            },
        }
    }

    #[test]
    fn a_healthy_pod_has_no_problem() {
        let f = healthy();
        assert_eq!(problems(&f), vec![]);
        assert!(render(&f, &[]).contains("verdict     HEALTHY"));
    }

    #[test]
    fn each_fault_is_named() {
        let mut f = healthy();
        f.rules = Some(Ok(vec!["IPv4 missing: nat: -A ISTIO_OUTPUT -j X".into()]));
        let p = problems(&f);
        assert_eq!(p.len(), 1);
        assert!(p[0]
            .what
            .contains("IPv4 missing: nat: -A ISTIO_OUTPUT -j X"));

        let mut f = healthy();
        f.listeners = Some(Ok(vec![Listener {
            port: 15008,
            process: Some("nginx".into()),
            pid: Some(9),
        }]));
        let whats: Vec<String> = problems(&f).into_iter().map(|p| p.what).collect();
        assert!(whats.iter().any(|w| w.contains("nothing listens on 15001")));
        assert!(whats.iter().any(|w| w.contains("nothing listens on 15006")));
        assert!(whats.iter().any(|w| w.contains("held by nginx (pid 9)")));

        let mut f = healthy();
        f.ztunnel = ZtunnelView::Unknown { admin: "x".into() };
        assert!(problems(&f)[0].what.contains("has no proxy for this pod"));

        let mut f = healthy();
        f.ztunnel = ZtunnelView::NotConnected;
        f.pod.annotation = Some("pending".into());
        let whats: Vec<String> = problems(&f).into_iter().map(|p| p.what).collect();
        assert_eq!(whats.len(), 2, "{whats:?}");
        assert!(whats[1].contains("annotated pending"));
    }

    #[test]
    fn ss_lines_give_ports_and_owners() {
        let text = "LISTEN 0 1024 0.0.0.0:15001 0.0.0.0:* users:((\"ztunnel\",pid=4242,fd=31))\n\
                    LISTEN 0 128 [::]:8080 [::]:*\n\
                    garbage\n";
        assert_eq!(
            parse_ss(text),
            vec![
                Listener {
                    port: 15001,
                    process: Some("ztunnel".into()),
                    pid: Some(4242)
                },
                Listener {
                    port: 8080,
                    process: None,
                    pid: None
                }
            ]
        );
    }
}
