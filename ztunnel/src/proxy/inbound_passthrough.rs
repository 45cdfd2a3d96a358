//! Inbound plaintext (15006): connections from clients outside the mesh, delivered by
//! TPROXY with their original destination as the local address. Policy applies (with
//! no peer identity). ztunnel connects to the app from the client's own address (a
//! transparent bind), so the app sees the real peer; the pod's connmark rule and policy
//! route bring the replies back.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::connections::Attrs;
use super::failure::Failure;
use super::relay::Flow;
use super::Direction;
use super::{is_ztunnel_port, PodContext};
use crate::authz::Decision;

pub async fn handle(ctx: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let dst = match ctx
        .sockets
        .destination(&stream, Direction::InboundPlaintext)
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(uid = %ctx.uid, "inbound connection without a local address: {e}");
            return;
        }
    };
    let mut flow = Flow::new(&ctx, Direction::InboundPlaintext, peer, dst);
    if is_ztunnel_port(dst.port()) {
        flow.fail(Failure::Loop);
        return;
    }
    let attrs = Attrs {
        src_ip: peer.ip(),
        src_identity: None,
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let registration = match (&ctx.cfg.mesh, &ctx.mesh) {
        (Some(mesh), Some(pod)) => {
            // Policy needs the pod's workload: wait for it if ztunnel does not have
            // it yet; refuse after the pod wait.
            let w = match pod.workload().await {
                Ok(w) => w,
                Err(e) => {
                    flow.fail(e.into());
                    return;
                }
            };
            let state = mesh.store.get();
            flow.dst_identity = Some(w.identity());
            flow.src_workload = state.workload_at(&w.network, peer.ip()).cloned();
            flow.dst_workload = Some(w.clone());
            if let Decision::Deny { policy } = attrs.decide(&state, &w) {
                flow.fail(Failure::Denied(policy));
                return;
            }
            Some(ctx.cfg.connections.register(&ctx.uid, attrs))
        }
        _ => None,
    };
    let upstream = match ctx.connect(dst, Some(peer.ip())).await {
        Ok(u) => u,
        Err(e) => return flow.fail(Failure::Connect(dst, e)),
    };
    if let Some(r) = registration.as_ref().filter(|r| r.denied()) {
        return flow.fail(Failure::Revoked(r.reason()));
    }
    let _ = upstream.set_nodelay(true);
    flow.relay(stream, upstream, registration.as_ref()).await
}
