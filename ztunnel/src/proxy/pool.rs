//! The HBONE client: HTTP/2 over mutual TLS to a peer's 15008, with connections pooled
//! per (source identity, destination identity, destination address).
//!
//! Many CONNECT streams share one connection (up to a limit, then a new connection is
//! opened); a connection that broke is never handed out again; idle connections are
//! closed after a timeout. Each pod has its own pool: its connections are sockets in
//! its own netns.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;
use tracing::{debug, info};

use super::{MeshConfig, PodContext};
use crate::identity::manager::IdentityCert;
use crate::identity::Identity;
use crate::tls;

/// Tuning and limits of HBONE connections, both sides.
#[derive(Clone, Debug)]
pub struct HboneConfig {
    pub max_streams_per_connection: usize,
    pub idle_timeout: Duration,
    /// HTTP/2 flow-control windows, sized for throughput (the defaults are 64 KiB).
    pub stream_window: u32,
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept (the default is 16 KiB).
    pub max_frame_size: u32,
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress on one pod's 15008 at most.
    pub max_handshakes: usize,
    /// How long the peer has to answer a CONNECT.
    pub response_timeout: Duration,
    /// HTTP/2 PING every this long on an HBONE connection; no answer within
    /// `keepalive_timeout` closes it (a half-open peer).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for HboneConfig {
    fn default() -> Self {
        HboneConfig {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 128,
            response_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: Identity,
    dst: Identity,
    addr: SocketAddr,
}

struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicUsize>,
    last_used: Mutex<Instant>,
    /// Generation of the client certificate the connection was opened with: after a
    /// renewal no new stream is put on it, so new connections show the new certificate
    /// while established streams carry on.
    cert_generation: u64,
    /// Retired: a newer certificate is in use; no new stream goes on it.
    retired: AtomicBool,
    /// Tells the driver to close the connection (retired, last stream done).
    done: Arc<Notify>,
}

impl Conn {
    /// No stream for at least `timeout`.
    fn idle_for(&self, timeout: Duration) -> bool {
        self.streams.load(Ordering::Acquire) == 0
            && self
                .last_used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                >= timeout
    }

    /// No new stream goes on it; it closes once its streams are done.
    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        if self.streams.load(Ordering::Acquire) == 0 {
            self.done.notify_one();
        }
    }

    /// Another stream fits (the pool has already dropped what is closed or retired).
    fn has_room(&self, max: usize) -> bool {
        self.streams.load(Ordering::Acquire) < max
    }
}

/// Holds one stream's place on its connection; released on drop, which counts as a
/// use of the connection for the idle timeout.
pub struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let left = self.0.streams.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && self.0.retired.load(Ordering::Acquire) {
            // Its last stream is done: the driver closes it now.
            self.0.done.notify_one();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS handshake with {0}: {1}")]
    Tls(SocketAddr, std::io::Error),
    #[error("TLS config: {0}")]
    Config(rustls::Error),
    #[error("HTTP/2 with {0}: {1}")]
    H2(SocketAddr, hyper::Error),
    #[error("{0} answered CONNECT with {1}")]
    Status(SocketAddr, StatusCode),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("building the CONNECT request: {0}")]
    Request(hyper::http::Error),
}

/// One opener at a time per key, so that a burst of first requests shares one new
/// connection instead of each opening its own. A turn is given back when its holder is
/// done, fails or is cancelled, and the key's entry goes with its last user: nothing
/// is kept per key ever dialled. A waiter waits at most `within` (about one attempt's
/// length) for its turn, so behind a peer that never answers the k-th waiter does not
/// wait k attempts.
struct Gates<K: std::hash::Hash + Eq + Clone> {
    map: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: std::hash::Hash + Eq + Clone> Default for Gates<K> {
    fn default() -> Self {
        Gates {
            map: Mutex::default(),
        }
    }
}

/// A key's turn; given back on drop.
struct Turn<'a, K: std::hash::Hash + Eq + Clone> {
    gates: &'a Gates<K>,
    key: K,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<K: std::hash::Hash + Eq + Clone> Gates<K> {
    /// `key`'s turn, or `None` after waiting `within`.
    async fn enter(&self, key: K, within: Duration) -> Option<Turn<'_, K>> {
        let gate = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        match tokio::time::timeout(within, gate.lock_owned()).await {
            Ok(held) => Some(Turn {
                gates: self,
                key,
                held: Some(held),
            }),
            Err(_) => {
                self.tidy(&key);
                None
            }
        }
    }

    /// Drops `key`'s entry if nobody else holds or awaits it.
    fn tidy(&self, key: &K) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(key).is_some_and(|g| Arc::strong_count(g) == 1) {
            map.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Turn<'_, K> {
    fn drop(&mut self) {
        drop(self.held.take());
        self.gates.tidy(&self.key);
    }
}

/// The pod's HBONE connections.
#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<Key, Vec<Arc<Conn>>>>,
    opening: Gates<Key>,
    /// Connections opened so far (observability and tests).
    pub opened: AtomicUsize,
}

impl Pool {
    /// Opens a CONNECT tunnel to `target` through the HBONE peer at `via` (the
    /// workload's ztunnel at `<ip>:15008`, or a waypoint), proving `cert`'s identity
    /// and requiring the peer to prove `dst`.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        &self,
        ctx: &PodContext,
        mesh: &MeshConfig,
        cert: Arc<IdentityCert>,
        dst: Identity,
        via: SocketAddr,
        target: SocketAddr,
        client: SocketAddr,
    ) -> Result<(TokioIo<hyper::upgrade::Upgraded>, StreamGuard), HboneError> {
        let cfg = &mesh.hbone;
        let key = Key {
            src: cert.identity.clone(),
            dst: dst.clone(),
            addr: via,
        };
        let conn = match self.reuse(&key, cfg, cert.generation()) {
            Some(c) => c,
            None => {
                // About as long as one attempt may take (the connect, then the TLS
                // handshake).
                let within = ctx.cfg.connect_timeout + cfg.handshake_timeout;
                let Some(_turn) = self.opening.enter(key.clone(), within).await else {
                    return Err(HboneError::Timeout(
                        "another attempt to open a connection to this peer",
                    ));
                };
                match self.reuse(&key, cfg, cert.generation()) {
                    Some(c) => c,
                    None => self.open(ctx, mesh, cert, key.clone()).await?,
                }
            }
        };
        let guard = StreamGuard(conn.clone());
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header("forwarded", super::headers::forwarded_value(client))
            .body(Empty::<Bytes>::new())
            .map_err(HboneError::Request)?;
        let mut sender = conn.sender.clone();
        let resp = tokio::time::timeout(cfg.response_timeout, sender.send_request(req))
            .await
            .map_err(|_| HboneError::Timeout("the CONNECT response"))?
            .map_err(|e| HboneError::H2(target, e))?;
        if resp.status() != StatusCode::OK {
            return Err(HboneError::Status(target, resp.status()));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| HboneError::H2(target, e))?;
        Ok((TokioIo::new(upgraded), guard))
    }

    fn reuse(&self, key: &Key, cfg: &HboneConfig, cert_generation: u64) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(key)?;
        let now = Instant::now();
        // Drop what is broken or has idled out; nothing broken is handed out again.
        // A connection opened with an older certificate gets no new stream: it is
        // retired, and closed as soon as its last stream ends (not after the idle
        // timeout: with short-lived certificates they would pile up).
        list.retain(|c| {
            if c.sender.is_closed() || c.idle_for(cfg.idle_timeout) {
                return false;
            }
            if c.cert_generation != cert_generation {
                c.retire();
                return false;
            }
            true
        });
        if list.is_empty() {
            // Nothing is kept for a peer whose connections are all gone.
            conns.remove(key);
            return None;
        }
        let c = list
            .iter()
            .find(|c| c.has_room(cfg.max_streams_per_connection))?
            .clone();
        c.streams.fetch_add(1, Ordering::AcqRel);
        *c.last_used.lock().unwrap_or_else(|p| p.into_inner()) = now;
        Some(c)
    }

    async fn open(
        &self,
        ctx: &PodContext,
        mesh: &MeshConfig,
        cert: Arc<IdentityCert>,
        key: Key,
    ) -> Result<Arc<Conn>, HboneError> {
        let cfg = &mesh.hbone;
        let addr = key.addr;
        let tcp = ctx
            .connect(addr, None)
            .await
            .map_err(|e| HboneError::Connect(addr, e))?;
        let _ = tcp.set_nodelay(true);
        let cert_generation = cert.generation();
        let roots = cert.roots();
        let config =
            tls::client_config(cert, roots, key.dst.clone()).map_err(HboneError::Config)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tls = tokio::time::timeout(
            cfg.handshake_timeout,
            connector.connect(tls::server_name(addr.ip()), tcp),
        )
        .await
        .map_err(|_| HboneError::Timeout("TLS handshake"))?
        .map_err(|e| HboneError::Tls(addr, e))?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(cfg.keepalive_interval)
            .keep_alive_timeout(cfg.keepalive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(cfg.stream_window)
            .initial_connection_window_size(cfg.connection_window)
            .max_frame_size(cfg.max_frame_size)
            .max_concurrent_reset_streams(1024)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| HboneError::H2(addr, e))?;
        let n = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        info!(src = %key.src, dst = %key.dst, %addr, opened = n, cert_generation, "new HBONE connection");
        let conn = Arc::new(Conn {
            sender,
            streams: Arc::new(AtomicUsize::new(1)),
            last_used: Mutex::new(Instant::now()),
            cert_generation,
            retired: AtomicBool::new(false),
            done: Arc::new(Notify::new()),
        });
        // The connection's driver. It also closes the connection once it has carried no
        // stream for the idle timeout; the pool then sees it closed and drops it.
        let (watched, idle_timeout) = (Arc::downgrade(&conn), cfg.idle_timeout);
        let done = conn.done.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            // One timer for the connection's life: a sleep made inside the loop would
            // be re-armed every time the connection wakes, that is for every frame.
            // At least a millisecond: a zero timeout (POOL_UNUSED_RELEASE_TIMEOUT=0s,
            // close as soon as idle) must not make a zero period, which panics.
            let period = (idle_timeout / 4).max(Duration::from_millis(1));
            let mut idle_check = tokio::time::interval(period);
            idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            idle_check.reset();
            loop {
                tokio::select! {
                    ended = &mut connection => {
                        if let Err(e) = ended {
                            debug!(%addr, "HBONE connection ended: {e}");
                        }
                        return;
                    }
                    _ = done.notified() => {
                        debug!(%addr, "closing an HBONE connection opened with an older certificate");
                        return;
                    }
                    _ = idle_check.tick() => {
                        let idle = watched.upgrade().is_none_or(|c| c.idle_for(idle_timeout));
                        if idle {
                            info!(%addr, "closing idle HBONE connection");
                            return;
                        }
                    }
                }
            }
        });
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A turn is given back and its entry dropped when its holder is done, fails or is
    /// cancelled; a waiter behind a holder that never finishes waits its bound, not
    /// the sum of everyone's.
    #[tokio::test(start_paused = true)]
    async fn a_turn_is_never_leaked_and_every_wait_is_bounded() {
        let gates: Gates<u8> = Gates::default();
        let bound = Duration::from_secs(10);
        // Done, or failed: the same drop.
        drop(gates.enter(1, bound).await.unwrap());
        assert_eq!(gates.len(), 0);
        // Cancelled while waiting for the key: nothing left once the holder is done.
        let holder = gates.enter(2, bound).await.unwrap();
        let waiting = gates.enter(2, bound);
        tokio::select! {
            _ = waiting => panic!("got the turn of a key held by another"),
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
        drop(holder);
        assert_eq!(gates.len(), 0);
        // A holder that never finishes (a peer that never answers): five waiters each
        // give up after one bound, together in one bound's time.
        let _stuck = gates.enter(3, bound).await.unwrap();
        let start = tokio::time::Instant::now();
        let w = || gates.enter(3, bound);
        let turns = tokio::join!(w(), w(), w(), w(), w());
        assert!(turns.0.is_none() && turns.1.is_none() && turns.2.is_none());
        assert!(turns.3.is_none() && turns.4.is_none());
        assert_eq!(start.elapsed(), bound, "the waiters waited in turn");
    }
}
