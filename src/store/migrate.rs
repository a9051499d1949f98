//! The audit table's own migrations, run by the reconciler at start-up under a
//! transaction-level advisory lock.

use std::time::Instant;

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};

use super::{mapping, within, StoreError, TableMapping};

/// The audit table's migrations: version, description and SQL template. `{{audit}}` and the
/// `{{..._idx}}` names are filled in from `audit.table`; the checksum is taken of the
/// template, so it does not depend on how the table name was spelled.
const MIGRATIONS: [(i64, &str, &str); 4] = [
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
    (
        3,
        "row scope",
        include_str!("../../migrations/0003_scope.sql"),
    ),
    (
        4,
        "row image",
        include_str!("../../migrations/0004_row_image.sql"),
    ),
];

/// The transaction-level advisory lock the audit migrations run under: one key per database,
/// whatever the audit table is called or however it is spelled (migrations are short, and two
/// spellings of one table must take turns).
pub fn migrations_lock_key() -> i64 {
    mapping::fnv1a("sandbox-reconciler|audit-migrations")
}

/// Runs the reconciler's own migrations (the audit table), once per process at start-up,
/// tracked in a table of its own (`<audit.table>_migrations`, in the layout sqlx uses, so
/// earlier installs carry on), never the application's `_sqlx_migrations`.
///
/// All pending migrations run in one transaction under a transaction-level advisory lock:
/// two replicas starting together take turns, and a failed migration rolls back and releases
/// the lock with the transaction (a session-level lock would outlive the failure).
pub async fn migrate(conn: &mut PgConnection, mapping: &TableMapping) -> Result<(), StoreError> {
    let name = mapping.audit.name();
    let render = |sql: &str| {
        sql.replace("{{audit}}", &mapping.audit.to_string())
            .replace("{{sweep_idx}}", &format!("\"{name}_sweep_idx\""))
            .replace("{{session_idx}}", &format!("\"{name}_session_idx\""))
            .replace("{{undoes_idx}}", &format!("\"{name}_undoes_idx\""))
    };
    let deadline = mapping.deadline;
    let table = mapping.audit.with_suffix("_migrations");
    let mut tx = within(deadline, "starting the audit migrations", conn.begin()).await?;
    let lock = migrations_lock_key();
    within(
        deadline,
        "locking the audit migrations",
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock)
            .execute(&mut *tx),
    )
    .await?;
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {table} (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
         installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, \
         checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL)"
    );
    within(
        deadline,
        "creating the audit migrations table",
        sqlx::raw_sql(AssertSqlSafe(create)).execute(&mut *tx),
    )
    .await?;
    let applied: Vec<i64> = within(
        deadline,
        "reading the applied audit migrations",
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT version FROM {table} WHERE success"
        )))
        .fetch_all(&mut *tx),
    )
    .await?;
    for (version, description, template) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        let started = Instant::now();
        within(
            deadline,
            "running an audit migration",
            sqlx::raw_sql(AssertSqlSafe(render(template))).execute(&mut *tx),
        )
        .await?;
        let record = format!(
            "INSERT INTO {table} (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, true, $3, $4) \
             ON CONFLICT (version) DO UPDATE SET success = true, checksum = $3"
        );
        within(
            deadline,
            "recording an audit migration",
            sqlx::query(AssertSqlSafe(record))
                .bind(version)
                .bind(description)
                .bind(mapping::fnv1a(template).to_be_bytes().to_vec())
                .bind(started.elapsed().as_nanos() as i64)
                .execute(&mut *tx),
        )
        .await?;
        tracing::info!(version, description, "applied an audit-table migration");
    }
    within(deadline, "committing the audit migrations", tx.commit()).await
}
