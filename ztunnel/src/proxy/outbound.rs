//! Outbound (15001): the app's connections, redirected by the pod's nat rule. The
//! original destination comes from conntrack (`SO_ORIGINAL_DST`). A mesh workload (or a
//! service VIP, via one of its endpoints) is reached over HBONE; anything else is
//! passed through as plain TCP, connected from inside the pod's netns with the mark.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::failure::Failure;
use super::relay::Flow;
use super::Direction;
use super::{canonical, is_ztunnel_port, PodContext};
use crate::state::{Destination, Protocol};

pub async fn handle(ctx: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let dst = match ctx.sockets.destination(&stream, Direction::Outbound) {
        Ok(d) => d,
        Err(e) => {
            let local = stream.local_addr().map(canonical).unwrap_or(peer);
            Flow::new(&ctx, Direction::Outbound, peer, local).fail(Failure::NoDestination(e));
            return;
        }
    };
    // A connection made straight to 15001 (not redirected) has itself as its original
    // destination; forwarding it, or anything aimed at our ports, would loop.
    if stream.local_addr().ok().map(canonical) == Some(dst) || is_ztunnel_port(dst.port()) {
        Flow::new(&ctx, Direction::Outbound, peer, dst).fail(Failure::Loop);
        return;
    }
    if let (Some(mesh), Some(pod)) = (&ctx.cfg.mesh, &ctx.mesh) {
        // The pod's own workload says where its traffic may go and as whom: wait for
        // it (and its certificate) if ztunnel does not have them yet; refuse after.
        let (src, cert) = match pod.identity().await {
            Ok(found) => found,
            Err(e) => {
                Flow::new(&ctx, Direction::Outbound, peer, dst).fail(e.into());
                return;
            }
        };
        let state = mesh.store.get();
        let route = state.resolve(&src, dst);
        let service = state
            .service_at(&src.network, dst.ip())
            .map(|s| s.service.clone());
        drop(state);
        let flow = |target: SocketAddr| {
            let mut f = Flow::new(&ctx, Direction::Outbound, peer, target);
            f.src_workload = Some(src.clone());
            f.dst_service = service.clone();
            f
        };
        // (HBONE peer address, CONNECT target, workload that must answer)
        let hbone = match route {
            Destination::Workload(w, target) if w.protocol == Protocol::Hbone => Some((
                SocketAddr::new(target.ip(), super::INBOUND_HBONE_PORT),
                target,
                w,
            )),
            Destination::Waypoint {
                waypoint,
                addr,
                target,
            } => Some((addr, target, waypoint)),
            Destination::NoWaypoint { target, reason } => {
                flow(target).fail(Failure::NoWaypoint(reason));
                return;
            }
            Destination::NoEndpoint {
                service,
                port,
                reason,
            } => {
                flow(dst).fail(Failure::NoEndpoint {
                    service,
                    port,
                    reason,
                });
                return;
            }
            Destination::Workload(w, target) => {
                let mut f = flow(target);
                f.dst_workload = Some(w);
                return passthrough(&ctx, stream, f).await;
            }
            Destination::Passthrough(target) => {
                return passthrough(&ctx, stream, flow(target)).await;
            }
            Destination::Hostname { workload, port } => {
                let target = match resolve(&workload.hostname, port, dst.is_ipv4()).await {
                    Ok(target) => target,
                    Err(e) => {
                        let hostname = workload.hostname.to_string();
                        return flow(dst).fail(Failure::Resolve(hostname, e));
                    }
                };
                if workload.protocol == Protocol::Hbone {
                    let via = SocketAddr::new(target.ip(), super::INBOUND_HBONE_PORT);
                    Some((via, target, workload))
                } else {
                    let mut f = flow(target);
                    f.dst_workload = Some(workload);
                    return passthrough(&ctx, stream, f).await;
                }
            }
        };
        if let Some((via, target, upstream)) = hbone {
            let dst_identity = upstream.identity();
            let mut flow = flow(target);
            flow.src_identity = Some(cert.identity.clone());
            flow.dst_identity = Some(dst_identity.clone());
            flow.dst_workload = Some(upstream);
            flow.hbone_addr = Some(target);
            flow.dst = via;
            flow.mtls = true;
            match pod
                .pool
                .connect(&ctx, mesh, cert, dst_identity, via, target, peer)
                .await
            {
                Ok((tunnel, stream_slot)) => {
                    flow.relay(stream, tunnel, None).await;
                    drop(stream_slot);
                }
                Err(e) => flow.fail(e.into()),
            }
            return;
        }
    }
    passthrough(
        &ctx,
        stream,
        Flow::new(&ctx, Direction::Outbound, peer, dst),
    )
    .await
}

async fn passthrough(ctx: &Arc<PodContext>, stream: TcpStream, flow: Flow) {
    let dst = flow.dst;
    match ctx.connect(dst, None).await {
        Ok(upstream) => {
            let _ = upstream.set_nodelay(true);
            flow.relay(stream, upstream, None).await
        }
        Err(e) => flow.fail(Failure::Connect(dst, e)),
    }
}

/// The address of `hostname` (an endpoint known by hostname only), from ztunnel's own
/// resolver, as Istio's ztunnel resolves such endpoints: of the original destination's
/// family when there is one (`v4`), else the first.
async fn resolve(hostname: &str, port: u16, v4: bool) -> std::io::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((hostname, port)).await?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4() == v4)
        .or(addrs.first())
        .copied()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}
