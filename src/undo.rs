//! `sandbox-reconciler undo`: reverse downgrades from their audit records.
//!
//! A downgrade is undone only for rows still exactly as the sweep left them (gone state, same
//! object, the `updated_at` the sweep wrote, cleared columns still NULL); rows the platform
//! has touched since are listed and left alone. State and cleared columns are restored with
//! their original types (`jsonb_populate_record` over the table's row type) and `updated_at`
//! is bumped, so the grace period protects the restored rows for a while. The undo takes the
//! writer lock, runs in one transaction and is itself audited (`action = 'undo'`, `undoes` =
//! the downgrade's audit id), so the same downgrade is never undone twice. `--dry-run` runs
//! the same transaction and rolls it back.

use std::fmt::Write;

use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::store::{self, Database, StoreError, TableMapping};

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
}

/// The outcome of an undo.
#[derive(Debug, Clone, Serialize)]
pub struct UndoReport {
    pub undo_id: uuid::Uuid,
    pub dry_run: bool,
    pub restored: usize,
    pub left_alone: usize,
    pub lines: Vec<UndoLine>,
}

/// Runs the undo (or its dry run).
pub async fn run(
    database: &Database,
    mapping: &TableMapping,
    request: &UndoRequest,
) -> Result<UndoReport, StoreError> {
    let mut conn = database.connect().await?;
    if !store::try_writer_lock(&mut conn, mapping).await? {
        return Err(StoreError::LockBusy {
            table: mapping.table_display(),
        });
    }
    store::migrate(&mut conn, mapping).await?;
    let undo_id = uuid::Uuid::new_v4();
    let q = |e: sqlx::Error| StoreError::Query {
        what: "undoing downgrades",
        message: e.to_string(),
    };
    let mut tx = conn.begin().await.map_err(q)?;
    let candidates = sqlx::query(AssertSqlSafe(mapping.undo_candidates_sql()))
        .bind(request.sweep)
        .bind(request.session.as_deref())
        .bind(mapping.table_display())
        .fetch_all(&mut *tx)
        .await
        .map_err(q)?;
    let mut undo = sqlx::query(AssertSqlSafe(mapping.undo_sql()))
        .bind(request.sweep)
        .bind(request.session.as_deref())
        .bind(mapping.table_display())
        .bind(undo_id);
    if let Some((_, value)) = &mapping.scope {
        undo = undo.bind(value);
    }
    let restored: Vec<String> = undo
        .fetch_all(&mut *tx)
        .await
        .map_err(q)?
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
    if request.dry_run {
        tx.rollback().await.map_err(q)?;
    } else {
        tx.commit().await.map_err(q)?;
    }
    let lines: Vec<UndoLine> = candidates
        .iter()
        .map(|r| {
            let key: String = r.get(0);
            UndoLine {
                restored: restored.contains(&key),
                key,
                object: r.get(1),
                restore_to: r.get(2),
                current_state: r.get(3),
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
        "undo {}{}: {} {verb}, {} left alone (changed since the downgrade)",
        r.undo_id,
        if r.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        },
        r.restored,
        r.left_alone
    );
    for l in &r.lines {
        let now = l.current_state.as_deref().unwrap_or("row deleted");
        if l.restored {
            let _ = writeln!(out, "  {verb:<13} {}  -> {}", l.key, l.restore_to);
        } else {
            let _ = writeln!(out, "  left alone    {}  (now {now})", l.key);
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
