//! EXPLAIN (ANALYZE, BUFFERS) of the sweep's queries on the loaded data.

use std::fmt::Write as _;

use anyhow::{anyhow, Result};
use chrono::{DateTime, Utc};
use sandbox_reconciler::store::TableMapping;
use serde_json::json;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::load::reset;
use crate::{bench_settings, Args, DESIGNATED, TABLE};

pub(crate) async fn explain(args: &Args, bench_url: &str, path: &std::path::Path) -> Result<()> {
    reset(bench_url, args.orphans).await?;
    let settings = bench_settings(args, bench_url)?;
    let mapping = TableMapping::from_settings(&settings).map_err(|e| anyhow!(e))?;
    let mut conn = PgConnection::connect(bench_url).await?;
    let mut out = String::new();
    let plan = |rows: Vec<sqlx::postgres::PgRow>| -> String {
        rows.iter()
            .map(|r| r.get::<String, _>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Warm the cache the way the sweep before it would have.
    let _: i64 = sqlx::query_scalar(AssertSqlSafe(mapping.count_gone_sql()))
        .bind("gone")
        .bind(mapping.scope_value())
        .fetch_one(&mut conn)
        .await?;
    for (title, sql) in [
        (
            "Count of gone rows (`TableMapping::count_gone_sql`)",
            mapping.count_gone_sql(),
        ),
        (
            "Read query (`TableMapping::select_rows_sql`)",
            mapping.select_rows_sql(),
        ),
    ] {
        let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS) {sql}")))
            .bind("gone")
            .bind(mapping.scope_value())
            .fetch_all(&mut conn)
            .await?;
        let _ = write!(
            out,
            "### {title}\n\n```sql\n{sql}\n-- $1 = 'gone'\n```\n\n```\n{}\n```\n\n",
            plan(rows)
        );
    }
    // One downgrade batch of the clean-up, rolled back.
    let batch: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT thread_key, sandbox_id, updated_at FROM {DESIGNATED} WHERE n < $1 ORDER BY n"
    )))
    .bind(args.batch_size.min(args.orphans) as i32)
    .fetch_all(&mut conn)
    .await?;
    let keys: Vec<&str> = batch.iter().map(|b| b.0.as_str()).collect();
    let objects: Vec<&str> = batch.iter().map(|b| b.1.as_str()).collect();
    let updated: Vec<DateTime<Utc>> = batch.iter().map(|b| b.2).collect();
    let backends: Vec<&str> = batch.iter().map(|_| "pod").collect();
    // A clean-up's batch: every row confirmed by the same listing, one evidence document.
    let documents = vec![json!({"absence": "absent from the watch cache, proven at least as fresh as a revision taken after the rows were read"}).to_string()];
    let doc_of: Vec<i32> = batch.iter().map(|_| 1).collect();
    let sql = mapping.downgrade_sql();
    let mut tx = conn.begin().await?;
    let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS) {sql}")))
        .bind(&keys)
        .bind(&objects)
        .bind(&updated)
        .bind(&backends)
        .bind(&doc_of)
        .bind("suspended")
        .bind("gone")
        .bind(uuid::Uuid::new_v4())
        .bind(TABLE)
        .bind(mapping.scope_value())
        .bind(&documents)
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    let _ = write!(
        out,
        "### One downgrade batch of {} rows (`TableMapping::downgrade_sql`), rolled back\n\n```sql\n{sql}\n```\n\n```\n{}\n```\n",
        keys.len(),
        plan(rows)
    );
    conn.close().await?;
    std::fs::write(path, out)?;
    eprintln!("bench: EXPLAIN output written to {}", path.display());
    Ok(())
}
