//! The local configuration file (`LOCAL_XDS_PATH`) in Istio's ztunnel's schema: the
//! same fields, names, required fields and defaults, so one file drives either
//! implementation. These types are the file's shape only; [`super::translate`] turns
//! them into the domain model, and nothing outside `state` names them.
//!
//! Where Istio's parser silently ignores a key (unknown keys inside a policy match, a
//! service-account match or a locality), ours rejects it: a typo there would otherwise
//! change what a policy means without a word.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::policy::{Action, Scope};
use super::service::{HealthPolicy, IpFamily, LoadBalancerMode, RoutingScope};
use super::workload::{HealthStatus, NetworkMode, Protocol, TunnelProtocol};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    #[serde(default)]
    pub policies: Vec<LocalPolicy>,
    #[serde(default)]
    pub services: Vec<LocalService>,
}

fn one() -> u32 {
    1
}

/// A workload, and the services it backs (`services` is required, as in Istio: write
/// `services: {}` for none).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub waypoint: Option<LocalGateway>,
    #[serde(default)]
    pub network_gateway: Option<LocalGateway>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub network_mode: NetworkMode,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub workload_type: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub native_tunnel: bool,
    #[serde(default)]
    pub application_tunnel: Option<LocalApplicationTunnel>,
    /// `namespace/name` of the WorkloadSelector policies that select it.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    #[serde(default)]
    pub status: HealthStatus,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub locality: LocalLocality,
    #[serde(default = "one")]
    pub capacity: u32,
    /// `namespace/hostname` -> service port -> target port.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLocality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// A waypoint or network gateway: `destination` is `network/ip` or
/// `namespace/hostname`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalGateway {
    pub destination: String,
    pub hbone_mtls_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalApplicationTunnel {
    pub protocol: TunnelProtocol,
    pub port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `network/ip`; the network may be empty (`/10.96.0.10`).
    pub vips: Vec<String>,
    /// Service port -> target port.
    pub ports: BTreeMap<u16, u16>,
    /// Keyed by workload uid.
    #[serde(default)]
    pub endpoints: BTreeMap<String, LocalEndpoint>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub waypoint: Option<LocalGateway>,
    #[serde(default)]
    pub load_balancer: Option<LocalLoadBalancer>,
    #[serde(default)]
    pub ip_families: Option<IpFamily>,
    #[serde(default)]
    pub canonical: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalEndpoint {
    pub workload_uid: String,
    pub port: BTreeMap<u16, u16>,
    pub status: HealthStatus,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalLoadBalancer {
    pub routing_preferences: Vec<RoutingScope>,
    pub mode: LoadBalancerMode,
    pub health_policy: HealthPolicy,
}

/// An authorization policy: every field is required, `dryRun` included.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Rules are ORed, a rule's clauses ANDed, a clause's matches ORed.
    pub rules: Vec<Vec<Vec<LocalMatch>>>,
    pub dry_run: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalMatch {
    #[serde(default)]
    pub namespaces: Vec<LocalStringMatch>,
    #[serde(default)]
    pub not_namespaces: Vec<LocalStringMatch>,
    #[serde(default)]
    pub service_accounts: Vec<LocalServiceAccountMatch>,
    #[serde(default)]
    pub not_service_accounts: Vec<LocalServiceAccountMatch>,
    #[serde(default)]
    pub principals: Vec<LocalStringMatch>,
    #[serde(default)]
    pub not_principals: Vec<LocalStringMatch>,
    /// CIDRs (`10.0.0.0/8`, `10.0.0.1/32`).
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

/// `{Exact: x}`, `{Prefix: x}`, `{Suffix: x}` or `{Presence: []}`.
#[derive(Debug, Deserialize)]
pub enum LocalStringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence(),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
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
    /// Parses YAML text; `path` names the source in errors, which give the line and
    /// column and name the field. YAML 1.2 booleans only (`yes` is not `true`), and a
    /// key given twice is an error, as with Istio's parser.
    pub fn parse(path: &str, text: &str) -> Result<LocalConfig, ConfigError> {
        let options = serde_saphyr::options! {
            strict_booleans: true,
            duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
            with_snippet: false,
        };
        serde_saphyr::from_str_with_options(text, options).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e
                .to_string()
                .trim_start_matches("error: ")
                .trim_end()
                .to_string(),
        })
    }
}
