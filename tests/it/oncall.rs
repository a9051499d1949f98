//! On call without a database login: `explain` (why a sweep would or would not change a
//! session; the same decision as the sweep, read-only), `history` (the audit records), and
//! `/last-sweep`'s link to them.

use std::collections::{BTreeMap, BTreeSet};

use crate::support::*;
use sandbox_reconciler::explain;
use sandbox_reconciler::plan::{RowOutcome, RowVerdict};
use sandbox_reconciler::store::{self, Database, TableMapping};
use serde_json::{json, Value};

/// Every kind of row a sweep meets, and a cap smaller than the orphans. Returns the keys.
async fn mixed_world() -> (TestDb, FakeApiServer, Vec<String>) {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_namespace("agents");
    exec(
        &db,
        &format!(
            "ALTER TABLE {t} DROP CONSTRAINT sandbox_sessions_state_check; \
             ALTER TABLE {t} ALTER COLUMN sandbox_id DROP NOT NULL",
            t = db.table()
        ),
    )
    .await;
    for i in 0..4 {
        api.add_pod("agents", &format!("pod-live-{i}"), MANAGED);
        db.insert(
            &format!("live-{i}"),
            "running",
            &format!("pod-live-{i}"),
            minutes(60),
        )
        .await;
    }
    db.insert("live-missing", "idle", "pod-live-missing", minutes(60))
        .await;
    api.add_pod("agents", "pod-sus-present", MANAGED);
    db.insert("sus-present", "suspended", "pod-sus-present", minutes(60))
        .await;
    for i in 0..4 {
        db.insert(
            &format!("orphan-{i}"),
            "suspended",
            &format!("pod-orphan-{i}"),
            minutes(100 - i),
        )
        .await;
    }
    db.insert("fresh", "suspended", "pod-fresh", minutes(2))
        .await;
    api.add_pod("agents", "pod-terminating", MANAGED);
    api.set_terminating(Kind::Pod, "agents", "pod-terminating");
    db.insert("terminating", "suspended", "pod-terminating", minutes(60))
        .await;
    api.add_sandbox("v1alpha1", "agents", "sb-paused", json!({"replicas": 0}));
    db.insert("paused", "suspended", "sb-paused", minutes(60))
        .await;
    db.insert("sb-orphan", "suspended", "sb-missing", minutes(70))
        .await;
    db.insert("weird", "hibernating", "pod-weird", minutes(60))
        .await;
    db.insert("no-object", "suspended", "x", minutes(60)).await;
    exec(
        &db,
        &format!(
            "UPDATE {} SET sandbox_id = NULL WHERE thread_key = 'no-object'",
            db.table()
        ),
    )
    .await;
    db.insert("bad-name", "suspended", "Not_A_Name", minutes(60))
        .await;
    db.insert("gone", "gone", "pod-gone", minutes(60)).await;
    db.insert("creating", "creating", "pod-creating", minutes(1))
        .await;
    let keys: Vec<String> = db.fingerprint().await.into_iter().map(|r| r.0).collect();
    (db, api, keys)
}

/// The sweep decides, explain prints that decision: for every row of a mixed fixture,
/// explain's outcome (would downgrade now / deferred by the cap / kept, and why) is what a
/// `--once --dry-run` sweep did with it.
#[tokio::test]
async fn explain_agrees_with_a_dry_run_sweep_on_every_row_of_a_mixed_fixture() {
    let (db, api, keys) = mixed_world().await;
    let mut settings = db.settings();
    settings.sweep.max_downgrades_per_sweep = 2;
    let before = db.fingerprint().await;
    let report = sweep(settings.clone(), &api, true).await;
    assert_eq!(
        report.result,
        sandbox_reconciler::sweep::SweepResult::Success,
        "{report:?}"
    );
    let reconciler = reconciler(settings, &api);
    let mut outcomes = BTreeMap::new();
    let mut verdicts = BTreeMap::new();
    let mut lookups = BTreeMap::new();
    for key in &keys {
        let e = explain::run(&reconciler, key)
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        lookups.insert(key.clone(), e.lookups.clone());
        assert!(e.row.is_some(), "{key}");
        assert!(!e.steps.is_empty());
        outcomes.insert(key.clone(), e.outcome.clone().unwrap());
        verdicts.insert(key.clone(), e.verdict.clone().unwrap());
    }
    // Would downgrade now: exactly the sweep's changes.
    let downgrade: BTreeSet<&str> = outcomes
        .iter()
        .filter(|(_, o)| **o == RowOutcome::Downgrade)
        .map(|(k, _)| k.as_str())
        .collect();
    let changed: BTreeSet<&str> = report.changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(downgrade, changed);
    // The oldest two orphans (the cap), oldest first.
    assert_eq!(changed, BTreeSet::from(["orphan-0", "orphan-1"]));
    // Deferred by the cap: as many as the sweep deferred, at places 3.. in the cap's order.
    let deferred: BTreeMap<&str, u64> = outcomes
        .iter()
        .filter_map(|(k, o)| match o {
            RowOutcome::Deferred { position, cap } => {
                assert_eq!(*cap, 2);
                Some((k.as_str(), *position))
            }
            _ => None,
        })
        .collect();
    assert_eq!(deferred.len() as u64, report.deferred, "{deferred:?}");
    assert_eq!(
        deferred,
        BTreeMap::from([("orphan-2", 3), ("orphan-3", 4), ("sb-orphan", 5)])
    );
    // Kept, and why: the sweep's own counts of each reason.
    let count =
        |pred: &dyn Fn(&RowVerdict) -> bool| verdicts.values().filter(|v| pred(v)).count() as u64;
    assert_eq!(
        count(&|v| matches!(v, RowVerdict::WithinGrace { .. })),
        report.within_grace
    );
    let mut skipped = BTreeMap::new();
    for v in verdicts.values() {
        if let RowVerdict::Skipped { reason, .. } = v {
            *skipped.entry(*reason).or_insert(0u64) += 1;
        }
    }
    assert_eq!(skipped, report.skipped);
    for (backend, figures) in &report.backends {
        let protected_suspended = count(
            &|v| matches!(v, RowVerdict::Protected { backend: b, live: false, .. } if b == backend),
        );
        assert_eq!(
            protected_suspended, figures.suspended_with_object,
            "{backend}"
        );
        let live_missing =
            count(&|v| matches!(v, RowVerdict::LiveWithoutObject { backend: b } if b == backend));
        assert_eq!(live_missing, figures.live_without_object, "{backend}");
    }
    // The row-by-row expectations an operator would state.
    let kept = |k: &str| explain::kept_reason(&verdicts[k]);
    assert_eq!(outcomes["fresh"], RowOutcome::Kept);
    assert_eq!(kept("fresh"), "within the grace period");
    assert_eq!(
        kept("paused"),
        "its object exists in agent-sandbox (paused)"
    );
    assert_eq!(
        kept("terminating"),
        "its object exists in pod (terminating)"
    );
    assert_eq!(kept("sus-present"), "its object exists in pod");
    assert_eq!(kept("live-missing"), "a live row without object");
    assert_eq!(kept("weird"), "skipped (unknown_state)");
    assert_eq!(kept("no-object"), "skipped (null_object_name)");
    assert_eq!(kept("bad-name"), "skipped (invalid_object_name)");
    assert_eq!(kept("gone"), "not in the suspended state");
    assert_eq!(kept("creating"), "not in the suspended state");
    // The GETs, one per backend and namespace, say the same as the listing.
    use sandbox_reconciler::cluster::LookupAnswer;
    let answers =
        |k: &str| -> Vec<LookupAnswer> { lookups[k].iter().map(|l| l.answer.clone()).collect() };
    assert_eq!(
        answers("paused"),
        vec![
            LookupAnswer::Absent,
            LookupAnswer::Found {
                namespace: Some("agents".into()),
                paused: true,
                terminating: false
            }
        ]
    );
    assert_eq!(
        answers("terminating")[0],
        LookupAnswer::Found {
            namespace: Some("agents".into()),
            paused: false,
            terminating: true
        }
    );
    assert_eq!(
        answers("orphan-0"),
        vec![LookupAnswer::Absent, LookupAnswer::Absent]
    );
    assert!(lookups["no-object"].is_empty() && lookups["bad-name"].is_empty());
    // Read-only: nothing changed, no audit table was created.
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, 0);
    let audit_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(db.audit_table())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!audit_exists, "explain created the audit table");
}

/// A guard refusal is the answer for an orphan: explain names the guard, as the sweep refuses.
#[tokio::test]
async fn explain_names_the_guard_that_refuses() {
    let (db, api) = seeded(1, 2).await;
    // Most live rows have no pod: live_rows_missing.
    db.insert("live-x", "running", "pod-x", minutes(60)).await;
    db.insert("live-y", "running", "pod-y", minutes(60)).await;
    let report = sweep(db.settings(), &api, true).await;
    assert_eq!(
        report.result,
        sandbox_reconciler::sweep::SweepResult::Refused
    );
    let e = explain::run(&reconciler(db.settings(), &api), "orphan-0")
        .await
        .unwrap();
    assert_eq!(
        e.outcome,
        Some(RowOutcome::Refused {
            reason: sandbox_reconciler::plan::RefusalReason::LiveRowsMissing
        })
    );
    assert!(e.summary.contains("live_rows_missing"), "{}", e.summary);
}

/// The binary's `explain --output json` for one key, beside a writer that holds the writer
/// lock (a running daemon): it answers at once, takes no lock, writes nothing, and shows each
/// backend's GET.
#[tokio::test]
async fn explain_json_for_one_key_runs_beside_the_writer_and_writes_nothing() {
    let (db, api) = seeded(2, 1).await;
    let settings = db.settings();
    // Downgrade once, so the audit table exists, then bring the orphan back to suspended.
    let first = sweep(settings.clone(), &api, false).await;
    assert_eq!(first.downgraded, 1, "{first:?}");
    exec(
        &db,
        &format!(
            "UPDATE {} SET state = 'suspended', updated_at = now() - interval '2 hours' WHERE thread_key = 'orphan-0'",
            db.table()
        ),
    )
    .await;
    let mut writer = Database::new(&settings).unwrap().connect().await.unwrap();
    let mapping = store::resolve(
        &mut writer,
        &TableMapping::from_settings(&settings).unwrap(),
    )
    .await
    .unwrap();
    assert!(store::try_writer_lock(&mut writer, &mapping).await.unwrap());
    let before = db.fingerprint().await;
    let audit_before = db.audit_count().await;
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "");
    let out = run_binary(
        dir.path(),
        Some(&api),
        &[
            "explain",
            "--session",
            "orphan-0",
            "--output",
            "json",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["session"], "orphan-0");
    assert_eq!(doc["outcome"]["outcome"], "downgrade", "{doc}");
    assert_eq!(doc["verdict"]["verdict"], "orphan");
    assert_eq!(doc["row"]["state"], "suspended");
    assert!(doc["row"]["age_seconds"].as_i64().unwrap() >= 7000, "{doc}");
    assert_eq!(doc["guard"]["verdict"], "proceed");
    assert_eq!(doc["cap_position"], 1);
    // One GET per enabled backend in the one namespace, each answering 404.
    let lookups = doc["lookups"].as_array().unwrap();
    assert_eq!(lookups.len(), 2, "{doc}");
    for l in lookups {
        assert_eq!(l["answer"]["answer"], "absent", "{l}");
        assert!(l["request"].as_str().unwrap().starts_with("GET "), "{l}");
    }
    assert!(api
        .requests()
        .iter()
        .any(|r| r.method == "GET" && r.path.ends_with("/pods/pod-gone-0")));
    // The earlier downgrade, with its evidence.
    let audit = doc["audit"].as_array().unwrap();
    assert_eq!(audit.len(), 1, "{doc}");
    assert_eq!(audit[0]["action"], "downgrade");
    assert_eq!(audit[0]["sweep_id"], first.sweep_id.to_string());
    assert!(audit[0]["row_image"].as_bool().unwrap());
    assert!(audit[0]["evidence"]
        .as_str()
        .unwrap()
        .contains("complete listing"));
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, audit_before);
    // The text form says the same in steps.
    let out = run_binary(
        dir.path(),
        Some(&api),
        &[
            "explain",
            "--session",
            "orphan-0",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for needle in [
        "scope",
        "clock",
        "object",
        "guard",
        "cap",
        "GET pods agents/pod-gone-0",
        "=> would downgrade now",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    drop(writer);
}

/// A key with no row: explain says so (exit 0) and, when the row was downgraded and then
/// deleted, points at `undo`.
#[tokio::test]
async fn explain_of_a_deleted_row_points_at_undo() {
    let (db, api) = seeded(2, 2).await;
    let report = sweep(db.settings(), &api, false).await;
    assert_eq!(report.downgraded, 2);
    exec(
        &db,
        &format!("DELETE FROM {} WHERE thread_key = 'orphan-0'", db.table()),
    )
    .await;
    let r = reconciler(db.settings(), &api);
    let e = explain::run(&r, "orphan-1").await.unwrap();
    assert_eq!(e.row.as_ref().unwrap().state.as_deref(), Some("gone"));
    assert_eq!(e.outcome, Some(RowOutcome::Kept));
    assert!(
        e.summary
            .starts_with("kept: not in the suspended state; downgraded at ")
            && e.summary.contains("`undo --session orphan-1` restores it"),
        "{}",
        e.summary
    );
    let e = explain::run(&r, "orphan-0").await.unwrap();
    assert!(e.row.is_none());
    assert!(e.outcome.is_none());
    assert!(
        e.summary
            .starts_with("the row is gone; last downgraded at ")
            && e.summary
                .contains("`undo --session orphan-0` can restore it from its row image"),
        "{}",
        e.summary
    );
    let e = explain::run(&r, "never-existed").await.unwrap();
    assert_eq!(e.summary, "no such row, and no audit record of it");
}

/// `history`: the audit records without SQL, filtered by time, session and sweep, as a table
/// or JSON; a missing audit table is an answer, not an error.
#[tokio::test]
async fn history_lists_downgrades_and_undos_without_sql() {
    let (db, api) = seeded(2, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "");
    let cfg = config.to_str().unwrap();
    let run = |args: Vec<String>| {
        let dir = dir.path().to_path_buf();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run_binary(&dir, None, &args, &[]).await;
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = vec!["history".into(), "--config".into(), cfg.into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let (code, stdout, stderr) = run(args(&[])).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("does not exist"), "{stdout}");
    assert_eq!(db.audit_count().await, 0);

    let report = sweep(db.settings(), &api, false).await;
    assert_eq!(report.downgraded, 2);
    let undone = undo_session(&db.settings(), "orphan-1").await.unwrap();
    assert_eq!(undone.restored, 1);

    let (code, stdout, _) = run(args(&["--since", "90m", "--output", "json"])).await;
    assert_eq!(code, Some(0), "{stdout}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    let records = doc["records"].as_array().unwrap();
    assert_eq!(records.len(), 3, "{doc}");
    // Newest first: the undo.
    assert_eq!(records[0]["action"], "undo");
    assert_eq!(records[0]["key"], "orphan-1");
    assert_eq!(records[0]["old_state"], "gone");
    assert_eq!(records[0]["new_state"], "suspended");
    for r in &records[1..] {
        assert_eq!(r["action"], "downgrade");
        assert_eq!(r["sweep_id"], report.sweep_id.to_string());
        assert_eq!(r["backend"], "pod");
        assert_eq!(r["reason"], "orphaned_suspended");
        assert!(r["cluster"].is_string(), "{r}");
        assert!(
            r["evidence"].as_str().unwrap().contains("complete listing"),
            "{r}"
        );
        assert!(r["object"].as_str().unwrap().starts_with("pod-gone-"));
    }
    let (_, stdout, _) = run(args(&["--session", "orphan-0", "--output", "json"])).await;
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["records"].as_array().unwrap().len(), 1, "{doc}");
    let sweep_id = report.sweep_id.to_string();
    let (code, stdout, _) = run(args(&["--sweep", &sweep_id])).await;
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("2 audit record(s)"), "{stdout}");
    assert!(
        stdout.contains("downgrade") && stdout.contains("suspended -> gone"),
        "{stdout}"
    );
    // Bad input is a usage error, not a crash.
    let (code, _, stderr) = run(args(&["--since", "yesterday"])).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("90m, 24h, 7d"), "{stderr}");
}

/// A malformed audit record (evidence not an object, the key missing) is listed as read and
/// counted, never a failure.
#[tokio::test]
async fn history_lists_a_malformed_record_and_counts_it() {
    let (db, api) = seeded(2, 1).await;
    assert_eq!(sweep(db.settings(), &api, false).await.downgraded, 1);
    exec(
        &db,
        &format!(
            "INSERT INTO {a} (sweep_id, session_table, session_key, old_state, new_state, reason, evidence) \
             VALUES (gen_random_uuid(), '{t}', 'odd', 'suspended', 'gone', 'orphaned_suspended', '\"just text\"'); \
             INSERT INTO {a} (sweep_id, action, session_table, session_key, old_state, new_state, reason) \
             VALUES (gen_random_uuid(), 'rename', '{t}', 'odd2', 'x', 'y', 'manual')",
            a = db.audit_table(),
            t = db.table()
        ),
    )
    .await;
    let settings = db.settings();
    let mut conn = Database::new(&settings).unwrap().connect().await.unwrap();
    let mapping = store::resolve(&mut conn, &TableMapping::from_settings(&settings).unwrap())
        .await
        .unwrap();
    let h = sandbox_reconciler::history::read(
        &mut conn,
        &mapping,
        &sandbox_reconciler::history::HistoryFilter {
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(h.records.len(), 3);
    assert_eq!(h.malformed, 1, "{:?}", h.records);
    let text = sandbox_reconciler::history::text(&h);
    assert!(text.contains("1 malformed"), "{text}");
}
