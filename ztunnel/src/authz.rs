//! L4 authorization: Allow/Deny policies matched on the connection's source identity,
//! addresses and port. Any matching Deny denies; if Allow policies apply and none
//! matches, the connection is denied. `dryRun` policies are evaluated and logged only.
//!
//! Policies are indexed by scope (global, by namespace, by name for WorkloadSelector),
//! so a connection evaluates only the policies that apply to its destination, never
//! every policy in the mesh.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use tracing::info;

use crate::identity::Identity;
use crate::state::localconfig::{Action, LocalMatch, LocalPolicy, Scope};

/// A compiled match.
#[derive(Clone, Debug, Default)]
pub struct Match {
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    service_accounts: Vec<String>,
    not_service_accounts: Vec<String>,
    principals: Vec<String>,
    not_principals: Vec<String>,
    source_ips: Vec<IpNet>,
    not_source_ips: Vec<IpNet>,
    destination_ips: Vec<IpNet>,
    not_destination_ips: Vec<IpNet>,
    destination_ports: Vec<u16>,
    not_destination_ports: Vec<u16>,
}

/// A compiled policy.
#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub dry_run: bool,
    rules: Vec<Vec<Vec<Match>>>,
}

impl Policy {
    /// `namespace/name`, as workloads and logs refer to it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What is known about a connection when it is authorized.
#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    pub src_ip: IpAddr,
    /// The client's proven identity; `None` for plaintext (15006).
    pub src_identity: Option<&'a Identity>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { policy: String },
}

fn parse_nets(field: &str, values: &[String]) -> Result<Vec<IpNet>, String> {
    values
        .iter()
        .map(|v| {
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{field}: {v:?} is not an IP address or CIDR"))
        })
        .collect()
}

impl Match {
    fn compile(m: &LocalMatch) -> Result<Match, String> {
        Ok(Match {
            namespaces: m.namespaces.clone(),
            not_namespaces: m.not_namespaces.clone(),
            service_accounts: m.service_accounts.clone(),
            not_service_accounts: m.not_service_accounts.clone(),
            principals: m.principals.clone(),
            not_principals: m.not_principals.clone(),
            source_ips: parse_nets("sourceIps", &m.source_ips)?,
            not_source_ips: parse_nets("notSourceIps", &m.not_source_ips)?,
            destination_ips: parse_nets("destinationIps", &m.destination_ips)?,
            not_destination_ips: parse_nets("notDestinationIps", &m.not_destination_ips)?,
            destination_ports: m.destination_ports.clone(),
            not_destination_ports: m.not_destination_ports.clone(),
        })
    }

    /// A match that constrains nothing. Istio's ztunnel skips it: an empty `{}` must
    /// never match everything.
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }

    fn matches(&self, c: &Conn<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let id = c.src_identity;
        let ns = |v: &String| id.is_some_and(|i| &i.namespace == v);
        let sa = |v: &String| {
            id.is_some_and(|i| match v.split_once('/') {
                Some((n, s)) => i.namespace == n && i.service_account == s,
                None => &i.service_account == v,
            })
        };
        let principal = |v: &String| id.is_some_and(|i| principal_matches(v, i));
        let src = |n: &IpNet| n.contains(&c.src_ip);
        let dst = |n: &IpNet| n.contains(&c.dst_ip);
        let port = |p: &u16| *p == c.dst_port;
        positive(&self.namespaces, ns)
            && positive(&self.service_accounts, sa)
            && positive(&self.principals, principal)
            && positive(&self.source_ips, src)
            && positive(&self.destination_ips, dst)
            && positive(&self.destination_ports, port)
            && !self.not_namespaces.iter().any(ns)
            && !self.not_service_accounts.iter().any(sa)
            && !self.not_principals.iter().any(principal)
            && !self.not_source_ips.iter().any(src)
            && !self.not_destination_ips.iter().any(dst)
            && !self.not_destination_ports.iter().any(port)
    }
}

/// An empty field does not constrain; otherwise one of its values must match.
fn positive<T>(values: &[T], f: impl FnMut(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

/// Principals are written `cluster.local/ns/x/sa/y` (or with `spiffe://`), with `*`
/// allowed alone, as a prefix or as a suffix.
fn principal_matches(pattern: &str, id: &Identity) -> bool {
    let full = id.to_string();
    let bare = full.trim_start_matches("spiffe://");
    let pattern = pattern.trim_start_matches("spiffe://");
    if pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return bare.ends_with(suffix);
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return bare.starts_with(prefix);
    }
    bare == pattern
}

impl Policy {
    pub fn compile(p: &LocalPolicy) -> Result<Policy, String> {
        let rules = p
            .rules
            .iter()
            .map(|rule| {
                rule.iter()
                    .map(|clause| clause.iter().map(Match::compile).collect())
                    .collect()
            })
            .collect::<Result<_, String>>()?;
        Ok(Policy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            scope: p.scope,
            action: p.action,
            dry_run: p.dry_run,
            rules,
        })
    }

    /// Rules OR, clauses AND, matches OR, as Istio's ztunnel evaluates them: a policy
    /// without rules matches nothing; a rule without clauses, and a clause without
    /// matches, match everything; an empty match matches nothing.
    pub fn matches(&self, c: &Conn<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.iter()
                .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(c)))
        })
    }
}

/// All policies, indexed by scope.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    global: Vec<Arc<Policy>>,
    by_namespace: HashMap<String, Vec<Arc<Policy>>>,
    by_key: HashMap<String, Arc<Policy>>,
}

impl PolicySet {
    pub fn new(policies: Vec<Policy>) -> PolicySet {
        let mut set = PolicySet::default();
        for p in policies.into_iter().map(Arc::new) {
            match p.scope {
                Scope::Global => set.global.push(p.clone()),
                Scope::Namespace => set
                    .by_namespace
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                Scope::WorkloadSelector => {}
            }
            set.by_key.insert(p.key(), p);
        }
        set
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Decides a connection to a workload in `namespace` that is selected by the
    /// WorkloadSelector policies named in `selected`.
    pub fn evaluate(&self, namespace: &str, selected: &[String], c: &Conn<'_>) -> Decision {
        let applicable = self
            .global
            .iter()
            .chain(self.by_namespace.get(namespace).into_iter().flatten())
            .chain(
                selected
                    .iter()
                    .filter_map(|k| self.by_key.get(k))
                    .filter(|p| p.scope == Scope::WorkloadSelector),
            );
        let mut allow_policies = 0;
        let mut allowed = false;
        for p in applicable {
            let hit = p.matches(c);
            match (p.action, p.dry_run) {
                (Action::Deny, false) if hit => return Decision::Deny { policy: p.key() },
                (Action::Deny, true) if hit => {
                    info!(policy = %p.key(), "dry-run policy would deny this connection")
                }
                (Action::Allow, false) => {
                    allow_policies += 1;
                    allowed |= hit;
                }
                (Action::Allow, true) if !hit => {
                    info!(policy = %p.key(), "dry-run ALLOW policy does not match this connection")
                }
                _ => {}
            }
        }
        if allow_policies > 0 && !allowed {
            return Decision::Deny {
                policy: "no ALLOW policy matched".into(),
            };
        }
        Decision::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::localconfig::LocalConfig;

    fn set(yaml: &str) -> PolicySet {
        let cfg = LocalConfig::parse("t", yaml).unwrap();
        PolicySet::new(
            cfg.policies
                .iter()
                .map(|p| Policy::compile(p).unwrap())
                .collect(),
        )
    }

    fn conn<'a>(id: Option<&'a Identity>, port: u16) -> Conn<'a> {
        Conn {
            src_ip: "10.0.0.1".parse().unwrap(),
            src_identity: id,
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: port,
        }
    }

    #[test]
    fn deny_on_a_port_denies_only_that_port_in_its_namespace() {
        let s = set("policies:\n- {name: deny-9999, namespace: default, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [9999]}]]]}\n");
        assert_eq!(
            s.evaluate("default", &[], &conn(None, 9999)),
            Decision::Deny {
                policy: "default/deny-9999".into()
            }
        );
        assert_eq!(
            s.evaluate("default", &[], &conn(None, 8080)),
            Decision::Allow
        );
        assert_eq!(s.evaluate("other", &[], &conn(None, 9999)), Decision::Allow);
    }

    #[test]
    fn allow_policies_deny_what_they_do_not_match() {
        let s = set("policies:\n- {name: only-sleep, namespace: default, scope: Namespace, action: Allow, rules: [[[{principals: [cluster.local/ns/default/sa/sleep]}]]]}\n");
        let sleep = Identity::new("cluster.local", "default", "sleep");
        let other = Identity::new("cluster.local", "default", "other");
        assert_eq!(
            s.evaluate("default", &[], &conn(Some(&sleep), 80)),
            Decision::Allow
        );
        assert!(matches!(
            s.evaluate("default", &[], &conn(Some(&other), 80)),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            s.evaluate("default", &[], &conn(None, 80)),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn clauses_and_matches_and_negations() {
        // (namespace default AND port 80) with notSourceIps.
        let s = set(r#"policies:
- name: p
  namespace: ns
  scope: Global
  action: Deny
  rules: [[[{namespaces: [default]}], [{destinationPorts: [80], notSourceIps: ["10.9.0.0/16"]}]]]
"#);
        let id = Identity::new("cluster.local", "default", "a");
        assert!(matches!(
            s.evaluate("x", &[], &conn(Some(&id), 80)),
            Decision::Deny { .. }
        ));
        assert_eq!(s.evaluate("x", &[], &conn(Some(&id), 81)), Decision::Allow);
        assert_eq!(s.evaluate("x", &[], &conn(None, 80)), Decision::Allow);
        let mut c = conn(Some(&id), 80);
        c.src_ip = "10.9.1.1".parse().unwrap();
        assert_eq!(s.evaluate("x", &[], &c), Decision::Allow);
    }

    #[test]
    fn workload_selector_policies_apply_only_where_selected_and_dry_run_only_logs() {
        let s = set(r#"policies:
- {name: sel, namespace: default, scope: WorkloadSelector, action: Deny, rules: [[]]}
- {name: dry, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}
"#);
        assert_eq!(s.evaluate("default", &[], &conn(None, 80)), Decision::Allow);
        assert!(matches!(
            s.evaluate("default", &["default/sel".into()], &conn(None, 80)),
            Decision::Deny { .. }
        ));
    }

    /// One match, alone in a policy: does it match a connection from `id` (namespace,
    /// service account) at 10.0.0.1 to 10.0.0.2:`port`?
    fn one(m: &str, id: Option<(&str, &str)>, port: u16) -> bool {
        let yaml = format!(
            "policies:\n- {{name: p, namespace: n, scope: Global, action: Deny, rules: [[[{m}]]]}}\n"
        );
        let cfg = LocalConfig::parse("t", &yaml).unwrap_or_else(|e| panic!("{m}: {e}"));
        let p = Policy::compile(&cfg.policies[0]).unwrap();
        let id = id.map(|(ns, sa)| Identity::new("cluster.local", ns, sa));
        p.matches(&conn(id.as_ref(), port))
    }

    /// A match, the source identity (namespace, service account), the destination port,
    /// and whether it matches.
    type Case = (
        &'static str,
        Option<(&'static str, &'static str)>,
        u16,
        bool,
    );

    #[test]
    fn every_match_field_and_its_not_twin() {
        let x = Some(("ns-a", "sa-a"));
        #[rustfmt::skip]
        let table: &[Case] = &[
            // An empty match constrains nothing, and so matches nothing (Istio).
            ("{}", x, 80, false),
            ("{}", None, 80, false),
            ("{namespaces: [ns-a]}", x, 80, true),
            ("{namespaces: [ns-b]}", x, 80, false),
            ("{namespaces: [ns-a]}", None, 80, false),
            ("{notNamespaces: [ns-a]}", x, 80, false),
            ("{notNamespaces: [ns-b]}", x, 80, true),
            ("{notNamespaces: [ns-a]}", None, 80, true),
            ("{serviceAccounts: [sa-a]}", x, 80, true),
            ("{serviceAccounts: [ns-a/sa-a]}", x, 80, true),
            ("{serviceAccounts: [ns-b/sa-a]}", x, 80, false),
            ("{serviceAccounts: [sa-a]}", None, 80, false),
            ("{notServiceAccounts: [ns-a/sa-a]}", x, 80, false),
            ("{notServiceAccounts: [sa-b]}", x, 80, true),
            ("{notServiceAccounts: [sa-a]}", None, 80, true),
            ("{principals: [cluster.local/ns/ns-a/sa/sa-a]}", x, 80, true),
            ("{principals: [\"spiffe://cluster.local/ns/ns-a/sa/sa-a\"]}", x, 80, true),
            ("{principals: [\"cluster.local/ns/ns-a/*\"]}", x, 80, true),
            ("{principals: [\"*/sa/sa-a\"]}", x, 80, true),
            ("{principals: [\"*/sa/sa-b\"]}", x, 80, false),
            ("{principals: [\"*\"]}", x, 80, true),
            ("{principals: [\"*\"]}", None, 80, false),
            ("{notPrincipals: [\"*\"]}", x, 80, false),
            ("{notPrincipals: [\"*\"]}", None, 80, true),
            ("{sourceIps: [10.0.0.1]}", None, 80, true),
            ("{sourceIps: [10.0.0.0/24]}", None, 80, true),
            ("{sourceIps: [10.1.0.0/16]}", None, 80, false),
            ("{notSourceIps: [10.0.0.0/8]}", None, 80, false),
            ("{notSourceIps: [10.1.0.0/16]}", None, 80, true),
            ("{destinationIps: [10.0.0.2]}", None, 80, true),
            ("{destinationIps: [10.0.0.3/32]}", None, 80, false),
            ("{notDestinationIps: [10.0.0.2]}", None, 80, false),
            ("{notDestinationIps: [10.0.0.3]}", None, 80, true),
            ("{destinationPorts: [80, 443]}", None, 443, true),
            ("{destinationPorts: [80]}", None, 443, false),
            ("{notDestinationPorts: [80]}", None, 80, false),
            ("{notDestinationPorts: [80]}", None, 8080, true),
            // Fields AND within a match; values OR within a field.
            ("{namespaces: [ns-a], destinationPorts: [81]}", x, 80, false),
            ("{namespaces: [ns-b, ns-a], destinationPorts: [80]}", x, 80, true),
            ("{destinationPorts: [80], notNamespaces: [ns-a]}", x, 80, false),
        ];
        for (m, id, port, want) in table {
            assert_eq!(one(m, *id, *port), *want, "{m} from {id:?} to port {port}");
        }
    }

    #[test]
    fn empty_rules_clauses_and_matches_count_as_istio_counts_them() {
        let matches = |rules: &str| {
            let yaml = format!("policies:\n- {{name: p, namespace: n, scope: Global, action: Deny, rules: {rules}}}\n");
            let cfg = LocalConfig::parse("t", &yaml).unwrap();
            Policy::compile(&cfg.policies[0])
                .unwrap()
                .matches(&conn(None, 80))
        };
        assert!(!matches("[]"), "no rules: matches nothing");
        assert!(
            matches("[[]]"),
            "a rule without clauses: matches everything"
        );
        assert!(matches("[[[]]]"), "a clause without matches: matches");
        assert!(
            !matches("[[[{}]]]"),
            "a clause of empty matches: matches nothing"
        );
        assert!(
            matches("[[[{}, {destinationPorts: [80]}]]]"),
            "the empty one is skipped"
        );
        assert!(
            !matches("[[[], [{destinationPorts: [81]}]]]"),
            "clauses AND: the empty clause does not rescue the other"
        );
        assert!(
            matches("[[[{destinationPorts: [81]}]], [[{destinationPorts: [80]}]]]"),
            "rules OR"
        );
    }

    #[test]
    fn deny_wins_dry_run_only_logs_and_allow_policies_fence() {
        let id = Identity::new("cluster.local", "default", "sleep");
        let c = conn(Some(&id), 80);
        let both = set(r#"policies:
- {name: allow-all, namespace: default, scope: Namespace, action: Allow, rules: [[]]}
- {name: deny-80, namespace: default, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [80]}]]]}
"#);
        assert_eq!(
            both.evaluate("default", &[], &c),
            Decision::Deny {
                policy: "default/deny-80".into()
            },
            "a matching DENY beats a matching ALLOW"
        );
        let dry = set(r#"policies:
- {name: deny-80, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[[{destinationPorts: [80]}]]]}
- {name: allow-none, namespace: default, scope: Namespace, action: Allow, dryRun: true, rules: []}
"#);
        assert_eq!(
            dry.evaluate("default", &[], &c),
            Decision::Allow,
            "dry-run policies decide nothing, not even by existing"
        );
        let fence = set(r#"policies:
- {name: allow-443, namespace: default, scope: Namespace, action: Allow, rules: [[[{destinationPorts: [443]}]]]}
- {name: allow-nothing, namespace: default, scope: Namespace, action: Allow, rules: [[[{}]]]}
"#);
        assert!(matches!(
            fence.evaluate("default", &[], &c),
            Decision::Deny { .. }
        ));
        assert_eq!(
            fence.evaluate("default", &[], &conn(Some(&id), 443)),
            Decision::Allow
        );
    }

    #[test]
    fn bad_cidrs_are_rejected_with_the_field_name() {
        let cfg = LocalConfig::parse("t", "policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [[[{sourceIps: [bogus]}]]]}\n").unwrap();
        let err = Policy::compile(&cfg.policies[0]).unwrap_err();
        assert!(err.contains("sourceIps") && err.contains("bogus"), "{err}");
    }
}
