//! ztunnel's Prometheus metrics, with Istio's names and labels, served on 15020 at
//! `/metrics` and `/stats/prometheus`:
//!
//! - traffic ([`traffic`]): `istio_tcp_connections_opened_total`,
//!   `istio_tcp_connections_closed_total`, `istio_tcp_connections_failed_total`,
//!   `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`, labelled as
//!   Istio's ztunnel labels them; bytes are counted as they flow;
//! - the in-pod proxies ([`InpodMetrics`]): `workload_manager_active_proxy_count`,
//!   `workload_manager_pending_proxy_count`, `workload_manager_proxies_started_total`,
//!   `workload_manager_proxies_stopped_total`, and
//!   `workload_manager_connections_refused_total` (over a pod's connection cap);
//! - `istio_build{component="ztunnel",tag=<version>,zds_version="V1"}`;
//! - the process ([`process`]): fds, memory, CPU, start time, read at each scrape.

pub mod process;
pub mod traffic;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use traffic::TrafficMetrics;

/// The in-pod proxies' counts, kept by the state manager.
#[derive(Clone, Debug, Default)]
pub struct InpodMetrics {
    /// Pods whose proxy is up.
    pub active: Gauge,
    /// Pods whose proxy could not start yet (retried in the background).
    pub pending: Gauge,
    pub started: Counter,
    pub stopped: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    tag: String,
    /// The ZDS version this build speaks (beyond Istio's two labels).
    zds_version: String,
}

/// Every metric ztunnel exports. Built once at startup; shared.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub traffic: TrafficMetrics,
    pub inpod: InpodMetrics,
    /// Connections refused because their pod had as many open as it may.
    pub connections_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let traffic = TrafficMetrics::default();
        {
            let istio = registry.sub_registry_with_prefix("istio");
            traffic.register(istio);
            let build: Family<BuildLabels, Gauge> = Family::default();
            build
                .get_or_create(&BuildLabels {
                    component: "ztunnel".into(),
                    tag: env!("CARGO_PKG_VERSION").into(),
                    zds_version: protocol::message::PROTOCOL_VERSION.as_str_name().into(),
                })
                .set(1);
            istio.register("build", "Istio component build info", build);
        }
        let inpod = InpodMetrics::default();
        let connections_refused = Counter::default();
        {
            let wm = registry.sub_registry_with_prefix("workload_manager");
            wm.register(
                "active_proxy_count",
                "The number of pods whose in-pod proxy is up",
                inpod.active.clone(),
            );
            wm.register(
                "pending_proxy_count",
                "The number of pods whose in-pod proxy could not start yet (retrying)",
                inpod.pending.clone(),
            );
            wm.register(
                "proxies_started",
                "The number of in-pod proxies started",
                inpod.started.clone(),
            );
            wm.register(
                "proxies_stopped",
                "The number of in-pod proxies stopped",
                inpod.stopped.clone(),
            );
            wm.register(
                "connections_refused",
                "The number of connections refused because their pod had POD_MAX_CONNECTIONS open",
                connections_refused.clone(),
            );
        }
        registry.register_collector(Box::new(process::ProcessCollector::new()));
        Metrics {
            registry,
            traffic,
            inpod,
            connections_refused,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_istios() {
        let m = Metrics::new();
        m.inpod.started.inc();
        let labels = traffic::TrafficLabels::new(traffic::Reporter::source).mtls(true);
        let bytes = m.traffic.open(&labels);
        bytes.sent.inc_by(7);
        m.traffic.close(&labels, traffic::ResponseFlags::Deny, true);
        let text = m.encode();
        for name in [
            "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"unknown\",",
            "connection_security_policy=\"mutual_tls\"} 1",
            "istio_tcp_connections_closed_total{",
            "response_flags=\"DENY\"",
            "istio_tcp_connections_failed_total{",
            "istio_tcp_received_bytes_total{",
            "request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 7",
            "istio_build{component=\"ztunnel\",tag=\"",
            "zds_version=\"V1\"} 1",
            "workload_manager_active_proxy_count 0",
            "workload_manager_pending_proxy_count 0",
            "workload_manager_proxies_started_total 1",
            "workload_manager_proxies_stopped_total 0",
            "process_open_fds ",
            "process_resident_memory_bytes ",
        ] {
            assert!(text.contains(name), "{name:?} not in:\n{text}");
        }
    }
}
