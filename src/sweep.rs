//! One sweep: lock -> verify scope -> list cluster -> read rows -> plan -> guard -> confirm ->
//! apply -> report.
//!
//! The order is the safety argument. Before anything is listed the sweep checks that it looks
//! at the intended cluster and that every configured namespace exists (rule 10). The cluster
//! is listed completely *before* rows are read and the listing's start time is the clock for
//! the grace period, so an object created after the listing started can only belong to a row
//! that is fresher than the grace period. Any failure before the apply step aborts with
//! nothing written; the apply step writes whole batches only, each re-checking the row as read.
//!
//! The session table is resolved through the catalog (and the audit table migrated) once per
//! process, on the first sweep or at start-up ([`Reconciler::prepare`]), never in every sweep.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use crate::cluster::cache::ClusterCache;
use crate::cluster::{
    dump, Absence, BackendKind, ClusterError, ClusterSnapshot, KubeCluster, ScopeVerdict,
};
use crate::config::Settings;
use crate::plan::{
    GuardVerdict, OrphanedRow, Plan, Planner, Policy, ReadRows, RefusalReason, RowSink, SessionRow,
    SkipReason,
};
use crate::progress::SweepProgress;
use crate::store::{self, Database, Downgrade, StoreError, TableMapping};

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

/// How a sweep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepResult {
    Success,
    Failed,
    Refused,
    /// Another reconciler holds the writer lock.
    Skipped,
}

impl SweepResult {
    pub fn as_str(self) -> &'static str {
        match self {
            SweepResult::Success => "success",
            SweepResult::Failed => "failed",
            SweepResult::Refused => "refused",
            SweepResult::Skipped => "skipped",
        }
    }
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

/// How the absence of an orphan's object was established (rule 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confirmation {
    /// Not established (no orphans selected, or the sweep stopped before).
    None,
    /// (a) A direct GET per object answered 404 `NotFound`.
    Get,
    /// (b) Missing from a complete, consistent listing that started after the rows were read.
    Listing,
    /// (c) Missing from the watch cache, proven at least as fresh as a revision taken after
    /// the rows were read.
    WatchCache,
    /// Only the complete listing (sweep.confirm_absence = false).
    ListingOnly,
    /// Only the snapshot file.
    SnapshotFile,
}

/// Per-backend figures of one sweep.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackendReport {
    pub cluster_objects: u64,
    pub terminating_objects: u64,
    pub suspended_objects: u64,
    pub untracked_objects: u64,
    pub live_without_object: u64,
    pub suspended_with_object: u64,
    pub orphaned_suspended: u64,
    pub downgraded: u64,
    pub list_requests: u64,
}

/// One row the sweep changed (or, in a dry run, would change).
#[derive(Debug, Clone, Serialize)]
pub struct ChangeLine {
    pub key: String,
    pub object: String,
    pub backend: BackendKind,
    pub updated_at: DateTime<Utc>,
    pub evidence: String,
}

/// Phase timings in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub list_cluster: f64,
    pub read_db: f64,
    pub confirm: f64,
    /// Part of `confirm`: waiting for the watch cache to reach a revision taken after the
    /// read (rule 2(c)), up to about one bookmark interval of the API server.
    pub confirm_wait: f64,
    pub apply: f64,
    pub total: f64,
}

/// Everything a sweep saw and did; printed as text or JSON and fed to metrics.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub sweep_id: uuid::Uuid,
    pub started_at: DateTime<Utc>,
    pub dry_run: bool,
    pub cluster_source: String,
    pub result: SweepResult,
    pub error: Option<String>,
    /// A bounded label for the failure, when failed.
    pub error_kind: Option<&'static str>,
    pub guard: Option<GuardVerdict>,
    pub rows_read: u64,
    pub rows_by_state: BTreeMap<String, u64>,
    pub live_rows: u64,
    pub backends: BTreeMap<BackendKind, BackendReport>,
    pub orphans_found: u64,
    pub within_grace: u64,
    pub selected: u64,
    /// How absences were confirmed.
    pub confirmation: Confirmation,
    /// Orphans confirmed absent.
    pub confirmed: u64,
    /// API requests the confirmation took (GETs, revision reads, a fresh listing's pages).
    pub confirmation_requests: u64,
    /// Where the sweep's view of the cluster came from: "listing" (a complete listing),
    /// "watch cache", or "snapshot file".
    pub cluster_view: String,
    pub downgraded: u64,
    pub deferred: u64,
    pub skipped: BTreeMap<SkipReason, u64>,
    pub timings: Timings,
    /// Apply transactions attempted (0: the apply phase did not run).
    pub batches: u64,
    /// Apply transactions whose COMMIT got no answer in time (or whose connection failed
    /// during it): they may or may not have been committed. The next sweep re-reads the rows.
    pub outcome_unknown_batches: u64,
    /// The cluster's identity (the kube-system Namespace's UID), when read from the API.
    pub cluster_uid: Option<String>,
    /// The API server URL, when read from the API.
    pub cluster_server: Option<String>,
    /// The session table by its canonical `schema.table`, once resolved.
    pub table: Option<String>,
    /// Rows changed (or that would change, in a dry run).
    pub changes: Vec<ChangeLine>,
}

impl SweepReport {
    fn new(dry_run: bool, source: String) -> SweepReport {
        SweepReport {
            sweep_id: uuid::Uuid::new_v4(),
            started_at: Utc::now(),
            dry_run,
            cluster_source: source,
            result: SweepResult::Failed,
            error: None,
            error_kind: None,
            guard: None,
            rows_read: 0,
            rows_by_state: BTreeMap::new(),
            live_rows: 0,
            backends: BTreeMap::new(),
            orphans_found: 0,
            within_grace: 0,
            selected: 0,
            confirmation: Confirmation::None,
            confirmed: 0,
            confirmation_requests: 0,
            cluster_view: String::new(),
            downgraded: 0,
            deferred: 0,
            skipped: BTreeMap::new(),
            timings: Timings::default(),
            outcome_unknown_batches: 0,
            batches: 0,
            cluster_uid: None,
            cluster_server: None,
            table: None,
            changes: Vec::new(),
        }
    }

    fn skip(&mut self, reason: SkipReason, n: u64) {
        if n > 0 {
            *self.skipped.entry(reason).or_default() += n;
        }
    }

    fn absorb_plan(&mut self, plan: &Plan, snapshot: &ClusterSnapshot) {
        self.guard = Some(plan.guard.clone());
        self.rows_read = plan.rows_read;
        self.rows_by_state = plan.rows_by_state.clone();
        self.live_rows = plan.live_rows;
        self.orphans_found = plan.orphans_found;
        self.within_grace = plan.within_grace;
        self.deferred = plan.deferred;
        self.selected = plan.downgrades.len() as u64;
        for (reason, n) in &plan.skipped {
            self.skip(*reason, *n);
        }
        for view in &snapshot.backends {
            let counts = plan.backends.get(&view.kind).cloned().unwrap_or_default();
            self.backends.insert(
                view.kind,
                BackendReport {
                    cluster_objects: counts.cluster_objects,
                    terminating_objects: view.count(|f| f.terminating) as u64,
                    suspended_objects: view.count(|f| f.suspended) as u64,
                    untracked_objects: counts.untracked_objects,
                    live_without_object: counts.live_without_object,
                    suspended_with_object: counts.suspended_with_object,
                    orphaned_suspended: counts.orphaned_suspended,
                    downgraded: 0,
                    list_requests: view.requests,
                },
            );
        }
        // Rows attributed to no backend have no listing of their own but are reported.
        if let Some(unknown) = plan.backends.get(&BackendKind::Unknown) {
            self.backends.insert(
                BackendKind::Unknown,
                BackendReport {
                    live_without_object: unknown.live_without_object,
                    orphaned_suspended: unknown.orphaned_suspended,
                    ..BackendReport::default()
                },
            );
        }
    }

    /// After the apply phase: the state counts as the sweep left the table, so the
    /// `sessions{state}` gauge agrees with the database right after a clean-up.
    fn count_downgrades(&mut self, suspended: &str, gone: &str) {
        if self.downgraded == 0 {
            return;
        }
        if let Some(n) = self.rows_by_state.get_mut(suspended) {
            *n = n.saturating_sub(self.downgraded);
        }
        *self.rows_by_state.entry(gone.to_string()).or_default() += self.downgraded;
    }

    fn refuse(&mut self, reason: RefusalReason, detail: String) -> SweepResult {
        tracing::error!(
            sweep_id = %self.sweep_id,
            reason = reason.as_str(),
            "refusing to act: {detail}"
        );
        self.guard = Some(GuardVerdict::Refuse { reason, detail });
        SweepResult::Refused
    }
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
                i64::try_from(s.sweep.grace_period_seconds).unwrap_or(i64::MAX / 1000),
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
        report.error_kind = Some("lock_busy");
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
                report.error_kind = Some(match &e {
                    SweepError::Store(StoreError::LockBusy { .. }) => "lock_busy",
                    SweepError::Store(_) => "database",
                    SweepError::Cluster(c) => c.kind(),
                    SweepError::Interrupted => "interrupted",
                });
                report.error = Some(store::redact(&e.to_string(), &self.settings.database.url));
            }
        }
    }

    async fn run(
        &self,
        conn: &mut sqlx::PgConnection,
        options: &SweepOptions,
        shutdown: &watch::Receiver<bool>,
        report: &mut SweepReport,
    ) -> Result<SweepResult, SweepError> {
        let dry_run = report.dry_run;
        let mapping = self.prepare(&mut *conn, !dry_run).await?;
        report.table = Some(mapping.table_display());

        let policy = self.policy(options.max_downgrades);
        let mut database_clock = None;
        let (snapshot, plan) = match &self.source {
            ClusterSource::Dump(path) => {
                let t = Instant::now();
                let snapshot = dump::load(path, &self.settings)?;
                report.timings.list_cluster = t.elapsed().as_secs_f64();
                report.cluster_view = "snapshot file".into();
                let plan = self
                    .plan_streaming(conn, &mapping, &snapshot, &policy, report)
                    .await?;
                (snapshot, plan)
            }
            ClusterSource::Api(cluster) => {
                if let Some(refused) = self.verify_scope(cluster, report).await? {
                    return Ok(refused);
                }
                // The grace period compares rows' updated_at, written by the database clock,
                // with the moment the cluster was looked at: take that moment from the same
                // clock, read before rows and listing (never later than either).
                let clock = store::database_now(&mut *conn, &mapping).await?;
                database_clock = Some(clock);
                let database_clock = clock;
                match &self.cache {
                    Some(cache) => {
                        let t = Instant::now();
                        let mut snapshot = self.cached_view(cluster, cache, report).await?;
                        report.timings.list_cluster = t.elapsed().as_secs_f64();
                        snapshot.listing_started_at = database_clock;
                        snapshot.cluster_uid = report.cluster_uid.clone();
                        let plan = self
                            .plan_streaming(conn, &mapping, &snapshot, &policy, report)
                            .await?;
                        (snapshot, plan)
                    }
                    None => {
                        // One-off: the rows first, then one complete listing, which is both
                        // the candidate set and, having started after the read, the proof
                        // of absence (rule 2(b)).
                        let t = Instant::now();
                        let mut rows = ReadRows::default();
                        let mut counting = CountingSink::new(&mut rows, self.progress.as_deref());
                        store::read_rows(&mut *conn, &mapping, &mut counting).await?;
                        counting.done();
                        report.timings.read_db = t.elapsed().as_secs_f64();
                        let t = Instant::now();
                        let mut snapshot = cluster.snapshot().await?;
                        report.timings.list_cluster = t.elapsed().as_secs_f64();
                        report.cluster_view = "listing".into();
                        snapshot.listing_started_at = database_clock;
                        snapshot.cluster_uid = report.cluster_uid.clone();
                        let mut planner = Planner::new(&snapshot, &policy);
                        rows.replay(&mut planner);
                        drop(rows);
                        let plan = planner.finish();
                        (snapshot, plan)
                    }
                }
            }
        };
        report.absorb_plan(&plan, &snapshot);

        if let GuardVerdict::Refuse { reason, detail } = &plan.guard {
            return Ok(report.refuse(*reason, detail.clone()));
        }

        let t = Instant::now();
        let first = self
            .confirm(&plan.downgrades, &snapshot, &mapping, report)
            .await;
        report.timings.confirm = t.elapsed().as_secs_f64();
        let replanned;
        let confirmed = match first {
            Confirmed::Rows(rows) => rows,
            Confirmed::ListAfresh => {
                replanned = self
                    .replan_from_listing(conn, &mapping, database_clock, &policy, report)
                    .await?;
                match &replanned {
                    None => Vec::new(),
                    Some((listing, plan)) => {
                        if let GuardVerdict::Refuse { reason, detail } = &plan.guard {
                            return Ok(report.refuse(*reason, detail.clone()));
                        }
                        report.confirmation = Confirmation::Listing;
                        report.confirmed = plan.downgrades.len() as u64;
                        self.listing_evidence(&plan.downgrades, listing, &mapping, report)
                    }
                }
            }
        };

        if dry_run {
            report.changes = confirmed.iter().map(change_line).collect();
            return Ok(SweepResult::Success);
        }

        let t = Instant::now();
        let result = self
            .apply(conn, &mapping, &confirmed, shutdown, report)
            .await;
        report.timings.apply = t.elapsed().as_secs_f64();
        report.count_downgrades(&mapping.suspended_state, &mapping.gone_state);
        result?;
        Ok(SweepResult::Success)
    }

    /// Rule 10: the intended cluster, every configured namespace present. `Some(result)`
    /// when the sweep must stop here (refused).
    async fn verify_scope(
        &self,
        cluster: &KubeCluster,
        report: &mut SweepReport,
    ) -> Result<Option<SweepResult>, SweepError> {
        report.cluster_server = cluster.origin().map(|o| o.server.clone());
        let expected = Some(self.settings.cluster.expected_uid.trim()).filter(|u| !u.is_empty());
        match cluster.verify_scope(expected).await? {
            ScopeVerdict::Proceed { cluster_uid } => {
                report.cluster_uid = Some(cluster_uid);
                Ok(None)
            }
            ScopeVerdict::Refuse {
                reason,
                detail,
                cluster_uid,
            } => {
                report.cluster_uid = Some(cluster_uid);
                Ok(Some(report.refuse(reason, detail)))
            }
        }
    }

    /// The daemon's view: the watch cache once synced (waiting a bounded time), else a fresh
    /// complete listing. An unsynced cache is never taken for the cluster.
    async fn cached_view(
        &self,
        cluster: &KubeCluster,
        cache: &ClusterCache,
        report: &mut SweepReport,
    ) -> Result<ClusterSnapshot, SweepError> {
        let wait = Duration::from_secs(self.settings.cluster.cache_sync_wait_seconds);
        if cache.wait_synced(wait).await {
            if let Some(snapshot) = cache.snapshot() {
                report.cluster_view = "watch cache".into();
                return Ok(snapshot);
            }
        }
        tracing::warn!(
            "the watch cache is not synced after {}s; listing the cluster instead",
            wait.as_secs()
        );
        report.cluster_view = "listing (watch cache not synced)".into();
        Ok(cache.list_afresh(cluster).await?)
    }

    /// Streams the rows into a planner over `snapshot` (a view taken before the read).
    async fn plan_streaming(
        &self,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
        snapshot: &ClusterSnapshot,
        policy: &Policy,
        report: &mut SweepReport,
    ) -> Result<Plan, SweepError> {
        let t = Instant::now();
        let mut planner = Planner::new(snapshot, policy);
        let mut counting = CountingSink::new(&mut planner, self.progress.as_deref());
        store::read_rows(&mut *conn, mapping, &mut counting).await?;
        counting.done();
        let plan = planner.finish();
        report.timings.read_db = t.elapsed().as_secs_f64();
        Ok(plan)
    }

    async fn take_writer_lock(
        &self,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
    ) -> Result<(), SweepError> {
        let deadline =
            Instant::now() + Duration::from_secs(self.settings.database.writer_lock_wait_seconds);
        let mut announced = false;
        loop {
            if store::try_writer_lock(conn, mapping).await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StoreError::LockBusy {
                    table: mapping.table_display(),
                }
                .into());
            }
            if !announced {
                tracing::info!(
                    "another sandbox-reconciler holds the writer lock; waiting up to {}s",
                    self.settings.database.writer_lock_wait_seconds
                );
                announced = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Confirms each selected orphan; returns those definitively absent, with evidence, or
    /// that the daemon's cache could not be proven fresh and the sweep must list afresh.
    async fn confirm<'p>(
        &self,
        orphans: &'p [OrphanedRow],
        snapshot: &ClusterSnapshot,
        mapping: &TableMapping,
        report: &mut SweepReport,
    ) -> Confirmed<'p> {
        let cluster_source = report.cluster_source.clone();
        let base = |absence: &str| self.evidence(absence, &cluster_source, snapshot, mapping);
        let all = |absence: &str| -> Confirmed<'p> {
            let evidence = Arc::new(base(absence));
            Confirmed::Rows(
                orphans
                    .iter()
                    .map(|row| Downgrade {
                        row,
                        evidence: evidence.clone(),
                    })
                    .collect(),
            )
        };
        let cluster = match &self.source {
            // The daemon's cache may lag the cluster: its orphans are always confirmed.
            ClusterSource::Api(cluster)
                if self.settings.sweep.confirm_absence || self.cache.is_some() =>
            {
                cluster
            }
            ClusterSource::Api(_) => {
                report.confirmation = Confirmation::ListingOnly;
                return all("absent from the sweep's view (sweep.confirm_absence = false)");
            }
            ClusterSource::Dump(_) => {
                report.confirmation = Confirmation::SnapshotFile;
                return all("absent from the snapshot file (not confirmed)");
            }
        };
        if orphans.is_empty() {
            return Confirmed::Rows(Vec::new());
        }
        let by_get = self.settings.sweep.confirmation == "get";
        match &self.cache {
            None if !by_get => {
                report.confirmation = Confirmation::Listing;
                report.confirmed = orphans.len() as u64;
                return all(LISTING_ABSENCE);
            }
            Some(cache) if !by_get && orphans.len() > self.settings.cluster.confirm_get_max => {
                return self
                    .confirm_many(cluster, cache, orphans, &base, report)
                    .await;
            }
            _ => {}
        }
        let answers = confirm_all(
            cluster,
            orphans,
            self.settings.cluster.confirm_concurrency,
            self.progress.as_deref(),
        )
        .await;
        let mut confirmed = Vec::with_capacity(orphans.len());
        report.confirmation = Confirmation::Get;
        for (i, answer) in answers {
            let row = &orphans[i];
            match answer {
                Ok(Absence::Absent { evidence }) => {
                    report.confirmed += 1;
                    confirmed.push(Downgrade {
                        row,
                        evidence: Arc::new(base(&evidence)),
                    });
                }
                Ok(Absence::Present { evidence }) => {
                    tracing::info!(key = %row.key, object = %row.object, "left alone: {evidence}");
                    report.skip(SkipReason::ObjectReappeared, 1);
                }
                Err(e) => {
                    tracing::warn!(key = %row.key, object = %row.object, "left alone, absence not confirmed: {e}");
                    report.skip(SkipReason::ConfirmFailed, 1);
                }
            }
        }
        Confirmed::Rows(confirmed)
    }

    /// Many orphans in the daemon: the watch cache proven at least as fresh as a revision
    /// taken now, after the rows were read (rule 2(c)), and every orphan checked again
    /// against it. If that proof does not come in time the cache may be stale in both
    /// directions (missing new orphans as well as showing old ones): the sweep lists afresh
    /// ([`Confirmed::ListAfresh`], [`Reconciler::replan_from_listing`]).
    async fn confirm_many<'p>(
        &self,
        cluster: &KubeCluster,
        cache: &ClusterCache,
        orphans: &'p [OrphanedRow],
        base: &(dyn Fn(&str) -> serde_json::Value + Sync),
        report: &mut SweepReport,
    ) -> Confirmed<'p> {
        let wait = Duration::from_secs(self.settings.cluster.cache_fresh_wait_seconds);
        let waiting = Instant::now();
        let mut backends: Vec<BackendKind> = orphans.iter().map(|o| o.backend).collect();
        backends.sort();
        backends.dedup();
        let proof = cache.prove_fresh(cluster, wait, &backends).await;
        report.timings.confirm_wait = waiting.elapsed().as_secs_f64();
        match proof {
            Ok(Some(requests)) => {
                report.confirmation = Confirmation::WatchCache;
                report.confirmation_requests += requests;
            }
            Ok(None) => {
                tracing::info!(
                    "the watch cache did not reach the current revision within {}s; listing instead",
                    wait.as_secs()
                );
                return Confirmed::ListAfresh;
            }
            Err(e) => {
                tracing::warn!("proving the watch cache fresh failed: {e}; listing instead");
                return Confirmed::ListAfresh;
            }
        }
        let mut confirmed = Vec::with_capacity(orphans.len());
        let evidence = Arc::new(base("absent from the watch cache, proven at least as fresh as a revision taken after the rows were read"));
        for row in orphans {
            match cache.contains(&row.object) {
                None => {
                    report.confirmed += 1;
                    confirmed.push(Downgrade {
                        row,
                        evidence: evidence.clone(),
                    });
                }
                Some(facts) => {
                    tracing::info!(
                        key = %row.key,
                        object = %row.object,
                        terminating = facts.terminating,
                        "left alone: the object exists"
                    );
                    report.skip(SkipReason::ObjectReappeared, 1);
                }
            }
        }
        Confirmed::Rows(confirmed)
    }

    /// Every orphan of a plan made on a complete listing that started after the rows were
    /// read, with that listing as the evidence (rule 2(b)).
    fn listing_evidence<'p>(
        &self,
        orphans: &'p [OrphanedRow],
        listing: &ClusterSnapshot,
        mapping: &TableMapping,
        report: &SweepReport,
    ) -> Vec<Downgrade<'p>> {
        let evidence =
            Arc::new(self.evidence(LISTING_ABSENCE, &report.cluster_source, listing, mapping));
        orphans
            .iter()
            .map(|row| Downgrade {
                row,
                evidence: evidence.clone(),
            })
            .collect()
    }

    /// The audit evidence of an absence.
    fn evidence(
        &self,
        absence: &str,
        cluster_source: &str,
        snapshot: &ClusterSnapshot,
        mapping: &TableMapping,
    ) -> serde_json::Value {
        let server = match &self.source {
            ClusterSource::Api(cluster) => cluster.origin().map(|o| o.server.clone()),
            ClusterSource::Dump(_) => None,
        };
        serde_json::json!({
            "absence": absence,
            "cluster_source": cluster_source,
            "cluster_uid": snapshot.cluster_uid,
            "api_server": server,
            "table": mapping.table_display(),
            "listing_started_at": snapshot.listing_started_at,
            "grace_period_seconds": self.settings.sweep.grace_period_seconds,
        })
    }

    /// The daemon's cache could not be proven fresh: the sweep starts its view over the way a
    /// one-off sweep does. It reads the rows again, then lists every backend completely
    /// ([`ClusterCache::list_afresh`], which also reseeds every informer behind that
    /// listing), and plans on that listing as its whole view: it is the candidate set, so
    /// orphans the stale cache hid are found too, and, having started after the rows were
    /// read, the proof of absence for all of them (rule 2(b)). `Ok(None)`: the listing
    /// failed and the orphans are left alone.
    async fn replan_from_listing(
        &self,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
        database_clock: Option<DateTime<Utc>>,
        policy: &Policy,
        report: &mut SweepReport,
    ) -> Result<Option<(ClusterSnapshot, Plan)>, SweepError> {
        // Only the daemon's cache, read from the API, asks for a fresh listing.
        let (ClusterSource::Api(cluster), Some(cache), Some(database_clock)) =
            (&self.source, &self.cache, database_clock)
        else {
            report.skip(SkipReason::ConfirmFailed, report.selected);
            return Ok(None);
        };
        let t = Instant::now();
        let mut rows = ReadRows::default();
        let mut counting = CountingSink::new(&mut rows, self.progress.as_deref());
        store::read_rows(&mut *conn, mapping, &mut counting).await?;
        counting.done();
        report.timings.read_db += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let listed = cache.list_afresh(cluster).await;
        report.timings.confirm += t.elapsed().as_secs_f64();
        let mut listing = match listed {
            Ok(listing) => listing,
            Err(e) => {
                tracing::warn!(
                    "left {} orphans alone: their absence could not be confirmed: {e}",
                    report.selected
                );
                report.skip(SkipReason::ConfirmFailed, report.selected);
                return Ok(None);
            }
        };
        report.confirmation_requests += listing.backends.iter().map(|b| b.requests).sum::<u64>();
        listing.listing_started_at = database_clock;
        listing.cluster_uid = report.cluster_uid.clone();
        let mut planner = Planner::new(&listing, policy);
        rows.replay(&mut planner);
        drop(rows);
        let plan = planner.finish();
        // The report describes the view the sweep acts on: the listing's.
        report.skipped.clear();
        report.backends.clear();
        report.absorb_plan(&plan, &listing);
        report.cluster_view = "listing (watch cache not proven fresh)".into();
        Ok(Some((listing, plan)))
    }

    async fn apply(
        &self,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
        confirmed: &[Downgrade<'_>],
        shutdown: &watch::Receiver<bool>,
        report: &mut SweepReport,
    ) -> Result<(), SweepError> {
        for batch in confirmed.chunks(self.settings.sweep.batch_size) {
            if *shutdown.borrow() {
                return Err(SweepError::Interrupted);
            }
            report.batches += 1;
            let outcome = match store::apply_batch(conn, mapping, report.sweep_id, batch).await {
                Ok(outcome) => outcome,
                Err(e @ StoreError::OutcomeUnknown { .. }) => {
                    report.outcome_unknown_batches += 1;
                    tracing::error!(
                        sweep_id = %report.sweep_id,
                        rows = batch.len(),
                        "a batch's outcome is unknown (its COMMIT got no answer): it may or may not have been written; the next sweep re-reads the rows, and the audit records of this sweep_id show what was"
                    );
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(p) = &self.progress {
                p.batch_applied(outcome.downgraded.len() as u64, confirmed.len() as u64);
            }
            report.skip(SkipReason::ChangedMeanwhile, outcome.skipped_changed as u64);
            let done: std::collections::HashSet<&str> =
                outcome.downgraded.iter().map(String::as_str).collect();
            for d in batch {
                if done.contains(d.row.key.as_str()) {
                    tracing::info!(
                        sweep_id = %report.sweep_id,
                        key = %d.row.key,
                        object = %d.row.object,
                        backend = d.row.backend.as_str(),
                        reason = "orphaned_suspended",
                        "downgraded session to gone"
                    );
                    report.downgraded += 1;
                    if let Some(b) = report.backends.get_mut(&d.row.backend) {
                        b.downgraded += 1;
                    }
                    report.changes.push(change_line(d));
                } else {
                    tracing::info!(key = %d.row.key, object = %d.row.object, "left alone: the row changed since it was read");
                }
            }
        }
        Ok(())
    }
}

/// Counts the rows flowing into a sink, for progress.
struct CountingSink<'s, S: RowSink> {
    inner: &'s mut S,
    rows: u64,
    progress: Option<&'s dyn SweepProgress>,
}

impl<'s, S: RowSink> CountingSink<'s, S> {
    fn new(inner: &'s mut S, progress: Option<&'s dyn SweepProgress>) -> Self {
        CountingSink {
            inner,
            rows: 0,
            progress,
        }
    }

    fn done(&self) {
        if let Some(p) = self.progress {
            p.rows_read(self.rows);
        }
    }
}

impl<S: RowSink> RowSink for CountingSink<'_, S> {
    fn count_state(&mut self, state: Option<&str>, n: u64) {
        self.inner.count_state(state, n);
    }

    fn observe(&mut self, row: &SessionRow) {
        self.inner.observe(row);
        self.rows += 1;
        if self.rows.is_multiple_of(10_000) {
            self.done();
        }
    }
}

/// The confirmation's answer.
enum Confirmed<'p> {
    /// The orphans definitively absent, with evidence.
    Rows(Vec<Downgrade<'p>>),
    /// The daemon's cache could not be proven fresh: list afresh and plan again.
    ListAfresh,
}

/// The evidence of an absence from a complete listing (rule 2(b)).
const LISTING_ABSENCE: &str = "absent from every page of a complete listing of every backend and namespace, started after the rows were read";

/// Confirms every orphan's absence with at most `concurrency` requests in flight; answers
/// come back in the orphans' order.
async fn confirm_all(
    cluster: &KubeCluster,
    orphans: &[OrphanedRow],
    concurrency: usize,
    progress: Option<&dyn SweepProgress>,
) -> Vec<(usize, Result<Absence, ClusterError>)> {
    // At most `concurrency` tasks exist at a time, so memory stays bounded however many
    // orphans there are; a finished answer makes room for the next request.
    let mut tasks = tokio::task::JoinSet::new();
    let mut pending = orphans.iter().enumerate();
    let mut answers = Vec::with_capacity(orphans.len());
    loop {
        while tasks.len() < concurrency.max(1) {
            let Some((i, row)) = pending.next() else {
                break;
            };
            let cluster = cluster.clone();
            let name = row.object.clone();
            let backend = row.backend;
            tasks.spawn(async move { (i, cluster.confirm_absent(&name, backend).await) });
        }
        match tasks.join_next().await {
            Some(Ok(answer)) => {
                answers.push(answer);
                if let Some(p) = progress {
                    p.confirmed(answers.len() as u64, orphans.len() as u64);
                }
            }
            Some(Err(e)) => tracing::error!("a confirming request task failed: {e}"),
            None => break,
        }
    }
    answers.sort_by_key(|(i, _)| *i);
    answers
}

fn change_line(d: &Downgrade<'_>) -> ChangeLine {
    ChangeLine {
        key: d.row.key.clone(),
        object: d.row.object.clone(),
        backend: d.row.backend,
        updated_at: d.row.updated_at,
        evidence: d.evidence["absence"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    }
}
