//! The sweep summary printed by `--once`: text for people, JSON (`--output json`) for machines.

use std::fmt::Write;

use crate::plan::GuardVerdict;
use crate::sweep::{Confirmation, SweepReport, SweepResult};

/// At most this many changed rows are listed in the text summary (JSON lists all).
const TEXT_CHANGE_LINES: usize = 50;

/// Renders the report as JSON.
pub fn json(report: &SweepReport) -> String {
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// At most this many changed rows are listed by the daemon's `GET /last-sweep`.
pub const LAST_SWEEP_CHANGES: usize = 100;

/// The same document as `--once --output json`, with the change list capped at `cap` rows and
/// the cap stated (`changes_total`, `changes_cap`) and the command that shows the audit records
/// the sweep wrote (`history`), for the daemon's `GET /last-sweep`.
pub fn json_capped(report: &SweepReport, cap: usize) -> String {
    let total = report.changes.len();
    let mut value = serde_json::to_value(report).unwrap_or_default();
    if let Some(changes) = value.get_mut("changes").and_then(|c| c.as_array_mut()) {
        changes.truncate(cap);
    }
    if let Some(object) = value.as_object_mut() {
        object.insert("changes_total".into(), total.into());
        object.insert("changes_cap".into(), cap.into());
        // What to run for the audit records this sweep wrote.
        object.insert(
            "history".into(),
            format!("sandbox-reconciler history --sweep {}", report.sweep_id).into(),
        );
    }
    serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
}

/// Renders the report as a short text summary: what ran where, what it saw, what it
/// decided, how long it took, and the rows it changed.
pub fn text(r: &SweepReport) -> String {
    let mut out = String::new();
    header(&mut out, r);
    if r.result == SweepResult::Failed && r.rows_read == 0 {
        return out;
    }
    observations(&mut out, r);
    decisions(&mut out, r);
    changes(&mut out, r);
    out
}

/// The sweep, its result, the cluster and table it looked at, and the error if any.
fn header(out: &mut String, r: &SweepReport) {
    let mode = if r.dry_run {
        " (dry run: nothing written)"
    } else {
        ""
    };
    let _ = writeln!(out, "sweep {} {}{mode}", r.sweep_id, r.result.as_str());
    let identity = r
        .cluster_uid
        .as_ref()
        .map(|u| format!(" (cluster {u})"))
        .unwrap_or_default();
    let view = if r.cluster_view.is_empty() {
        String::new()
    } else {
        format!(", view: {}", r.cluster_view)
    };
    let _ = writeln!(out, "  cluster:  {}{identity}{view}", r.cluster_source);
    if let Some(table) = &r.table {
        let _ = writeln!(out, "  table:    {table}");
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "  error:    {e}");
    }
    if r.outcome_unknown_batches > 0 {
        let _ = writeln!(
            out,
            "  unknown:  {} batch(es) may or may not have been committed; see the audit records of sweep {}",
            r.outcome_unknown_batches, r.sweep_id
        );
    }
}

/// Rows by state and each backend's figures.
fn observations(out: &mut String, r: &SweepReport) {
    let states: Vec<String> = r
        .rows_by_state
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect();
    let _ = writeln!(
        out,
        "  rows:     {} read ({})",
        r.rows_read,
        states.join(", ")
    );
    for (backend, b) in &r.backends {
        let _ = writeln!(
            out,
            "  {backend}: {} objects ({} terminating, {} suspended), {} untracked, {} live rows without object, {} suspended rows with object, {} orphaned suspended rows",
            b.cluster_objects,
            b.terminating_objects,
            b.suspended_objects,
            b.untracked_objects,
            b.live_without_object,
            b.suspended_with_object,
            b.orphaned_suspended
        );
    }
}

/// The guard's verdict, the orphans and what became of them, skips and timings.
fn decisions(out: &mut String, r: &SweepReport) {
    match &r.guard {
        Some(GuardVerdict::Refuse { reason, detail }) => {
            let _ = writeln!(out, "  guard:    REFUSED ({}): {detail}", reason.as_str());
        }
        Some(GuardVerdict::Proceed) => {
            let _ = writeln!(out, "  guard:    ok");
        }
        None => {}
    }
    let confirmed = match r.confirmation {
        Confirmation::Get | Confirmation::None => {
            format!("{} confirmed absent by GET", r.confirmed)
        }
        Confirmation::Listing => format!(
            "{} confirmed absent by a complete listing that started after the rows were read",
            r.confirmed
        ),
        Confirmation::WatchCache => format!(
            "{} confirmed absent by the watch cache proven fresh ({} requests, {:.2}s waiting for it)",
            r.confirmed, r.confirmation_requests, r.timings.confirm_wait
        ),
        Confirmation::ListingOnly => "not confirmed (sweep.confirm_absence = false)".to_string(),
        Confirmation::SnapshotFile => "not confirmed (snapshot file)".to_string(),
    };
    let _ = writeln!(
        out,
        "  orphans:  {} found, {} within grace, {} selected, {confirmed}, {} {}, {} deferred",
        r.orphans_found,
        r.within_grace,
        r.selected,
        if r.dry_run {
            r.changes.len() as u64
        } else {
            r.downgraded
        },
        if r.dry_run {
            "would be downgraded"
        } else {
            "downgraded"
        },
        r.deferred
    );
    if !r.skipped.is_empty() {
        let skipped: Vec<String> = r
            .skipped
            .iter()
            .map(|(k, n)| format!("{}={n}", k.as_str()))
            .collect();
        let _ = writeln!(out, "  skipped:  {}", skipped.join(", "));
    }
    let t = &r.timings;
    let _ = writeln!(
        out,
        "  timings:  list_cluster {:.3}s, read_db {:.3}s, confirm {:.3}s, apply {:.3}s, total {:.3}s",
        t.list_cluster, t.read_db, t.confirm, t.apply, t.total
    );
}

/// The rows changed (or that would change), at most [`TEXT_CHANGE_LINES`] of them.
fn changes(out: &mut String, r: &SweepReport) {
    if !r.changes.is_empty() {
        let verb = if r.dry_run {
            "would downgrade"
        } else {
            "downgraded"
        };
        let _ = writeln!(out, "  {verb}:");
        for c in r.changes.iter().take(TEXT_CHANGE_LINES) {
            let _ = writeln!(
                out,
                "    {}  object={} backend={} updated_at={}",
                c.key,
                c.object,
                c.backend,
                c.updated_at.to_rfc3339()
            );
        }
        if r.changes.len() > TEXT_CHANGE_LINES {
            let _ = writeln!(
                out,
                "    ... and {} more (use --output json for all)",
                r.changes.len() - TEXT_CHANGE_LINES
            );
        }
    }
}
