//! The Prometheus registry and every metric sandbox-reconciler exports.
//!
//! Metric names are a contract: the dashboard in `dashboards/` and the alert rules in
//! `deploy/prometheus/` depend on them. Label values are bounded (backends including
//! "unknown", states from the configuration plus "unknown", skip and refusal reasons, sweep
//! results, phases, verbs, HTTP codes, the cluster's identity); session keys and object names
//! never appear in labels. The standard process collector (`process_*`) is registered too.

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Settings;
use crate::plan::{RefusalReason, SkipReason};
use crate::snapshot::BackendKind;
use crate::sweep::{SweepReport, SweepResult};

const NAMESPACE: &str = "sandbox_reconciler";

/// Every metric, registered in one registry.
pub struct Metrics {
    registry: Registry,
    described: Vec<MetricDescription>,
    pub orphaned_suspended_sessions: IntGaugeVec,
    pub sessions: IntGaugeVec,
    pub live_sessions_without_object: IntGaugeVec,
    pub untracked_cluster_objects: IntGaugeVec,
    pub cluster_objects: IntGaugeVec,
    pub sessions_downgraded_total: IntCounterVec,
    pub deferred_downgrades: IntGauge,
    pub skipped_rows: IntGaugeVec,
    pub sweeps_total: IntCounterVec,
    pub sweep_duration_seconds: Histogram,
    pub sweep_phase_duration_seconds: HistogramVec,
    pub next_sweep_timestamp_seconds: Gauge,
    pub cluster_info: IntGaugeVec,
    pub last_success_timestamp_seconds: Gauge,
    pub last_sweep_timestamp_seconds: Gauge,
    pub guard_refusals_total: IntCounterVec,
    pub leader: IntGauge,
    pub build_info: IntGaugeVec,
    pub kube_requests_total: IntCounterVec,
    pub db_errors_total: IntCounter,
    pub dry_run: IntGauge,
    pub sweep_interval_seconds: Gauge,
    pub cache_objects: IntGaugeVec,
    pub cache_synced: IntGauge,
    pub cache_relists_total: IntCounterVec,
    pub cache_watch_restarts_total: IntCounterVec,
    pub cache_watermark_age_seconds: IntGauge,
    pub objects_undecodable_total: IntCounterVec,
    /// The daemon's watch cache, read at each scrape.
    cache: std::sync::Mutex<Option<Arc<crate::cluster::cache::ClusterCache>>>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
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

fn describe_collector(
    kind: &'static str,
    c: &dyn prometheus::core::Collector,
) -> Vec<MetricDescription> {
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

/// Registers a metric in `$registry` and records its description in `$described`.
macro_rules! register {
    ($registry:expr, $described:expr, $kind:literal, $metric:expr) => {{
        let m = $metric.expect("metric definition is valid");
        $described.extend(describe_collector($kind, &m));
        $registry
            .register(Box::new(m.clone()))
            .expect("metric names are unique");
        m
    }};
}

impl Metrics {
    /// Creates and registers every metric; label values known up front are initialised
    /// to zero so series exist before the first sweep.
    pub fn new(settings: &Settings) -> Arc<Metrics> {
        let r = Registry::new();
        let mut d: Vec<MetricDescription> = Vec::new();
        let backend = &["backend"];
        let mut m = Metrics {
            orphaned_suspended_sessions: register!(r, d, "gauge", IntGaugeVec::new(
                opts("orphaned_suspended_sessions", "Suspended rows whose object is missing, still orphaned after the last completed sweep (in dry-run: all found)."),
                backend)),
            sessions: register!(r, d, "gauge", IntGaugeVec::new(
                opts("sessions", "Session rows per state as of the last completed sweep (states the configuration does not name count as \"unknown\")."),
                &["state"])),
            live_sessions_without_object: register!(r, d, "gauge", IntGaugeVec::new(
                opts("live_sessions_without_object", "Rows in a live state whose object is missing."),
                backend)),
            untracked_cluster_objects: register!(r, d, "gauge", IntGaugeVec::new(
                opts("untracked_cluster_objects", "Listed objects that no row outside the gone state refers to (leaked objects cost money)."),
                backend)),
            cluster_objects: register!(r, d, "gauge", IntGaugeVec::new(
                opts("cluster_objects", "Objects listed in the last completed sweep."),
                backend)),
            sessions_downgraded_total: register!(r, d, "counter", IntCounterVec::new(
                opts("sessions_downgraded_total", "Suspended rows downgraded to gone."),
                backend)),
            deferred_downgrades: register!(r, d, "gauge", IntGauge::with_opts(
                opts("deferred_downgrades", "Orphans left for a later sweep by the per-sweep cap (or a guard refusal)."))),
            skipped_rows: register!(r, d, "gauge", IntGaugeVec::new(
                opts("skipped_rows", "Rows the last completed sweep passed over, by reason (the same rows count again in every sweep until they change)."),
                &["reason"])),
            sweeps_total: register!(r, d, "counter", IntCounterVec::new(
                opts("sweeps_total", "Sweeps by result: success, failed, refused (a guard refused to act), skipped (another sweep or writer was active)."),
                &["result"])),
            sweep_duration_seconds: register!(r, d, "histogram", Histogram::with_opts(
                HistogramOpts::new("sweep_duration_seconds", "Duration of whole sweeps that ran (not skipped).")
                    .namespace(NAMESPACE)
                    .buckets(DURATION_BUCKETS.to_vec()))),
            sweep_phase_duration_seconds: register!(r, d, "histogram", HistogramVec::new(
                HistogramOpts::new("sweep_phase_duration_seconds", "Duration of each sweep phase that ran (apply: only when a batch was written).")
                    .namespace(NAMESPACE)
                    .buckets(DURATION_BUCKETS.to_vec()),
                &["phase"])),
            next_sweep_timestamp_seconds: register!(r, d, "gauge", Gauge::with_opts(
                opts("next_sweep_timestamp_seconds", "Unix time the next scheduled sweep is due (daemon only)."))),
            cluster_info: register!(r, d, "gauge", IntGaugeVec::new(
                opts("cluster_info", "Always 1; the cluster the last sweep looked at: the kube-system Namespace's UID and the API server URL."),
                &["cluster_uid", "server"])),
            last_success_timestamp_seconds: register!(r, d, "gauge", Gauge::with_opts(
                opts("last_success_timestamp_seconds", "Unix time of the last successful sweep."))),
            last_sweep_timestamp_seconds: register!(r, d, "gauge", Gauge::with_opts(
                opts("last_sweep_timestamp_seconds", "Unix time of the last sweep attempt that ran (any result but skipped)."))),
            guard_refusals_total: register!(r, d, "counter", IntCounterVec::new(
                opts("guard_refusals_total", "Sweeps a safety guard refused to act on, by reason."),
                &["reason"])),
            leader: register!(r, d, "gauge", IntGauge::with_opts(
                opts("leader", "1 while this replica holds the writer lock."))),
            build_info: register!(r, d, "gauge", IntGaugeVec::new(
                opts("build_info", "Always 1; the version and revision (git commit) labels say which build runs."),
                &["version", "revision"])),
            kube_requests_total: register!(r, d, "counter", IntCounterVec::new(
                opts("kube_requests_total", "Kubernetes API requests by verb and HTTP status (0: no answer)."),
                &["verb", "code"])),
            db_errors_total: register!(r, d, "counter", IntCounter::with_opts(
                opts("db_errors_total", "Sweeps that failed on a database error."))),
            dry_run: register!(r, d, "gauge", IntGauge::with_opts(
                opts("dry_run", "1 when the reconciler only reports and never writes."))),
            sweep_interval_seconds: register!(r, d, "gauge", Gauge::with_opts(
                opts("sweep_interval_seconds", "Nominal period of the sweep schedule."))),
            cache_objects: register!(r, d, "gauge", IntGaugeVec::new(
                opts("cache_objects", "Objects in the daemon's watch cache."),
                backend)),
            cache_synced: register!(r, d, "gauge", IntGauge::with_opts(
                opts("cache_synced", "1 while every informer of the watch cache has listed and watches."))),
            cache_relists_total: register!(r, d, "counter", IntCounterVec::new(
                opts("cache_relists_total", "Complete listings of the watch cache, by reason: initial, expired (410 on the watch), watch_error, list_error."),
                &["backend", "reason"])),
            cache_watch_restarts_total: register!(r, d, "counter", IntCounterVec::new(
                opts("cache_watch_restarts_total", "Watches resumed from the last applied revision (server timeouts, dropped streams)."),
                backend)),
            cache_watermark_age_seconds: register!(r, d, "gauge", IntGauge::with_opts(
                opts("cache_watermark_age_seconds", "Seconds since the stalest informer last applied an event or bookmark."))),
            objects_undecodable_total: register!(r, d, "counter", IntCounterVec::new(
                opts("objects_undecodable_total", "Objects with a field of the wrong type (e.g. a Sandbox's spec.replicas \"0\"), read as absent: the object is present and not paused. Each object and field once per process."),
                &["backend", "field"])),
            cache: std::sync::Mutex::new(None),
            registry: r,
            described: Vec::new(),
        };
        m.described = d;
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            m.described.extend(describe_collector("", &process));
            if let Err(e) = m.registry.register(Box::new(process)) {
                tracing::warn!("the process collector could not be registered: {e}");
            }
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::REVISION])
            .set(1);
        m.dry_run.set(i64::from(settings.sweep.dry_run));
        for result in SweepResult::ALL {
            m.sweeps_total.with_label_values(&[result.as_str()]);
        }
        for phase in PHASES {
            m.sweep_phase_duration_seconds.with_label_values(&[phase]);
        }
        for reason in RefusalReason::ALL {
            m.guard_refusals_total.with_label_values(&[reason.as_str()]);
        }
        for reason in SkipReason::ALL {
            m.skipped_rows.with_label_values(&[reason.as_str()]);
        }
        let b = &settings.backends;
        if b.agent_sandbox.enabled {
            for field in crate::cluster::lean::UNDECODABLE_FIELDS {
                m.objects_undecodable_total
                    .with_label_values(&[BackendKind::AgentSandbox.as_str(), field]);
            }
        }
        for kind in BackendKind::ALL {
            let enabled = match kind {
                BackendKind::Pod => b.pod.enabled,
                BackendKind::AgentSandbox => b.agent_sandbox.enabled,
                BackendKind::Unknown => b.pod.enabled && b.agent_sandbox.enabled,
            };
            if enabled {
                m.sessions_downgraded_total
                    .with_label_values(&[kind.as_str()]);
                if kind != BackendKind::Unknown {
                    m.cache_watch_restarts_total
                        .with_label_values(&[kind.as_str()]);
                    for reason in crate::cluster::cache::RelistReason::ALL {
                        m.cache_relists_total
                            .with_label_values(&[kind.as_str(), reason.as_str()]);
                    }
                }
            }
        }
        Arc::new(m)
    }

    /// Folds one sweep's report into the metrics.
    pub fn record(&self, report: &SweepReport) {
        self.sweeps_total
            .with_label_values(&[report.result.as_str()])
            .inc();
        if report.result == SweepResult::Skipped {
            return;
        }
        let now = report.started_at.timestamp_millis() as f64 / 1000.0 + report.timings.total;
        self.last_sweep_timestamp_seconds.set(now);
        if let Some(uid) = &report.cluster_uid {
            self.cluster_info.reset();
            self.cluster_info
                .with_label_values(&[uid.as_str(), report.cluster_server.as_deref().unwrap_or("")])
                .set(1);
        }
        for (backend, b) in &report.backends {
            if b.downgraded > 0 {
                self.sessions_downgraded_total
                    .with_label_values(&[backend.as_str()])
                    .inc_by(b.downgraded);
            }
        }
        let t = &report.timings;
        self.sweep_duration_seconds.observe(t.total);
        // Only the phases that ran: an apply phase that wrote nothing is not a 0 s apply.
        for (phase, seconds, ran) in [
            ("list_cluster", t.list_cluster, t.list_cluster > 0.0),
            ("read_db", t.read_db, t.read_db > 0.0),
            ("confirm", t.confirm, report.selected > 0),
            ("apply", t.apply, report.batches > 0),
        ] {
            if ran {
                self.sweep_phase_duration_seconds
                    .with_label_values(&[phase])
                    .observe(seconds);
            }
        }
        match report.result {
            SweepResult::Failed => {
                if report.error_kind == Some(crate::sweep::ErrorKind::Database) {
                    self.db_errors_total.inc();
                }
                // Gauges keep the last completed sweep's values; staleness is visible
                // through last_success_timestamp_seconds.
            }
            SweepResult::Refused | SweepResult::Success => {
                if let Some(crate::plan::GuardVerdict::Refuse { reason, .. }) = &report.guard {
                    self.guard_refusals_total
                        .with_label_values(&[reason.as_str()])
                        .inc();
                }
                if report.result == SweepResult::Success {
                    self.last_success_timestamp_seconds.set(now);
                }
                // A refusal before planning (wrong cluster, missing namespace) saw no rows:
                // the gauges keep the last planned sweep's values.
                if !report.backends.is_empty() {
                    self.set_gauges(report);
                }
            }
            SweepResult::Skipped => {}
        }
    }

    fn set_gauges(&self, report: &SweepReport) {
        for reason in SkipReason::ALL {
            let n = report.skipped.get(&reason).copied().unwrap_or(0);
            self.skipped_rows
                .with_label_values(&[reason.as_str()])
                .set(n as i64);
        }
        self.sessions.reset();
        for (state, n) in &report.rows_by_state {
            self.sessions
                .with_label_values(&[state.as_str()])
                .set(*n as i64);
        }
        for (backend, b) in &report.backends {
            let label = &[backend.as_str()];
            let still_orphaned = if report.dry_run {
                b.orphaned_suspended
            } else {
                b.orphaned_suspended.saturating_sub(b.downgraded)
            };
            self.orphaned_suspended_sessions
                .with_label_values(label)
                .set(still_orphaned as i64);
            self.live_sessions_without_object
                .with_label_values(label)
                .set(b.live_without_object as i64);
            self.untracked_cluster_objects
                .with_label_values(label)
                .set(b.untracked_objects as i64);
            self.cluster_objects
                .with_label_values(label)
                .set(b.cluster_objects as i64);
        }
        self.deferred_downgrades.set(report.deferred as i64);
    }

    /// Every metric this binary exports, in registration order.
    pub fn describe(&self) -> &[MetricDescription] {
        &self.described
    }

    /// Counts the cluster's requests and undecodable objects in these metrics.
    pub fn observe_cluster(self: &Arc<Self>, cluster: &mut crate::cluster::KubeCluster) {
        let m = self.clone();
        cluster.set_request_hook(Arc::new(move |verb, code| m.kube_request(verb, code)));
        let m = self.clone();
        cluster.set_undecodable_hook(Arc::new(move |backend, field| {
            m.objects_undecodable_total
                .with_label_values(&[backend.as_str(), field])
                .inc()
        }));
    }

    /// Counts one Kubernetes API request.
    pub fn kube_request(&self, verb: &'static str, code: u16) {
        self.kube_requests_total
            .with_label_values(&[verb, code.to_string().as_str()])
            .inc();
    }

    /// Reads the watch cache's figures at every scrape.
    pub fn observe_cache(&self, cache: Arc<crate::cluster::cache::ClusterCache>) {
        if let Ok(mut slot) = self.cache.lock() {
            *slot = Some(cache);
        }
    }

    fn refresh_cache_gauges(&self) {
        let cache = self.cache.lock().ok().and_then(|c| c.clone());
        let Some(cache) = cache else {
            return;
        };
        let status = cache.status();
        self.cache_synced.set(i64::from(status.synced));
        for (backend, n) in status.objects {
            self.cache_objects
                .with_label_values(&[backend.as_str()])
                .set(n as i64);
        }
        self.cache_watermark_age_seconds
            .set(status.watermark_age_seconds as i64);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        self.refresh_cache_gauges();
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!("encoding metrics failed: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The phases of `sweep_phase_duration_seconds`.
pub const PHASES: [&str; 4] = ["list_cluster", "read_db", "confirm", "apply"];

/// Buckets of both duration histograms: past the longest sweep a CronJob allows (1800 s).
const DURATION_BUCKETS: [f64; 15] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

impl crate::cluster::cache::CacheObserver for Metrics {
    fn relisted(&self, backend: BackendKind, reason: crate::cluster::cache::RelistReason) {
        self.cache_relists_total
            .with_label_values(&[backend.as_str(), reason.as_str()])
            .inc();
    }

    fn watch_restarted(&self, backend: BackendKind) {
        self.cache_watch_restarts_total
            .with_label_values(&[backend.as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's metrics table lists exactly the metrics the binary exports, each with its
    /// type: it is checked against the registry, not kept by hand.
    #[test]
    fn the_readme_lists_every_exported_metric_with_its_type() {
        let readme = include_str!("../README.md");
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
        for phase in PHASES {
            assert!(text.contains(&format!("phase=\"{phase}\"")), "{phase}");
        }
    }
}
