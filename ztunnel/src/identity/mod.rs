//! Workload identities (SPIFFE IDs), the local CA that signs their certificates when
//! there is no control plane, and the manager that keeps them fresh.
//!
//! - [`Identity`], written `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`ca`]: a root certificate + key from PEM files (RSA or ECDSA) signing short-lived
//!   ECDSA P-256 workload certificates.
//! - [`source`]: the seam certificates come through ([`source::CertSource`]).
//! - [`manager`]: one certificate per identity, from a source, renewed at half-life.

pub mod ca;
pub mod manager;
pub mod source;

use std::fmt;
use std::str::FromStr;

/// A workload's SPIFFE identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not a SPIFFE workload identity (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {reason}")]
pub struct IdentityError {
    pub uri: String,
    pub reason: &'static str,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let err = |reason| IdentityError {
            uri: uri.to_string(),
            reason,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("no spiffe:// scheme"))?;
        let mut parts = rest.split('/');
        let (td, ns_kw, ns, sa_kw, sa) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        );
        if parts.next().is_some() {
            return Err(err("extra path segments"));
        }
        match (td, ns_kw, ns, sa_kw, sa) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa)) => {
                if ![td, ns, sa].iter().all(|s| valid_segment(s)) {
                    return Err(err("empty segment or invalid character"));
                }
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(err("path is not /ns/<namespace>/sa/<service-account>")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_uri() {
        let id = Identity::new("cluster.local", "default", "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.to_string().parse::<Identity>().unwrap(), id);
    }

    #[test]
    fn malformed_uris_say_what_is_wrong() {
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/namespace/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/a b/sa/c",
        ] {
            let err = bad.parse::<Identity>().unwrap_err();
            assert!(
                err.to_string().contains("not a SPIFFE workload identity"),
                "{err}"
            );
        }
    }
}
