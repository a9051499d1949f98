//! `undo` beside a running writer, and deleted rows inserted back (past domain, generated and
//! identity columns, in their own scope, with typed keys and states).

use std::time::{Duration, Instant};

use crate::support::*;
use sqlx::{AssertSqlSafe, Connection};

use super::*;

/// While a daemon holds the writer lock: `undo --dry-run` works, takes no lock and runs no
/// DDL; a real undo waits `database.writer_lock_wait_seconds` and then says how to pause the
/// daemon.
///
/// An undo that took the writer lock first (`try_writer_lock`, no wait) even for `--dry-run`
/// would fail the dry run with "holds the writer lock" (exit 1); one that ran
/// `store::migrate` (DDL) would do so for a dry run too; and a real undo that fails at once
/// neither waits nor names sweep.dry_run.
#[tokio::test]
async fn undo_beside_a_running_writer() {
    let World {
        db,
        api,
        settings,
        dir,
        config,
    } = World::new()
        .await
        .row("x", "suspended", "pod-x", minutes(60))
        .build()
        .await;
    let mapping = resolved(&settings).await;
    let migrations = format!("{}_migrations", db.audit_table());
    let cfg = config.to_str().unwrap();
    let undo = |args: &'static [&'static str], sweep: String, env| {
        let dir = dir.path().to_path_buf();
        async move {
            let mut all = vec!["--config", cfg, "undo"];
            all.extend_from_slice(args);
            all.extend(["--sweep", sweep.as_str()]);
            run_binary(&dir, None, &all, env).await
        }
    };
    let lock_wait = &[(
        "SANDBOX_RECONCILER__DATABASE__WRITER_LOCK_WAIT_SECONDS",
        "1",
    )];

    // No audit table yet: the dry run creates none.
    let holder = hold_lock(mapping.lock_key()).await;
    let any_sweep = uuid::Uuid::new_v4().to_string();
    let out = undo(&["--dry-run"], any_sweep, &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    assert!(!exists(&db, &db.audit_table()).await, "a dry run ran DDL");
    assert!(!exists(&db, &migrations).await, "a dry run ran DDL");
    holder.close().await.unwrap();

    // A downgrade to undo, then the daemon holds the lock again.
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 1, "{:?}", report.error);
    let sweep_id = report.sweep_id.to_string();
    let holder = hold_lock(mapping.lock_key()).await;
    let before = db.fingerprint().await;
    let audit_before = db.audit_count().await;

    let out = undo(&["--dry-run"], sweep_id.clone(), &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 would restore"),
        "{}",
        output(&out)
    );
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, audit_before);

    let started = Instant::now();
    let out = undo(&[], sweep_id.clone(), lock_wait).await;
    let waited = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", output(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds the writer lock"), "{}", output(&out));
    assert!(stderr.contains("sweep.dry_run"), "{}", output(&out));
    assert!(
        waited >= Duration::from_secs(1),
        "gave up after {waited:?}, before database.writer_lock_wait_seconds = 1"
    );
    assert!(waited < Duration::from_secs(30), "waited {waited:?}");
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, audit_before);

    // Once the daemon lets go, the same undo goes through.
    holder.close().await.unwrap();
    let out = undo(&[], sweep_id.clone(), lock_wait).await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    assert_eq!(db.state("x").await, "suspended");
}

/// A deleted row is inserted back from its row image on a table with a NOT NULL domain column,
/// a stored generated column (recomputed, never named in the INSERT) and an identity column
/// GENERATED ALWAYS (the image's value kept): the audit record keeps the row image that makes
/// this possible.
#[tokio::test]
async fn a_deleted_row_is_inserted_back_past_domain_generated_and_identity_columns() {
    let (w, table) = world_with_table("image_sessions").await;
    let World { db, api, settings, .. } = w
        .sql(format!(
            "CREATE DOMAIN {s}.owner_text AS text NOT NULL CHECK (VALUE <> ''); \
             CREATE TABLE {table} (seq bigint GENERATED ALWAYS AS IDENTITY, \
             thread_key text PRIMARY KEY, sandbox_id text NOT NULL, \
             state text NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text, \
             owner {s}.owner_text, shout text GENERATED ALWAYS AS (upper(thread_key)) STORED); \
             INSERT INTO {table} (thread_key, sandbox_id, state, updated_at, agent_thread_id, owner) VALUES \
             ('orphan', 'pod-image-gone', 'suspended', now() - interval '1 hour', 'agent-orphan', 'team-x'), \
             ('live', 'pod-image-live', 'running', now() - interval '1 hour', 'agent-live', 'team-y')",
            s = table.rsplit_once('.').unwrap().0
        ))
        .pod("pod-image-live")
        .build()
        .await;
    let image = |key: &'static str| {
        let sql = format!("SELECT to_jsonb(t) - 'updated_at' FROM {table} t WHERE thread_key = $1");
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, serde_json::Value>(AssertSqlSafe(sql))
                .bind(key)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };
    let before = image("orphan").await.unwrap();
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 1, "{:?}", report.error);
    exec(
        &db,
        &format!("DELETE FROM {table} WHERE thread_key = 'orphan'"),
    )
    .await;
    let undone = undo_session(&settings, "orphan")
        .await
        .unwrap_or_else(|e| panic!("undo failed: {e}"));
    assert_eq!((undone.restored, undone.inserted), (1, 1), "{undone:?}");
    // Every column as before, the cleared agent_thread_id included; state suspended.
    assert_eq!(image("orphan").await.unwrap(), before);
    let records = audit_records(&db, &db.audit_table()).await;
    assert_eq!(
        records.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        vec!["downgrade", "undo"]
    );
}

/// Scoped: a row deleted in scope a is inserted back although scope b has a row with the same
/// key; a row re-created in scope a meanwhile is left alone.
#[tokio::test]
async fn a_deleted_row_is_inserted_back_in_its_own_scope_only() {
    let (w, table) = world_with_table("scoped_images").await;
    let World {
        db, api, settings, ..
    } = w
        .sql(format!(
            "CREATE TABLE {table} (cluster text NOT NULL, thread_key text NOT NULL, \
             sandbox_id text NOT NULL, state text NOT NULL, updated_at timestamptz NOT NULL, \
             agent_thread_id text, PRIMARY KEY (cluster, thread_key)); \
             INSERT INTO {table} VALUES \
             ('a', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-a1'), \
             ('a', 'k2', 'pod-k2', 'suspended', now() - interval '1 hour', 'agent-a2'), \
             ('b', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-b1'), \
             ('a', 'live', 'pod-scoped-live', 'running', now() - interval '1 hour', NULL)"
        ))
        .pod("pod-scoped-live")
        .settings(|s| {
            s.sessions.scope_column = "cluster".into();
            s.sessions.scope_value = "a".into();
        })
        .build()
        .await;
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 2, "{:?}", report.error);
    exec(
        &db,
        &format!(
            "DELETE FROM {table} WHERE cluster = 'a' AND state = 'gone'; \
             INSERT INTO {table} VALUES ('a', 'k2', 'pod-new', 'creating', now(), NULL)"
        ),
    )
    .await;
    let undone = undo_sweep(&settings, report.sweep_id)
        .await
        .unwrap_or_else(|e| panic!("undo failed: {e}"));
    assert_eq!(
        (undone.restored, undone.inserted, undone.left_alone),
        (1, 1, 1),
        "{undone:?}"
    );
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(AssertSqlSafe(
        format!("SELECT cluster, thread_key, state, agent_thread_id FROM {table} ORDER BY 1, 2"),
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "a".into(),
                "k1".into(),
                "suspended".into(),
                Some("agent-a1".into())
            ),
            ("a".into(), "k2".into(), "creating".into(), None),
            ("a".into(), "live".into(), "running".into(), None),
            (
                "b".into(),
                "k1".into(),
                "suspended".into(),
                Some("agent-b1".into())
            ),
        ]
    );
}

/// A bigint key and an enum state: the deleted row is inserted back (the image's number read
/// as the key, the old state cast to the enum), and `explain` of a key that is not a number
/// finds no row instead of failing.
#[tokio::test]
async fn a_deleted_row_with_a_bigint_key_and_an_enum_state_is_inserted_back() {
    let (w, table) = world_with_table("typed_images").await;
    let World { db, api, settings, .. } = w
        .sql(format!(
            "CREATE TYPE {s}.image_state AS ENUM ('running', 'suspended', 'gone'); \
             CREATE TABLE {table} (thread_key bigint PRIMARY KEY, sandbox_id text NOT NULL, \
             state {s}.image_state NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text); \
             INSERT INTO {table} VALUES \
             (9007199254740993, 'pod-typed-gone', 'suspended', now() - interval '1 hour', 'agent-big'), \
             (41, 'pod-typed-live', 'running', now() - interval '1 hour', 'agent-live')",
            s = table.rsplit_once('.').unwrap().0
        ))
        .pod("pod-typed-live")
        .settings(|s| {
            s.sessions.other_states = Vec::new();
            s.sessions.live_states = vec!["running".into()];
        })
        .build()
        .await;
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 1, "{:?}", report.error);
    exec(&db, &format!("DELETE FROM {table} WHERE state = 'gone'")).await;
    let undone = undo_sweep(&settings, report.sweep_id)
        .await
        .unwrap_or_else(|e| panic!("undo failed: {e}"));
    assert_eq!((undone.restored, undone.inserted), (1, 1), "{undone:?}");
    let row: (String, Option<String>) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT state::text, agent_thread_id FROM {table} WHERE thread_key = 9007199254740993"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row, ("suspended".into(), Some("agent-big".into())));
    let e = sandbox_reconciler::explain::run(&reconciler(settings, &api), "not-a-number")
        .await
        .unwrap_or_else(|e| panic!("explain failed: {e}"));
    assert!(e.row.is_none());
}

/// A world whose settings name the table `name` of the test schema (made by the test's SQL),
/// and that table's qualified name.
async fn world_with_table(name: &str) -> (WorldBuilder, String) {
    let w = World::new().await;
    let table = format!("{}.{name}", w.db().schema);
    (w.table(&table), table)
}
