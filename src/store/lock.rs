//! The writer lock (docs/DESIGN.md, rule 8): taking it, waiting for it, checking it and
//! letting it go, on the writer's own connection.

use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::AssertSqlSafe;

use super::{within, StoreError, TableMapping};

/// Tries to take the writer lock on `conn`; `Ok(false)` when another session holds it.
///
/// The writer lock has two levels (docs/DESIGN.md, rule 8): every reconciler of a table takes
/// the table's key, a scoped one shared and then its scope's key exclusively, an unscoped one
/// the table's key exclusively. So two scopes write side by side, while an unscoped reconciler
/// (which writes every scope's rows) and a scoped one exclude each other. A server session
/// that already holds any of these keys is refused ([`StoreError::LockShared`]): this
/// connection never took them, so a pooler shares the server session with another client.
pub async fn try_writer_lock(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<bool, StoreError> {
    let taken: Option<bool> = within(
        mapping.deadline,
        "taking the writer lock",
        sqlx::query_scalar(AssertSqlSafe(mapping.try_writer_lock_sql())).fetch_one(conn),
    )
    .await?;
    taken.ok_or_else(|| StoreError::LockShared {
        table: mapping.table_display(),
    })
}

/// Releases the writer lock held by `conn`.
pub async fn release_writer_lock(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<(), StoreError> {
    within(
        mapping.deadline,
        "releasing the writer lock",
        sqlx::raw_sql(AssertSqlSafe(mapping.release_writer_lock_sql())).execute(conn),
    )
    .await
    .map(|_| ())
}

/// Whether the server session of `conn` holds the writer lock (every part, in its mode).
pub async fn holds_writer_lock(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<bool, StoreError> {
    within(
        mapping.deadline,
        "checking the writer lock",
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT {}",
            mapping.writer_lock_held_sql()
        )))
        .fetch_one(conn),
    )
    .await
}

/// How often a waiting writer asks for the lock again.
const LOCK_POLL: Duration = Duration::from_millis(250);

/// Takes the writer lock, waiting up to `wait` for the writer that holds it (a running sweep)
/// to finish; [`StoreError::LockBusy`] when it is still held then. `busy_hint` follows the
/// table's name in that error (what the caller's operator can do about it; empty for none).
pub async fn wait_for_writer_lock(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    wait: Duration,
    busy_hint: &str,
) -> Result<(), StoreError> {
    let deadline = Instant::now() + wait;
    let mut announced = false;
    while !try_writer_lock(conn, mapping).await? {
        if Instant::now() >= deadline {
            return Err(StoreError::LockBusy {
                table: format!("{}{busy_hint}", mapping.table_display()),
            });
        }
        if !announced {
            tracing::info!(
                "another sandbox-reconciler holds the writer lock; waiting up to {}s",
                wait.as_secs()
            );
            announced = true;
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
    Ok(())
}
