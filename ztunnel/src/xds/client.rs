//! The delta ADS client: one stream to istiod carrying both types ztunnel subscribes to
//! (wildcard), as Istio's ztunnel opens it. Each response is applied (see
//! [`super::resources`]), the mesh state rebuilt, and the response ACKed by its nonce,
//! or NACKed naming each resource that could not be applied. A broken stream is
//! reopened with a backoff doubling from 10 ms to 15 s, and the new stream says which
//! resources (and versions) ztunnel already holds, so istiod sends only what changed;
//! meanwhile the last state keeps serving.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost_types::value::Kind;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use super::resources::{Resources, TYPES};
use crate::controlplane::ControlPlane;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status,
};
use crate::state::Sources;

/// The Istio release whose control-plane protocols this ztunnel follows, sent to
/// istiod as node metadata `ISTIO_VERSION` (istiod gates version-dependent
/// configuration on it and warns about every proxy that sends none). Istio's ztunnel
/// image sets it through `ISTIO_META_ISTIO_VERSION`, which overrides this one here too.
pub const ISTIO_VERSION: &str = "1.31.0";

/// Who this ztunnel is, for istiod.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub instance_ip: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub cluster_domain: String,
    pub node_name: String,
    pub cluster_id: String,
    /// `ISTIO_META_*`, keyed without the prefix.
    pub meta: Vec<(String, String)>,
}

impl NodeIdentity {
    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.<cluster domain>`, and metadata
    /// `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, `CLUSTER_ID`,
    /// `ISTIO_VERSION` and the `ISTIO_META_*` values (which win).
    pub fn node(&self) -> Node {
        let id = format!(
            "ztunnel~{}~{}.{}~{}.svc.{}",
            self.instance_ip,
            self.pod_name,
            self.pod_namespace,
            self.pod_namespace,
            self.cluster_domain
        );
        let mut fields = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            fields.insert(
                k.to_string(),
                prost_types::Value {
                    kind: Some(Kind::StringValue(v.to_string())),
                },
            );
        };
        put("NAME", &self.pod_name);
        put("NAMESPACE", &self.pod_namespace);
        put("INSTANCE_IPS", &self.instance_ip);
        put("NODE_NAME", &self.node_name);
        put("CLUSTER_ID", &self.cluster_id);
        put("ISTIO_VERSION", ISTIO_VERSION);
        for (k, v) in &self.meta {
            put(k, v);
        }
        Node {
            id,
            cluster: String::new(),
            metadata: Some(prost_types::Struct { fields }),
        }
    }
}

/// How the xDS connection is doing, for readiness, logs and the admin views.
#[derive(Clone, Debug, Default)]
pub struct XdsState {
    pub connected: bool,
    pub last_error: Option<String>,
    pub last_nack: Option<String>,
    pub acks: u64,
    pub nacks: u64,
    pub resources: usize,
    pub last_update: Option<SystemTime>,
}

/// Shared view of the client's progress.
pub struct XdsStatus {
    state: Mutex<XdsState>,
    ready: watch::Sender<bool>,
}

impl XdsStatus {
    pub fn snapshot(&self) -> XdsState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True once the first response of every type has been applied (and answered).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    fn update(&self, f: impl FnOnce(&mut XdsState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{:?}: {}", .0.code(), .0.message())]
    Grpc(#[from] tonic::Status),
    #[error("istiod closed the stream")]
    Closed,
}

pub struct XdsClient {
    cp: ControlPlane,
    node: Node,
    sources: Arc<Sources>,
    resources: Resources,
    status: Arc<XdsStatus>,
    /// Types whose first response has been applied.
    seen: Vec<&'static str>,
}

/// An update this large frees a lot (the decoded response, replaced objects): it is
/// given back to the system at once rather than kept by the allocator.
const LARGE_UPDATE: usize = 1000;

fn release_free_memory() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes no
    // pointers and touches no memory in use.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// The largest xDS response accepted (Istio's ztunnel takes large pushes too).
const MAX_MESSAGE: usize = 256 << 20;

const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

impl XdsClient {
    pub fn new(
        cp: ControlPlane,
        node: &NodeIdentity,
        sources: Arc<Sources>,
    ) -> (XdsClient, Arc<XdsStatus>) {
        let status = Arc::new(XdsStatus {
            state: Mutex::default(),
            ready: watch::channel(false).0,
        });
        (
            XdsClient {
                cp,
                node: node.node(),
                sources,
                resources: Resources::default(),
                status: status.clone(),
                seen: Vec::new(),
            },
            status,
        )
    }

    /// Streams from istiod until the process ends, reconnecting with backoff.
    pub async fn run(mut self) {
        let channel = self.cp.channel();
        let mut backoff = BACKOFF_START;
        loop {
            let (progressed, err) = self.stream(channel.clone()).await;
            if progressed {
                backoff = BACKOFF_START;
            }
            self.status.update(|s| {
                s.connected = false;
                s.last_error = Some(err.to_string());
            });
            warn!(address = %self.cp.address(), "xDS stream ended: {err}; reconnecting in {backoff:?} (the last state keeps serving)");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream. Returns whether any response was applied, and why it ended.
    async fn stream(&mut self, channel: tonic::transport::Channel) -> (bool, StreamError) {
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(8);
        for type_url in TYPES {
            let first = DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: type_url.to_string(),
                initial_resource_versions: self.resources.versions(type_url),
                ..Default::default()
            };
            // The receiver is held below; the channel has room for both.
            let _ = tx.try_send(first);
        }
        // A full push of a large mesh is one message of many megabytes; istiod is
        // trusted, but not unboundedly so.
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let mut responses = match client
            .delta_aggregated_resources(self.cp.request(ReceiverStream::new(rx)))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => return (false, e.into()),
        };
        self.status.update(|s| {
            s.connected = true;
            s.last_error = None;
        });
        info!(address = %self.cp.address(), "xDS stream open");
        let mut progressed = false;
        loop {
            let response = match responses.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return (progressed, StreamError::Closed),
                Err(e) => return (progressed, e.into()),
            };
            // A large push takes a while to apply: the runtime's other tasks (pods'
            // traffic) move to another worker meanwhile.
            let answer = match tokio::runtime::Handle::current().runtime_flavor() {
                tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(|| self.handle(response))
                }
                _ => self.handle(response),
            };
            progressed = true;
            if tx.send(answer).await.is_err() {
                return (progressed, StreamError::Closed);
            }
        }
    }

    /// Applies a response and returns its ACK or NACK.
    fn handle(&mut self, r: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let started = std::time::Instant::now();
        let mut applied = self
            .resources
            .apply(&r.type_url, &r.resources, &r.removed_resources);
        let decoded = started.elapsed();
        let changes = std::mem::take(&mut applied.changes);
        let large = changes.len() >= LARGE_UPDATE;
        self.sources.apply_xds(changes);
        let indexed = started.elapsed() - decoded;
        drop(r.resources);
        if large {
            release_free_memory();
        }
        let nack = applied.error_message();
        match &nack {
            None => info!(
                type_url = %r.type_url,
                updated = applied.updated,
                removed = applied.removed,
                decode_ms = decoded.as_millis() as u64,
                index_ms = indexed.as_millis() as u64,
                "xDS update applied"
            ),
            Some(msg) => warn!(
                type_url = %r.type_url,
                updated = applied.updated,
                removed = applied.removed,
                "xDS update partly refused (NACK): {msg}"
            ),
        }
        let held = self.resources.len();
        self.status.update(|s| {
            s.resources = held;
            s.last_update = Some(SystemTime::now());
            match &nack {
                None => s.acks += 1,
                Some(msg) => {
                    s.nacks += 1;
                    s.last_nack = Some(msg.clone());
                }
            }
        });
        if let Some(t) = TYPES.iter().find(|t| **t == r.type_url) {
            if !self.seen.contains(t) {
                self.seen.push(t);
                if self.seen.len() == TYPES.len() {
                    info!("xDS: first state of every type received");
                    self.status.ready.send_replace(true);
                }
            }
        }
        DeltaDiscoveryRequest {
            type_url: r.type_url,
            response_nonce: r.nonce,
            error_detail: nack.map(|message| Status {
                // INVALID_ARGUMENT
                code: 3,
                message,
                details: vec![],
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_is_named_as_istiod_expects_a_ztunnel() {
        let n = NodeIdentity {
            instance_ip: "10.0.0.5".into(),
            pod_name: "ztunnel-abc".into(),
            pod_namespace: "istio-system".into(),
            cluster_domain: "cluster.local".into(),
            node_name: "node-1".into(),
            cluster_id: "Kubernetes".into(),
            meta: vec![("ENABLE_HBONE".into(), "true".into())],
        }
        .node();
        assert_eq!(
            n.id,
            "ztunnel~10.0.0.5~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        );
        let fields = n.metadata.unwrap().fields;
        let get = |k: &str| match &fields[k].kind {
            Some(Kind::StringValue(v)) => v.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(get("NODE_NAME"), "node-1");
        assert_eq!(get("INSTANCE_IPS"), "10.0.0.5");
        assert_eq!(get("ENABLE_HBONE"), "true");
        // Without it istiod warns on every connection and assumes the newest release.
        assert_eq!(get("ISTIO_VERSION"), ISTIO_VERSION);
        let overridden = NodeIdentity {
            instance_ip: "10.0.0.5".into(),
            pod_name: "z".into(),
            pod_namespace: "istio-system".into(),
            cluster_domain: "cluster.local".into(),
            node_name: "n".into(),
            cluster_id: "Kubernetes".into(),
            meta: vec![("ISTIO_VERSION".into(), "1.29.1".into())],
        }
        .node();
        assert_eq!(
            overridden.metadata.unwrap().fields["ISTIO_VERSION"].kind,
            Some(Kind::StringValue("1.29.1".into()))
        );
    }
}
