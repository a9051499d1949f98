//! Naive timestamps: an `updated_at` without a time zone is read and written in the
//! configured zone.

use crate::support::*;
use chrono::{DateTime, Utc};
use sandbox_reconciler::cluster::BackendKind;
use sandbox_reconciler::plan::OrphanedRow;
use sandbox_reconciler::store::{self, Downgrade, TableMapping};
use sqlx::{AssertSqlSafe, Row};

use super::*;

/// An `updated_at` of type `timestamp without time zone`, written in New York local time.
///
/// Read as `updated_at::timestamptz` in the session's zone (always UTC: sqlx sends
/// `TimeZone=UTC` at connect), a row written 5 minutes ago in New York would look 4-5 hours
/// old and be downgraded inside the grace period; `updated_at = now()` would write UTC wall
/// time instead of local time; and such a column without `sessions.updated_at_time_zone` must
/// be refused.
///
/// The reconciler's own sessions are always UTC (sqlx's startup `TimeZone=UTC` overrides the
/// server's, the role's and even the URL's `options`), so the part of the reconciler that must
/// not depend on the session's zone is also exercised on a session set to Asia/Tokyo: the
/// read of the rows and a downgrade batch.
#[tokio::test]
async fn naive_updated_at_is_read_and_written_in_the_configured_zone() {
    let db = TestDb::new().await;
    let api = fake_api().await;
    let table = format!("{}.naive_sessions", db.schema);
    let ny = "now() AT TIME ZONE 'America/New_York'";
    exec(
        &db,
        &format!(
            "CREATE TABLE {table} (thread_key text PRIMARY KEY, sandbox_id text NOT NULL, \
             state text NOT NULL, updated_at timestamp without time zone NOT NULL, \
             agent_thread_id text); \
             INSERT INTO {table} VALUES \
             ('fresh', 'pod-fresh', 'suspended', {ny} - interval '5 minutes', 'agent-fresh'), \
             ('old', 'pod-old', 'suspended', {ny} - interval '3 hours', 'agent-old')"
        ),
    )
    .await;
    let state = |key: &'static str| {
        let sql = format!("SELECT state FROM {table} WHERE thread_key = $1");
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(AssertSqlSafe(sql))
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // Seconds between a row's updated_at and New York's wall clock now.
    let local_lag = |key: &'static str| {
        let sql = format!(
            "SELECT abs(extract(epoch FROM (updated_at - ({ny}))))::float8 FROM {table} WHERE thread_key = $1"
        );
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, f64>(AssertSqlSafe(sql))
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let dir = tempfile::tempdir().unwrap();

    // No zone configured: refused as a configuration error naming the key.
    let config = write_settings(dir.path(), &settings_for(&db, &table), "");
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", config.to_str().unwrap(), "--once"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sessions.updated_at_time_zone"),
        "{}",
        output(&out)
    );
    assert_eq!(state("fresh").await, "suspended");
    assert_eq!(state("old").await, "suspended");

    // With the zone: the row written 5 minutes ago (local) is within the 600 s grace period,
    // the one written 3 hours ago is downgraded, and its new updated_at is local time.
    let mut zoned = settings_for(&db, &table);
    zoned.sessions.updated_at_time_zone = "America/New_York".into();
    let config = write_settings(dir.path(), &zoned, "");
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", config.to_str().unwrap(), "--once"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    assert_eq!(state("fresh").await, "suspended", "{}", output(&out));
    assert_eq!(state("old").await, "gone", "{}", output(&out));
    let lag = local_lag("old").await;
    assert!(
        lag < 120.0,
        "new updated_at is {lag}s away from New York's now"
    );

    // The same, on a session whose TimeZone is neither UTC nor New York.
    exec(
        &db,
        &format!(
            "INSERT INTO {table} VALUES ('old2', 'pod-old2', 'suspended', {ny} - interval '3 hours', 'agent-old2')"
        ),
    )
    .await;
    let mut settings = settings_for(&db, &table);
    settings.sessions.updated_at_time_zone = "America/New_York".into();
    settings.validate().unwrap();
    let mut tokyo = connect(&settings).await;
    sqlx::query("SET TimeZone = 'Asia/Tokyo'")
        .execute(&mut tokyo)
        .await
        .unwrap();
    let mapping = store::resolve(&mut tokyo, &TableMapping::from_settings(&settings).unwrap())
        .await
        .unwrap();
    assert!(mapping.resolved.as_ref().unwrap().naive_updated_at);
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query(AssertSqlSafe(mapping.select_rows_sql()))
        .bind(&mapping.gone_state)
        .bind(mapping.scope_value())
        .fetch_all(&mut tokyo)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(3)))
        .collect();
    let read = |key: &str| rows.iter().find(|r| r.0 == key).unwrap().1;
    let fresh_age = (Utc::now() - read("fresh")).num_seconds();
    assert!(
        (240..=420).contains(&fresh_age),
        "the fresh row reads as {fresh_age}s old, not about 300s"
    );
    let old2_age = (Utc::now() - read("old2")).num_seconds();
    assert!(
        (3 * 3600 - 120..=3 * 3600 + 120).contains(&old2_age),
        "old2 reads as {old2_age}s old"
    );
    let orphan = OrphanedRow {
        key: "old2".into(),
        object: "pod-old2".into(),
        state: "suspended".into(),
        updated_at: read("old2"),
        backend: BackendKind::Pod,
    };
    // A batch is written only by the session holding the writer lock.
    assert!(store::try_writer_lock(&mut tokyo, &mapping).await.unwrap());
    let outcome = store::apply_batch(
        &mut tokyo,
        &mapping,
        uuid::Uuid::new_v4(),
        &[Downgrade {
            row: &orphan,
            evidence: std::sync::Arc::new(serde_json::json!({})),
        }],
    )
    .await
    .unwrap();
    assert_eq!(outcome.downgraded, vec!["old2".to_string()]);
    assert_eq!(state("old2").await, "gone");
    let lag = local_lag("old2").await;
    assert!(
        lag < 120.0,
        "new updated_at is {lag}s away from New York's now"
    );
}
