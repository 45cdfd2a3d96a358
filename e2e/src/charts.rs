//! The Helm charts as the tests see them: rendered by the real `helm` (installed by
//! `cargo xtask setup`), and what the e2e harness takes from the
//! rendering, so that the charts' promises are checked against the code rather than
//! copied by hand:
//!
//! - the agent's ClusterRole, which the Kubernetes API test server enforces on every
//!   request of a [`crate::cluster::Cluster`] (as a real API server enforces RBAC);
//! - each container's capabilities, which the harness runs the binaries with
//!   (`setpriv`), so that a capability the code needs and the chart lacks fails tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// The release namespace the tests render into.
pub const NAMESPACE: &str = "istio-system";

/// `charts/<name>` in the workspace.
pub fn chart_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts")
        .join(name)
}

/// Where `cargo xtask setup` puts the tools (see `xtask/src/tools.rs`).
pub fn tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AMBIENT_TOOLS_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("ambient-inpod/tools")
}

/// A tool `cargo xtask setup` installed (`helm`, `validate/bin/kubernetes-validate`,
/// `agent-rootfs`).
pub fn tool(relative: &str) -> PathBuf {
    let path = tools_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask setup` installs it (`cargo xtask test` does it)",
        path.display()
    );
    path
}

/// `helm template` of chart `name` with an optional values file.
pub fn render(name: &str, values: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", name])
        .arg(chart_dir(name))
        .args(["--namespace", NAMESPACE]);
    if let Some(v) = values {
        cmd.arg("--values").arg(v);
    }
    crate::output(&mut cmd, None)
}

/// The documents of a multi-document YAML stream (empty ones dropped).
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("helm renders YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// The reviewed golden rendering of chart `name` with `variant` values (`default`,
/// `custom`).
pub fn golden_path(name: &str, variant: &str) -> PathBuf {
    chart_dir(name).join(format!("tests/golden-{variant}.yaml"))
}

/// The reviewed default rendering of chart `name` (`istio-cni` or `ztunnel`), read
/// once.
pub fn golden(name: &str) -> &'static [Value] {
    static CHARTS: OnceLock<[Vec<Value>; 2]> = OnceLock::new();
    let [cni, zt] = CHARTS.get_or_init(|| {
        ["istio-cni", "ztunnel"].map(|chart| {
            let path = golden_path(chart, "default");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            documents(&text)
        })
    });
    match name {
        "istio-cni" => cni,
        "ztunnel" => zt,
        other => panic!("no chart {other}"),
    }
}

/// The DaemonSet in a rendering.
pub fn daemonset(docs: &[Value]) -> &Value {
    docs.iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet")
}

/// A container of the DaemonSet in a rendering.
pub fn container<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    daemonset(docs)["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// One RBAC rule: any of `verbs` on any of `resources`, each named with its API
/// group when not the core one (`pods`, `pods/status`, `apps/daemonsets`), and only
/// the objects in `names` when it lists any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub names: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The rules of every ClusterRole in `docs`.
pub fn cluster_rules(docs: &[Value]) -> Vec<Rule> {
    docs.iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .flat_map(|d| d["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            let groups = strings(&r["apiGroups"]);
            let resources = strings(&r["resources"]);
            Rule {
                resources: groups
                    .iter()
                    .flat_map(|g| {
                        resources.iter().map(move |res| {
                            if g.is_empty() {
                                res.clone()
                            } else {
                                format!("{g}/{res}")
                            }
                        })
                    })
                    .collect(),
                verbs: strings(&r["verbs"]),
                names: strings(&r["resourceNames"]),
            }
        })
        .collect()
}

/// The agent's RBAC, from the istio-cni chart's reviewed default rendering.
pub fn agent_rules() -> Vec<Rule> {
    cluster_rules(golden("istio-cni"))
}

/// Whether `rules` let a caller `verb` the `resource` (the object `name`, for a
/// request that names one).
pub fn allows(rules: &[Rule], verb: &str, resource: &str, name: Option<&str>) -> bool {
    rules.iter().any(|r| {
        r.verbs.iter().any(|v| v == verb || v == "*")
            && r.resources.iter().any(|x| x == resource || x == "*")
            && (r.names.is_empty() || name.is_some_and(|n| r.names.iter().any(|x| x == n)))
    })
}

/// Every (verb, resource) pair `rules` grant.
pub fn grants(rules: &[Rule]) -> std::collections::BTreeSet<(String, String)> {
    rules
        .iter()
        .flat_map(|r| {
            r.verbs
                .iter()
                .flat_map(move |v| r.resources.iter().map(move |res| (v.clone(), res.clone())))
        })
        .collect()
}

/// The capabilities a container of chart `name` adds (after dropping ALL), lower
/// case as `setpriv` takes them: `["net_admin", …]`.
pub fn capabilities(docs: &[Value], name: &str) -> Vec<String> {
    let caps = &container(docs, name)["securityContext"]["capabilities"];
    assert_eq!(
        strings(&caps["drop"]),
        ["ALL"],
        "{name} must drop every capability first"
    );
    strings(&caps["add"])
        .iter()
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// `setpriv` arguments that leave a root process only `caps` (its bounding set, and
/// so its permitted and effective sets, and those of everything it runs), as a
/// container runtime does for `capabilities: {drop: [ALL], add: caps}`.
pub fn setpriv_args(caps: &[String]) -> Vec<String> {
    let set: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec!["--bounding-set".into(), set, "--".into()]
}

/// `setpriv` arguments for the agent as its chart runs it: only its capabilities.
pub fn agent_setpriv_args() -> Vec<String> {
    setpriv_args(&capabilities(golden("istio-cni"), "install-cni"))
}

/// `setpriv` arguments for ztunnel: only its chart's capabilities, and (`as_chart`)
/// root in the chart's group (`runAsGroup`, 1337 as Istio's) with no supplementary
/// groups; without it the caller picks the user.
pub fn ztunnel_setpriv_args(as_chart: bool) -> Vec<String> {
    let docs = golden("ztunnel");
    let mut args = Vec::new();
    if as_chart {
        let group = container(docs, "istio-proxy")["securityContext"]["runAsGroup"]
            .as_u64()
            .expect("ztunnel's runAsGroup");
        args = vec![format!("--regid={group}"), "--clear-groups".into()];
    }
    args.extend(setpriv_args(&capabilities(docs, "istio-proxy")));
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_grant_what_they_list_and_nothing_else() {
        let docs = vec![json!({"kind": "ClusterRole", "rules": [
            {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "watch"]},
            {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"],
             "resourceNames": ["istio-cni-node"]},
        ]})];
        let rules = cluster_rules(&docs);
        assert!(allows(&rules, "get", "pods", Some("a")));
        assert!(allows(&rules, "watch", "namespaces", None));
        assert!(!allows(&rules, "list", "pods", None));
        assert!(
            !allows(&rules, "get", "daemonsets", Some("istio-cni-node")),
            "core group"
        );
        assert!(allows(
            &rules,
            "get",
            "apps/daemonsets",
            Some("istio-cni-node")
        ));
        assert!(!allows(&rules, "get", "apps/daemonsets", Some("other")));
        assert_eq!(grants(&rules).len(), 5);
    }

    #[test]
    fn setpriv_keeps_only_the_listed_capabilities() {
        assert_eq!(
            setpriv_args(&["net_admin".into(), "sys_admin".into()]),
            ["--bounding-set", "-all,+net_admin,+sys_admin", "--"]
        );
    }
}
