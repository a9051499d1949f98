//! `undo`: restore downgrades from the audit records, leaving rows changed since alone.

use crate::support::*;
use sqlx::AssertSqlSafe;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
