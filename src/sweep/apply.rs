//! Apply: the confirmed orphans written in whole batches (rules 4, 6 and 7), or, in a dry
//! run, listed as the changes that would be made.
//!
//! Each batch is one transaction (`store::apply_batch`) that re-checks every row as it was
//! read, downgrades it and writes its audit record; a row changed meanwhile is skipped, not
//! clobbered. Shutdown stops between batches, never inside one. A batch whose COMMIT got no
//! answer is counted as of unknown outcome and ends the sweep: the next sweep reads again.

use std::collections::HashSet;
use std::time::Instant;

use tokio::sync::watch;

use crate::plan::SkipReason;
use crate::store::{self, BatchOutcome, Downgrade, StoreError, TableMapping};

use super::{ChangeLine, Reconciler, SweepError, SweepReport, SweepResult};

impl Reconciler {
    /// Writes the confirmed orphans (a dry run only lists them), then counts the states as
    /// the sweep left the table.
    pub(super) async fn apply(
        &self,
        conn: &mut sqlx::PgConnection,
        mapping: &TableMapping,
        confirmed: &[Downgrade<'_>],
        shutdown: &watch::Receiver<bool>,
        report: &mut SweepReport,
    ) -> Result<SweepResult, SweepError> {
        if report.dry_run {
            report.changes = confirmed.iter().map(change_line).collect();
            return Ok(SweepResult::Success);
        }
        let t = Instant::now();
        let result = self
            .apply_batches(conn, mapping, confirmed, shutdown, report)
            .await;
        report.timings.apply = t.elapsed().as_secs_f64();
        report.count_downgrades(&mapping.suspended_state, &mapping.gone_state);
        result?;
        Ok(SweepResult::Success)
    }

    async fn apply_batches(
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
            record_batch(batch, &outcome, report);
        }
        Ok(())
    }
}

/// What one committed batch did, in the report and the log.
fn record_batch(batch: &[Downgrade<'_>], outcome: &BatchOutcome, report: &mut SweepReport) {
    report.skip(SkipReason::ChangedMeanwhile, outcome.skipped_changed as u64);
    let done: HashSet<&str> = outcome.downgraded.iter().map(String::as_str).collect();
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
