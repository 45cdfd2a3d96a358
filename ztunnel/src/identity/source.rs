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

/// Never renew sooner than this after receiving a certificate (unless it expires
/// first): a CA that hands out very short-lived certificates must not make ztunnel
/// renew in a loop.
pub const MIN_RENEW_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl WorkloadCert {
    /// When the certificate, received at `received`, should be replaced: half-way
    /// through the life it has left from then. Not from its `notBefore`: CAs backdate
    /// it for clock skew (istiod by minutes), and with a short lifetime half-life
    /// counted from there can already be past on arrival (certificate times have a
    /// one-second resolution too), which would renew in a loop. At least
    /// [`MIN_RENEW_AFTER`] after receipt, unless the certificate expires before that.
    pub fn renew_at(&self, received: SystemTime) -> SystemTime {
        let left = self.not_after.duration_since(received).unwrap_or_default();
        received + (left / 2).max(MIN_RENEW_AFTER.min(left))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cert(not_before: SystemTime, not_after: SystemTime) -> WorkloadCert {
        WorkloadCert {
            identity: Identity::new("cluster.local", "ns", "sa"),
            chain: Vec::new(),
            key: PrivateKeyDer::Pkcs8(Vec::new().into()),
            roots: Vec::new(),
            issued: not_before,
            not_after,
        }
    }

    #[test]
    fn renewal_is_at_half_the_life_left_on_arrival_never_in_a_loop() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = Duration::from_secs;
        // Backdated by 5 s, 6 s left: half-life from notBefore would be now + 0.5 s
        // (and already past with whole-second times); from arrival it is now + 3 s.
        assert_eq!(cert(now - s(5), now + s(6)).renew_at(now), now + s(3));
        // A day-long certificate backdated by istiod's minutes.
        assert_eq!(
            cert(now - s(120), now + s(86_400)).renew_at(now),
            now + s(43_200)
        );
        // Very short-lived: not sooner than a second after arrival...
        assert_eq!(
            cert(now, now + Duration::from_millis(1500)).renew_at(now),
            now + s(1)
        );
        // ...unless it expires before that; an expired one at once.
        assert_eq!(
            cert(now, now + Duration::from_millis(400)).renew_at(now),
            now + Duration::from_millis(400)
        );
        assert_eq!(cert(now - s(10), now - s(1)).renew_at(now), now);
    }
}
