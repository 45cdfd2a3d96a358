//! Copying bytes both ways between two streams; the metrics of each connection, counted
//! as bytes flow; and the access log line written when it ends, with Istio's field
//! names (`src.addr`, `src.workload`, `src.namespace`, `src.identity`, `dst.addr`,
//! `dst.hbone_addr`, `dst.service`, `dst.workload`, `dst.namespace`, `dst.identity`,
//! `direction`, `bytes_sent`, `bytes_recv`, `duration`, `error`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::connections::{Connection, Listed};
use super::failure::Failure;
use super::PodContext;
use crate::identity::Identity;
use crate::metrics::traffic::{ByteCounters, Reporter, ResponseFlags, TrafficLabels};
use crate::state::service::Service;
use crate::state::Workload;

/// One proxied connection: what the access log and the metrics say of it.
pub struct Flow {
    pub ctx: Arc<PodContext>,
    pub reporter: Reporter,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The HBONE target (the CONNECT authority), when the connection is a tunnel.
    pub hbone_addr: Option<SocketAddr>,
    pub started: Instant,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    pub src_workload: Option<Arc<Workload>>,
    pub dst_workload: Option<Arc<Workload>>,
    /// The service the client addressed (a VIP), if any.
    pub dst_service: Option<Arc<Service>>,
    /// Carried over mutual TLS (HBONE).
    pub mtls: bool,
    /// Set once the connection is counted as opened.
    counters: OnceLock<Opened>,
}

/// A connection counted as opened: its labels, its byte counters, and its entry in the
/// node's table of live connections (removed when the flow is dropped; `None` when it
/// is the entry the connection was registered in for policy, which its handler
/// holds).
struct Opened {
    labels: TrafficLabels,
    bytes: ByteCounters,
    _listed: Option<Listed>,
}

/// Counts the bytes read through it.
struct Counted<S> {
    inner: S,
    count: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.count.inc_by(read as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Flow {
    /// A connection of the pod's, arrived on the listener of `direction`.
    pub fn new(
        ctx: &Arc<PodContext>,
        direction: super::Direction,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        Flow {
            ctx: ctx.clone(),
            reporter: direction.reporter(),
            src,
            dst,
            hbone_addr: None,
            started: Instant::now(),
            src_identity: None,
            dst_identity: None,
            src_workload: None,
            dst_workload: None,
            dst_service: None,
            mtls: false,
            counters: OnceLock::new(),
        }
    }

    fn direction(&self) -> &'static str {
        match self.reporter {
            Reporter::source => "outbound",
            Reporter::destination => "inbound",
        }
    }

    fn labels(&self) -> TrafficLabels {
        let mut l = TrafficLabels::new(self.reporter)
            .source(self.src_workload.as_deref(), self.src_identity.as_ref())
            .destination(self.dst_workload.as_deref(), self.dst_identity.as_ref())
            .mtls(self.mtls);
        if let Some(s) = &self.dst_service {
            l = l.service(&s.hostname, &s.name, &s.namespace);
        }
        l
    }

    /// Counts the connection as opened and lists it (once, in `registered`'s entry
    /// when it was registered for policy); its labels and counters.
    fn open(&self, registered: Option<&Listed>) -> &Opened {
        self.counters.get_or_init(|| {
            let labels = self.labels();
            let bytes = self.ctx.cfg.metrics.traffic.open(&labels);
            let inbound = self.reporter == Reporter::destination;
            let original_dst = self.hbone_addr.unwrap_or(self.dst);
            let conn = Connection {
                uid: self.ctx.uid.clone(),
                inbound,
                src: self.src,
                original_dst,
                actual_dst: if inbound { original_dst } else { self.dst },
            };
            let listed = self.ctx.cfg.connections.track(conn, registered);
            Opened {
                labels,
                bytes,
                _listed: listed,
            }
        })
    }

    /// Relays until both directions are closed, or until the live registration is
    /// cancelled (a policy change now denies the connection). A FIN from one side is
    /// passed on as a shutdown of the other side's write half, so half-closed
    /// connections work. Bytes are counted in the metrics as they are copied.
    pub async fn relay<A, B>(self, downstream: A, upstream: B, live: Option<&Listed>)
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let counters = &self.open(live).bytes;
        let mut downstream = Counted {
            inner: downstream,
            count: counters.received.clone(),
        };
        let mut upstream = Counted {
            inner: upstream,
            count: counters.sent.clone(),
        };
        // Buffers that grow with the flow (see `copy`): an idle connection holds 2 KiB.
        let copy = super::copy::bidirectional(&mut downstream, &mut upstream);
        let result = match live {
            Some(reg) => tokio::select! {
                r = copy => Some(r),
                _ = reg.revoked() => None,
            },
            None => Some(copy.await),
        };
        match result {
            Some(Ok((sent, received))) => self.finish(sent, received, None),
            Some(Err(e)) => self.fail(Failure::Relay(e)),
            None => {
                let reason = live.map(Listed::reason).unwrap_or_default();
                self.fail(Failure::Revoked(format!("closed: {reason}")))
            }
        }
    }

    /// The connection failed, or was refused, before any byte was relayed.
    pub fn fail(&self, failure: Failure) {
        self.finish(0, 0, Some(&failure))
    }

    /// Counts the end in the metrics (the response flag from the failure's kind) and
    /// writes the access log line (target `access`): `bytes_sent` is what the client
    /// sent, `bytes_recv` what it received.
    fn finish(&self, sent: u64, received: u64, failure: Option<&Failure>) {
        let flags = failure.map_or(ResponseFlags::None, Failure::flags);
        self.ctx
            .cfg
            .metrics
            .traffic
            .close(&self.open(None).labels, flags, failure.is_some());
        let error = failure.map(ToString::to_string);
        let error = error.as_deref();
        let id = |i: &Option<Identity>| i.as_ref().filter(|_| self.mtls).map(ToString::to_string);
        // The pod's own side is named even when its workload is not known.
        let pod = Some(self.ctx.info.name.as_str());
        let pod_ns = Some(self.ctx.info.namespace.as_str());
        let (src_name, src_ns, dst_name, dst_ns) = {
            fn name(w: &Option<Arc<Workload>>) -> Option<&str> {
                w.as_ref().map(|w| w.name.as_str())
            }
            fn ns(w: &Option<Arc<Workload>>) -> Option<&str> {
                w.as_ref().map(|w| w.namespace.as_str())
            }
            match self.reporter {
                Reporter::source => (
                    name(&self.src_workload).or(pod),
                    ns(&self.src_workload).or(pod_ns),
                    name(&self.dst_workload),
                    ns(&self.dst_workload),
                ),
                Reporter::destination => (
                    name(&self.src_workload),
                    ns(&self.src_workload),
                    name(&self.dst_workload).or(pod),
                    ns(&self.dst_workload).or(pod_ns),
                ),
            }
        };
        let service = self.dst_service.as_ref().map(|s| s.hostname.as_str());
        let duration = format!("{}ms", self.started.elapsed().as_millis());
        macro_rules! access {
            ($level:expr) => {
                tracing::event!(
                    target: "access",
                    $level,
                    src.addr = %self.src,
                    src.workload = src_name,
                    src.namespace = src_ns,
                    src.identity = id(&self.src_identity),
                    dst.addr = %self.dst,
                    dst.hbone_addr = self.hbone_addr.map(tracing::field::display),
                    dst.service = service,
                    dst.workload = dst_name,
                    dst.namespace = dst_ns,
                    dst.identity = id(&self.dst_identity),
                    direction = self.direction(),
                    bytes_sent = sent,
                    bytes_recv = received,
                    duration = duration,
                    error = error,
                    "connection complete"
                )
            };
        }
        if error.is_some() {
            access!(tracing::Level::ERROR)
        } else {
            access!(tracing::Level::INFO)
        }
    }
}
