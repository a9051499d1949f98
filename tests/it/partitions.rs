//! A partitioned session table: a row's physical identity (`ctid`) is unique only within one
//! partition, so the downgrade and the undo change the locked row by its partition
//! (`tableoid`) and `ctid` together, and another partition's row at the same `ctid` is never
//! touched.

use crate::support::*;
use sandbox_reconciler::sweep::SweepResult;
use sqlx::{AssertSqlSafe, Row};

/// (partition, ctid, state, agent_thread_id) of one row.
async fn located(
    db: &TestDb,
    table: &str,
    cluster: &str,
    key: &str,
) -> (String, String, String, Option<String>) {
    let sql = format!(
        "SELECT tableoid::regclass::text, ctid::text, state, agent_thread_id FROM {table} \
         WHERE cluster = $1 AND thread_key = $2"
    );
    let r = sqlx::query(AssertSqlSafe(sql))
        .bind(cluster)
        .bind(key)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Table `sessions` LIST-partitioned by the scope column `cluster`: a's orphan at (0,1) of
/// partition a, b's running rows at (0,1) and (0,2) of partition b. A reconciler scoped to a
/// downgrades a's row (whose locked ctid (0,1) b's first row shares), then undoes it (the
/// downgraded row is now at (0,2), which b's second row shares). b's rows are never changed
/// and have no audit record; a's row is downgraded and restored.
///
/// UPDATEs matching `t.ctid = old.row_id` alone would also change b's row at (0,1): the
/// post-statement check would see the key twice and roll the batch back ("the statement
/// changed 2 rows for 1 planned keys") on every sweep, and an undo without such a check would
/// rewrite b's row at (0,2) to `suspended` with a's `agent_thread_id`.
#[tokio::test]
async fn a_partitioned_table_is_downgraded_and_undone_in_the_scopes_partition_only() {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_namespace("agents");
    let table = format!("{}.part_sessions", db.schema);
    exec(
        &db,
        &format!(
            "CREATE TABLE {table} (cluster text NOT NULL, thread_key text NOT NULL, \
             sandbox_id text NOT NULL, state text NOT NULL, updated_at timestamptz NOT NULL, \
             agent_thread_id text, PRIMARY KEY (cluster, thread_key)) PARTITION BY LIST (cluster); \
             CREATE TABLE {table}_a PARTITION OF {table} FOR VALUES IN ('a'); \
             CREATE TABLE {table}_b PARTITION OF {table} FOR VALUES IN ('b'); \
             INSERT INTO {table} VALUES \
             ('a', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-a1'); \
             INSERT INTO {table} VALUES \
             ('b', 'k2', 'pod-k2', 'running', now() - interval '1 hour', 'agent-b2'), \
             ('b', 'k3', 'pod-k3', 'running', now() - interval '1 hour', 'agent-b3')"
        ),
    )
    .await;
    let a = located(&db, &table, "a", "k1").await;
    let b2 = located(&db, &table, "b", "k2").await;
    let b3 = located(&db, &table, "b", "k3").await;
    assert_eq!(a.1, "(0,1)");
    assert_eq!(b2.1, "(0,1)", "b's first row shares a's ctid");
    assert_eq!(b3.1, "(0,2)");
    assert_ne!(a.0, b2.0, "different partitions");

    let mut settings = db.settings();
    settings.sessions.table = table.clone();
    settings.sessions.scope_column = "cluster".into();
    settings.sessions.scope_value = "a".into();
    settings.validate().unwrap();

    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    let a_gone = located(&db, &table, "a", "k1").await;
    assert_eq!(
        (a_gone.2.as_str(), a_gone.3.as_deref()),
        ("gone", None),
        "a's row is downgraded"
    );
    assert_eq!(located(&db, &table, "b", "k2").await, b2);
    assert_eq!(located(&db, &table, "b", "k3").await, b3);
    assert_eq!(
        a_gone.1, b3.1,
        "the downgraded row now shares b's second row's ctid"
    );

    let undone = undo_sweep(&settings, report.sweep_id).await.unwrap();
    assert_eq!((undone.restored, undone.left_alone), (1, 0));
    let a_back = located(&db, &table, "a", "k1").await;
    assert_eq!(
        (a_back.2.as_str(), a_back.3.as_deref()),
        ("suspended", Some("agent-a1")),
        "a's row is restored"
    );
    assert_eq!(located(&db, &table, "b", "k2").await, b2);
    assert_eq!(located(&db, &table, "b", "k3").await, b3);
    let sql = format!(
        "SELECT count(*) FROM {} WHERE session_scope IS DISTINCT FROM 'a' OR session_key <> 'k1'",
        db.audit_table()
    );
    let others: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(others, 0, "audit records only of a's row");
    assert_eq!(db.audit_count().await, 2);
}
