//! One certificate per local identity, from a [`CertSource`]: fetched as soon as a
//! workload of that identity appears on the node ([`CertManager::keep`]) or on first
//! use, renewed at half-life, retried with backoff when the source fails, and dropped
//! when no workload of the node needs it any more. TLS configs read the current
//! certificate at each handshake, so a renewal changes what new connections present
//! without touching live ones. A certificate that expired because renewals kept
//! failing is never presented: [`IdentityCert::usable`] says why.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use tracing::{info, warn};

use super::source::{BoxError, CertSource};
use super::Identity;

/// The current certificate of an identity.
struct Current {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    /// The roots as issued (for the admin view).
    root_ders: Arc<Vec<CertificateDer<'static>>>,
    not_after: SystemTime,
    renew_at: SystemTime,
}

/// The live certificate of one identity, and the roots that came with it.
pub struct IdentityCert {
    pub identity: Identity,
    current: RwLock<Current>,
    /// The last renewal failure, until a renewal succeeds.
    last_error: Mutex<Option<String>>,
    generation: AtomicU64,
}

impl IdentityCert {
    /// The certificate to present now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.read().key.clone()
    }

    /// The roots peers must chain to, as of the current certificate.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.read().roots.clone()
    }

    pub fn not_after(&self) -> SystemTime {
        self.read().not_after
    }

    /// The chain presented (leaf first) and the roots, as DER (for the admin view).
    pub fn chain_and_roots(
        &self,
    ) -> (
        Vec<CertificateDer<'static>>,
        Arc<Vec<CertificateDer<'static>>>,
    ) {
        let c = self.read();
        (c.key.cert.clone(), c.root_ders.clone())
    }

    /// 1 for the first certificate, +1 at each renewal.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The certificate may be presented: it has not expired. If it has (renewals
    /// failed for its whole second half-life), why.
    pub fn usable(&self) -> Result<(), String> {
        let not_after = self.not_after();
        if SystemTime::now() < not_after {
            return Ok(());
        }
        let why = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "no renewal yet".into());
        Err(format!(
            "the certificate of {} expired at {} and could not be renewed: {why}",
            self.identity,
            humantime(not_after)
        ))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
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

/// RFC 3339 in UTC, for logs and dumps (`2026-11-27T00:32:00Z`).
pub fn humantime(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t).replace_nanosecond(0);
    match t {
        Ok(t) => t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| format!("{t}")),
        Err(_) => "(out of range)".into(),
    }
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

/// How one identity's certificate stands, for readiness and the admin views.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertState {
    /// Being fetched for the first time.
    Pending,
    /// Held and valid until `not_after`; `renewal_error` if the last renewal failed.
    Valid {
        not_after: SystemTime,
        generation: u64,
        renewal_error: Option<String>,
    },
    /// Held but expired, renewals failing.
    Expired {
        not_after: SystemTime,
        error: String,
    },
    /// Never fetched: the source keeps failing.
    Failing { error: String, attempts: u64 },
}

struct Wanted {
    /// Kept alive while a workload of the node has this identity.
    cert: Option<Arc<IdentityCert>>,
    failure: Option<(String, u64)>,
}

/// Issues workload certificates from a [`CertSource`] and renews them.
pub struct CertManager {
    source: Arc<dyn CertSource>,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
    certs: Mutex<HashMap<Identity, Weak<IdentityCert>>>,
    wanted: Mutex<HashMap<Identity, Wanted>>,
}

/// A fresh certificate.
type Fresh = Current;

const RETRY_START: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(15);

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
            wanted: Mutex::default(),
        })
    }

    pub fn describe_source(&self) -> String {
        self.source.describe()
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
        let renew_at = wc.renew_at(SystemTime::now());
        let not_after = wc.not_after;
        let mut roots = RootCertStore::empty();
        for root in &wc.roots {
            roots.add(root.clone()).map_err(CertError::Roots)?;
        }
        let root_ders = Arc::new(wc.roots);
        let key =
            CertifiedKey::from_der(wc.chain, wc.key, &self.provider).map_err(CertError::Key)?;
        Ok(Current {
            key: Arc::new(key),
            roots: Arc::new(roots),
            root_ders,
            not_after,
            renew_at,
        })
    }

    /// The certificate held for `identity`, if any (without fetching one).
    pub fn held(&self, identity: &Identity) -> Option<Arc<IdentityCert>> {
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
        let fresh = self.issue(identity).await?;
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(raced) = certs.get(identity).and_then(Weak::upgrade) {
            return Ok(raced);
        }
        info!(identity = %identity, source = %self.source.describe(), "issued workload certificate");
        let cert = Arc::new(IdentityCert {
            identity: identity.clone(),
            current: RwLock::new(fresh),
            last_error: Mutex::new(None),
            generation: AtomicU64::new(1),
        });
        certs.insert(identity.clone(), Arc::downgrade(&cert));
        tokio::spawn(renew_loop(self.clone(), Arc::downgrade(&cert)));
        Ok(cert)
    }

    /// The identities of the node's workloads: each gets its certificate now (retried
    /// with backoff until the source delivers) and keeps it while it is in the set;
    /// the others are let go (a connection still using one keeps it alive until it
    /// ends).
    pub fn keep(self: &Arc<Self>, identities: BTreeSet<Identity>) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        wanted.retain(|id, _| identities.contains(id));
        for id in identities {
            if wanted.contains_key(&id) {
                continue;
            }
            wanted.insert(
                id.clone(),
                Wanted {
                    cert: None,
                    failure: None,
                },
            );
            tokio::spawn(prefetch(self.clone(), id));
        }
    }

    fn still_wanted(&self, id: &Identity) -> bool {
        self.wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// Every identity wanted or held, and how its certificate stands.
    pub fn states(&self) -> Vec<(Identity, CertState)> {
        let mut out: HashMap<Identity, CertState> = HashMap::new();
        for (id, w) in self.wanted.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let (None, Some((error, attempts))) = (&w.cert, &w.failure) {
                out.insert(
                    id.clone(),
                    CertState::Failing {
                        error: error.clone(),
                        attempts: *attempts,
                    },
                );
            } else if w.cert.is_none() {
                out.insert(id.clone(), CertState::Pending);
            }
        }
        let live: Vec<Arc<IdentityCert>> = self
            .certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for c in live {
            let not_after = c.not_after();
            let renewal_error = c
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let state = match c.usable() {
                Ok(()) => CertState::Valid {
                    not_after,
                    generation: c.generation(),
                    renewal_error,
                },
                Err(error) => CertState::Expired { not_after, error },
            };
            out.insert(c.identity.clone(), state);
        }
        let mut v: Vec<_> = out.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

async fn prefetch(manager: Arc<CertManager>, id: Identity) {
    let mut backoff = RETRY_START;
    while manager.still_wanted(&id) {
        match manager.get(&id).await {
            Ok(cert) => {
                let mut wanted = manager.wanted.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(w) = wanted.get_mut(&id) {
                    w.cert = Some(cert);
                    w.failure = None;
                }
                return;
            }
            Err(e) => {
                let attempts = {
                    let mut wanted = manager.wanted.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(w) = wanted.get_mut(&id) else { return };
                    let attempts = w.failure.as_ref().map_or(1, |(_, n)| n + 1);
                    w.failure = Some((e.to_string(), attempts));
                    attempts
                };
                warn!(identity = %id, attempts, "fetching workload certificate failed, retrying in {backoff:?}: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

async fn renew_loop(manager: Arc<CertManager>, cert: Weak<IdentityCert>) {
    let mut backoff = RETRY_START;
    loop {
        let Some(at) = cert.upgrade().map(|c| c.read().renew_at) else {
            return;
        };
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        let Some(live) = cert.upgrade() else { return };
        match manager.issue(&live.identity).await {
            Ok(fresh) => {
                *live.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                *live.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let generation = live.generation.fetch_add(1, Ordering::AcqRel) + 1;
                info!(identity = %live.identity, generation, "renewed workload certificate");
                backoff = RETRY_START;
            }
            Err(e) => {
                let expired = SystemTime::now() >= live.not_after();
                warn!(identity = %live.identity, expired, "renewing workload certificate failed, retrying in {backoff:?}: {e}");
                *live.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                drop(live);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_shown_in_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_653_120_500);
        assert_eq!(humantime(t), "2026-11-26T00:32:00Z");
    }
}
