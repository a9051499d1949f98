//! Fault injection: every API, database and process fault ends with nothing partial written,
//! a clear error, and a later sweep that finishes the work.

use std::time::{Duration, Instant};

use crate::support::daemon::*;
use crate::support::*;
use sandbox_reconciler::sweep::{ErrorKind, SweepResult};
use sqlx::AssertSqlSafe;

/// Five live pods (three list pages of two), one orphan per `orphans`.
async fn world(orphans: usize) -> (TestDb, FakeApiServer) {
    seeded(5, orphans).await
}

fn fast_settings(db: &TestDb) -> sandbox_reconciler::config::Settings {
    let mut s = db.settings();
    s.cluster.request_timeout = std::time::Duration::from_secs(2);
    s
}

/// Runs a sweep that must fail without writing; returns its error text.
async fn assert_fails_cleanly(db: &TestDb, api: &FakeApiServer) -> String {
    let before = db.fingerprint().await;
    let started = Instant::now();
    let report = sweep(fast_settings(db), api, false).await;
    assert_eq!(report.result, SweepResult::Failed, "{report:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "bounded: {:?}",
        started.elapsed()
    );
    assert_eq!(db.fingerprint().await, before, "nothing written");
    assert_eq!(db.audit_count().await, 0);
    report.error.unwrap()
}

#[tokio::test]
async fn hung_list_times_out_and_aborts() {
    let (db, api) = world(1).await;
    api.inject(Fault::on_list_page(
        "/pods",
        1,
        FaultAction::Hang(Duration::from_secs(30)),
    ));
    let err = assert_fails_cleanly(&db, &api).await;
    assert!(err.contains("no answer within 2s"), "{err}");
}

#[tokio::test]
async fn connection_refused_aborts() {
    let (db, api) = world(1).await;
    let settings = fast_settings(&db);
    let closed = free_port();
    let client = kube::Client::try_from(kube::Config::new(
        format!("http://127.0.0.1:{closed}").parse().unwrap(),
    ))
    .unwrap();
    let cluster = sandbox_reconciler::cluster::KubeCluster::with_client(client, &settings);
    let mut r = reconciler(settings, &api);
    r.source = sandbox_reconciler::sweep::ClusterSource::Api(Box::new(cluster));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let before = db.fingerprint().await;
    let report = r.sweep(&Default::default(), &rx).await;
    assert_eq!(report.result, SweepResult::Failed);
    assert_eq!(
        report.error_kind,
        Some(ErrorKind::Transport),
        "{:?}",
        report.error
    );
    assert_eq!(db.fingerprint().await, before);
}

#[tokio::test]
async fn forbidden_names_the_missing_permission() {
    let (db, api) = world(1).await;
    api.deny("list", "", "pods");
    let err = assert_fails_cleanly(&db, &api).await;
    assert!(
        err.contains("grant the reconciler's service account list on pods"),
        "{err}"
    );
}

#[tokio::test]
async fn malformed_json_aborts() {
    let (db, api) = world(1).await;
    api.inject(Fault::on_list_page("/pods", 2, FaultAction::MalformedJson));
    let err = assert_fails_cleanly(&db, &api).await;
    assert!(err.contains("malformed") || err.contains("EOF"), "{err}");
}

#[tokio::test]
async fn list_of_the_wrong_kind_aborts() {
    let (db, api) = world(1).await;
    api.inject(Fault::on_list("/sandboxes", FaultAction::WrongKind));
    let err = assert_fails_cleanly(&db, &api).await;
    assert!(err.contains("ConfigMapList"), "{err}");
}

#[tokio::test]
async fn object_without_a_name_aborts() {
    let (db, api) = world(1).await;
    api.inject(Fault::on_list_page(
        "/pods",
        1,
        FaultAction::ItemWithoutName,
    ));
    let err = assert_fails_cleanly(&db, &api).await;
    assert!(err.contains("no metadata.name"), "{err}");
}

#[tokio::test]
async fn dropped_connection_aborts() {
    let (db, api) = world(1).await;
    api.inject(Fault::on_list_page(
        "/pods",
        1,
        FaultAction::CloseConnection,
    ));
    assert_fails_cleanly(&db, &api).await;
}

#[tokio::test]
async fn sandbox_api_not_served_aborts_with_a_hint() {
    let (db, api) = world(1).await;
    api.disable_sandbox_api();
    let err = assert_fails_cleanly(&db, &api).await;
    assert!(
        err.contains("does not serve sandboxes.agents.x-k8s.io"),
        "{err}"
    );
}

#[tokio::test]
async fn retry_after_is_honoured_and_bounded() {
    let (db, api) = world(1).await;
    // Twice 429 with Retry-After: 1 on the second page, then normal answers.
    api.inject(Fault::on_list_page("/pods", 1, FaultAction::Status(429, Some(1))).times(2));
    let started = Instant::now();
    let report = sweep(db.settings(), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "waited as told: {:?}",
        started.elapsed()
    );
    assert_eq!(db.state("orphan-0").await, "gone");
    // Throttled forever: the request deadline bounds the wait and the sweep aborts.
    db.insert("orphan-x", "suspended", "pod-gone-x", minutes(60))
        .await;
    api.inject(Fault::on_list("/pods", FaultAction::Status(429, Some(1))));
    let report = sweep(fast_settings(&db), &api, false).await;
    assert_eq!(report.result, SweepResult::Failed);
    assert_eq!(db.state("orphan-x").await, "suspended");
}

#[tokio::test]
async fn empty_listing_with_live_rows_is_refused() {
    let (db, api) = world(2).await;
    for i in 0..5 {
        api.remove(Kind::Pod, "agents", &format!("pod-live-{i}"));
    }
    let before = db.fingerprint().await;
    let report = sweep(db.settings(), &api, false).await;
    assert_eq!(report.result, SweepResult::Refused);
    assert_eq!(db.fingerprint().await, before);
}

#[tokio::test]
async fn connection_killed_mid_apply_rolls_back_and_next_sweep_finishes() {
    let (db, api) = world(5).await;
    let blocker = block_audit(&db).await;
    let mut settings = db.settings();
    settings.sweep.batch_size = 2;
    settings.database.lock_timeout = std::time::Duration::from_secs(60);
    let run = {
        let settings = settings.clone();
        let api_client = api.client();
        tokio::spawn(async move {
            let cluster =
                sandbox_reconciler::cluster::KubeCluster::with_client(api_client, &settings);
            let r = sandbox_reconciler::sweep::Reconciler::new(
                settings.clone(),
                sandbox_reconciler::store::Database::new(&settings).unwrap(),
                sandbox_reconciler::store::TableMapping::from_settings(&settings).unwrap(),
                sandbox_reconciler::sweep::ClusterSource::Api(Box::new(cluster)),
            );
            let (_tx, rx) = tokio::sync::watch::channel(false);
            r.sweep(&Default::default(), &rx).await
        })
    };
    let pid = wait_for_blocked_batch(&db).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(killed);
    let report = run.await.unwrap();
    blocker.rollback().await.unwrap();
    assert_eq!(report.result, SweepResult::Failed);
    assert_eq!(report.error_kind, Some(ErrorKind::Database));
    assert_eq!(report.downgraded, 0);
    assert_eq!(
        db.audit_count().await,
        0,
        "the killed batch rolled back whole"
    );
    assert!(db.fingerprint().await.iter().all(|(_, s, _)| s != "gone"));
    // The next sweep finishes the work; counts are exact.
    let report = sweep(settings, &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 5);
    assert_eq!(db.audit_count().await, 5);
}

#[tokio::test]
async fn statement_timeout_aborts_the_read_cleanly() {
    let (db, api) = world(1).await;
    let mut blocker = db.pool.begin().await.unwrap();
    let lock = format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", db.table());
    sqlx::query(AssertSqlSafe(lock))
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut settings = db.settings();
    settings.database.statement_timeout = std::time::Duration::from_secs(1);
    settings.database.lock_timeout = std::time::Duration::from_secs(0);
    let started = Instant::now();
    let report = sweep(settings, &api, false).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    blocker.rollback().await.unwrap();
    assert_eq!(report.result, SweepResult::Failed);
    assert!(
        report
            .error
            .as_deref()
            .unwrap()
            .contains("statement timeout"),
        "{:?}",
        report.error
    );
    assert_eq!(db.state("orphan-0").await, "suspended");
}

#[tokio::test]
async fn sigkill_during_apply_leaves_whole_batches_only() {
    let (db, api) = world(6).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut d, blocker) = Daemon::start_blocked_in_apply(dir.path(), &db, &api).await;
    d.signal("KILL");
    let _ = d.wait_exit(10).await;
    blocker.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        db.audit_count().await,
        0,
        "the open batch died with the process"
    );
    assert!(db.fingerprint().await.iter().all(|(_, s, _)| s != "gone"));
}

#[tokio::test]
async fn two_daemons_and_a_once_run_have_one_writer() {
    let (db, api) = world(8).await;
    let dir = tempfile::tempdir().unwrap();
    let a = InProcessDaemon::start(&db, &api).await;
    let b = InProcessDaemon::start(&db, &api).await;
    let config = db.write_config(dir.path(), "");
    let once = run_once(dir.path(), &api, &config, &[]).await;
    let code = once.status.code();
    assert!(code == Some(0) || code == Some(1), "{once:?}");
    if code == Some(1) {
        assert!(String::from_utf8_lossy(&once.stdout).contains("holds the writer lock"));
    }
    let done = |m: &str| {
        metric(m, "sandbox_reconciler_sweeps_total{result=\"success\"}").unwrap_or(0.0)
            + metric(m, "sandbox_reconciler_sweeps_total{result=\"skipped\"}").unwrap_or(0.0)
    };
    a.wait_metrics(30, "a ticking", |m| done(m) >= 3.0).await;
    b.wait_metrics(30, "b ticking", |m| done(m) >= 3.0).await;
    // Each orphan downgraded exactly once, by whoever held the lock.
    let sql = format!(
        "SELECT count(*) FROM (SELECT session_key FROM {} GROUP BY session_key HAVING count(*) > 1) d",
        db.audit_table()
    );
    let duplicates: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(duplicates, 0);
    assert_eq!(db.audit_count().await, 8);
    let leaders = metric(&a.metrics().await, "sandbox_reconciler_leader").unwrap()
        + metric(&b.metrics().await, "sandbox_reconciler_leader").unwrap();
    assert_eq!(leaders, 1.0);
}

/// A TCP forwarder to PostgreSQL that can be switched off (refusing new connections and
/// cutting open ones) and on again: the database going down and coming back.
struct Switch {
    port: u16,
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Switch {
    async fn start() -> Switch {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (on2, gen2) = (on.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if !on2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let born = gen2.load(Ordering::SeqCst);
                let gen3 = gen2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    else {
                        return;
                    };
                    let cut = async {
                        while gen3.load(Ordering::SeqCst) == born {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut => {}
                    }
                });
            }
        });
        Switch {
            port,
            on,
            generation,
        }
    }

    fn set(&self, on: bool) {
        self.on.store(on, std::sync::atomic::Ordering::SeqCst);
        if !on {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn database_down_at_start_and_during_sweeps_daemon_recovers() {
    let (db, api) = world(2).await;
    let switch = Switch::start().await;
    let url = database_url().replace("127.0.0.1:5432", &format!("127.0.0.1:{}", switch.port));
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &db,
        &api,
        &[
            ("DATABASE_URL", &url),
            ("SANDBOX_RECONCILER__DATABASE__CONNECT_TIMEOUT_SECONDS", "2"),
        ],
    )
    .await;
    // The config file names the real server; DATABASE_URL must win for this test to mean
    // anything, so assert the daemon really fails while the switch is off.
    let failed =
        |m: &str| metric(m, "sandbox_reconciler_sweeps_total{result=\"failed\"}").unwrap_or(0.0);
    let m = d
        .wait_metrics(30, "failures while the database is down", |m| {
            failed(m) >= 2.0
        })
        .await;
    assert_eq!(
        metric(&m, "sandbox_reconciler_db_errors_total"),
        Some(failed(&m))
    );
    assert_eq!(http(d.port, "GET", "/healthz").await.unwrap().0, 200);
    assert_eq!(http(d.port, "GET", "/readyz").await.unwrap().0, 200);
    assert_eq!(db.state("orphan-0").await, "suspended");
    // Up: recovers by itself.
    switch.set(true);
    let ok =
        |m: &str| metric(m, "sandbox_reconciler_sweeps_total{result=\"success\"}").unwrap_or(0.0);
    d.wait_metrics(30, "recovery", |m| ok(m) >= 1.0).await;
    assert_eq!(db.state("orphan-0").await, "gone");
    // Down during operation: the writer connection is cut; failures are counted, then it
    // reconnects, takes the lock again and sweeps.
    switch.set(false);
    let before = failed(&d.metrics().await);
    d.wait_metrics(30, "failures after the cut", |m| failed(m) >= before + 2.0)
        .await;
    assert_eq!(http(d.port, "GET", "/healthz").await.unwrap().0, 200);
    db.insert("orphan-late", "suspended", "pod-late", minutes(60))
        .await;
    switch.set(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.state("orphan-late").await != "gone" {
        assert!(
            Instant::now() < deadline,
            "the daemon recovers after the database returns"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = d.metrics().await;
    assert_eq!(metric(&m, "sandbox_reconciler_leader"), Some(1.0));
}

/// A commit that outlives the client deadline (`database.client_deadline_seconds`; here a
/// deferred constraint trigger on the audit table sleeps 3 s at COMMIT, the deadline is 1 s)
/// may or may not have committed: the sweep fails, saying the batch's outcome is unknown (in
/// its error and `outcome_unknown_batches`), never that nothing was written. The commit does
/// go through on the server; the next sweep re-reads the rows, finds the row already gone
/// (not a candidate), writes nothing more and succeeds: one downgrade, one audit record.
///
/// The timed-out commit is not reported like any other deadline ("no answer from PostgreSQL
/// within 1s ... the connection is dropped"), which would read as a failed, rolled-back
/// batch.
#[tokio::test]
async fn a_commit_that_outlives_the_deadline_is_reported_unknown_and_reconciled() {
    let (db, api) = world(1).await;
    let mut settings = db.settings();
    settings.database.statement_timeout = std::time::Duration::from_secs(0);
    settings.database.client_deadline = std::time::Duration::from_secs(1);
    settings.validate().unwrap();
    let mut conn = sandbox_reconciler::store::Database::new(&settings)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mapping = sandbox_reconciler::store::TableMapping::from_settings(&settings).unwrap();
    sandbox_reconciler::store::migrate(&mut conn, &mapping)
        .await
        .unwrap();
    drop(conn);
    let sql = format!(
        "CREATE FUNCTION {s}.slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {a} \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {s}.slow_commit()",
        s = db.schema,
        a = db.audit_table()
    );
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();

    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Failed, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("outcome is unknown"), "{error}");
    assert!(error.contains("client_deadline_seconds"), "{error}");
    assert_eq!(report.outcome_unknown_batches, 1, "{report:?}");

    // DROP TRIGGER waits for the committing transaction to end.
    let sql = format!("DROP TRIGGER slow_commit ON {}", db.audit_table());
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();
    let report = sweep(settings, &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(db.state("orphan-0").await, "gone");
    assert_eq!(db.audit_count().await, 1, "one downgrade, audited once");
    for i in 0..5 {
        assert_eq!(db.state(&format!("live-{i}")).await, "running");
    }
}
