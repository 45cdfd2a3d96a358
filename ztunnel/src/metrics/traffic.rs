//! Connection metrics, named and labelled as Istio's ztunnel does, so dashboards
//! built on `istio_tcp_*` read ours. Every value a label cannot know is `unknown`.
//!
//! Per connection: `opened` when it is accepted for proxying (or refused), `closed`
//! when it ends, with `response_flags` saying why a refused one was (`DENY`: policy;
//! `CONNECT`: no upstream); `failed` too when it ended in an error. Bytes are counted
//! as they are copied: `received` is what the client sent (the request direction),
//! `sent` what the server sent back, whichever side reports.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::identity::Identity;
use crate::state::Workload;

/// Which side of the connection ztunnel proxies for.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    /// The client's pod (outbound).
    source,
    /// The server's pod (inbound).
    destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    unknown,
    mutual_tls,
}

/// Why a connection was not carried, as Istio's ztunnel reports it.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    #[default]
    None,
    /// Refused by an authorization policy.
    Deny,
    /// No upstream connection could be made.
    Connect,
    /// Refused: the pod has as many connections open as it may.
    Overflow,
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, w: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        w.write_str(match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
            ResponseFlags::Overflow => "OVERFLOW",
        })
    }
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.into()
    } else {
        s.into()
    }
}

/// Istio's label set for TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

/// A workload's labels: (workload, canonical service, revision, namespace, cluster).
fn workload_labels(w: Option<&Workload>) -> [String; 5] {
    match w {
        Some(w) => [
            or_unknown(&w.workload_name),
            or_unknown(&w.canonical_name),
            or_unknown(&w.canonical_revision),
            or_unknown(&w.namespace),
            or_unknown(&w.cluster_id),
        ],
        None => std::array::from_fn(|_| UNKNOWN.to_string()),
    }
}

impl TrafficLabels {
    /// Every label `unknown` but the reporter (and `tcp`).
    pub fn new(reporter: Reporter) -> Self {
        let u = || UNKNOWN.to_string();
        TrafficLabels {
            reporter,
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            request_protocol: "tcp".into(),
            response_flags: ResponseFlags::None,
            connection_security_policy: SecurityPolicy::unknown,
        }
    }

    /// The client: its workload if known, and the identity it proved (or holds).
    pub fn source(mut self, w: Option<&Workload>, principal: Option<&Identity>) -> Self {
        let [workload, canonical, revision, namespace, cluster] = workload_labels(w);
        self.source_app = canonical.clone();
        self.source_version = revision.clone();
        self.source_workload = workload;
        self.source_canonical_service = canonical;
        self.source_canonical_revision = revision;
        self.source_workload_namespace = namespace;
        self.source_cluster = cluster;
        if let Some(p) = principal {
            self.source_principal = p.to_string();
        }
        self
    }

    /// The server: its workload if known, and the identity it proved (or holds).
    pub fn destination(mut self, w: Option<&Workload>, principal: Option<&Identity>) -> Self {
        let [workload, canonical, revision, namespace, cluster] = workload_labels(w);
        self.destination_app = canonical.clone();
        self.destination_version = revision.clone();
        self.destination_workload = workload;
        self.destination_canonical_service = canonical;
        self.destination_canonical_revision = revision;
        self.destination_workload_namespace = namespace;
        self.destination_cluster = cluster;
        if let Some(p) = principal {
            self.destination_principal = p.to_string();
        }
        self
    }

    /// The service the client addressed: (hostname, name, namespace).
    pub fn service(mut self, hostname: &str, name: &str, namespace: &str) -> Self {
        self.destination_service = or_unknown(hostname);
        self.destination_service_name = or_unknown(name);
        self.destination_service_namespace = or_unknown(namespace);
        self
    }

    pub fn mtls(mut self, mtls: bool) -> Self {
        self.connection_security_policy = if mtls {
            SecurityPolicy::mutual_tls
        } else {
            SecurityPolicy::unknown
        };
        self
    }
}

#[derive(Clone, Debug, Default)]
pub struct TrafficMetrics {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    failed: Family<TrafficLabels, Counter>,
    sent: Family<TrafficLabels, Counter>,
    received: Family<TrafficLabels, Counter>,
}

/// One connection's byte counters, fetched once when it opens (each count is then a
/// single atomic add).
#[derive(Clone, Debug, Default)]
pub struct ByteCounters {
    /// Server to client.
    pub sent: Counter,
    /// Client to server.
    pub received: Counter,
}

impl TrafficMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            self.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            self.closed.clone(),
        );
        registry.register(
            "tcp_connections_failed",
            "The total number of TCP connections that ended in an error or were refused",
            self.failed.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            self.sent.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            self.received.clone(),
        );
    }

    /// Counts a connection opened; returns its byte counters.
    pub fn open(&self, labels: &TrafficLabels) -> ByteCounters {
        self.opened.get_or_create(labels).inc();
        ByteCounters {
            sent: self.sent.get_or_create(labels).clone(),
            received: self.received.get_or_create(labels).clone(),
        }
    }

    /// Counts a connection closed, refused (`flags`) or failed (`failed`).
    pub fn close(&self, labels: &TrafficLabels, flags: ResponseFlags, failed: bool) {
        // Most connections close as they opened: no copy of the labels for them.
        let flagged;
        let labels = if labels.response_flags == flags {
            labels
        } else {
            let mut l = labels.clone();
            l.response_flags = flags;
            flagged = l;
            &flagged
        };
        self.closed.get_or_create(labels).inc();
        if failed {
            self.failed.get_or_create(labels).inc();
        }
    }
}
