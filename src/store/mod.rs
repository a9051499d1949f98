//! The database side: read candidates, conditional downgrade, audit.
//!
//! All SQL touching the session table is generated from the validated, quoted identifiers of
//! [`TableMapping`]. Rows are streamed into the planner inside one REPEATABLE READ, READ ONLY
//! transaction so the counts are consistent. A downgrade is one statement per batch that locks
//! the rows still exactly as read (state, object name and `updated_at`; rows the application
//! holds are skipped, not waited for), updates them and writes their audit records, inside one
//! transaction: a batch is applied whole or not at all.
//!
//! One writer (docs/DESIGN.md, rule 8): the sweep runs on one dedicated connection that holds a
//! session-level advisory lock keyed by the session table's canonical name and scope (two
//! levels: the table's key, shared by scoped reconcilers, exclusive for an unscoped one; and
//! the scope's key). Reads and writes go through that same connection, and every writing
//! statement checks that its own server session holds the lock, so a write can never happen
//! under a lock that was lost or that a pooler left on another server session.
//!
//! Every call has a client-side deadline (`database.client_deadline_seconds`): after a
//! failover a half-open TCP connection never answers, and a sweep must fail rather than hang.
//! The server is asked to probe each connection with TCP keepalives, so the backend of a
//! reconciler that vanished ends and releases the writer lock.
//!
//! This file is the public face: [`StoreError`], [`within`] (the deadline of every call) and
//! the re-exports other modules use. The rest, one concern per file:
//!
//! - `connect`: [`Database`] (the vetted `database.url`, one dedicated connection with the
//!   reconciler's session settings), [`redact`], [`ping`], [`database_now`];
//! - `catalog`: [`resolve`], what the catalog says about the session table and whether it
//!   fits the configuration (columns, types, enum labels, unique key, pooler);
//! - `migrate`: [`migrate`], the audit table's own migrations;
//! - `lock`: the writer lock: [`try_writer_lock`], [`wait_for_writer_lock`],
//!   [`holds_writer_lock`], [`release_writer_lock`];
//! - `rows`: reading session rows ([`read_rows`], [`read_row`]) and writing them
//!   ([`apply_batch`], [`preview_undo`], [`apply_undo`]), with the checks every write passes;
//! - `mapping`: the configured table mapping and every SQL statement generated from it.

mod catalog;
mod connect;
mod lock;
pub mod mapping;
mod migrate;
mod rows;

use std::future::Future;
use std::time::Duration;

pub use catalog::resolve;
pub use connect::{database_now, ping, redact, Database};
pub use lock::{holds_writer_lock, release_writer_lock, try_writer_lock, wait_for_writer_lock};
pub use mapping::{ResolvedTable, Statement, TableMapping, UndoSelection};
pub use migrate::{migrate, migrations_lock_key};
pub use rows::{
    apply_batch, apply_undo, check_written, preview_undo, read_row, read_rows, BatchOutcome,
    Downgrade, UndoCandidate,
};

/// Why a database step failed. Messages never contain the connection password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database.url: {0}")]
    Url(String),
    #[error("cannot connect to PostgreSQL at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("table {table} does not exist; set sessions.table (or create the table)")]
    MissingTable { table: String },
    #[error("table {table} has no column {column}; set {key}")]
    MissingColumn {
        table: String,
        column: String,
        key: String,
    },
    /// The table does not fit the configuration; the message names the key to change.
    #[error("table {table}: {message}")]
    Unfit { table: String, message: String },
    #[error("{what}: {message}")]
    Query { what: &'static str, message: String },
    #[error("{what}: no answer from PostgreSQL within {seconds}s (database.client_deadline_seconds); the connection is dropped")]
    Deadline { what: &'static str, seconds: u64 },
    #[error("another sandbox-reconciler holds the writer lock for {table}; only one writer sweeps at a time")]
    LockBusy { table: String },
    /// A COMMIT got no answer (or its connection failed): it may or may not have taken effect.
    #[error("{what}: the outcome is unknown ({detail}): the COMMIT of {rows} row(s) may or may not have taken effect. Nothing is retried blindly: the next sweep re-reads the rows, and a row already changed is no longer a candidate; the audit table shows what was committed")]
    OutcomeUnknown {
        what: &'static str,
        rows: usize,
        detail: String,
    },
    /// A writing statement ran on a server session that does not hold the writer lock.
    #[error("{what}: this connection's PostgreSQL server session does not hold the writer lock for {table}, so the transaction was rolled back and nothing was written. The lock was lost, or a connection pooler moved this connection to another server session (PgBouncer in transaction or statement mode, or any pooler that shares server sessions between clients); connect database.url directly to PostgreSQL, or through a pooler in session mode that gives each client its own server session")]
    NotWriter { what: &'static str, table: String },
    /// The server session already holds the writer lock, which this connection never took.
    #[error("this connection's PostgreSQL server session already holds the writer lock for {table}, which this sandbox-reconciler has not taken: a connection pooler hands one server session to several clients, so two writers could share one lock; connect database.url directly to PostgreSQL, or through a pooler in session mode that gives each client its own server session")]
    LockShared { table: String },
}

impl StoreError {
    /// Whether this is a configuration error (the table or its columns do not fit the
    /// configuration): exit status 2, not a transient failure.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            StoreError::Url(_)
                | StoreError::MissingTable { .. }
                | StoreError::MissingColumn { .. }
                | StoreError::Unfit { .. }
        )
    }

    fn query(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
        move |e| StoreError::Query {
            what,
            message: e.to_string(),
        }
    }
}

/// Starts a read-only transaction that sees one snapshot of the database (every read of a
/// view, a row's trace, an undo preview and the audit records), within `deadline`.
pub async fn begin_snapshot_read<'c>(
    conn: &'c mut sqlx::PgConnection,
    deadline: Duration,
    what: &'static str,
) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, StoreError> {
    within(
        deadline,
        what,
        sqlx::Connection::begin_with(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
    )
    .await
}

/// Runs `fut` under a client-side deadline; a query error or no answer in time is an error
/// naming `what`.
pub async fn within<T>(
    deadline: Duration,
    what: &'static str,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(result) => result.map_err(StoreError::query(what)),
        Err(_) => Err(StoreError::Deadline {
            what,
            seconds: deadline.as_secs(),
        }),
    }
}
