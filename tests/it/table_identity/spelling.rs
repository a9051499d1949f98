//! One table, two spellings: the table is identified by its catalog identity, not by how the
//! configuration spells it.

use std::time::Duration;

use crate::support::*;
use sandbox_reconciler::store::{self, Database, TableMapping};
use sandbox_reconciler::sweep::SweepResult;
use sandbox_reconciler::undo::{self, UndoRequest};
use sqlx::{AssertSqlSafe, Connection};

use super::*;

/// With `search_path` set to the test schema, `sandbox_sessions` and
/// `<schema>.sandbox_sessions` are the same table: one canonical name, one writer lock, one
/// name in the audit records, one set of migrations whichever way the audit table is spelled.
///
/// Keyed on the name as typed (`sandbox_sessions` vs `<schema>.sandbox_sessions`), the lock
/// would have two keys, so both spellings could write at once, and the audit two names; and a
/// checksum of the *rendered* migration SQL (which contains the audit table as spelled) would
/// fail the second spelling with "migration 1 was previously applied but has been
/// modified".
#[tokio::test]
async fn two_spellings_of_one_table_share_lock_audit_name_and_migrations() {
    let db = TestDb::new().await;
    let api = fake_api().await;
    let schema = db.schema.clone();
    db.insert("x", "suspended", "pod-x", minutes(90)).await;
    db.insert("y", "suspended", "pod-y", minutes(60)).await;
    let url = search_path_url(&schema);
    let canonical = format!("{schema}.sandbox_sessions");

    let mut bare = db.settings();
    bare.database.url = url.clone();
    bare.sessions.table = "sandbox_sessions".into();
    bare.audit.table = "reconciler_audit".into();
    bare.sweep.max_downgrades_per_sweep = 1;
    bare.validate().unwrap();
    let mut qualified = bare.clone();
    qualified.sessions.table = canonical.clone();
    qualified.audit.table = db.audit_table();

    let mut conn = connect(&bare).await;
    let search_path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        search_path, schema,
        "the options URL parameter sets search_path"
    );
    let a = store::resolve(&mut conn, &TableMapping::from_settings(&bare).unwrap())
        .await
        .unwrap();
    let b = store::resolve(&mut conn, &TableMapping::from_settings(&qualified).unwrap())
        .await
        .unwrap();
    assert_eq!(a.table_display(), canonical);
    assert_eq!(b.table_display(), canonical);
    assert_eq!(a.lock_key(), b.lock_key());
    assert_eq!(
        a.resolved.as_ref().map(|r| r.oid),
        b.resolved.as_ref().map(|r| r.oid)
    );
    // The configured spellings alone (unresolved) would differ: the catalog makes them one.
    assert_ne!(
        TableMapping::from_settings(&bare).unwrap().lock_key(),
        TableMapping::from_settings(&qualified).unwrap().lock_key()
    );

    // The audit migrations, with the audit table spelled both ways: one table, no mismatch.
    store::migrate(&mut conn, &a).await.unwrap();
    store::migrate(&mut conn, &b).await.unwrap();
    store::migrate(&mut conn, &a).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT version FROM {schema}.reconciler_audit_migrations WHERE success ORDER BY version"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4]);
    drop(conn);

    // A writer holding the lock taken with one spelling keeps out a --once run with the other.
    let before = db.fingerprint().await;
    let holder = hold_lock(a.lock_key()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_settings(dir.path(), &qualified, "");
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", config.to_str().unwrap(), "--once"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", output(&out));
    assert!(
        output(&out).contains("holds the writer lock"),
        "{}",
        output(&out)
    );
    assert_eq!(db.fingerprint().await, before);
    holder.close().await.unwrap();

    // Each spelling downgrades one row (cap 1, oldest first); both audit records carry the
    // canonical name.
    let r = sweep(bare.clone(), &api, false).await;
    assert_eq!(r.result, SweepResult::Success, "{:?}", r.error);
    assert_eq!(r.downgraded, 1);
    assert_eq!(r.table.as_deref(), Some(canonical.as_str()));
    let r = sweep(qualified.clone(), &api, false).await;
    assert_eq!(r.result, SweepResult::Success, "{:?}", r.error);
    assert_eq!(r.downgraded, 1);
    assert_eq!(db.state("x").await, "gone");
    assert_eq!(db.state("y").await, "gone");
    let records = audit_records(&db, &db.audit_table()).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(
        records.iter().all(|r| r.1 == canonical),
        "audit records must carry the canonical name: {records:?}"
    );

    // An undo configured with the bare spelling finds the record the qualified one wrote.
    let undone = undo::run(
        &Database::new(&bare).unwrap(),
        &TableMapping::from_settings(&bare).unwrap(),
        &UndoRequest {
            sweep: None,
            session: Some("y".into()),
            dry_run: true,
        },
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(undone.restored, 1);
}
