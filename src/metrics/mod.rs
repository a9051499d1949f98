//! The Prometheus registry and every metric sandbox-reconciler exports.
//!
//! Metric names are a contract: the dashboard in `dashboards/` and the alert rules in
//! `deploy/prometheus/` depend on them. Label values are bounded (backends including
//! "unknown", states from the configuration plus "unknown", skip and refusal reasons, sweep
//! results, phases, verbs, HTTP codes, the cluster's identity); session keys and object names
//! never appear in labels. Label values of enums come from their `ALL` lists and spellings
//! (`crate::label`). The standard process collector (`process_*`) is registered too.
//!
//! [`Metrics`] is the facade the daemon, `--once` and the HTTP endpoint use; each component
//! registers its own metrics on the one registry: [`SweepMetrics`] (what sweeps did),
//! [`ScheduleMetrics`] (the daemon's schedule and leadership), [`KubeMetrics`] (API
//! requests, undecodable objects), [`CacheMetrics`] (the watch cache), [`ProcessMetrics`]
//! (build, mode, process). `--print-metrics` lists them in the fixed order of [`LISTING`].

mod cache;
mod kube;
mod process;
mod schedule;
mod sweep;

use std::sync::Arc;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use cache::CacheMetrics;
pub use kube::KubeMetrics;
pub use process::ProcessMetrics;
pub use schedule::ScheduleMetrics;
pub use sweep::SweepMetrics;

use crate::backends::Backends;
use crate::cluster::cache::{CacheObserver, ClusterCache, RelistReason};
use crate::config::Settings;
use crate::label::Label;
use crate::snapshot::BackendKind;
use crate::sweep::SweepReport;

const NAMESPACE: &str = "sandbox_reconciler";

/// The order `--print-metrics` lists the metrics in (names without the namespace), which the
/// README's table, the deploy checks and the dashboard follow; the process collector's
/// metrics come last.
pub const LISTING: [&str; 28] = [
    "orphaned_suspended_sessions",
    "sessions",
    "live_sessions_without_object",
    "untracked_cluster_objects",
    "cluster_objects",
    "sessions_downgraded_total",
    "deferred_downgrades",
    "skipped_rows",
    "sweeps_total",
    "sweep_duration_seconds",
    "sweep_phase_duration_seconds",
    "next_sweep_timestamp_seconds",
    "cluster_info",
    "last_success_timestamp_seconds",
    "last_sweep_timestamp_seconds",
    "guard_refusals_total",
    "leader",
    "build_info",
    "kube_requests_total",
    "db_errors_total",
    "dry_run",
    "sweep_interval_seconds",
    "cache_objects",
    "cache_synced",
    "cache_relists_total",
    "cache_watch_restarts_total",
    "cache_watermark_age_seconds",
    "objects_undecodable_total",
];

/// Every metric, registered in one registry, by component.
pub struct Metrics {
    registry: Registry,
    described: Vec<MetricDescription>,
    pub sweep: SweepMetrics,
    pub schedule: ScheduleMetrics,
    pub kube: KubeMetrics,
    pub cache: CacheMetrics,
    pub process: ProcessMetrics,
}

/// One exported metric, as `--print-metrics` lists it (and the deploy checks and the README
/// test read it from there): the contract, stated once, by the code that exports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MetricDescription {
    pub name: String,
    /// counter, gauge or histogram.
    pub kind: &'static str,
    pub labels: Vec<String>,
    pub help: String,
}

impl Metrics {
    /// Creates and registers every metric; label values known up front are initialised
    /// to zero so series exist before the first sweep.
    pub fn new(settings: &Settings) -> Arc<Metrics> {
        let mut r = Registrar {
            registry: Registry::new(),
            described: Vec::new(),
        };
        let backends = Backends::from_settings(&settings.backends);
        let sweep = SweepMetrics::new(&mut r, &backends);
        let schedule = ScheduleMetrics::new(&mut r);
        let kube = KubeMetrics::new(&mut r, &backends);
        let cache = CacheMetrics::new(&mut r, &backends);
        let process = ProcessMetrics::new(&mut r, settings);
        let Registrar {
            registry,
            mut described,
        } = r;
        described.sort_by_key(|d| listing_position(&d.name));
        Arc::new(Metrics {
            registry,
            described,
            sweep,
            schedule,
            kube,
            cache,
            process,
        })
    }

    /// Folds one sweep's report into the metrics.
    pub fn record(&self, report: &SweepReport) {
        self.sweep.record(report);
    }

    /// Every metric this binary exports, in the order of [`LISTING`].
    pub fn describe(&self) -> &[MetricDescription] {
        &self.described
    }

    /// Counts the cluster's requests and undecodable objects in these metrics.
    pub fn observe_cluster(self: &Arc<Self>, cluster: &mut crate::cluster::KubeCluster) {
        let m = self.clone();
        cluster.set_request_hook(Arc::new(move |verb, code| m.kube_request(verb, code)));
        let m = self.clone();
        cluster.set_undecodable_hook(Arc::new(move |backend, field| {
            m.kube.undecodable(backend, field)
        }));
    }

    /// Counts one Kubernetes API request.
    pub fn kube_request(&self, verb: &'static str, code: u16) {
        self.kube.request(verb, code);
    }

    /// Reads the watch cache's figures at every scrape.
    pub fn observe_cache(&self, cache: Arc<ClusterCache>) {
        self.cache.observe(cache);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        self.cache.refresh();
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!("encoding metrics failed: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl CacheObserver for Metrics {
    fn relisted(&self, backend: BackendKind, reason: RelistReason) {
        self.cache.relisted(backend, reason);
    }

    fn watch_restarted(&self, backend: BackendKind) {
        self.cache.watch_restarted(backend);
    }
}

/// A metric's place in [`LISTING`]; metrics outside it (the process collector's) follow, in
/// the order they were registered (the sort is stable).
fn listing_position(name: &str) -> usize {
    name.strip_prefix(NAMESPACE)
        .and_then(|rest| rest.strip_prefix('_'))
        .and_then(|short| LISTING.iter().position(|l| *l == short))
        .unwrap_or(LISTING.len())
}

/// Initialises the series of every value of `L` (the only label of `vec`) at zero.
fn init_each<L: Label, T: MetricVecBuilder>(vec: &MetricVec<T>) {
    for value in L::VALUES {
        vec.with_label_values(&[value.label()]);
    }
}

/// The one registry while the components register on it, and each metric's description.
struct Registrar {
    registry: Registry,
    described: Vec<MetricDescription>,
}

impl Registrar {
    /// Registers `metric` and records its description; `kind` "" infers counter (`_total`)
    /// or gauge.
    fn add<M: Collector + Clone + 'static>(
        &mut self,
        kind: &'static str,
        metric: prometheus::Result<M>,
    ) -> M {
        let m = metric.expect("metric definition is valid");
        self.described.extend(describe_collector(kind, &m));
        self.registry
            .register(Box::new(m.clone()))
            .expect("metric names are unique");
        m
    }

    fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        self.add("gauge", Gauge::with_opts(opts(name, help)))
    }

    fn int_gauge(&mut self, name: &str, help: &str) -> IntGauge {
        self.add("gauge", IntGauge::with_opts(opts(name, help)))
    }

    fn int_gauge_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add("gauge", IntGaugeVec::new(opts(name, help), labels))
    }

    fn int_counter(&mut self, name: &str, help: &str) -> IntCounter {
        self.add("counter", IntCounter::with_opts(opts(name, help)))
    }

    fn int_counter_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add("counter", IntCounterVec::new(opts(name, help), labels))
    }

    fn histogram(&mut self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help)
            .namespace(NAMESPACE)
            .buckets(buckets.to_vec());
        self.add("histogram", Histogram::with_opts(opts))
    }

    fn histogram_vec(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help)
            .namespace(NAMESPACE)
            .buckets(buckets.to_vec());
        self.add("histogram", HistogramVec::new(opts, labels))
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn describe_collector(kind: &'static str, c: &dyn Collector) -> Vec<MetricDescription> {
    c.desc()
        .into_iter()
        .map(|desc| MetricDescription {
            name: desc.fq_name.clone(),
            kind: if kind.is_empty() {
                if desc.fq_name.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                }
            } else {
                kind
            },
            labels: desc.variable_labels.clone(),
            help: desc.help.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{RefusalReason, SkipReason};
    use crate::sweep::SweepPhase;

    /// The README's metrics table lists exactly the metrics the binary exports, each with its
    /// type: it is checked against the registry, not kept by hand.
    #[test]
    fn the_readme_lists_every_exported_metric_with_its_type() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("### Metrics")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("README.md has a Metrics section");
        let mut documented = std::collections::BTreeMap::new();
        for line in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split(" | ").collect();
            for name in cells[0].trim_start_matches("| ").split(", ") {
                documented.insert(
                    format!("{NAMESPACE}_{}", name.trim_matches('`')),
                    cells[1].trim().to_string(),
                );
            }
        }
        let metrics = Metrics::new(&Settings::default());
        let exported: std::collections::BTreeMap<String, String> = metrics
            .describe()
            .iter()
            .filter(|m| m.name.starts_with(NAMESPACE))
            .map(|m| (m.name.clone(), m.kind.to_string()))
            .collect();
        assert_eq!(
            documented, exported,
            "README.md's metrics table (left) and the exported metrics (right) differ"
        );
    }

    /// The listing order names every registered metric of the namespace exactly once.
    #[test]
    fn the_listing_order_names_every_metric() {
        let metrics = Metrics::new(&Settings::default());
        let listed: Vec<String> = metrics
            .describe()
            .iter()
            .filter(|m| m.name.starts_with(NAMESPACE))
            .map(|m| m.name.clone())
            .collect();
        let expected: Vec<String> = LISTING.iter().map(|n| format!("{NAMESPACE}_{n}")).collect();
        assert_eq!(listed, expected);
    }

    #[test]
    fn every_label_value_list_is_initialised() {
        let metrics = Metrics::new(&Settings::default());
        let text = metrics.render();
        for reason in RefusalReason::ALL {
            assert!(text.contains(&format!("reason=\"{}\"", reason.as_str())));
        }
        for reason in SkipReason::ALL {
            assert!(text.contains(&format!("reason=\"{}\"", reason.as_str())));
        }
        for phase in SweepPhase::ALL {
            assert!(text.contains(&format!("phase=\"{phase}\"")), "{phase}");
        }
    }
}
