//! Migrations run once at start-up and leave no lock behind, even when they fail.

use std::time::{Duration, Instant};

use crate::support::*;
use sandbox_reconciler::store::{self};
use sandbox_reconciler::sweep::SweepResult;

use super::*;

/// After `prepare_at_start(true)` a sweep runs no migration: the migrations table, dropped
/// after the start-up, is not created again.
///
/// A sweep that ran `store::migrate` itself (after `verify_table`, in every non-dry sweep)
/// would create the table again.
#[tokio::test]
async fn migrations_run_once_at_start_not_in_every_sweep() {
    let (db, api) = seeded(1, 1).await;
    let settings = db.settings();
    let migrations = format!("{}_migrations", db.audit_table());
    let r = reconciler(settings, &api);
    let mapping = r.prepare_at_start(true).await.unwrap();
    assert_eq!(mapping.table_display(), db.table());
    assert!(exists(&db, &migrations).await);
    exec(&db, &format!("DROP TABLE {migrations}")).await;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = r.sweep(&once(), &rx).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    assert!(
        !exists(&db, &migrations).await,
        "the sweep ran the migrations again"
    );
}

/// Advisory locks held by the backend `pid`.
async fn advisory_locks(db: &TestDb, pid: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.pid = $1 \
           AND a.application_name = 'sandbox-reconciler'",
    )
    .bind(pid)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// sandbox-reconciler sessions holding the advisory lock `key` (a bigint key is stored as
/// classid = high 32 bits, objid = low 32 bits, objsubid = 1).
async fn migration_lock_holders(db: &TestDb, key: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND a.application_name = 'sandbox-reconciler' \
           AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND l.objsubid = 1",
    )
    .bind((key >> 32) & 0xffff_ffff)
    .bind(key & 0xffff_ffff)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// A failing migration (the audit table's name taken by a view, so CREATE INDEX fails)
/// returns an error and leaves no advisory lock behind on the connection that ran it, even
/// when that connection lives on (as the daemon's writer connection does); once fixed,
/// preparing succeeds.
///
/// sqlx's `Migrator` is not used for this: it takes a database-wide *session-level* advisory
/// lock and returns early on a failed migration without releasing it, so the connection would
/// keep the lock (and every other reconciler's migration would wait on it).
#[tokio::test]
async fn a_failed_migration_leaves_no_lock_and_can_be_retried() {
    let db = TestDb::new().await;
    let api = fake_api().await;
    db.insert("x", "suspended", "pod-x", minutes(60)).await;
    exec(
        &db,
        &format!("CREATE VIEW {} AS SELECT 1::bigint AS id", db.audit_table()),
    )
    .await;
    let r = reconciler(db.settings(), &api);

    // On a connection that stays open.
    let mut conn = r.database.connect().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let err = r.prepare(&mut conn, true).await.unwrap_err();
    assert!(
        err.to_string().contains("migration"),
        "unexpected error: {err}"
    );
    // The next statement on the connection (the daemon's ping) ends the failed transaction.
    sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
    assert_eq!(
        advisory_locks(&db, pid).await,
        0,
        "the connection kept an advisory lock after the failed migration"
    );
    // Control: the query does see an advisory lock this connection holds.
    let probe = store::mapping::fnv1a(&db.schema);
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(probe)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(advisory_locks(&db, pid).await, 1);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(probe)
        .execute(&mut conn)
        .await
        .unwrap();

    // At start-up, on a short-lived connection: an error, not a hang, and no sandbox-reconciler
    // session keeps the audit migrations' lock (its short-lived connection is gone).
    let key = store::migrations_lock_key();
    // Control: the query sees that lock when a sandbox-reconciler session holds it.
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(migration_lock_holders(&db, key).await, 1);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut conn)
        .await
        .unwrap();
    assert!(r.prepare_at_start(true).await.is_err());
    let deadline = Instant::now() + Duration::from_secs(5);
    while migration_lock_holders(&db, key).await > 0 {
        assert!(
            Instant::now() < deadline,
            "a sandbox-reconciler session still holds the migrations lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Fixed: preparing succeeds (the failure was not remembered) and a sweep writes.
    exec(&db, &format!("DROP VIEW {}", db.audit_table())).await;
    r.prepare_at_start(true).await.unwrap();
    let kind: String =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)")
            .bind(db.audit_table())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(kind, "r");
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = r.sweep(&once(), &rx).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    drop(conn);
}
