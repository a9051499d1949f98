//! Session rows: read in one consistent snapshot, and written (downgrades, undos) in one
//! statement per transaction that the writer lock and [`check_written`] guard.

use std::collections::HashSet;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{AssertSqlSafe, Connection, FromRow, Row};

use super::catalog::table_columns;
use super::mapping::{DowngradeBatch, UndoSelection};
use super::{begin_snapshot_read, within, StoreError, TableMapping};
use crate::plan::{OrphanedRow, RowSink, SessionRow};
use crate::sql::Identifier;

/// Commits a writing transaction of `rows` changed rows under the client deadline. A COMMIT
/// the server refused (a deferred constraint, a serialization failure) rolled back; one that
/// got no answer in time, or whose connection failed, may have committed all the same:
/// [`StoreError::OutcomeUnknown`], never "nothing written".
async fn commit_writes(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    deadline: Duration,
    what: &'static str,
    rows: usize,
) -> Result<(), StoreError> {
    let unknown = |detail: String| StoreError::OutcomeUnknown { what, rows, detail };
    match tokio::time::timeout(deadline, tx.commit()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e @ sqlx::Error::Database(_))) => Err(StoreError::Query {
            what,
            message: format!("{e}; rolled back, nothing was written"),
        }),
        Ok(Err(e)) => Err(unknown(format!("the connection failed during COMMIT: {e}"))),
        Err(_) => Err(unknown(format!(
            "no answer from PostgreSQL within {}s (database.client_deadline_seconds)",
            deadline.as_secs()
        ))),
    }
}

/// Streams the rows into `planner` from one consistent snapshot of the table. Rows in the
/// gone state are only counted (they claim no object).
pub async fn read_rows(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    planner: &mut impl RowSink,
) -> Result<(), StoreError> {
    let deadline = mapping.deadline;
    let mut tx = begin_snapshot_read(conn, deadline, "starting the read transaction").await?;
    let gone: i64 = within(
        deadline,
        "counting gone rows",
        mapping
            .count_gone()
            .try_map(|row: PgRow| row.try_get(0))
            .fetch_one(&mut *tx),
    )
    .await?;
    planner.count_state(Some(&mapping.gone_state), gone as u64);

    let mut stream = mapping.select_rows().fetch(&mut *tx);
    // The deadline applies to each wait for the next row: a long table streams for as long
    // as rows keep coming, a connection that stops answering fails.
    while let Some(row) = within(deadline, "reading session rows", stream.try_next()).await? {
        planner.observe(&decode_row(&row));
    }
    drop(stream);
    within(deadline, "ending the read transaction", tx.commit()).await
}

/// One row by its key (in the scope), in a READ ONLY transaction; `None` when there is none.
pub async fn read_row(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    key: &str,
) -> Result<Option<SessionRow>, StoreError> {
    let deadline = mapping.deadline;
    let what = "reading the session row";
    let mut tx = begin_snapshot_read(conn, deadline, what).await?;
    let row = within(
        deadline,
        what,
        mapping.select_row(key).fetch_optional(&mut *tx),
    )
    .await?;
    within(deadline, what, tx.commit()).await?;
    Ok(row.as_ref().map(decode_row))
}

fn decode_row(row: &PgRow) -> SessionRow {
    SessionRow {
        key: row
            .try_get::<Option<String>, _>(0)
            .ok()
            .flatten()
            .unwrap_or_default(),
        state: row.try_get(1).ok().flatten(),
        object: row.try_get(2).ok().flatten(),
        updated_at: row.try_get(3).ok().flatten(),
    }
}

/// The check after every writing statement: each row it locked was updated and audited, and
/// each planned key changed at most once. Anything else means the statement touched rows it
/// was not asked to (or skipped an audit record), and the transaction must not commit.
pub fn check_written(
    what: &'static str,
    planned: &HashSet<&str>,
    locked: i64,
    updated: i64,
    audited: &[String],
) -> Result<(), StoreError> {
    let unique: HashSet<&str> = audited.iter().map(String::as_str).collect();
    let consistent = locked == updated
        && usize::try_from(updated).is_ok_and(|n| n == audited.len())
        && unique.len() == audited.len()
        && unique.is_subset(planned);
    if consistent {
        return Ok(());
    }
    Err(StoreError::Query {
        what,
        message: format!(
            "the statement locked {locked} rows, updated {updated} and audited {} ({} distinct keys) for {} planned keys; rolled back, nothing was written. The session table may have rows the reconciler cannot tell apart (a key that is not unique): check sessions.key_column and sessions.scope_column",
            audited.len(),
            unique.len(),
            planned.len()
        ),
    })
}

/// The writing statement's own proof that its server session holds the writer lock; without
/// it the statement wrote nothing, and the transaction is rolled back all the same.
fn writer_proof(what: &'static str, mapping: &TableMapping, held: bool) -> Result<(), StoreError> {
    if held {
        return Ok(());
    }
    tracing::error!(
        table = %mapping.table_display(),
        "{what}: the server session does not hold the writer lock; rolled back, nothing written"
    );
    Err(StoreError::NotWriter {
        what,
        table: mapping.table_display(),
    })
}

/// Rolls `tx` back after a failed check (a connection that fails here has lost the
/// transaction anyway: the server rolls it back).
async fn rollback(tx: sqlx::Transaction<'_, sqlx::Postgres>, deadline: Duration) {
    if let Err(e) = within(deadline, "rolling back", tx.rollback()).await {
        tracing::warn!(error = %e, "rolling back failed; the server rolls back when the connection ends");
    }
}

/// One orphan ready to be written, with its confirmation evidence.
#[derive(Debug, Clone)]
pub struct Downgrade<'a> {
    pub row: &'a OrphanedRow,
    /// Shared by every row a listing or the cache confirmed at once, so that a clean-up of
    /// 100,000 rows builds and serialises it once per batch, not once per row.
    pub evidence: std::sync::Arc<serde_json::Value>,
}

/// What one batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    /// Keys downgraded (and audited).
    pub downgraded: Vec<String>,
    /// Rows not downgraded because they changed or were locked since they were read.
    pub skipped_changed: usize,
}

/// The batch as the downgrade statement takes it: one array per column, and each distinct
/// evidence document once (rows confirmed together share one) with, per row, its 1-based index.
fn batch_columns<'a>(sweep_id: uuid::Uuid, batch: &'a [Downgrade<'_>]) -> DowngradeBatch<'a> {
    let mut documents: Vec<String> = Vec::new();
    let mut evidence_of: Vec<i32> = Vec::with_capacity(batch.len());
    for (i, d) in batch.iter().enumerate() {
        let shared = i > 0 && std::sync::Arc::ptr_eq(&batch[i - 1].evidence, &d.evidence);
        if !shared {
            documents.push(d.evidence.to_string());
        }
        evidence_of.push(documents.len() as i32);
    }
    DowngradeBatch {
        keys: batch.iter().map(|d| d.row.key.as_str()).collect(),
        objects: batch.iter().map(|d| d.row.object.as_str()).collect(),
        updated_at: batch.iter().map(|d| d.row.updated_at).collect(),
        backends: batch.iter().map(|d| d.row.backend.as_str()).collect(),
        evidence_of,
        documents,
        sweep_id,
    }
}

/// Downgrades one batch in one transaction: only rows still exactly as read are changed,
/// each with its audit record.
pub async fn apply_batch(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    sweep_id: uuid::Uuid,
    batch: &[Downgrade<'_>],
) -> Result<BatchOutcome, StoreError> {
    let columns = batch_columns(sweep_id, batch);
    let deadline = mapping.deadline;
    let mut tx = within(deadline, "starting the apply transaction", conn.begin()).await?;
    let (held, locked, updated, downgraded): (bool, i64, i64, Vec<String>) = within(
        deadline,
        "downgrading a batch",
        mapping
            .downgrade(&columns)
            .try_map(|row: PgRow| FromRow::from_row(&row))
            .fetch_one(&mut *tx),
    )
    .await?;
    let planned: HashSet<&str> = columns.keys.iter().copied().collect();
    let checked = writer_proof("downgrading a batch", mapping, held).and_then(|()| {
        check_written(
            "downgrading a batch",
            &planned,
            locked,
            updated,
            &downgraded,
        )
    });
    if let Err(e) = checked {
        rollback(tx, deadline).await;
        return Err(e);
    }
    commit_writes(tx, deadline, "committing a batch", downgraded.len()).await?;
    Ok(BatchOutcome {
        skipped_changed: batch.len().saturating_sub(downgraded.len()),
        downgraded,
    })
}

/// One downgrade an undo considers, with its row as it is now.
#[derive(Debug, Clone)]
pub struct UndoCandidate {
    pub key: String,
    pub object: Option<String>,
    /// The state the row goes back to.
    pub restore_to: String,
    /// The row's state now (None: the row no longer exists).
    pub current_state: Option<String>,
    /// The row is still exactly as the downgrade left it, so an undo restores it (unless the
    /// application holds it locked at that moment: an undo skips locked rows).
    pub restorable: bool,
    /// The row no longer exists and its record's row image fits the table: an undo inserts it
    /// back (unless a row with that key is inserted first).
    pub insert: bool,
    /// Why a deleted row cannot be inserted back (no row image, or an image that does not fit
    /// the table as it is now); the candidate is listed and left alone.
    pub unrestorable: Option<String>,
    /// The downgrade's audit record id.
    pub audit_id: i64,
    /// The record's row image, read only for a row that no longer exists.
    row_image: Option<serde_json::Value>,
}

async fn undo_candidates(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    selection: UndoSelection<'_>,
) -> Result<Vec<UndoCandidate>, StoreError> {
    let rows = within(
        mapping.deadline,
        "reading the downgrades to undo",
        mapping.undo_candidates(selection).fetch_all(&mut *conn),
    )
    .await?;
    let mut candidates = rows
        .iter()
        .map(|r| {
            Ok(UndoCandidate {
                key: r.try_get(0)?,
                object: r.try_get(1)?,
                restore_to: r.try_get(2)?,
                current_state: r.try_get(3)?,
                restorable: r.try_get(5)?,
                row_image: r.try_get(6)?,
                audit_id: r.try_get(7)?,
                insert: false,
                unrestorable: None,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::query("reading the downgrades to undo"))?;
    if candidates.iter().any(|c| c.current_state.is_none()) {
        let columns = table_columns(conn, mapping).await?;
        for c in candidates.iter_mut().filter(|c| c.current_state.is_none()) {
            match image_fits(conn, mapping, &columns, c).await? {
                Ok(()) => c.insert = true,
                Err(why) => {
                    tracing::warn!(key = %c.key, audit_id = c.audit_id, "left alone: {why}");
                    c.unrestorable = Some(why);
                }
            }
        }
    }
    Ok(candidates)
}

/// Whether a deleted row can be inserted back from its record's image: the image is a JSON
/// object with exactly the table's columns now (a column added or dropped since means the
/// image no longer says what the row should be), it names the same key (and scope), and
/// PostgreSQL reads every value as its column's type (checked by a SELECT inside a savepoint,
/// so a bad image fails alone). `Err(why)` for the operator; the candidate is left alone.
async fn image_fits(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    columns: &[(String, bool)],
    candidate: &UndoCandidate,
) -> Result<Result<(), String>, StoreError> {
    let Some(image) = &candidate.row_image else {
        return Ok(Err(
            "the row was deleted and its audit record keeps no row image (written before the row image was recorded): restore it by hand from the audit record".into(),
        ));
    };
    let Some(fields) = image.as_object() else {
        return Ok(Err(format!(
            "the row was deleted and its audit record's row image is not a JSON object (audit id {}); restore it by hand",
            candidate.audit_id
        )));
    };
    let mut have: Vec<&str> = fields.keys().map(String::as_str).collect();
    have.sort_unstable();
    let mut want: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
    want.sort_unstable();
    if have != want {
        let missing: Vec<&str> = want.iter().filter(|c| !have.contains(c)).copied().collect();
        let extra: Vec<&str> = have.iter().filter(|c| !want.contains(c)).copied().collect();
        return Ok(Err(format!(
            "the row was deleted and the table's columns changed since the downgrade (image lacks [{}], has no longer existing [{}]); restore it by hand from the audit record's row_image (audit id {})",
            missing.join(", "),
            extra.join(", "),
            candidate.audit_id
        )));
    }
    let as_text = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    if as_text(fields.get(mapping.key.name())).as_deref() != Some(candidate.key.as_str()) {
        return Ok(Err(format!(
            "the row image of audit id {} names another key; left alone",
            candidate.audit_id
        )));
    }
    if let Some((column, value)) = &mapping.scope {
        if as_text(fields.get(column.name())).as_deref() != Some(value.as_str()) {
            return Ok(Err(format!(
                "the row image of audit id {} belongs to another scope; left alone",
                candidate.audit_id
            )));
        }
    }
    let mut savepoint = within(mapping.deadline, "checking a row image", conn.begin()).await?;
    let check = format!(
        "SELECT 1 FROM jsonb_populate_record(NULL::{}, $1::jsonb)",
        mapping.table_sql()
    );
    let read = tokio::time::timeout(
        mapping.deadline,
        sqlx::query(AssertSqlSafe(check))
            .bind(image)
            .execute(&mut *savepoint),
    )
    .await
    .map_err(|_| StoreError::Deadline {
        what: "checking a row image",
        seconds: mapping.deadline.as_secs(),
    })?;
    rollback(savepoint, mapping.deadline).await;
    Ok(read.map(|_| ()).map_err(|e| {
        format!(
            "the row was deleted and its row image (audit id {}) does not read as the table's row ({e}); restore it by hand",
            candidate.audit_id
        )
    }))
}

/// The columns the selected downgrades cleared, from their audit records (not from today's
/// `sessions.clear_columns`, which may have changed since): each must be a column of the table
/// other than the mapped ones, else the undo stops with nothing written.
async fn cleared_columns(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    selection: UndoSelection<'_>,
) -> Result<Vec<Identifier>, StoreError> {
    let what = "reading the columns the downgrades cleared";
    let names: Vec<String> = within(
        mapping.deadline,
        what,
        mapping
            .cleared_columns(selection)
            .try_map(|row: PgRow| row.try_get(0))
            .fetch_all(&mut *conn),
    )
    .await?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let oid = mapping.resolved.as_ref().map_or(0, |r| i64::from(r.oid));
    let existing: Vec<String> = within(
        mapping.deadline,
        what,
        sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped AND attname = ANY($2)",
        )
        .bind(oid)
        .bind(&names)
        .fetch_all(&mut *conn),
    )
    .await?;
    let unfit = |message: String| StoreError::Unfit {
        table: mapping.table_display(),
        message,
    };
    names
        .iter()
        .map(|name| {
            if !mapping.restorable_column(name) || !existing.contains(name) {
                return Err(unfit(format!(
                    "an audit record cleared column {name:?}, which the table no longer has (or which is a mapped column); nothing was undone: restore those rows by hand from the audit records' cleared values"
                )));
            }
            Identifier::parse(name).map_err(|e| unfit(format!("audit record column {name:?}: {e}")))
        })
        .collect()
}

/// What an undo would do, read in one READ ONLY transaction: no row lock, no write, no
/// trigger fired, so it works beside a running writer and waits for no application lock.
pub async fn preview_undo(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    selection: UndoSelection<'_>,
) -> Result<Vec<UndoCandidate>, StoreError> {
    let deadline = mapping.deadline;
    let mut tx = begin_snapshot_read(conn, deadline, "starting the undo preview").await?;
    let candidates = undo_candidates(&mut tx, mapping, selection).await?;
    within(deadline, "ending the undo preview", tx.commit()).await?;
    Ok(candidates)
}

/// Undoes the selected downgrades in one transaction: rows still exactly as the downgrade
/// left them are restored, rows deleted since are inserted back from their row image (when it
/// fits the table, and no row with the key exists), and each is audited (`action = 'undo'`, `undo_id` as the sweep id); the
/// others are left alone. Returns every candidate and the keys restored.
pub async fn apply_undo(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    selection: UndoSelection<'_>,
    undo_id: uuid::Uuid,
) -> Result<(Vec<UndoCandidate>, Vec<String>), StoreError> {
    let deadline = mapping.deadline;
    let what = "undoing downgrades";
    let mut tx = within(deadline, what, conn.begin()).await?;
    let candidates = undo_candidates(&mut tx, mapping, selection).await?;
    let restore = match cleared_columns(&mut tx, mapping, selection).await {
        Ok(columns) => columns,
        Err(e) => {
            rollback(tx, deadline).await;
            return Err(e);
        }
    };
    let inserts: Vec<i64> = candidates
        .iter()
        .filter(|c| c.insert)
        .map(|c| c.audit_id)
        .collect();
    let insert_columns: Vec<Identifier> = if inserts.is_empty() {
        Vec::new()
    } else {
        table_columns(&mut tx, mapping)
            .await?
            .into_iter()
            .filter(|(_, generated)| !generated)
            .map(|(name, _)| {
                Identifier::parse(&name).map_err(|e| StoreError::Unfit {
                    table: mapping.table_display(),
                    message: format!("column {name:?}: {e}"),
                })
            })
            .collect::<Result<_, _>>()?
    };
    let (held, locked, updated, restored, inserted): (bool, i64, i64, Vec<String>, Vec<String>) =
        within(
            deadline,
            what,
            mapping
                .undo(&restore, &insert_columns, selection, undo_id, &inserts)
                .try_map(|row: PgRow| FromRow::from_row(&row))
                .fetch_one(&mut *tx),
        )
        .await?;
    let planned: HashSet<&str> = candidates.iter().map(|c| c.key.as_str()).collect();
    let checked = writer_proof(what, mapping, held)
        .and_then(|()| check_written(what, &planned, locked, updated, &restored));
    if let Err(e) = checked {
        rollback(tx, deadline).await;
        return Err(e);
    }
    commit_writes(tx, deadline, "committing the undo", restored.len()).await?;
    let mut candidates = candidates;
    for c in &mut candidates {
        // Inserted only if it was still missing when the statement ran.
        c.insert = c.insert && inserted.contains(&c.key);
    }
    Ok((candidates, restored))
}
