//! What the agent leaves behind when it stops.
//!
//! Stopping is either a pause or a departure. An upgrade, a rollout restart or a node
//! restart is a pause: another agent of the same DaemonSet follows on this node, so
//! the plugin, its chain entry and kubeconfig stay, and new pods wait for that agent
//! instead of starting without redirection. `helm uninstall` (or a DaemonSet that no
//! longer places a pod on this node) is a departure: nothing follows, and a plugin left
//! behind would fail every new pod on the node once its token died with the agent's
//! pod. So on a departure the agent takes out everything it put on the node.
//!
//! The agent tells the two apart as Istio's does, by asking the API server about its
//! own DaemonSet ([`look_up`]): present and still scheduling here is a pause; gone,
//! being deleted, or no longer scheduling here is a departure, and so is being refused
//! (401: the service account was deleted; 403: the RBAC was), which is what an
//! uninstall looks like when the chart's objects go before the pod does. When the API
//! server gives no answer either way, the plugin stays: new pods wait (fail closed)
//! rather than start uncaptured, and the agent says what to remove by hand.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm};
use kube::Api;

/// The agent's DaemonSet, in its own namespace (the chart's name, and Istio's).
pub const DAEMONSET: &str = "istio-cni-node";

/// What the API server said of the agent's DaemonSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// It exists and is not being deleted; whether it still places a pod on this node
    /// (its node selector and required node affinity).
    Present { schedules_here: bool },
    /// It has a deletion timestamp.
    Deleting,
    /// 404.
    NotFound,
    /// 401: the agent's token no longer authenticates (its service account is gone).
    Unauthorized,
    /// 403: the agent may no longer read it (its RBAC is gone).
    Forbidden,
    /// Nothing that says either way (no answer, a server error), after retries.
    Unknown(String),
}

/// What to do on the way out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Leave the plugin, its chain entry and kubeconfig, and the host probe rules.
    Keep(String),
    /// Remove them, and tell every enrolled pod that it keeps its redirection.
    Uninstall(String),
}

/// The settings that decide without asking.
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// `UNINSTALL_CNI_ON_EXIT`: always remove.
    pub uninstall_on_exit: bool,
    /// `AMBIENT_DISABLE_SAFE_UPGRADE` (Istio's): always remove, even on an upgrade.
    pub disable_safe_upgrade: bool,
}

impl Settings {
    /// The plan when a setting decides it; `None` when the API server must be asked.
    pub fn forced(self) -> Option<Plan> {
        if self.uninstall_on_exit {
            Some(Plan::Uninstall("UNINSTALL_CNI_ON_EXIT is set".into()))
        } else if self.disable_safe_upgrade {
            Some(Plan::Uninstall(
                "AMBIENT_DISABLE_SAFE_UPGRADE is set: no upgrade keeps the plugin".into(),
            ))
        } else {
            None
        }
    }
}

/// The plan for what the API server said.
pub fn decide(lookup: &Lookup) -> Plan {
    let ds = DAEMONSET;
    match lookup {
        Lookup::Present {
            schedules_here: true,
        } => Plan::Keep(format!(
            "DaemonSet {ds} is still present: an upgrade or a restart, its next pod follows"
        )),
        Lookup::Present {
            schedules_here: false,
        } => Plan::Uninstall(format!(
            "DaemonSet {ds} no longer places a pod on this node"
        )),
        Lookup::Deleting => Plan::Uninstall(format!("DaemonSet {ds} is being deleted")),
        Lookup::NotFound => Plan::Uninstall(format!("DaemonSet {ds} is gone")),
        Lookup::Unauthorized => Plan::Uninstall(
            "the API server no longer accepts this agent's token: its service account was deleted"
                .into(),
        ),
        Lookup::Forbidden => Plan::Uninstall(format!(
            "this agent may no longer read DaemonSet {ds}: its RBAC was deleted"
        )),
        Lookup::Unknown(why) => Plan::Keep(format!(
            "cannot tell whether istio-cni is being uninstalled ({why}); the plugin stays, so \
             new pods on this node wait for an agent rather than start without redirection"
        )),
    }
}

/// Whether `ds` places a pod on `node`: its node selector, and its required node
/// affinity (any term; a term matches when all of its requirements do).
pub fn schedules_to(ds: &DaemonSet, node: &Node) -> bool {
    let Some(pod) = ds.spec.template.spec.as_ref() else {
        return true;
    };
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let selected = pod
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let required = pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    selected
        && required.is_none_or(|r| {
            r.node_selector_terms
                .iter()
                .any(|t| term_matches(t, labels, name))
        })
}

/// A term with no requirement matches nothing, as in Kubernetes.
fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>, name: &str) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    let by_name = BTreeMap::from([("metadata.name".to_string(), name.to_string())]);
    exprs.iter().all(|r| requirement_matches(r, labels))
        && fields.iter().all(|r| requirement_matches(r, &by_name))
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    let compare = |f: fn(i64, i64) -> bool| match (
        value.and_then(|v| number(v)),
        values.first().and_then(|v| number(v)),
    ) {
        (Some(have), Some(bound)) => f(have, bound),
        _ => false,
    };
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => compare(|a, b| a > b),
        "Lt" => compare(|a, b| a < b),
        // An operator this agent does not know: the DaemonSet is taken to still
        // schedule here (the plugin stays; fail closed).
        _ => true,
    }
}

/// How long the look-up may take in all: the pod's grace period (10 s in the chart)
/// must leave room for the removal itself.
const LOOKUP_BUDGET: Duration = Duration::from_secs(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the API server about the agent's DaemonSet in `namespace` (and, when it has a
/// node selector or affinity, about `node`), retrying what says nothing either way
/// within a few seconds.
pub async fn look_up(client: &kube::Client, namespace: &str, node: &str) -> Lookup {
    let deadline = tokio::time::Instant::now() + LOOKUP_BUDGET;
    loop {
        let lookup =
            match tokio::time::timeout(ATTEMPT_TIMEOUT, once(client, namespace, node)).await {
                Ok(l) => l,
                Err(_) => Lookup::Unknown(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
            };
        if !matches!(lookup, Lookup::Unknown(_))
            || tokio::time::Instant::now() + ATTEMPT_TIMEOUT > deadline
        {
            return lookup;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn once(client: &kube::Client, namespace: &str, node: &str) -> Lookup {
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let ds = match daemonsets.get(DAEMONSET).await {
        Ok(ds) => ds,
        Err(kube::Error::Api(e)) if e.code == 404 => return Lookup::NotFound,
        Err(kube::Error::Api(e)) if e.code == 401 => return Lookup::Unauthorized,
        Err(kube::Error::Api(e)) if e.code == 403 => return Lookup::Forbidden,
        Err(e) => return Lookup::Unknown(e.to_string()),
    };
    if ds.metadata.deletion_timestamp.is_some() {
        return Lookup::Deleting;
    }
    let placed = ds
        .spec
        .template
        .spec
        .as_ref()
        .is_some_and(|p| p.node_selector.is_some() || p.affinity.is_some());
    if !placed {
        return Lookup::Present {
            schedules_here: true,
        };
    }
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.get(node).await {
        Ok(n) => Lookup::Present {
            schedules_here: schedules_to(&ds, &n),
        },
        // The node is unreadable: nothing says the DaemonSet left it.
        Err(e) => {
            tracing::warn!("reading node {node} to check DaemonSet {DAEMONSET}'s placement: {e}");
            Lookup::Present {
                schedules_here: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ds(spec: serde_json::Value) -> DaemonSet {
        serde_json::from_value(json!({
            "metadata": {"name": DAEMONSET},
            "spec": {"selector": {}, "template": {"spec": spec}}
        }))
        .unwrap()
    }

    fn node(name: &str, labels: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    #[test]
    fn only_a_present_daemonset_that_still_schedules_here_keeps_the_plugin() {
        let keep = |l: &Lookup| matches!(decide(l), Plan::Keep(_));
        assert!(keep(&Lookup::Present {
            schedules_here: true
        }));
        // Uninstalled, in every way it shows.
        for gone in [
            Lookup::Present {
                schedules_here: false,
            },
            Lookup::Deleting,
            Lookup::NotFound,
            Lookup::Unauthorized,
            Lookup::Forbidden,
        ] {
            assert!(!keep(&gone), "{gone:?} must uninstall");
        }
        // No answer: the plugin stays (new pods wait rather than go uncaptured), and
        // the reason says so.
        match decide(&Lookup::Unknown("connection refused".into())) {
            Plan::Keep(why) => assert!(why.contains("connection refused") && why.contains("wait")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn settings_decide_before_the_api_server_is_asked() {
        assert_eq!(Settings::default().forced(), None);
        let explicit = Settings {
            uninstall_on_exit: true,
            ..Settings::default()
        };
        assert!(matches!(explicit.forced(), Some(Plan::Uninstall(_))));
        let unsafe_upgrade = Settings {
            disable_safe_upgrade: true,
            ..Settings::default()
        };
        assert!(
            matches!(unsafe_upgrade.forced(), Some(Plan::Uninstall(w)) if w.contains("AMBIENT_DISABLE_SAFE_UPGRADE"))
        );
    }

    #[test]
    fn placement_follows_the_node_selector_and_required_affinity() {
        let linux = node(
            "w1",
            json!({"kubernetes.io/os": "linux", "pool": "a", "cores": "8"}),
        );
        assert!(schedules_to(&ds(json!({"containers": []})), &linux));
        assert!(schedules_to(
            &ds(json!({"containers": [], "nodeSelector": {"kubernetes.io/os": "linux"}})),
            &linux
        ));
        assert!(!schedules_to(
            &ds(json!({"containers": [], "nodeSelector": {"pool": "b"}})),
            &linux
        ));
        let affinity = |terms: serde_json::Value| {
            ds(json!({"containers": [], "affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}}))
        };
        let expr = |key: &str, op: &str, values: &[&str]| {
            affinity(
                json!([{"matchExpressions": [{"key": key, "operator": op, "values": values}]}]),
            )
        };
        assert!(schedules_to(&expr("pool", "In", &["a", "c"]), &linux));
        assert!(!schedules_to(&expr("pool", "NotIn", &["a"]), &linux));
        assert!(schedules_to(&expr("zone", "NotIn", &["x"]), &linux));
        assert!(schedules_to(&expr("pool", "Exists", &[]), &linux));
        assert!(!schedules_to(&expr("pool", "DoesNotExist", &[]), &linux));
        assert!(schedules_to(&expr("cores", "Gt", &["4"]), &linux));
        assert!(!schedules_to(&expr("cores", "Lt", &["4"]), &linux));
        assert!(
            !schedules_to(&expr("pool", "Gt", &["4"]), &linux),
            "not a number"
        );
        // Terms are alternatives; the requirements of one term all apply.
        let terms = affinity(json!([
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["w1"]}]}
        ]));
        assert!(schedules_to(&terms, &linux));
        assert!(!schedules_to(&terms, &node("w2", json!({"pool": "a"}))));
        let both = affinity(json!([{
            "matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}],
            "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["w1"]}]
        }]));
        assert!(!schedules_to(&both, &linux));
        assert!(
            !schedules_to(&affinity(json!([{}])), &linux),
            "an empty term matches nothing"
        );
    }
}
