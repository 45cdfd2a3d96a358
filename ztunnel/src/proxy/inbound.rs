//! Inbound HBONE (15008): mutual TLS as the pod's workload identity, then HTTP/2
//! CONNECT requests, each a tunnel to the app.
//!
//! Each CONNECT is checked: its authority must be `<this pod's ip>:<port>` (400
//! otherwise), policy must allow it given the peer's proven identity (401), and the app
//! must accept the connection, made from the client's own address (503 if not). Then
//! 200 and the stream carries the bytes. Without a mesh configuration there is no
//! identity to terminate TLS with: connections are closed, never passed on in clear.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::connections::Attrs;
use super::failure::Failure;
use super::headers;
use super::relay::Flow;
use super::Direction;
use super::{is_ztunnel_port, MeshConfig, PodContext};
use crate::authz::Decision;
use crate::identity::Identity;
use crate::tls;

pub async fn handle(ctx: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
    let local = stream.local_addr().map(super::canonical).unwrap_or(peer);
    let (Some(mesh), Some(pod)) = (ctx.cfg.mesh.clone(), ctx.mesh.as_ref()) else {
        Flow::new(&ctx, Direction::InboundHbone, peer, local).fail(Failure::NoMesh);
        return;
    };
    // Handshakes in progress are capped: a flood of slow or bogus clients is refused at
    // once instead of holding an fd and a task each for the handshake timeout.
    let Ok(_handshaking) = pod.handshakes.clone().try_acquire_owned() else {
        Flow::new(&ctx, Direction::InboundHbone, peer, local).fail(Failure::Handshakes);
        return;
    };
    let _ = stream.set_nodelay(true);
    // The pod's identity may not be known yet: wait for it (up to the pod wait), then
    // refuse. Without it there is no certificate to present, and never plaintext.
    let acceptor = match pod.acceptor().await {
        Ok((_, a)) => a,
        Err(e) => {
            Flow::new(&ctx, Direction::InboundHbone, peer, local).fail(e.into());
            return;
        }
    };
    let handshake = tokio::time::timeout(mesh.hbone.handshake_timeout, acceptor.accept(stream));
    let tls = match handshake.await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            Flow::new(&ctx, Direction::InboundHbone, peer, local).fail(Failure::Tls(e));
            return;
        }
        Err(_) => {
            Flow::new(&ctx, Direction::InboundHbone, peer, local).fail(Failure::TlsTimeout);
            return;
        }
    };
    drop(_handshaking);
    let peer_id = tls::peer_identity(tls.get_ref().1);
    let service = {
        let (ctx, mesh) = (ctx.clone(), mesh.clone());
        hyper::service::service_fn(move |req| {
            let (ctx, mesh, peer_id) = (ctx.clone(), mesh.clone(), peer_id.clone());
            async move { Ok::<_, Infallible>(tunnel(ctx, mesh, req, peer, local, peer_id).await) }
        })
    };
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(mesh.hbone.keepalive_interval)
        .keep_alive_timeout(mesh.hbone.keepalive_timeout)
        .initial_stream_window_size(mesh.hbone.stream_window)
        .initial_connection_window_size(mesh.hbone.connection_window)
        .max_frame_size(mesh.hbone.max_frame_size)
        .max_concurrent_streams(mesh.hbone.max_streams_per_connection as u32)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, "HBONE connection ended: {e}");
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = code;
    resp
}

async fn tunnel(
    ctx: Arc<PodContext>,
    mesh: Arc<MeshConfig>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    peer_id: Option<Identity>,
) -> Response<Empty<Bytes>> {
    let target = req
        .uri()
        .authority()
        .and_then(|a| headers::parse_authority(a.as_str()).ok());
    // The client's own port, from the peer's `forwarded`, for the access log only: it
    // is believed only when its address is the peer's, and never used for policy.
    let client = req
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(headers::forwarded_for)
        .filter(|f| f.ip() == peer.ip() && f.port() != 0)
        .unwrap_or(peer);
    let mut flow = Flow::new(&ctx, Direction::InboundHbone, client, local);
    flow.src_identity = peer_id.clone();
    flow.hbone_addr = target;
    flow.mtls = true;
    let (Some(target), true) = (target, req.method() == Method::CONNECT) else {
        flow.fail(Failure::BadRequest("not a CONNECT to ip:port"));
        return status(StatusCode::BAD_REQUEST);
    };
    let Some(pod) = ctx.mesh.as_ref() else {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    };
    let w = match pod.workload().await {
        Ok(w) => w,
        Err(e) => {
            flow.fail(e.into());
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let state = mesh.store.get();
    flow.dst_identity = Some(w.identity());
    flow.src_workload = state.workload_at(&w.network, peer.ip()).cloned();
    flow.dst_workload = Some(w.clone());
    // The target is this pod's app; or, when this pod is a waypoint, a service or
    // workload whose waypoint it is (the waypoint gets the connection on its own
    // address, at the target's port), as Istio's ztunnel accepts it.
    let upstream = if w.ips.contains(&target.ip()) {
        target
    } else if state.routes_through(&w.network, target.ip(), &w) {
        SocketAddr::new(local.ip(), target.port())
    } else {
        flow.fail(Failure::BadRequest("authority is not this pod's app"));
        return status(StatusCode::BAD_REQUEST);
    };
    if is_ztunnel_port(upstream.port()) {
        flow.fail(Failure::BadRequest("authority is ztunnel itself"));
        return status(StatusCode::BAD_REQUEST);
    }
    let target = upstream;
    let attrs = Attrs {
        src_ip: peer.ip(),
        src_identity: peer_id,
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    if let Decision::Deny { policy } = attrs.decide(&state, &w) {
        flow.fail(Failure::Denied(policy));
        return status(StatusCode::UNAUTHORIZED);
    }
    drop(state);
    let Some(share) = ctx.take_share(&flow) else {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    };
    // Registered before connecting to the app (which may take up to the connect
    // timeout), as on 15006: a policy pushed meanwhile applies to this connection.
    let registration = ctx.cfg.connections.register(&ctx.uid, attrs);
    let upstream = match ctx.connect(target, Some(peer.ip())).await {
        Ok(u) => u,
        Err(e) => {
            flow.fail(Failure::Connect(target, e));
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    if registration.denied() {
        flow.fail(Failure::Revoked(registration.reason()));
        return status(StatusCode::UNAUTHORIZED);
    }
    let _ = upstream.set_nodelay(true);
    tokio::spawn(async move {
        let _share = share;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                flow.relay(TokioIo::new(upgraded), upstream, Some(&registration))
                    .await
            }
            Err(e) => flow.fail(Failure::Upgrade(e)),
        }
    });
    status(StatusCode::OK)
}
