//! One sweep, in the order that is its safety argument (docs/DESIGN.md, "A sweep"):
//!
//! 1. **lock**: one writer per table and scope (rule 8), taken before anything is read;
//! 2. **scope**: the intended cluster, every configured namespace present (rule 10);
//! 3. **clock**: the database's, read before rows and cluster, the grace period's reference
//!    (rule 3);
//! 4. **rows** and 5. **view**: one-off, the rows then one complete listing that started after
//!    them; daemon, the watch cache then the rows (`view`);
//! 6. **plan**: the pure decision (`plan`); 7. **guard**: refuse what looks like
//!    misconfiguration (rules 5 and 10);
//! 8. **confirm**: each orphan's absence proven (rule 2) the way [`ConfirmBy`] says (`confirm`);
//! 9. **apply**: whole batches, each row re-checked as read, with its audit record (rules 4, 6,
//!    7; `apply`);
//! 10. **report**: what the sweep saw and did (`report`).
//!
//! Every step before apply only reads, so any failure or refusal ends the sweep with nothing
//! written. [`Reconciler::run`] is these steps, one named function each.
//!
//! The session table is resolved through the catalog (and the audit table migrated) once per
//! process, on the first sweep or at start-up ([`Reconciler::prepare`]), never in every sweep.

mod apply;
mod confirm;
pub mod report;
mod view;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::cluster::cache::ClusterCache;
use crate::cluster::{ClusterError, KubeCluster};
use crate::config::Settings;
use crate::plan::Policy;
use crate::progress::SweepProgress;
use crate::store::{self, Database, StoreError, TableMapping};

pub use confirm::ConfirmBy;
use confirm::Confirmed;
pub use report::{
    BackendReport, ChangeLine, Confirmation, ErrorKind, SweepPhase, SweepReport, SweepResult,
    Timings,
};

/// Where the cluster view comes from.
#[derive(Clone)]
pub enum ClusterSource {
    Api(Box<KubeCluster>),
    /// A `kubectl get -o json` dump; always a dry run.
    Dump(PathBuf),
}

/// Per-run options from the command line.
#[derive(Debug, Clone, Default)]
pub struct SweepOptions {
    pub dry_run: bool,
    pub max_downgrades: Option<usize>,
}

/// Why a sweep failed.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("stopped by shutdown before the sweep finished")]
    Interrupted,
}

/// Everything needed to run sweeps, built once from configuration.
#[derive(Clone)]
pub struct Reconciler {
    pub settings: Settings,
    pub database: Database,
    /// The mapping as configured; [`Reconciler::prepare`] resolves it through the catalog.
    pub mapping: TableMapping,
    pub source: ClusterSource,
    /// The daemon's watch-fed cluster cache; `None` for one-off sweeps.
    cache: Option<Arc<ClusterCache>>,
    /// Signs of life for a one-off run on a terminal.
    progress: Option<Arc<dyn SweepProgress>>,
    resolved: Arc<tokio::sync::OnceCell<TableMapping>>,
    migrated: Arc<tokio::sync::OnceCell<()>>,
}

impl Reconciler {
    pub fn new(
        settings: Settings,
        database: Database,
        mapping: TableMapping,
        source: ClusterSource,
    ) -> Reconciler {
        Reconciler {
            settings,
            database,
            mapping,
            source,
            cache: None,
            progress: None,
            resolved: Arc::default(),
            migrated: Arc::default(),
        }
    }

    /// Sweeps read the cluster from `cache` (daemon mode) instead of listing it each time.
    pub fn with_cache(mut self, cache: Arc<ClusterCache>) -> Reconciler {
        self.cache = Some(cache);
        self
    }

    /// Reports progress to `progress` while sweeping (a one-off run on a terminal).
    pub fn with_progress(mut self, progress: Arc<dyn SweepProgress>) -> Reconciler {
        self.progress = Some(progress);
        self
    }

    /// The watch cache, when there is one.
    pub fn cache(&self) -> Option<&Arc<ClusterCache>> {
        self.cache.as_ref()
    }

    /// Resolves the session table through the catalog (once per process) and, when `write`,
    /// runs the audit migrations (once per process). Returns the resolved mapping, whose
    /// canonical name keys the writer lock and the audit records.
    pub async fn prepare(
        &self,
        conn: &mut sqlx::PgConnection,
        write: bool,
    ) -> Result<TableMapping, StoreError> {
        let mapping = self
            .resolved
            .get_or_try_init(|| store::resolve(&mut *conn, &self.mapping))
            .await?
            .clone();
        if write {
            self.migrated
                .get_or_try_init(|| store::migrate(&mut *conn, &mapping))
                .await?;
        }
        Ok(mapping)
    }

    /// [`Reconciler::prepare`] on a short-lived connection of its own (start-up).
    pub async fn prepare_at_start(&self, write: bool) -> Result<TableMapping, StoreError> {
        let mut conn = self.database.connect().await?;
        self.prepare(&mut conn, write).await
    }

    pub fn policy(&self, max_downgrades: Option<usize>) -> Policy {
        let s = &self.settings;
        Policy {
            suspended_state: s.sessions.suspended_state.clone(),
            gone_state: s.sessions.gone_state.clone(),
            live_states: s.sessions.live_states.clone(),
            other_states: s.sessions.other_states.clone(),
            grace_period: chrono::Duration::seconds(
                i64::try_from(s.sweep.grace_period.as_secs()).unwrap_or(i64::MAX / 1000),
            ),
            max_downgrades: max_downgrades.unwrap_or(s.sweep.max_downgrades_per_sweep),
            max_live_missing_ratio: s.guard.max_live_missing_ratio,
            min_live_missing: s.guard.min_live_missing,
            max_suspended_missing_ratio: s.guard.max_suspended_missing_ratio,
            min_suspended_missing: s.guard.min_suspended_missing,
        }
    }

    /// Whether this run writes nothing.
    pub fn is_dry_run(&self, options: &SweepOptions) -> bool {
        options.dry_run
            || self.settings.sweep.dry_run
            || matches!(self.source, ClusterSource::Dump(_))
    }

    fn new_report(&self, options: &SweepOptions) -> SweepReport {
        let source = match &self.source {
            ClusterSource::Api(_) => "api".to_string(),
            ClusterSource::Dump(path) => path.display().to_string(),
        };
        SweepReport::new(self.is_dry_run(options), source)
    }

    /// Runs one sweep on its own connection, taking the writer lock first (unless it is a
    /// dry run); the lock goes with the connection at the end. `shutdown` turning true
    /// stops between batches: the batch in flight commits or rolls back, none is left half
    /// applied.
    pub async fn sweep(
        &self,
        options: &SweepOptions,
        shutdown: &watch::Receiver<bool>,
    ) -> SweepReport {
        let mut report = self.new_report(options);
        let started = Instant::now();
        let outcome = async {
            let mut conn = self.database.connect().await?;
            if !report.dry_run {
                let mapping = self.prepare(&mut conn, true).await?;
                self.take_writer_lock(&mut conn, &mapping).await?;
            }
            self.run(&mut conn, options, shutdown, &mut report).await
        }
        .await;
        self.finish(&mut report, started, outcome);
        report
    }

    /// Runs one sweep on `conn`, which already holds the writer lock (daemon mode).
    pub async fn sweep_on(
        &self,
        conn: &mut sqlx::PgConnection,
        options: &SweepOptions,
        shutdown: &watch::Receiver<bool>,
    ) -> SweepReport {
        let mut report = self.new_report(options);
        let started = Instant::now();
        let outcome = self.run(conn, options, shutdown, &mut report).await;
        self.finish(&mut report, started, outcome);
        report
    }

    /// A report for a sweep that did not run because another replica is the writer.
    pub fn skipped_report(&self, options: &SweepOptions, why: &str) -> SweepReport {
        let mut report = self.new_report(options);
        report.result = SweepResult::Skipped;
        report.error_kind = Some(ErrorKind::LockBusy);
        report.error = Some(why.to_string());
        report
    }

    fn finish(
        &self,
        report: &mut SweepReport,
        started: Instant,
        outcome: Result<SweepResult, SweepError>,
    ) {
        report.timings.total = started.elapsed().as_secs_f64();
        match outcome {
            Ok(result) => report.result = result,
            Err(e) => {
                report.result = if matches!(e, SweepError::Store(StoreError::LockBusy { .. })) {
                    SweepResult::Skipped
                } else {
                    SweepResult::Failed
                };
                report.error_kind = Some(ErrorKind::of(&e));
                report.error = Some(store::redact(&e.to_string(), &self.settings.database.url));
            }
        }
    }

    /// One sweep, the rules in order; `conn` holds the writer lock unless it is a dry run.
    /// Every step before `apply` only reads: any failure or refusal there ends the sweep with
    /// nothing written.
    async fn run(
        &self,
        conn: &mut sqlx::PgConnection,
        options: &SweepOptions,
        shutdown: &watch::Receiver<bool>,
        report: &mut SweepReport,
    ) -> Result<SweepResult, SweepError> {
        let mapping = self.prepare(&mut *conn, !report.dry_run).await?;
        report.table = Some(mapping.table_display());
        let policy = self.policy(options.max_downgrades);
        if let Some(refused) = self.verify_scope(report).await? {
            return Ok(refused);
        }
        let clock = self.database_clock(conn, &mapping).await?;
        let (snapshot, plan) = self
            .view_and_plan(conn, &mapping, clock, &policy, report)
            .await?;
        report.absorb_plan(&plan, &snapshot);
        if let Some(refused) = report.refused_by(&plan.guard) {
            return Ok(refused);
        }
        let replanned;
        let confirmed = match self
            .prove_absence(&plan.downgrades, &snapshot, &mapping, report)
            .await
        {
            Confirmed::Rows(rows) => rows,
            Confirmed::ListAfresh => {
                replanned = self
                    .replan_from_listing(conn, &mapping, clock, &policy, report)
                    .await?;
                match self.fresh_listing_evidence(replanned.as_ref(), &mapping, report) {
                    Ok(rows) => rows,
                    Err(refused) => return Ok(refused),
                }
            }
        };
        self.apply(conn, &mapping, &confirmed, shutdown, report)
            .await
    }

    async fn take_writer_lock(
        &self,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
    ) -> Result<(), SweepError> {
        let wait = self.settings.database.writer_lock_wait;
        Ok(store::wait_for_writer_lock(conn, mapping, wait, "").await?)
    }
}
