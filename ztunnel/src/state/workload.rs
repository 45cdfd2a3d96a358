//! Workloads: what ztunnel knows of a pod (or VM) in the mesh, and the typed keys the
//! rest of the model refers to workloads and services by.
//!
//! The types are Istio's ztunnel's model, field for field: every source (the local
//! file, xDS) fills all of it, and the parts no feature reads yet are kept, not dropped.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;

use super::policy::PolicyKey;
use crate::identity::Identity;

/// A workload's uid, its primary key (`Kubernetes//Pod/default/server` from istiod).
/// Shared, not copied: every index and endpoint that names a workload holds the same
/// string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(pub Arc<str>);

impl Default for Uid {
    fn default() -> Self {
        Uid(Arc::from(""))
    }
}

impl From<&str> for Uid {
    fn from(s: &str) -> Self {
        Uid(Arc::from(s))
    }
}

impl std::borrow::Borrow<str> for Uid {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key that did not parse, with what it should look like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not {expected}")]
pub struct KeyError {
    pub value: String,
    pub expected: &'static str,
}

/// `namespace/hostname`: how workloads and waypoints name a service. Shared strings:
/// every endpoint a workload declares names its service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    pub namespace: Arc<str>,
    pub hostname: Arc<str>,
}

impl NamespacedHostname {
    pub fn new(namespace: &str, hostname: &str) -> NamespacedHostname {
        NamespacedHostname {
            namespace: namespace.into(),
            hostname: hostname.into(),
        }
    }
}

impl FromStr for NamespacedHostname {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s.split_once('/') {
            Some((namespace, hostname)) => Ok(NamespacedHostname::new(namespace, hostname)),
            None => Err(KeyError {
                value: s.into(),
                expected: "\"<namespace>/<hostname>\"",
            }),
        }
    }
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

/// `network/ip`: an address is only meaningful within its network; the network may
/// be empty (`/10.96.0.10`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl FromStr for NetworkAddress {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let err = || KeyError {
            value: s.into(),
            expected: "\"<network>/<ip>\"",
        };
        let (network, ip) = s.split_once('/').ok_or_else(err)?;
        Ok(NetworkAddress {
            network: network.into(),
            address: ip.parse().map_err(|_| err())?,
        })
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

/// How a workload is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum Protocol {
    /// Not in the mesh: plain TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// In the mesh: HBONE (mutual TLS, HTTP/2 CONNECT) on port 15008.
    #[serde(rename = "HBONE")]
    Hbone,
}

/// A host-network workload shares the node's addresses: it is never found by address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum NetworkMode {
    #[default]
    Standard,
    HostNetwork,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// Where a waypoint or network gateway is: an address, or a service by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    Address(NetworkAddress),
    Hostname(NamespacedHostname),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum TunnelProtocol {
    #[serde(rename = "NONE")]
    None,
    #[serde(rename = "PROXY")]
    Proxy,
}

/// How the workload's own application expects tunnelled traffic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ApplicationTunnel {
    pub protocol: TunnelProtocol,
    pub port: Option<u16>,
}

/// A workload in the mesh (or known to it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: Uid,
    pub name: String,
    pub namespace: String,
    /// Empty in a source means `cluster.local` (the builder fills it in).
    pub trust_domain: String,
    /// Empty in a source means `default` (the builder fills it in).
    pub service_account: String,
    pub network: String,
    pub ips: Vec<IpAddr>,
    /// Boxed: most workloads have neither, and a mesh holds many workloads.
    pub waypoint: Option<Box<GatewayAddress>>,
    pub network_gateway: Option<Box<GatewayAddress>>,
    pub protocol: Protocol,
    pub network_mode: NetworkMode,
    pub workload_name: String,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub hostname: String,
    /// The node it runs on: ztunnel serves only the pods of its own node.
    pub node: String,
    pub native_tunnel: bool,
    pub application_tunnel: Option<ApplicationTunnel>,
    /// WorkloadSelector policies (`namespace/name`) that select it.
    pub authorization_policies: Vec<PolicyKey>,
    pub status: HealthStatus,
    pub cluster_id: String,
    pub locality: Locality,
    /// The services it backs (its ports in each are on the service's endpoints).
    pub services: Vec<NamespacedHostname>,
    /// Relative weight among a service's endpoints.
    pub capacity: u32,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            uid: Uid::default(),
            name: String::new(),
            namespace: String::new(),
            trust_domain: String::new(),
            service_account: String::new(),
            network: String::new(),
            ips: Vec::new(),
            waypoint: None,
            network_gateway: None,
            protocol: Protocol::default(),
            network_mode: NetworkMode::default(),
            workload_name: String::new(),
            workload_type: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            hostname: String::new(),
            node: String::new(),
            native_tunnel: false,
            application_tunnel: None,
            authorization_policies: Vec::new(),
            status: HealthStatus::default(),
            cluster_id: String::new(),
            locality: Locality::default(),
            services: Vec::new(),
            capacity: 1,
        }
    }
}

/// The trust domain of a workload istiod sends without one (Istio's default mesh
/// trust domain, which istiod leaves out).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

impl Workload {
    /// The defaults every source applies: an empty trust domain is `trust_domain`
    /// (from xDS, Istio's [`DEFAULT_TRUST_DOMAIN`]; from the local file, ztunnel's
    /// `TRUST_DOMAIN`), an empty service account `default`.
    pub fn with_defaults(mut self, trust_domain: &str) -> Workload {
        if self.trust_domain.is_empty() {
            self.trust_domain = trust_domain.into();
        }
        if self.service_account.is_empty() {
            self.service_account = "default".into();
        }
        self
    }

    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// Its address in `family`'s preference: the first of that family, else none.
    pub fn ip_for(&self, v6: bool) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }

    /// How Istio ranks workloads that share an address: a pod over anything else, then
    /// one in the mesh over one outside it.
    pub(super) fn address_rank(&self) -> u8 {
        let pod = self.uid.0.contains("//Pod/");
        let hbone = self.protocol == Protocol::Hbone;
        (pod as u8) * 2 + hbone as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_print_back() {
        let nh: NamespacedHostname = "default/svc.default.svc.cluster.local".parse().unwrap();
        assert_eq!(&*nh.namespace, "default");
        assert_eq!(nh.to_string(), "default/svc.default.svc.cluster.local");
        assert!("no-slash".parse::<NamespacedHostname>().is_err());
        let na: NetworkAddress = "/10.96.0.10".parse().unwrap();
        assert_eq!(
            (na.network.as_str(), na.address.to_string()),
            ("", "10.96.0.10".into())
        );
        let na6: NetworkAddress = "net1/fd00::1".parse().unwrap();
        assert_eq!(na6.to_string(), "net1/fd00::1");
        for bad in ["10.96.0.10", "net/10.96.0", "/"] {
            let err = bad.parse::<NetworkAddress>().unwrap_err().to_string();
            assert!(err.contains("<network>/<ip>"), "{err}");
        }
    }

    #[test]
    fn a_pod_in_the_mesh_outranks_other_workloads_at_its_address() {
        let w = |uid: &str, protocol| Workload {
            uid: Uid::from(uid),
            protocol,
            ..Workload::default()
        };
        let ranks = [
            w("Kubernetes//Pod/ns/a", Protocol::Hbone).address_rank(),
            w("Kubernetes//Pod/ns/a", Protocol::Tcp).address_rank(),
            w("c/networking.istio.io/WorkloadEntry/ns/a", Protocol::Hbone).address_rank(),
            w("c/networking.istio.io/WorkloadEntry/ns/a", Protocol::Tcp).address_rank(),
        ];
        assert_eq!(ranks, [3, 2, 1, 0]);
    }
}
