//! Tests that guard each safety rule against a one-line breakage (the mutation audit,
//! scripts/mutants.sh). Each test is named after the rule it guards; docs/MUTATION.md maps every
//! breakage to the test that fails when it is applied. Real PostgreSQL, the real
//! kube::Client against the fake API server on loopback, and the real binary where the rule
//! lives on the command line.
//!
//! Conventions: every world starts from `support::seeded` (live rows with their pods in
//! namespace "agents", orphans `orphan-i` -> `pod-gone-i`); a test that needs a window
//! between reading the rows and writing them holds one confirming GET with a `Hang` fault
//! and acts once the server has received it.

use std::time::{Duration, Instant};

use crate::support::daemon::metric;
use crate::support::*;
use sandbox_reconciler::cluster::BackendKind;
use sandbox_reconciler::config::Settings;
use sandbox_reconciler::plan::{GuardVerdict, SkipReason};
use sandbox_reconciler::sweep::{SweepReport, SweepResult};
use sqlx::AssertSqlSafe;
use testkit::fake_api::RecordedRequest;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A request for the single object `resource/name` (a confirming GET).
fn is_get_of(r: &RecordedRequest, resource: &str, name: &str) -> bool {
    r.method == "GET" && r.path.ends_with(&format!("/{resource}/{name}"))
}

/// A confirming GET of pod `name`.
fn is_pod_get(name: &str) -> impl Fn(&RecordedRequest) -> bool + '_ {
    move |r| is_get_of(r, "pods", name)
}

/// A continued (page 1 or later) request of the pod listing in namespace "agents".
fn is_later_pod_page(r: &RecordedRequest) -> bool {
    r.path == "/api/v1/namespaces/agents/pods" && r.query_param("continue").is_some()
}

/// Runs a sweep in the background with `fault` (a `Hang`) injected; `during` runs once the
/// server has received a request matching `held`, i.e. while the sweep waits for that answer.
/// Fails loudly if the sweep ends without making that request.
async fn sweep_with_window<F, Fut>(
    settings: Settings,
    api: &FakeApiServer,
    fault: Fault,
    held: impl Fn(&RecordedRequest) -> bool,
    during: F,
) -> SweepReport
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    api.inject(fault);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let reconciler = reconciler(settings, api);
    let run = tokio::spawn(async move { reconciler.sweep(&Default::default(), &rx).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !api.requests().iter().any(&held) {
        if run.is_finished() {
            let report = run.await.unwrap();
            panic!("the sweep ended before making the request the test holds: {report:?}");
        }
        assert!(
            Instant::now() < deadline,
            "the API server never received the request the test holds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    during().await;
    run.await.unwrap()
}

/// Settings that confirm every orphan with a direct GET (rule 2(a)), the path the daemon
/// takes for a few orphans; one-off sweeps otherwise rely on their complete listing.
fn by_get(db: &TestDb) -> Settings {
    let mut s = db.settings();
    s.sweep.confirmation = sandbox_reconciler::config::Confirm::Get;
    s.validate().expect("settings confirming by GET are valid");
    s
}

async fn exec(db: &TestDb, sql: String) {
    sqlx::query(AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();
}

/// (state, sandbox_id, updated_at as text, agent_thread_id) of a row.
async fn full_row(db: &TestDb, key: &str) -> (String, String, String, Option<String>) {
    let sql = format!(
        "SELECT state, sandbox_id, updated_at::text, agent_thread_id FROM {} WHERE thread_key = $1",
        db.table()
    );
    sqlx::query_as(AssertSqlSafe(sql))
        .bind(key)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Audit records written for one session.
async fn audit_records_of(db: &TestDb, key: &str) -> i64 {
    if db.audit_count().await == 0 {
        return 0;
    }
    let sql = format!(
        "SELECT count(*) FROM {} WHERE session_key = $1",
        db.audit_table()
    );
    sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(key)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A suspended row `key` whose pod `object` does not exist (yet), old enough to be a candidate.
async fn suspended(db: &TestDb, key: &str, object: &str) {
    db.insert(key, "suspended", object, minutes(120)).await;
}

// ---------------------------------------------------------------------------------------------
// Rule 2: only a definitive absence counts (the confirming GET)

/// A 403 on the confirming GET (RBAC without `get`) is not a 404: the row is left alone.
#[tokio::test]
async fn rule2_confirming_get_forbidden_is_not_absence() {
    let (db, api) = seeded(3, 0).await;
    suspended(&db, "orphan", "pod-forbidden").await;
    api.deny("get", "", "pods");
    let before = db.fingerprint().await;
    let report = sweep(by_get(&db), &api, false).await;
    assert_eq!(db.fingerprint().await, before, "{report:?}");
    assert_eq!(db.audit_count().await, 0);
    assert_eq!(report.downgraded, 0);
    // The GET was really made and really answered 403.
    let gets: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| is_get_of(r, "pods", "pod-forbidden"))
        .collect();
    assert!(!gets.is_empty(), "no confirming GET was made");
    assert!(gets.iter().all(|r| r.status == Some(403)), "{gets:?}");
}

/// Only a 404 whose Status names the object is its absence (rule 2(a)). A 404 for a path the
/// server does not serve names no object: the Status `the server could not find the requested
/// resource` with empty details (a resource the group/version lacks), or the plain-text
/// `404 page not found` of a group/version nobody serves. Either leaves its row alone
/// (`confirm_failed`); a real orphan confirmed by a proper 404 is downgraded.
#[tokio::test]
async fn rule2_a_404_that_names_no_object_is_not_absence() {
    let (db, api) = seeded(3, 1).await;
    suspended(&db, "unserved", "pod-unserved").await;
    suspended(&db, "mux", "pod-mux").await;
    api.inject(Fault::on_get(
        "/pods/pod-unserved",
        FaultAction::UnknownResource,
    ));
    api.inject(Fault::on_get("/pods/pod-mux", FaultAction::PageNotFound));
    let report = sweep(by_get(&db), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(db.state("unserved").await, "suspended", "{report:?}");
    assert_eq!(db.state("mux").await, "suspended", "{report:?}");
    assert_eq!(audit_records_of(&db, "unserved").await, 0);
    assert_eq!(audit_records_of(&db, "mux").await, 0);
    assert_eq!(
        report.skipped.get(&SkipReason::ConfirmFailed),
        Some(&2),
        "{report:?}"
    );
    // The job got done: the orphan whose GET answered a proper 404 went.
    assert_eq!(db.state("orphan-0").await, "gone");
    assert_eq!(report.downgraded, 1);
    for name in ["pod-unserved", "pod-mux", "pod-gone-0"] {
        assert!(
            api.requests().iter().any(is_pod_get(name)),
            "no confirming GET of {name}"
        );
    }
}

/// A confirming GET that never answers (timeout) is not a 404: the row is left alone.
#[tokio::test]
async fn rule2_confirming_get_timeout_is_not_absence() {
    let (db, api) = seeded(3, 1).await;
    suspended(&db, "slow", "pod-slow").await;
    api.inject(Fault::on_get(
        "pods/pod-slow",
        FaultAction::Hang(Duration::from_secs(30)),
    ));
    let mut settings = by_get(&db);
    settings.cluster.request_timeout = std::time::Duration::from_secs(2);
    let started = Instant::now();
    let report = sweep(settings, &api, false).await;
    assert!(started.elapsed() < Duration::from_secs(20), "bounded");
    assert_eq!(
        full_row(&db, "slow").await.0,
        "suspended",
        "{:?}",
        report.error
    );
    assert_eq!(full_row(&db, "slow").await.3.as_deref(), Some("agent-slow"));
    assert_eq!(audit_records_of(&db, "slow").await, 0);
    // The timeout hit only that row: the other orphan was confirmed and downgraded.
    assert_eq!(db.state("orphan-0").await, "gone", "{:?}", report.error);
}

/// An object missing from the listing that the confirming GET finds terminating
/// (deletionTimestamp set) is not absent yet: the row is left alone.
#[tokio::test]
async fn rule2_terminating_object_found_by_confirming_get_is_not_absent() {
    let (db, api) = seeded(3, 0).await;
    suspended(&db, "late", "pod-late").await;
    let report = sweep_with_window(
        by_get(&db),
        &api,
        Fault::on_get("pods/pod-late", FaultAction::Hang(Duration::from_secs(2))),
        is_pod_get("pod-late"),
        || async {
            // Appears after the listing, already being deleted.
            api.add_pod("agents", "pod-late", MANAGED);
            api.set_terminating(Kind::Pod, "agents", "pod-late");
        },
    )
    .await;
    assert_eq!(db.state("late").await, "suspended", "{report:?}");
    assert_eq!(audit_records_of(&db, "late").await, 0);
    assert_eq!(report.downgraded, 0);
}

// ---------------------------------------------------------------------------------------------
// Rule 4: writes are conditional, on every column read (one column changed at a time)

/// Runs the race: the sweep has read the rows (one-off sweeps read them before listing) and
/// waits for the second page of the pod listing, held by the server, while `change` runs
/// against `racer`'s row; `bystander` is an orphan that must still be downgraded (the sweep
/// did write). Returns the database and the sweep's report.
async fn race(change: &str) -> (TestDb, SweepReport) {
    let (db, api) = seeded(3, 0).await;
    suspended(&db, "racer", "pod-racer").await;
    suspended(&db, "bystander", "pod-bystander").await;
    let sql = format!(
        "UPDATE {} SET {change} WHERE thread_key = 'racer'",
        db.table()
    );
    let report = sweep_with_window(
        db.settings(),
        &api,
        Fault::on_list_page(
            "/namespaces/agents/pods",
            1,
            FaultAction::Hang(Duration::from_millis(1500)),
        ),
        is_later_pod_page,
        || exec(&db, sql),
    )
    .await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(db.state("bystander").await, "gone", "the sweep did write");
    assert_eq!(report.skipped.get(&SkipReason::ChangedMeanwhile), Some(&1));
    assert_eq!(audit_records_of(&db, "racer").await, 0);
    (db, report)
}

/// Only `updated_at` changed (the application touched the session): left alone.
#[tokio::test]
async fn rule4_row_whose_updated_at_changed_is_left_alone() {
    let (db, _) = race("updated_at = updated_at + interval '1 second'").await;
    let (state, object, _, agent) = full_row(&db, "racer").await;
    assert_eq!(state, "suspended");
    assert_eq!(object, "pod-racer");
    assert_eq!(agent.as_deref(), Some("agent-racer"));
}

/// Only `state` changed (resumed without touching updated_at): left alone.
#[tokio::test]
async fn rule4_row_whose_state_changed_is_left_alone() {
    let (db, _) = race("state = 'running'").await;
    let (state, object, _, agent) = full_row(&db, "racer").await;
    assert_eq!(state, "running");
    assert_eq!(object, "pod-racer");
    assert_eq!(agent.as_deref(), Some("agent-racer"));
}

/// Only the object name changed (respawned under a new name): left alone.
#[tokio::test]
async fn rule4_row_whose_object_changed_is_left_alone() {
    let (db, _) = race("sandbox_id = 'pod-racer-respawned'").await;
    let (state, object, _, agent) = full_row(&db, "racer").await;
    assert_eq!(state, "suspended");
    assert_eq!(object, "pod-racer-respawned");
    assert_eq!(agent.as_deref(), Some("agent-racer"));
}

// ---------------------------------------------------------------------------------------------
// Dry run and blast radius, through the real binary and its configuration

/// `--once --dry-run` on the command line writes nothing, not even the audit table.
#[tokio::test]
async fn dry_run_flag_on_the_command_line_writes_nothing() {
    let w = World::seeded(3, 2).await.build().await;
    let db = &w.db;
    let before = db.fingerprint().await;
    let out = w.run(&["--once", "--dry-run"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(db.fingerprint().await, before, "{}", stdout(&out));
    assert_eq!(db.audit_count().await, 0);
    assert!(stdout(&out).contains("dry run"), "{}", stdout(&out));
}

/// `sweep.dry_run = true` in the configuration file writes nothing.
#[tokio::test]
async fn dry_run_in_the_configuration_writes_nothing() {
    let w = World::seeded(3, 2)
        .await
        .settings(|s| s.sweep.dry_run = true)
        .build()
        .await;
    let db = &w.db;
    let before = db.fingerprint().await;
    let out = w.once(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(db.fingerprint().await, before, "{}", stdout(&out));
    assert_eq!(db.audit_count().await, 0);
}

/// Rule 6: `--max-downgrades N` caps this run at N rows, oldest first.
#[tokio::test]
async fn rule6_max_downgrades_flag_caps_the_run() {
    // orphan-2 is the oldest.
    let w = World::seeded(3, 3).await.build().await;
    let db = &w.db;
    let out = w
        .run(
            &["--once", "--max-downgrades", "1", "--output", "json"],
            &[],
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(db.state("orphan-2").await, "gone");
    assert_eq!(db.state("orphan-1").await, "suspended");
    assert_eq!(db.state("orphan-0").await, "suspended");
    assert_eq!(db.audit_count().await, 1);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["deferred"], 2, "{report}");
}

// ---------------------------------------------------------------------------------------------
// Rule 9: the drift is visible (orphaned_suspended_sessions)

#[tokio::test]
async fn rule9_orphaned_suspended_sessions_gauge_counts_what_is_left() {
    let (db, api) = seeded(3, 3).await;
    let mut settings = db.settings();
    settings.sweep.max_downgrades_per_sweep = 1;
    let metrics = sandbox_reconciler::metrics::Metrics::new(&settings);
    let series = "sandbox_reconciler_orphaned_suspended_sessions{backend=\"pod\"}";

    // A dry run reports every orphan it found.
    let report = sweep(settings.clone(), &api, true).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    metrics.record(&report);
    assert_eq!(metric(&metrics.render(), series), Some(3.0));

    // A real sweep capped at one reports the two still orphaned.
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 1, "{:?}", report.error);
    metrics.record(&report);
    assert_eq!(metric(&metrics.render(), series), Some(2.0));
}

// ---------------------------------------------------------------------------------------------
// Rule 2 with several namespaces and with all namespaces

/// The object is missing from the listing but present in the SECOND configured namespace
/// when the confirmation runs: the confirmation must look there too.
///
/// Needs namespace "other" to exist once the sweep checks configured namespaces.
#[tokio::test]
async fn rule2_confirmation_checks_every_configured_namespace() {
    let (db, api) = seeded(3, 0).await;
    suspended(&db, "moved", "pod-moved").await;
    api.add_namespace("other");
    let mut settings = by_get(&db);
    settings.cluster.namespaces = vec!["agents".into(), "other".into()];
    let report = sweep_with_window(
        settings,
        &api,
        Fault::on_get("pods/pod-moved", FaultAction::Hang(Duration::from_secs(2))),
        is_pod_get("pod-moved"),
        || async {
            api.add_pod("other", "pod-moved", MANAGED);
        },
    )
    .await;
    assert_eq!(db.state("moved").await, "suspended", "{report:?}");
    assert_eq!(audit_records_of(&db, "moved").await, 0);
    assert_eq!(report.skipped.get(&SkipReason::ObjectReappeared), Some(&1));
    // It asked the second namespace.
    assert!(api
        .requests()
        .iter()
        .any(|r| r.path.ends_with("/namespaces/other/pods/pod-moved")));
}

fn all_namespaces(mut s: Settings) -> Settings {
    s.cluster.namespaces = vec!["*".into()];
    s.validate().expect("all-namespaces settings are valid");
    s
}

/// `namespaces = ["*"]` lists every namespace (one cluster-wide listing per backend), objects
/// in any namespace protect their rows, and a real orphan is still downgraded.
#[tokio::test]
async fn rule1_all_namespaces_listing_protects_rows_in_every_namespace() {
    let (db, api) = seeded(2, 1).await;
    for (ns, i) in [("team-a", 0), ("team-a", 1), ("team-b", 2)] {
        api.add_pod(ns, &format!("pod-{ns}-{i}"), MANAGED);
        db.insert(
            &format!("{ns}-{i}"),
            "running",
            &format!("pod-{ns}-{i}"),
            minutes(60),
        )
        .await;
    }
    api.add_pod("team-b", "pod-team-b-paused", MANAGED);
    suspended(&db, "team-b-paused", "pod-team-b-paused").await;
    api.add_sandbox(
        "v1alpha1",
        "team-c",
        "sb-team-c",
        serde_json::json!({"replicas": 0}),
    );
    suspended(&db, "team-c-sandbox", "sb-team-c").await;

    let report = sweep(all_namespaces(db.settings()), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.backends[&BackendKind::Pod].cluster_objects, 6);
    assert_eq!(
        report.backends[&BackendKind::AgentSandbox].cluster_objects,
        1
    );
    assert_eq!(db.state("team-b-paused").await, "suspended");
    assert_eq!(db.state("team-c-sandbox").await, "suspended");
    assert_eq!(db.state("orphan-0").await, "gone");
    assert_eq!(report.downgraded, 1);

    let requests = api.requests();
    // One cluster-wide listing per backend, never a namespaced one.
    assert!(requests
        .iter()
        .any(|r| r.path == "/api/v1/pods" && r.query_param("fieldSelector").is_none()));
    assert!(requests
        .iter()
        .all(|r| !(r.path.contains("/namespaces/") && r.path.ends_with("/pods"))));
}

/// In all-namespaces mode an orphan is confirmed by a cluster-wide query for its name; that
/// query must find an object that appeared after the listing, in whatever namespace.
#[tokio::test]
async fn rule2_all_namespaces_confirmation_finds_the_object_in_any_namespace() {
    let (db, api) = seeded(3, 1).await;
    // Older than orphan-0, so confirmed first.
    suspended(&db, "late", "pod-late").await;
    let mut settings = all_namespaces(by_get(&db));
    // One confirmation at a time, oldest first: the second first-page request of the
    // cluster-wide pod path (after the listing's own) is the query for pod-late.
    settings.cluster.confirm_concurrency = 1;
    let is_query_for_late = |r: &RecordedRequest| {
        r.path == "/api/v1/pods"
            && r.query_param("fieldSelector").as_deref() == Some("metadata.name=pod-late")
    };
    let report = sweep_with_window(
        settings,
        &api,
        Fault::on_list_page("/api/v1/pods", 0, FaultAction::Hang(Duration::from_secs(2))).nth(1),
        is_query_for_late,
        || async {
            api.add_pod("team-b", "pod-late", MANAGED);
        },
    )
    .await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(db.state("late").await, "suspended", "{report:?}");
    assert_eq!(audit_records_of(&db, "late").await, 0);
    assert_eq!(report.skipped.get(&SkipReason::ObjectReappeared), Some(&1));
    // The confirmation is not "always present" either: the real orphan still goes, confirmed
    // by its own cluster-wide query.
    assert_eq!(db.state("orphan-0").await, "gone");
    assert!(api.requests().iter().any(|r| r.path == "/api/v1/pods"
        && r.query_param("fieldSelector").as_deref() == Some("metadata.name=pod-gone-0")));
}

// ---------------------------------------------------------------------------------------------
// Rule 1: not seen is not gone (a complete listing), without the guard's help

/// Guard settings under which the live-row guard never refuses: a partial listing that lost
/// live rows' objects would be acted on unless the listing itself is rejected.
fn guard_off(db: &TestDb) -> Settings {
    let mut s = db.settings();
    s.guard.min_live_missing = 1_000_000;
    s.cluster.request_timeout = std::time::Duration::from_secs(2);
    s
}

/// A 410 on a continue token restarts the WHOLE listing (a new first page, no token), and
/// the restarted listing is complete: an object only on the last page protects its row even
/// when the snapshot alone decides (sweep.confirm_absence = false).
#[tokio::test]
async fn rule1_expired_continue_token_restarts_the_listing_from_the_first_page() {
    // 5 live pods + the keeper's pod = 6 objects, three pages of two; the keeper's pod
    // sorts last.
    let (db, api) = seeded(5, 1).await;
    api.add_pod("agents", "pod-zz-keeper", MANAGED);
    suspended(&db, "keeper", "pod-zz-keeper").await;
    api.inject(Fault {
        times: Some(1),
        ..Fault::on_list_page("/pods", 1, FaultAction::ExpireContinue)
    });
    let mut settings = guard_off(&db);
    settings.sweep.confirmation = sandbox_reconciler::config::Confirm::None;
    let report = sweep(settings, &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(db.state("keeper").await, "suspended");
    assert_eq!(db.state("orphan-0").await, "gone");
    assert_eq!(report.backends[&BackendKind::Pod].cluster_objects, 6);

    // The request log: page 0, page 1 (410), then page 0 again without a token, then the
    // rest of the new listing.
    let pods: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/namespaces/agents/pods")
        .collect();
    let expired = pods
        .iter()
        .position(|r| r.status == Some(410))
        .expect("the 410 was served");
    assert!(pods[expired].query_param("continue").is_some());
    let after = &pods[expired + 1..];
    assert!(
        after
            .first()
            .is_some_and(|r| r.query_param("continue").is_none()),
        "the listing restarts with a first page: {pods:#?}"
    );
    assert_eq!(
        pods.iter()
            .filter(|r| r.query_param("continue").is_none())
            .count(),
        2,
        "{pods:#?}"
    );
    assert!(after.iter().all(|r| r.status == Some(200)), "{pods:#?}");
    assert_eq!(after.len(), 3, "a complete second listing: {pods:#?}");
}

/// Ten live pods (five list pages of two), one orphan without a pod; the guard cannot
/// refuse. A fault on page 2 of the pod listing must fail the sweep by itself.
async fn assert_mid_listing_fault_fails(action: FaultAction) -> SweepReport {
    let (db, api) = seeded(10, 1).await;
    api.inject(Fault::on_list_page("/pods", 2, action));
    let before = db.fingerprint().await;
    let report = sweep(guard_off(&db), &api, false).await;
    assert_eq!(report.result, SweepResult::Failed, "{report:?}");
    assert!(report.error_kind.is_some(), "{report:?}");
    assert!(
        !matches!(report.guard, Some(GuardVerdict::Refuse { .. })),
        "failed on its own, not through the guard: {report:?}"
    );
    assert_eq!(db.fingerprint().await, before, "nothing written");
    assert_eq!(db.audit_count().await, 0);
    assert_eq!(report.downgraded, 0);
    report
}

#[tokio::test]
async fn rule1_listing_500_on_a_middle_page_fails_without_the_guard() {
    let report = assert_mid_listing_fault_fails(FaultAction::Status(500, None)).await;
    assert!(report.error.unwrap().contains("500"));
}

#[tokio::test]
async fn rule1_listing_malformed_page_fails_without_the_guard() {
    assert_mid_listing_fault_fails(FaultAction::MalformedJson).await;
}

#[tokio::test]
async fn rule1_listing_page_of_the_wrong_kind_fails_without_the_guard() {
    assert_mid_listing_fault_fails(FaultAction::WrongKind).await;
}

#[tokio::test]
async fn rule1_listing_item_without_name_fails_without_the_guard() {
    let report = assert_mid_listing_fault_fails(FaultAction::ItemWithoutName).await;
    assert!(report.error.unwrap().contains("no metadata.name"));
}

#[tokio::test]
async fn rule1_listing_dropped_connection_fails_without_the_guard() {
    assert_mid_listing_fault_fails(FaultAction::CloseConnection).await;
}

/// A page of another kind than the one asked for is never trusted, even when its items are
/// well formed and named: here the backend is configured with kind `SandboxClaim` and the API
/// answers with a `SandboxList` at that plural.
#[tokio::test]
async fn rule1_listing_answered_with_another_kind_fails_without_the_guard() {
    let (db, api) = seeded(10, 1).await;
    api.add_sandbox(
        "v1alpha1",
        "agents",
        "sb-present",
        serde_json::json!({"replicas": 0}),
    );
    let mut settings = guard_off(&db);
    settings.backends.agent_sandbox.kind = "SandboxClaim".into();
    let before = db.fingerprint().await;
    let report = sweep(settings, &api, false).await;
    assert_eq!(report.result, SweepResult::Failed, "{report:?}");
    assert!(
        report.error.as_deref().unwrap().contains("SandboxList"),
        "{:?}",
        report.error
    );
    assert_eq!(db.fingerprint().await, before, "nothing written");
    assert_eq!(db.audit_count().await, 0);
}
