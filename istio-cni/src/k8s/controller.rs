//! The Kubernetes pod source: watches the pods on this node and all namespaces, and
//! keeps the node's enrollment in step with them.
//!
//! Every change (a pod's, or a namespace's, which touches all its pods) queues the pod;
//! workers reconcile each queued pod: enroll it if it now belongs in the mesh (netns
//! found in /proc, rules, ztunnel, host probe set, annotation), unenroll it if it no
//! longer does or is gone. Failures are retried with backoff. After a relist every pod
//! is reconciled again, so a change missed while the watch was down is not lost.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use protocol::{Netns, WorkloadUid};
use serde_json::json;
use tracing::{debug, info, warn};

use super::queue::WorkQueue;
use super::selection::{Selection, Verdict, REDIRECTION_ANNOTATION};
use crate::discovery::find_pod_netns;
use crate::enroll::{self, EnrollStatus, Enroller};
use crate::rules::hostprobe::HostProbes;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub node_name: String,
    pub selection: Selection,
    pub proc_root: PathBuf,
    pub workers: usize,
}

/// A pod by namespace and name (its uid may change when it is recreated).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    fn of(pod: &Pod) -> PodKey {
        PodKey {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// What the controller has enrolled.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub uid: WorkloadUid,
    pub ips: Vec<IpAddr>,
    pub status: EnrollStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("pod {0} has no IP yet")]
    NoIp(String),
    #[error("no process of pod {0} found in /proc yet")]
    NoNetns(String),
    #[error("scanning /proc: {0}")]
    Discovery(std::io::Error),
    #[error(transparent)]
    Enroll(#[from] enroll::EnrollError),
    #[error("host probe set: {0}")]
    Probes(#[from] crate::rules::RulesError),
    #[error("annotating the pod: {0}")]
    Kube(#[from] kube::Error),
}

/// The pod's IPv4 addresses (IPv6 is not redirected yet).
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips.retain(IpAddr::is_ipv4);
    ips
}

/// The enrollment API's view of a pod.
pub fn to_enroll_pod(pod: &Pod) -> enroll::Pod {
    enroll::Pod {
        uid: WorkloadUid::new(pod.metadata.uid.clone().unwrap_or_default()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        netns_path: PathBuf::new(),
        ips: pod_ips(pod),
    }
}

/// Retry delays for a failing watch: 200 ms doubling to 5 s, back to 200 ms after a
/// success. kube's default (client-go's, up to 30 s) is gentler on a struggling API
/// server, but leaves a node's pods unreconciled for too long after a short outage; two
/// watches from one agent per node are a light load.
struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff {
            next: Duration::from_millis(200),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        *self = WatchBackoff::default();
    }
}

pub struct Controller {
    client: kube::Client,
    enroller: Enroller,
    probes: Option<(HostProbes, Netns)>,
    cfg: ControllerConfig,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    enrolled: Mutex<HashMap<PodKey, Enrolled>>,
    queue: Arc<WorkQueue<PodKey>>,
}

impl Controller {
    /// `adopted`: pods enrolled before this agent started, already handed to the ZDS
    /// server; `probes`: the host probe rules and the host netns they live in.
    pub fn new(
        client: kube::Client,
        enroller: Enroller,
        probes: Option<(HostProbes, Netns)>,
        cfg: ControllerConfig,
        adopted: HashMap<PodKey, Enrolled>,
    ) -> (Arc<Controller>, impl std::future::Future<Output = ()>) {
        let (pods, pod_writer) = reflector::store();
        let (namespaces, ns_writer) = reflector::store();
        let controller = Arc::new(Controller {
            client: client.clone(),
            enroller,
            probes,
            pods,
            namespaces,
            enrolled: Mutex::new(adopted),
            queue: WorkQueue::new(Duration::from_millis(200), Duration::from_secs(30)),
            cfg,
        });
        let run = controller.clone().run(client, pod_writer, ns_writer);
        (controller, run)
    }

    fn enrolled(&self) -> MutexGuard<'_, HashMap<PodKey, Enrolled>> {
        self.enrolled.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue_all(&self) {
        let keys: Vec<PodKey> = self
            .pods
            .state()
            .iter()
            .map(|p| PodKey::of(p))
            .chain(self.enrolled().keys().cloned())
            .collect();
        for k in keys {
            self.queue.add(k);
        }
    }

    async fn run(
        self: Arc<Self>,
        client: kube::Client,
        pod_writer: reflector::store::Writer<Pod>,
        ns_writer: reflector::store::Writer<Namespace>,
    ) {
        let on_node =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.cfg.node_name));
        let pods = reflector::reflector(
            pod_writer,
            watcher(Api::<Pod>::all(client.clone()), on_node),
        )
        .backoff(WatchBackoff::default());
        let namespaces = reflector::reflector(
            ns_writer,
            watcher(Api::<Namespace>::all(client), watcher::Config::default()),
        )
        .backoff(WatchBackoff::default());
        let this = self.clone();
        let pod_events = async move {
            let mut pods = std::pin::pin!(pods);
            while let Some(event) = pods.next().await {
                match event {
                    Ok(
                        watcher::Event::Apply(p)
                        | watcher::Event::Delete(p)
                        | watcher::Event::InitApply(p),
                    ) => this.queue.add(PodKey::of(&p)),
                    Ok(watcher::Event::InitDone) => this.queue_all(),
                    Ok(watcher::Event::Init) => {}
                    Err(e) => warn!("pod watch: {e}; retrying"),
                }
            }
        };
        let this = self.clone();
        let ns_events = async move {
            let mut namespaces = std::pin::pin!(namespaces);
            while let Some(event) = namespaces.next().await {
                match event {
                    Ok(
                        watcher::Event::Apply(ns)
                        | watcher::Event::Delete(ns)
                        | watcher::Event::InitApply(ns),
                    ) => {
                        let name = ns.metadata.name.unwrap_or_default();
                        let keys: Vec<PodKey> = this
                            .pods
                            .state()
                            .iter()
                            .filter(|p| p.metadata.namespace.as_deref() == Some(name.as_str()))
                            .map(|p| PodKey::of(p))
                            .collect();
                        for k in keys {
                            this.queue.add(k);
                        }
                    }
                    Ok(watcher::Event::InitDone) => this.queue_all(),
                    Ok(watcher::Event::Init) => {}
                    Err(e) => warn!("namespace watch: {e}; retrying"),
                }
            }
        };
        // A ztunnel connecting turns pending pods into enabled ones.
        let this = self.clone();
        let mut connections = self.enroller.server().subscribe_connections();
        let ztunnel_events = async move {
            while connections.changed().await.is_ok() {
                if *connections.borrow() > 0 {
                    let pending: Vec<PodKey> = this
                        .enrolled()
                        .iter()
                        .filter(|(_, e)| e.status == EnrollStatus::Pending)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in pending {
                        this.queue.add(k);
                    }
                }
            }
        };
        let workers = futures::future::join_all((0..self.cfg.workers.max(1)).map(|_| {
            let this = self.clone();
            async move {
                // Deciding before both initial lists are in would take a pod of a
                // labelled namespace for an unlabelled one.
                let ready = tokio::join!(this.pods.wait_until_ready(), this.namespaces.wait_until_ready());
                if ready.0.is_err() || ready.1.is_err() {
                    return;
                }
                loop {
                    let key = this.queue.next().await;
                    let result = this.reconcile(&key).await;
                    if let Err(e) = &result {
                        warn!(pod = %format!("{}/{}", key.namespace, key.name), "reconcile failed, will retry: {e}");
                    }
                    this.queue.done(key, result.is_ok());
                }
            }
        }));
        tokio::join!(pod_events, ns_events, ztunnel_events, workers);
    }

    async fn reconcile(&self, key: &PodKey) -> Result<(), ReconcileError> {
        let pod = self
            .pods
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
            .map(|p| (*p).clone());
        let ns = self.namespaces.get(&ObjectRef::new(&key.namespace));
        let verdict = pod
            .as_ref()
            .map(|p| self.cfg.selection.decide(p, ns.as_deref()));
        let desired = pod.as_ref().filter(|_| verdict == Some(Verdict::Enroll));
        let current = self.enrolled().get(key).cloned();
        debug!(?key, ?verdict, enrolled = current.is_some(), "reconciling");
        if let Some(cur) = current {
            let same_pod =
                desired.and_then(|p| p.metadata.uid.as_deref()) == Some(cur.uid.as_str());
            if !same_pod {
                self.remove(key, &cur, pod.as_ref()).await?;
            } else if cur.status == EnrollStatus::Pending
                && self.enroller.server().connections() > 0
            {
                // The connected ztunnel got the pod in its snapshot.
                if let Some(p) = desired {
                    self.annotate(p, Some("enabled")).await?;
                }
                if let Some(e) = self.enrolled().get_mut(key) {
                    e.status = EnrollStatus::Enabled;
                }
                return Ok(());
            } else {
                return Ok(());
            }
        }
        if let Some(p) = desired {
            self.add(key, p).await?;
        }
        Ok(())
    }

    async fn add(&self, key: &PodKey, pod: &Pod) -> Result<(), ReconcileError> {
        let epod = to_enroll_pod(pod);
        let pod_name = format!("{}/{}", key.namespace, key.name);
        if epod.ips.is_empty() {
            return Err(ReconcileError::NoIp(pod_name));
        }
        let wanted = HashMap::from([(epod.uid.as_str().to_string(), epod.ips.clone())]);
        let proc_root = self.cfg.proc_root.clone();
        let mut found = tokio::task::spawn_blocking(move || find_pod_netns(&proc_root, &wanted))
            .await
            .map_err(|e| ReconcileError::Discovery(std::io::Error::other(e)))?
            .map_err(ReconcileError::Discovery)?;
        let netns = found
            .remove(epod.uid.as_str())
            .ok_or_else(|| ReconcileError::NoNetns(pod_name.clone()))?;
        self.finish_enroll(key, epod, Arc::new(netns)).await?;
        Ok(())
    }

    /// Enrolls a pod whose netns is known: rules, ztunnel, probe set, annotation.
    async fn finish_enroll(
        &self,
        key: &PodKey,
        epod: enroll::Pod,
        netns: Arc<Netns>,
    ) -> Result<EnrollStatus, ReconcileError> {
        let status = self.enroller.enroll_netns(&epod, netns).await?;
        if let Some((probes, host)) = &self.probes {
            for ip in &epod.ips {
                probes.add(host, &epod.uid, *ip)?;
            }
        }
        let value = match status {
            EnrollStatus::Enabled => "enabled",
            EnrollStatus::Pending => "pending",
        };
        self.annotate_key(key, Some(value)).await?;
        info!(pod = %format!("{}/{}", key.namespace, key.name), uid = %epod.uid, status = value, "pod enrolled");
        self.enrolled().insert(
            key.clone(),
            Enrolled {
                uid: epod.uid,
                ips: epod.ips,
                status,
            },
        );
        Ok(status)
    }

    /// CNI ADD: the plugin found the pod belongs in the mesh and gave its netns path.
    /// Answers once it is enrolled; the watch later finds it already done.
    pub async fn add_from_cni(&self, epod: enroll::Pod) -> Result<EnrollStatus, ReconcileError> {
        let key = PodKey {
            namespace: epod.namespace.clone(),
            name: epod.name.clone(),
        };
        if let Some(cur) = self.enrolled().get(&key).filter(|e| e.uid == epod.uid) {
            return Ok(cur.status);
        }
        let netns = Enroller::open(&epod)?;
        self.finish_enroll(&key, epod, netns).await
    }

    /// CNI DEL: the pod's sandbox is going away; reconcile it now rather than wait for
    /// the pod object's deletion.
    pub fn forget_from_cni(&self, namespace: &str, name: &str) {
        self.queue.add(PodKey {
            namespace: namespace.into(),
            name: name.into(),
        });
    }

    async fn remove(
        &self,
        key: &PodKey,
        cur: &Enrolled,
        pod: Option<&Pod>,
    ) -> Result<(), ReconcileError> {
        self.enroller.unenroll(&cur.uid).await?;
        if let Some((probes, host)) = &self.probes {
            for ip in &cur.ips {
                probes.remove(host, &cur.uid, *ip)?;
            }
        }
        if let Some(p) = pod.filter(|p| p.metadata.uid.as_deref() == Some(cur.uid.as_str())) {
            self.annotate(p, None).await?;
        }
        info!(pod = %format!("{}/{}", key.namespace, key.name), uid = %cur.uid, "pod unenrolled");
        self.enrolled().remove(key);
        Ok(())
    }

    /// Sets (or with `None` removes) the redirection annotation, through pods/status.
    async fn annotate(&self, pod: &Pod, value: Option<&str>) -> Result<(), ReconcileError> {
        self.annotate_key(&PodKey::of(pod), value).await
    }

    async fn annotate_key(&self, key: &PodKey, value: Option<&str>) -> Result<(), ReconcileError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let patch = json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
        match api
            .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            // Gone meanwhile: nothing to annotate.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
