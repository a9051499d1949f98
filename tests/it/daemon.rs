//! Daemon mode against real PostgreSQL and the fake API server: in process on a bound
//! listener, and as a process where signals and exit codes are the subject.

use std::time::{Duration, Instant};

use crate::support::daemon::*;
use crate::support::*;
use testkit::exposition::sum_by_label;

fn successes(m: &str) -> f64 {
    metric(m, "sandbox_reconciler_sweeps_total{result=\"success\"}").unwrap_or(0.0)
}

/// Three live sessions, four orphans, one leaked pod and one fresh suspended row.
async fn cluster_and_rows() -> (TestDb, FakeApiServer) {
    let (db, api) = seeded(3, 4).await;
    api.add_pod("agents", "pod-leaked", MANAGED);
    db.insert("fresh", "suspended", "pod-fresh", minutes(1))
        .await;
    (db, api)
}

#[tokio::test]
async fn scheduled_sweeps_and_metrics_match_the_database() {
    let (db, api) = cluster_and_rows().await;
    let dir = tempfile::tempdir().unwrap();
    let d = InProcessDaemon::start(&db, &api).await;
    let m = d
        .wait_metrics(30, "two successful sweeps", |m| successes(m) >= 2.0)
        .await;
    assert_eq!(
        metric(&m, "sandbox_reconciler_sessions{state=\"gone\"}"),
        Some(4.0)
    );
    assert_eq!(
        metric(&m, "sandbox_reconciler_sessions{state=\"running\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric(&m, "sandbox_reconciler_sessions{state=\"suspended\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "sandbox_reconciler_sessions_downgraded_total{backend=\"pod\"}"
        ),
        Some(4.0)
    );
    assert_eq!(
        metric(
            &m,
            "sandbox_reconciler_orphaned_suspended_sessions{backend=\"pod\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            "sandbox_reconciler_untracked_cluster_objects{backend=\"pod\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "sandbox_reconciler_cluster_objects{backend=\"pod\"}"),
        Some(4.0)
    );
    assert_eq!(metric(&m, "sandbox_reconciler_leader"), Some(1.0));
    assert_eq!(
        metric(&m, "sandbox_reconciler_sweep_interval_seconds"),
        Some(1.0)
    );
    assert!(
        metric(
            &m,
            "sandbox_reconciler_kube_requests_total{code=\"200\",verb=\"list\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        metric(
            &m,
            "sandbox_reconciler_kube_requests_total{code=\"404\",verb=\"get\"}"
        )
        .unwrap()
            >= 4.0
    );
    assert!(metric(&m, "sandbox_reconciler_last_success_timestamp_seconds").unwrap() > 1.7e9);
    assert!(m.contains("sandbox_reconciler_build_info{revision=\""));
    assert!(m.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))));
    assert!(metric(&m, "sandbox_reconciler_next_sweep_timestamp_seconds").unwrap() > 1.7e9);
    assert!(m.contains("process_start_time_seconds"));
    for (key, _) in [("orphan-0", ()), ("orphan-3", ())] {
        assert_eq!(db.state(key).await, "gone");
    }
    assert_eq!(db.audit_count().await, 4);

    assert_eq!(http(d.port, "GET", "/readyz").await.unwrap().0, 200);
    let (status, body) = http(d.port, "GET", "/healthz").await.unwrap();
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["leader"], true);
    assert_eq!(health["last_sweep"]["result"], "success");
    assert_eq!(http(d.port, "GET", "/nope").await.unwrap().0, 404);
    assert_eq!(http(d.port, "POST", "/metrics").await.unwrap().0, 405);
    assert_eq!(http(d.port, "HEAD", "/metrics").await.unwrap().0, 200);

    if let Some(promtool) = promtool() {
        let file = dir.path().join("metrics.txt");
        std::fs::write(&file, &m).unwrap();
        let out = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    d.stop(15).await.expect("a clean shutdown");
}

/// promtool, when installed; the test command installs it, and then requires it.
fn promtool() -> Option<&'static str> {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && std::env::var_os("SANDBOX_RECONCILER_REQUIRE_TOOLS").is_some() {
        panic!("promtool is required (Debian package prometheus) but not installed");
    }
    found.then_some("promtool")
}

#[tokio::test]
async fn healthz_stays_up_while_the_api_fails() {
    let (db, api) = cluster_and_rows().await;
    api.inject(Fault::always(FaultAction::Status(500, None)));
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &db, &api, &[]).await;
    let failed =
        |m: &str| metric(m, "sandbox_reconciler_sweeps_total{result=\"failed\"}").unwrap_or(0.0);
    let m = d
        .wait_metrics(30, "failed sweeps", |m| failed(m) >= 3.0)
        .await;
    assert_eq!(successes(&m), 0.0);
    assert_eq!(
        metric(&m, "sandbox_reconciler_last_success_timestamp_seconds"),
        Some(0.0)
    );
    // The first request of each sweep (reading the cluster's identity) fails.
    assert!(
        metric(
            &m,
            "sandbox_reconciler_kube_requests_total{code=\"500\",verb=\"get\"}"
        )
        .unwrap()
            >= 3.0
    );
    let (status, body) = http(d.port, "GET", "/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"failed\""), "{body}");
    assert_eq!(http(d.port, "GET", "/readyz").await.unwrap().0, 200);
    assert_eq!(db.state("orphan-0").await, "suspended");
    // Recovers by itself once the API answers again.
    api.clear_faults();
    d.wait_metrics(30, "a success after recovery", |m| successes(m) >= 1.0)
        .await;
    assert_eq!(db.state("orphan-0").await, "gone");
    d.signal("INT");
    assert_eq!(d.wait_exit(15).await, Some(0));
}

#[tokio::test]
async fn two_daemons_one_writer_and_takeover() {
    let (db, api) = cluster_and_rows().await;
    let a = InProcessDaemon::start(&db, &api).await;
    let mut b = InProcessDaemon::start(&db, &api).await;
    let leader = |m: &str| metric(m, "sandbox_reconciler_leader");
    let skipped =
        |m: &str| metric(m, "sandbox_reconciler_sweeps_total{result=\"skipped\"}").unwrap_or(0.0);
    // Both have run a few ticks; exactly one is the writer.
    let ma = a
        .wait_metrics(30, "daemon a sweeping", |m| {
            successes(m) + skipped(m) >= 3.0
        })
        .await;
    let mb = b
        .wait_metrics(30, "daemon b sweeping", |m| {
            successes(m) + skipped(m) >= 3.0
        })
        .await;
    let (la, lb) = (leader(&ma).unwrap(), leader(&mb).unwrap());
    assert_eq!(la + lb, 1.0, "exactly one leader:\n{ma}\n{mb}");
    let (writer, standby) = if la == 1.0 {
        (a, &mut b)
    } else {
        (b, &mut { a })
    };
    let ms = standby.metrics().await;
    assert_eq!(successes(&ms), 0.0, "the standby never sweeps");
    assert_eq!(http(standby.port, "GET", "/readyz").await.unwrap().0, 200);
    assert_eq!(db.audit_count().await, 4, "each orphan downgraded once");

    // The writer dies: the standby takes over within a schedule period or two.
    writer.kill().await;
    db.insert("late-orphan", "suspended", "pod-late", minutes(60))
        .await;
    standby
        .wait_metrics(20, "standby takes over", |m| {
            leader(m) == Some(1.0) && successes(m) >= 1.0
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.state("late-orphan").await != "gone" {
        assert!(Instant::now() < deadline, "the new writer downgrades");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(db.audit_count().await, 5);
}

#[tokio::test]
async fn sigterm_during_apply_finishes_the_batch_and_exits_0() {
    let (db, api) = cluster_and_rows().await;
    for i in 0..6 {
        db.insert(
            &format!("more-{i}"),
            "suspended",
            &format!("pod-more-{i}"),
            minutes(60),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut d, blocker) = Daemon::start_blocked_in_apply(dir.path(), &db, &api).await;
    d.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocker.rollback().await.unwrap();
    assert_eq!(d.wait_exit(20).await, Some(0));
    // Whole batches only: the in-flight batch of 3 committed, nothing after it.
    assert_eq!(db.audit_count().await, 3);
    let fp = db.fingerprint().await;
    let gone = fp.iter().filter(|(_, s, _)| s == "gone").count();
    assert_eq!(gone, 3);
    assert!(fp
        .iter()
        .filter(|(_, s, _)| s == "gone")
        .all(|(_, _, agent)| agent.is_none()));
}

#[tokio::test]
async fn check_names_a_missing_column_and_a_forbidden_resource() {
    let (db, api) = cluster_and_rows().await;
    api.deny("list", "agents.x-k8s.io", "sandboxes");
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "");
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", config.to_str().unwrap(), "check"],
        &[],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let row = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix}: {text}"))
            .to_string()
    };
    assert!(
        row("list sandboxes.agents.x-k8s.io in namespace agents").contains(" FAIL "),
        "{text}"
    );
    assert!(
        row("get sandboxes.agents.x-k8s.io in namespace agents").contains(" pass "),
        "{text}"
    );
    assert!(
        row("list pods in namespace agents").contains(" pass "),
        "{text}"
    );

    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", config.to_str().unwrap(), "check"],
        &[(
            "SANDBOX_RECONCILER__SESSIONS__CLEAR_COLUMNS",
            "agent_thread_idd",
        )],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("has no column agent_thread_idd; set sessions.clear_columns[0]"),
        "{text}"
    );

    api.allow_all();
}

/// A watch on a quiet namespace receives nothing for a long time (a real API server sends a
/// bookmark about once a minute). The client's read timeout must outlast that silence: cut
/// at `cluster.request_timeout_seconds`, every quiet watch would fail and the cache relist
/// over and over, the load it exists to avoid.
#[tokio::test]
async fn a_quiet_watch_outlives_the_request_timeout() {
    let (db, api) = cluster_and_rows().await;
    api.stop_bookmarks();
    let d = InProcessDaemon::start_with(&db, &api, |s| {
        s.cluster.request_timeout = std::time::Duration::from_secs(1)
    })
    .await;
    d.wait_metrics(30, "a successful sweep", |m| successes(m) >= 1.0)
        .await;
    let churn = |m: &str| {
        let sum = |name: &str| -> u64 {
            sum_by_label(&[m.to_string()], name, "backend")
                .values()
                .sum()
        };
        (
            sum("sandbox_reconciler_cache_relists_total"),
            sum("sandbox_reconciler_cache_watch_restarts_total"),
        )
    };
    let before = churn(&d.metrics().await);
    let watches = |api: &FakeApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.query_param("watch").is_some())
            .count()
    };
    let watches_before = watches(&api);
    // Four request timeouts of silence on every watch.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let m = d.metrics().await;
    assert_eq!(churn(&m), before, "no relist and no watch restart: {m}");
    assert_eq!(watches(&api), watches_before, "no new watch request");
    assert!(
        successes(&m) >= 2.0,
        "sweeps went on reading the cache: {m}"
    );
}

/// What the rendered manifests grant the reconciler's ServiceAccount, as written by the deploy
/// checks (`scripts/check-deploy.sh` writes `target/rbac-granted.json`; `scripts/test.sh`
/// names it in `SANDBOX_RECONCILER_RBAC_GRANTED`), in the shape of
/// `sandbox-reconciler permissions --output json`.
fn rbac_granted() -> Option<Vec<serde_json::Value>> {
    let Some(path) = std::env::var_os("SANDBOX_RECONCILER_RBAC_GRANTED") else {
        if std::env::var_os("SANDBOX_RECONCILER_REQUIRE_TOOLS").is_some() {
            panic!("SANDBOX_RECONCILER_RBAC_GRANTED is not set: run the deploy checks first (scripts/test.sh does)");
        }
        eprintln!("skipped: SANDBOX_RECONCILER_RBAC_GRANTED is not set (scripts/test.sh sets it)");
        return None;
    };
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", std::path::Path::new(&path).display()));
    Some(serde_json::from_str(&text).expect("rbac-granted.json is a JSON array of rules"))
}

fn granted_verbs(granted: &[serde_json::Value], group: &str, resource: &str) -> Vec<String> {
    granted
        .iter()
        .filter(|r| r["api_group"] == group && r["resource"] == resource)
        .flat_map(|r| r["verbs"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// RBAC is one declared fact: what the manifests grant is what the binary declares for the
/// daemon with every backend (the base serves any profile), verbs and resources alike.
#[test]
fn the_manifests_grant_what_the_binary_declares() {
    let Some(granted) = rbac_granted() else {
        return;
    };
    let mut settings = sandbox_reconciler::config::Settings::default();
    settings.cluster.namespaces = vec!["agents".into()];
    let declared = sandbox_reconciler::permissions::required(
        &settings,
        sandbox_reconciler::permissions::Mode::Daemon,
        true,
    );
    for rule in &declared {
        let mut want: Vec<String> = rule.verbs.iter().map(|v| v.to_string()).collect();
        let mut got = granted_verbs(&granted, &rule.api_group, &rule.resource);
        want.sort();
        got.sort();
        got.dedup();
        assert_eq!(got, want, "{}: granted vs declared", rule.full_resource());
    }
    let namespaces = granted
        .iter()
        .find(|r| r["api_group"] == "" && r["resource"] == "namespaces")
        .expect("get on Namespaces is granted");
    assert!(
        namespaces["resource_names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == "kube-system")),
        "the cluster's identity (kube-system) is granted by name: {namespaces}"
    );
    assert_eq!(
        granted.len(),
        declared.len(),
        "the manifests grant a resource the binary does not declare: {granted:?}"
    );
}

/// The daemon runs against an API server that denies every verb the rendered manifests do
/// not grant: the watch cache syncs, no watch is forbidden, nothing relists for a watch error,
/// and the sweeps do their job. Before, the shipped Role granted get and list only, and every
/// informer's watch got 403 and relisted.
#[tokio::test]
async fn the_daemon_runs_with_exactly_the_rbac_the_manifests_grant() {
    let Some(granted) = rbac_granted() else {
        return;
    };
    let (db, api) = cluster_and_rows().await;
    for (group, resource) in [
        ("", "pods"),
        ("agents.x-k8s.io", "sandboxes"),
        ("", "namespaces"),
    ] {
        let allowed = granted_verbs(&granted, group, resource);
        for verb in [
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
            "delete",
            "deletecollection",
        ] {
            if !allowed.iter().any(|v| v == verb) {
                api.deny(verb, group, resource);
            }
        }
    }
    let d = InProcessDaemon::start(&db, &api).await;
    let m = d
        .wait_metrics(40, "a synced cache and two successful sweeps", |m| {
            metric(m, "sandbox_reconciler_cache_synced") == Some(1.0) && successes(m) >= 2.0
        })
        .await;
    let forbidden = sum_by_label(
        std::slice::from_ref(&m),
        "sandbox_reconciler_kube_requests_total",
        "code",
    )
    .get("403")
    .copied()
    .unwrap_or(0);
    assert_eq!(forbidden, 0, "a request was forbidden:\n{m}");
    // Every backend's informer listed once and then only watched: no relist for any reason
    // (a forbidden watch relists as "forbidden", a broken one as "watch_error").
    let relists = sum_by_label(
        std::slice::from_ref(&m),
        "sandbox_reconciler_cache_relists_total",
        "reason",
    );
    let after_initial: u64 = relists
        .iter()
        .filter(|(reason, _)| reason.as_str() != "initial")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(after_initial, 0, "the cache relisted: {relists:?}\n{m}");
    assert!(
        relists.get("initial").copied().unwrap_or(0) >= 2,
        "{relists:?}"
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r.query.contains("watch=true") || r.path.contains("watch")),
        "the daemon never watched"
    );
    for i in 0..4 {
        assert_eq!(db.state(&format!("orphan-{i}")).await, "gone");
    }
    for i in 0..3 {
        assert_eq!(db.state(&format!("live-{i}")).await, "running");
    }
}
