//! `/healthz/ready` (port 15021): ready once a snapshot was received from the agent and
//! no pod's proxy is pending.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("readiness listener {addr}: {e}")))
}

/// Serves readiness requests until the task is dropped.
pub async fn serve(listener: TcpListener, ready: watch::Receiver<bool>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "readiness endpoint listening on /healthz/ready");
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let ready = *ready.borrow();
                async move { Ok::<_, Infallible>(respond(&req, ready)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!("readiness connection: {e}");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, ready: bool) -> Response<Full<Bytes>> {
    let (status, body) = match (req.uri().path(), ready) {
        ("/healthz/ready", true) => (StatusCode::OK, "ready\n"),
        ("/healthz/ready", false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the agent's snapshot or a pod's proxy\n",
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}
