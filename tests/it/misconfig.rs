//! The mistakes operators actually make, each one a regression test: a namespace typo at a
//! quiet hour, a wrong cluster, backends without prefixes, a database that stops answering,
//! and the figures that must stay true around them (docs/RELIABILITY.md, misconfiguration
//! table). Real PostgreSQL, the real kube::Client against the fake API server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::daemon::metric;
use crate::support::*;
use sandbox_reconciler::cluster::BackendKind;
use sandbox_reconciler::metrics::Metrics;
use sandbox_reconciler::plan::{GuardVerdict, RefusalReason};
use sandbox_reconciler::sweep::{ErrorKind, SweepOptions, SweepResult};
use serde_json::json;
use sqlx::AssertSqlSafe;

fn refusal(report: &sandbox_reconciler::sweep::SweepReport) -> Option<RefusalReason> {
    match &report.guard {
        Some(GuardVerdict::Refuse { reason, .. }) => Some(*reason),
        _ => None,
    }
}

/// Night time on the agent-sandbox backend: every session is idle, so suspended, and every
/// Sandbox is paused (`replicas: 0`) but still there, in namespace "agents".
async fn quiet_hour() -> (TestDb, FakeApiServer) {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    for i in 0..6 {
        let name = format!("sb-paused-{i}");
        api.add_sandbox("v1alpha1", "agents", &name, json!({"replicas": 0}));
        db.insert(&format!("s{i}"), "suspended", &name, minutes(120))
            .await;
    }
    (db, api)
}

/// With a namespace that does not exist, every listing is empty and every GET answers 404,
/// which would make every paused Sandbox's row look orphaned: the sweep refuses before
/// listing, names the namespace and the key, and exits 3.
#[tokio::test]
async fn namespace_typo_at_a_quiet_hour_refuses_and_names_the_key() {
    let (db, api) = quiet_hour().await;
    let before = db.fingerprint().await;
    let mut settings = db.settings();
    settings.cluster.namespaces = vec!["agnets".into()];
    let report = sweep(settings, &api, false).await;
    assert_eq!(report.result, SweepResult::Refused, "{report:?}");
    assert_eq!(refusal(&report), Some(RefusalReason::NamespaceMissing));
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, 0);

    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "");
    let out = run_once(
        dir.path(),
        &api,
        &config,
        &[("SANDBOX_RECONCILER__CLUSTER__NAMESPACES", "agnets")],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("agnets"), "{text}");
    assert!(text.contains("cluster.namespaces"), "{text}");
    assert_eq!(db.fingerprint().await, before);
}

/// The per-backend guard: a namespace that exists but is the wrong one (or a wrong
/// kubeconfig context with the same namespace names) lists no Sandbox at all while every row
/// is suspended, so no live-row guard can see it. The agent-sandbox backend refuses.
#[tokio::test]
async fn wrong_but_existing_namespace_is_refused_by_the_sandbox_backend_guard() {
    let (db, api) = quiet_hour().await;
    api.add_namespace("agents-staging");
    let before = db.fingerprint().await;
    let mut settings = db.settings();
    settings.cluster.namespaces = vec!["agents-staging".into()];
    let report = sweep(settings, &api, false).await;
    assert_eq!(report.result, SweepResult::Refused, "{report:?}");
    assert_eq!(refusal(&report), Some(RefusalReason::BackendEmptyListing));
    assert_eq!(db.fingerprint().await, before);

    // Most (not all) Sandboxes missing: the share guard refuses.
    for i in 0..4 {
        api.remove(Kind::Sandbox, "agents", &format!("sb-paused-{i}"));
    }
    let report = sweep(db.settings(), &api, false).await;
    assert_eq!(
        refusal(&report),
        Some(RefusalReason::SuspendedObjectsMissing),
        "{report:?}"
    );
    assert_eq!(db.fingerprint().await, before);

    // An operator who knows the Sandboxes really were deleted turns the guard off.
    let mut settings = db.settings();
    settings.guard.max_suspended_missing_ratio = 1.0;
    let report = sweep(settings, &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.downgraded, 4);
}

/// The cluster's identity is in every audit record and the cluster_info metric, and a
/// pinned identity that does not match refuses.
#[tokio::test]
async fn cluster_identity_is_recorded_and_can_be_pinned() {
    let (db, api) = seeded(2, 1).await;
    let uid = api.cluster_uid();
    let report = sweep(db.settings(), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.cluster_uid.as_deref(), Some(uid.as_str()));
    let sql = format!(
        "SELECT evidence->>'cluster_uid' FROM {} WHERE action = 'downgrade'",
        db.audit_table()
    );
    let recorded: Vec<Option<String>> = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(recorded, vec![Some(uid.clone())]);
    let metrics = Metrics::new(&db.settings());
    metrics.record(&report);
    let text = metrics.render();
    assert!(
        text.contains(&format!(
            "sandbox_reconciler_cluster_info{{cluster_uid=\"{uid}\""
        )),
        "{text}"
    );

    db.insert("orphan-late", "suspended", "pod-gone-late", minutes(90))
        .await;
    let mut pinned = db.settings();
    pinned.cluster.expected_uid = Some(uuid::Uuid::new_v4());
    let report = sweep(pinned, &api, false).await;
    assert_eq!(refusal(&report), Some(RefusalReason::ClusterMismatch));
    assert_eq!(db.state("orphan-late").await, "suspended");
    let mut right = db.settings();
    right.cluster.expected_uid = Some(uid.parse().unwrap());
    let report = sweep(right, &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(db.state("orphan-late").await, "gone");
}

/// A missing object is attributed only by a configured prefix; with both backends on
/// and no prefixes it is "unknown" (in the audit record, the report and the metric label),
/// never silently "pod"; with only the Sandbox backend enabled it is never "pod".
#[tokio::test]
async fn missing_objects_are_attributed_only_by_prefix() {
    let (db, api) = seeded(3, 0).await;
    api.add_sandbox("v1alpha1", "agents", "sb-kept", json!({"replicas": 0}));
    for i in 0..6 {
        let name = format!("sb-kept-{i}");
        api.add_sandbox("v1alpha1", "agents", &name, json!({"replicas": 0}));
        db.insert(&format!("kept-{i}"), "suspended", &name, minutes(120))
            .await;
    }
    db.insert("orphan", "suspended", "sb-deleted", minutes(120))
        .await;
    let mut settings = db.settings();
    settings.backends.agent_sandbox.object_name_prefix = String::new();
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.changes[0].backend, BackendKind::Unknown);
    assert_eq!(report.backends[&BackendKind::Unknown].downgraded, 1);
    assert_eq!(report.backends[&BackendKind::Pod].downgraded, 0);
    let sql = format!("SELECT backend FROM {}", db.audit_table());
    let backend: String = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(backend, "unknown");
    let metrics = Metrics::new(&settings);
    metrics.record(&report);
    assert_eq!(
        metric(
            &metrics.render(),
            "sandbox_reconciler_sessions_downgraded_total{backend=\"unknown\"}"
        ),
        Some(1.0)
    );

    // Only the Sandbox backend: its orphan is the Sandbox backend's.
    db.insert("orphan-2", "suspended", "sb-deleted-2", minutes(120))
        .await;
    let mut only_sandbox = db.settings();
    only_sandbox.backends.pod.enabled = false;
    only_sandbox.backends.agent_sandbox.object_name_prefix = String::new();
    // (The live rows' pods are not listed now; that guard is not what this is about.)
    only_sandbox.guard.max_live_missing_ratio = 1.0;
    let report = sweep(only_sandbox, &api, true).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    let orphan = report.changes.iter().find(|c| c.key == "orphan-2").unwrap();
    assert_eq!(orphan.backend, BackendKind::AgentSandbox);
}

/// A TCP proxy to PostgreSQL that can stop forwarding, as a half-open connection does after a
/// failover: the socket stays open and nothing ever arrives.
async fn freezing_proxy() -> (String, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = Arc::new(AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, flag.clone()));
            tokio::spawn(pump(sr, cw, flag.clone()));
        }
    });
    let url = database_url().replace("127.0.0.1:5432", &format!("127.0.0.1:{port}"));
    (url, frozen)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A database that stops answering mid-connection (half-open TCP after a failover) makes the
/// sweep fail within the client-side deadline instead of blocking for as long as the kernel
/// keeps the socket.
#[tokio::test]
async fn a_database_that_stops_answering_fails_the_sweep_within_the_deadline() {
    if !database_url().contains("127.0.0.1:5432") {
        return; // the proxy forwards to the local server only
    }
    let (db, api) = seeded(2, 2).await;
    let (url, frozen) = freezing_proxy().await;
    let mut settings = db.settings();
    settings.database.url = url;
    settings.database.statement_timeout = std::time::Duration::from_secs(1);
    settings.database.client_deadline = std::time::Duration::from_secs(2);
    let reconciler = reconciler(settings, &api);
    let mut conn = reconciler.database.connect().await.unwrap();
    frozen.store(true, Ordering::Relaxed);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        reconciler.sweep_on(&mut conn, &SweepOptions::default(), &rx),
    )
    .await
    .expect("the sweep ends on its own deadline");
    assert_eq!(report.result, SweepResult::Failed);
    assert_eq!(report.error_kind, Some(ErrorKind::Database));
    assert!(
        report
            .error
            .as_deref()
            .is_some_and(|e| e.contains("client_deadline_seconds")),
        "{report:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    frozen.store(false, Ordering::Relaxed);
    assert_eq!(db.state("orphan-0").await, "suspended");
}

/// Right after a clean-up, `sessions{state}` shows the table as the sweep left it (not the
/// counts from before the writes: gone too low, suspended too high).
/// The apply phase is observed only when it wrote; `skipped_rows` is a gauge of the
/// last sweep, not a counter that counts the same rows again each sweep.
#[tokio::test]
async fn metrics_show_the_table_as_the_sweep_left_it() {
    let (db, api) = seeded(2, 3).await;
    db.insert("nameless", "suspended", "", minutes(90)).await;
    let settings = db.settings();
    let metrics = Metrics::new(&settings);
    let first = sweep(settings.clone(), &api, false).await;
    assert_eq!(first.downgraded, 3);
    metrics.record(&first);
    let m = metrics.render();
    assert_eq!(
        metric(&m, "sandbox_reconciler_sessions{state=\"gone\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric(&m, "sandbox_reconciler_sessions{state=\"suspended\"}"),
        Some(1.0)
    );
    let phase = |m: &str, p: &str| {
        metric(
            m,
            &format!("sandbox_reconciler_sweep_phase_duration_seconds_count{{phase=\"{p}\"}}"),
        )
    };
    assert_eq!(phase(&m, "apply"), Some(1.0));
    // A second sweep finds nothing to apply: no 0 s apply is recorded.
    let second = sweep(settings.clone(), &api, false).await;
    assert_eq!(second.batches, 0);
    metrics.record(&second);
    let m = metrics.render();
    assert_eq!(phase(&m, "apply"), Some(1.0));
    assert_eq!(phase(&m, "read_db"), Some(2.0));
    assert_eq!(
        metric(&m, "sandbox_reconciler_sweep_duration_seconds_count"),
        Some(2.0)
    );
    // The nameless row is passed over in both sweeps: the gauge says 1, not 2.
    assert_eq!(
        metric(
            &m,
            "sandbox_reconciler_skipped_rows{reason=\"null_object_name\"}"
        ),
        Some(1.0)
    );
}

/// A failing API request is logged once, by the reconciler, not a second time by the
/// client library's own ERROR line.
#[tokio::test]
async fn an_api_error_is_logged_once() {
    let (db, api) = seeded(2, 1).await;
    api.inject(Fault::on_list("/pods", FaultAction::Status(500, None)));
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "");
    let out = run_once(dir.path(), &api, &config, &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("failed with status"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("500"), "{stdout}");
}

/// Configuration that could only end badly is refused with exit 2 and the key.
#[tokio::test]
async fn unsafe_configuration_is_refused_with_its_key() {
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "SANDBOX_RECONCILER__SESSIONS__CLEAR_COLUMNS",
            "agent_thread_id,thread_key",
            "sessions.clear_columns[1]",
        ),
        (
            "SANDBOX_RECONCILER__SESSIONS__CLEAR_COLUMNS",
            "agent_thread_id,agent_thread_id",
            "sessions.clear_columns[1]",
        ),
        (
            "SANDBOX_RECONCILER__SWEEP__GRACE_PERIOD_SECONDS",
            "18446744073709551615",
            "sweep.grace_period_seconds",
        ),
        (
            "SANDBOX_RECONCILER__AUDIT__TABLE",
            "an_audit_table_name_that_is_far_too_long_for_derived_names_x",
            "audit.table",
        ),
        (
            "SANDBOX_RECONCILER__CLUSTER__EXPECTED_UID",
            "prod-cluster",
            "cluster.expected_uid",
        ),
        (
            "SANDBOX_RECONCILER__SESSIONS__TABLE",
            "no_such_table",
            "sessions.table",
        ),
    ];
    for (key, value, named) in cases {
        let config = db.write_config(dir.path(), "");
        let out = run_once(dir.path(), &api, &config, &[(key, value)]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}={value}: {stderr}");
        assert!(stderr.contains(named), "{key}={value}: {stderr}");
    }
    // The scope column cannot be cleared either.
    let config = db.write_config(dir.path(), "");
    let out = run_once(
        dir.path(),
        &api,
        &config,
        &[
            ("SANDBOX_RECONCILER__SESSIONS__SCOPE_COLUMN", "harness"),
            ("SANDBOX_RECONCILER__SESSIONS__SCOPE_VALUE", "amp"),
            ("SANDBOX_RECONCILER__SESSIONS__CLEAR_COLUMNS", "harness"),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("sessions.clear_columns[0]"), "{stderr}");
}
