//! The database side: read candidates, conditional downgrade, audit.
//!
//! All SQL touching the session table is generated here from the validated, quoted
//! identifiers of [`TableMapping`]. Rows are streamed into the planner inside one
//! REPEATABLE READ, READ ONLY transaction so the counts are consistent. A downgrade is one
//! statement per batch that locks the rows still exactly as read (state, object name and
//! `updated_at`; rows the application holds are skipped, not waited for), updates them and
//! writes their audit records, inside one transaction: a batch is applied whole or not at all.
//!
//! One writer (DESIGN.md rule 8): the sweep runs on one dedicated connection that holds a
//! session-level advisory lock keyed by the session table and scope. Reads and writes go
//! through that same connection, so if it is lost the lock is lost with it and no further
//! write can happen under a lock that is no longer held.

pub mod mapping;

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row, SqlSafeStr};

use crate::config::Settings;
use crate::plan::{OrphanedRow, Planner, SessionRow};
pub use mapping::TableMapping;

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
    #[error("{what}: {message}")]
    Query { what: &'static str, message: String },
    #[error("another sandbox-reconciler holds the writer lock for {table}; only one writer sweeps at a time")]
    LockBusy { table: String },
}

impl StoreError {
    fn query(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
        move |e| StoreError::Query {
            what,
            message: e.to_string(),
        }
    }
}

/// Connection settings derived from configuration.
#[derive(Clone)]
pub struct Database {
    options: PgConnectOptions,
    target: String,
    connect_timeout: Duration,
    statement_timeout: Duration,
    lock_timeout: Duration,
}

impl Database {
    pub fn new(settings: &Settings) -> Result<Database, StoreError> {
        let d = &settings.database;
        let options: PgConnectOptions = d
            .url
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Url(redact(&e.to_string(), &d.url)))?;
        let options = options
            .application_name("sandbox-reconciler")
            .log_statements(tracing::log::LevelFilter::Debug);
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        Ok(Database {
            options,
            target,
            connect_timeout: Duration::from_secs(d.connect_timeout_seconds.max(1)),
            statement_timeout: Duration::from_secs(d.statement_timeout_seconds),
            lock_timeout: Duration::from_secs(d.lock_timeout_seconds),
        })
    }

    /// `host:port/database`, for messages (never the password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Opens one dedicated connection with the reconciler's timeouts.
    pub async fn connect(&self) -> Result<PgConnection, StoreError> {
        let connecting = PgConnection::connect_with(&self.options);
        let mut conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| StoreError::Connect {
                target: self.target.clone(),
                message: format!("no answer within {}s", self.connect_timeout.as_secs()),
            })?
            .map_err(|e| StoreError::Connect {
                target: self.target.clone(),
                message: e.to_string(),
            })?;
        let setup = format!(
            "SET statement_timeout = {}; SET lock_timeout = {}",
            self.statement_timeout.as_millis(),
            self.lock_timeout.as_millis()
        );
        sqlx::raw_sql(AssertSqlSafe(setup))
            .execute(&mut conn)
            .await
            .map_err(StoreError::query("setting timeouts"))?;
        Ok(conn)
    }
}

/// Removes the password of a `postgres://user:password@host/db` URL from `text`.
pub fn redact(text: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, pw)| pw)
        .filter(|pw| !pw.is_empty());
    match password {
        Some(pw) => text.replace(pw, "****"),
        None => text.to_string(),
    }
}

/// Runs the reconciler's own migrations (the audit table). Tracked in a table of its own
/// (`<audit.table>_migrations`), never the application's `_sqlx_migrations`.
pub async fn migrate(conn: &mut PgConnection, mapping: &TableMapping) -> Result<(), StoreError> {
    let name = mapping.audit.name();
    let render = |sql: &str| {
        sql.replace("{{audit}}", &mapping.audit.to_string())
            .replace("{{sweep_idx}}", &format!("\"{name}_sweep_idx\""))
            .replace("{{session_idx}}", &format!("\"{name}_session_idx\""))
            .replace("{{undoes_idx}}", &format!("\"{name}_undoes_idx\""))
    };
    let migrations = [
        (
            1,
            "audit table",
            include_str!("../../migrations/0001_audit.sql"),
        ),
        (
            2,
            "undo records",
            include_str!("../../migrations/0002_undo.sql"),
        ),
    ]
    .into_iter()
    .map(|(version, description, sql)| {
        sqlx::migrate::Migration::new(
            version,
            description.into(),
            sqlx::migrate::MigrationType::Simple,
            AssertSqlSafe(render(sql)).into_sql_str(),
            false,
        )
    })
    .collect();
    let mut migrator = sqlx::migrate::Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(mapping.audit.with_suffix("_migrations").to_string());
    // run_direct: the generic `run` trips "Acquire is not general enough" in spawned tasks.
    migrator
        .run_direct(None, conn, false)
        .await
        .map_err(|e| StoreError::Query {
            what: "running the audit-table migration",
            message: e.to_string(),
        })
}

/// The database server's clock (`clock_timestamp()`, not the transaction start).
pub async fn database_now(conn: &mut PgConnection) -> Result<DateTime<Utc>, StoreError> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(conn)
        .await
        .map_err(StoreError::query("reading the database clock"))
}

/// Tries to take the writer lock on `conn`; `Ok(false)` when another session holds it.
pub async fn try_writer_lock(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<bool, StoreError> {
    sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(mapping.lock_key())
        .fetch_one(conn)
        .await
        .map_err(StoreError::query("taking the writer lock"))
}

/// Releases the writer lock held by `conn`.
pub async fn release_writer_lock(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(mapping.lock_key())
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(StoreError::query("releasing the writer lock"))
}

/// Verifies that the table and every mapped column exist; names the config key otherwise.
pub async fn verify_table(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<(), StoreError> {
    let rows = sqlx::query(
        "SELECT a.attname::text FROM pg_attribute a \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(mapping.table.to_string())
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::query("reading the session table's columns"))?;
    if rows.is_empty() {
        return Err(StoreError::MissingTable {
            table: mapping.table_display(),
        });
    }
    let columns: Vec<String> = rows.iter().map(|r| r.get::<String, _>(0)).collect();
    for (key, column) in mapping.columns_with_keys() {
        if !columns.iter().any(|c| c == column) {
            return Err(StoreError::MissingColumn {
                table: mapping.table_display(),
                column: column.to_string(),
                key,
            });
        }
    }
    Ok(())
}

/// Streams the rows into `planner` from one consistent snapshot of the table. Rows in the
/// gone state are only counted (they claim no object).
pub async fn read_rows(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    planner: &mut Planner<'_>,
) -> Result<(), StoreError> {
    let mut tx = conn
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(StoreError::query("starting the read transaction"))?;
    let count_sql = mapping.count_gone_sql();
    let mut q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(count_sql)).bind(&mapping.gone_state);
    if let Some(scope) = &mapping.scope {
        q = q.bind(&scope.1);
    }
    let gone = q
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::query("counting gone rows"))?;
    planner.count_state(Some(&mapping.gone_state), gone as u64);

    let select_sql = mapping.select_rows_sql();
    let mut q = sqlx::query(AssertSqlSafe(select_sql)).bind(&mapping.gone_state);
    if let Some(scope) = &mapping.scope {
        q = q.bind(&scope.1);
    }
    let mut stream = q.fetch(&mut *tx);
    while let Some(row) = stream
        .try_next()
        .await
        .map_err(StoreError::query("reading session rows"))?
    {
        planner.observe(&decode_row(&row));
    }
    drop(stream);
    tx.commit()
        .await
        .map_err(StoreError::query("ending the read transaction"))?;
    Ok(())
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

/// One orphan ready to be written, with its confirmation evidence.
#[derive(Debug, Clone)]
pub struct Downgrade<'a> {
    pub row: &'a OrphanedRow,
    pub evidence: serde_json::Value,
}

/// What one batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    /// Keys downgraded (and audited).
    pub downgraded: Vec<String>,
    /// Rows not downgraded because they changed or were locked since they were read.
    pub skipped_changed: usize,
}

/// Downgrades one batch in one transaction: only rows still exactly as read are changed,
/// each with its audit record.
pub async fn apply_batch(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    sweep_id: uuid::Uuid,
    batch: &[Downgrade<'_>],
) -> Result<BatchOutcome, StoreError> {
    let keys: Vec<&str> = batch.iter().map(|d| d.row.key.as_str()).collect();
    let objects: Vec<&str> = batch.iter().map(|d| d.row.object.as_str()).collect();
    let updated: Vec<DateTime<Utc>> = batch.iter().map(|d| d.row.updated_at).collect();
    let backends: Vec<&str> = batch.iter().map(|d| d.row.backend.as_str()).collect();
    let evidence: Vec<String> = batch.iter().map(|d| d.evidence.to_string()).collect();
    let mut tx = conn
        .begin()
        .await
        .map_err(StoreError::query("starting the apply transaction"))?;
    let sql = mapping.downgrade_sql();
    let mut q = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql))
        .bind(&keys)
        .bind(&objects)
        .bind(&updated)
        .bind(&backends)
        .bind(&evidence)
        .bind(&mapping.suspended_state)
        .bind(&mapping.gone_state)
        .bind(sweep_id)
        .bind(mapping.table_display());
    if let Some(scope) = &mapping.scope {
        q = q.bind(&scope.1);
    }
    let downgraded = q
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::query("downgrading a batch"))?;
    tx.commit()
        .await
        .map_err(StoreError::query("committing a batch"))?;
    Ok(BatchOutcome {
        skipped_changed: batch.len() - downgraded.len(),
        downgraded,
    })
}
