//! The PostgreSQL server of the tests and the session table they fill.

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, PgPool};

/// The shape of centaur's `sandbox_sessions` table (primary key `thread_key`), as SQL to run
/// in an empty schema.
pub const CENTAUR_SESSIONS_SQL: &str = include_str!("../fixtures/centaur_sandbox_sessions.sql");

/// centaur's `sandbox_sessions` as its own migrations leave it: NOT NULL columns with
/// defaults, a jsonb column, a uuid `trace_id` with a unique index, partial indexes and the
/// state CHECK.
pub const CENTAUR_MIGRATED_SQL: &str =
    include_str!("../fixtures/centaur_sandbox_sessions_migrated.sql");

/// The server every test uses: `TEST_DATABASE_URL`, else the local trust-auth default.
pub fn database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Creates a schema named `{prefix}_{random}` holding centaur's session table, then runs
/// `extra_sql` in it (e.g. to change the table's key); returns the schema's name. The
/// connection's `search_path` is reset afterwards.
pub async fn create_sessions_schema(
    pool: &PgPool,
    prefix: &str,
    extra_sql: &str,
) -> Result<String, sqlx::Error> {
    create_schema_with(pool, prefix, CENTAUR_SESSIONS_SQL, extra_sql).await
}

/// [`create_sessions_schema`] with another table definition (e.g. [`CENTAUR_MIGRATED_SQL`]).
pub async fn create_schema_with(
    pool: &PgPool,
    prefix: &str,
    table_sql: &str,
    extra_sql: &str,
) -> Result<String, sqlx::Error> {
    let schema = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let sql = format!(
        "CREATE SCHEMA {schema}; SET search_path = {schema}; {table_sql}; {extra_sql}; \
         SET search_path = public"
    );
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await?;
    Ok(schema)
}

/// Where a PostgreSQL URL points, without its credentials: `host:port/database`.
pub fn describe(url: &str) -> String {
    match url.parse::<PgConnectOptions>() {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("")
        ),
        Err(_) => "an unparsable PostgreSQL URL".to_string(),
    }
}

/// The port of a PostgreSQL URL (5432 when not given).
pub fn port(url: &str) -> anyhow::Result<u16> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("parsing the PostgreSQL URL ({}): {e}", describe(url)))?;
    Ok(options.get_port())
}
