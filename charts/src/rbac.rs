//! Kubernetes RBAC as the stand-in API server enforces it and the chart tests read
//! it: the rules of a rendering's ClusterRoles, and whether they allow a request.

use serde_json::Value;

/// One RBAC rule: any of `verbs` on any of `resources`, each named with its API
/// group when not the core one (`pods`, `pods/status`, `apps/daemonsets`), and only
/// the objects in `names` when it lists any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub names: Vec<String>,
}

/// The strings of a JSON array (none for anything else).
pub fn strings(v: &Value) -> Vec<String> {
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
