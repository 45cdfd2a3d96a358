//! One certificate per local identity, issued on first use and renewed at half-life in
//! the background. TLS configs read the current certificate at each handshake, so a
//! renewal changes what new connections present without touching live ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use super::ca::{CaError, LocalCa};
use super::Identity;

/// The live certificate of one identity.
pub struct IdentityCert {
    pub identity: Identity,
    current: RwLock<Arc<CertifiedKey>>,
    renew_at: RwLock<SystemTime>,
    generation: AtomicU64,
}

impl IdentityCert {
    /// The certificate to present now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
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

/// Issues and renews workload certificates from the local CA.
pub struct CertManager {
    ca: Arc<LocalCa>,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
    certs: Mutex<HashMap<Identity, Weak<IdentityCert>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("loading the workload key: {0}")]
    Key(rustls::Error),
}

impl CertManager {
    pub fn new(ca: Arc<LocalCa>, ttl: Duration, provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(CertManager {
            ca,
            ttl,
            provider,
            certs: Mutex::default(),
        })
    }

    pub fn ca(&self) -> &LocalCa {
        &self.ca
    }

    fn issue(&self, identity: &Identity) -> Result<(Arc<CertifiedKey>, SystemTime), CertError> {
        let wc = self.ca.issue(identity, self.ttl)?;
        let renew_at = wc.renew_at();
        let key =
            CertifiedKey::from_der(wc.chain, wc.key, &self.provider).map_err(CertError::Key)?;
        Ok((Arc::new(key), renew_at))
    }

    /// The certificate of `identity`, issuing it if needed. It stays renewed for as
    /// long as the returned handle (or a clone) is held. Needs a tokio runtime.
    pub fn get(self: &Arc<Self>, identity: &Identity) -> Result<Arc<IdentityCert>, CertError> {
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = certs.get(identity).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let (key, renew_at) = self.issue(identity)?;
        info!(identity = %identity, "issued workload certificate");
        let cert = Arc::new(IdentityCert {
            identity: identity.clone(),
            current: RwLock::new(key),
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
        match manager.issue(&live.identity) {
            Ok((key, renew_at)) => {
                *live.current.write().unwrap_or_else(|p| p.into_inner()) = key;
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
