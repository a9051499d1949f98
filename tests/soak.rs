//! The soak harness, short: 15 s of application churn and switching faults against two daemon
//! replicas of the real binary, real PostgreSQL and the fake API server, judged by the oracle
//! (`support/soak.rs`). The long version: `cargo run --release --example soak -- --duration 60s`.
//!
//! The harness needs only the fake API server, so it is included directly (as the example
//! does) rather than through `support/mod.rs`.

#[path = "support/fake_api.rs"]
mod fake_api;
#[path = "support/soak.rs"]
mod soak;

use std::path::PathBuf;
use std::time::Duration;

use soak::SoakConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_soak_never_downgrades_wrongly_and_loses_no_row() {
    let mut cfg = SoakConfig::new(
        PathBuf::from(env!("CARGO_BIN_EXE_sandbox-reconciler")),
        soak::database_url(),
    );
    cfg.duration = Duration::from_secs(15);
    cfg.seed = 20_250_101;
    cfg.sessions = 80;
    cfg.workers = 3;
    let report = soak::run(cfg).await.expect("the soak harness ran");
    println!("{}", report.text());

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
    assert!(
        report.downgrades > 0,
        "no downgrade happened: the soak proves nothing"
    );
    assert!(
        report.sweeps.get("success").copied().unwrap_or(0) > 0,
        "no daemon sweep succeeded: {:?}",
        report.sweeps
    );
    assert!(report.faults_total > 0, "no fault was injected");
    assert!(
        report.problems.is_empty(),
        "harness problems: {:#?}",
        report.problems
    );
}
