//! The agent's readiness endpoint, `/readyz`: 200 once the CNI plugin is installed and
//! the agent serves, 503 otherwise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;

/// Serves `/readyz` on `addr`, asking `ready` at each request.
pub async fn serve(
    addr: SocketAddr,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "readiness endpoint listening on /readyz");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (code, body) = match (req.uri().path(), ready()) {
                        ("/readyz", true) => (StatusCode::OK, "ready\n"),
                        ("/readyz", false) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: CNI plugin not installed\n",
                        ),
                        _ => (StatusCode::NOT_FOUND, "not found\n"),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *resp.status_mut() = code;
                    async move { Ok::<_, Infallible>(resp) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
