//! The agent's side of ZDS: a Unix seqpacket server that ztunnel connects to. A
//! transport only: what the pods are is the enrollment's business.
//!
//! Every new ztunnel connection gets the snapshot its [`SnapshotSource`] hands out (an
//! Add with the netns fd for each enrolled pod, or a Keep for a pod whose netns the
//! agent could not open), then SnapshotSent; how ztunnel answered each entry goes back
//! to the source. After that, live Adds go to the newest connection and Dels to all:
//! two ztunnels overlap during a rolling upgrade, and the old one must drop pods too.
//! Each connection has one task that owns its socket and sends requests strictly one
//! at a time, each answered by exactly one ack.
//!
//! A connection is registered before its snapshot is taken, so a pod enrolled while a
//! snapshot is being sent is either in that snapshot or queued on the connection right
//! after it (an Add twice is harmless: ztunnel acks a known netns again).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use protocol::message::decode_hello;
use protocol::zds::WorkloadInfo;
use protocol::{Ack, Netns, Request, SeqpacketConn, SeqpacketListener, WorkloadUid};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

/// What the snapshot says about one pod.
#[derive(Clone, Debug)]
pub enum SnapshotEntry {
    /// Enrolled, with its netns.
    Add {
        info: WorkloadInfo,
        netns: Arc<Netns>,
    },
    /// Enrolled, but its netns could not be opened (e.g. after an agent restart): ztunnel
    /// keeps whatever proxy it runs for it.
    Keep,
}

/// Who decides what a newly connected ztunnel must hear (the enrollment).
pub trait SnapshotSource: Send + Sync + 'static {
    /// The pods, in the order to send them. Called once per connection, after the
    /// connection can already receive live requests.
    fn snapshot(&self) -> Vec<(WorkloadUid, SnapshotEntry)>;
    /// How ztunnel answered one entry of its snapshot (`Err`: its error ack, or a
    /// failed exchange).
    fn snapshot_answered(
        &self,
        uid: &WorkloadUid,
        entry: &SnapshotEntry,
        result: Result<(), &ZdsError>,
    );
}

#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ztunnel rejected {kind} for {uid}: {error}")]
    Rejected {
        kind: &'static str,
        uid: String,
        error: String,
    },
    #[error("ZDS exchange with ztunnel failed: {0}")]
    Protocol(#[from] protocol::Error),
    #[error("the ztunnel connection was lost before it answered: {0}")]
    ConnectionLost(String),
}

/// Whether an Add reached a ztunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    /// A ztunnel acked it: its listeners are up in the pod.
    Acked,
    /// No ztunnel is connected; the pod is in the snapshot the next one will get.
    NoZtunnel,
}

struct Job {
    request: Request<Arc<Netns>>,
    done: oneshot::Sender<Result<(), ZdsError>>,
}

struct ConnHandle {
    id: u64,
    jobs: mpsc::UnboundedSender<Job>,
    /// The ztunnel process on the other end (SO_PEERCRED): 0 when it runs in a PID
    /// namespace this agent cannot see (its pod).
    pid: i32,
    /// A pidfd of it, which names it in any PID namespace (see
    /// [`crate::discovery::pid_in`]).
    pidfd: Option<Arc<std::os::fd::OwnedFd>>,
}

#[derive(Default)]
struct State {
    /// Connected ztunnels that have received their snapshot; the last is the newest.
    conns: Vec<ConnHandle>,
    next_id: u64,
}

struct Inner {
    timeout: Duration,
    state: Mutex<State>,
    connected: watch::Sender<usize>,
}

/// The ZDS server. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct ZdsServer {
    inner: Arc<Inner>,
}

impl ZdsServer {
    /// `timeout` bounds each write and each ack (ZDS uses 5 s).
    pub fn new(timeout: Duration) -> Self {
        ZdsServer {
            inner: Arc::new(Inner {
                timeout,
                state: Mutex::default(),
                connected: watch::channel(0).0,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state is
        // still consistent (every mutation is a single insert/remove), so carry on.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the pod's Add to the newest ztunnel, waiting for the ack. The caller must
    /// have made the pod part of its [`SnapshotSource`]'s snapshot first, so that a
    /// ztunnel connecting meanwhile gets it one way or the other.
    pub async fn add(
        &self,
        uid: WorkloadUid,
        info: WorkloadInfo,
        netns: Arc<Netns>,
    ) -> Result<AddOutcome, ZdsError> {
        let rx = {
            let st = self.state();
            let Some(newest) = st.conns.last() else {
                return Ok(AddOutcome::NoZtunnel);
            };
            submit(newest, Request::Add { uid, info, netns })
        };
        rx.await
            .map_err(|_| ZdsError::ConnectionLost("connection closed".into()))??;
        Ok(AddOutcome::Acked)
    }

    /// Sends Del to every connected ztunnel. The caller must have taken the pod out of
    /// its snapshot first: a ztunnel that disconnects meanwhile then drains it after
    /// its next snapshot.
    pub async fn del(&self, uid: &WorkloadUid) -> Result<(), ZdsError> {
        let pending: Vec<_> = {
            let st = self.state();
            st.conns
                .iter()
                .map(|c| submit(c, Request::Del { uid: uid.clone() }))
                .collect()
        };
        let mut result = Ok(());
        for rx in pending {
            match rx.await {
                // A lost connection is fine: the pod is out of every future snapshot.
                Ok(Err(ZdsError::ConnectionLost(_))) | Err(_) | Ok(Ok(())) => {}
                Ok(Err(e)) if result.is_ok() => result = Err(e),
                Ok(Err(_)) => {}
            }
        }
        result
    }

    /// Number of connected ztunnels that have their snapshot.
    pub fn connections(&self) -> usize {
        *self.inner.connected.borrow()
    }

    /// The process ids of the connected ztunnels, oldest connection first, as the
    /// procfs at `proc_root` numbers them (the node's, for `istio-cni diagnose`).
    pub fn ztunnel_pids(&self, proc_root: &std::path::Path) -> Vec<i32> {
        self.state()
            .conns
            .iter()
            .map(|c| {
                c.pidfd
                    .as_ref()
                    .and_then(|fd| crate::discovery::pid_in(proc_root, fd))
                    .unwrap_or(c.pid)
            })
            .collect()
    }

    /// Ticks when the number of connected ztunnels changes.
    pub fn subscribe_connections(&self) -> watch::Receiver<usize> {
        self.inner.connected.subscribe()
    }

    /// Waits until at least `n` ztunnels are connected.
    pub async fn wait_for_connections(&self, n: usize) {
        let mut rx = self.inner.connected.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Accepts ztunnel connections until this future is dropped; dropping it also
    /// closes every connection it accepted (so ztunnel sees the agent go away).
    pub async fn serve(self, listener: SeqpacketListener, source: Arc<dyn SnapshotSource>) {
        info!(path = %listener.path().display(), "ZDS server listening for ztunnel");
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => {
                        let (server, source) = (self.clone(), source.clone());
                        conns.spawn(async move { server.handle(conn, &*source).await });
                    }
                    Err(e) => {
                        warn!("accepting a ztunnel connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next() => {}
            }
        }
    }

    async fn handle(&self, conn: SeqpacketConn, source: &dyn SnapshotSource) {
        let peer = match conn.peer_credentials() {
            Ok(c) => c,
            Err(e) => {
                warn!("cannot read ztunnel peer credentials, closing: {e}");
                return;
            }
        };
        let me = nix::unistd::geteuid().as_raw();
        if peer.uid() != 0 && peer.uid() != me {
            warn!(
                pid = peer.pid(),
                uid = peer.uid(),
                "refusing ZDS connection from an unexpected user (only root or uid {me} may connect)"
            );
            return;
        }
        let timeout = self.inner.timeout;
        let hello = conn.recv_timeout(timeout).await.and_then(decode_hello);
        if let Err(e) = hello {
            warn!(pid = peer.pid(), "ztunnel hello rejected, closing: {e}");
            return;
        }
        let (tx, mut jobs) = mpsc::unbounded_channel();
        let id = {
            let mut st = self.state();
            st.next_id += 1;
            let id = st.next_id;
            st.conns.push(ConnHandle {
                id,
                jobs: tx,
                pid: peer.pid(),
                pidfd: conn.peer_pidfd().ok().map(Arc::new),
            });
            id
        };
        let snapshot = source.snapshot();
        info!(
            conn = id,
            pid = peer.pid(),
            pods = snapshot.len(),
            "ztunnel connected, sending snapshot"
        );

        let live = std::sync::atomic::AtomicBool::new(false);
        let result = async {
            for (uid, entry) in snapshot {
                let request = match &entry {
                    SnapshotEntry::Add { info, netns } => Request::Add {
                        uid: uid.clone(),
                        info: info.clone(),
                        netns: netns.clone(),
                    },
                    SnapshotEntry::Keep => Request::Keep { uid: uid.clone() },
                };
                let result = exchange(&conn, &request, timeout).await;
                if let Err(e) = &result {
                    warn!(conn = id, "snapshot: {e}");
                }
                source.snapshot_answered(&uid, &entry, result.as_ref().map(|_| ()));
                match result {
                    Err(ZdsError::Protocol(e)) if e.is_fatal() => return Err(e),
                    _ => {}
                }
            }
            exchange(&conn, &Request::<Arc<Netns>>::SnapshotSent, timeout)
                .await
                .or_else(|e| match e {
                    ZdsError::Protocol(e) => Err(e),
                    other => {
                        warn!(conn = id, "snapshot: {other}");
                        Ok(())
                    }
                })?;
            self.inner.connected.send_modify(|c| *c += 1);
            live.store(true, std::sync::atomic::Ordering::Relaxed);
            loop {
                tokio::select! {
                    job = jobs.recv() => {
                        let Some(job) = job else { return Ok(()) };
                        match exchange(&conn, &job.request, timeout).await {
                            Err(ZdsError::Protocol(e)) if e.is_fatal() => {
                                let _ = job.done.send(Err(ZdsError::ConnectionLost(e.to_string())));
                                return Err(e);
                            }
                            other => {
                                let _ = job.done.send(other);
                            }
                        }
                    }
                    readable = conn.readable() => {
                        readable?;
                        // Nothing is outstanding, so this is a close or a stray message.
                        match conn.recv().await {
                            Ok(d) => warn!(conn = id, bytes = d.bytes.len(), "unsolicited message from ztunnel, ignored"),
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
        .await;

        self.state().conns.retain(|c| c.id != id);
        match result {
            Ok(()) | Err(protocol::Error::Closed) => info!(conn = id, "ztunnel disconnected"),
            Err(e) => warn!(conn = id, "ztunnel connection ended: {e}"),
        }
        if live.load(std::sync::atomic::Ordering::Relaxed) {
            self.inner
                .connected
                .send_modify(|c| *c = c.saturating_sub(1));
        }
        // Jobs still queued are dropped here; their senders see ConnectionLost.
    }
}

fn submit(
    conn: &ConnHandle,
    request: Request<Arc<Netns>>,
) -> oneshot::Receiver<Result<(), ZdsError>> {
    let (done, rx) = oneshot::channel();
    // A send error means the connection task is gone: `rx` then reports ConnectionLost.
    let _ = conn.jobs.send(Job { request, done });
    rx
}

/// Sends one request and waits for its ack.
async fn exchange(
    conn: &SeqpacketConn,
    request: &Request<Arc<Netns>>,
    timeout: Duration,
) -> Result<(), ZdsError> {
    debug!(kind = request.kind(), uid = ?request.uid(), "sending to ztunnel");
    conn.send_timeout(&request.encode(), request.fd(), timeout)
        .await?;
    let ack = Ack::decode(conn.recv_timeout(timeout).await?)?;
    ack.into_result().map_err(|error| ZdsError::Rejected {
        kind: request.kind(),
        uid: request.uid().map(ToString::to_string).unwrap_or_default(),
        error,
    })
}
