//! ztunnel's local configuration file (`LOCAL_XDS_PATH`): workloads, services and
//! authorization policies in the schema Istio's ztunnel reads from its local config,
//! so one file drives either implementation. Unknown fields are rejected.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    #[serde(default)]
    pub services: Vec<LocalService>,
    #[serde(default)]
    pub policies: Vec<LocalPolicy>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum Protocol {
    /// In the mesh: reached over HBONE (mTLS) on port 15008.
    #[serde(rename = "HBONE")]
    Hbone,
    /// Not in the mesh: plain TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    #[serde(default)]
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_sa")]
    pub service_account: String,
    #[serde(default = "default_td")]
    pub trust_domain: String,
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub node: String,
    /// `"<namespace>/<hostname>"` -> service port -> target port.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// `"<namespace>/<name>"` of WorkloadSelector policies that select this workload.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
}

fn default_sa() -> String {
    "default".into()
}

fn default_td() -> String {
    "cluster.local".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `"<network>/<ip>"`; the network may be empty (`"/10.96.0.10"`).
    #[serde(default)]
    pub vips: Vec<String>,
    /// Service port -> target port.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Scope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    #[serde(default)]
    pub dry_run: bool,
    /// Rules are ORed, a rule's clauses ANDed, a clause's matches ORed.
    #[serde(default)]
    pub rules: Vec<Vec<Vec<LocalMatch>>>,
}

/// One match: every field given must match (any of its values), and no `not…` field
/// may match.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalMatch {
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub source_ips: Vec<String>,
    #[serde(default)]
    pub not_source_ips: Vec<String>,
    #[serde(default)]
    pub destination_ips: Vec<String>,
    #[serde(default)]
    pub not_destination_ips: Vec<String>,
    #[serde(default)]
    pub destination_ports: Vec<u16>,
    #[serde(default)]
    pub not_destination_ports: Vec<u16>,
}

/// A configuration error, naming where in the file it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {location}: {message}")]
    Invalid {
        path: String,
        location: String,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

impl LocalConfig {
    /// Parses YAML text; `path` names the source in errors. serde's messages name the
    /// unknown or invalid field and the line and column where it is.
    pub fn parse(path: &str, text: &str) -> Result<LocalConfig, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  trustDomain: cluster.local
  workloadIps: ["10.244.0.3"]
  protocol: HBONE
  node: node-1
  services: {"default/server.default.svc.cluster.local": {80: 8080}}
services:
- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8080}
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Deny
  dryRun: false
  rules: [[[{destinationPorts: [9999]}]]]
"#;

    #[test]
    fn the_design_example_parses() {
        let cfg = LocalConfig::parse("example.yaml", DESIGN_EXAMPLE).unwrap();
        assert_eq!(cfg.workloads[0].protocol, Protocol::Hbone);
        assert_eq!(
            cfg.workloads[0].services["default/server.default.svc.cluster.local"][&80],
            8080
        );
        assert_eq!(cfg.services[0].ports[&80], 8080);
        assert_eq!(cfg.policies[0].rules[0][0][0].destination_ports, [9999]);
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field_and_line() {
        let err = LocalConfig::parse(
            "c.yaml",
            "workloads:\n- name: a\n  namespace: b\n  colour: red\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("colour") && err.contains("line 4"), "{err}");
        let err = LocalConfig::parse(
            "c.yaml",
            "workloads:\n- name: a\n  namespace: b\n  workloadIps: [nope]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("workloadIps") || err.contains("IP"), "{err}");
        let err = LocalConfig::parse(
            "c.yaml",
            "policies:\n- {name: p, namespace: n, scope: Everywhere, action: Deny}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Everywhere"), "{err}");
    }
}
