//! Which pods belong in the mesh, decided from the pod and its namespace alone.
//!
//! A pod is enrolled when it or its namespace carries `istio.io/dataplane-mode=ambient`,
//! unless the pod says `istio.io/dataplane-mode=none`. Never enrolled: pods that have
//! terminated (phase Succeeded or Failed), hostNetwork pods, pods with an Istio
//! sidecar, the ztunnel pods themselves (labelled `app=ztunnel` in ztunnel's own
//! namespace, as Istio tells them: the label alone is an ordinary one that any
//! application may carry), and pods in excluded namespaces.
//!
//! A pod being deleted (a deletion timestamp, its grace period running) stays: its
//! containers still run and still talk, and must not fall back to plaintext or accept
//! unauthenticated traffic until they are gone. It leaves when it terminates, when its
//! sandbox is torn down (CNI DEL) or when its object is gone.

use k8s_openapi::api::core::v1::{Namespace, Pod};

/// The label that puts a pod or namespace in (or, on a pod, out of) the mesh.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The annotation the agent writes on enrolled pods.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Present on pods that run an Istio sidecar.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

#[derive(Clone, Debug)]
pub struct Selection {
    pub excluded_namespaces: Vec<String>,
    /// `app` label value of ztunnel's own pods.
    pub ztunnel_app: String,
    /// The namespace ztunnel runs in (the agent's own, `POD_NAMESPACE`: both charts
    /// install into one release namespace).
    pub ztunnel_namespace: String,
}

/// Where ztunnel runs when the agent is not told.
pub const DEFAULT_SYSTEM_NAMESPACE: &str = "istio-system";

impl Default for Selection {
    fn default() -> Self {
        Selection {
            excluded_namespaces: vec!["kube-system".into()],
            ztunnel_app: "ztunnel".into(),
            ztunnel_namespace: DEFAULT_SYSTEM_NAMESPACE.into(),
        }
    }
}

/// The decision, with the reason when the pod stays out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Enroll,
    Skip(&'static str),
}

fn label<'a>(
    labels: Option<&'a std::collections::BTreeMap<String, String>>,
    key: &str,
) -> Option<&'a str> {
    labels?.get(key).map(String::as_str)
}

/// Whether the pod has ended (Succeeded or Failed): none of its containers runs again.
pub fn terminated(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded") | Some("Failed"))
}

impl Selection {
    pub fn decide(&self, pod: &Pod, namespace: Option<&Namespace>) -> Verdict {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        if terminated(pod) {
            return Verdict::Skip("terminated");
        }
        if spec.and_then(|s| s.host_network) == Some(true) {
            return Verdict::Skip("hostNetwork");
        }
        if meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(SIDECAR_STATUS))
        {
            return Verdict::Skip("has a sidecar");
        }
        let ns = meta.namespace.as_deref().unwrap_or_default();
        if ns == self.ztunnel_namespace
            && label(meta.labels.as_ref(), "app") == Some(self.ztunnel_app.as_str())
        {
            return Verdict::Skip("is ztunnel");
        }
        if self.excluded_namespaces.iter().any(|e| e == ns) {
            return Verdict::Skip("namespace excluded");
        }
        match label(meta.labels.as_ref(), DATAPLANE_MODE) {
            Some("none") => return Verdict::Skip("pod opted out (dataplane-mode=none)"),
            Some("ambient") => return Verdict::Enroll,
            _ => {}
        }
        match namespace.and_then(|n| label(n.metadata.labels.as_ref(), DATAPLANE_MODE)) {
            Some("ambient") => Verdict::Enroll,
            _ => Verdict::Skip("not labelled ambient"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn meta(namespace: Option<&str>, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(namespace.map_or("demo", |_| "p").into()),
            namespace: namespace.map(Into::into),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: meta(Some("demo"), labels),
            ..Default::default()
        }
    }

    fn ns(labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: meta(None, labels),
            ..Default::default()
        }
    }

    const AMBIENT: (&str, &str) = (DATAPLANE_MODE, "ambient");

    #[test]
    fn the_namespace_or_the_pod_label_enrolls_and_none_opts_out() {
        let s = Selection::default();
        assert_eq!(
            s.decide(&pod(&[]), Some(&ns(&[]))),
            Verdict::Skip("not labelled ambient")
        );
        assert_eq!(s.decide(&pod(&[]), Some(&ns(&[AMBIENT]))), Verdict::Enroll);
        assert_eq!(s.decide(&pod(&[AMBIENT]), Some(&ns(&[]))), Verdict::Enroll);
        assert_eq!(s.decide(&pod(&[AMBIENT]), None), Verdict::Enroll);
        let none = pod(&[(DATAPLANE_MODE, "none")]);
        assert!(matches!(
            s.decide(&none, Some(&ns(&[AMBIENT]))),
            Verdict::Skip(_)
        ));
    }

    #[test]
    fn some_pods_are_never_enrolled() {
        let s = Selection::default();
        let ambient = ns(&[AMBIENT]);
        let mut host = pod(&[]);
        host.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            host_network: Some(true),
            ..Default::default()
        });
        assert_eq!(
            s.decide(&host, Some(&ambient)),
            Verdict::Skip("hostNetwork")
        );
        let mut sidecar = pod(&[]);
        sidecar.metadata.annotations =
            Some([(SIDECAR_STATUS.to_string(), "{}".to_string())].into());
        assert_eq!(
            s.decide(&sidecar, Some(&ambient)),
            Verdict::Skip("has a sidecar")
        );
        // An application labelled app=ztunnel in an ambient namespace is an
        // application: enrolled like any other.
        assert_eq!(
            s.decide(&pod(&[("app", "ztunnel")]), Some(&ambient)),
            Verdict::Enroll
        );
        let mut ztunnel = pod(&[("app", "ztunnel"), AMBIENT]);
        ztunnel.metadata.namespace = Some("istio-system".into());
        assert_eq!(
            s.decide(&ztunnel, Some(&ambient)),
            Verdict::Skip("is ztunnel")
        );
        let elsewhere = Selection {
            ztunnel_namespace: "mesh-system".into(),
            ..Selection::default()
        };
        assert_eq!(elsewhere.decide(&ztunnel, Some(&ambient)), Verdict::Enroll);
        let mut system = pod(&[AMBIENT]);
        system.metadata.namespace = Some("kube-system".into());
        assert_eq!(s.decide(&system, None), Verdict::Skip("namespace excluded"));
        let mut done = pod(&[AMBIENT]);
        done.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        assert_eq!(s.decide(&done, None), Verdict::Skip("terminated"));
        let mut deleting = pod(&[AMBIENT]);
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(
            s.decide(&deleting, None),
            Verdict::Enroll,
            "a terminating pod still runs: it stays in the mesh"
        );
    }
}
