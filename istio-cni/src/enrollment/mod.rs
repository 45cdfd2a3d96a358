//! The one owner of every pod's enrollment on this node.
//!
//! For each pod uid it holds the sandbox the pod is captured in (netns identity and,
//! from CNI, the container id), the pod's IPs and where it stands ([`PodState`]). An
//! enrollment is one step: rules in the sandbox's netns → ztunnel's Add (with the netns
//! fd) → the host probe set → the pod's annotation. Every way a pod's enrollment can
//! change — the Kubernetes watch ([`Enrollment::ensure`], [`Enrollment::remove`]), the
//! CNI plugin ([`Enrollment::enroll`], [`Enrollment::cni_del`]), startup
//! ([`Enrollment::adopt`]), ztunnel's answers to its snapshot, and background repairs —
//! passes through the pod's [`gate`], so no two of them ever interleave.
//!
//! The ZDS server is a transport: it asks this owner for the snapshot a new ztunnel
//! gets, and reports back how ztunnel answered each pod, so `enabled` always means
//! that ztunnel acked this pod's current sandbox.

pub mod gate;
pub mod leave;
pub mod pod;
pub mod seams;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocol::{Netns, NetnsId, WorkloadUid};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

pub use pod::{Annotation, PodInfo, PodKey, PodState, Sandbox};
pub use seams::{ProcSandboxes, Redirect, Sandboxes, Ztunnel};
pub use status::{StatusError, StatusWriter};

use crate::metrics::{
    Outcome, PodCounts, ReconcileLabels, ReconcileType, SharedMetrics, Trigger, TriggerLabels,
};
use crate::rules::hostprobe::HostProbes;
use crate::rules::{Applied, Family, RulesError, Verification};
use crate::zds_server::{AddOutcome, SnapshotEntry, SnapshotSource, ZdsError};
use pod::Entry;

/// A pod to enroll from a netns path: what the CNI plugin hands the agent on ADD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub uid: WorkloadUid,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// A path to the pod's netns: `/proc/<pid>/ns/net`, `/var/run/netns/<name>`, …
    pub netns_path: PathBuf,
    pub ips: Vec<IpAddr>,
    /// The sandbox's container id (`CNI_CONTAINERID`), when known.
    pub container_id: Option<String>,
}

impl Pod {
    pub fn info(&self) -> PodInfo {
        PodInfo {
            uid: self.uid.clone(),
            key: PodKey {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            },
            service_account: self.service_account.clone(),
        }
    }
}

/// A pod the Kubernetes watch says belongs in the mesh.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub info: PodInfo,
    /// The pod's IPs from its status (empty before its sandbox has any).
    pub ips: Vec<IpAddr>,
    /// The redirection annotation the object carries now.
    pub annotation: Option<String>,
}

/// How to find an adopted pod's netns.
#[derive(Clone, Debug)]
pub enum Locate {
    Path(PathBuf),
    /// Scan /proc for the pod's processes (see [`crate::discovery`]).
    Discover,
}

/// A pod enrolled before this agent started (an agent restart or a node reboot).
#[derive(Clone, Debug)]
pub struct Adopt {
    pub info: PodInfo,
    pub ips: Vec<IpAddr>,
    pub locate: Locate,
    /// The redirection annotation the object carries now.
    pub annotation: Option<String>,
}

/// A sandbox torn down: what a CNI DEL says.
#[derive(Clone, Debug)]
pub struct SandboxDel {
    pub key: PodKey,
    /// `K8S_POD_UID`, when the runtime passes it.
    pub uid: Option<WorkloadUid>,
    pub container_id: Option<String>,
    /// `CNI_NETNS`, when the runtime passes it (the netns may already be gone).
    pub netns_path: Option<PathBuf>,
}

/// Why a pod leaves the mesh, which decides what happens to its rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaving {
    /// It runs on outside the mesh (labelled out, its namespace unlabelled): its
    /// rules go, so its traffic flows as the user asked.
    OptedOut,
    /// It ended: completed, failed, or its object deleted. Its processes may still
    /// run (an object deleted with no grace period goes before the kubelet stops its
    /// containers), so its rules stay, failing closed, until its network namespace
    /// goes with its sandbox; taking them out would let those last packets go around
    /// ztunnel in the clear. Istio's agent does the same.
    Ended,
}

/// Where an enrolled pod stands, as the enrollment API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrollStatus {
    /// Rules in place and ztunnel's listeners up: traffic flows through ztunnel.
    Enabled,
    /// Rules in place, ztunnel has not confirmed (none connected, or it is retrying):
    /// the pod's traffic fails closed until it does.
    Pending,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {uid}: cannot open its netns {path}: {source}")]
    Netns {
        uid: WorkloadUid,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {uid}: {source}")]
    Rules {
        uid: WorkloadUid,
        source: RulesError,
    },
    #[error("pod {uid}: {source}")]
    Ztunnel { uid: WorkloadUid, source: ZdsError },
    #[error("pod {uid}: host probe set: {source}")]
    Probes {
        uid: WorkloadUid,
        source: RulesError,
    },
    #[error("pod {uid}: worker failed: {source}")]
    Worker {
        uid: WorkloadUid,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("scanning /proc for pods: {0}")]
    Discovery(std::io::Error),
    #[error("pod {0}: no process of its current sandbox found in /proc yet")]
    NotFound(String),
    #[error("asking the API server: {0}")]
    Api(String),
}

/// The host probe rules (one per family) and the node netns they live in.
type Probes = Arc<(Vec<HostProbes>, Netns)>;

/// What an enrollment acts through: its seams (see [`seams`]), the host probe set
/// (kept to the captured pods' IPs) and the writer of the pods' annotations.
pub struct Parts {
    pub redirect: Arc<dyn Redirect>,
    pub ztunnel: Arc<dyn Ztunnel>,
    pub sandboxes: Arc<dyn Sandboxes>,
    /// The host probe rules (one per family) and the node netns they live in.
    pub probes: Option<(Vec<HostProbes>, Netns)>,
    pub status: Option<Arc<dyn StatusWriter>>,
    pub metrics: SharedMetrics,
}

struct Inner {
    redirect: Arc<dyn Redirect>,
    ztunnel: Arc<dyn Ztunnel>,
    sandboxes: Arc<dyn Sandboxes>,
    probes: Option<Probes>,
    status: Option<Arc<dyn StatusWriter>>,
    pods: Mutex<HashMap<WorkloadUid, Entry>>,
    gates: gate::Gates<WorkloadUid>,
    /// Wakes the repair loop early.
    wake: Notify,
    metrics: SharedMetrics,
    /// Set when istio-cni leaves the node ([`leave`]): the host probe set is no
    /// longer kept.
    leaving: std::sync::atomic::AtomicBool,
}

/// The enrollment owner. Cheap to clone; clones share one state.
#[derive(Clone)]
pub struct Enrollment {
    inner: Arc<Inner>,
}

/// How often the repair loop looks for pods to repair without being woken.
const REPAIR_TICK: Duration = Duration::from_secs(1);

impl Enrollment {
    pub fn new(parts: Parts) -> Enrollment {
        Enrollment {
            inner: Arc::new(Inner {
                redirect: parts.redirect,
                ztunnel: parts.ztunnel,
                sandboxes: parts.sandboxes,
                probes: parts.probes.map(Arc::new),
                status: parts.status,
                pods: Mutex::default(),
                gates: gate::Gates::default(),
                wake: Notify::new(),
                metrics: parts.metrics,
                leaving: Default::default(),
            }),
        }
    }

    /// The address families redirected.
    pub fn families(&self) -> Vec<Family> {
        self.inner.redirect.families()
    }

    /// The enrollment's event metrics (see [`crate::metrics`]).
    pub fn metrics(&self) -> &SharedMetrics {
        &self.inner.metrics
    }

    /// Pods by state, for the `istio_cni_pods` gauge.
    pub fn pod_counts(&self) -> PodCounts {
        let mut c = PodCounts::default();
        for e in self.pods().values() {
            if e.unrepairable.is_some() {
                c.unrepairable += 1;
                continue;
            }
            match e.state.annotation() {
                Some(Annotation::Enabled) => c.enabled += 1,
                Some(Annotation::Pending) => c.pending += 1,
                None => {}
            }
        }
        c
    }

    /// Every pod, as `istio-cni diagnose` is told about it.
    pub fn report(&self) -> Vec<crate::diagnose::report::PodReport> {
        use std::os::fd::{AsFd, AsRawFd};
        let mut out: Vec<_> = self
            .pods()
            .values()
            .map(|e| {
                let sandbox = e.state.sandbox();
                crate::diagnose::report::PodReport {
                    uid: e.pod.uid.to_string(),
                    namespace: e.pod.key.namespace.clone(),
                    name: e.pod.key.name.clone(),
                    service_account: e.pod.service_account.clone(),
                    ips: e.ips.clone(),
                    state: match e.state {
                        PodState::Captured { .. } => "captured",
                        PodState::Unlocated => "unlocated",
                        PodState::NoSandbox => "no-sandbox",
                        PodState::Left => "left",
                    }
                    .into(),
                    acked: matches!(e.state, PodState::Captured { acked: true, .. }),
                    annotation: e.state.annotation().map(|a| a.as_str().to_string()),
                    netns: sandbox.map(|s| s.id().to_string()),
                    netns_fd: sandbox.map(|s| s.netns.as_fd().as_raw_fd()),
                    unrepairable: e.unrepairable.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    fn reconciled<T>(&self, kind: ReconcileType, r: &Result<T, EnrollError>) {
        self.inner
            .metrics
            .reconciles
            .get_or_create(&ReconcileLabels {
                r#type: kind,
                result: Outcome::of(r),
            })
            .inc();
    }

    fn enrolled_after(&self, trigger: Trigger, started: Instant) {
        self.inner
            .metrics
            .enroll_seconds
            .get_or_create(&TriggerLabels { trigger })
            .observe(started.elapsed().as_secs_f64());
    }

    fn pods(&self) -> MutexGuard<'_, HashMap<WorkloadUid, Entry>> {
        // Every mutation is a whole-entry insert or remove: a panic elsewhere cannot
        // leave an entry half-written.
        self.inner.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, uid: &WorkloadUid) -> Option<Entry> {
        self.pods().get(uid).cloned()
    }

    /// Records `entry` (what snapshots see from now on), or forgets it once it left
    /// the mesh and its annotation is gone.
    fn commit(&self, entry: Entry) {
        let mut pods = self.pods();
        if matches!(entry.state, PodState::Left) && !entry.annotation_stale() {
            pods.remove(&entry.pod.uid);
        } else {
            pods.insert(entry.pod.uid.clone(), entry);
        }
    }

    /// The uids enrolled under `key` (usually one; two while a recreated object's
    /// predecessor is being removed).
    pub fn uids_for(&self, key: &PodKey) -> Vec<WorkloadUid> {
        self.pods()
            .values()
            .filter(|e| &e.pod.key == key)
            .map(|e| e.pod.uid.clone())
            .collect()
    }

    /// Every pod key with an entry.
    pub fn keys(&self) -> Vec<PodKey> {
        self.pods().values().map(|e| e.pod.key.clone()).collect()
    }

    /// Where `uid` stands: `None` when it is not captured or waiting for its sandbox.
    pub fn status(&self, uid: &WorkloadUid) -> Option<EnrollStatus> {
        match self.pods().get(uid)?.state.annotation()? {
            Annotation::Enabled => Some(EnrollStatus::Enabled),
            Annotation::Pending => Some(EnrollStatus::Pending),
        }
    }

    /// The pod's state, for tests and diagnostics.
    pub fn state(&self, uid: &WorkloadUid) -> Option<PodState> {
        self.pods().get(uid).map(|e| e.state.clone())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        uid: &WorkloadUid,
        netns: Arc<Netns>,
        f: impl FnOnce(&dyn Redirect, &Netns) -> Result<T, RulesError> + Send + 'static,
    ) -> Result<T, EnrollError> {
        let redirect = self.inner.redirect.clone();
        tokio::task::spawn_blocking(move || f(redirect.as_ref(), &netns))
            .await
            .map_err(|source| EnrollError::Worker {
                uid: uid.clone(),
                source,
            })?
            .map_err(|source| EnrollError::Rules {
                uid: uid.clone(),
                source,
            })
    }

    /// Opens the pod's netns from its path.
    pub fn open(&self, pod: &Pod) -> Result<Arc<Netns>, EnrollError> {
        self.inner
            .sandboxes
            .open(&pod.netns_path)
            .map(Arc::new)
            .map_err(|source| EnrollError::Netns {
                uid: pod.uid.clone(),
                path: pod.netns_path.clone(),
                source,
            })
    }

    /// Finds the netns of each wanted pod (uid → IPs) in /proc, never one in `exclude`.
    async fn discover(
        &self,
        wanted: HashMap<String, Vec<IpAddr>>,
        exclude: HashSet<NetnsId>,
    ) -> Result<HashMap<String, Netns>, EnrollError> {
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let sandboxes = self.inner.sandboxes.clone();
        tokio::task::spawn_blocking(move || sandboxes.find(&wanted, &exclude))
            .await
            .map_err(|e| EnrollError::Discovery(std::io::Error::other(e)))?
            .map_err(EnrollError::Discovery)
    }

    /// Keeps the host probe set in step with a pod's IPs: `add` in, `drop` out.
    async fn probe_ips(
        &self,
        uid: &WorkloadUid,
        add: Vec<IpAddr>,
        drop: Vec<IpAddr>,
    ) -> Result<(), EnrollError> {
        let Some(probes) = self.inner.probes.clone().filter(|_| !self.leaving()) else {
            return Ok(());
        };
        if add.is_empty() && drop.is_empty() {
            return Ok(());
        }
        let owner = uid.clone();
        tokio::task::spawn_blocking(move || {
            let (sets, node) = &*probes;
            let set_of = |ip: &IpAddr| sets.iter().find(|s| s.family() == Family::of(*ip));
            for ip in &add {
                if let Some(set) = set_of(ip) {
                    set.add(node, &owner, *ip)?;
                }
            }
            for ip in &drop {
                if let Some(set) = set_of(ip) {
                    set.remove(node, &owner, *ip)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|source| EnrollError::Worker {
            uid: uid.clone(),
            source,
        })?
        .map_err(|source| EnrollError::Probes {
            uid: uid.clone(),
            source,
        })
    }

    /// Writes the pod's annotation if it is stale; a failure is retried by the repair
    /// loop and never fails the step (the pod is captured either way).
    async fn publish(&self, entry: &mut Entry) {
        let want = entry.state.annotation();
        let Some(writer) = &self.inner.status else {
            entry.written = Some(want);
            return;
        };
        if !entry.annotation_stale() {
            return;
        }
        match writer.write(&entry.pod, want).await {
            Ok(()) => entry.written = Some(want),
            Err(e) => {
                warn!("{e}; will retry");
                entry.backoff.failed(Instant::now());
                self.inner.wake.notify_one();
            }
        }
    }

    /// The enrollment step, with the pod's gate held: rules into `sandbox`'s netns,
    /// ztunnel's Add, the probe set, the annotation.
    async fn capture(
        &self,
        prev: Option<Entry>,
        info: PodInfo,
        ips: Vec<IpAddr>,
        sandbox: Sandbox,
    ) -> Result<EnrollStatus, EnrollError> {
        let uid = info.uid.clone();
        let applied = self
            .blocking(&uid, sandbox.netns.clone(), |r, ns| r.apply(ns))
            .await?;
        let old_sandbox = prev.as_ref().and_then(|p| p.state.sandbox().cloned());
        let same = old_sandbox.as_ref().is_some_and(|s| s.id() == sandbox.id());
        let acked = same
            && matches!(
                prev.as_ref().map(|p| &p.state),
                Some(PodState::Captured { acked: true, .. })
            );
        let old_ips = prev.as_ref().map(|p| p.ips.clone()).unwrap_or_default();
        let mut entry = match prev {
            Some(mut e) => {
                e.pod = info.clone();
                e.ips = ips;
                e.backoff.reset();
                // The rules were just brought in line: whatever was given up on is new.
                e.repair_failures = 0;
                e.unrepairable = None;
                e
            }
            None => Entry::new(info.clone(), ips, PodState::NoSandbox),
        };
        entry.retired.retain(|id| *id != sandbox.id());
        if let Some(old) = old_sandbox.as_ref().filter(|_| !same) {
            entry.retire(old.id());
        }
        info!(uid = %uid, pod = %info.key, netns = %sandbox.id(),
              container = sandbox.container_id.as_deref().unwrap_or(""),
              sandbox = if old_sandbox.is_none() { "new" } else if same { "same" } else { "replaced" },
              rules = if applied == Applied::Changed { "installed" } else { "already in place" },
              "enrolling pod");
        let netns = sandbox.netns.clone();
        entry.state = PodState::Captured { sandbox, acked };
        // In the snapshot before the Add is sent (see `ZdsServer::add`).
        self.commit(entry.clone());

        let mut result = Ok(());
        if !acked {
            match self
                .inner
                .ztunnel
                .add(uid.clone(), info.workload_info(), netns)
                .await
            {
                Ok(AddOutcome::Acked) => {
                    entry.state = match entry.state {
                        PodState::Captured { sandbox, .. } => PodState::Captured {
                            sandbox,
                            acked: true,
                        },
                        other => other,
                    }
                }
                Ok(AddOutcome::NoZtunnel) => {
                    warn!(uid = %uid, "no ztunnel connected: pod pending, its traffic fails closed until one connects")
                }
                Err(source) => {
                    entry.backoff.failed(Instant::now());
                    self.inner.wake.notify_one();
                    result = Err(EnrollError::Ztunnel {
                        uid: uid.clone(),
                        source,
                    });
                }
            }
        }
        let add: Vec<IpAddr> = entry.ips.clone();
        let drop: Vec<IpAddr> = old_ips.into_iter().filter(|ip| !add.contains(ip)).collect();
        let probes = self.probe_ips(&uid, add, drop).await;
        self.publish(&mut entry).await;
        let status = if entry.unacked() {
            EnrollStatus::Pending
        } else {
            EnrollStatus::Enabled
        };
        self.commit(entry);
        result?;
        probes?;
        Ok(status)
    }

    /// Enrolls a pod in the sandbox at `pod.netns_path` (CNI ADD). A sandbox other than
    /// the one the pod is captured in replaces it: rules go into the new netns and
    /// ztunnel gets an Add with the new fd. The same sandbox again repairs its rules
    /// and, if ztunnel has not confirmed it, sends the Add again.
    ///
    /// Returns once ztunnel acked (listeners up), or with [`EnrollStatus::Pending`]
    /// when no ztunnel is connected. On error the rules stay in place, so the pod fails
    /// closed; the caller retries or the pod leaves.
    pub async fn enroll(&self, pod: &Pod) -> Result<EnrollStatus, EnrollError> {
        let started = Instant::now();
        let result = self.enroll_sandbox(pod).await;
        self.reconciled(ReconcileType::add, &result);
        if result.is_ok() {
            self.enrolled_after(Trigger::cni_add, started);
        }
        result
    }

    async fn enroll_sandbox(&self, pod: &Pod) -> Result<EnrollStatus, EnrollError> {
        let netns = self.open(pod)?;
        let ips = pod.ips.clone();
        let _gate = self.inner.gates.enter(&pod.uid).await;
        let prev = self.entry(&pod.uid);
        let sandbox = Sandbox {
            netns,
            container_id: pod.container_id.clone(),
            path: Some(pod.netns_path.clone()),
        };
        self.capture(prev, pod.info(), ips, sandbox).await
    }

    /// Brings a pod the watch wants in the mesh to a captured state, when it can: a
    /// pod with no sandbox yet (no IP) or whose sandbox was torn down waits for its
    /// CNI ADD; otherwise its netns is found in /proc (never a torn-down one). A pod
    /// whose IPs changed is looked up again: a different sandbox replaces the old one.
    pub async fn ensure(&self, want: Wanted) -> Result<(), EnrollError> {
        let started = Instant::now();
        let result = self.ensure_captured(want).await;
        self.reconciled(ReconcileType::add, &result);
        if let Ok(true) = result {
            self.enrolled_after(Trigger::watch, started);
        }
        result.map(drop)
    }

    /// [`Enrollment::ensure`]; `true` when it captured a sandbox.
    async fn ensure_captured(&self, want: Wanted) -> Result<bool, EnrollError> {
        let uid = want.info.uid.clone();
        let ips = want.ips;
        let _gate = self.inner.gates.enter(&uid).await;
        let mut prev = self.entry(&uid);
        if let Some(p) = prev.as_mut() {
            // What the object says now is what is written, whoever wrote it.
            p.written = pod::observed(want.annotation.as_deref());
            p.pod = want.info.clone();
        }
        let same_ips = |p: &Entry| {
            let (mut a, mut b) = (p.ips.clone(), ips.clone());
            a.sort();
            b.sort();
            a == b
        };
        if let Some(mut p) = prev.clone().filter(|p| {
            matches!(p.state, PodState::Captured { .. }) && (ips.is_empty() || same_ips(p))
        }) {
            // Every reconcile re-checks the rules (no writes when they are intact).
            self.check_rules(&mut p, None).await;
            self.publish(&mut p).await;
            self.commit(p);
            return Ok(false);
        }
        if ips.is_empty() {
            // No sandbox with an address yet: its CNI ADD enrolls it.
            if let Some(mut p) = prev {
                self.publish(&mut p).await;
                self.commit(p);
            }
            return Ok(false);
        }
        let exclude: HashSet<NetnsId> = prev
            .iter()
            .flat_map(|p| p.retired.iter().copied())
            .collect();
        let wanted = HashMap::from([(uid.as_str().to_string(), ips.clone())]);
        let found = self.discover(wanted, exclude).await?.remove(uid.as_str());
        let current = prev.as_ref().and_then(|p| p.state.sandbox().cloned());
        match (found, current) {
            (Some(netns), Some(cur)) if netns.id() == cur.id() => {
                // Same sandbox, the API caught up with its addresses.
                let Some(mut p) = prev else {
                    return Ok(false);
                };
                let drop = p
                    .ips
                    .iter()
                    .filter(|ip| !ips.contains(ip))
                    .copied()
                    .collect();
                p.ips = ips.clone();
                self.commit(p.clone());
                let probes = self.probe_ips(&uid, ips, drop).await;
                self.publish(&mut p).await;
                self.commit(p);
                probes.map(|()| false)
            }
            (Some(netns), _) => {
                let sandbox = Sandbox {
                    netns: Arc::new(netns),
                    container_id: None,
                    path: None,
                };
                self.capture(prev, want.info, ips, sandbox)
                    .await
                    .map(|_| true)
            }
            (None, cur) => {
                let waiting = matches!(prev.as_ref().map(|p| &p.state), Some(PodState::NoSandbox));
                // A sandbox that came through CNI knows its own addresses; the API may
                // lag behind them.
                let from_cni = cur.is_some_and(|s| s.container_id.is_some());
                if let Some(mut p) = prev {
                    self.publish(&mut p).await;
                    self.commit(p);
                }
                if waiting || from_cni {
                    Ok(false)
                } else {
                    Err(EnrollError::NotFound(want.info.key.to_string()))
                }
            }
        }
    }

    /// A sandbox was torn down (CNI DEL). Matched by sandbox, never by uid alone: a
    /// late DEL of an older sandbox changes nothing. For the current sandbox: ztunnel is
    /// told to drop the pod, its IPs leave the probe set and its annotation is removed
    /// until the next sandbox is enrolled. The rules stay in the dying netns: if
    /// anything still ran there, it would fail closed.
    pub async fn cni_del(&self, del: SandboxDel) -> Result<(), EnrollError> {
        let result = self.del_sandbox(del).await;
        self.reconciled(ReconcileType::delete, &result);
        result
    }

    async fn del_sandbox(&self, del: SandboxDel) -> Result<(), EnrollError> {
        let netns = del
            .netns_path
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
            .and_then(|p| self.inner.sandboxes.id_at(p));
        let uids = match &del.uid {
            Some(uid) => vec![uid.clone()],
            None => self.uids_for(&del.key),
        };
        for uid in uids {
            let _gate = self.inner.gates.enter(&uid).await;
            let Some(mut entry) = self.entry(&uid) else {
                continue;
            };
            let Some(sandbox) = entry.state.sandbox().cloned() else {
                debug!(%uid, "CNI DEL for a pod with no captured sandbox");
                continue;
            };
            if !sandbox.deleted_by(del.container_id.as_deref(), netns) {
                info!(%uid, pod = %entry.pod.key, container = del.container_id.as_deref().unwrap_or(""),
                      "CNI DEL for another sandbox of the pod (not the one enrolled): ignored");
                continue;
            }
            info!(%uid, pod = %entry.pod.key, netns = %sandbox.id(),
                  "pod sandbox torn down (CNI DEL): telling ztunnel to drop it until the next sandbox");
            entry.retire(sandbox.id());
            entry.state = PodState::NoSandbox;
            self.commit(entry.clone());
            if let Err(e) = self.inner.ztunnel.del(&uid).await {
                warn!(%uid, "telling ztunnel to drop a torn-down sandbox: {e}");
            }
            let probes = self.probe_ips(&uid, Vec::new(), entry.ips.clone()).await;
            self.publish(&mut entry).await;
            self.commit(entry);
            probes?;
        }
        Ok(())
    }

    /// Takes the pod out of the mesh: ztunnel told to drain it, its IPs out of the
    /// probe set, its annotation removed, the netns let go; and, only when it runs on
    /// outside the mesh ([`Leaving::OptedOut`]), its rules removed (with its
    /// redirected conntrack entries).
    pub async fn remove(&self, uid: &WorkloadUid, why: Leaving) -> Result<(), EnrollError> {
        let result = self.remove_pod(uid, why).await;
        self.reconciled(ReconcileType::delete, &result);
        result
    }

    async fn remove_pod(&self, uid: &WorkloadUid, why: Leaving) -> Result<(), EnrollError> {
        let _gate = self.inner.gates.enter(uid).await;
        let Some(mut entry) = self.entry(uid) else {
            return Ok(());
        };
        match (entry.state.sandbox(), why) {
            // The netns is the one held since enrollment, so this works even when the
            // pod's netns path is already gone.
            (Some(sandbox), Leaving::OptedOut) => {
                self.blocking(uid, sandbox.netns.clone(), |r, ns| r.remove(ns))
                    .await?
            }
            (Some(_), Leaving::Ended) => {
                info!(%uid, pod = %entry.pod.key,
                      "pod ended: its rules stay until its network namespace goes with it")
            }
            (None, _) => {}
        }
        let had_proxy = !matches!(entry.state, PodState::NoSandbox | PodState::Left);
        entry.state = PodState::Left;
        self.commit(entry.clone());
        if had_proxy {
            info!(%uid, pod = %entry.pod.key, "pod unenrolled, telling ztunnel to drain it");
            if let Err(e) = self.inner.ztunnel.del(uid).await {
                warn!(%uid, "telling ztunnel to drain a pod that left: {e}");
            }
        }
        let probes = self.probe_ips(uid, Vec::new(), entry.ips.clone()).await;
        self.publish(&mut entry).await;
        self.commit(entry);
        probes
    }

    /// Adopts pods that were enrolled before this agent started: before any ztunnel
    /// connects, each found netns gets its rules repaired where they drifted (never
    /// duplicated) and goes into the snapshot; a pod whose netns is not found is sent
    /// as Keep and is `pending` until its sandbox shows up. With a probe set, the set
    /// is installed and converged to exactly the adopted pods' IPs.
    pub async fn adopt(&self, pods: Vec<Adopt>) -> Result<(), EnrollError> {
        if let Some(probes) = self.inner.probes.clone() {
            tokio::task::spawn_blocking(move || {
                probes
                    .0
                    .iter()
                    .try_for_each(|set| set.install(&probes.1).map(drop))
            })
            .await
            .map_err(|e| EnrollError::Discovery(std::io::Error::other(e)))?
            .map_err(|source| EnrollError::Probes {
                uid: WorkloadUid::new(""),
                source,
            })?;
        }
        let wanted: HashMap<String, Vec<IpAddr>> = pods
            .iter()
            .filter(|a| matches!(a.locate, Locate::Discover))
            .map(|a| (a.info.uid.as_str().to_string(), a.ips.clone()))
            .collect();
        let mut found = self.discover(wanted, HashSet::new()).await?;
        for a in pods {
            let uid = a.info.uid.clone();
            let netns = match &a.locate {
                Locate::Path(path) => match self.inner.sandboxes.open(path) {
                    Ok(ns) => Some(ns),
                    Err(e) => {
                        warn!(%uid, "cannot open {}: {e}", path.display());
                        None
                    }
                },
                Locate::Discover => found.remove(uid.as_str()),
            };
            let _gate = self.inner.gates.enter(&uid).await;
            let annotation = a.annotation.as_deref().and_then(Annotation::parse);
            let state = match netns.map(Arc::new) {
                Some(netns) => match self
                    .blocking(&uid, netns.clone(), |r, ns| r.apply(ns))
                    .await
                {
                    Ok(applied) => {
                        if applied == Applied::Changed {
                            warn!(%uid, "adopted pod had drifted rules; repaired");
                        }
                        PodState::Captured {
                            sandbox: Sandbox {
                                netns,
                                container_id: None,
                                path: match &a.locate {
                                    Locate::Path(p) => Some(p.clone()),
                                    Locate::Discover => None,
                                },
                            },
                            // What it was; this ztunnel's snapshot answer confirms it.
                            acked: annotation == Some(Annotation::Enabled),
                        }
                    }
                    Err(e) => {
                        warn!("{e}; it is pending until its rules can be repaired");
                        PodState::Unlocated
                    }
                },
                None => {
                    warn!(%uid, pod = %a.info.key, "enrolled before this agent started but its netns is not found (a node reboot?): ztunnel keeps any proxy it runs; pending until its sandbox shows up");
                    PodState::Unlocated
                }
            };
            info!(%uid, pod = %a.info.key, found = matches!(state, PodState::Captured { .. }),
                  "adopting a pod enrolled before this agent started");
            let mut entry = Entry::new(a.info, a.ips, state);
            entry.written = match self.inner.status {
                Some(_) => pod::observed(a.annotation.as_deref()),
                None => Some(entry.state.annotation()),
            };
            self.commit(entry);
        }
        self.sync_probe_set().await?;
        // Annotations that no longer hold are fixed by the repair loop, off the
        // startup path.
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Converges the host probe set to exactly the captured pods' IPs.
    async fn sync_probe_set(&self) -> Result<(), EnrollError> {
        let Some(probes) = self.inner.probes.clone().filter(|_| !self.leaving()) else {
            return Ok(());
        };
        let members: std::collections::BTreeMap<IpAddr, WorkloadUid> = self
            .pods()
            .values()
            .filter(|e| matches!(e.state, PodState::Captured { .. }))
            .flat_map(|e| e.ips.iter().map(|ip| (*ip, e.pod.uid.clone())))
            .collect();
        tokio::task::spawn_blocking(move || {
            probes
                .0
                .iter()
                .try_for_each(|set| set.sync(&probes.1, &members))
        })
        .await
        .map_err(|e| EnrollError::Discovery(std::io::Error::other(e)))?
        .map_err(|source| EnrollError::Probes {
            uid: WorkloadUid::new(""),
            source,
        })
    }

    /// Checks an enrolled pod's redirection against the expected one.
    pub async fn verify(&self, uid: &WorkloadUid) -> Option<Result<Verification, EnrollError>> {
        let netns = self.entry(uid)?.state.sandbox()?.netns.clone();
        Some(self.blocking(uid, netns, |r, ns| r.verify(ns)).await)
    }

    /// Records ztunnel's answer to a pod's Add in its snapshot.
    async fn record_answer(&self, uid: WorkloadUid, netns: NetnsId, rejected: Option<String>) {
        let _gate = self.inner.gates.enter(&uid).await;
        let Some(mut entry) = self.entry(&uid) else {
            return;
        };
        let PodState::Captured { sandbox, acked } = &mut entry.state else {
            return;
        };
        if sandbox.id() != netns {
            return; // a sandbox replaced since the snapshot was taken
        }
        *acked = rejected.is_none();
        if let Some(error) = rejected {
            warn!(%uid, pod = %entry.pod.key, "ztunnel refused the pod in its snapshot: {error}; pending, will retry");
            entry.backoff.failed(Instant::now());
            self.inner.wake.notify_one();
        }
        self.publish(&mut entry).await;
        self.commit(entry);
    }

    /// Background repairs, until dropped: sends the Add again for captured pods
    /// ztunnel has not confirmed (it refused them, or a live Add failed), and writes
    /// annotations that could not be written. Each pod backs off on failure.
    pub async fn run_repairs(self) {
        loop {
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(REPAIR_TICK) => {}
            }
            let now = Instant::now();
            let connected = self.inner.ztunnel.connections() > 0;
            let writer = self.inner.status.is_some();
            let due: Vec<WorkloadUid> = self
                .pods()
                .values()
                .filter(|e| e.backoff.due(now))
                .filter(|e| (connected && e.unacked()) || (writer && e.annotation_stale()))
                .map(|e| e.pod.uid.clone())
                .collect();
            for uid in due {
                self.repair(&uid).await;
            }
        }
    }

    async fn repair(&self, uid: &WorkloadUid) {
        let _gate = self.inner.gates.enter(uid).await;
        let Some(mut entry) = self.entry(uid) else {
            return;
        };
        let mut failed = false;
        if let PodState::Captured { sandbox, acked } = &mut entry.state {
            if !*acked {
                let outcome = self
                    .inner
                    .ztunnel
                    .add(
                        uid.clone(),
                        entry.pod.workload_info(),
                        sandbox.netns.clone(),
                    )
                    .await;
                match outcome {
                    Ok(AddOutcome::Acked) => {
                        info!(%uid, pod = %entry.pod.key, "ztunnel confirmed the pod on retry");
                        *acked = true;
                    }
                    Ok(AddOutcome::NoZtunnel) => {}
                    Err(e) => {
                        debug!(%uid, "ztunnel still refuses the pod: {e}");
                        failed = true;
                    }
                }
            }
        }
        if failed {
            entry.backoff.failed(Instant::now());
        } else {
            entry.backoff.reset();
        }
        self.publish(&mut entry).await;
        self.commit(entry);
    }
}

/// Drift checks whose repair fails in a row before the agent gives up on a pod.
pub const REPAIR_ATTEMPTS: u32 = 3;

/// `interval` give or take a tenth, so that agents (and pods) do not check in lockstep.
fn jittered(interval: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // A fraction in [-0.1, 0.1).
    let fraction = (f64::from(nanos % 2000) / 10_000.0) - 0.1;
    interval.mul_f64(1.0 + fraction)
}

impl Enrollment {
    /// Re-verifies every captured pod's redirection every `interval` (jittered) until
    /// dropped: see [`Enrollment::check_rules`]. One scan of `/proc` per round tells
    /// which sandboxes still exist.
    pub async fn run_drift_checks(self, interval: Duration) {
        loop {
            tokio::time::sleep(jittered(interval)).await;
            self.check_all_rules().await;
        }
    }

    /// One round of drift checks over every captured pod.
    pub async fn check_all_rules(&self) {
        let sandboxes = self.inner.sandboxes.clone();
        let alive = match tokio::task::spawn_blocking(move || sandboxes.in_use()).await {
            Ok(Ok(alive)) => alive,
            Ok(Err(e)) => {
                warn!("drift check: scanning for live sandboxes: {e}; skipping this round");
                return;
            }
            Err(e) => {
                warn!("drift check: {e}; skipping this round");
                return;
            }
        };
        let uids: Vec<WorkloadUid> = self
            .pods()
            .values()
            .filter(|e| matches!(e.state, PodState::Captured { .. }) && e.unrepairable.is_none())
            .map(|e| e.pod.uid.clone())
            .collect();
        for uid in uids {
            let _gate = self.inner.gates.enter(&uid).await;
            let Some(mut entry) = self.entry(&uid) else {
                continue;
            };
            self.check_rules(&mut entry, Some(&alive)).await;
            self.commit(entry);
        }
    }

    /// Checks a captured pod's redirection against the expected one (one parse of
    /// `iptables-save` and of the route per family; nothing written when intact) and
    /// repairs drift atomically, logging the difference. With `alive` (the netns in use
    /// by some process), a sandbox that no longer exists is reported instead. After
    /// [`REPAIR_ATTEMPTS`] failed repairs in a row, or for a vanished sandbox, the agent
    /// gives up: it says so once (log, metric, an event on the pod) and stops retrying
    /// until the pod gets a new sandbox or leaves. The caller holds the pod's gate.
    async fn check_rules(&self, entry: &mut Entry, alive: Option<&HashSet<NetnsId>>) {
        if entry.unrepairable.is_some() {
            return;
        }
        let Some(sandbox) = entry.state.sandbox().cloned() else {
            return;
        };
        let uid = entry.pod.uid.clone();
        if let Some(alive) = alive {
            let by_path = sandbox
                .path
                .as_ref()
                .is_some_and(|p| self.inner.sandboxes.id_at(p) == Some(sandbox.id()));
            if !by_path && !alive.contains(&sandbox.id()) {
                let reason = format!(
                    "its sandbox (netns {}) is gone: no process is in it{} and no CNI DEL came",
                    sandbox.id(),
                    if sandbox.path.is_some() {
                        " and its path names another netns or none"
                    } else {
                        ""
                    }
                );
                self.give_up(entry, reason).await;
                return;
            }
        }
        let verified = self
            .blocking(&uid, sandbox.netns.clone(), |r, ns| r.verify(ns))
            .await;
        let differences = match verified {
            Ok(v) if v.is_clean() => {
                entry.repair_failures = 0;
                return;
            }
            Ok(v) => v.differences(),
            Err(e) => {
                self.repair_failed(entry, format!("checking its redirection: {e}"))
                    .await;
                return;
            }
        };
        self.inner.metrics.drift_found.inc();
        warn!(%uid, pod = %entry.pod.key, netns = %sandbox.id(), diff = %differences.join("; "),
              "redirection drifted (changed by something else); repairing");
        match self
            .blocking(&uid, sandbox.netns.clone(), |r, ns| r.apply(ns))
            .await
        {
            Ok(_) => {
                self.inner.metrics.drift_repaired.inc();
                entry.repair_failures = 0;
                info!(%uid, pod = %entry.pod.key, repaired = differences.len(), "redirection repaired");
            }
            Err(e) => {
                self.repair_failed(
                    entry,
                    format!(
                        "repairing its redirection ({}): {e}",
                        differences.join("; ")
                    ),
                )
                .await
            }
        }
    }

    async fn repair_failed(&self, entry: &mut Entry, reason: String) {
        entry.repair_failures += 1;
        warn!(uid = %entry.pod.uid, pod = %entry.pod.key, attempt = entry.repair_failures,
              "{reason}; {} attempts left", REPAIR_ATTEMPTS.saturating_sub(entry.repair_failures));
        if entry.repair_failures >= REPAIR_ATTEMPTS {
            self.give_up(entry, reason).await;
        }
    }

    async fn give_up(&self, entry: &mut Entry, reason: String) {
        tracing::error!(uid = %entry.pod.uid, pod = %entry.pod.key,
              "giving up on the pod's redirection: {reason}; it is reported as unrepairable until it gets a new sandbox or leaves the mesh");
        if let Some(writer) = &self.inner.status {
            let message = format!("istio-cni cannot keep this pod's traffic redirection: {reason}");
            if let Err(e) = writer
                .warn(&entry.pod, "AmbientRedirectionUnrepairable", &message)
                .await
            {
                warn!("{e}");
            }
        }
        entry.unrepairable = Some(reason);
        // Counted last: the pod's state is published when the caller stores the entry,
        // right after; a scrape between the two sees the count a moment late.
        self.inner.metrics.drift_unrepairable.inc();
    }
}

impl SnapshotSource for Enrollment {
    fn snapshot(&self) -> Vec<(WorkloadUid, SnapshotEntry)> {
        let mut out: Vec<(WorkloadUid, SnapshotEntry)> = self
            .pods()
            .values()
            .filter_map(|e| Some((e.pod.uid.clone(), e.snapshot_entry()?)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn snapshot_answered(
        &self,
        uid: &WorkloadUid,
        entry: &SnapshotEntry,
        result: Result<(), &ZdsError>,
    ) {
        let SnapshotEntry::Add { netns, .. } = entry else {
            return;
        };
        let rejected = match result {
            Ok(()) => None,
            Err(ZdsError::Rejected { error, .. }) => Some(error.clone()),
            // The connection failed: it says nothing about the pod.
            Err(_) => return,
        };
        let this = self.clone();
        let (uid, netns) = (uid.clone(), netns.id());
        tokio::spawn(async move { this.record_answer(uid, netns, rejected).await });
    }
}

#[cfg(test)]
mod tests;
