//! The writer lock (rule 8) proves itself where it matters: every writing statement checks
//! that its own server session holds the lock, and the lock has two levels, so that a scoped
//! and an unscoped reconciler on one table exclude each other while two scopes run side by
//! side.

use crate::support::*;
use chrono::{DateTime, Utc};
use sandbox_reconciler::cluster::BackendKind;
use sandbox_reconciler::config::Settings;
use sandbox_reconciler::plan::OrphanedRow;
use sandbox_reconciler::store::{self, Database, Downgrade, TableMapping};
use sandbox_reconciler::sweep::SweepResult;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Row};

/// A table whose key is unique on its own and which also has a scope column, so that both a
/// scoped and an unscoped configuration fit it: a's orphan `ka`, b's orphan `kb`.
async fn scoped_table(db: &TestDb) -> String {
    let table = format!("{}.lock_sessions", db.schema);
    exec(
        db,
        &format!(
            "CREATE TABLE {table} (thread_key text PRIMARY KEY, cluster text NOT NULL, \
             sandbox_id text NOT NULL, state text NOT NULL, updated_at timestamptz NOT NULL, \
             agent_thread_id text); \
             INSERT INTO {table} VALUES \
             ('ka', 'a', 'pod-ka', 'suspended', now() - interval '1 hour', 'agent-ka'), \
             ('kb', 'b', 'pod-kb', 'suspended', now() - interval '1 hour', 'agent-kb')"
        ),
    )
    .await;
    table
}

fn settings_for(db: &TestDb, table: &str, scope: Option<&str>) -> Settings {
    let mut s = db.settings();
    s.sessions.table = table.to_string();
    if let Some(scope) = scope {
        s.sessions.scope_column = "cluster".into();
        s.sessions.scope_value = scope.into();
    }
    s.validate().unwrap();
    s
}

/// A reconciler's connection with its resolved mapping.
async fn connect(settings: &Settings) -> (PgConnection, TableMapping) {
    let mut conn = Database::new(settings).unwrap().connect().await.unwrap();
    let mapping = store::resolve(&mut conn, &TableMapping::from_settings(settings).unwrap())
        .await
        .unwrap();
    (conn, mapping)
}

async fn state(db: &TestDb, table: &str, key: &str) -> (String, Option<String>) {
    let sql = format!("SELECT state, agent_thread_id FROM {table} WHERE thread_key = $1");
    let r = sqlx::query(AssertSqlSafe(sql))
        .bind(key)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

async fn updated_at(db: &TestDb, table: &str, key: &str) -> DateTime<Utc> {
    let sql = format!("SELECT updated_at FROM {table} WHERE thread_key = $1");
    sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(key)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A batch of one row as the sweep read it.
fn orphan(key: &str, read_at: DateTime<Utc>) -> OrphanedRow {
    OrphanedRow {
        key: key.into(),
        object: format!("pod-{key}"),
        state: "suspended".into(),
        updated_at: read_at,
        backend: BackendKind::Pod,
    }
}

/// A batch applied on a connection that does not hold the writer lock (none at all, then
/// another scope's) is refused by the statement itself, with an error that says what to do;
/// nothing is written. The same batch on the connection once it holds the lock downgrades
/// the row; an undo is refused without the lock and restores the row with it. A second attempt to take the lock on a server session that already holds it (a
/// pooler handing one server session to two clients) is refused too.
///
/// An `apply_batch` that wrote whatever connection it was given would send the row to `gone`
/// without any lock; and advisory locks are re-entrant, so taking the lock twice on one
/// session succeeds unless the reconciler checks for it.
#[tokio::test]
async fn a_batch_on_a_connection_without_the_writer_lock_writes_nothing() {
    let db = TestDb::new().await;
    let table = scoped_table(&db).await;
    let settings = settings_for(&db, &table, Some("a"));
    let (mut conn, mapping) = connect(&settings).await;
    store::migrate(&mut conn, &mapping).await.unwrap();
    let read_at = updated_at(&db, &table, "ka").await;
    let row = orphan("ka", read_at);
    let batch = [Downgrade {
        row: &row,
        evidence: std::sync::Arc::new(serde_json::json!({"absence": "test"})),
    }];
    let before = state(&db, &table, "ka").await;

    let err = store::apply_batch(&mut conn, &mapping, uuid::Uuid::new_v4(), &batch)
        .await
        .expect_err("a batch without the writer lock must be refused");
    let message = err.to_string();
    assert!(
        message.contains("does not hold the writer lock"),
        "{message}"
    );
    assert!(message.contains("nothing was written"), "{message}");
    assert_eq!(state(&db, &table, "ka").await, before);
    assert_eq!(db.audit_count().await, 0);

    // Holding another scope's lock is not holding this one.
    let (mut other, other_mapping) = connect(&settings_for(&db, &table, Some("b"))).await;
    assert!(store::try_writer_lock(&mut other, &other_mapping)
        .await
        .unwrap());
    let err = store::apply_batch(&mut other, &mapping, uuid::Uuid::new_v4(), &batch)
        .await
        .expect_err("another scope's lock is not this scope's");
    assert!(
        err.to_string().contains("does not hold the writer lock"),
        "{err}"
    );
    assert_eq!(state(&db, &table, "ka").await, before);
    assert_eq!(db.audit_count().await, 0);

    // With the lock, the same batch goes through.
    assert!(store::try_writer_lock(&mut conn, &mapping).await.unwrap());
    let sweep_id = uuid::Uuid::new_v4();
    let outcome = store::apply_batch(&mut conn, &mapping, sweep_id, &batch)
        .await
        .unwrap();
    assert_eq!(outcome.downgraded, vec!["ka".to_string()]);
    assert_eq!(state(&db, &table, "ka").await, ("gone".into(), None));
    assert_eq!(db.audit_count().await, 1);
    assert_eq!(
        state(&db, &table, "kb").await,
        ("suspended".into(), Some("agent-kb".into()))
    );

    // An undo without the lock (on the other scope's connection) is refused the same way;
    // with it, the row is restored.
    let selection = store::UndoSelection {
        sweep: Some(sweep_id),
        session: None,
    };
    let err = store::apply_undo(&mut other, &mapping, selection, uuid::Uuid::new_v4())
        .await
        .expect_err("an undo without the writer lock must be refused");
    assert!(
        err.to_string().contains("does not hold the writer lock"),
        "{err}"
    );
    assert_eq!(state(&db, &table, "ka").await, ("gone".into(), None));
    assert_eq!(db.audit_count().await, 1);
    let (_, restored) = store::apply_undo(&mut conn, &mapping, selection, uuid::Uuid::new_v4())
        .await
        .unwrap();
    assert_eq!(restored, vec!["ka".to_string()]);
    assert_eq!(state(&db, &table, "ka").await, before);
    assert_eq!(db.audit_count().await, 2);

    // This server session already holds the lock: a second client on it is refused.
    let err = store::try_writer_lock(&mut conn, &mapping)
        .await
        .expect_err("a shared server session must not hand the lock to a second client");
    assert!(err.to_string().contains("already holds"), "{err}");
}

/// Holds `settings`' writer lock on a connection of its own.
async fn hold(settings: &Settings) -> (PgConnection, TableMapping) {
    let (mut conn, mapping) = connect(settings).await;
    assert!(
        store::try_writer_lock(&mut conn, &mapping).await.unwrap(),
        "the lock is free"
    );
    (conn, mapping)
}

/// Lets go of a lock taken with [`hold`] (explicitly: a dropped connection's server session
/// ends, and its locks go, only a moment later).
async fn release((mut conn, mapping): (PgConnection, TableMapping)) {
    store::release_writer_lock(&mut conn, &mapping)
        .await
        .unwrap();
}

/// A scoped and an unscoped reconciler on one table never both hold the writer lock, in
/// either order, and the one kept out writes nothing; two scopes do sweep side by side, each
/// its own rows; once the holder lets go, the waiting configuration sweeps.
///
/// Were the unscoped lock key (table) and the scoped one (table + scope) unrelated advisory
/// locks, the unscoped sweep would run while scope a's writer held its lock and downgrade a's
/// row under it.
#[tokio::test]
async fn scoped_and_unscoped_reconcilers_exclude_each_other_and_scopes_do_not() {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_namespace("agents");
    let table = scoped_table(&db).await;
    let unscoped = settings_for(&db, &table, None);
    let scope_a = settings_for(&db, &table, Some("a"));
    let scope_b = settings_for(&db, &table, Some("b"));

    // Scope a's writer holds the lock: the unscoped reconciler stands by, nothing written.
    let a_writer = hold(&scope_a).await;
    let (mut probe, probe_mapping) = connect(&unscoped).await;
    assert!(!store::try_writer_lock(&mut probe, &probe_mapping)
        .await
        .unwrap());
    let report = sweep(unscoped.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Skipped, "{report:?}");
    assert_eq!(report.downgraded, 0);
    assert_eq!(
        state(&db, &table, "ka").await,
        ("suspended".into(), Some("agent-ka".into()))
    );
    assert_eq!(db.audit_count().await, 0);

    // Scope b sweeps beside scope a's writer, and only its own row.
    let report = sweep(scope_b.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    assert_eq!(state(&db, &table, "kb").await, ("gone".into(), None));
    assert_eq!(
        state(&db, &table, "ka").await,
        ("suspended".into(), Some("agent-ka".into()))
    );
    release(a_writer).await;

    // The unscoped writer holds the lock: scope a stands by.
    let unscoped_writer = hold(&unscoped).await;
    let (mut probe, probe_mapping) = connect(&scope_a).await;
    assert!(!store::try_writer_lock(&mut probe, &probe_mapping)
        .await
        .unwrap());
    let report = sweep(scope_a.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Skipped, "{report:?}");
    assert_eq!(
        state(&db, &table, "ka").await,
        ("suspended".into(), Some("agent-ka".into()))
    );
    assert_eq!(db.audit_count().await, 1);
    release(unscoped_writer).await;

    // Free again: scope a sweeps its row.
    let report = sweep(scope_a.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    assert_eq!(state(&db, &table, "ka").await, ("gone".into(), None));
    assert_eq!(db.audit_count().await, 2);
}
