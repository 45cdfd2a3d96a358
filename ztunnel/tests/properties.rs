//! Property tests on every parser ztunnel feeds with input from outside the process:
//! the local config file (and the state built from it), durations from the
//! environment, peers' certificates. Each returns a value or an error, never panics.
//! (ZDS datagrams are covered in the protocol crate, HBONE headers beside their
//! parser.) `PROPTEST_CASES` sets the number of cases (256 by default;
//! `cargo xtask proptest` runs many more).

use proptest::prelude::*;
use serde_json::{json, Value};
use ztunnel::config::parse_duration;
use ztunnel::state::localconfig::LocalConfig;
use ztunnel::state::watch::load_str;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[0-9a-f:./]{0,20}",
        Just("10.0.0.1".to_string()),
        Just("fd00::1".to_string()),
        Just("/10.96.0.1".to_string()),
        Just("*".to_string()),
    ]
}

fn list<T: std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
    proptest::collection::vec(s, 0..4)
}

/// A config document with the right shape and arbitrary values (JSON is YAML), so
/// parsing gets past the schema and into validation.
fn config_doc() -> impl Strategy<Value = Value> {
    let workload = (
        text(),
        text(),
        text(),
        list(text()),
        any::<bool>(),
        list((text(), any::<u16>(), any::<u16>())),
    )
        .prop_map(|(name, ns, sa, ips, hbone, svcs)| {
            let services: serde_json::Map<String, Value> = svcs
                .into_iter()
                .map(|(k, p, t)| (k, json!({ p.to_string(): t })))
                .collect();
            json!({"uid": format!("c//v1/Pod/{ns}/{name}"), "name": name, "namespace": ns,
                   "serviceAccount": sa, "workloadIps": ips,
                   "protocol": if hbone { "HBONE" } else { "TCP" }, "services": services})
        });
    let service = (text(), text(), text(), list(text()), any::<u16>(), any::<u16>()).prop_map(
        |(name, ns, host, vips, p, t)| {
            json!({"name": name, "namespace": ns, "hostname": host, "vips": vips, "ports": { p.to_string(): t }})
        },
    );
    let string_match = || {
        (0u8..4, text()).prop_map(|(kind, v)| match kind {
            0 => json!({ "Exact": v }),
            1 => json!({ "Prefix": v }),
            2 => json!({ "Suffix": v }),
            _ => json!({ "Presence": [] }),
        })
    };
    let account =
        (text(), text()).prop_map(|(ns, sa)| json!({"namespace": ns, "serviceAccount": sa}));
    let matches = (
        list(string_match()),
        list(string_match()),
        list(account),
        list(text()),
        list(any::<u16>()),
    )
        .prop_map(|(ns, principals, accounts, ips, ports)| {
            json!({"namespaces": ns, "notPrincipals": principals, "serviceAccounts": accounts,
                   "sourceIps": ips.clone(), "notDestinationIps": ips, "destinationPorts": ports})
        });
    let policy = (
        text(),
        text(),
        0u8..3,
        any::<bool>(),
        list(list(list(matches))),
    )
        .prop_map(|(name, ns, scope, allow, rules)| {
            let scope = ["Global", "Namespace", "WorkloadSelector"][scope as usize];
            json!({"name": name, "namespace": ns,
                   "scope": scope, "dryRun": false,
                   "action": if allow { "Allow" } else { "Deny" }, "rules": rules})
        });
    (list(workload), list(service), list(policy))
        .prop_map(|(w, s, p)| json!({"workloads": w, "services": s, "policies": p}))
}

proptest! {
    #[test]
    fn prop_local_config_text_parses_or_fails_cleanly(text in ".{0,400}") {
        let _ = load_str("p.yaml", &text, None);
    }

    #[test]
    fn prop_local_config_values_validate_or_fail_cleanly(doc in config_doc()) {
        let _ = load_str("p.yaml", &doc.to_string(), Some("node-1"));
    }

    #[test]
    fn prop_durations_parse_or_fail_cleanly(s in prop_oneof![".{0,30}", "[0-9]{0,25}(ms|s|m|h|d)?"]) {
        if let Ok(d) = parse_duration(&s) {
            prop_assert!(d <= ztunnel::config::MAX_DURATION);
            // Whatever is accepted can be added to the clocks it is used with.
            prop_assert!(std::time::SystemTime::now().checked_add(d).is_some());
            prop_assert!(std::time::Instant::now().checked_add(d).is_some());
        }
    }

    #[test]
    fn prop_peer_certificates_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = ztunnel::tls::identity_of(&rustls::pki_types::CertificateDer::from(bytes));
    }
}

#[test]
fn a_billion_laughs_config_is_refused_not_expanded() {
    let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = format!("*a{}", i - 1);
        yaml.push_str(&format!(
            "a{i}: &a{i} [{prev}, {prev}, {prev}, {prev}, {prev}, {prev}, {prev}, {prev}, {prev}, {prev}]\n"
        ));
    }
    yaml.push_str("workloads: *a11\n");
    assert!(LocalConfig::parse("laughs.yaml", &yaml).is_err());
}
