//! Two scopes, one key: a row is identified by its scope and its key, in the downgrade, the
//! audit and undo.

use crate::support::*;
use sandbox_reconciler::sweep::SweepResult;

use super::*;

/// Cluster a's row and cluster b's row share the key `k1`, the object name and even
/// `updated_at`; only a's row may be downgraded (and undone).
///
/// A downgrade joined on the key alone (`UPDATE t ... FROM old WHERE t.key::text = old.key`)
/// would send b's row to `gone` too and return two keys for one planned row, so that
/// `batch.len() - downgraded.len()` underflows (a panic in a debug build). The test also needs
/// the audit's `session_scope` column (migration 0003), an undo that joins on scope and key,
/// and a composite-key table without a configured scope refused (not only its columns
/// checked).
#[tokio::test]
async fn scoped_rows_with_the_same_key_are_downgraded_and_undone_by_scope_only() {
    let db = TestDb::new().await;
    let api = fake_api().await;
    let table = shared_table(&db).await;
    exec(
        &db,
        &format!(
            "INSERT INTO {table} VALUES \
             ('a', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-a'), \
             ('b', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-b')"
        ),
    )
    .await;
    let b_before = shared_row(&db, &table, "b", "k1").await;
    let dir = tempfile::tempdir().unwrap();

    // Without a scope the key alone does not identify a row: a configuration error that
    // names the key to set, before anything is written.
    let unscoped = write_settings(dir.path(), &settings_for(&db, &table), "");
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", unscoped.to_str().unwrap(), "--once"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sessions.scope_column"),
        "{}",
        output(&out)
    );
    assert_eq!(shared_row(&db, &table, "a", "k1").await.0, "suspended");
    assert_eq!(shared_row(&db, &table, "b", "k1").await, b_before);

    // Scoped to cluster a: only a's row changes.
    let mut settings = settings_for(&db, &table);
    settings.sessions.scope_column = "cluster".into();
    settings.sessions.scope_value = "a".into();
    settings.validate().unwrap();
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    assert_eq!(
        report.skipped.values().sum::<u64>(),
        0,
        "{:?}",
        report.skipped
    );
    let a = shared_row(&db, &table, "a", "k1").await;
    assert_eq!((a.0.as_str(), a.1.as_deref()), ("gone", None));
    assert_eq!(shared_row(&db, &table, "b", "k1").await, b_before);
    let records = audit_records(&db, &db.audit_table()).await;
    assert_eq!(
        records,
        vec![(
            "downgrade".to_string(),
            table.clone(),
            Some("a".to_string()),
            "k1".to_string()
        )]
    );

    // Make b's row look exactly like a's row as the downgrade left it (state, object,
    // updated_at, cleared column): only the scope tells them apart now.
    exec(
        &db,
        &format!(
            "UPDATE {table} SET state = 'gone', agent_thread_id = NULL, \
             updated_at = (SELECT updated_at FROM {table} WHERE cluster = 'a' AND thread_key = 'k1') \
             WHERE cluster = 'b' AND thread_key = 'k1'"
        ),
    )
    .await;
    let b_lookalike = shared_row(&db, &table, "b", "k1").await;
    let scoped = write_settings(dir.path(), &settings, "");
    let sweep_id = report.sweep_id.to_string();
    let out = run_binary(
        dir.path(),
        None,
        &[
            "--config",
            scoped.to_str().unwrap(),
            "undo",
            "--sweep",
            &sweep_id,
            "--output",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["restored"], 1, "{}", output(&out));
    let a = shared_row(&db, &table, "a", "k1").await;
    assert_eq!(
        (a.0.as_str(), a.1.as_deref()),
        ("suspended", Some("agent-a"))
    );
    assert_eq!(shared_row(&db, &table, "b", "k1").await, b_lookalike);
    let records = audit_records(&db, &db.audit_table()).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[1],
        (
            "undo".to_string(),
            table.clone(),
            Some("a".to_string()),
            "k1".to_string()
        )
    );
}
