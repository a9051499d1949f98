//! View: everything a sweep looks at before it decides, in the order the rules ask for.
//!
//! The scope first (rule 10: the intended cluster, every configured namespace present), then
//! the clock (the database's, read before rows and cluster: the grace period compares rows'
//! `updated_at` with it, rule 3), then the rows and the cluster view, whose order depends on
//! where the view comes from:
//! - one-off: the rows first, then one complete listing, which is both the candidate set and,
//!   having started after the read, the proof of absence (rule 2(b));
//! - daemon: the watch cache (once synced, else a fresh listing), then the rows streamed into
//!   the planner; its orphans are confirmed afterwards (`confirm`);
//! - snapshot file: the file, then the rows streamed into the planner.
//!
//! Each ends as a `Plan` over a `ClusterSnapshot`. When the daemon's cache cannot be proven
//! fresh, [`Reconciler::replan_from_listing`] takes the one-off view over again.

use std::path::Path;
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::cluster::cache::ClusterCache;
use crate::cluster::{dump, ClusterSnapshot, KubeCluster, ScopeVerdict};
use crate::plan::{Plan, Planner, Policy, ReadRows, RowSink, SessionRow, SkipReason};
use crate::progress::SweepProgress;
use crate::store::{self, TableMapping};

use super::{ClusterSource, Reconciler, SweepError, SweepReport, SweepResult};

impl Reconciler {
    /// Rule 10: the intended cluster, every configured namespace present. `Some(result)`
    /// when the sweep must stop here (refused). A snapshot file has no scope to check.
    pub(super) async fn verify_scope(
        &self,
        report: &mut SweepReport,
    ) -> Result<Option<SweepResult>, SweepError> {
        let ClusterSource::Api(cluster) = &self.source else {
            return Ok(None);
        };
        report.cluster_server = cluster.origin().map(|o| o.server.clone());
        match cluster
            .verify_scope(self.settings.cluster.expected_uid)
            .await?
        {
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

    /// The grace period compares rows' updated_at, written by the database clock, with the
    /// moment the cluster was looked at: take that moment from the same clock, read before
    /// rows and listing (never later than either). A snapshot file carries its own.
    pub(super) async fn database_clock(
        &self,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
    ) -> Result<Option<DateTime<Utc>>, SweepError> {
        match &self.source {
            ClusterSource::Api(_) => Ok(Some(store::database_now(&mut *conn, mapping).await?)),
            ClusterSource::Dump(_) => Ok(None),
        }
    }

    /// The rows and the cluster view, in the order the source asks for, planned.
    pub(super) async fn view_and_plan(
        &self,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
        clock: Option<DateTime<Utc>>,
        policy: &Policy,
        report: &mut SweepReport,
    ) -> Result<(ClusterSnapshot, Plan), SweepError> {
        let cluster = match &self.source {
            ClusterSource::Api(cluster) => cluster,
            ClusterSource::Dump(path) => {
                return self.plan_on_file(path, conn, mapping, policy, report).await
            }
        };
        // Read by `database_clock` for every API source; read here only if it was not.
        let clock = match clock {
            Some(clock) => clock,
            None => store::database_now(&mut *conn, mapping).await?,
        };
        match &self.cache {
            Some(cache) => {
                let t = Instant::now();
                let mut snapshot = self.cached_view(cluster, cache, report).await?;
                report.timings.list_cluster = t.elapsed().as_secs_f64();
                snapshot.database_clock = clock;
                snapshot.cluster_uid = report.cluster_uid.clone();
                let plan = self
                    .plan_streaming(conn, mapping, &snapshot, policy, report)
                    .await?;
                Ok((snapshot, plan))
            }
            None => {
                // One-off: the rows first, then one complete listing, which is both the
                // candidate set and, having started after the read, the proof of absence
                // (rule 2(b)).
                let t = Instant::now();
                let rows = self.read_rows(conn, mapping).await?;
                report.timings.read_db = t.elapsed().as_secs_f64();
                let t = Instant::now();
                let mut snapshot = cluster.snapshot().await?;
                report.timings.list_cluster = t.elapsed().as_secs_f64();
                report.cluster_view = "listing".into();
                snapshot.database_clock = clock;
                snapshot.cluster_uid = report.cluster_uid.clone();
                let plan = replay(rows, &snapshot, policy);
                Ok((snapshot, plan))
            }
        }
    }

    /// A snapshot file: the file, then the rows streamed into the planner.
    async fn plan_on_file(
        &self,
        path: &Path,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
        policy: &Policy,
        report: &mut SweepReport,
    ) -> Result<(ClusterSnapshot, Plan), SweepError> {
        let t = Instant::now();
        let snapshot = dump::load(path, &self.settings)?;
        report.timings.list_cluster = t.elapsed().as_secs_f64();
        report.cluster_view = "snapshot file".into();
        let plan = self
            .plan_streaming(conn, mapping, &snapshot, policy, report)
            .await?;
        Ok((snapshot, plan))
    }

    /// The daemon's view: the watch cache once synced (waiting a bounded time), else a fresh
    /// complete listing. An unsynced cache is never taken for the cluster.
    async fn cached_view(
        &self,
        cluster: &KubeCluster,
        cache: &ClusterCache,
        report: &mut SweepReport,
    ) -> Result<ClusterSnapshot, SweepError> {
        let wait = self.settings.cluster.cache_sync_wait;
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

    /// Every row, kept to be planned on a listing that starts after the read.
    async fn read_rows(
        &self,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
    ) -> Result<ReadRows, SweepError> {
        let mut rows = ReadRows::default();
        let mut counting = CountingSink::new(&mut rows, self.progress.as_deref());
        store::read_rows(&mut *conn, mapping, &mut counting).await?;
        counting.done();
        Ok(rows)
    }

    /// The daemon's cache could not be proven fresh: the sweep starts its view over the way a
    /// one-off sweep does. It reads the rows again, then lists every backend completely
    /// ([`ClusterCache::list_afresh`], which also reseeds every informer behind that
    /// listing), and plans on that listing as its whole view: it is the candidate set, so
    /// orphans the stale cache hid are found too, and, having started after the rows were
    /// read, the proof of absence for all of them (rule 2(b)). `Ok(None)`: the listing
    /// failed and the orphans are left alone.
    pub(super) async fn replan_from_listing(
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
        let rows = self.read_rows(conn, mapping).await?;
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
        listing.database_clock = database_clock;
        listing.cluster_uid = report.cluster_uid.clone();
        let plan = replay(rows, &listing, policy);
        // The report describes the view the sweep acts on: the listing's.
        report.skipped.clear();
        report.backends.clear();
        report.absorb_plan(&plan, &listing);
        report.cluster_view = "listing (watch cache not proven fresh)".into();
        Ok(Some((listing, plan)))
    }
}

/// The rows read before `snapshot` was listed, planned on it.
fn replay(rows: ReadRows, snapshot: &ClusterSnapshot, policy: &Policy) -> Plan {
    let mut planner = Planner::new(snapshot, policy);
    rows.replay(&mut planner);
    drop(rows);
    planner.finish()
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

    fn progress(&self) {
        if let Some(p) = self.progress {
            p.rows_read(self.rows);
        }
    }

    fn done(&self) {
        if let Some(p) = self.progress {
            p.rows_done(self.rows);
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
            self.progress();
        }
    }
}
