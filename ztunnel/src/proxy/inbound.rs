//! Inbound HBONE (15008). The listener is bound (so the pod's TPROXY rule for 15008
//! has a socket to deliver to), but mutual-TLS termination is not part of this build:
//! connections are closed, never passed to the app in plaintext.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::relay::Flow;
use super::PodContext;

pub async fn handle(ctx: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
    let dst = stream.local_addr().unwrap_or(peer);
    Flow {
        ctx: &ctx,
        direction: "inbound",
        src: peer,
        dst,
        started: Instant::now(),
    }
    .log(0, 0, Some("refused: HBONE is not served by this build"));
}
