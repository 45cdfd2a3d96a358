//! Property tests on every parser the agent and the plugin feed with input from
//! outside the process: the plugin's stdin (network config and `prevResult`) and
//! `CNI_ARGS`, the plugin <-> agent messages, conflist files, `iptables-save` output,
//! `/proc/<pid>/cgroup`, kubeconfig files. Each returns a value or an error, never
//! panics. `PROPTEST_CASES` sets the number of cases (256 by default;
//! `cargo xtask proptest` runs many more).

use std::collections::HashMap;
use std::path::Path;

use istio_cni::cni::event::{check_version, Request, Response};
use istio_cni::cni::install::chain;
use istio_cni::cni::kubeconfig::{render, Credentials};
use istio_cni::cni::plugin::run;
use istio_cni::discovery::pod_uid_in_cgroup;
use istio_cni::rules::render::{render as render_rules, RuleConfig};
use istio_cni::rules::save::{drift, parse_save};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,30}".prop_map(Value::from),
        "10\\.0\\.[0-9]{1,3}\\.[0-9]{1,3}/[0-9]{1,2}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::hash_map(
                prop_oneof![
                    Just("cniVersion".to_string()),
                    Just("type".to_string()),
                    Just("plugins".to_string()),
                    Just("prevResult".to_string()),
                    Just("ips".to_string()),
                    Just("address".to_string()),
                    Just("kubeconfig".to_string()),
                    Just("exclude_namespaces".to_string()),
                    ".{0,12}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #[test]
    fn prop_plugin_stdin_and_args_never_panic(
        stdin in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            json_value().prop_map(|v| v.to_string().into_bytes()),
            (json_value(), prop_oneof![Just("0.3.1"), Just("1.0.0"), Just("1.1.0"), Just("9")])
                .prop_map(|(prev, v)| json!({"cniVersion": v, "name": "n", "type": "istio-cni", "prevResult": prev}).to_string().into_bytes()),
        ],
        command in prop_oneof![
            Just("ADD".to_string()),
            Just("DEL".to_string()),
            Just("CHECK".to_string()),
            Just("VERSION".to_string()),
            Just("GC".to_string()),
            ".{0,8}",
        ],
        // No pod name, or one in an excluded namespace: no network call is made.
        args in prop_oneof![
            ".{0,60}",
            "[a-z]{0,8}".prop_map(|n| format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME={n}")),
        ],
    ) {
        let env: HashMap<String, String> = [
            ("CNI_COMMAND", command.as_str()),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_ARGS", args.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let _ = runtime().block_on(run(&env, &stdin));
    }

    #[test]
    fn prop_plugin_messages_parse_or_fail_cleanly(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            json_value().prop_map(|v| v.to_string().into_bytes()),
        ],
    ) {
        if let Ok(req) = serde_json::from_slice::<Request>(&bytes) {
            let _ = check_version(req.version);
        }
        let _ = serde_json::from_slice::<Response>(&bytes);
    }

    #[test]
    fn prop_conflist_files_are_chained_or_refused(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            json_value().prop_map(|v| v.to_string().into_bytes()),
            proptest::collection::vec(json_value(), 0..4)
                .prop_map(|p| json!({"cniVersion": "1.0.0", "name": "n", "plugins": p}).to_string().into_bytes()),
        ],
        name in prop_oneof![Just("10-net.conflist"), Just("10-net.conf")],
    ) {
        let ours = json!({"type": "istio-cni", "kubeconfig": "/etc/cni/net.d/istio-cni-kubeconfig"});
        if let Ok(Some(out)) = chain(Path::new(name), &bytes, &ours) {
            // What we write is a conflist that ends with us, and chaining it again is a no-op.
            let list = Path::new("10-net.conflist");
            prop_assert!(matches!(chain(list, &out, &ours), Ok(None)));
        }
    }

    #[test]
    fn prop_iptables_save_output_parses_or_fails_cleanly(
        text in prop_oneof![
            ".{0,400}",
            proptest::collection::vec(
                prop_oneof![
                    Just("*nat".to_string()),
                    Just("*mangle".to_string()),
                    Just("COMMIT".to_string()),
                    Just(":ISTIO_OUTPUT - [0:0]".to_string()),
                    Just(":PREROUTING ACCEPT [1:2]".to_string()),
                    Just("-A OUTPUT -j ISTIO_OUTPUT".to_string()),
                    Just("-A PREROUTING -j ISTIO_PRERT".to_string()),
                    "-A [A-Z_]{0,12} .{0,40}",
                    "[:*#-].{0,30}",
                ],
                0..30,
            )
            .prop_map(|lines| lines.join("\n")),
        ],
    ) {
        let expected = render_rules(&RuleConfig::default(), istio_cni::rules::Family::V4);
        if let Ok(saved) = parse_save(&text) {
            let _ = drift(&expected, &saved);
        }
    }

    #[test]
    fn prop_cgroup_files_never_panic(text in ".{0,300}", uid in "[0-9a-f_-]{0,40}") {
        let _ = pod_uid_in_cgroup(&text);
        let _ = pod_uid_in_cgroup(&format!("0::/kubepods/besteffort/pod{uid}/c\n{text}"));
    }

    #[test]
    fn prop_kubeconfig_files_render_or_fail_cleanly(
        text in prop_oneof![
            ".{0,300}",
            json_value().prop_map(|v| v.to_string()),
            (".{0,20}", ".{0,20}", ".{0,20}").prop_map(|(server, ctx, user)| format!(
                "clusters:\n- name: c\n  cluster: {{server: '{server}', certificate-authority: nope}}\nusers:\n- name: u\n  user: {{tokenFile: {user}}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: {ctx}\n"
            )),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, text).unwrap();
        let _ = render(&Credentials::File(path));
    }
}
