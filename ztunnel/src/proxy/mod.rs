//! The proxy ztunnel runs for one pod: its listeners inside the pod's netns and the
//! connections they carry.
//!
//! | port  | module                  | what arrives                                  |
//! |-------|-------------------------|-----------------------------------------------|
//! | 15001 | [`outbound`]            | the app's outgoing connections (nat REDIRECT) |
//! | 15006 | [`inbound_passthrough`] | plaintext from non-mesh clients (TPROXY)      |
//! | 15008 | [`inbound`]             | HBONE from mesh peers (TPROXY)                |

pub mod inbound;
pub mod inbound_passthrough;
pub mod outbound;
pub mod relay;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use protocol::zds::WorkloadInfo;
use protocol::WorkloadUid;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::inpod::netns::InpodNetns;
use crate::inpod::packet::{self, ListenerOpts};

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const INBOUND_HBONE_PORT: u16 = 15008;

/// Ports a connection must never be forwarded to: that would loop into ztunnel.
pub fn is_ztunnel_port(port: u16) -> bool {
    matches!(
        port,
        OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | INBOUND_HBONE_PORT
    )
}

/// Settings shared by every pod proxy.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// `SO_MARK` on every socket made for a pod.
    pub mark: u32,
    pub reuse_port: bool,
    /// How long in-flight connections may finish after a pod is drained.
    pub drain_grace: Duration,
    pub connect_timeout: Duration,
}

/// What a connection handler knows about its pod.
pub struct PodContext {
    pub uid: WorkloadUid,
    pub info: WorkloadInfo,
    pub netns: InpodNetns,
    pub cfg: Arc<ProxyConfig>,
}

impl PodContext {
    /// Connects to `dest` from inside the pod's netns, with the mark (and, with
    /// `source`, from that address, transparently).
    pub async fn connect(
        &self,
        dest: SocketAddr,
        source: Option<std::net::IpAddr>,
    ) -> std::io::Result<TcpStream> {
        let mark = self.cfg.mark;
        let std_stream = self
            .netns
            .run(move || packet::upstream(dest, mark, source))
            .await?;
        let socket = tokio::net::TcpSocket::from_std_stream(std_stream);
        tokio::time::timeout(self.cfg.connect_timeout, socket.connect(dest))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

/// A running pod proxy. Dropping it without [`PodProxy::drain`] stops it at once.
pub struct PodProxy {
    ctx: Arc<PodContext>,
    stop_listening: CancellationToken,
    close_connections: CancellationToken,
    connections: TaskTracker,
}

impl PodProxy {
    /// Binds 15001, 15006 and 15008 inside the pod's netns and starts serving them.
    /// Fails (and binds nothing) if any of the three cannot be created.
    pub async fn start(ctx: PodContext) -> std::io::Result<PodProxy> {
        let opts = |transparent| ListenerOpts {
            mark: ctx.cfg.mark,
            transparent,
            reuse_port: ctx.cfg.reuse_port,
        };
        let any = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        let specs = [
            (any(OUTBOUND_PORT), opts(false)),
            (any(INBOUND_PLAINTEXT_PORT), opts(true)),
            (any(INBOUND_HBONE_PORT), opts(true)),
        ];
        let std_listeners = ctx
            .netns
            .run(move || {
                specs
                    .iter()
                    .map(|(addr, o)| {
                        packet::listener(*addr, *o).map_err(|e| {
                            std::io::Error::new(e.kind(), format!("listen on {addr}: {e}"))
                        })
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .await?;
        let mut listeners = Vec::with_capacity(3);
        for l in std_listeners {
            listeners.push(TcpListener::from_std(l)?);
        }
        let proxy = PodProxy {
            ctx: Arc::new(ctx),
            stop_listening: CancellationToken::new(),
            close_connections: CancellationToken::new(),
            connections: TaskTracker::new(),
        };
        let mut listeners = listeners.into_iter();
        let (out, plain, hbone) = (listeners.next(), listeners.next(), listeners.next());
        if let (Some(out), Some(plain), Some(hbone)) = (out, plain, hbone) {
            proxy.serve(out, outbound::handle);
            proxy.serve(plain, inbound_passthrough::handle);
            proxy.serve(hbone, inbound::handle);
        }
        Ok(proxy)
    }

    fn serve<F, Fut>(&self, listener: TcpListener, handler: F)
    where
        F: Fn(Arc<PodContext>, TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let ctx = self.ctx.clone();
        let stop = self.stop_listening.clone();
        let close = self.close_connections.clone();
        let tracker = self.connections.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let work = handler(ctx.clone(), stream, peer);
                        let close = close.clone();
                        tracker.spawn(async move {
                            tokio::select! {
                                _ = work => {}
                                _ = close.cancelled() => debug!(%peer, "connection closed: pod drained"),
                            }
                        });
                    }
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        warn!(uid = %ctx.uid, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            // Dropping the listener here closes the port at once.
        });
    }

    /// Stops listening now; in-flight connections get the grace period, then close.
    /// Returns when the last connection is gone.
    pub fn drain(self) -> impl Future<Output = ()> + Send + 'static {
        self.stop_listening.cancel();
        self.connections.close();
        let grace = self.ctx.cfg.drain_grace;
        let uid = self.ctx.uid.clone();
        let close = self.close_connections.clone();
        let tracker = self.connections.clone();
        async move {
            if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
                info!(%uid, active = tracker.len(), "drain grace period over, closing connections");
                close.cancel();
                tracker.wait().await;
            }
            debug!(%uid, "pod proxy drained");
        }
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.stop_listening.cancel();
    }
}
