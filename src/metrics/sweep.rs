//! What sweeps did: results, durations by phase, the last completed sweep's figures (rows,
//! orphans, untracked objects, skipped rows), refusals, database errors and the cluster the
//! last sweep looked at. Everything here is read from a [`SweepReport`].

use prometheus::{
    Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
};

use super::{init_each, Registrar};
use crate::backends::Backends;
use crate::plan::{GuardVerdict, RefusalReason, SkipReason};
use crate::sweep::{ErrorKind, SweepPhase, SweepReport, SweepResult};

/// Buckets of both duration histograms: past the longest sweep a CronJob allows (1800 s).
const DURATION_BUCKETS: [f64; 15] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

/// The sweep metrics.
pub struct SweepMetrics {
    pub sessions_downgraded_total: IntCounterVec,
    pub sweeps_total: IntCounterVec,
    pub sweep_duration_seconds: Histogram,
    pub sweep_phase_duration_seconds: HistogramVec,
    pub cluster_info: IntGaugeVec,
    pub last_success_timestamp_seconds: Gauge,
    pub last_sweep_timestamp_seconds: Gauge,
    pub guard_refusals_total: IntCounterVec,
    pub db_errors_total: IntCounter,
    /// The last completed sweep's figures.
    pub figures: SweepFigures,
}

/// The last completed sweep's figures: gauges a failed sweep leaves as they were.
pub struct SweepFigures {
    pub orphaned_suspended_sessions: IntGaugeVec,
    pub sessions: IntGaugeVec,
    pub live_sessions_without_object: IntGaugeVec,
    pub untracked_cluster_objects: IntGaugeVec,
    pub cluster_objects: IntGaugeVec,
    pub deferred_downgrades: IntGauge,
    pub skipped_rows: IntGaugeVec,
}

impl SweepMetrics {
    /// Registers the sweep metrics; results, phases, reasons and the enabled backends'
    /// downgrade counters start at zero.
    pub(super) fn new(r: &mut Registrar, backends: &Backends) -> SweepMetrics {
        let m = SweepMetrics {
            sessions_downgraded_total: r.int_counter_vec(
                "sessions_downgraded_total",
                "Suspended rows downgraded to gone.",
                &["backend"],
            ),
            sweeps_total: r.int_counter_vec(
                "sweeps_total",
                "Sweeps by result: success, failed, refused (a guard refused to act), skipped (another sweep or writer was active).",
                &["result"],
            ),
            sweep_duration_seconds: r.histogram(
                "sweep_duration_seconds",
                "Duration of whole sweeps that ran (not skipped).",
                &DURATION_BUCKETS,
            ),
            sweep_phase_duration_seconds: r.histogram_vec(
                "sweep_phase_duration_seconds",
                "Duration of each sweep phase that ran (apply: only when a batch was written).",
                &DURATION_BUCKETS,
                &["phase"],
            ),
            cluster_info: r.int_gauge_vec(
                "cluster_info",
                "Always 1; the cluster the last sweep looked at: the kube-system Namespace's UID and the API server URL.",
                &["cluster_uid", "server"],
            ),
            last_success_timestamp_seconds: r.gauge(
                "last_success_timestamp_seconds",
                "Unix time of the last successful sweep.",
            ),
            last_sweep_timestamp_seconds: r.gauge(
                "last_sweep_timestamp_seconds",
                "Unix time of the last sweep attempt that ran (any result but skipped).",
            ),
            guard_refusals_total: r.int_counter_vec(
                "guard_refusals_total",
                "Sweeps a safety guard refused to act on, by reason.",
                &["reason"],
            ),
            db_errors_total: r.int_counter(
                "db_errors_total",
                "Sweeps that failed on a database error.",
            ),
            figures: SweepFigures::new(r),
        };
        init_each::<SweepResult, _>(&m.sweeps_total);
        init_each::<SweepPhase, _>(&m.sweep_phase_duration_seconds);
        init_each::<RefusalReason, _>(&m.guard_refusals_total);
        for kind in backends.attributions() {
            m.sessions_downgraded_total
                .with_label_values(&[kind.as_str()]);
        }
        m
    }

    /// Counts one sweep (or a schedule tick that found a sweep running) under its result.
    pub fn count(&self, result: SweepResult) {
        self.sweeps_total
            .with_label_values(&[result.as_str()])
            .inc();
    }

    /// Folds one sweep's report into the metrics.
    pub fn record(&self, report: &SweepReport) {
        self.count(report.result);
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
        self.sweep_duration_seconds.observe(report.timings.total);
        for phase in SweepPhase::ALL {
            if let Some(seconds) = phase_seconds(report, phase) {
                self.sweep_phase_duration_seconds
                    .with_label_values(&[phase.as_str()])
                    .observe(seconds);
            }
        }
        match report.result {
            SweepResult::Failed => {
                if report.error_kind == Some(ErrorKind::Database) {
                    self.db_errors_total.inc();
                }
                // Gauges keep the last completed sweep's values; staleness is visible
                // through last_success_timestamp_seconds.
            }
            SweepResult::Refused | SweepResult::Success => {
                if let Some(GuardVerdict::Refuse { reason, .. }) = &report.guard {
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
                    self.figures.set(report);
                }
            }
            SweepResult::Skipped => {}
        }
    }
}

impl SweepFigures {
    /// Registers the figures; the skip reasons start at zero.
    fn new(r: &mut Registrar) -> SweepFigures {
        let m = SweepFigures {
            orphaned_suspended_sessions: r.int_gauge_vec(
                "orphaned_suspended_sessions",
                "Suspended rows whose object is missing, still orphaned after the last completed sweep (in dry-run: all found).",
                &["backend"],
            ),
            sessions: r.int_gauge_vec(
                "sessions",
                "Session rows per state as of the last completed sweep (states the configuration does not name count as \"unknown\").",
                &["state"],
            ),
            live_sessions_without_object: r.int_gauge_vec(
                "live_sessions_without_object",
                "Rows in a live state whose object is missing.",
                &["backend"],
            ),
            untracked_cluster_objects: r.int_gauge_vec(
                "untracked_cluster_objects",
                "Listed objects that no row outside the gone state refers to (leaked objects cost money).",
                &["backend"],
            ),
            cluster_objects: r.int_gauge_vec(
                "cluster_objects",
                "Objects listed in the last completed sweep.",
                &["backend"],
            ),
            deferred_downgrades: r.int_gauge(
                "deferred_downgrades",
                "Orphans left for a later sweep by the per-sweep cap (or a guard refusal).",
            ),
            skipped_rows: r.int_gauge_vec(
                "skipped_rows",
                "Rows the last completed sweep passed over, by reason (the same rows count again in every sweep until they change).",
                &["reason"],
            ),
        };
        init_each::<SkipReason, _>(&m.skipped_rows);
        m
    }

    /// Sets every figure from a planned sweep's report.
    fn set(&self, report: &SweepReport) {
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
}

/// How long `phase` took, when it ran: an apply phase that wrote nothing is not a 0 s apply.
fn phase_seconds(report: &SweepReport, phase: SweepPhase) -> Option<f64> {
    let t = &report.timings;
    let (seconds, ran) = match phase {
        SweepPhase::ListCluster => (t.list_cluster, t.list_cluster > 0.0),
        SweepPhase::ReadDb => (t.read_db, t.read_db > 0.0),
        SweepPhase::Confirm => (t.confirm, report.selected > 0),
        SweepPhase::Apply => (t.apply, report.batches > 0),
    };
    ran.then_some(seconds)
}
