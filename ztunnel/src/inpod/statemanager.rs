//! One proxy per pod uid, kept in step with what the agent says over ZDS.
//!
//! - Add: start the pod's proxy. The same netns again (same dev+inode) is a no-op; a
//!   different netns replaces the proxy. If the listeners cannot be created the ack
//!   carries the error and the pod is retried in the background.
//! - Keep (snapshot only): the pod stays, whatever its proxy is doing.
//! - SnapshotSent: proxies of pods neither added nor kept in this snapshot are drained.
//! - Del: drain (stop listening now; connections get a grace period).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use protocol::zds::WorkloadInfo;
use protocol::{Netns, NetnsId, Request, WorkloadUid};
use tokio::sync::{watch, Mutex};
use tracing::{debug, info, warn};

use super::netns::InpodNetns;
use crate::metrics::InpodMetrics;
pub use crate::proxy::seam::{BoxFuture, ProxyFactory, RunningProxy, StartError};

/// Why a request from the agent failed: the error ack's text is its message.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// An Add whose netns is ztunnel's own or the node's: listeners there would
    /// capture the node's traffic.
    #[error(
        "the netns handed over for pod {0} is ztunnel's or the node's own, not a pod's: refused"
    )]
    NotAPodsNetns(WorkloadUid),
    /// The same Add again while its proxy is being retried.
    #[error("proxy for pod {uid} not up yet (retrying): {last_error}")]
    Retrying {
        uid: WorkloadUid,
        last_error: String,
    },
    /// The proxy did not start (retried in the background).
    #[error(transparent)]
    Start(#[from] StartError),
    /// The netns could not be held for the retries.
    #[error("{0}")]
    Netns(#[source] std::io::Error),
    /// Keep is only valid in a snapshot.
    #[error("KeepWorkload for {0} after SnapshotSent: Keep is only valid in a snapshot")]
    KeepAfterSnapshot(WorkloadUid),
    #[error("second SnapshotSent on one connection")]
    SecondSnapshot,
}

enum Status {
    Running(Box<dyn RunningProxy>),
    /// Listeners could not be created; a background task keeps trying.
    Retrying {
        netns: Netns,
        info: WorkloadInfo,
        last_error: String,
        attempt: u64,
    },
}

struct PodState {
    netns: NetnsId,
    info: WorkloadInfo,
    status: Status,
}

/// A pod as the state manager holds it, for readiness and the admin views.
#[derive(Clone, Debug)]
pub struct PodSummary {
    pub uid: WorkloadUid,
    pub info: WorkloadInfo,
    /// Its listeners are up.
    pub running: bool,
    /// Why its listeners are not up (they are being retried).
    pub error: Option<String>,
}

#[derive(Default)]
struct State {
    pods: HashMap<WorkloadUid, PodState>,
    /// Uids added or kept since this connection began; `None` once SnapshotSent came.
    snapshot: Option<HashSet<WorkloadUid>>,
    /// A snapshot has been completed at least once (readiness).
    synced: bool,
    attempts: u64,
}

/// Owns every pod proxy. Cheap to clone.
#[derive(Clone)]
pub struct StateManager {
    state: Arc<Mutex<State>>,
    factory: Arc<dyn ProxyFactory>,
    ready: Arc<watch::Sender<bool>>,
    retry_backoff: (Duration, Duration),
    metrics: InpodMetrics,
    /// Never a pod's: ztunnel's own network namespace and, when visible, the node's
    /// init process's.
    refused: Arc<Vec<NetnsId>>,
}

impl StateManager {
    pub fn new(factory: Arc<dyn ProxyFactory>) -> Self {
        let refused = [
            Netns::current(),
            Netns::open(std::path::Path::new("/proc/1/ns/net")),
        ]
        .into_iter()
        .filter_map(|n| n.ok().map(|n| n.id()))
        .collect();
        StateManager {
            state: Arc::default(),
            factory,
            ready: Arc::new(watch::channel(false).0),
            retry_backoff: (Duration::from_millis(200), Duration::from_secs(5)),
            metrics: InpodMetrics::default(),
            refused: Arc::new(refused),
        }
    }

    /// Refuses these network namespaces instead (tests, whose fake pods live in the
    /// test's own).
    pub fn with_refused_netns(mut self, refused: Vec<NetnsId>) -> Self {
        self.refused = Arc::new(refused);
        self
    }

    /// Counts proxies in these metrics (exported ones; by default, private ones).
    pub fn with_metrics(mut self, metrics: InpodMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Shorter retry delays, for tests.
    pub fn with_retry_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.retry_backoff = (first, max);
        self
    }

    /// True once the agent's first snapshot has been applied (a startup gate of
    /// ztunnel's readiness, as in Istio: one pod's trouble never makes the node
    /// unready; it shows in the readiness body instead).
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Publishes what changed: readiness and the proxy gauges.
    fn update_ready(&self, st: &State) {
        let ready = st.synced;
        self.ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
        let running = st
            .pods
            .values()
            .filter(|p| matches!(p.status, Status::Running(_)))
            .count();
        self.metrics.active.set(running as i64);
        self.metrics.pending.set((st.pods.len() - running) as i64);
    }

    fn drain(&self, pod: PodState) {
        if let Status::Running(proxy) = pod.status {
            self.metrics.stopped.inc();
            tokio::spawn(proxy.drain());
        }
    }

    /// A new ZDS connection: the agent will send a fresh snapshot.
    pub async fn new_connection(&self) {
        self.state.lock().await.snapshot = Some(HashSet::new());
    }

    /// Process shutdown: every proxy stops listening at once (so a newer ztunnel bound
    /// beside it takes all new connections) and in-flight connections get the drain
    /// grace period. Returns when all are gone.
    pub async fn shutdown(&self) {
        let pods: Vec<PodState> = {
            let mut st = self.state.lock().await;
            st.synced = false;
            let pods = st.pods.drain().map(|(_, p)| p).collect();
            self.update_ready(&st);
            pods
        };
        info!(pods = pods.len(), "shutting down: draining every pod proxy");
        let drains: Vec<_> = pods
            .into_iter()
            .filter_map(|p| match p.status {
                Status::Running(proxy) => {
                    self.metrics.stopped.inc();
                    Some(tokio::spawn(proxy.drain()))
                }
                Status::Retrying { .. } => None,
            })
            .collect();
        for d in drains {
            let _ = d.await;
        }
    }

    /// Number of pods with a proxy (running or retrying).
    pub async fn pod_count(&self) -> usize {
        self.state.lock().await.pods.len()
    }

    /// Every pod, sorted by namespace and name.
    pub async fn pods(&self) -> Vec<PodSummary> {
        let st = self.state.lock().await;
        let mut pods: Vec<PodSummary> = st
            .pods
            .iter()
            .map(|(uid, p)| PodSummary {
                uid: uid.clone(),
                info: p.info.clone(),
                running: matches!(p.status, Status::Running(_)),
                error: match &p.status {
                    Status::Running(_) => None,
                    Status::Retrying { last_error, .. } => Some(last_error.clone()),
                },
            })
            .collect();
        pods.sort_by(|a, b| {
            (&a.info.namespace, &a.info.name).cmp(&(&b.info.namespace, &b.info.name))
        });
        pods
    }

    /// Applies one request; the result is the ack.
    pub async fn handle(&self, request: Request) -> Result<(), RequestError> {
        match &request {
            Request::Add { uid, info, .. } => {
                debug!(?uid, pod = %format_args!("{}/{}", info.namespace, info.name), "request: add");
            }
            Request::Keep { uid } => debug!(?uid, "request: keep"),
            Request::Del { uid } => debug!(?uid, "request: del"),
            Request::SnapshotSent => debug!("request: snapshot sent"),
        }
        match request {
            Request::Add { uid, info, netns } => self.add(uid, info, netns).await,
            Request::Keep { uid } => self.keep(uid).await,
            Request::Del { uid } => {
                self.del(&uid).await;
                Ok(())
            }
            Request::SnapshotSent => self.snapshot_sent().await,
        }
    }

    async fn add(
        &self,
        uid: WorkloadUid,
        info: WorkloadInfo,
        netns: Netns,
    ) -> Result<(), RequestError> {
        // A pod's netns, never ztunnel's or the node's: listeners there would capture
        // the node's own traffic.
        if self.refused.contains(&netns.id()) {
            warn!(
                ?uid,
                "refusing an Add whose netns is ztunnel's or the node's own"
            );
            return Err(RequestError::NotAPodsNetns(uid));
        }
        let mut st = self.state.lock().await;
        if let Some(seen) = st.snapshot.as_mut() {
            seen.insert(uid.clone());
        }
        if let Some(existing) = st.pods.get(&uid) {
            if existing.netns == netns.id() {
                return match &existing.status {
                    Status::Running(_) => {
                        debug!(?uid, "pod already running with this netns");
                        Ok(())
                    }
                    Status::Retrying { last_error, .. } => Err(RequestError::Retrying {
                        uid: uid.clone(),
                        last_error: last_error.clone(),
                    }),
                };
            }
            info!("pod {uid:?} netns changed, replacing proxy");
            if let Some(old) = st.pods.remove(&uid) {
                self.drain(old);
            }
        }
        info!("pod {uid:?} received netns, starting proxy");
        let id = netns.id();
        let retry_netns = netns.try_clone().map_err(RequestError::Netns)?;
        let result = self
            .factory
            .start(uid.clone(), info.clone(), Arc::new(InpodNetns::new(netns)))
            .await;
        let outcome = match result {
            Ok(proxy) => {
                self.metrics.started.inc();
                st.pods.insert(
                    uid,
                    PodState {
                        netns: id,
                        info,
                        status: Status::Running(proxy),
                    },
                );
                Ok(())
            }
            Err(e) => {
                warn!(
                    ?uid,
                    "starting proxy failed, will retry in the background: {e}"
                );
                st.attempts += 1;
                let attempt = st.attempts;
                st.pods.insert(
                    uid.clone(),
                    PodState {
                        netns: id,
                        info: info.clone(),
                        status: Status::Retrying {
                            netns: retry_netns,
                            info,
                            last_error: e.to_string(),
                            attempt,
                        },
                    },
                );
                tokio::spawn(self.clone().retry(uid, attempt));
                Err(e.into())
            }
        };
        self.update_ready(&st);
        outcome
    }

    async fn retry(self, uid: WorkloadUid, attempt: u64) {
        let (mut delay, max) = self.retry_backoff;
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(max);
            let mut st = self.state.lock().await;
            let Some(pod) = st.pods.get_mut(&uid) else {
                return;
            };
            let Status::Retrying {
                netns,
                info,
                attempt: a,
                ..
            } = &pod.status
            else {
                return;
            };
            if *a != attempt {
                return;
            }
            let (netns, info) = match netns.try_clone() {
                Ok(n) => (n, info.clone()),
                Err(e) => {
                    warn!(?uid, "cannot retry: {e}");
                    continue;
                }
            };
            match self
                .factory
                .start(uid.clone(), info, Arc::new(InpodNetns::new(netns)))
                .await
            {
                Ok(proxy) => {
                    info!(?uid, "proxy started on retry");
                    self.metrics.started.inc();
                    pod.status = Status::Running(proxy);
                    self.update_ready(&st);
                    return;
                }
                Err(e) => {
                    warn!(?uid, "retrying proxy start failed: {e}");
                    if let Status::Retrying { last_error, .. } = &mut pod.status {
                        *last_error = e.to_string();
                    }
                }
            }
        }
    }

    async fn keep(&self, uid: WorkloadUid) -> Result<(), RequestError> {
        let mut st = self.state.lock().await;
        let known = st.pods.contains_key(&uid);
        let Some(seen) = st.snapshot.as_mut() else {
            return Err(RequestError::KeepAfterSnapshot(uid));
        };
        seen.insert(uid.clone());
        if !known {
            warn!(?uid, "asked to keep a pod this ztunnel has no proxy for");
        }
        Ok(())
    }

    async fn del(&self, uid: &WorkloadUid) {
        let mut st = self.state.lock().await;
        if let Some(seen) = st.snapshot.as_mut() {
            seen.remove(uid);
        }
        match st.pods.remove(uid) {
            Some(pod) => {
                info!("pod delete request, draining proxy");
                self.drain(pod);
            }
            None => debug!(?uid, "delete for a pod without a proxy"),
        }
        self.update_ready(&st);
    }

    async fn snapshot_sent(&self) -> Result<(), RequestError> {
        let mut st = self.state.lock().await;
        let Some(seen) = st.snapshot.take() else {
            return Err(RequestError::SecondSnapshot);
        };
        info!("pod received snapshot sent");
        let stale: Vec<WorkloadUid> = st
            .pods
            .keys()
            .filter(|u| !seen.contains(*u))
            .cloned()
            .collect();
        for uid in stale {
            if let Some(pod) = st.pods.remove(&uid) {
                info!(?uid, "pod not in snapshot, draining proxy");
                self.drain(pod);
            }
        }
        st.synced = true;
        self.update_ready(&st);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counts {
        started: AtomicUsize,
        drained: Arc<AtomicUsize>,
        fail: AtomicBool,
    }

    struct Fake(Arc<AtomicUsize>);
    impl RunningProxy for Fake {
        fn drain(self: Box<Self>) -> BoxFuture<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {})
        }
    }

    struct FakeFactory(Arc<Counts>);
    impl ProxyFactory for FakeFactory {
        fn start(
            &self,
            _: WorkloadUid,
            _: WorkloadInfo,
            _: Arc<dyn crate::proxy::seam::SocketFactory>,
        ) -> BoxFuture<Result<Box<dyn RunningProxy>, StartError>> {
            let c = self.0.clone();
            Box::pin(async move {
                if c.fail.load(Ordering::SeqCst) {
                    return Err(StartError::Other("address in use".into()));
                }
                c.started.fetch_add(1, Ordering::SeqCst);
                Ok(Box::new(Fake(c.drained.clone())) as Box<dyn RunningProxy>)
            })
        }
    }

    fn manager() -> (StateManager, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        let sm = StateManager::new(Arc::new(FakeFactory(counts.clone())))
            .with_retry_backoff(Duration::from_millis(5), Duration::from_millis(20))
            .with_refused_netns(Vec::new());
        (sm, counts)
    }

    /// An Add carrying ztunnel's own (or the node's) netns is refused: its listeners
    /// would capture the node's traffic.
    #[tokio::test]
    async fn an_add_with_ztunnels_own_netns_is_refused() {
        let counts = Arc::new(Counts::default());
        let sm = StateManager::new(Arc::new(FakeFactory(counts.clone())));
        sm.new_connection().await;
        let err = sm.handle(add("a")).await.unwrap_err();
        assert!(matches!(err, RequestError::NotAPodsNetns(_)), "{err}");
        assert!(err.to_string().contains("ztunnel's or the node's own"));
        assert_eq!(counts.started.load(Ordering::SeqCst), 0);
        assert_eq!(sm.pod_count().await, 0);
    }

    fn add(uid: &str) -> Request {
        Request::Add {
            uid: WorkloadUid::new(uid),
            info: WorkloadInfo::default(),
            netns: Netns::current().unwrap(),
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn same_netns_twice_starts_one_proxy() {
        let (sm, c) = manager();
        sm.new_connection().await;
        sm.handle(add("a")).await.unwrap();
        sm.handle(add("a")).await.unwrap();
        assert_eq!(c.started.load(Ordering::SeqCst), 1);
        assert_eq!(sm.pod_count().await, 1);
    }

    #[tokio::test]
    async fn snapshot_drains_pods_neither_added_nor_kept() {
        let (sm, c) = manager();
        sm.new_connection().await;
        for uid in ["a", "b", "c"] {
            sm.handle(add(uid)).await.unwrap();
        }
        sm.handle(Request::SnapshotSent).await.unwrap();
        assert!(*sm.synced().borrow());
        // Reconnect: the agent now knows a (Add) and b (Keep), not c.
        sm.new_connection().await;
        sm.handle(add("a")).await.unwrap();
        sm.handle(Request::Keep {
            uid: WorkloadUid::new("b"),
        })
        .await
        .unwrap();
        sm.handle(Request::SnapshotSent).await.unwrap();
        settle().await;
        assert_eq!(sm.pod_count().await, 2);
        assert_eq!(c.drained.load(Ordering::SeqCst), 1);
        assert_eq!(c.started.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn protocol_violations_are_error_acks() {
        let (sm, _) = manager();
        sm.new_connection().await;
        sm.handle(Request::SnapshotSent).await.unwrap();
        let second = sm.handle(Request::SnapshotSent).await.unwrap_err();
        assert!(matches!(second, RequestError::SecondSnapshot), "{second}");
        let keep = sm
            .handle(Request::Keep {
                uid: WorkloadUid::new("x"),
            })
            .await
            .unwrap_err();
        assert!(matches!(keep, RequestError::KeepAfterSnapshot(_)), "{keep}");
        assert!(keep.to_string().contains("after SnapshotSent"));
    }

    #[tokio::test]
    async fn del_drains_and_unknown_del_is_fine() {
        let (sm, c) = manager();
        sm.new_connection().await;
        sm.handle(add("a")).await.unwrap();
        sm.handle(Request::Del {
            uid: WorkloadUid::new("a"),
        })
        .await
        .unwrap();
        sm.handle(Request::Del {
            uid: WorkloadUid::new("nope"),
        })
        .await
        .unwrap();
        settle().await;
        assert_eq!(c.drained.load(Ordering::SeqCst), 1);
        assert_eq!(sm.pod_count().await, 0);
    }

    #[tokio::test]
    async fn failed_start_is_an_error_ack_then_retried_in_background() {
        let (sm, c) = manager();
        sm.new_connection().await;
        sm.handle(Request::SnapshotSent).await.unwrap();
        c.fail.store(true, Ordering::SeqCst);
        let err = sm.handle(add("a")).await.unwrap_err();
        assert!(
            matches!(err, RequestError::Start(_)) && err.to_string() == "address in use",
            "{err}"
        );
        let pods = sm.pods().await;
        assert!(!pods[0].running && pods[0].error.as_deref() == Some("address in use"));
        assert!(
            *sm.synced().borrow(),
            "one pod's trouble does not unsync the node"
        );
        // The same Add again while retrying reports the pending state, starts nothing.
        assert!(matches!(
            sm.handle(add("a")).await.unwrap_err(),
            RequestError::Retrying { .. }
        ));
        c.fail.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !sm.pods().await[0].running {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("retry brought the pod up");
        assert_eq!(c.started.load(Ordering::SeqCst), 1);
    }
}
