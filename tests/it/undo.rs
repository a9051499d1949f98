//! `undo`: restore downgrades from the audit records, leaving rows changed since alone.

use crate::support::*;
use sandbox_reconciler::store::{Database, TableMapping};
use sandbox_reconciler::undo::{self, UndoRequest};
use sqlx::AssertSqlSafe;

#[tokio::test]
async fn undo_restores_rows_as_the_sweep_left_them_and_is_audited() {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_pod("agents", "pod-live", MANAGED);
    db.insert("live", "running", "pod-live", minutes(60)).await;
    for k in ["a", "b", "c"] {
        db.insert(k, "suspended", &format!("pod-{k}"), minutes(60))
            .await;
    }
    let report = sweep(db.settings(), &api, false).await;
    assert_eq!(report.downgraded, 3);
    let sweep_id = report.sweep_id.to_string();
    // The platform respawned "c" meanwhile: it must not be touched by the undo.
    let sql = format!(
        "UPDATE {} SET state = 'running', agent_thread_id = 'new-thread', updated_at = now() WHERE thread_key = 'c'",
        db.table()
    );
    sqlx::query(AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "");
    let cfg = config.to_str().unwrap();
    let before = db.fingerprint().await;
    let audit_before = db.audit_count().await;
    let out = run_binary(
        dir.path(),
        None,
        &["--config", cfg, "undo", "--sweep", &sweep_id, "--dry-run"],
        &[],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(text.contains("2 would restore, 1 left alone"), "{text}");
    assert!(text.contains("left alone    c  (now running)"), "{text}");
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, audit_before);

    let out = run_binary(
        dir.path(),
        None,
        &[
            "--config", cfg, "undo", "--sweep", &sweep_id, "--output", "json",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["restored"], 2);
    assert_eq!(r["left_alone"], 1);
    assert_eq!(
        db.row("a").await,
        ("suspended".into(), Some("agent-a".into()))
    );
    assert_eq!(
        db.row("b").await,
        ("suspended".into(), Some("agent-b".into()))
    );
    assert_eq!(
        db.row("c").await,
        ("running".into(), Some("new-thread".into()))
    );
    assert_eq!(db.audit_count().await, audit_before + 2);
    let sql = format!(
        "SELECT count(*) FROM {} WHERE action = 'undo' AND undoes IS NOT NULL AND new_state = 'suspended'",
        db.audit_table()
    );
    let undo_records: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(undo_records, 2);

    // Undoing again restores nothing: those downgrades are already undone.
    let out = run_binary(
        dir.path(),
        None,
        &["--config", cfg, "undo", "--sweep", &sweep_id],
        &[],
    )
    .await;
    assert!(
        stdout(&out).contains("0 restored, 1 left alone"),
        "{}",
        stdout(&out)
    );
    assert_eq!(db.audit_count().await, audit_before + 2);
}

#[tokio::test]
async fn undo_one_session() {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_pod("agents", "pod-live", MANAGED);
    db.insert("live", "running", "pod-live", minutes(60)).await;
    db.insert("x", "suspended", "pod-x", minutes(60)).await;
    db.insert("y", "suspended", "pod-y", minutes(60)).await;
    assert_eq!(sweep(db.settings(), &api, false).await.downgraded, 2);
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "");
    let out = run_binary(
        dir.path(),
        None,
        &[
            "--config",
            config.to_str().unwrap(),
            "undo",
            "--session",
            "x",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(db.state("x").await, "suspended");
    assert_eq!(db.state("y").await, "gone");
    // Neither --sweep nor --session is a usage error.
    let out = run_binary(
        dir.path(),
        None,
        &["--config", config.to_str().unwrap(), "undo"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
}

/// `undo --dry-run` only reads: no UPDATE runs (a trigger on the session table that counts
/// every updated row with a sequence, which a rollback does not reset, counts nothing), and a
/// row another connection holds locked neither blocks it nor hides it: it is listed as one
/// that would be restored, as a real undo would restore it once the lock is gone. The real
/// undo afterwards restores both rows, and the trigger sees exactly those two updates.
///
/// A dry run that ran the real UPDATE (FOR UPDATE SKIP LOCKED, then rolled back) would fire
/// the trigger for the unlocked row (the sequence advances) and report the locked row as
/// "left alone".
#[tokio::test]
async fn undo_dry_run_only_reads_and_waits_for_no_row_lock() {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_pod("agents", "pod-live", MANAGED);
    db.insert("live", "running", "pod-live", minutes(60)).await;
    db.insert("a", "suspended", "pod-a", minutes(60)).await;
    db.insert("b", "suspended", "pod-b", minutes(60)).await;
    let settings = db.settings();
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 2, "{:?}", report.error);
    let seq = format!("{}.updates_seen", db.schema);
    let sql = format!(
        "CREATE SEQUENCE {seq}; \
         CREATE FUNCTION {s}.count_update() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM nextval('{seq}'); RETURN NEW; END $$; \
         CREATE TRIGGER count_update BEFORE UPDATE ON {t} FOR EACH ROW \
           EXECUTE FUNCTION {s}.count_update()",
        s = db.schema,
        t = db.table()
    );
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();
    let updates_seen = || {
        let sql = format!("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {seq}");
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = db.fingerprint().await;
    let audit_before = db.audit_count().await;
    // The application holds b's row.
    let mut holder = db.pool.begin().await.unwrap();
    let lock = format!(
        "SELECT 1 FROM {} WHERE thread_key = 'b' FOR UPDATE",
        db.table()
    );
    sqlx::query(AssertSqlSafe(lock))
        .execute(&mut *holder)
        .await
        .unwrap();

    let request = |dry_run| UndoRequest {
        sweep: Some(report.sweep_id),
        session: None,
        dry_run,
    };
    let database = Database::new(&settings).unwrap();
    let mapping = TableMapping::from_settings(&settings).unwrap();
    let dry = tokio::time::timeout(
        std::time::Duration::from_secs(4),
        undo::run(
            &database,
            &mapping,
            &request(true),
            std::time::Duration::ZERO,
        ),
    )
    .await
    .expect("the dry run waits for no row lock")
    .unwrap();
    assert_eq!((dry.restored, dry.left_alone), (2, 0), "{:?}", dry.lines);
    assert_eq!(updates_seen().await, 0, "the dry run ran an UPDATE");
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, audit_before);
    holder.rollback().await.unwrap();

    let real = undo::run(
        &database,
        &mapping,
        &request(false),
        std::time::Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!((real.restored, real.left_alone), (2, 0));
    assert_eq!(updates_seen().await, 2, "the trigger counts real updates");
    assert_eq!(db.state("a").await, "suspended");
    assert_eq!(db.state("b").await, "suspended");
    assert_eq!(db.state("live").await, "running");
}

/// An undo restores what each downgrade's audit record says it cleared, not what today's
/// `sessions.clear_columns` names: downgrades made by a profile that cleared
/// `agent_thread_id` are undone whole by a profile that clears nothing (the defaults since
/// centaur's semantics became them), and a row whose cleared column was written since is left
/// alone. Before, the thread id stayed NULL.
#[tokio::test]
async fn undo_restores_the_columns_the_audit_record_cleared_whatever_the_profile_says_now() {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_namespace("agents");
    api.add_pod("agents", "pod-live", MANAGED);
    db.insert("live", "running", "pod-live", minutes(60)).await;
    for k in ["a", "b"] {
        db.insert(k, "suspended", &format!("pod-{k}"), minutes(60))
            .await;
    }
    let clearing = db.settings();
    assert_eq!(clearing.sessions.clear_columns, ["agent_thread_id"]);
    let report = sweep(clearing, &api, false).await;
    assert_eq!(report.downgraded, 2, "{report:?}");
    assert_eq!(db.row("a").await, ("gone".into(), None));
    // The application wrote b's thread id since: b is no longer as the downgrade left it.
    let sql = format!(
        "UPDATE {} SET agent_thread_id = 'written-since' WHERE thread_key = 'b'",
        db.table()
    );
    sqlx::query(AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();

    let mut keeping = db.settings();
    keeping.sessions.clear_columns = Vec::new();
    let mapping = TableMapping::from_settings(&keeping).unwrap();
    let database = Database::new(&keeping).unwrap();
    let request = UndoRequest {
        sweep: Some(report.sweep_id),
        session: None,
        dry_run: false,
    };
    let outcome = undo::run(&database, &mapping, &request, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        (outcome.restored, outcome.left_alone),
        (1, 1),
        "{outcome:?}"
    );
    assert_eq!(
        db.row("a").await,
        ("suspended".into(), Some("agent-a".into()))
    );
    assert_eq!(
        db.row("b").await,
        ("gone".into(), Some("written-since".into()))
    );
}
