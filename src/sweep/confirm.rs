//! Confirm: how the absence of each selected orphan's object is proven (rule 2) before any
//! write.
//!
//! The way is a value, [`ConfirmBy`], chosen by a pure function ([`choose`]) of where the view
//! came from, whether the daemon's cache is behind it, the settings, how many orphans there
//! are and how many may be confirmed by GETs; it is unit-tested below like `plan`. Each way
//! owns the sentence its audit evidence records and the words of the sweep's summary; the
//! report keeps the [`Confirmation`] it maps to, as it always has.
//!
//! Then the proof itself: a GET per orphan (rule 2(a)), the one-off listing the rows were read
//! before (2(b)), or the watch cache proven fresh (2(c)). When the cache cannot be proven
//! fresh the sweep plans again on a fresh listing (`Reconciler::replan_from_listing`) and
//! that listing is the proof ([`ConfirmBy::FreshListing`]).

use std::sync::Arc;
use std::time::Instant;

use crate::cluster::cache::ClusterCache;
use crate::cluster::{Absence, BackendKind, ClusterError, ClusterSnapshot, KubeCluster};
use crate::config::Confirm;
use crate::plan::{OrphanedRow, Plan, SkipReason};
use crate::progress::SweepProgress;
use crate::store::{Downgrade, TableMapping};

use super::{ClusterSource, Confirmation, Reconciler, SweepReport, SweepResult};

/// How the absence of the selected orphans' objects is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmBy {
    /// No orphan is selected: nothing to confirm.
    Nothing,
    /// The view is a snapshot file (always a dry run): absence from it is not confirmed.
    SnapshotFile,
    /// A one-off sweep with `sweep.confirmation = "none"`: absence from its view, not
    /// confirmed further.
    ListingOnly,
    /// A one-off sweep: the complete listing, started after the rows were read, that the plan
    /// was made on (rule 2(b)).
    CompleteListing,
    /// A direct GET per orphan answering 404 `NotFound` (rule 2(a)).
    Gets,
    /// The daemon's watch cache proven at least as fresh as a revision taken after the rows
    /// were read, every orphan checked again against it (rule 2(c)).
    ProvenCache,
    /// The cache could not be proven fresh: the rows read again, a fresh complete listing
    /// after them, the plan made again on it (rule 2(b)).
    FreshListing,
}

/// Where the sweep's view comes from, as far as confirming is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The Kubernetes API (a listing, or the daemon's cache fed by it).
    Api,
    /// A `kubectl get -o json` dump.
    SnapshotFile,
}

/// The way the absence of `orphans` selected orphans is proven. `cached`: the view is the
/// daemon's watch cache, which may lag the cluster, so its orphans are always confirmed;
/// `get_max`: `cluster.confirm_get_max`, the most orphans the daemon confirms by GETs.
pub fn choose(
    source: Source,
    cached: bool,
    setting: Confirm,
    orphans: usize,
    get_max: usize,
) -> ConfirmBy {
    match source {
        Source::SnapshotFile => ConfirmBy::SnapshotFile,
        Source::Api if setting == Confirm::None && !cached => ConfirmBy::ListingOnly,
        Source::Api if orphans == 0 => ConfirmBy::Nothing,
        Source::Api if setting == Confirm::Get => ConfirmBy::Gets,
        Source::Api if !cached => ConfirmBy::CompleteListing,
        Source::Api if orphans > get_max => ConfirmBy::ProvenCache,
        Source::Api => ConfirmBy::Gets,
    }
}

impl ConfirmBy {
    /// Every way, for tests and documentation.
    pub const ALL: [ConfirmBy; 7] = [
        ConfirmBy::Nothing,
        ConfirmBy::SnapshotFile,
        ConfirmBy::ListingOnly,
        ConfirmBy::CompleteListing,
        ConfirmBy::Gets,
        ConfirmBy::ProvenCache,
        ConfirmBy::FreshListing,
    ];

    /// The report's field for this way (a fresh listing is a listing).
    pub fn confirmation(self) -> Confirmation {
        match self {
            ConfirmBy::Nothing => Confirmation::None,
            ConfirmBy::SnapshotFile => Confirmation::SnapshotFile,
            ConfirmBy::ListingOnly => Confirmation::ListingOnly,
            ConfirmBy::CompleteListing | ConfirmBy::FreshListing => Confirmation::Listing,
            ConfirmBy::Gets => Confirmation::Get,
            ConfirmBy::ProvenCache => Confirmation::WatchCache,
        }
    }

    /// The way a report's field records (a listing reads the same, fresh or not).
    pub fn recorded(confirmation: Confirmation) -> ConfirmBy {
        match confirmation {
            Confirmation::None => ConfirmBy::Nothing,
            Confirmation::SnapshotFile => ConfirmBy::SnapshotFile,
            Confirmation::ListingOnly => ConfirmBy::ListingOnly,
            Confirmation::Listing => ConfirmBy::CompleteListing,
            Confirmation::Get => ConfirmBy::Gets,
            Confirmation::WatchCache => ConfirmBy::ProvenCache,
        }
    }

    /// The sentence the audit evidence records as `absence` for every orphan this way
    /// confirms at once. `None`: each orphan has its own (a GET's answer, from
    /// `KubeCluster::prove_absent_by_get`), or there is none to confirm.
    pub fn evidence(self) -> Option<&'static str> {
        match self {
            ConfirmBy::Nothing | ConfirmBy::Gets => None,
            ConfirmBy::SnapshotFile => Some("absent from the snapshot file (not confirmed)"),
            ConfirmBy::ListingOnly => {
                Some("absent from the sweep's view (sweep.confirmation = \"none\")")
            }
            ConfirmBy::CompleteListing | ConfirmBy::FreshListing => Some(LISTING_ABSENCE),
            ConfirmBy::ProvenCache => Some(
                "absent from the watch cache, proven at least as fresh as a revision taken after the rows were read",
            ),
        }
    }

    /// The summary's words for what was confirmed, from the report's figures.
    pub fn summary(self, r: &SweepReport) -> String {
        match self {
            // Nothing confirmed reads as no GET finding anything: "0 confirmed absent by GET".
            ConfirmBy::Gets | ConfirmBy::Nothing => {
                format!("{} confirmed absent by GET", r.confirmed)
            }
            ConfirmBy::CompleteListing | ConfirmBy::FreshListing => format!(
                "{} confirmed absent by a complete listing that started after the rows were read",
                r.confirmed
            ),
            ConfirmBy::ProvenCache => format!(
                "{} confirmed absent by the watch cache proven fresh ({} requests, {:.2}s waiting for it)",
                r.confirmed, r.confirmation_requests, r.timings.confirm_wait
            ),
            ConfirmBy::ListingOnly => "not confirmed (sweep.confirmation = \"none\")".to_string(),
            ConfirmBy::SnapshotFile => "not confirmed (snapshot file)".to_string(),
        }
    }

    /// The way taken when this way's proof does not come in time: the cache's proof gives
    /// way to a fresh listing; every other way proves, or leaves the orphan alone.
    pub fn unproven(self) -> ConfirmBy {
        match self {
            ConfirmBy::ProvenCache => ConfirmBy::FreshListing,
            other => other,
        }
    }

    /// Whether absence from the view the plan was made on is itself the proof, for every
    /// orphan at once (rule 2(b)).
    fn view_is_proof(self) -> bool {
        matches!(self, ConfirmBy::CompleteListing | ConfirmBy::FreshListing)
    }
}

/// The evidence of an absence from a complete listing (rule 2(b)).
const LISTING_ABSENCE: &str = "absent from every page of a complete listing of every backend and namespace, started after the rows were read";

/// The confirmation's answer.
pub(super) enum Confirmed<'p> {
    /// The orphans definitively absent, with evidence.
    Rows(Vec<Downgrade<'p>>),
    /// The daemon's cache could not be proven fresh: list afresh and plan again.
    ListAfresh,
}

impl Reconciler {
    /// The way this reconciler proves the absence of `orphans` selected orphans.
    pub(super) fn confirm_by(&self, orphans: usize) -> ConfirmBy {
        let source = match self.source {
            ClusterSource::Api(_) => Source::Api,
            ClusterSource::Dump(_) => Source::SnapshotFile,
        };
        choose(
            source,
            self.cache.is_some(),
            self.settings.sweep.confirmation,
            orphans,
            self.settings.cluster.confirm_get_max,
        )
    }

    /// Confirms each selected orphan; returns those definitively absent, with evidence, or
    /// that the daemon's cache could not be proven fresh and the sweep must list afresh.
    pub(super) async fn prove_absence<'p>(
        &self,
        orphans: &'p [OrphanedRow],
        snapshot: &ClusterSnapshot,
        mapping: &TableMapping,
        report: &mut SweepReport,
    ) -> Confirmed<'p> {
        let t = Instant::now();
        let by = self.confirm_by(orphans.len());
        let cluster_source = report.cluster_source.clone();
        let base = |absence: &str| self.evidence(absence, &cluster_source, snapshot, mapping);
        let confirmed = match (by, &self.source, &self.cache) {
            (ConfirmBy::Nothing, ..) => Confirmed::Rows(Vec::new()),
            (ConfirmBy::Gets, ClusterSource::Api(cluster), _) => {
                self.prove_by_gets(cluster, orphans, &base, report).await
            }
            (ConfirmBy::ProvenCache, ClusterSource::Api(cluster), Some(cache)) => {
                self.prove_by_fresh_cache(cluster, cache, orphans, &base, report)
                    .await
            }
            (ConfirmBy::Gets | ConfirmBy::ProvenCache, ..) => {
                // Not chosen without the API (and the cache); if it were, nothing is proven.
                report.skip(SkipReason::ConfirmFailed, orphans.len() as u64);
                Confirmed::Rows(Vec::new())
            }
            (by, ..) => {
                report.confirmation = by.confirmation();
                if by.view_is_proof() {
                    report.confirmed = orphans.len() as u64;
                }
                let evidence = Arc::new(base(by.evidence().unwrap_or_default()));
                Confirmed::Rows(all_with(orphans, &evidence))
            }
        };
        report.timings.confirm = t.elapsed().as_secs_f64();
        confirmed
    }

    /// A few orphans, or `sweep.confirmation = "get"`: a GET per orphan (rule 2(a)).
    async fn prove_by_gets<'p>(
        &self,
        cluster: &KubeCluster,
        orphans: &'p [OrphanedRow],
        base: &(dyn Fn(&str) -> serde_json::Value + Sync),
        report: &mut SweepReport,
    ) -> Confirmed<'p> {
        let answers = get_each_orphan(
            cluster,
            orphans,
            self.settings.cluster.confirm_concurrency,
            self.progress.as_deref(),
        )
        .await;
        let mut confirmed = Vec::with_capacity(orphans.len());
        report.confirmation = ConfirmBy::Gets.confirmation();
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
    async fn prove_by_fresh_cache<'p>(
        &self,
        cluster: &KubeCluster,
        cache: &ClusterCache,
        orphans: &'p [OrphanedRow],
        base: &(dyn Fn(&str) -> serde_json::Value + Sync),
        report: &mut SweepReport,
    ) -> Confirmed<'p> {
        let wait = self.settings.cluster.cache_fresh_wait;
        let waiting = Instant::now();
        let mut backends: Vec<BackendKind> = orphans.iter().map(|o| o.backend).collect();
        backends.sort();
        backends.dedup();
        let proof = cache.prove_fresh(cluster, wait, &backends).await;
        report.timings.confirm_wait = waiting.elapsed().as_secs_f64();
        match proof {
            Ok(Some(requests)) => {
                report.confirmation = ConfirmBy::ProvenCache.confirmation();
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
        let evidence = Arc::new(base(ConfirmBy::ProvenCache.evidence().unwrap_or_default()));
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

    /// After [`Confirmed::ListAfresh`]: the plan made on the fresh listing, guarded again, its
    /// orphans with that listing as the proof ([`ConfirmBy::FreshListing`]). `Err`: the
    /// sweep ends here with that result (refused by the guards).
    pub(super) fn fresh_listing_evidence<'p>(
        &self,
        replanned: Option<&'p (ClusterSnapshot, Plan)>,
        mapping: &TableMapping,
        report: &mut SweepReport,
    ) -> Result<Vec<Downgrade<'p>>, SweepResult> {
        let Some((listing, plan)) = replanned else {
            return Ok(Vec::new());
        };
        if let Some(refused) = report.refused_by(&plan.guard) {
            return Err(refused);
        }
        let by = ConfirmBy::ProvenCache.unproven();
        report.confirmation = by.confirmation();
        report.confirmed = plan.downgrades.len() as u64;
        let evidence = Arc::new(self.evidence(
            by.evidence().unwrap_or_default(),
            &report.cluster_source,
            listing,
            mapping,
        ));
        Ok(all_with(&plan.downgrades, &evidence))
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
            // The database's clock when the view was taken (the audit records' key since
            // their first version).
            "listing_started_at": snapshot.database_clock,
            "grace_period_seconds": self.settings.sweep.grace_period.as_secs(),
        })
    }
}

/// Every orphan, sharing one evidence document.
fn all_with<'p>(
    orphans: &'p [OrphanedRow],
    evidence: &Arc<serde_json::Value>,
) -> Vec<Downgrade<'p>> {
    orphans
        .iter()
        .map(|row| Downgrade {
            row,
            evidence: evidence.clone(),
        })
        .collect()
}

/// Confirms every orphan's absence with at most `concurrency` requests in flight; answers
/// come back in the orphans' order.
async fn get_each_orphan(
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
            tasks.spawn(async move { (i, cluster.prove_absent_by_get(&name, backend).await) });
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

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: Confirm = Confirm::Auto;
    const GET: Confirm = Confirm::Get;
    const UNCONFIRMED: Confirm = Confirm::None;

    #[test]
    fn a_one_off_listing_is_the_proof() {
        assert_eq!(
            choose(Source::Api, false, AUTO, 5_000, 100),
            ConfirmBy::CompleteListing
        );
        assert_eq!(
            choose(Source::Api, false, AUTO, 1, 100),
            ConfirmBy::CompleteListing
        );
    }

    #[test]
    fn no_orphans_need_no_proof() {
        assert_eq!(choose(Source::Api, false, AUTO, 0, 100), ConfirmBy::Nothing);
        assert_eq!(choose(Source::Api, true, AUTO, 0, 100), ConfirmBy::Nothing);
        assert_eq!(choose(Source::Api, true, GET, 0, 100), ConfirmBy::Nothing);
    }

    #[test]
    fn confirmation_none_leaves_a_one_off_sweep_unconfirmed() {
        assert_eq!(
            choose(Source::Api, false, UNCONFIRMED, 10, 100),
            ConfirmBy::ListingOnly
        );
        // Even with no orphans: the report says the view went unconfirmed.
        assert_eq!(
            choose(Source::Api, false, UNCONFIRMED, 0, 100),
            ConfirmBy::ListingOnly
        );
    }

    #[test]
    fn the_daemons_cache_is_always_confirmed() {
        // confirmation = "none" does not apply to a cache, which may lag the cluster.
        assert_eq!(
            choose(Source::Api, true, UNCONFIRMED, 10, 100),
            ConfirmBy::Gets
        );
        assert_eq!(
            choose(Source::Api, true, UNCONFIRMED, 101, 100),
            ConfirmBy::ProvenCache
        );
    }

    #[test]
    fn a_snapshot_file_is_never_confirmed() {
        for (cached, setting, orphans) in [
            (false, AUTO, 0),
            (false, AUTO, 10),
            (false, GET, 10),
            (false, UNCONFIRMED, 10),
            (true, AUTO, 1_000),
        ] {
            assert_eq!(
                choose(Source::SnapshotFile, cached, setting, orphans, 100),
                ConfirmBy::SnapshotFile
            );
        }
    }

    #[test]
    fn the_daemon_confirms_a_few_by_get_and_many_by_the_proven_cache() {
        assert_eq!(choose(Source::Api, true, AUTO, 1, 100), ConfirmBy::Gets);
        assert_eq!(choose(Source::Api, true, AUTO, 100, 100), ConfirmBy::Gets);
        assert_eq!(
            choose(Source::Api, true, AUTO, 101, 100),
            ConfirmBy::ProvenCache
        );
        assert_eq!(
            choose(Source::Api, true, AUTO, 1, 0),
            ConfirmBy::ProvenCache
        );
    }

    #[test]
    fn confirmation_get_means_a_get_per_orphan_always() {
        assert_eq!(choose(Source::Api, true, GET, 1, 100), ConfirmBy::Gets);
        assert_eq!(
            choose(Source::Api, true, GET, 100_000, 100),
            ConfirmBy::Gets
        );
        assert_eq!(
            choose(Source::Api, false, GET, 100_000, 100),
            ConfirmBy::Gets
        );
    }

    #[test]
    fn each_way_maps_to_its_report_field_and_back() {
        for by in ConfirmBy::ALL {
            let back = ConfirmBy::recorded(by.confirmation());
            assert_eq!(back.confirmation(), by.confirmation(), "{by:?}");
            // The report's words depend only on the field it keeps.
            let r = report(by);
            assert_eq!(back.summary(&r), by.summary(&r), "{by:?}");
        }
        assert_eq!(
            ConfirmBy::FreshListing.confirmation(),
            Confirmation::Listing
        );
        assert_eq!(
            ConfirmBy::CompleteListing.confirmation(),
            Confirmation::Listing
        );
        assert_eq!(ConfirmBy::Nothing.confirmation(), Confirmation::None);
    }

    #[test]
    fn an_unproven_cache_falls_back_to_a_fresh_listing() {
        assert_eq!(ConfirmBy::ProvenCache.unproven(), ConfirmBy::FreshListing);
        for by in ConfirmBy::ALL {
            if by != ConfirmBy::ProvenCache {
                assert_eq!(by.unproven(), by, "{by:?}");
            }
        }
    }

    #[test]
    fn a_fresh_listing_proves_what_a_one_off_listing_proves() {
        assert_eq!(
            ConfirmBy::FreshListing.evidence(),
            ConfirmBy::CompleteListing.evidence()
        );
        assert!(ConfirmBy::FreshListing.view_is_proof());
        assert!(ConfirmBy::CompleteListing.view_is_proof());
        for by in [
            ConfirmBy::Nothing,
            ConfirmBy::SnapshotFile,
            ConfirmBy::ListingOnly,
            ConfirmBy::Gets,
            ConfirmBy::ProvenCache,
        ] {
            assert!(!by.view_is_proof(), "{by:?}");
        }
    }

    #[test]
    fn each_way_has_its_evidence_sentence() {
        assert_eq!(ConfirmBy::Gets.evidence(), None);
        assert_eq!(ConfirmBy::Nothing.evidence(), None);
        assert_eq!(
            ConfirmBy::SnapshotFile.evidence(),
            Some("absent from the snapshot file (not confirmed)")
        );
        assert_eq!(
            ConfirmBy::ListingOnly.evidence(),
            Some("absent from the sweep's view (sweep.confirmation = \"none\")")
        );
        assert_eq!(ConfirmBy::CompleteListing.evidence(), Some(LISTING_ABSENCE));
        assert_eq!(
            ConfirmBy::ProvenCache.evidence(),
            Some("absent from the watch cache, proven at least as fresh as a revision taken after the rows were read")
        );
    }

    #[test]
    fn each_way_has_its_summary_wording() {
        let summary = |by: ConfirmBy| by.summary(&report(by));
        assert_eq!(summary(ConfirmBy::Gets), "3 confirmed absent by GET");
        assert_eq!(summary(ConfirmBy::Nothing), "3 confirmed absent by GET");
        assert_eq!(
            summary(ConfirmBy::CompleteListing),
            "3 confirmed absent by a complete listing that started after the rows were read"
        );
        assert_eq!(
            summary(ConfirmBy::FreshListing),
            "3 confirmed absent by a complete listing that started after the rows were read"
        );
        assert_eq!(
            summary(ConfirmBy::ProvenCache),
            "3 confirmed absent by the watch cache proven fresh (7 requests, 1.25s waiting for it)"
        );
        assert_eq!(
            summary(ConfirmBy::ListingOnly),
            "not confirmed (sweep.confirmation = \"none\")"
        );
        assert_eq!(
            summary(ConfirmBy::SnapshotFile),
            "not confirmed (snapshot file)"
        );
    }

    fn report(by: ConfirmBy) -> SweepReport {
        let mut r = SweepReport::new(true, "api".into());
        r.confirmation = by.confirmation();
        r.confirmed = 3;
        r.confirmation_requests = 7;
        r.timings.confirm_wait = 1.25;
        r
    }
}
