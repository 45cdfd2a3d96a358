//! `istio-cni announce-uninstall`, which the chart's pre-delete hook runs while `helm
//! uninstall istio-cni` waits: a Warning event (reason `IstioCNIUninstalled`) on
//! every pod istio-cni redirects, saying it keeps its redirection until it ends.
//!
//! The agents say the same when they leave their nodes, but after `helm uninstall`
//! they cannot: helm deletes their service account and RBAC in the same breath as
//! their DaemonSet, so the API server refuses them by the time they stop. The hook
//! runs before anything is deleted.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tracing::info;

use super::controller::{annotation, pod_info};
use super::selection::terminated;
use crate::enrollment::leave::tell;
use crate::enrollment::{Annotation, StatusWriter};

/// The whole announcement's bound: the hook must end well within the Job's deadline,
/// and never hold an uninstall up for long.
pub const BUDGET: Duration = Duration::from_secs(20);

/// What the announcement did.
#[derive(Debug, Default)]
pub struct Announced {
    pub told: Vec<String>,
    /// Pods not told, with why; or the listing's failure.
    pub untold: Vec<String>,
}

/// The event's message.
pub fn message() -> String {
    "istio-cni is being uninstalled from the cluster: this pod keeps its traffic \
     redirection to ztunnel until it ends, with no agent to repair it; restart the pod \
     to run it without istio-cni, or install istio-cni again"
        .to_string()
}

/// Whether a pod is redirected: annotated `enabled` or `pending`, and not ended.
pub fn redirected(pod: &Pod) -> bool {
    annotation(pod).is_some_and(|v| Annotation::parse(&v).is_some()) && !terminated(pod)
}

/// Tells every redirected pod of the cluster, through `status`.
pub async fn announce(client: &kube::Client, status: &dyn StatusWriter) -> Announced {
    let mut out = Announced::default();
    let pods = match Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            out.untold.push(format!("listing pods: {e}"));
            return out;
        }
    };
    let targets: Vec<_> = pods
        .iter()
        .filter(|p| redirected(p))
        .map(pod_info)
        .collect();
    (out.told, out.untold) = tell(status, &targets, &message()).await;
    info!(
        told = out.told.len(),
        untold = out.untold.len(),
        "uninstall announced on redirected pods"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::super::selection::REDIRECTION_ANNOTATION;
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;
    use std::collections::BTreeMap;

    fn pod(annotation: Option<&str>, phase: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.annotations = annotation
            .map(|a| BTreeMap::from([(REDIRECTION_ANNOTATION.to_string(), a.to_string())]));
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        p
    }

    #[test]
    fn only_running_pods_with_the_annotation_are_told() {
        assert!(redirected(&pod(Some("enabled"), "Running")));
        assert!(redirected(&pod(Some("pending"), "Pending")));
        assert!(!redirected(&pod(None, "Running")));
        assert!(!redirected(&pod(Some("disabled"), "Running")));
        assert!(!redirected(&pod(Some("enabled"), "Succeeded")));
        assert!(!redirected(&pod(Some("enabled"), "Failed")));
    }
}
