//! The agent's departure from the node (istio-cni uninstalled, see
//! [`crate::k8s::shutdown`]): what it put into the node's network namespace goes, and
//! what it put into pods' namespaces stays.
//!
//! Pods keep their redirection until they end, as with Istio: taking the rules out of
//! a running pod would send its traffic around ztunnel in plaintext, and the agent
//! cannot know whether ztunnel is going too. Each such pod is told so in a Kubernetes
//! event (`kubectl describe pod`), since nothing else on the pod shows that it is now
//! in the mesh without an agent to repair it.

use std::sync::atomic::Ordering;

use futures::future::join_all;
use tracing::{info, warn};

use super::{Enrollment, PodInfo, PodState, StatusWriter};

/// The event's reason on each pod.
pub const REASON: &str = "IstioCNIUninstalled";

/// What the departure did.
#[derive(Debug, Default)]
pub struct Departure {
    /// The host probe rules and sets, removed (or why not).
    pub probes: Option<Result<(), String>>,
    /// Pods told in an event.
    pub told: Vec<String>,
    /// Pods that could not be told, with why (the API server may already refuse the
    /// agent: an uninstall removes its RBAC too).
    pub untold: Vec<String>,
}

/// The event's message.
pub fn message(node: &str) -> String {
    format!(
        "istio-cni was uninstalled from node {node}: this pod keeps its traffic redirection \
         to ztunnel until it ends, with no agent to repair it; restart the pod to run it \
         without istio-cni, or install istio-cni again"
    )
}

/// Records `text` on each of `pods` in a Warning event (reason [`REASON`]), all at
/// once: the pods told, and those not told with why (each also logged with the text,
/// so an operator still reads it).
pub async fn tell(
    status: &dyn StatusWriter,
    pods: &[PodInfo],
    text: &str,
) -> (Vec<String>, Vec<String>) {
    let results = join_all(pods.iter().map(|p| status.warn(p, REASON, text))).await;
    let (mut told, mut untold) = (Vec::new(), Vec::new());
    for (pod, result) in pods.iter().zip(results) {
        match result {
            Ok(()) => told.push(pod.key.to_string()),
            Err(e) => {
                warn!(pod = %pod.key, "{text} (no event: {})", e.reason);
                untold.push(format!("{}: {}", pod.key, e.reason));
            }
        }
    }
    (told, untold)
}

impl Enrollment {
    /// Stops keeping the host probe set, removes the probe rules and sets from the
    /// node, and tells every pod still redirected that it stays so. Pods' own rules are
    /// left as they are.
    pub async fn leave_node(&self, node: &str) -> Departure {
        self.inner.leaving.store(true, Ordering::SeqCst);
        let mut out = Departure::default();
        if let Some(probes) = self.inner.probes.clone() {
            let removed = tokio::task::spawn_blocking(move || {
                let (sets, netns) = &*probes;
                sets.iter()
                    .try_for_each(|set| set.uninstall(netns))
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match &removed {
                Ok(()) => info!("host probe rules and sets removed from the node"),
                Err(e) => warn!("removing the host probe rules and sets: {e}"),
            }
            out.probes = Some(removed);
        }
        let pods: Vec<_> = self
            .pods()
            .values()
            .filter(|e| !matches!(e.state, PodState::Left | PodState::NoSandbox))
            .map(|e| e.pod.clone())
            .collect();
        let Some(status) = self.inner.status.clone() else {
            return out;
        };
        let text = message(node);
        (out.told, out.untold) = tell(status.as_ref(), &pods, &text).await;
        info!(
            told = out.told.len(),
            untold = out.untold.len(),
            "enrolled pods keep their redirection until they end"
        );
        out
    }

    /// Whether the agent is leaving the node: nothing may put the host probe set back.
    pub(super) fn leaving(&self) -> bool {
        self.inner.leaving.load(Ordering::SeqCst)
    }
}
