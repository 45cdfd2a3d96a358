//! Authorization policies, as Istio's ztunnel models them (its `Authorization`), and
//! their index by scope. Deciding a connection is the authorizer's job (`crate::authz`);
//! this module only says what a policy is and which ones apply to a workload.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;

use super::workload::Workload;

/// `namespace/name`: how workloads refer to the WorkloadSelector policies selecting them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey(pub String);

impl PolicyKey {
    pub fn new(namespace: &str, name: &str) -> PolicyKey {
        PolicyKey(format!("{namespace}/{name}"))
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum Scope {
    /// Every workload in the mesh.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// The workloads that list it in their `authorizationPolicies`.
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

/// A string test, as Istio writes it: `{Exact: x}`, `{Prefix: x}`, `{Suffix: x}`,
/// `{Presence: []}` (any non-empty value).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(x) => s == x,
            StringMatch::Prefix(x) => s.starts_with(x.as_str()),
            StringMatch::Suffix(x) => s.ends_with(x.as_str()),
            StringMatch::Presence => !s.is_empty(),
        }
    }
}

/// A service account, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// One match: every field given must match (any of its values), and no `not_…` field
/// may match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Matched against the source identity without its `spiffe://`.
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    /// A match that constrains nothing (Istio skips it rather than match everything).
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }
}

/// An authorization policy. Its rules are ORed, a rule's clauses ANDed, a clause's
/// matches ORed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub rules: Vec<Vec<Vec<Match>>>,
    /// Evaluated and logged, never enforced.
    pub dry_run: bool,
}

impl Policy {
    pub fn key(&self) -> PolicyKey {
        PolicyKey::new(&self.namespace, &self.name)
    }
}

/// Every policy, indexed so that a connection looks only at those that apply to its
/// destination: the global ones, its namespace's, and those it is selected by.
#[derive(Clone, Debug, Default)]
pub struct PolicyIndex {
    global: Vec<Arc<Policy>>,
    by_namespace: HashMap<String, Vec<Arc<Policy>>>,
    by_key: HashMap<PolicyKey, Arc<Policy>>,
}

impl PolicyIndex {
    pub(super) fn new(policies: impl IntoIterator<Item = Arc<Policy>>) -> PolicyIndex {
        let mut index = PolicyIndex::default();
        for p in policies {
            match p.scope {
                Scope::Global => index.global.push(p.clone()),
                Scope::Namespace => index
                    .by_namespace
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                Scope::WorkloadSelector => {}
            }
            index.by_key.insert(p.key(), p);
        }
        index
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn get(&self, key: &PolicyKey) -> Option<&Arc<Policy>> {
        self.by_key.get(key)
    }

    /// Every policy, in no particular order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_key.values()
    }

    /// The policies that apply to connections to `dst`, as Istio gathers them: global,
    /// then `dst`'s namespace, then each policy `dst` names (whatever its scope).
    pub fn applicable<'a>(&'a self, dst: &'a Workload) -> impl Iterator<Item = &'a Policy> + 'a {
        self.global
            .iter()
            .chain(self.by_namespace.get(&dst.namespace).into_iter().flatten())
            .chain(
                dst.authorization_policies
                    .iter()
                    .filter_map(|k| self.by_key.get(k)),
            )
            .map(Arc::as_ref)
    }
}
