//! Where a pod's enrollment status is published: the `ambient.istio.io/redirection`
//! annotation on the pod object (see `k8s::status` for the Kubernetes writer).

use futures::future::BoxFuture;

use super::pod::{Annotation, PodInfo};

#[derive(Debug, thiserror::Error)]
#[error("writing the redirection annotation of pod {pod}: {reason}")]
pub struct StatusError {
    pub pod: String,
    pub reason: String,
}

/// Publishes a pod's status. Implementations write only to the object with the pod's
/// uid (a pod recreated under the same name is another pod), and treat an object that
/// is gone as written.
pub trait StatusWriter: Send + Sync + 'static {
    /// Sets the annotation to `value`, or removes it with `None`.
    fn write<'a>(
        &'a self,
        pod: &'a PodInfo,
        value: Option<Annotation>,
    ) -> BoxFuture<'a, Result<(), StatusError>>;

    /// Records a warning about the pod where operators look (a Kubernetes event:
    /// `kubectl describe pod`). Best effort; the default records nothing.
    fn warn<'a>(
        &'a self,
        pod: &'a PodInfo,
        reason: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        let _ = (pod, reason, message);
        Box::pin(async { Ok(()) })
    }
}
