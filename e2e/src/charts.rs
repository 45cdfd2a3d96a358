//! What the e2e harness takes from the charts' renderings (read by the `charts`
//! crate), so that the charts' promises are checked against the code rather than
//! copied by hand:
//!
//! - the agent's ClusterRole, which the Kubernetes API test server enforces on every
//!   request of a [`crate::cluster::Cluster`] (as a real API server enforces RBAC);
//! - each container's capabilities, which the harness runs the binaries with
//!   (`setpriv`), so that a capability the code needs and the chart lacks fails tests.

pub use charts::rbac::{allows, cluster_rules, grants, Rule};
pub use charts::{
    capabilities, chart_dir, container, daemonset, documents, golden, golden_path, render, tool,
    tools_dir, NAMESPACE,
};

/// The agent's RBAC, from the istio-cni chart's reviewed default rendering.
pub fn agent_rules() -> Vec<Rule> {
    cluster_rules(golden("istio-cni"))
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
