//! `/healthz/ready` (port 15021): ready once a snapshot was received from the agent and
//! no pod's proxy is pending. Served by [`crate::http`].

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::{self, Limits};

/// Serves readiness requests until the task is dropped.
pub async fn serve(listener: TcpListener, limits: Limits, ready: watch::Receiver<bool>) {
    http::serve(listener, "readiness endpoint", limits, move |req| {
        let ready = *ready.borrow();
        async move { respond(&req, ready) }
    })
    .await
}

fn respond<B>(req: &Request<B>, ready: bool) -> Response<Full<Bytes>> {
    match (req.uri().path(), ready) {
        ("/healthz/ready", true) => http::text(StatusCode::OK, "ready\n"),
        ("/healthz/ready", false) => http::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the agent's snapshot or a pod's proxy\n",
        ),
        _ => http::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
