//! Why a proxied connection failed or was refused, as a type: the access log's
//! `error` is its text, and Istio's `response_flags` label is chosen from its kind
//! ([`Failure::flags`]), never from the text.

use std::net::SocketAddr;
use std::time::Duration;

use crate::identity::Identity;
use crate::metrics::traffic::ResponseFlags;
use crate::state::NamespacedHostname;

use super::pool::HboneError;

/// Why a pod's own mesh side is not ready to serve a connection: its workload or
/// certificate has not arrived (within the pod wait), or cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("no workload for pod {namespace}/{name} (service account {service_account:?}) on this node after waiting {waited:?}")]
    NoWorkload {
        namespace: String,
        name: String,
        service_account: String,
        waited: Duration,
    },
    #[error("no certificate for {0} after waiting {1:?}")]
    CertTimeout(Identity, Duration),
    #[error("no certificate for {0}: {1}")]
    NoCert(Identity, String),
    /// Expired and not renewed (the certificate manager says why).
    #[error("{0}")]
    CertUnusable(String),
    #[error("TLS server config: {0}")]
    TlsConfig(rustls::Error),
}

/// How a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("no original destination: {0}")]
    NoDestination(std::io::Error),
    /// Aimed at one of ztunnel's own ports (or straight at a listener): forwarding it
    /// would loop.
    #[error("refused: destination is ztunnel itself")]
    Loop,
    #[error("refused: {0}")]
    PodNotReady(#[from] PodError),
    #[error("refused: HBONE needs a mesh configuration (LOCAL_XDS_PATH)")]
    NoMesh,
    #[error("refused: too many TLS handshakes in progress")]
    Handshakes,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("TLS handshake timed out")]
    TlsTimeout,
    /// A CONNECT that is not one, or names something this pod does not serve.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("denied by policy {0}")]
    Denied(String),
    /// A policy change denied the connection while it was open (or being connected):
    /// the reason the connection table recorded.
    #[error("{0}")]
    Revoked(String),
    /// The pod has as many proxied connections open as it may.
    #[error("{0}")]
    Overflow(String),
    #[error("connect {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("refused: the destination's waypoint: {0}")]
    NoWaypoint(String),
    #[error("no healthy upstream: service {service} port {port}: {reason}")]
    NoEndpoint {
        service: NamespacedHostname,
        port: u16,
        reason: &'static str,
    },
    #[error("HBONE: {0}")]
    Hbone(#[from] HboneError),
    /// An endpoint known by hostname only whose name did not resolve to an address
    /// the connection can use.
    #[error("resolving the endpoint's hostname {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("CONNECT upgrade failed: {0}")]
    Upgrade(hyper::Error),
    /// The relay itself failed (a reset, a write to a closed peer).
    #[error("{0}")]
    Relay(std::io::Error),
}

impl Failure {
    /// Istio's `response_flags` for it: `DENY` for policy, `OVERFLOW` for the pod's
    /// connection cap, `CONNECT` when no upstream could be reached; `-` otherwise.
    pub fn flags(&self) -> ResponseFlags {
        match self {
            Failure::Denied(_) | Failure::Revoked(_) => ResponseFlags::Deny,
            Failure::Overflow(_) => ResponseFlags::Overflow,
            Failure::Connect(..)
            | Failure::NoWaypoint(_)
            | Failure::NoEndpoint { .. }
            | Failure::Hbone(_)
            | Failure::Resolve(..) => ResponseFlags::Connect,
            Failure::NoDestination(_)
            | Failure::Loop
            | Failure::PodNotReady(_)
            | Failure::NoMesh
            | Failure::Handshakes
            | Failure::Tls(_)
            | Failure::TlsTimeout
            | Failure::BadRequest(_)
            | Failure::Upgrade(_)
            | Failure::Relay(_) => ResponseFlags::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_flag_follows_the_kind_and_the_log_text_is_istios() {
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let addr: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let cases = [
            (Failure::Denied("ns/p".into()), ResponseFlags::Deny),
            (Failure::Revoked("closed: x".into()), ResponseFlags::Deny),
            (
                Failure::Overflow("refused: cap".into()),
                ResponseFlags::Overflow,
            ),
            (Failure::Connect(addr, io()), ResponseFlags::Connect),
            (Failure::NoWaypoint("gone".into()), ResponseFlags::Connect),
            (
                Failure::Resolve("api.example.com".into(), io()),
                ResponseFlags::Connect,
            ),
            (
                Failure::Hbone(HboneError::Timeout("the CONNECT response")),
                ResponseFlags::Connect,
            ),
            (Failure::Loop, ResponseFlags::None),
            (Failure::BadRequest("not a CONNECT"), ResponseFlags::None),
            (Failure::TlsTimeout, ResponseFlags::None),
        ];
        for (failure, flags) in cases {
            assert_eq!(failure.flags(), flags, "{failure}");
        }
        assert_eq!(
            Failure::Denied("ns/deny-81".into()).to_string(),
            "denied by policy ns/deny-81"
        );
        assert_eq!(
            Failure::Connect(addr, io()).to_string(),
            format!("connect 10.0.0.2:80: {}", io())
        );
    }
}
