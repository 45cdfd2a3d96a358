//! Outbound (15001): the app's connections, redirected by the pod's nat rule. The
//! original destination comes from conntrack (`SO_ORIGINAL_DST`). A mesh workload (or a
//! service VIP, via one of its endpoints) is reached over HBONE; anything else is
//! passed through as plain TCP, connected from inside the pod's netns with the mark.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::relay::Flow;
use super::{canonical, is_ztunnel_port, PodContext};
use crate::inpod::packet;
use crate::state::{Destination, Protocol};

pub async fn handle(ctx: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let dst = match packet::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => {
            let local = stream.local_addr().map(canonical).unwrap_or(peer);
            Flow::new(&ctx, "outbound", peer, local).log(
                0,
                0,
                Some(&format!("no original destination: {e}")),
            );
            return;
        }
    };
    // A connection made straight to 15001 (not redirected) has itself as its original
    // destination; forwarding it, or anything aimed at our ports, would loop.
    if stream.local_addr().ok().map(canonical) == Some(dst) || is_ztunnel_port(dst.port()) {
        Flow::new(&ctx, "outbound", peer, dst).log(
            0,
            0,
            Some("refused: destination is ztunnel itself"),
        );
        return;
    }
    if let (Some(mesh), Some(pod)) = (&ctx.cfg.mesh, &ctx.mesh) {
        let state = mesh.store.get();
        let Some(src) = ctx.workload(&state) else {
            // The pod's workload left the mesh state: nothing says where its traffic
            // may go, or as whom. Refused, never passed on.
            Flow::new(&ctx, "outbound", peer, dst).log(
                0,
                0,
                Some("refused: the pod has no workload in the mesh state"),
            );
            return;
        };
        match state.resolve(&src, dst) {
            Destination::Workload(w, target) if w.protocol == Protocol::Hbone => {
                let mut flow = Flow::new(&ctx, "outbound", peer, target);
                flow.src_identity = Some(pod.cert.identity.clone());
                flow.dst_identity = Some(w.identity());
                drop(state);
                match pod
                    .pool
                    .connect(&ctx, mesh, pod.cert.clone(), w.identity(), target, peer)
                    .await
                {
                    Ok((tunnel, stream_slot)) => {
                        flow.relay(stream, tunnel, None).await;
                        drop(stream_slot);
                    }
                    Err(e) => flow.log(0, 0, Some(&format!("HBONE: {e}"))),
                }
                return;
            }
            Destination::NoEndpoint {
                service,
                port,
                reason,
            } => {
                Flow::new(&ctx, "outbound", peer, dst).log(
                    0,
                    0,
                    Some(&format!(
                        "no healthy upstream: service {service} port {port}: {reason}"
                    )),
                );
                return;
            }
            Destination::Workload(_, target) | Destination::Passthrough(target) => {
                return passthrough(&ctx, stream, peer, target).await;
            }
        }
    }
    passthrough(&ctx, stream, peer, dst).await
}

async fn passthrough(ctx: &Arc<PodContext>, stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
    let flow = Flow::new(ctx, "outbound", peer, dst);
    match ctx.connect(dst, None).await {
        Ok(upstream) => {
            let _ = upstream.set_nodelay(true);
            flow.relay(stream, upstream, None).await
        }
        Err(e) => flow.log(0, 0, Some(&format!("connect {dst}: {e}"))),
    }
}
