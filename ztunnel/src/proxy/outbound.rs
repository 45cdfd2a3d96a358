//! Outbound (15001): the app's connections, redirected by the pod's nat rule. The
//! original destination comes from conntrack (`SO_ORIGINAL_DST`); ztunnel connects to
//! it from inside the pod's netns with its mark, so the rules let it out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::relay::Flow;
use super::{is_ztunnel_port, PodContext};
use crate::inpod::packet;

pub async fn handle(ctx: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let dst = match packet::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => {
            let local = stream.local_addr().unwrap_or(peer);
            Flow {
                ctx: &ctx,
                direction: "outbound",
                src: peer,
                dst: local,
                started,
            }
            .log(0, 0, Some(&format!("no original destination: {e}")));
            return;
        }
    };
    let flow = Flow {
        ctx: &ctx,
        direction: "outbound",
        src: peer,
        dst,
        started,
    };
    // A connection made straight to 15001 (not redirected) has itself as its original
    // destination; forwarding it, or anything aimed at our ports, would loop.
    if stream.local_addr().ok() == Some(dst) || is_ztunnel_port(dst.port()) {
        flow.log(0, 0, Some("refused: destination is ztunnel itself"));
        return;
    }
    match ctx.connect(dst, None).await {
        Ok(upstream) => flow.relay(stream, upstream).await,
        Err(e) => flow.log(0, 0, Some(&format!("connect {dst}: {e}"))),
    }
}
