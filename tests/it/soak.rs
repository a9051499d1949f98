//! The soak harness, short: 15 s of application churn and switching faults against two daemon
//! replicas of the real binary, real PostgreSQL and the fake API server, judged by the oracle
//! (`testkit::soak`). The long version: `just soak --duration 60s`.
//!
//! Three variants, one after the other (each starts two daemons and churns PostgreSQL; run
//! side by side on a small machine they would mostly measure each other's load):
//! - the default run;
//! - both backends enabled with no `object_name_prefix` and pods and Sandboxes named alike
//!   (`--backends-without-prefixes`, centaur's one naming scheme): every orphan is `unknown`;
//!   the run must never downgrade wrongly **and** must clear the orphans of both backends;
//! - a shared table of two scopes (`--shared-table`): the daemons own scope A, and another
//!   cluster's rows with the same keys and object names churn beside them and must never be
//!   changed by the reconciler.

use std::path::PathBuf;
use std::time::Duration;

use testkit::soak::{self, SoakConfig, SoakReport};

/// The soaks run one at a time (tokio's mutex works across the tests' runtimes).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn short_soak() -> SoakConfig {
    let mut cfg = SoakConfig::new(
        PathBuf::from(env!("CARGO_BIN_EXE_sandbox-reconciler")),
        testkit::pg::database_url(),
    );
    cfg.duration = Duration::from_secs(15);
    cfg.seed = 20_250_101;
    cfg.sessions = 80;
    cfg.workers = 3;
    cfg
}

/// What every variant must show: no wrong downgrade, no lost or inconsistent row, sweeps
/// that reached a verdict, faults injected, no harness problem.
fn assert_sound(report: &SoakReport) {
    assert_eq!(
        report.wrong_downgrades, 0,
        "wrong downgrades: {:#?}",
        report.wrong
    );
    assert_eq!(report.rows_lost, 0, "rows lost: {:#?}", report.row_problems);
    assert_eq!(
        report.rows_inconsistent, 0,
        "inconsistent rows: {:#?}",
        report.row_problems
    );
    assert!(report.faults_total > 0, "no fault was injected");
    assert!(
        report.problems.is_empty(),
        "harness problems: {:#?}",
        report.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_soak_never_downgrades_wrongly_and_loses_no_row() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let report = soak::run(short_soak()).await.expect("the soak harness ran");
    println!("{}", report.text());

    assert_sound(&report);
    assert!(
        report.downgrades > 0,
        "no downgrade happened: the soak proves nothing"
    );
    assert!(
        report.sweeps.get("success").copied().unwrap_or(0) > 0,
        "no daemon sweep succeeded: {:?}",
        report.sweeps
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_with_both_backends_and_no_prefixes_never_downgrades_wrongly() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cfg = short_soak();
    cfg.seed = 20_250_202;
    cfg.backends_without_prefixes = true;
    let report = soak::run(cfg).await.expect("the soak harness ran");
    println!("{}", report.text());

    assert_sound(&report);
    assert_eq!(
        report.downgrades_misattributed, 0,
        "downgrades attributed to a backend without a prefix: {:#?}",
        report.attribution_problems
    );
    assert!(
        report.sweeps_run() > 0,
        "no sweep reached a verdict: daemons {:?}, --once {:?}",
        report.sweeps,
        report.once_runs
    );
    // The guards judge each backend's listing by the objects the rows refer to, not by the
    // attribution of the orphans: both eras' orphans are cleared.
    assert!(
        report.downgrades > 0,
        "no downgrade happened: the soak proves nothing (sweeps {:?}, refusals {:?})",
        report.sweeps,
        report.guard_refusals_logged
    );
    println!(
        "backends without prefixes: {} downgrade(s), guard refusals by reason {:?} (daemon metrics {:?})",
        report.downgrades, report.guard_refusals_logged, report.guard_refusals
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_on_a_shared_table_never_touches_the_other_scope() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cfg = short_soak();
    cfg.seed = 20_250_303;
    cfg.shared_table = true;
    let report = soak::run(cfg).await.expect("the soak harness ran");
    println!("{}", report.text());

    assert_sound(&report);
    let other = report
        .other_scope
        .as_ref()
        .expect("the shared-table run reports the other scope");
    assert_eq!(
        other.audit_records_outside_scope, 0,
        "audit records outside the daemons' scope: {:#?}",
        other.problems
    );
    assert_eq!(
        other.rows_changed, 0,
        "rows of the other scope changed by the reconciler: {:#?}",
        other.problems
    );
    assert_eq!(
        other.rows_lost, 0,
        "rows of the other scope lost: {:#?}",
        other.problems
    );
    assert!(
        other.writes > other.rows_created,
        "the other scope's rows did not churn: {other:#?}"
    );
    assert!(
        other.downgrades_with_a_suspended_twin > 0,
        "no downgrade had a suspended twin in the other scope: the scope was never tested"
    );
    assert!(
        report.downgrades > 0,
        "no downgrade in the daemons' scope: the soak proves nothing"
    );
}
