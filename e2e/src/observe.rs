//! What the specification's "Observing the inpod traffic redirection" section checks,
//! as functions of what an operator's commands print: ztunnel's log, `ss -ntlp` and
//! `iptables-save` inside a pod, ztunnel's access log. The local e2e tests and
//! `cargo xtask kind-e2e` (on a real cluster, through kubectl) make the same checks.

use std::collections::BTreeSet;

use crate::node::normalize_save;

/// The specification's in-pod ruleset (IPv4), as `iptables-save` prints it.
pub const SPEC_SAVE: &str = include_str!("../../istio-cni/testdata/spec-iptables-save.txt");
/// Its IPv6 counterpart, as `ip6tables-save` prints it.
pub const SPEC6_SAVE: &str = include_str!("../../istio-cni/testdata/ip6tables-save.txt");
/// ztunnel's ports in every enrolled pod: outbound, inbound plaintext, inbound HBONE.
pub const INPOD_PORTS: [u16; 3] = [15001, 15006, 15008];

/// The LISTEN rows of `ss -ntl[p]` output (with or without its header) as (port,
/// process column: empty without `-p`).
pub fn listeners(ss: &str) -> Vec<(u16, &str)> {
    ss.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // "LISTEN 0 128 *:15001 *:* users:((…))": the local address is the 4th
            // column, the process the 6th.
            if cols.first() != Some(&"LISTEN") {
                return None;
            }
            let port = cols.get(3)?.rsplit(':').next()?.parse().ok()?;
            Some((port, cols.get(5).copied().unwrap_or("")))
        })
        .collect()
}

/// The ports in LISTEN state in `ss -ntl[p]` output.
pub fn listening_ports(ss: &str) -> BTreeSet<u16> {
    listeners(ss).into_iter().map(|(port, _)| port).collect()
}

/// ztunnel's three listeners are open in the pod.
pub fn check_listeners(ss: &str) -> Result<(), String> {
    let ports = listening_ports(ss);
    let missing: Vec<u16> = INPOD_PORTS
        .into_iter()
        .filter(|p| !ports.contains(p))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "no listener on {missing:?} in the pod; ss says:\n{ss}"
        ))
    }
}

/// The pod's IPv4 rules are exactly the specification's (one copy, nothing missing).
pub fn check_rules(iptables_save: &str) -> Result<(), String> {
    let have = normalize_save(iptables_save);
    let want = normalize_save(SPEC_SAVE);
    if have == want {
        return Ok(());
    }
    let have_lines: BTreeSet<&str> = have.lines().collect();
    let want_lines: BTreeSet<&str> = want.lines().collect();
    let missing: Vec<&&str> = want_lines.difference(&have_lines).collect();
    let extra: Vec<&&str> = have_lines.difference(&want_lines).collect();
    Err(format!(
        "the pod's rules differ from the specification's; missing: {missing:#?}; extra: {extra:#?}"
    ))
}

/// ztunnel's log shows in-pod mode and `pods` pods handed over and proxied, in lines a
/// log pipeline can read (no terminal escape codes).
pub fn check_inpod_log(log: &str, pods: usize) -> Result<(), String> {
    if let Some(line) = log.lines().find(|l| l.contains('\u{1b}')) {
        return Err(format!(
            "ztunnel's log carries terminal escape codes, which hide its fields from log pipelines: {line:?}"
        ));
    }
    for line in [
        "inpod_enabled: true",
        "ztunnel::inpod::workloadmanager: handling new stream",
        "ztunnel::inpod::statemanager: pod received snapshot sent",
    ] {
        if !log.contains(line) {
            return Err(format!("ztunnel's log lacks {line:?}"));
        }
    }
    let started = log
        .lines()
        .filter(|l| {
            l.contains("ztunnel::inpod::statemanager: pod WorkloadUid(")
                && l.contains("received netns, starting proxy")
        })
        .count();
    if started < pods {
        return Err(format!(
            "ztunnel started proxies for {started} pod(s), expected at least {pods}"
        ));
    }
    Ok(())
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn spiffe(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// An access log line proves a connection between the two identities (mutual TLS: each
/// side proved its own).
pub fn check_mtls_access_log(log: &str, src: &str, dst: &str) -> Result<(), String> {
    let (s, d) = (
        format!("src.identity=\"{src}\""),
        format!("dst.identity=\"{dst}\""),
    );
    if log.lines().any(|l| l.contains(&s) && l.contains(&d)) {
        Ok(())
    } else {
        Err(format!(
            "no access log line with both identities ({src} -> {dst}) in ztunnel's log"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SS: &str = "State  Recv-Q Send-Q Local Address:Port  Peer Address:PortProcess
LISTEN 0      128        127.0.0.1:15080      0.0.0.0:*
LISTEN 0      128                *:15006            *:*
LISTEN 0      128                *:15001            *:*
LISTEN 0      128                *:15008            *:*
";

    #[test]
    fn the_specifications_ss_output_passes_and_a_missing_port_is_named() {
        assert_eq!(
            listening_ports(SS),
            BTreeSet::from([15001, 15006, 15008, 15080])
        );
        assert!(check_listeners(SS).is_ok());
        let without = SS.replace("*:15008", "*:8080");
        assert!(check_listeners(&without).unwrap_err().contains("[15008]"));
        assert!(check_listeners("").is_err());
    }

    #[test]
    fn the_specifications_rules_pass_and_a_duplicate_or_a_gap_fails() {
        assert!(check_rules(SPEC_SAVE).is_ok());
        let capture = "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001";
        assert!(SPEC_SAVE.contains(capture));
        let missing = SPEC_SAVE.replace(capture, "");
        assert!(check_rules(&missing).unwrap_err().contains("15001"));
        let twice = SPEC_SAVE.replace(capture, &format!("{capture}\n{capture}"));
        assert!(check_rules(&twice).is_err());
    }

    #[test]
    fn the_specifications_ztunnel_log_passes() {
        let log = "inpod_enabled: true
inpod_uds: /var/run/ztunnel/ztunnel.sock
2024-02-21T22:01:49.916037Z  INFO ztunnel::inpod::workloadmanager: handling new stream
2024-02-21T22:01:49.919944Z  INFO ztunnel::inpod::statemanager: pod WorkloadUid(\"1e05\") received netns, starting proxy
2024-02-21T22:01:49.925997Z  INFO ztunnel::inpod::statemanager: pod received snapshot sent
";
        assert!(check_inpod_log(log, 1).is_ok());
        assert!(check_inpod_log(log, 2).unwrap_err().contains("1 pod"));
        let coloured = log.replace(" INFO ", " \u{1b}[32m INFO\u{1b}[0m ");
        assert!(check_inpod_log(&coloured, 1)
            .unwrap_err()
            .contains("escape codes"));
        assert!(check_inpod_log("", 0).is_err());
    }

    #[test]
    fn an_access_line_must_carry_both_identities() {
        let (a, b) = (
            spiffe("cluster.local", "demo", "sleep"),
            spiffe("cluster.local", "demo", "httpbin"),
        );
        let line =
            format!("INFO access: connection complete src.identity=\"{a}\" dst.identity=\"{b}\"");
        assert!(check_mtls_access_log(&line, &a, &b).is_ok());
        assert!(check_mtls_access_log(&line, &b, &a).is_err());
        assert!(check_mtls_access_log("src.identity=\"x\"", &a, &b).is_err());
    }
}
