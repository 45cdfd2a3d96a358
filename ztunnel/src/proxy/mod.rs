//! The proxy ztunnel runs for one pod: its listeners inside the pod's netns and the
//! connections they carry.
//!
//! | port  | module                  | what arrives                                  |
//! |-------|-------------------------|-----------------------------------------------|
//! | 15001 | [`outbound`]            | the app's outgoing connections (nat REDIRECT) |
//! | 15006 | [`inbound_passthrough`] | plaintext from non-mesh clients (TPROXY)      |
//! | 15008 | [`inbound`]             | HBONE from mesh peers (TPROXY)                |

pub mod budget;
pub mod connections;
pub mod copy;
pub mod factory;
pub mod failure;
pub mod headers;
pub mod inbound;
pub mod inbound_passthrough;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod seam;
pub mod socket;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::zds::WorkloadInfo;
use protocol::WorkloadUid;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::identity::manager::{CertManager, IdentityCert};
use crate::identity::Identity;
use crate::state::{MeshState, Store, Workload};
use failure::{Failure, PodError};
use pool::{HboneConfig, Pool};
use seam::SocketFactory;
use socket::{Keepalive, ListenerOpts};

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const INBOUND_HBONE_PORT: u16 = 15008;

pub use socket::canonical;

/// Ports a connection must never be forwarded to: that would loop into ztunnel.
pub fn is_ztunnel_port(port: u16) -> bool {
    matches!(
        port,
        OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | INBOUND_HBONE_PORT
    )
}

/// What pods in the mesh share: the mesh state, the certificates, HBONE tuning.
/// Absent only with `PASSTHROUGH_ONLY`: then traffic is proxied in plaintext only.
pub struct MeshConfig {
    pub store: Arc<Store>,
    pub certs: Arc<CertManager>,
    pub hbone: HboneConfig,
    /// How long a connection waits for state it needs and ztunnel does not have yet
    /// (the pod's workload, its certificate) before it is refused (Istio: 5 s).
    pub pod_wait: Duration,
}

/// A pod's part of the mesh: its HBONE connections, its TLS handshakes, and
/// the TLS acceptor of its identity. Its workload and certificate are looked up per
/// connection: a pod whose workload has not arrived yet is served as soon as it does,
/// and its connections wait for it (up to [`MeshConfig::pod_wait`]), never passing
/// through in plaintext.
pub struct PodMesh {
    mesh: Arc<MeshConfig>,
    info: WorkloadInfo,
    /// The acceptor built for a certificate (identity, generation): rebuilt when the
    /// certificate is renewed (the roots come with it) or the identity changes.
    acceptor: std::sync::Mutex<Option<(Identity, u64, tokio_rustls::TlsAcceptor)>>,
    pub pool: Pool,
    /// TLS handshakes in progress on the pod's 15008 (see `HboneConfig::max_handshakes`).
    pub handshakes: Arc<tokio::sync::Semaphore>,
}

fn acceptor(cert: &Arc<IdentityCert>) -> Result<tokio_rustls::TlsAcceptor, PodError> {
    let server =
        crate::tls::server_config(cert.clone(), cert.roots()).map_err(PodError::TlsConfig)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

impl PodMesh {
    pub fn new(mesh: Arc<MeshConfig>, info: WorkloadInfo) -> PodMesh {
        PodMesh {
            handshakes: Arc::new(tokio::sync::Semaphore::new(mesh.hbone.max_handshakes)),
            mesh,
            info,
            acceptor: std::sync::Mutex::new(None),
            pool: Pool::default(),
        }
    }

    /// The pod's workload (this node's, matched by namespace, name and service
    /// account), waiting for it to arrive up to the pod wait.
    pub async fn workload(&self) -> Result<Arc<Workload>, PodError> {
        let deadline = tokio::time::Instant::now() + self.mesh.pod_wait;
        let mut changes = self.mesh.store.subscribe();
        loop {
            if let Some(w) = self.lookup(&self.mesh.store.get()) {
                return Ok(w);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(PodError::NoWorkload {
                        namespace: self.info.namespace.clone(),
                        name: self.info.name.clone(),
                        service_account: self.info.service_account.clone(),
                        waited: self.mesh.pod_wait,
                    })
                }
            }
        }
    }

    /// The pod's workload in `state`, without waiting.
    pub fn lookup(&self, state: &MeshState) -> Option<Arc<Workload>> {
        state
            .pod_workload(
                &self.info.namespace,
                &self.info.name,
                &self.info.service_account,
            )
            .cloned()
    }

    /// The pod's workload and a certificate it may present, waiting (up to the pod
    /// wait) for whichever is missing.
    pub async fn identity(&self) -> Result<(Arc<Workload>, Arc<IdentityCert>), PodError> {
        let w = self.workload().await?;
        let id = w.identity();
        let cert = tokio::time::timeout(self.mesh.pod_wait, self.mesh.certs.get(&id))
            .await
            .map_err(|_| PodError::CertTimeout(id.clone(), self.mesh.pod_wait))?
            .map_err(|e| PodError::NoCert(id.clone(), e.to_string()))?;
        cert.usable().map_err(PodError::CertUnusable)?;
        Ok((w, cert))
    }

    /// The pod's workload and the TLS acceptor of its current certificate.
    pub async fn acceptor(&self) -> Result<(Arc<Workload>, tokio_rustls::TlsAcceptor), PodError> {
        let (w, cert) = self.identity().await?;
        let generation = cert.generation();
        let mut held = self.acceptor.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, g, a)) = held.as_ref() {
            if *id == cert.identity && *g == generation {
                return Ok((w, a.clone()));
            }
        }
        let a = acceptor(&cert)?;
        *held = Some((cert.identity.clone(), generation, a.clone()));
        Ok((w, a))
    }
}

/// Settings shared by every pod proxy.
#[derive(Clone)]
pub struct ProxyConfig {
    /// `SO_MARK` on every socket made for a pod.
    pub mark: u32,
    pub reuse_port: bool,
    /// How long in-flight connections may finish after a pod is drained.
    pub drain_grace: Duration,
    pub connect_timeout: Duration,
    /// Dual-stack listeners; off, pods with routable IPv6 are refused.
    pub ipv6: bool,
    /// On every socket made for a pod (inherited by accepted connections).
    pub keepalive: Option<Keepalive>,
    pub mesh: Option<Arc<MeshConfig>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The node's live connections, by pod: the admin view (`workloadState`) and the
    /// policy re-checks of inbound ones (see [`connections`]).
    pub connections: Arc<connections::ConnectionTable>,
    /// Proxied connections one pod may have open at once (see [`budget`]).
    pub max_connections_per_pod: usize,
}

/// What a connection handler knows about its pod.
pub struct PodContext {
    pub uid: WorkloadUid,
    pub info: WorkloadInfo,
    /// Where the pod's sockets are made (in-pod: inside its netns).
    pub sockets: Arc<dyn SocketFactory>,
    pub cfg: Arc<ProxyConfig>,
    pub mesh: Option<PodMesh>,
    /// The pod's open proxied connections, against its cap.
    pub budget: Arc<budget::Budget>,
}

impl PodContext {
    /// A share of the pod's connection budget, or the refusal: logged, counted.
    pub fn take_share(&self, flow: &relay::Flow) -> Option<budget::Share> {
        let share = self.budget.take();
        if share.is_none() {
            self.cfg.metrics.connections_refused.inc();
            flow.fail(Failure::Overflow(self.budget.refusal()));
        }
        share
    }

    /// Connects to `dest` from inside the pod's netns, with the mark (and, with
    /// `source`, from that address, transparently).
    pub async fn connect(
        &self,
        dest: SocketAddr,
        source: Option<std::net::IpAddr>,
    ) -> std::io::Result<TcpStream> {
        let how = seam::Upstream {
            mark: self.cfg.mark,
            keepalive: self.cfg.keepalive,
            source,
        };
        self.sockets
            .connect(dest, how, self.cfg.connect_timeout)
            .await
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
    /// Binds 15001, 15006 and 15008 inside the pod's netns and starts serving them:
    /// each one dual-stack socket (`[::]`, `IPV6_V6ONLY` off) with IPv6 on, IPv4 only
    /// where the kernel has no IPv6 or it is off. Fails (and binds nothing) if any of
    /// the three cannot be created.
    pub async fn start(ctx: PodContext) -> std::io::Result<PodProxy> {
        let opts = |transparent| ListenerOpts {
            mark: ctx.cfg.mark,
            transparent,
            reuse_port: ctx.cfg.reuse_port,
            keepalive: ctx.cfg.keepalive,
        };
        let specs = [
            (OUTBOUND_PORT, opts(false)),
            (INBOUND_PLAINTEXT_PORT, opts(true)),
            (INBOUND_HBONE_PORT, opts(true)),
        ];
        let [out, plain, hbone] = ctx.sockets.listeners(ctx.cfg.ipv6, specs)?;
        let (out, plain, hbone) = (
            TcpListener::from_std(out)?,
            TcpListener::from_std(plain)?,
            TcpListener::from_std(hbone)?,
        );
        let proxy = PodProxy {
            ctx: Arc::new(ctx),
            stop_listening: CancellationToken::new(),
            close_connections: CancellationToken::new(),
            connections: TaskTracker::new(),
        };
        proxy.serve([out, plain, hbone]);
        Ok(proxy)
    }

    /// The pod's one task: accepts on its three listeners (outbound, inbound
    /// plaintext, HBONE), each connection becoming a task of its own, and on every
    /// mesh state change re-checks the pod's live inbound connections, closing those
    /// the new policies deny (also while they drain). It ends when listening has
    /// stopped and the pod's last connection is gone, so it never outlives the pod.
    /// One task rather than four per pod: fewer spawns on the way to the ZDS ack and
    /// less memory per idle pod.
    fn serve(&self, [out, plain, hbone]: [TcpListener; 3]) {
        let ctx = self.ctx.clone();
        let stop = self.stop_listening.clone();
        let close = self.close_connections.clone();
        let tracker = self.connections.clone();
        let mut changes = ctx.cfg.mesh.as_ref().map(|m| m.store.subscribe());
        tokio::spawn(async move {
            loop {
                let (accepted, direction) = tokio::select! {
                    _ = stop.cancelled() => break,
                    a = out.accept() => (a, Direction::Outbound),
                    a = plain.accept() => (a, Direction::InboundPlaintext),
                    a = hbone.accept() => (a, Direction::InboundHbone),
                    changed = async { changes.as_mut()?.changed().await.ok() }, if changes.is_some() => {
                        if changed.is_none() {
                            changes = None;
                        }
                        recheck_policies(&ctx);
                        continue;
                    }
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let (ctx, peer) = (ctx.clone(), canonical(peer));
                        // One share per proxied connection; on 15008 one per CONNECT
                        // (a peer's connection carries many), taken in `inbound`.
                        let share = match direction {
                            Direction::InboundHbone => None,
                            _ => {
                                let local = stream.local_addr().map(canonical).unwrap_or(peer);
                                let flow = relay::Flow::new(&ctx, direction, peer, local);
                                match ctx.take_share(&flow) {
                                    Some(s) => Some(s),
                                    None => continue,
                                }
                            }
                        };
                        let close = close.clone();
                        tracker.spawn(async move {
                            let _share = share;
                            let work = async {
                                match direction {
                                    Direction::Outbound => outbound::handle(ctx, stream, peer).await,
                                    Direction::InboundPlaintext => {
                                        inbound_passthrough::handle(ctx, stream, peer).await
                                    }
                                    Direction::InboundHbone => inbound::handle(ctx, stream, peer).await,
                                }
                            };
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
            // The ports close now; connections still in flight keep their policy
            // re-checks until the last one is gone (the tracker is closed by the
            // drain, or when the proxy is dropped).
            drop((out, plain, hbone));
            while let Some(rx) = changes.as_mut() {
                tokio::select! {
                    _ = tracker.wait() => break,
                    changed = rx.changed() => match changed {
                        Ok(()) => recheck_policies(&ctx),
                        Err(_) => break,
                    },
                }
            }
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
            crate::memory::release_soon();
        }
    }
}

/// Which of a pod's listeners accepted a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    InboundPlaintext,
    InboundHbone,
}

impl Direction {
    /// Whose side of the connection the pod is, for Istio's `reporter` label.
    pub fn reporter(self) -> crate::metrics::traffic::Reporter {
        match self {
            Direction::Outbound => crate::metrics::traffic::Reporter::source,
            Direction::InboundPlaintext | Direction::InboundHbone => {
                crate::metrics::traffic::Reporter::destination
            }
        }
    }
}

/// Re-checks the pod's live inbound connections against the current policies.
fn recheck_policies(ctx: &PodContext) {
    if let (Some(mesh), Some(pod)) = (&ctx.cfg.mesh, &ctx.mesh) {
        let state = mesh.store.get();
        ctx.cfg
            .connections
            .recheck(&ctx.uid, &state, pod.lookup(&state).as_deref());
    }
}

impl Drop for PodProxy {
    /// Stops listening; connections in flight run to their end, and the pod's task
    /// with the last of them.
    fn drop(&mut self) {
        self.stop_listening.cancel();
        self.connections.close();
    }
}

#[cfg(test)]
mod tests;
