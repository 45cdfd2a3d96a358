//! Inbound plaintext (15006): connections from clients outside the mesh, delivered by
//! TPROXY with their original destination as the local address. ztunnel connects to
//! the app from the client's own address (a transparent bind), so the app sees the
//! real peer; the pod's connmark rule and policy route bring the replies back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::relay::Flow;
use super::{is_ztunnel_port, PodContext};

pub async fn handle(ctx: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let dst = match stream.local_addr() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(uid = %ctx.uid, "inbound connection without a local address: {e}");
            return;
        }
    };
    let flow = Flow {
        ctx: &ctx,
        direction: "inbound",
        src: peer,
        dst,
        started,
    };
    if is_ztunnel_port(dst.port()) {
        flow.log(0, 0, Some("refused: destination is ztunnel itself"));
        return;
    }
    match ctx.connect(dst, Some(peer.ip())).await {
        Ok(upstream) => flow.relay(stream, upstream).await,
        Err(e) => flow.log(0, 0, Some(&format!("connect {dst}: {e}"))),
    }
}
