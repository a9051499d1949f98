//! The real deployment: centaur's migrated table (`centaur_sandbox_sessions_migrated.sql`),
//! objects named from centaur's one scheme (`centaur-centaur-sandbox-<slug>-<sha10>`, so no
//! prefix tells pods from Sandboxes), the shipped profiles run as the README says, either
//! controller. Each safety test asserts both halves: nothing wrong was written, and the job
//! the profile asks for was done.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use crate::support::*;
use sandbox_reconciler::config::Settings;
use sandbox_reconciler::sweep::SweepResult;
use serde_json::{json, Value};
use sqlx::AssertSqlSafe;

/// A shipped profile, by file name.
fn profile(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

/// The object name centaur gives a session's pod or Sandbox.
fn centaur_name(key: &str) -> String {
    let slug: String = key
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    format!(
        "centaur-centaur-sandbox-{}-{:010x}",
        slug.trim_matches('-'),
        h.finish() & 0xff_ffff_ffff
    )
}

/// What the README's set-up sets for a site: the database, the table, the namespace.
fn site_env(db: &TestDb) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), database_url()),
        ("SANDBOX_RECONCILER__SESSIONS__TABLE".into(), db.table()),
        ("SANDBOX_RECONCILER__AUDIT__TABLE".into(), db.audit_table()),
        (
            "SANDBOX_RECONCILER__CLUSTER__NAMESPACES".into(),
            "agents".into(),
        ),
    ]
}

/// Runs the binary with a profile the way the README does; returns the exit code, standard
/// output and standard error.
async fn run_profile(
    db: &TestDb,
    api: &FakeApiServer,
    profile_name: &str,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = profile(profile_name);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    let owned = site_env(db);
    let mut env: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    env.extend_from_slice(extra_env);
    let out = run_binary(dir.path(), Some(api), &all, &env).await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `--once --output json` run; the report.
async fn once_json(
    db: &TestDb,
    api: &FakeApiServer,
    profile_name: &str,
    extra: &[&str],
) -> (Option<i32>, Value) {
    let mut args = vec!["--once", "--output", "json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run_profile(db, api, profile_name, &args, &[]).await;
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a JSON report ({e}): {stdout}{stderr}"));
    (code, report)
}

/// The rows a correct sweep must never change, as (key, state, agent_thread_id).
async fn untouchable(db: &TestDb, keys: &[String]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for k in keys {
        out.push(db.row(k).await);
    }
    out
}

/// A row keyed `key`, updated `age_minutes` ago, whose object has centaur's name for it.
fn centaur_row(w: WorldBuilder, key: &str, state: &str, age_minutes: i64) -> WorldBuilder {
    w.row(key, state, &centaur_name(key), minutes(age_minutes))
}

/// centaur's bare-pod controller (its default) on centaur's migrated table: one pod per live
/// session, pause deletes the pod, no Sandbox CRD installed. The backlog: `orphans` suspended
/// rows whose pods are gone. Returns the keys that must stay as they are (live with pods,
/// fresh, suspended with a pod).
async fn bare_pod_world(orphans: usize) -> (World, Vec<String>) {
    let mut w = World::migrated_bare_pods("").await;
    let mut keep = Vec::new();
    for (state, n) in [("running", 4), ("idle", 2), ("delivering", 1)] {
        for i in 0..n {
            let key = format!("slack:{state}:{i}");
            w = centaur_row(w.pod(&centaur_name(&key)), &key, state, 30);
            keep.push(key);
        }
    }
    for i in 0..orphans {
        w = centaur_row(w, &format!("slack:C06:{i}"), "suspended", 2000 + i as i64);
    }
    // Suspended a moment ago: inside the grace period.
    for i in 0..3 {
        let key = format!("slack:fresh:{i}");
        w = centaur_row(w, &key, "suspended", 2);
        keep.push(key);
    }
    // Suspended while its pod still exists (pause not finished): present, kept.
    let key = "slack:pausing:0".to_string();
    w = centaur_row(w.pod(&centaur_name(&key)), &key, "suspended", 600);
    keep.push(key);
    for i in 0..5 {
        w = centaur_row(w, &format!("slack:old:{i}"), "gone", 90_000);
    }
    (w.build().await, keep)
}

/// The issue the project exists for, as a new centaur operator meets it: the README's centaur
/// command on a bare-pod cluster with the backlog clears every orphan (capped runs), exit 0,
/// no guard override, and keeps what centaur keeps (`agent_thread_id`, which centaur carries
/// forward when it respawns a gone session). Before, the shipped profile enabled the
/// agent-sandbox backend and every sweep failed ("does not serve sandboxes.agents.x-k8s.io").
#[tokio::test]
async fn the_bare_pod_profile_clears_the_backlog_on_centaurs_table() {
    let (World { db, api, .. }, keep) = bare_pod_world(40).await;
    let kept = untouchable(&db, &keep).await;

    let mut downgraded = 0;
    let mut sweeps = Vec::new();
    for run in 0..3 {
        let (code, report) =
            once_json(&db, &api, "centaur.toml", &["--max-downgrades", "25"]).await;
        assert_eq!(code, Some(0), "run {run}: {report}");
        assert_eq!(report["result"], "success", "{report}");
        downgraded += report["downgraded"].as_u64().unwrap();
        sweeps.push(report["sweep_id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        downgraded, 40,
        "every orphan is cleared within the capped runs"
    );
    for i in 0..40 {
        let (state, thread) = db.row(&format!("slack:C06:{i}")).await;
        assert_eq!(state, "gone");
        assert_eq!(
            thread.as_deref(),
            Some(format!("agent-slack:C06:{i}").as_str()),
            "agent_thread_id is kept"
        );
    }
    assert_eq!(untouchable(&db, &keep).await, kept);
    // The audit records say nothing was cleared.
    let sql = format!(
        "SELECT count(*) FROM {} WHERE action = 'downgrade' AND cleared = '{{}}'::jsonb",
        db.audit_table()
    );
    let clean: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(clean, 40);

    // check passes on the real table and this cluster, serving exactly the bare-pod backend.
    let (code, stdout, stderr) = run_profile(&db, &api, "centaur.toml", &["check"], &[]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("backends.pod resource"), "{stdout}");
    assert!(!stdout.contains("agent_sandbox"), "{stdout}");

    // undo restores the first run's rows on centaur's table.
    let (code, stdout, stderr) = run_profile(
        &db,
        &api,
        "centaur.toml",
        &["undo", "--sweep", &sweeps[0], "--output", "json"],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let undo: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(undo["restored"], 25, "{undo}");
    let suspended = db
        .fingerprint()
        .await
        .into_iter()
        .filter(|(k, s, t)| {
            k.starts_with("slack:C06:")
                && s == "suspended"
                && t.as_deref() == Some(&format!("agent-{k}"))
        })
        .count();
    assert_eq!(suspended, 25);
}

/// An enabled backend the API server does not serve is a configuration error, never
/// absence: `--once`, the daemon and `check` all say so, name the keys and the fixes, and
/// write nothing. Before, `--once` exited 1 and the daemon failed every sweep forever.
#[tokio::test]
async fn a_backend_the_api_server_does_not_serve_is_a_configuration_error() {
    let (World { db, api, .. }, _) = bare_pod_world(5).await;
    let before = db.fingerprint().await;
    for profile_name in ["centaur-migration.toml", "centaur-agent-sandbox.toml"] {
        let (code, report) = once_json(&db, &api, profile_name, &[]).await;
        assert_eq!(code, Some(2), "{profile_name}: {report}");
        let error = report["error"].as_str().unwrap_or_default();
        for needle in [
            "sandboxes.agents.x-k8s.io",
            "backends.agent_sandbox.enabled",
            "CustomResourceDefinition",
            "config/centaur.toml",
        ] {
            assert!(
                error.contains(needle),
                "{profile_name}: {needle} not in {error}"
            );
        }
    }
    // The daemon stops at start-up with exit 2 instead of failing every sweep.
    let (code, stdout, stderr) = run_profile(
        &db,
        &api,
        "centaur-migration.toml",
        &[],
        &[("SANDBOX_RECONCILER__SERVER__LISTEN", "127.0.0.1:0")],
    )
    .await;
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains("backends.agent_sandbox.enabled"),
        "{stderr}"
    );
    // check fails that line (it passed before).
    let (code, stdout, _) = run_profile(&db, &api, "centaur-migration.toml", &["check"], &[]).await;
    assert_eq!(code, Some(1), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("backends.agent_sandbox resource"))
        .unwrap_or_else(|| panic!("no served line: {stdout}"));
    assert!(line.contains("FAIL"), "{line}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("backends.pod resource") && l.contains("pass")),
        "{stdout}"
    );
    assert_eq!(db.fingerprint().await, before);

    // The fix the message names works: the bare-pod profile clears the orphans.
    let (code, report) = once_json(&db, &api, "centaur.toml", &[]).await;
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["downgraded"], 5);
}

/// A migration from bare pods to agent-sandbox: both backends on, one naming scheme. Old
/// pod-era orphans, a few Sandboxes deleted by hand, paused Sandboxes and live sessions of
/// both kinds. The orphans of both eras are cleared with no override; paused Sandboxes' rows
/// and live rows stay. Before: "6 of 8 suspended rows ... have no Sandbox", exit 3.
async fn migration_world(extra_sql: &str) -> (World, Vec<String>, Vec<String>) {
    let mut w = World::migrated(extra_sql).await;
    let mut keep = Vec::new();
    let mut orphans = Vec::new();
    for i in 0..3 {
        let key = format!("slack:pod-live:{i}");
        w = centaur_row(w.pod(&centaur_name(&key)), &key, "running", 30);
        keep.push(key);
    }
    for i in 0..2 {
        // A running Sandbox and the pod its controller made, of the same name.
        let key = format!("slack:sbx-live:{i}");
        let name = centaur_name(&key);
        w = w
            .sandbox(&name, json!({"replicas": 1}))
            .pod_labelled(&name, &[]);
        w = centaur_row(w, &key, "running", 30);
        keep.push(key);
    }
    for i in 0..2 {
        let key = format!("slack:sbx-paused:{i}");
        w = centaur_row(
            w.sandbox(&centaur_name(&key), json!({"replicas": 0})),
            &key,
            "suspended",
            3000,
        );
        keep.push(key);
    }
    for i in 0..6 {
        let key = format!("slack:pod-era:{i}");
        w = centaur_row(w, &key, "suspended", 5000 + i);
        orphans.push(key);
    }
    for i in 0..2 {
        let key = format!("slack:sbx-deleted:{i}");
        w = centaur_row(w, &key, "suspended", 4000 + i);
        orphans.push(key);
    }
    (w.build().await, keep, orphans)
}

#[tokio::test]
async fn the_migration_profile_clears_the_orphans_of_both_eras() {
    let (World { db, api, .. }, keep, orphans) = migration_world("").await;
    let kept = untouchable(&db, &keep).await;
    let (code, report) = once_json(&db, &api, "centaur-migration.toml", &[]).await;
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["downgraded"], orphans.len() as u64, "{report}");
    for k in &orphans {
        assert_eq!(db.state(k).await, "gone", "{k}");
    }
    assert_eq!(untouchable(&db, &keep).await, kept);
    assert!(report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["backend"] == "unknown"));
}

/// The same migration on a shared table (a scope column) and keyed by centaur's uuid
/// `trace_id`: the same orphans are cleared, in process, by the profile's settings.
#[tokio::test]
async fn the_migration_profile_works_on_a_scoped_table_and_a_uuid_key() {
    for variant in ["scoped", "uuid"] {
        let extra = match variant {
            "scoped" => {
                "ALTER TABLE sandbox_sessions ADD COLUMN cluster text NOT NULL DEFAULT 'eu-1'"
            }
            _ => "",
        };
        let (World { db, api, .. }, keep, orphans) = migration_world(extra).await;
        let kept = untouchable(&db, &keep).await;
        let mut settings = Settings::load(&[profile("centaur-migration.toml")]).unwrap();
        settings.database.url = database_url();
        settings.sessions.table = db.table();
        settings.audit.table = db.audit_table();
        settings.cluster.namespaces = vec!["agents".into()];
        match variant {
            "scoped" => {
                settings.sessions.scope_column = "cluster".into();
                settings.sessions.scope_value = "eu-1".into();
            }
            _ => settings.sessions.key_column = "trace_id".into(),
        }
        settings.validate().unwrap();
        let report = sweep(settings, &api, false).await;
        assert_eq!(report.result, SweepResult::Success, "{variant}: {report:?}");
        assert_eq!(report.downgraded, orphans.len() as u64, "{variant}");
        for k in &orphans {
            assert_eq!(db.state(k).await, "gone", "{variant} {k}");
        }
        assert_eq!(untouchable(&db, &keep).await, kept, "{variant}");
    }
}

/// What must still refuse with the migration profile (exit 3, or 2 for a configuration
/// error), each with nothing written; then the right configuration does the job.
#[tokio::test]
async fn the_migration_profile_still_refuses_what_looks_like_misconfiguration() {
    let (World { db, api, .. }, _, orphans) = migration_world("").await;
    let before = db.fingerprint().await;

    // A namespace that exists but is the wrong one holds only unrelated pods and Sandboxes;
    // another exists but is empty.
    api.add_namespace("agents-staging");
    api.add_pod("agents-staging", &centaur_name("staging:1"), MANAGED);
    api.add_sandbox(
        "v1alpha1",
        "agents-staging",
        &centaur_name("staging:2"),
        json!({"replicas": 0}),
    );
    api.add_namespace("agents-empty");
    let namespaces = "SANDBOX_RECONCILER__CLUSTER__NAMESPACES";
    // (what, the setting that is wrong, its value, exit code, what the report names)
    let mistakes = [
        (
            "a namespace that does not exist",
            namespaces,
            "agnets",
            3,
            "namespace_missing",
        ),
        (
            "the wrong namespace",
            namespaces,
            "agents-staging",
            3,
            "backend_listing_unrelated",
        ),
        (
            "a Sandbox selector that selects nothing",
            "SANDBOX_RECONCILER__BACKENDS__AGENT_SANDBOX__LABEL_SELECTOR",
            "app=wrong",
            3,
            "selector_matches_nothing",
        ),
        (
            "a wrong CRD version",
            "SANDBOX_RECONCILER__BACKENDS__AGENT_SANDBOX__VERSION",
            "v1beta1",
            2,
            "does not serve",
        ),
        (
            "an empty listing with live rows",
            namespaces,
            "agents-empty",
            3,
            "empty_listing",
        ),
    ];
    for (what, key, value, exit, needle) in mistakes {
        let (code, stdout, _) = run_profile(
            &db,
            &api,
            "centaur-migration.toml",
            &["--once"],
            &[(key, value)],
        )
        .await;
        assert_eq!(code, Some(exit), "{what}: {stdout}");
        assert!(stdout.contains(needle), "{what}: {stdout}");
    }

    assert_eq!(db.fingerprint().await, before, "a refusal wrote something");
    assert_eq!(db.audit_count().await, 0);

    // The right configuration does the job.
    let (code, report) = once_json(&db, &api, "centaur-migration.toml", &[]).await;
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["downgraded"], orphans.len() as u64);
}

/// The bare-pod profile on a cluster that runs the agent-sandbox controller: a paused
/// Sandbox keeps no pod, so its row would look orphaned to the bare-pod backend alone. The
/// sweep refuses before listing (exit 3, `sandboxes_unwatched`, naming the profiles to use)
/// and writes nothing; with the CRD installed but no Sandbox, it goes ahead; the migration
/// profile does the job.
#[tokio::test]
async fn the_bare_pod_profile_refuses_a_cluster_that_runs_sandboxes() {
    let (World { db, api, .. }, keep, orphans) = migration_world("").await;
    let before = db.fingerprint().await;
    let (code, stdout, stderr) = run_profile(&db, &api, "centaur.toml", &["--once"], &[]).await;
    assert_eq!(code, Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("sandboxes_unwatched"), "{stdout}");
    assert!(stdout.contains("config/centaur-migration.toml"), "{stdout}");
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, 0);

    let kept = untouchable(&db, &keep).await;
    let (code, report) = once_json(&db, &api, "centaur-migration.toml", &[]).await;
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["downgraded"], orphans.len() as u64);
    assert_eq!(untouchable(&db, &keep).await, kept);

    // The CRD installed, no Sandbox in the namespace: the bare-pod profile proceeds.
    let (World { db, api, .. }, _) = bare_pod_world(4).await;
    api.register_sandbox_version("v1alpha1");
    let (code, report) = once_json(&db, &api, "centaur.toml", &[]).await;
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["downgraded"], 4);
}

/// Every column of a row as jsonb, without `updated_at` (an undo bumps it).
async fn image_of(db: &TestDb, key: &str) -> Option<Value> {
    let sql = format!(
        "SELECT to_jsonb(t) - 'updated_at' FROM {} t WHERE thread_key = $1",
        db.table()
    );
    sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(key)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
}

/// centaur deletes `gone` rows an hour after `updated_at`: a wrong downgrade must still be
/// undoable. The audit record keeps the whole row image, and `undo --session KEY` inserts the
/// deleted row back, every column as it was (jsonb, uuid, NOT NULL defaults), state suspended,
/// with its own audit record; a key the platform has re-created meanwhile is listed and left
/// alone, and a record without a usable image is listed, counted and left alone (not "left
/// alone (now row deleted)" for the row that can be inserted back).
#[tokio::test]
async fn undo_inserts_back_a_row_centaur_deleted_after_the_downgrade() {
    let (World { db, api, .. }, keep) = bare_pod_world(4).await;
    let kept = untouchable(&db, &keep).await;
    let rich = format!(
        "UPDATE {} SET thread_name = 'incident', inflight_turn_input = '{{\"text\": \"hi\", \"n\": [1, 2]}}', \
         inflight_attempts = 3, last_result = 'ok', wire_lease_id = 'lease-7' WHERE thread_key LIKE 'slack:C06:%'",
        db.table()
    );
    sqlx::query(AssertSqlSafe(rich))
        .execute(&db.pool)
        .await
        .unwrap();
    let before: Vec<Option<Value>> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(image_of(&db, &format!("slack:C06:{i}")).await);
        }
        v
    };
    let (code, report) = once_json(&db, &api, "centaur.toml", &[]).await;
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["downgraded"], 4, "{report}");
    // centaur's reconcile loop deletes the gone rows; then re-creates slack:C06:1 on a new
    // message (a fresh row with the same key).
    let sql = format!(
        "DELETE FROM {t} WHERE state = 'gone'; \
         INSERT INTO {t} (thread_key, sandbox_id, state) VALUES ('slack:C06:1', 'centaur-centaur-sandbox-new', 'creating'); \
         UPDATE {a} SET row_image = NULL WHERE session_key = 'slack:C06:2'; \
         UPDATE {a} SET row_image = row_image || '{{\"retired_column\": 1}}' WHERE session_key = 'slack:C06:3'",
        t = db.table(),
        a = db.audit_table()
    );
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();
    let recreated = image_of(&db, "slack:C06:1").await;
    let audit_before = {
        let sql = format!("SELECT count(*) FROM {}", db.audit_table());
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };

    // The dry run says what would happen and writes nothing.
    let sweep_id = report["sweep_id"].as_str().unwrap().to_string();
    let (code, stdout, stderr) = run_profile(
        &db,
        &api,
        "centaur.toml",
        &[
            "undo",
            "--sweep",
            &sweep_id,
            "--dry-run",
            "--output",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let dry: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (dry["restored"].as_u64(), dry["left_alone"].as_u64()),
        (Some(1), Some(3)),
        "{dry}"
    );
    assert_eq!(dry["unrestorable"], 2, "{dry}");
    assert!(image_of(&db, "slack:C06:0").await.is_none());

    let (code, stdout, stderr) = run_profile(
        &db,
        &api,
        "centaur.toml",
        &["undo", "--sweep", &sweep_id],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("1 restored, 3 left alone"), "{stdout}");
    assert!(
        stdout.contains("inserted back from its row image"),
        "{stdout}"
    );
    assert!(stdout.contains("keeps no row image"), "{stdout}");
    assert!(stdout.contains("retired_column"), "{stdout}");
    // Restored whole: every column as before the downgrade (updated_at is bumped).
    assert_eq!(image_of(&db, "slack:C06:0").await, before[0]);
    assert_eq!(db.state("slack:C06:0").await, "suspended");
    // The re-created row is untouched; the others stay deleted.
    assert_eq!(image_of(&db, "slack:C06:1").await, recreated);
    assert!(image_of(&db, "slack:C06:2").await.is_none());
    assert!(image_of(&db, "slack:C06:3").await.is_none());
    assert_eq!(untouchable(&db, &keep).await, kept);
    let sql = format!(
        "SELECT session_key, old_state, new_state, evidence ->> 'restored' FROM {} WHERE action = 'undo'",
        db.audit_table()
    );
    let undo_records: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as(AssertSqlSafe(sql))
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(undo_records.len(), 1, "{undo_records:?}");
    assert_eq!(undo_records[0].0, "slack:C06:0");
    assert_eq!(undo_records[0].2, "suspended");
    assert!(undo_records[0].3.as_deref().unwrap().contains("row image"));
    let sql = format!("SELECT count(*) FROM {}", db.audit_table());
    let audit_after: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(audit_after, audit_before + 1);
    // Undone once only.
    let (_, stdout, _) = run_profile(
        &db,
        &api,
        "centaur.toml",
        &["undo", "--sweep", &sweep_id],
        &[],
    )
    .await;
    assert!(stdout.contains("0 restored, 3 left alone"), "{stdout}");
}
