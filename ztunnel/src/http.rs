//! ztunnel's one HTTP serving module: readiness (15021), admin (15000) and metrics
//! (15020) are all served by [`serve`]. Every server built here
//!
//! - gives a client a deadline to send its request headers (a slowloris is cut off),
//! - serves a bounded number of connections at once (more are closed on accept, so
//!   no client can use up ztunnel's file descriptors), and one peer address only its
//!   share of them ([`protocol::limits`]: a pod holding slow connections cannot starve
//!   the kubelet's readiness probe),
//! - bounds each connection's lifetime (an idle keep-alive cannot stay forever),
//! - backs off when accept fails (EMFILE) instead of spinning.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// What every endpoint's server enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// A connection is closed after this long, whatever it is doing.
    pub max_connection_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 64,
            max_connection_age: Duration::from_secs(60),
        }
    }
}

/// How long accept failures (EMFILE, ENFILE, ENOBUFS) back off.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds `addr`, naming the endpoint in the error. `[::]` (every address, both
/// families) falls back to `0.0.0.0` on a kernel without IPv6.
pub async fn bind(name: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let bound = match TcpListener::bind(addr).await {
        Err(e)
            if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                && matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EAFNOSUPPORT) | Some(nix::libc::EADDRNOTAVAIL)
                ) =>
        {
            TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], addr.port()))).await
        }
        other => other,
    };
    bound.map_err(|e| std::io::Error::new(e.kind(), format!("{name} listener {addr}: {e}")))
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Serves HTTP/1.1 on `listener` with `handler` until the task is dropped. `name`
/// appears in the startup line (`<name> listening`) and in warnings.
pub async fn serve<F, Fut>(listener: TcpListener, name: &'static str, limits: Limits, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "{name} listening");
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers =
        protocol::limits::PeerSlots::new(protocol::limits::per_peer_share(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("{name}: accept failed: {e}; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(peer_slot) = peers.try_acquire(peer.ip()) else {
            debug!(%peer, "{name}: this peer holds its share of connections already; closing");
            drop(stream);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "{name}: {} connections already open; closing", limits.max_connections);
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.max_connection_age, conn).await {
                Ok(Err(e)) => debug!(%peer, "{name} connection: {e}"),
                Err(_) => debug!(%peer, "{name} connection closed at its maximum age"),
                Ok(Ok(())) => {}
            }
            drop((slot, peer_slot));
        });
    }
}
