//! Istio's istio-cni settings under Istio's names.
//!
//! Istio's agent reads its settings from the environment (its chart fills it from the
//! `istio-cni-config` ConfigMap) under names of its own: `EXCLUDE_NAMESPACES`,
//! `ZTUNNEL_UDS_ADDRESS`, `MONITORING_PORT`, … Where this agent has the same setting,
//! the Istio name is read as an alias of ours, so an operator's values carry over; our
//! own name, or a flag on the command line, wins. Istio settings this agent has no
//! equivalent for are either harmless to ignore (said once at startup) or would change
//! what the operator gets (refused, with the reason).

/// One Istio name that maps onto one of our flags.
struct Alias {
    istio: &'static str,
    ours: &'static str,
    flag: &'static str,
    /// Istio's value as our flag's value (`Err`: a message for the operator).
    value: fn(&str) -> Result<String, String>,
}

fn same(v: &str) -> Result<String, String> {
    Ok(v.to_string())
}

fn port_to_addr(v: &str) -> Result<String, String> {
    v.trim()
        .parse::<u16>()
        .map(|p| format!("0.0.0.0:{p}"))
        .map_err(|_| format!("not a port number: {v:?}"))
}

const ALIASES: &[Alias] = &[
    Alias {
        istio: "EXCLUDE_NAMESPACES",
        ours: "AMBIENT_EXCLUDED_NAMESPACES",
        flag: "--excluded-namespaces",
        value: same,
    },
    Alias {
        istio: "ZTUNNEL_UDS_ADDRESS",
        ours: "ZTUNNEL_UDS",
        flag: "--ztunnel-uds",
        value: same,
    },
    Alias {
        istio: "CNI_EVENT_ADDRESS",
        ours: "PLUGIN_EVENT_SOCKET",
        flag: "--plugin-event-socket",
        value: same,
    },
    Alias {
        istio: "MONITORING_PORT",
        ours: "MONITORING_ADDR",
        flag: "--monitoring-addr",
        value: port_to_addr,
    },
    Alias {
        istio: "MOUNTED_CNI_NET_DIR",
        ours: "CNI_CONF_DIR",
        flag: "--cni-conf-dir",
        value: same,
    },
];

/// An Istio setting with no equivalent here, and what a value of it means.
struct Unsupported {
    name: &'static str,
    /// The boolean value that matters (Go's syntax); `None`: any value.
    when: Option<bool>,
    /// Refused (the agent stops) rather than noted and ignored.
    refuse: bool,
    why: &'static str,
}

/// Refusals first: a setting that would change what the operator gets stops the
/// agent; the others are said once at startup.
const UNSUPPORTED: [Unsupported; 5] = [
    Unsupported {
        name: "CHAINED_CNI_PLUGIN",
        when: Some(false),
        refuse: true,
        why: "this agent only chains its plugin into the node's primary CNI config; set it to true",
    },
    Unsupported {
        name: "AMBIENT_ENABLED",
        when: Some(false),
        refuse: true,
        why: "this agent is the ambient node agent and has no sidecar mode; set it to true",
    },
    Unsupported {
        name: "AMBIENT_DNS_CAPTURE",
        when: Some(true),
        refuse: false,
        why: "DNS capture is not implemented (pods' DNS goes to their resolver, outside the mesh as before)",
    },
    Unsupported {
        name: "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP",
        when: Some(false),
        refuse: false,
        why: "this agent always verifies enrolled pods' rules at startup and repairs drift",
    },
    Unsupported {
        name: "AMBIENT_ENABLEMENT_SELECTOR",
        when: None,
        refuse: false,
        why: "pods are selected by istio.io/dataplane-mode on the pod or its namespace",
    },
];

/// Every Istio name this agent reads.
pub fn istio_names() -> Vec<&'static str> {
    ALIASES
        .iter()
        .map(|a| a.istio)
        .chain(UNSUPPORTED.iter().map(|u| u.name))
        .collect()
}

/// Go's `strconv.ParseBool`, which Istio's agent reads its booleans with.
pub fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// What the Istio names in the environment amount to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Translated {
    /// Flags to put before the command line's own (`--flag=value`).
    pub args: Vec<String>,
    /// Lines for the startup print: what was read, and what is ignored and why.
    pub notes: Vec<String>,
}

/// Reads Istio's names from `env` (skipping those whose flag is already in `argv` or
/// whose name of ours is set). `Err` names a setting this agent cannot honour, so that
/// it stops rather than run differently from what the operator asked for.
pub fn translate(
    env: impl Fn(&str) -> Option<String>,
    argv: &[String],
) -> Result<Translated, String> {
    let mut out = Translated::default();
    for a in ALIASES {
        let Some(v) = env(a.istio) else { continue };
        let given = argv
            .iter()
            .any(|x| x == a.flag || x.starts_with(&format!("{}=", a.flag)));
        if given || env(a.ours).is_some() {
            out.notes.push(format!(
                "{}: ignored, {} is set",
                a.istio,
                if given { a.flag } else { a.ours }
            ));
            continue;
        }
        let value = (a.value)(&v).map_err(|e| format!("{}: {e}", a.istio))?;
        out.notes.push(format!("{}: read as {}", a.istio, a.ours));
        out.args.push(format!("{}={value}", a.flag));
    }
    for u in &UNSUPPORTED {
        let Some(v) = env(u.name) else { continue };
        if let Some(when) = u.when {
            let value = parse_go_bool(v.trim())
                .ok_or_else(|| format!("{}: not a boolean: {v:?}", u.name))?;
            if value != when {
                continue;
            }
        }
        if u.refuse {
            return Err(format!("{}={v}: {}", u.name, u.why));
        }
        out.notes.push(format!("{}: ignored, {}", u.name, u.why));
    }
    Ok(out)
}

/// `argv` with the translated flags put right after the program name, before any
/// subcommand.
pub fn with_args(argv: Vec<String>, extra: Vec<String>) -> Vec<String> {
    let mut it = argv.into_iter();
    let mut out: Vec<String> = it.next().into_iter().collect();
    out.extend(extra);
    out.extend(it);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(pairs: &[(&str, &str)], argv: &[&str]) -> Result<Translated, String> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        translate(|k| env.get(k).cloned(), &argv)
    }

    #[test]
    fn istio_names_become_our_flags() {
        let t = run(
            &[
                ("EXCLUDE_NAMESPACES", "kube-system,istio-system"),
                ("MONITORING_PORT", "15999"),
                ("ZTUNNEL_UDS_ADDRESS", "/run/z.sock"),
                ("CNI_EVENT_ADDRESS", "/run/ev.sock"),
                ("MOUNTED_CNI_NET_DIR", "/host/etc/cni/net.d"),
                ("CHAINED_CNI_PLUGIN", "true"),
                ("AMBIENT_ENABLED", "true"),
            ],
            &["istio-cni"],
        )
        .unwrap();
        assert_eq!(
            t.args,
            [
                "--excluded-namespaces=kube-system,istio-system",
                "--ztunnel-uds=/run/z.sock",
                "--plugin-event-socket=/run/ev.sock",
                "--monitoring-addr=0.0.0.0:15999",
                "--cni-conf-dir=/host/etc/cni/net.d",
            ]
        );
        assert_eq!(t.notes.len(), 5, "{:?}", t.notes);
    }

    #[test]
    fn our_names_and_the_command_line_win() {
        let t = run(
            &[
                ("EXCLUDE_NAMESPACES", "a"),
                ("AMBIENT_EXCLUDED_NAMESPACES", "b"),
                ("MONITORING_PORT", "1"),
            ],
            &["istio-cni", "--monitoring-addr=127.0.0.1:9"],
        )
        .unwrap();
        assert!(t.args.is_empty(), "{:?}", t.args);
        assert_eq!(
            t.notes,
            [
                "EXCLUDE_NAMESPACES: ignored, AMBIENT_EXCLUDED_NAMESPACES is set",
                "MONITORING_PORT: ignored, --monitoring-addr is set",
            ]
        );
    }

    #[test]
    fn settings_we_cannot_honour_are_refused_by_name() {
        for (k, v) in [
            ("CHAINED_CNI_PLUGIN", "false"),
            ("AMBIENT_ENABLED", "0"),
            ("MONITORING_PORT", "http"),
            ("AMBIENT_DNS_CAPTURE", "yes"),
        ] {
            let e = run(&[(k, v)], &["istio-cni"]).unwrap_err();
            assert!(e.starts_with(k), "{e}");
        }
    }

    #[test]
    fn harmless_istio_settings_are_noted() {
        let t = run(
            &[
                ("AMBIENT_DNS_CAPTURE", "True"),
                ("AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", "false"),
                ("AMBIENT_ENABLEMENT_SELECTOR", "- podSelector: {}"),
            ],
            &["istio-cni"],
        )
        .unwrap();
        assert!(t.args.is_empty());
        assert_eq!(t.notes.len(), 3);
        assert!(t.notes[0].starts_with("AMBIENT_DNS_CAPTURE: ignored"));
    }

    #[test]
    fn flags_go_before_a_subcommand() {
        let argv = vec!["istio-cni".to_string(), "diagnose".into(), "x".into()];
        assert_eq!(
            with_args(argv, vec!["--a=1".into()]),
            ["istio-cni", "--a=1", "diagnose", "x"]
        );
    }
}
