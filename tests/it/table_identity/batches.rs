//! Batch arithmetic: rows changed meanwhile are skipped and counted; a batch that would change
//! more rows than planned is rolled back.

use crate::support::*;
use chrono::{DateTime, Utc};
use sandbox_reconciler::cluster::BackendKind;
use sandbox_reconciler::plan::OrphanedRow;
use sandbox_reconciler::store::{self, Downgrade, TableMapping};
use sqlx::AssertSqlSafe;

use super::*;

/// One batch, scoped to cluster a: k1 (whose key cluster b's identical row shares) is still
/// as read, k2 changed meanwhile (only its `updated_at`). Exactly k1 of cluster a is
/// downgraded and `skipped_changed` is 1.
///
/// An UPDATE joined on the key alone would change both clusters' k1 and return
/// `["k1", "k1"]`: `skipped_changed = 2 - 2 = 0` instead of 1, and b's row gone.
#[tokio::test]
async fn skipped_changed_counts_rows_changed_meanwhile() {
    let db = TestDb::new().await;
    let table = shared_table(&db).await;
    exec(
        &db,
        &format!(
            "INSERT INTO {table} VALUES \
             ('a', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-a1'), \
             ('b', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-b1'), \
             ('a', 'k2', 'pod-k2', 'suspended', now() - interval '1 hour', 'agent-a2')"
        ),
    )
    .await;
    let mut settings = settings_for(&db, &table);
    settings.sessions.scope_column = "cluster".into();
    settings.sessions.scope_value = "a".into();
    settings.validate().unwrap();
    let mut conn = connect(&settings).await;
    let mapping = store::resolve(&mut conn, &TableMapping::from_settings(&settings).unwrap())
        .await
        .unwrap();
    store::migrate(&mut conn, &mapping).await.unwrap();
    let read_at = shared_row(&db, &table, "a", "k1").await.2;
    let b_before = shared_row(&db, &table, "b", "k1").await;
    exec(
        &db,
        &format!("UPDATE {table} SET updated_at = now() WHERE cluster = 'a' AND thread_key = 'k2'"),
    )
    .await;
    let rows: Vec<OrphanedRow> = ["k1", "k2"]
        .iter()
        .map(|k| OrphanedRow {
            key: k.to_string(),
            object: format!("pod-{k}"),
            state: "suspended".into(),
            updated_at: read_at,
            backend: BackendKind::Pod,
        })
        .collect();
    let batch: Vec<Downgrade<'_>> = rows
        .iter()
        .map(|row| Downgrade {
            row,
            evidence: std::sync::Arc::new(serde_json::json!({"absence": "test"})),
        })
        .collect();
    assert!(store::try_writer_lock(&mut conn, &mapping).await.unwrap());
    let outcome = store::apply_batch(&mut conn, &mapping, uuid::Uuid::new_v4(), &batch)
        .await
        .unwrap();
    assert_eq!(outcome.downgraded, vec!["k1".to_string()]);
    assert_eq!(outcome.skipped_changed, 1);
    assert_eq!(shared_row(&db, &table, "a", "k1").await.0, "gone");
    assert_eq!(shared_row(&db, &table, "a", "k2").await.0, "suspended");
    assert_eq!(shared_row(&db, &table, "b", "k1").await, b_before);
    assert_eq!(audit_records(&db, &db.audit_table()).await.len(), 1);
}

/// Defence in depth: should the statement ever change more rows than were planned (here a
/// table without a unique key, reached with a mapping that skipped the catalog check), the
/// batch is rolled back with an error instead of committing and miscounting.
///
/// Committing both rows would also compute `1 - 2` in `usize` (a panic in a debug build, a
/// wrapped count in release).
#[tokio::test]
async fn a_batch_that_changes_more_rows_than_planned_is_rolled_back() {
    let db = TestDb::new().await;
    let table = format!("{}.dup_sessions", db.schema);
    exec(
        &db,
        &format!(
            "CREATE TABLE {table} (thread_key text NOT NULL, sandbox_id text NOT NULL, \
             state text NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text); \
             INSERT INTO {table} VALUES \
             ('k1', 'pod-k1', 'suspended', date_trunc('second', now()) - interval '1 hour', 'one'), \
             ('k1', 'pod-k1', 'suspended', date_trunc('second', now()) - interval '1 hour', 'two')"
        ),
    )
    .await;
    let settings = settings_for(&db, &table);
    let mapping = TableMapping::from_settings(&settings).unwrap();
    let mut conn = connect(&settings).await;
    store::migrate(&mut conn, &mapping).await.unwrap();
    let read_at: DateTime<Utc> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT updated_at FROM {table} LIMIT 1"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let row = OrphanedRow {
        key: "k1".into(),
        object: "pod-k1".into(),
        state: "suspended".into(),
        updated_at: read_at,
        backend: BackendKind::Pod,
    };
    assert!(store::try_writer_lock(&mut conn, &mapping).await.unwrap());
    let err = store::apply_batch(
        &mut conn,
        &mapping,
        uuid::Uuid::new_v4(),
        &[Downgrade {
            row: &row,
            evidence: std::sync::Arc::new(serde_json::json!({})),
        }],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("rolled back"), "{err}");
    assert!(err.to_string().contains("locked 2 rows"), "{err}");
    drop(conn);
    let states: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT state FROM {table} ORDER BY agent_thread_id"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(states, vec!["suspended", "suspended"]);
    assert_eq!(db.audit_count().await, 0);
}
