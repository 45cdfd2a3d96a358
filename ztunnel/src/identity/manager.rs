//! One certificate per local identity, issued on first use and renewed at half-life in
//! the background. TLS configs read the current certificate at each handshake, so a
//! renewal changes what new connections present without touching live ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use tracing::{info, warn};

use super::source::{BoxError, CertSource};
use super::Identity;

/// The live certificate of one identity, and the roots that came with it.
pub struct IdentityCert {
    pub identity: Identity,
    current: RwLock<(Arc<CertifiedKey>, Arc<RootCertStore>)>,
    renew_at: RwLock<SystemTime>,
    generation: AtomicU64,
}

impl IdentityCert {
    /// The certificate to present now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// The roots peers must chain to, as of the current certificate.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// 1 for the first certificate, +1 at each renewal.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for IdentityCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("IdentityCert")
            .field("identity", &self.identity.to_string())
            .finish_non_exhaustive()
    }
}

/// Issues workload certificates from a [`CertSource`] and renews them.
pub struct CertManager {
    source: Arc<dyn CertSource>,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
    certs: Mutex<HashMap<Identity, Weak<IdentityCert>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{source_name}: {error}")]
    Source {
        source_name: String,
        error: BoxError,
    },
    #[error("{0} issued a certificate for {1}")]
    WrongIdentity(String, Identity),
    #[error("loading the workload key: {0}")]
    Key(rustls::Error),
    #[error("the mesh roots: {0}")]
    Roots(rustls::Error),
}

/// A fresh certificate: the key to present, the roots, and when to renew.
type Fresh = (Arc<CertifiedKey>, Arc<RootCertStore>, SystemTime);

impl CertManager {
    pub fn new(
        source: Arc<dyn CertSource>,
        ttl: Duration,
        provider: Arc<CryptoProvider>,
    ) -> Arc<Self> {
        Arc::new(CertManager {
            source,
            ttl,
            provider,
            certs: Mutex::default(),
        })
    }

    async fn issue(&self, identity: &Identity) -> Result<Fresh, CertError> {
        let wc = self
            .source
            .issue(identity, self.ttl)
            .await
            .map_err(|error| CertError::Source {
                source_name: self.source.describe(),
                error,
            })?;
        if wc.identity != *identity {
            return Err(CertError::WrongIdentity(
                self.source.describe(),
                wc.identity,
            ));
        }
        let renew_at = wc.renew_at();
        let mut roots = RootCertStore::empty();
        for root in wc.roots {
            roots.add(root).map_err(CertError::Roots)?;
        }
        let key =
            CertifiedKey::from_der(wc.chain, wc.key, &self.provider).map_err(CertError::Key)?;
        Ok((Arc::new(key), Arc::new(roots), renew_at))
    }

    fn held(&self, identity: &Identity) -> Option<Arc<IdentityCert>> {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        certs.get(identity).and_then(Weak::upgrade)
    }

    /// The certificate of `identity`, issuing it if needed. It stays renewed for as
    /// long as the returned handle (or a clone) is held. No lock is held while the
    /// source works; two first callers may both ask it, and the first answer is kept.
    pub async fn get(
        self: &Arc<Self>,
        identity: &Identity,
    ) -> Result<Arc<IdentityCert>, CertError> {
        if let Some(held) = self.held(identity) {
            return Ok(held);
        }
        let (key, roots, renew_at) = self.issue(identity).await?;
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(raced) = certs.get(identity).and_then(Weak::upgrade) {
            return Ok(raced);
        }
        info!(identity = %identity, source = %self.source.describe(), "issued workload certificate");
        let cert = Arc::new(IdentityCert {
            identity: identity.clone(),
            current: RwLock::new((key, roots)),
            renew_at: RwLock::new(renew_at),
            generation: AtomicU64::new(1),
        });
        certs.insert(identity.clone(), Arc::downgrade(&cert));
        tokio::spawn(renew_loop(self.clone(), Arc::downgrade(&cert)));
        Ok(cert)
    }
}

async fn renew_loop(manager: Arc<CertManager>, cert: Weak<IdentityCert>) {
    loop {
        let Some(at) = cert
            .upgrade()
            .map(|c| *c.renew_at.read().unwrap_or_else(|p| p.into_inner()))
        else {
            return;
        };
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        let Some(live) = cert.upgrade() else { return };
        match manager.issue(&live.identity).await {
            Ok((key, roots, renew_at)) => {
                *live.current.write().unwrap_or_else(|p| p.into_inner()) = (key, roots);
                *live.renew_at.write().unwrap_or_else(|p| p.into_inner()) = renew_at;
                let generation = live.generation.fetch_add(1, Ordering::AcqRel) + 1;
                info!(identity = %live.identity, generation, "renewed workload certificate");
            }
            Err(e) => {
                warn!(identity = %live.identity, "renewing workload certificate failed, retrying: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
