//! `sandbox-reconciler undo`: reverse downgrades from their audit records.
//!
//! A downgrade is undone only for rows still exactly as the sweep left them (gone state, same
//! object, the `updated_at` the sweep wrote, cleared columns still NULL); rows the platform
//! has touched since are listed and left alone. State and cleared columns are restored with
//! their original types (`jsonb_populate_record` over the locked row) and `updated_at`
//! is bumped, so the grace period protects the restored rows for a while. Rows are matched by
//! their full identity (key, scope, and the conditions above) and changed by the physical row
//! the statement locked, so another scope's row with the same key is never touched.
//!
//! A row the application deleted since the downgrade (centaur deletes `gone` rows an hour
//! after `updated_at`) is inserted back from the audit record's `row_image`, the whole row as
//! the downgrade found it, with the old state and `updated_at` now, but only if no row with
//! that key (and scope) exists and the image fits the table as it is now (the same columns,
//! values of the columns' types); otherwise it is listed and left alone with the reason.
//! Generated columns are recomputed; identity columns keep the image's value.
//!
//! A real undo takes the writer lock (waiting up to `database.writer_lock_wait_seconds` for a
//! running daemon's sweep), runs in one transaction and is itself audited (`action = 'undo'`,
//! `undoes` = the downgrade's audit id), so the same downgrade is never undone twice.
//! `--dry-run` takes no lock, runs no DDL and writes nothing: one plain SELECT in a READ ONLY
//! transaction works out which rows are still as the downgrade left them (what would be
//! restored) and which are not (left alone), so it works beside a running daemon, fires no
//! trigger and waits for no row lock. A row the application holds locked is listed as one that
//! would be restored; the real undo skips it if it is still locked then.

use std::collections::HashSet;
use std::fmt::Write;

use serde::Serialize;

use crate::store::{self, Database, StoreError, TableMapping};

/// What an undo that finds the writer lock held says to do, after the table's name.
const BUSY_HINT: &str = " (a daemon's writer holds it; pause it first: set sweep.dry_run = true and roll it out, or scale it to 0 replicas; or raise database.writer_lock_wait_seconds)";

/// What to undo.
#[derive(Debug, Clone)]
pub struct UndoRequest {
    pub sweep: Option<uuid::Uuid>,
    pub session: Option<String>,
    pub dry_run: bool,
}

/// One downgrade considered for undo.
#[derive(Debug, Clone, Serialize)]
pub struct UndoLine {
    pub key: String,
    pub object: Option<String>,
    /// The state the row goes back to.
    pub restore_to: String,
    /// The row's state now (None: the row no longer exists).
    pub current_state: Option<String>,
    pub restored: bool,
    /// The row had been deleted and is (or would be) inserted back from its row image.
    pub inserted: bool,
    /// Why it is left alone, when the reason is not simply that the row changed.
    pub note: Option<String>,
}

/// The outcome of an undo.
#[derive(Debug, Clone, Serialize)]
pub struct UndoReport {
    pub undo_id: uuid::Uuid,
    pub dry_run: bool,
    pub restored: usize,
    pub left_alone: usize,
    /// Of the restored: rows inserted back from their row image.
    pub inserted: usize,
    /// Of those left alone: deleted rows whose record has no usable row image.
    pub unrestorable: usize,
    pub lines: Vec<UndoLine>,
}

/// Runs the undo (or its dry run).
pub async fn run(
    database: &Database,
    configured: &TableMapping,
    request: &UndoRequest,
    lock_wait: std::time::Duration,
) -> Result<UndoReport, StoreError> {
    let mut conn = database.connect().await?;
    let mapping = &store::resolve(&mut conn, configured).await?;
    let undo_id = uuid::Uuid::new_v4();
    if request.dry_run {
        if !crate::history::audit_table_exists(&mut conn, mapping).await? {
            return Ok(UndoReport {
                undo_id,
                dry_run: true,
                restored: 0,
                left_alone: 0,
                inserted: 0,
                unrestorable: 0,
                lines: Vec::new(),
            });
        }
    } else {
        store::wait_for_writer_lock(&mut conn, mapping, lock_wait, BUSY_HINT).await?;
        store::migrate(&mut conn, mapping).await?;
    }
    let selection = store::UndoSelection {
        sweep: request.sweep,
        session: request.session.as_deref(),
    };
    let (candidates, restored) = if request.dry_run {
        let candidates = store::preview_undo(&mut conn, mapping, selection).await?;
        let restorable = candidates
            .iter()
            .filter(|c| c.restorable || c.insert)
            .map(|c| c.key.clone())
            .collect();
        (candidates, restorable)
    } else {
        store::apply_undo(&mut conn, mapping, selection, undo_id).await?
    };
    let restored: HashSet<String> = restored.into_iter().collect();
    let lines: Vec<UndoLine> = candidates
        .into_iter()
        .map(|c| {
            let done = restored.contains(&c.key);
            UndoLine {
                restored: done,
                inserted: done && c.insert,
                note: c.unrestorable.clone(),
                key: c.key,
                object: c.object,
                restore_to: c.restore_to,
                current_state: c.current_state,
            }
        })
        .collect();
    for l in lines.iter().filter(|l| l.restored && !request.dry_run) {
        tracing::info!(undo_id = %undo_id, key = %l.key, state = %l.restore_to, "restored session");
    }
    Ok(UndoReport {
        undo_id,
        dry_run: request.dry_run,
        restored: lines.iter().filter(|l| l.restored).count(),
        left_alone: lines.iter().filter(|l| !l.restored).count(),
        inserted: lines.iter().filter(|l| l.inserted).count(),
        unrestorable: lines
            .iter()
            .filter(|l| !l.restored && l.note.is_some())
            .count(),
        lines,
    })
}

/// Text rendering of an undo report.
pub fn text(r: &UndoReport) -> String {
    let mut out = String::new();
    let verb = if r.dry_run {
        "would restore"
    } else {
        "restored"
    };
    let _ = writeln!(
        out,
        "undo {}{}: {} {verb}, {} left alone ({})",
        r.undo_id,
        if r.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        },
        r.restored,
        r.left_alone,
        if r.unrestorable > 0 {
            format!(
                "changed since the downgrade, or deleted without a usable row image: {}",
                r.unrestorable
            )
        } else {
            "changed since the downgrade".to_string()
        }
    );
    for l in &r.lines {
        let now = l.current_state.as_deref().unwrap_or("row deleted");
        if l.restored {
            let how = if l.inserted {
                "  (the row had been deleted: inserted back from its row image)"
            } else {
                ""
            };
            let _ = writeln!(out, "  {verb:<13} {}  -> {}{how}", l.key, l.restore_to);
        } else {
            let _ = writeln!(out, "  left alone    {}  (now {now})", l.key);
            if let Some(note) = &l.note {
                let _ = writeln!(out, "                {note}");
            }
        }
    }
    if r.restored > 0 && !r.dry_run {
        let _ = writeln!(
            out,
            "note: a sweep downgrades restored rows again once the grace period passes if their objects are still missing; set sweep.dry_run = true first if that is not wanted"
        );
    }
    out
}
