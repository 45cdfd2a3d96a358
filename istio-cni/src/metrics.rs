//! The agent's Prometheus metrics, served on the monitoring port (15014, as Istio's
//! CNI agent) at `/metrics`:
//!
//! - Istio's names: `ztunnel_connected`, `istio_cni_install_ready`,
//!   `istio_cni_installs_total{result}`, `nodeagent_reconcile_events_total{type,result}`;
//! - ours (Istio has no equivalent): `istio_cni_pods{state}` (enabled, pending,
//!   unrepairable), `istio_cni_enrollment_duration_seconds{trigger}` (CNI ADD or watch
//!   event to enrolled), `istio_cni_rule_drift_found_total`,
//!   `istio_cni_rule_drift_repaired_total`, `istio_cni_rule_drift_unrepairable_total`.
//!
//! Event counts live here; values that are state (pods per state, connected ztunnels,
//! install readiness) are read from their owners at each scrape, through [`Gauges`].

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    success,
    failure,
}

impl Outcome {
    pub fn of<T, E>(r: &Result<T, E>) -> Outcome {
        if r.is_ok() {
            Outcome::success
        } else {
            Outcome::failure
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReconcileType {
    add,
    delete,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub r#type: ReconcileType,
    pub result: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Trigger {
    /// The CNI plugin's ADD (a new sandbox).
    cni_add,
    /// A watch event (a labelled namespace, a restarted agent, a late IP).
    watch,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: Trigger,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// `istio_build`'s labels: Istio's two, and the protocol versions this build speaks.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
    zds_version: &'static str,
    plugin_event_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Latency buckets for enrollment, in seconds: a few milliseconds normally, seconds
/// when ztunnel is slow to answer.
const ENROLL_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The event metrics, shared by whoever counts.
#[derive(Debug)]
pub struct AgentMetrics {
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub enroll_seconds: Family<TriggerLabels, Histogram>,
    pub drift_found: Counter,
    pub drift_repaired: Counter,
    pub drift_unrepairable: Counter,
    installs: Family<ResultLabels, Counter>,
    // State gauges, set from `Gauges` at each scrape.
    ztunnel_connected: Gauge,
    install_ready: Gauge,
    pods: Family<StateLabels, Gauge>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            reconciles: Family::default(),
            enroll_seconds: Family::new_with_constructor(|| {
                Histogram::new(ENROLL_BUCKETS.iter().copied())
            }),
            drift_found: Counter::default(),
            drift_repaired: Counter::default(),
            drift_unrepairable: Counter::default(),
            installs: Family::default(),
            ztunnel_connected: Gauge::default(),
            install_ready: Gauge::default(),
            pods: Family::default(),
        }
    }
}

/// Counts of enrolled pods by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounts {
    pub enabled: i64,
    pub pending: i64,
    pub unrepairable: i64,
}

/// Where the state gauges come from, asked at each scrape.
pub struct Gauges {
    pub pods: Box<dyn Fn() -> PodCounts + Send + Sync>,
    pub ztunnels: Box<dyn Fn() -> usize + Send + Sync>,
    /// `None`: install-cni is off (the gauge is not exported).
    pub install_ready: Option<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl AgentMetrics {
    /// install-cni (re)wrote the plugin and its chain entry (`SUCCESS`), or failed to.
    pub fn install(&self, ok: bool) {
        let result = if ok { "SUCCESS" } else { "FAILURE" };
        self.installs
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// The text exposition: the state gauges read now from `gauges`, then everything.
    pub fn encode(&self, gauges: &Gauges) -> String {
        let counts = (gauges.pods)();
        for (state, n) in [
            ("enabled", counts.enabled),
            ("pending", counts.pending),
            ("unrepairable", counts.unrepairable),
        ] {
            self.pods.get_or_create(&StateLabels { state }).set(n);
        }
        self.ztunnel_connected.set((gauges.ztunnels)() as i64);
        let mut registry = Registry::default();
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                component: "istio-cni",
                tag: env!("CARGO_PKG_VERSION"),
                zds_version: protocol::message::PROTOCOL_VERSION.as_str_name(),
                plugin_event_version: crate::cni::event::EVENT_VERSION.to_string(),
            })
            .set(1);
        registry.register(
            "istio_build",
            "Istio component build info, with the protocol versions it speaks",
            build,
        );
        registry.register(
            "ztunnel_connected",
            "The number of ztunnels connected to this agent over ZDS",
            self.ztunnel_connected.clone(),
        );
        if let Some(ready) = &gauges.install_ready {
            self.install_ready.set(i64::from(ready()));
            registry.register(
                "istio_cni_install_ready",
                "Whether the CNI plugin is installed and chained (1) or not (0)",
                self.install_ready.clone(),
            );
        }
        registry.register(
            "istio_cni_installs",
            "The number of times install-cni wrote the plugin and its chain entry, by result",
            self.installs.clone(),
        );
        registry.register(
            "nodeagent_reconcile_events",
            "The number of pod enrollments (add) and removals (delete), by result",
            self.reconciles.clone(),
        );
        registry.register(
            "istio_cni_pods",
            "Pods in the mesh on this node, by state (enabled: ztunnel serves them; pending: rules in place, ztunnel has not confirmed; unrepairable: rules drifted and could not be repaired, or the sandbox is gone)",
            self.pods.clone(),
        );
        registry.register(
            "istio_cni_enrollment_duration_seconds",
            "Time from a CNI ADD or a watch event to the pod enrolled (rules, ztunnel's ack, probe set, annotation)",
            self.enroll_seconds.clone(),
        );
        registry.register(
            "istio_cni_rule_drift_found",
            "Enrolled pods whose redirection rules or route were found changed by someone else",
            self.drift_found.clone(),
        );
        registry.register(
            "istio_cni_rule_drift_repaired",
            "Drifted redirections put back",
            self.drift_repaired.clone(),
        );
        registry.register(
            "istio_cni_rule_drift_unrepairable",
            "Pods given up on: their redirection could not be repaired, or their sandbox is gone",
            self.drift_unrepairable.clone(),
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// A shared handle.
pub type SharedMetrics = Arc<AgentMetrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_istios_and_state_is_read_at_scrape() {
        let m = AgentMetrics::default();
        m.install(true);
        m.reconciles
            .get_or_create(&ReconcileLabels {
                r#type: ReconcileType::add,
                result: Outcome::success,
            })
            .inc();
        m.enroll_seconds
            .get_or_create(&TriggerLabels {
                trigger: Trigger::cni_add,
            })
            .observe(0.004);
        m.drift_found.inc();
        let gauges = Gauges {
            pods: Box::new(|| PodCounts {
                enabled: 3,
                pending: 1,
                unrepairable: 0,
            }),
            ztunnels: Box::new(|| 1),
            install_ready: Some(Box::new(|| true)),
        };
        let text = m.encode(&gauges);
        for line in [
            "ztunnel_connected 1",
            "istio_cni_install_ready 1",
            "istio_cni_installs_total{result=\"SUCCESS\"} 1",
            "nodeagent_reconcile_events_total{type=\"add\",result=\"success\"} 1",
            "istio_cni_pods{state=\"enabled\"} 3",
            "istio_cni_pods{state=\"pending\"} 1",
            "istio_cni_enrollment_duration_seconds_bucket{le=\"0.005\",trigger=\"cni_add\"} 1",
            "istio_cni_rule_drift_found_total 1",
            "istio_cni_rule_drift_repaired_total 0",
            "istio_cni_rule_drift_unrepairable_total 0",
            "istio_build{component=\"istio-cni\",tag=\"",
            "zds_version=\"V1\",plugin_event_version=\"1\"} 1",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
        // Scraped again, the gauges follow their owners.
        let gauges = Gauges {
            pods: Box::new(PodCounts::default),
            ztunnels: Box::new(|| 0),
            install_ready: None,
        };
        let text = m.encode(&gauges);
        assert!(text.contains("ztunnel_connected 0"), "{text}");
        assert!(!text.contains("istio_cni_install_ready"), "{text}");
    }
}
