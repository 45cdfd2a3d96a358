//! The Kubernetes pod source: watches the pods on this node and all namespaces, and
//! tells the enrollment which pods belong in the mesh.
//!
//! Every change (a pod's, or a namespace's, which touches all its pods) queues the pod;
//! workers reconcile each queued pod: a pod that belongs in the mesh is handed to
//! [`Enrollment::ensure`], an enrolled uid that no longer does (opted out, terminated,
//! object gone, replaced by a new object of the same name) to [`Enrollment::remove`].
//! Failures are retried with backoff. After a relist every pod is reconciled again, so
//! a change missed while the watch was down is not lost.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use protocol::WorkloadUid;
use tracing::{debug, warn};

use super::queue::WorkQueue;
use super::selection::{Selection, Verdict, REDIRECTION_ANNOTATION};
use crate::enrollment::{Adopt, EnrollError, Enrollment, Leaving, Locate, PodInfo, PodKey, Wanted};

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub node_name: String,
    pub selection: Selection,
    pub workers: usize,
}

fn key_of(pod: &Pod) -> PodKey {
    PodKey {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
    }
}

/// The pod's addresses from its status (`podIPs`, else `podIP`).
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
    ips
}

/// Who the pod is, for the enrollment.
pub fn pod_info(pod: &Pod) -> PodInfo {
    PodInfo {
        uid: WorkloadUid::new(pod.metadata.uid.clone().unwrap_or_default()),
        key: key_of(pod),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
    }
}

/// Why enrolled pod `uid` leaves, from what the API server has under its name now
/// (`pod`, with the selection's `verdict` on it): only the same pod, still running
/// and now not to be captured, opted out; anything else (no object, another pod of
/// that name, the pod completed or failed) ended.
pub fn leaving(pod: Option<&Pod>, verdict: Option<Verdict>, uid: &WorkloadUid) -> Leaving {
    let running_same = pod.is_some_and(|p| {
        p.metadata.uid.as_deref() == Some(uid.as_str()) && !super::selection::terminated(p)
    });
    match verdict {
        Some(Verdict::Skip(_)) if running_same => Leaving::OptedOut,
        _ => Leaving::Ended,
    }
}

/// One thing a reconcile asks of the enrollment.
#[derive(Debug)]
pub enum Step {
    /// An enrolled uid leaves the mesh.
    Remove(WorkloadUid, Leaving),
    /// The pod belongs in the mesh.
    Ensure(Wanted),
}

/// What to do for a pod key: every enrolled uid (`enrolled`) that is not the pod the
/// API server has now under the key (`pod`, with the selection's `verdict` on it), or
/// is that pod but no longer selected, leaves, each for its reason; the pod, when
/// selected, is ensured after them (a recreated object's predecessor goes first).
pub fn plan(enrolled: &[WorkloadUid], pod: Option<&Pod>, verdict: Option<Verdict>) -> Vec<Step> {
    let desired = pod.filter(|_| verdict == Some(Verdict::Enroll));
    let desired_uid = desired.map(|p| pod_info(p).uid);
    let mut steps: Vec<Step> = enrolled
        .iter()
        .filter(|uid| Some(*uid) != desired_uid.as_ref())
        .map(|uid| Step::Remove(uid.clone(), leaving(pod, verdict.clone(), uid)))
        .collect();
    steps.extend(desired.map(|p| {
        Step::Ensure(Wanted {
            info: pod_info(p),
            ips: pod_ips(p),
            annotation: annotation(p),
        })
    }));
    steps
}

/// The pod's `ambient.istio.io/redirection` annotation, if any.
pub fn annotation(pod: &Pod) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(REDIRECTION_ANNOTATION)
        .cloned()
}

/// The pods of `node` that carry the redirection annotation: what an agent starting on
/// the node adopts (their netns found in /proc) before it serves ztunnel.
pub async fn annotated_pods(client: &kube::Client, node: &str) -> Result<Vec<Adopt>, kube::Error> {
    let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let pods = Api::<Pod>::all(client.clone()).list(&on_node).await?;
    Ok(pods
        .items
        .iter()
        .filter_map(|p| {
            let annotation = annotation(p)?;
            Some(Adopt {
                info: pod_info(p),
                ips: pod_ips(p),
                locate: Locate::Discover,
                annotation: Some(annotation),
            })
        })
        .collect())
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
    enrollment: Enrollment,
    cfg: ControllerConfig,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    queue: Arc<WorkQueue<PodKey>>,
}

impl Controller {
    /// The controller and the future that runs its watches and workers.
    pub fn new(
        client: kube::Client,
        enrollment: Enrollment,
        cfg: ControllerConfig,
    ) -> (Arc<Controller>, impl std::future::Future<Output = ()>) {
        let (pods, pod_writer) = reflector::store();
        let (namespaces, ns_writer) = reflector::store();
        let controller = Arc::new(Controller {
            client: client.clone(),
            enrollment,
            pods,
            namespaces,
            queue: WorkQueue::new(Duration::from_millis(200), Duration::from_secs(30)),
            cfg,
        });
        let run = controller.clone().run(client, pod_writer, ns_writer);
        (controller, run)
    }

    fn queue_all(&self) {
        let keys: Vec<PodKey> = self
            .pods
            .state()
            .iter()
            .map(|p| key_of(p))
            .chain(self.enrollment.keys())
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
                    ) => this.queue.add(key_of(&p)),
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
                            .map(|p| key_of(p))
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
        let workers = futures::future::join_all((0..self.cfg.workers.max(1)).map(|_| {
            let this = self.clone();
            async move {
                // Deciding before both initial lists are in would take a pod of a
                // labelled namespace for an unlabelled one.
                let ready = tokio::join!(
                    this.pods.wait_until_ready(),
                    this.namespaces.wait_until_ready()
                );
                if ready.0.is_err() || ready.1.is_err() {
                    return;
                }
                loop {
                    let key = this.queue.next().await;
                    let result = this.reconcile(&key).await;
                    if let Err(e) = &result {
                        warn!(pod = %key, "reconcile failed, will retry: {e}");
                    }
                    this.queue.done(key, result.is_ok());
                }
            }
        }));
        tokio::join!(pod_events, ns_events, workers);
    }

    async fn reconcile(&self, key: &PodKey) -> Result<(), EnrollError> {
        let enrolled = self.enrollment.uids_for(key);
        let mut pod = self
            .pods
            .get(&ObjectRef::new(&key.name).within(&key.namespace));
        if pod.is_none() && !enrolled.is_empty() {
            // Gone from the cache, but the cache may be behind (a relist that predates
            // a pod the CNI plugin just enrolled): unenroll only what the API server
            // confirms is gone.
            pod = self.confirm_gone(key).await?.map(Arc::new);
        }
        let ns = self.namespaces.get(&ObjectRef::new(&key.namespace));
        let verdict = pod
            .as_ref()
            .map(|p| self.cfg.selection.decide(p, ns.as_deref()));
        debug!(%key, ?verdict, "reconciling");
        for step in plan(&enrolled, pod.as_deref(), verdict) {
            match step {
                Step::Remove(uid, why) => self.enrollment.remove(&uid, why).await?,
                Step::Ensure(want) => self.enrollment.ensure(want).await?,
            }
        }
        Ok(())
    }

    /// The pod object straight from the API server, `None` if it is gone.
    async fn confirm_gone(&self, key: &PodKey) -> Result<Option<Pod>, EnrollError> {
        Api::<Pod>::namespaced(self.client.clone(), &key.namespace)
            .get_opt(&key.name)
            .await
            .map_err(|e| EnrollError::Api(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};

    fn pod(uid: &str, phase: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.uid = Some(uid.into());
        p.spec = Some(PodSpec::default());
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        p
    }

    /// The plan in words: `remove <uid> <why>`, `ensure <uid> <ips>`.
    fn said(steps: Vec<Step>) -> Vec<String> {
        steps
            .into_iter()
            .map(|s| match s {
                Step::Remove(uid, why) => format!("remove {uid} {why:?}"),
                Step::Ensure(w) => format!("ensure {} {:?}", w.info.uid, w.ips),
            })
            .collect()
    }

    #[test]
    fn a_reconcile_removes_what_is_no_longer_wanted_then_ensures_the_pod() {
        let mut running = pod("u-1", "Running");
        running.status.as_mut().unwrap().pod_ip = Some("10.0.0.1".into());
        let successor = pod("u-2", "Running");
        let enroll = Some(Verdict::Enroll);
        let skip = Some(Verdict::Skip("not labelled ambient"));
        let u1 = [WorkloadUid::new("u-1")];
        type Case<'a> = (
            &'a str,
            &'a [WorkloadUid],
            Option<&'a Pod>,
            Option<Verdict>,
            Vec<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "selected, not enrolled yet",
                &[],
                Some(&running),
                enroll.clone(),
                vec!["ensure u-1 [10.0.0.1]"],
            ),
            (
                "selected and enrolled: ensured again (rules re-checked)",
                &u1,
                Some(&running),
                enroll.clone(),
                vec!["ensure u-1 [10.0.0.1]"],
            ),
            (
                "labelled out while running",
                &u1,
                Some(&running),
                skip.clone(),
                vec!["remove u-1 OptedOut"],
            ),
            ("object gone", &u1, None, None, vec!["remove u-1 Ended"]),
            (
                "recreated under the same name",
                &u1,
                Some(&successor),
                enroll.clone(),
                vec!["remove u-1 Ended", "ensure u-2 []"],
            ),
            (
                "not selected, not enrolled",
                &[],
                Some(&running),
                skip,
                vec![],
            ),
        ];
        for (name, enrolled, pod, verdict, want) in cases {
            assert_eq!(said(plan(enrolled, pod, verdict)), want, "{name}");
        }
    }

    #[test]
    fn only_a_running_pod_that_opted_out_loses_its_rules() {
        let uid = WorkloadUid::new("u-1");
        let running = pod("u-1", "Running");
        let opted_out = Some(Verdict::Skip("pod opted out (dataplane-mode=none)"));
        assert_eq!(
            leaving(Some(&running), opted_out.clone(), &uid),
            Leaving::OptedOut
        );
        assert_eq!(
            leaving(
                Some(&running),
                Some(Verdict::Skip("not labelled ambient")),
                &uid
            ),
            Leaving::OptedOut
        );
        // Deleted (with no grace period its containers may still run), completed,
        // or replaced by another pod of the same name: the rules stay.
        assert_eq!(leaving(None, None, &uid), Leaving::Ended);
        let done = pod("u-1", "Succeeded");
        assert_eq!(
            leaving(Some(&done), Some(Verdict::Skip("terminated")), &uid),
            Leaving::Ended
        );
        let successor = pod("u-2", "Running");
        assert_eq!(leaving(Some(&successor), opted_out, &uid), Leaving::Ended);
        assert_eq!(
            leaving(Some(&successor), Some(Verdict::Enroll), &uid),
            Leaving::Ended
        );
    }
}
