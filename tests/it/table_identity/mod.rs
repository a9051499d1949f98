//! The session table and its rows are identified completely: a row by its scope and key (the
//! locked row itself), the table by its catalog identity, not its spelling. SQL is typed from
//! the catalog (uuid and bigint keys keep their index, enum states work), naive timestamps are
//! read in their configured zone, migrations run once without a lingering lock, and `undo`
//! works beside a running writer.
//!
//! One module per topic; this one holds the helpers they share.

mod batches;
mod migrations;
mod scope;
mod spelling;
mod timestamps;
mod typed;
mod undo_rows;

use crate::support::*;
use chrono::{DateTime, Utc};
use sandbox_reconciler::config::Settings;
use sandbox_reconciler::store::{self, Database, TableMapping};
use sandbox_reconciler::sweep::SweepOptions;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Row};

/// `database_url()` with one more query parameter.
pub(super) fn url_with(param: &str) -> String {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A database URL whose sessions have `search_path = schema` (libpq's `options` parameter,
/// which sqlx's `PgConnectOptions` parses: `-c search_path=<schema>`).
pub(super) fn search_path_url(schema: &str) -> String {
    url_with(&format!("options=-c%20search_path%3D{schema}"))
}

/// The test settings of `db` for another session table.
pub(super) fn settings_for(db: &TestDb, table: &str) -> Settings {
    let mut s = db.settings();
    s.sessions.table = table.to_string();
    s.validate().expect("valid settings");
    s
}

pub(super) fn output(out: &std::process::Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub(super) async fn connect(settings: &Settings) -> PgConnection {
    Database::new(settings).unwrap().connect().await.unwrap()
}

/// The mapping of `settings`, resolved through the catalog.
pub(super) async fn resolved(settings: &Settings) -> TableMapping {
    let mut conn = connect(settings).await;
    store::resolve(&mut conn, &TableMapping::from_settings(settings).unwrap())
        .await
        .unwrap()
}

/// A plain connection (not named sandbox-reconciler) holding the advisory lock `key`.
pub(super) async fn hold_lock(key: i64) -> PgConnection {
    let mut conn = PgConnection::connect(&database_url()).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

pub(super) async fn exists(db: &TestDb, relation: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(relation)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// (action, session_table, session_scope, session_key) of every audit record, oldest first.
pub(super) async fn audit_records(
    db: &TestDb,
    audit: &str,
) -> Vec<(String, String, Option<String>, String)> {
    let sql = format!(
        "SELECT action, session_table, session_scope, session_key FROM {audit} ORDER BY id"
    );
    sqlx::query(AssertSqlSafe(sql))
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

pub(super) fn once() -> SweepOptions {
    SweepOptions {
        dry_run: false,
        max_downgrades: None,
    }
}

/// A table shared by two clusters: the key is unique per cluster only.
pub(super) async fn shared_table(db: &TestDb) -> String {
    let table = format!("{}.shared_sessions", db.schema);
    exec(
        db,
        &format!(
            "CREATE TABLE {table} (cluster text NOT NULL, thread_key text NOT NULL, \
             sandbox_id text NOT NULL, state text NOT NULL, updated_at timestamptz NOT NULL, \
             agent_thread_id text, PRIMARY KEY (cluster, thread_key))"
        ),
    )
    .await;
    table
}

/// (state, agent_thread_id, updated_at) of one row of the shared table.
pub(super) async fn shared_row(
    db: &TestDb,
    table: &str,
    cluster: &str,
    key: &str,
) -> (String, Option<String>, DateTime<Utc>) {
    let sql = format!(
        "SELECT state, agent_thread_id, updated_at FROM {table} WHERE cluster = $1 AND thread_key = $2"
    );
    let r = sqlx::query(AssertSqlSafe(sql))
        .bind(cluster)
        .bind(key)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}
