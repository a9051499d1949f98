//! Soak with an oracle: the real daemon, real PostgreSQL and the fake Kubernetes API server,
//! under a simulated agent platform and switching faults. What runs and what the oracle
//! claims is described in the `testkit::soak` module (`crates/testkit/src/soak/`); the
//! integration tests (`tests/it/soak.rs`) run a short version in the default test suite.
//!
//! The binary to soak is the first argument; this runner never builds it:
//!
//! ```sh
//! cargo build --release --bin sandbox-reconciler
//! cargo run --release --example soak -- target/release/sandbox-reconciler --duration 60s
//! cargo run --release --example soak -- target/release/sandbox-reconciler --duration 10m --seed 7 --json soak.json
//! cargo run --release --example soak -- target/release/sandbox-reconciler --duration 60s --backends-without-prefixes
//! cargo run --release --example soak -- target/release/sandbox-reconciler --duration 60s --shared-table
//! ```
//!
//! (`just soak` does both steps.) Variants (they combine): `--backends-without-prefixes`
//! enables both backends with no `object_name_prefix` and names pods and Sandboxes alike, so
//! every orphan is `unknown` and the guards may refuse instead of downgrading (the run then
//! passes on refusals; the report says which happened); `--shared-table` gives the session
//! table a scope column with the primary key `(cluster, thread_key)`, points the daemons at
//! scope `cluster-a` and churns rows of scope `cluster-b` with the same keys and object names,
//! which must never change.
//!
//! The exit code is 0 when the soak passed, 1 when it found a wrong downgrade, a lost or
//! inconsistent row, no downgrade at all (with `--backends-without-prefixes`: neither a
//! downgrade nor a guard refusal), a row of the other scope changed (`--shared-table`), or a
//! daemon that crashed, and 2 when the harness could not run (no such binary, no PostgreSQL).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use testkit::soak;

#[derive(Parser, Debug)]
#[command(
    about = "Soak sandbox-reconciler under application churn and faults, judged by an oracle",
    long_about = None
)]
struct Args {
    /// The sandbox-reconciler binary to soak (e.g. target/release/sandbox-reconciler)
    binary: PathBuf,
    /// How long to run, e.g. 60s, 10m, 1h (a bare number is seconds)
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the simulator's and fault switcher's random choices (default: from the clock)
    #[arg(long)]
    seed: Option<u64>,
    /// Also write the report as JSON to this file
    #[arg(long)]
    json: Option<PathBuf>,
    /// PostgreSQL server (a private schema is created in it)
    #[arg(
        long,
        env = "TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// Daemon replicas competing for the writer lock
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Sessions the application simulator keeps
    #[arg(long, default_value_t = 150)]
    sessions: usize,
    /// Concurrent application simulator tasks
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Do not run `--once` beside the daemons
    #[arg(long)]
    no_once: bool,
    /// Do not inject faults
    #[arg(long)]
    no_faults: bool,
    /// Directory for configs and daemon logs (default: a temporary one, kept if the run fails)
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the PostgreSQL schema even when the run passes
    #[arg(long)]
    keep_schema: bool,
    /// No progress lines on stderr
    #[arg(long)]
    quiet: bool,
    /// Both backends enabled without object_name_prefix, pods and Sandboxes named alike
    #[arg(long)]
    backends_without_prefixes: bool,
    /// A session table shared by two scopes (clusters); the daemons own one of them
    #[arg(long)]
    shared_table: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 60s, 10m or 1h"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("{text:?}: must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut cfg = soak::SoakConfig::new(args.binary.clone(), args.database_url.clone());
    cfg.duration = args.duration;
    cfg.seed = seed;
    cfg.replicas = args.replicas.max(1);
    cfg.sessions = args.sessions;
    cfg.workers = args.workers.max(1);
    cfg.once_runs = !args.no_once;
    cfg.faults = !args.no_faults;
    cfg.keep_schema = args.keep_schema;
    cfg.work_dir = args.work_dir.clone();
    cfg.progress = !args.quiet;
    cfg.backends_without_prefixes = args.backends_without_prefixes;
    cfg.shared_table = args.shared_table;
    eprintln!(
        "soak ({}): {:?} with seed {seed}, {} replica(s), daemon {}",
        cfg.variant(),
        cfg.duration,
        cfg.replicas,
        cfg.binary.display()
    );
    let report = match soak::run(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soak: could not run: {e:#}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.text());
    if let Some(path) = &args.json {
        if let Err(e) = std::fs::write(path, report.json()) {
            eprintln!("soak: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
