//! The pod's redirection annotation, written to the API server.

use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use super::selection::REDIRECTION_ANNOTATION;
use crate::enrollment::{Annotation, PodInfo, StatusError, StatusWriter};

/// Bound on one annotation write: an API server that does not answer must not hold
/// up enrollment (the write is retried in the background).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes `ambient.istio.io/redirection` through `pods/status` (a merge patch).
pub struct KubeStatus {
    client: kube::Client,
}

impl KubeStatus {
    pub fn new(client: kube::Client) -> KubeStatus {
        KubeStatus { client }
    }
}

/// The patch: the annotation, conditional on the object's uid. The API server checks a
/// uid in the patch against the object's and refuses a mismatch (409 Conflict), so a
/// pod recreated under the same name is never annotated for its predecessor.
pub fn annotation_patch(pod: &PodInfo, value: Option<Annotation>) -> serde_json::Value {
    json!({"metadata": {
        "uid": pod.uid.as_str(),
        "annotations": {REDIRECTION_ANNOTATION: value.map(Annotation::as_str)},
    }})
}

impl StatusWriter for KubeStatus {
    fn write<'a>(
        &'a self,
        pod: &'a PodInfo,
        value: Option<Annotation>,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.key.namespace);
            let patch = Patch::Merge(annotation_patch(pod, value));
            let params = PatchParams::default();
            let call = api.patch_status(&pod.key.name, &params, &patch);
            let fail = |reason: String| StatusError {
                pod: pod.key.to_string(),
                reason,
            };
            match tokio::time::timeout(WRITE_TIMEOUT, call).await {
                Ok(Ok(_)) => Ok(()),
                // Gone, or another pod of the same name: nothing of ours to annotate.
                Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 409 => Ok(()),
                Ok(Err(e)) => Err(fail(e.to_string())),
                Err(_) => Err(fail(format!("no answer within {WRITE_TIMEOUT:?}"))),
            }
        })
    }

    fn warn<'a>(
        &'a self,
        pod: &'a PodInfo,
        reason: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        Box::pin(async move {
            let api: Api<Event> = Api::namespaced(self.client.clone(), &pod.key.namespace);
            let event = warning_event(pod, reason, message);
            let params = PostParams::default();
            let call = api.create(&params, &event);
            match tokio::time::timeout(WRITE_TIMEOUT, call).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(StatusError {
                    pod: pod.key.to_string(),
                    reason: format!("recording an event: {e}"),
                }),
                Err(_) => Err(StatusError {
                    pod: pod.key.to_string(),
                    reason: format!("recording an event: no answer within {WRITE_TIMEOUT:?}"),
                }),
            }
        })
    }
}

/// A `Warning` event on the pod (by uid), from `istio-cni`.
pub fn warning_event(pod: &PodInfo, reason: &str, message: &str) -> Event {
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", pod.key.name)),
            namespace: Some(pod.key.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.key.name.clone()),
            namespace: Some(pod.key.namespace.clone()),
            uid: Some(pod.uid.as_str().to_string()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some("Warning".into()),
        count: Some(1),
        reporting_component: Some("istio-cni".into()),
        source: Some(EventSource {
            component: Some("istio-cni".into()),
            host: None,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::PodKey;
    use protocol::WorkloadUid;

    #[test]
    fn the_patch_names_the_uid_and_removal_is_a_null() {
        let pod = PodInfo {
            uid: WorkloadUid::new("u-1"),
            key: PodKey {
                namespace: "demo".into(),
                name: "sleep".into(),
            },
            service_account: "sleep".into(),
        };
        let set = annotation_patch(&pod, Some(Annotation::Enabled));
        assert_eq!(set["metadata"]["uid"], "u-1");
        assert_eq!(
            set["metadata"]["annotations"][REDIRECTION_ANNOTATION],
            "enabled"
        );
        let removed = annotation_patch(&pod, None);
        assert!(removed["metadata"]["annotations"][REDIRECTION_ANNOTATION].is_null());
        assert!(removed["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .contains_key(REDIRECTION_ANNOTATION));
    }
}
