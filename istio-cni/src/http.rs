//! The agent's one HTTP serving module: `/readyz` (on the host network, `:8000`),
//! `/metrics` (the monitoring port, `:15014`) and `/debug/enrollment` (loopback only,
//! `127.0.0.1:15015`). A server built here gives a client a deadline for its request
//! headers, serves a bounded number of connections (more are closed on accept) and
//! one peer address only its share of them ([`protocol::limits`]), bounds each
//! connection's lifetime, and backs off when accept fails (EMFILE) instead of
//! spinning. Binding is separate from serving, so that a port already taken stops
//! the agent at startup instead of leaving a probe to ask another program.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// What the server enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_connection_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 32,
            max_connection_age: Duration::from_secs(60),
        }
    }
}

/// Accept failures (EMFILE, ENFILE, ENOBUFS) back off this long.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// An answer: status, content type and body.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Paths and what they answer, asked per request (`None`: 404).
pub type Routes = Arc<dyn Fn(&str) -> Option<Reply> + Send + Sync>;

/// Binds `addr` for endpoint `name`; the error names both. Logs
/// `<name> listening addr=…`.
pub async fn bind(name: &'static str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{name} on {addr}: {e}")))?;
    info!(addr = %listener.local_addr()?, "{name} listening");
    Ok(listener)
}

/// Serves `routes` on `listener` until dropped.
pub async fn serve(listener: TcpListener, limits: Limits, routes: Routes) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers =
        protocol::limits::PeerSlots::new(protocol::limits::per_peer_share(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("HTTP accept failed: {e}; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(peer_slot) = peers.try_acquire(peer.ip()) else {
            debug!(%peer, "this peer holds its share of HTTP connections already; closing");
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "{} HTTP connections already open; closing", limits.max_connections);
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let reply = routes(req.uri().path())
                        .unwrap_or_else(|| Reply::text(StatusCode::NOT_FOUND, "not found\n"));
                    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
                    *resp.status_mut() = reply.status;
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(reply.content_type),
                    );
                    async move { Ok::<_, Infallible>(resp) }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(limits.max_connection_age, conn).await {
                debug!(%peer, "HTTP connection: {e}");
            }
            drop((slot, peer_slot));
        });
    }
}
