//! Where workload certificates come from: the seam between the certificate manager and
//! a certificate authority. The local CA is one source; istiod's CA (over gRPC) is the
//! next. A source issues a key, its chain and the roots to verify peers against.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Identity;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A workload certificate and its key, when it expires, and the mesh roots that came
/// with it.
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The roots peers' certificates must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    /// When it was signed (`not_before` may be a little earlier, for clock skew).
    pub issued: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// When the certificate should be replaced: half-way through its life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued)
            .unwrap_or_default();
        self.issued + life / 2
    }
}

/// Issues workload certificates.
pub trait CertSource: Send + Sync + 'static {
    /// What the certificates come from, for logs.
    fn describe(&self) -> String;

    /// A new certificate for `identity`, valid for about `ttl` (a CA may shorten it).
    fn issue<'a>(
        &'a self,
        identity: &'a Identity,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<WorkloadCert, BoxError>>;
}
