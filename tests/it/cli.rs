//! The binary spawned as a process: exit codes, output formats, snapshot mode, profiles.

use crate::support::*;
use serde_json::json;
use sqlx::AssertSqlSafe;

/// Five live pods (three list pages of two) and one orphan.
async fn setup() -> World {
    World::seeded(5, 0)
        .await
        .row("orphan", "suspended", "pod-deleted", minutes(120))
        .build()
        .await
}

#[tokio::test]
async fn once_downgrades_and_exits_0_with_json_summary() {
    let w = setup().await;
    let (db, out) = (&w.db, w.run(&["--once", "--output", "json"], &[]).await);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["result"], "success");
    assert_eq!(report["downgraded"], 1);
    assert_eq!(report["backends"]["pod"]["cluster_objects"], 5);
    assert_eq!(db.state("orphan").await, "gone");
    assert!(
        stderr(&out).contains("downgraded session to gone"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn api_error_on_page_2_of_3_exits_1_and_writes_nothing() {
    let w = setup().await;
    let (db, api) = (&w.db, &w.api);
    // 5 pods, page size 2: three pages; the second fails.
    api.inject(Fault::on_list_page(
        "/pods",
        1,
        FaultAction::Status(500, None),
    ));
    let before = db.fingerprint().await;
    let out = w.once(&[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("500"), "{}", stdout(&out));
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, 0);
}

#[tokio::test]
async fn guard_refusal_exits_3_and_writes_nothing() {
    let w = setup().await;
    let (db, api) = (&w.db, &w.api);
    // The live rows' pods vanish (deleted behind the platform's back, or a wrong context):
    // most live rows have no object, so the sweep refuses.
    for i in 0..5 {
        api.remove(Kind::Pod, "agents", &format!("pod-live-{i}"));
    }
    api.add_pod("agents", "pod-unrelated", MANAGED);
    let before = db.fingerprint().await;
    let out = w.once(&[]).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("REFUSED"), "{}", stdout(&out));
    assert_eq!(db.fingerprint().await, before);
}

/// Decided (docs/DESIGN.md, rule 2 and "Guards"): presence is by name, whatever the labels,
/// as a GET's is. An object that lost its label still protects its row; a label selector that
/// selects none of the listed objects the rows refer to is a wrong configuration and is
/// refused (exit 3, `selector_matches_nothing`) with nothing written, where before it went
/// ahead and reported every pod as not the platform's.
#[tokio::test]
async fn a_wrong_label_selector_is_refused_and_a_lost_label_never_makes_an_object_absent() {
    let World { db, api, dir, .. } = setup().await;
    let before = db.fingerprint().await;
    let config = db.write_config(
        dir.path(),
        "[backends.pod]\nlabel_selector = \"app=wrong\"\n",
    );
    let once = |config: std::path::PathBuf| {
        let dir = dir.path().to_path_buf();
        let api = &api;
        async move {
            run_binary(
                &dir,
                Some(api),
                &[
                    "--once",
                    "--output",
                    "json",
                    "--config",
                    config.to_str().unwrap(),
                ],
                &[],
            )
            .await
        }
    };
    let out = once(config).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        report["guard"]["reason"], "selector_matches_nothing",
        "{report}"
    );
    assert!(
        report["guard"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("backends.pod.label_selector"),
        "{report}"
    );
    assert_eq!(db.fingerprint().await, before);

    // One live pod loses its label: its row keeps it, the real orphan goes.
    api.remove(Kind::Pod, "agents", "pod-live-0");
    api.add_pod("agents", "pod-live-0", &[]);
    let out = once(db.write_config(dir.path(), "")).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["downgraded"], 1);
    assert_eq!(report["backends"]["pod"]["cluster_objects"], 4);
    for i in 0..5 {
        assert_eq!(db.state(&format!("live-{i}")).await, "running");
    }
    assert_eq!(db.state("orphan").await, "gone");
}

#[tokio::test]
async fn bad_config_key_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[sweep]\nmax_downgrade_per_sweep = 10\n").unwrap();
    let out = run_binary(
        dir.path(),
        None,
        &["--once", "--config", path.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("max_downgrade_per_sweep"),
        "{}",
        stderr(&out)
    );

    let out = run_binary(
        dir.path(),
        None,
        &["--once"],
        &[(
            "SANDBOX_RECONCILER__SESSIONS__STATE_COLUMN",
            "state; DROP TABLE x",
        )],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("sessions.state_column"),
        "{}",
        stderr(&out)
    );

    let out = run_binary(dir.path(), None, &["--once", "--bogus-flag"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn missing_column_is_named_with_its_key() {
    let w = setup().await;
    let out = w
        .once(&[("SANDBOX_RECONCILER__SESSIONS__OBJECT_COLUMN", "sandbox_idd")])
        .await;
    // A table that does not fit the configuration is a configuration error, refused before
    // any sweep (exit 2), with the key to change.
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("no column sandbox_idd; set sessions.object_column"),
        "{text}"
    );
}

#[tokio::test]
async fn second_writer_is_refused_the_lock() {
    let World { db, api, dir, .. } = setup().await;
    let config = db.write_config(dir.path(), "");
    let settings = db.settings();
    let key = sandbox_reconciler::store::TableMapping::from_settings(&settings)
        .unwrap()
        .lock_key();
    let mut holder = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();
    let before = db.fingerprint().await;
    let out = run_once(dir.path(), &api, &config, &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("holds the writer lock"),
        "{}",
        stdout(&out)
    );
    assert_eq!(db.fingerprint().await, before);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();
}

#[tokio::test]
async fn snapshot_mode_reads_a_dump_and_never_writes() {
    let World { db, dir, .. } = setup().await;
    let mut items: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": format!("pod-live-{i}"), "namespace": "agents",
                                "labels": {"centaur.ai/managed": "true"}}})
        })
        .collect();
    items.push(
        json!({"apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox",
                      "metadata": {"name": "sb-paused", "namespace": "agents"},
                      "spec": {"replicas": 0}}),
    );
    db.insert("paused", "suspended", "sb-paused", minutes(60))
        .await;
    let dump = dir.path().join("cluster.json");
    std::fs::write(
        &dump,
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    )
    .unwrap();
    let config = db.write_config(dir.path(), "");
    let before = db.fingerprint().await;
    let out = run_binary(
        dir.path(),
        None,
        &[
            "--config",
            config.to_str().unwrap(),
            "--cluster-snapshot",
            dump.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(text.contains("dry run"), "{text}");
    assert!(text.contains("would downgrade"), "{text}");
    assert!(text.contains("orphan  object=pod-deleted"), "{text}");
    assert!(!text.contains("paused  object"), "{text}");
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, 0);
}

/// The migration profile (both backends, no prefixes, as centaur names its objects) on a
/// table holding rows of both eras: the orphans of both are cleared, the paused Sandbox's row
/// stays, and `agent_thread_id` is kept on every row (centaur carries it forward).
#[tokio::test]
async fn centaur_migration_profile_against_the_centaur_table() {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // agent-sandbox backend: paused sessions keep their Sandbox, running ones have a pod too.
    api.add_sandbox("v1alpha1", "agents", "sb-run", json!({"replicas": 1}));
    api.add_pod("agents", "sb-run", MANAGED);
    api.add_sandbox("v1alpha1", "agents", "sb-paused", json!({"replicas": 0}));
    // bare-pod backend rows from before the switch.
    api.add_pod("agents", "pod-idle", MANAGED);
    db.insert("t-run", "running", "sb-run", minutes(60)).await;
    db.insert("t-paused", "suspended", "sb-paused", minutes(600))
        .await;
    db.insert("t-idle", "idle", "pod-idle", minutes(60)).await;
    db.insert(
        "t-old-pod",
        "suspended",
        "pod-paused-long-ago",
        minutes(6000),
    )
    .await;
    db.insert("t-old-sb", "suspended", "sb-deleted", minutes(6000))
        .await;
    db.insert("t-gone", "gone", "sb-x", minutes(6000)).await;
    let sql = format!(
        "UPDATE {} SET agent_thread_id = NULL WHERE thread_key = 't-gone'",
        db.table()
    );
    sqlx::query(AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();
    let table = db.table();
    let audit = db.audit_table();
    let out = run_binary(
        dir.path(),
        Some(&api),
        &[
            "--once",
            "--config",
            "config/default.toml",
            "--config",
            "config/centaur-migration.toml",
        ],
        &[
            ("DATABASE_URL", &database_url()),
            ("SANDBOX_RECONCILER__SESSIONS__TABLE", &table),
            ("SANDBOX_RECONCILER__AUDIT__TABLE", &audit),
            ("SANDBOX_RECONCILER__CLUSTER__NAMESPACES", "agents"),
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        db.row("t-old-pod").await,
        ("gone".into(), Some("agent-t-old-pod".into()))
    );
    assert_eq!(
        db.row("t-old-sb").await,
        ("gone".into(), Some("agent-t-old-sb".into()))
    );
    assert_eq!(
        db.row("t-paused").await,
        ("suspended".into(), Some("agent-t-paused".into()))
    );
    assert_eq!(db.state("t-run").await, "running");
    assert_eq!(db.state("t-idle").await, "idle");
    assert_eq!(db.audit_count().await, 2);
}
