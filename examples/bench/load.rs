//! The benchmark database: created afresh, loaded with COPY, reset (untimed) before every
//! scenario so that each sees exactly its orphans, and read back to check what a scenario
//! changed.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use chrono::Utc;
use sandbox_reconciler::store::{self, TableMapping};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::layout::{push_row, Layout, COPY_COLUMNS};
use crate::{bench_settings, Args, AUDIT, DESIGNATED, MIB, TABLE};

pub(crate) fn with_database(url: &str, database: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow!("not a URL: {url}"))?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or(before_query);
    let mut out = format!("{scheme}://{authority}/{database}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

pub(crate) fn with_host_port_nossl(url: &str, addr: SocketAddr) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow!("not a URL: {url}"))?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, q),
        None => (rest, ""),
    };
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    let params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("sslmode="))
        .chain(["sslmode=disable"])
        .collect();
    Ok(format!(
        "{scheme}://{}{addr}/{path}?{}",
        userinfo.unwrap_or_default(),
        params.join("&")
    ))
}

pub(crate) async fn exec(conn: &mut PgConnection, sql: &str) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(conn)
        .await
        .with_context(|| format!("running: {}", sql.chars().take(120).collect::<String>()))?;
    Ok(())
}

/// Holds a session advisory lock keyed by the benchmark database's name for the whole run, so
/// two runs never drop each other's database; the lock goes with the returned connection.
pub(crate) async fn claim_database(args: &Args) -> Result<PgConnection> {
    let mut conn = PgConnection::connect(&args.admin_url)
        .await
        .context("connecting to --admin-url")?;
    let claimed: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(hashtext('sandbox-reconciler-bench:' || $1))",
    )
    .bind(&args.database)
    .fetch_one(&mut conn)
    .await?;
    if !claimed {
        bail!(
            "another benchmark run is using database {}; wait for it or pass another --database",
            args.database
        );
    }
    Ok(conn)
}

pub(crate) async fn create_database(args: &Args, bench_url: &str) -> Result<()> {
    if !args
        .database
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!("--database must be lower-case letters, digits and _");
    }
    let mut admin = PgConnection::connect(&args.admin_url)
        .await
        .context("connecting to --admin-url")?;
    exec(
        &mut admin,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", args.database),
    )
    .await?;
    exec(&mut admin, &format!("CREATE DATABASE {}", args.database)).await?;
    for setting in &args.database_settings {
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| anyhow!("--database-setting {setting}: expected NAME=VALUE"))?;
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            bail!("--database-setting {setting}: not a setting name");
        }
        exec(
            &mut admin,
            &format!(
                "ALTER DATABASE {} SET {name} = '{}'",
                args.database,
                value.replace('\'', "''")
            ),
        )
        .await?;
    }
    admin.close().await?;
    let mut conn = PgConnection::connect(bench_url).await?;
    exec(&mut conn, testkit::pg::CENTAUR_SESSIONS_SQL).await?;
    exec(
        &mut conn,
        &format!(
            "CREATE TABLE {DESIGNATED} (n INTEGER PRIMARY KEY, thread_key TEXT NOT NULL, \
             sandbox_id TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL, agent_thread_id TEXT)"
        ),
    )
    .await?;
    conn.close().await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LoadFigures {
    pub(crate) seconds: f64,
    pub(crate) rows_per_second: f64,
    pub(crate) table_mib: f64,
    pub(crate) indexes_mib: f64,
}

pub(crate) async fn load(args: &Args, layout: &Layout, bench_url: &str) -> Result<LoadFigures> {
    let started = Instant::now();
    let now = Utc::now();
    // No TLS for the bulk load: encrypting 300 MB would only slow the set-up down.
    let options: PgConnectOptions = bench_url.parse()?;
    let mut conn =
        PgConnection::connect_with(&options.ssl_mode(sqlx::postgres::PgSslMode::Disable)).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    let (seed, layout_copy) = (args.seed, layout.clone());
    let generator = tokio::task::spawn_blocking(move || {
        let slots = layout_copy.slots(seed);
        let mut designated = String::new();
        let mut buf = String::with_capacity(4 << 20);
        for (i, slot) in slots.iter().enumerate() {
            push_row(&mut buf, &mut designated, &layout_copy, seed, now, i, *slot);
            if buf.len() >= 4 << 20 {
                let full = std::mem::replace(&mut buf, String::with_capacity(4 << 20));
                if tx.blocking_send(full).is_err() {
                    return designated;
                }
            }
        }
        if !buf.is_empty() {
            let _ = tx.blocking_send(buf);
        }
        designated
    });
    let mut copy = conn
        .copy_in_raw(&format!("COPY {TABLE} ({COPY_COLUMNS}) FROM STDIN"))
        .await?;
    while let Some(chunk) = rx.recv().await {
        copy.send(chunk.into_bytes()).await?;
    }
    let copied = copy.finish().await?;
    let designated = generator.await?;
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {DESIGNATED} (n, thread_key, sandbox_id, updated_at, agent_thread_id) FROM STDIN"
        ))
        .await?;
    copy.send(designated.into_bytes()).await?;
    copy.finish().await?;
    if copied as usize != layout.rows {
        bail!("COPY loaded {copied} rows, expected {}", layout.rows);
    }
    // The reconciler's audit table, created the way a sweep creates it.
    let settings = bench_settings(args, bench_url)?;
    let mapping = TableMapping::from_settings(&settings).map_err(|e| anyhow!(e))?;
    store::migrate(&mut conn, &mapping).await?;
    // Benchmark hygiene: no autovacuum in the middle of a timed scenario (each reset vacuums).
    exec(
        &mut conn,
        &format!(
            "ALTER TABLE {TABLE} SET (autovacuum_enabled = off); \
             ALTER TABLE {AUDIT} SET (autovacuum_enabled = off)"
        ),
    )
    .await?;
    exec(&mut conn, &format!("VACUUM (FREEZE, ANALYZE) {TABLE}")).await?;
    exec(&mut conn, &format!("VACUUM ANALYZE {DESIGNATED}")).await?;
    exec(&mut conn, "CHECKPOINT").await?;
    let seconds = started.elapsed().as_secs_f64();
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT pg_table_size('{TABLE}')::float8, pg_indexes_size('{TABLE}')::float8"
    )))
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    Ok(LoadFigures {
        seconds,
        rows_per_second: layout.rows as f64 / seconds,
        table_mib: row.get::<f64, _>(0) / MIB,
        indexes_mib: row.get::<f64, _>(1) / MIB,
    })
}

/// Makes exactly orphans 0..k suspended (as loaded) and every other designated row gone,
/// empties the audit table, vacuums and checkpoints. Not timed.
pub(crate) async fn reset(bench_url: &str, k: usize) -> Result<()> {
    let mut conn = PgConnection::connect(bench_url).await?;
    let sql = format!(
        "UPDATE {TABLE} s SET state = v.state, updated_at = v.updated_at, agent_thread_id = v.agent \
         FROM (SELECT thread_key, updated_at, \
                      CASE WHEN n < $1 THEN 'suspended' ELSE 'gone' END AS state, \
                      CASE WHEN n < $1 THEN agent_thread_id END AS agent \
               FROM {DESIGNATED}) v \
         WHERE s.thread_key = v.thread_key \
           AND (s.state, s.updated_at, s.agent_thread_id) IS DISTINCT FROM (v.state, v.updated_at, v.agent)"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(k as i32)
        .execute(&mut conn)
        .await
        .context("resetting the orphans")?;
    exec(&mut conn, &format!("TRUNCATE {AUDIT} RESTART IDENTITY")).await?;
    exec(&mut conn, &format!("VACUUM ANALYZE {TABLE}")).await?;
    exec(&mut conn, "CHECKPOINT").await?;
    conn.close().await?;
    Ok(())
}

/// (designated rows now gone among 0..k, audit rows, suspended rows without object left among 0..k)
pub(crate) async fn outcome(bench_url: &str, k: usize) -> Result<(i64, i64)> {
    let mut conn = PgConnection::connect(bench_url).await?;
    let gone: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {TABLE} s JOIN {DESIGNATED} d USING (thread_key) \
         WHERE d.n < $1 AND s.state = 'gone' AND s.agent_thread_id IS NULL"
    )))
    .bind(k as i32)
    .fetch_one(&mut conn)
    .await?;
    let audit: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {AUDIT}")))
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok((gone, audit))
}
