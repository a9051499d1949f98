//! Benchmark harness: sweeps over a million sessions and 120k cluster objects, each measured
//! against a floor taken in the same run. Results and method: docs/PERFORMANCE.md.
//!
//! ```sh
//! cargo run --release --example bench -- --help
//! cargo run --release --example bench -- --json bench.json --explain explain.md
//! ```
//!
//! One run (re)creates a database (`--database`, dropped first), loads `--rows` centaur-shaped
//! `sandbox_sessions` rows with COPY, starts the fake Kubernetes API server of the tests with
//! `--pods` Pods and `--sandboxes` Sandbox objects in a child process (so its memory and CPU are
//! not counted as the reconciler's), and measures each scenario on the same data, reset (not
//! timed) before each one so every scenario sees exactly its orphans:
//!
//! - `daemon`: the daemon's steady state: a reconciler whose watch cache (list once, then
//!   watch with bookmarks) is synced, sweeping `--steady-orphans` orphans on its leader
//!   connection (`Reconciler::sweep_on`), the way `sandbox-reconciler` without `--once` does;
//! - `daemon-cleanup`: the same with `--orphans` orphans, the cap lifted, confirmed by the
//!   cache proven fresh (rule 2(c));
//! - `once`: a one-off sweep (`--once`, in-process: `Reconciler::sweep`) with the steady
//!   orphans: rows first, then one listing that is also the confirmation (rule 2(b));
//! - `list-floor`: one bare listing of every object by the same client
//!   (`KubeCluster::snapshot`), and `read-floor`: the database read alone (`store::read_rows`
//!   into a sink that only counts): together the floor of `once`;
//! - `once-cleanup`: `once` with `--orphans` orphans, the cap lifted;
//! - `once-naive`: `once` with `--naive-orphans` orphans, to compare with...
//! - `naive`: what a hand-written clean-up script does: select every suspended row older than
//!   the grace period, GET its Pod and its Sandbox, and UPDATE + INSERT the audit record per
//!   orphan in its own transaction (`--shape` says which suspended rows there are);
//! - `floor`: one `UPDATE ... FROM unnest($1)` of the `--orphans` rows, and `floor-audit`: the
//!   same with the audit INSERT in the same statement.
//!
//! Every scenario runs twice: a timed pass on direct connections (the figures), then a
//! counting pass whose database connections go through a small TCP proxy that counts the
//! server's ReadyForQuery messages, i.e. completed round trips (pg_stat_statements is not
//! loaded on these servers, and a proxy in the timed pass would slow the per-row baseline more
//! than the batched sweep). API requests are counted by the fake server, by kind: lists, GETs,
//! and watches (reported apart). Any scenario that fails or changes the wrong number of rows
//! makes the process exit 1.
//!
//! Modules: `layout` the deterministic data, `load` the database (create, COPY, reset,
//! check), `cluster` the fake API server in a child process, `scenarios` what is measured,
//! `measure` process and machine figures, `proxy` the round-trip counter, `explain` the
//! query plans, `report` the verdicts and the markdown.

mod cluster;
mod explain;
mod layout;
mod load;
mod measure;
mod proxy;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use sandbox_reconciler::config::Settings;
use sandbox_reconciler::sweep::{SweepOptions, SweepResult};
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;

use cluster::FakeCluster;
use layout::{Layout, Shape};
use load::{claim_database, create_database, load, with_database, with_host_port_nossl};
use report::{markdown, verdicts, Results};
use scenarios::{Bench, Scenario};

const TABLE: &str = "sandbox_sessions";
const AUDIT: &str = "sandbox_reconciler_audit";
const DESIGNATED: &str = "bench_designated";
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    about = "Benchmarks sandbox-reconciler sweeps against a naive per-row script and the raw SQL floor",
    long_about = None
)]
struct Args {
    /// PostgreSQL server to use (any database on it; the benchmark database is created beside it)
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_url: String,
    /// Benchmark database; dropped and recreated by every run
    #[arg(long, default_value = "sandbox_reconciler_bench")]
    database: String,
    /// Session rows
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// Pods in the fake cluster (each backs one live row)
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
    /// Sandbox objects in the fake cluster
    #[arg(long, default_value_t = 20_000)]
    sandboxes: usize,
    /// Percentage of the Sandboxes paused on purpose (spec.replicas: 0), each behind a suspended row
    #[arg(long, default_value_t = 50.0)]
    paused_sandbox_pct: f64,
    /// Orphaned suspended rows of the clean-up sweep and the SQL floor
    #[arg(long, default_value_t = 100_000)]
    orphans: usize,
    /// Orphaned suspended rows of the steady-state sweep
    #[arg(long, default_value_t = 10)]
    steady_orphans: usize,
    /// Orphaned suspended rows of the naive baseline (and of the sweep it is compared with)
    #[arg(long, default_value_t = 10_000)]
    naive_orphans: usize,
    /// Which suspended rows exist besides the orphans and the paused Sandboxes' rows: `fresh`
    /// (the rest of --suspended-pct, updated within the grace period) or `backlog` (none: every
    /// suspended row is old, as on a platform whose pauses are forever)
    #[arg(long, value_enum, default_value = "fresh")]
    shape: Shape,
    /// cluster.page_size
    #[arg(long, default_value_t = 500)]
    page_size: u32,
    /// sweep.batch_size
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// cluster.confirm_concurrency
    #[arg(long, default_value_t = 16)]
    confirm_concurrency: usize,
    /// cluster.confirm_get_max (daemon: at most this many orphans are confirmed by GETs);
    /// unset = the reconciler's default
    #[arg(long)]
    confirm_get_max: Option<usize>,
    /// cluster.request_timeout_seconds (also the client's read timeout, as in the reconciler)
    #[arg(long, default_value_t = 30)]
    request_timeout_seconds: u64,
    /// Interval of the fake API server's watch bookmarks (a real API server sends one about
    /// every minute)
    #[arg(long, default_value_t = 1000)]
    bookmark_interval_ms: u64,
    /// During the daemon scenarios an object outside the reconciler's namespace changes every
    /// this many milliseconds, moving the cluster's revision as other workloads do (0 = never)
    #[arg(long, default_value_t = 100)]
    churn_ms: u64,
    /// Percentage of rows in the suspended state (including the orphans)
    #[arg(long, default_value_t = 20.0)]
    suspended_pct: f64,
    /// Percentage of rows in live states (running/idle/delivering)
    #[arg(long, default_value_t = 15.0)]
    live_pct: f64,
    /// Percentage of rows in other states (creating/error/stopped); the rest are gone
    #[arg(long, default_value_t = 5.0)]
    other_pct: f64,
    /// sweep.grace_period_seconds; suspended rows without an object that are not orphans were
    /// updated within the last half of it
    #[arg(long, default_value_t = 86_400)]
    grace_seconds: u64,
    /// Scenarios to run, in this order
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "daemon,daemon-cleanup,once,list-floor,read-floor,once-cleanup,once-naive,naive,floor,floor-audit"
    )]
    scenarios: Vec<Scenario>,
    /// Timed runs of the steady-state scenarios and their floors (daemon, once, list-floor,
    /// read-floor); the median run is reported
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Timed runs of the clean-up scenarios, the naive script and the SQL floors
    #[arg(long, default_value_t = 1)]
    repeat_cleanup: usize,
    /// Skip the untimed dry-run sweep that warms PostgreSQL's and the fake API server's caches
    #[arg(long)]
    no_warmup: bool,
    /// Skip the counting pass (no database round-trip figures)
    #[arg(long)]
    no_round_trips: bool,
    /// Objects without managedFields and annotations (smaller list pages than a real cluster)
    #[arg(long)]
    lean_objects: bool,
    /// Delay every fake API answer by this many milliseconds (a remote API server; 0 = loopback)
    #[arg(long, default_value_t = 0)]
    api_latency_ms: u64,
    /// Install a tracing subscriber at INFO writing to a sink, as the binary logs each downgrade
    #[arg(long)]
    log: bool,
    /// Namespace of every object
    #[arg(long, default_value = "agents")]
    namespace: String,
    /// Seed of the data generator
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also write the results as JSON to this file
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write EXPLAIN (ANALYZE, BUFFERS) of the sweep's queries (markdown) to this file
    #[arg(long)]
    explain: Option<PathBuf>,
    /// `name=value`: ALTER DATABASE ... SET name = 'value' on the new database (repeatable), e.g.
    /// `jit=off`, or `session_preload_libraries=auto_explain` with `auto_explain.log_min_duration=20ms`
    #[arg(long = "database-setting", value_name = "NAME=VALUE")]
    database_settings: Vec<String>,
    /// Internal: serve the fake API server on stdin/stdout (the child process)
    #[arg(long, hide = true)]
    serve_fake_api: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.serve_fake_api {
        return runtime.block_on(cluster::serve_fake_api(args));
    }
    if args.log {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::sink)
            .init();
    }
    match runtime.block_on(run(args)) {
        Ok(true) => Ok(()),
        Ok(false) => {
            eprintln!("bench: FAILED (see the checks above)");
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            std::process::exit(1)
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    let scenarios = args.scenarios.clone();
    let layout = Layout::new(&args, &scenarios)?;
    let direct_url = with_database(&args.admin_url, &args.database)?;
    let options: PgConnectOptions = direct_url.parse()?;
    let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {}", options.get_host()))?;
    let (proxy_addr, proxy) = proxy::start_proxy(upstream).await?;
    let proxied_url = with_host_port_nossl(&direct_url, proxy_addr)?;

    eprintln!(
        "bench: loading {} rows into {} and starting the fake API server with {} pods and {} sandboxes...",
        args.rows, args.database, args.pods, args.sandboxes
    );
    let _claim = claim_database(&args).await?;
    create_database(&args, &direct_url).await?;
    let fake_started = Instant::now();
    let (fake, load) = tokio::join!(FakeCluster::start(&args), load(&args, &layout, &direct_url));
    let mut fake = fake?;
    let load = load?;
    eprintln!(
        "bench: loaded in {:.1}s ({:.0} rows/s); fake API server ready after {:.1}s",
        load.seconds,
        load.rows_per_second,
        fake_started.elapsed().as_secs_f64()
    );
    let fake_rss = fake.rss_mib().await?;
    let machine = measure::machine(&direct_url, fake_rss).await?;
    let kube = fake.client(std::time::Duration::from_secs(args.request_timeout_seconds))?;
    let mut bench = Bench {
        args: args.clone(),
        layout: layout.clone(),
        direct_url: direct_url.clone(),
        proxied_url,
        proxy,
        fake,
        kube,
        daemon: None,
    };
    if !args.no_warmup {
        eprintln!("bench: warm-up (an untimed dry-run sweep)...");
        let started = Instant::now();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let report = bench
            .reconciler(&direct_url)?
            .sweep(
                &SweepOptions {
                    dry_run: true,
                    max_downgrades: None,
                },
                &rx,
            )
            .await;
        if report.result != SweepResult::Success {
            bail!(
                "the warm-up sweep ended {:?}: {}",
                report.result,
                report.error.unwrap_or_default()
            );
        }
        eprintln!(
            "bench: warm-up took {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    // Rounds: every scenario's first run, then every scenario's second run, and so on, so
    // that a drift of the shared machine (autovacuum, page cache, another process) during the
    // benchmark weighs on a sweep and on its floor alike.
    let mut runs: Vec<Vec<scenarios::Measurement>> = scenarios.iter().map(|_| Vec::new()).collect();
    let rounds = scenarios
        .iter()
        .map(|s| bench.runs_of(*s))
        .max()
        .unwrap_or(1);
    for round in 0..rounds {
        for (i, scenario) in scenarios.iter().enumerate() {
            if round < bench.runs_of(*scenario) {
                runs[i].push(bench.run(*scenario, round).await?);
            }
        }
    }
    let mut measurements = Vec::new();
    for (scenario, runs) in scenarios.iter().zip(runs) {
        measurements.push(bench.finish(*scenario, runs).await?);
    }
    bench.stop_daemon().await?;
    if let Some(path) = &args.explain {
        explain::explain(&args, &direct_url, path).await?;
    }
    bench.fake.stop().await;

    let verdicts = verdicts(&args, &layout, &measurements);
    let results = Results {
        args: args.clone(),
        layout,
        machine,
        load,
        scenarios: measurements,
        verdicts,
    };
    print!("{}", markdown(&results));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
        eprintln!("bench: JSON written to {}", path.display());
    }
    Ok(results.scenarios.iter().all(|m| m.ok))
}

/// The reconciler's settings for the benchmark database at `url`.
fn bench_settings(args: &Args, url: &str) -> Result<Settings> {
    let mut s = Settings::default();
    s.database.url = url.to_string();
    s.database.statement_timeout = std::time::Duration::from_secs(600);
    s.database.client_deadline = std::time::Duration::from_secs(630);
    s.sessions.table = TABLE.into();
    s.audit.table = AUDIT.into();
    // The heavier case: a profile that clears a column (centaur's clears none), so the sweeps
    // and their hand-written floors do the same work.
    s.sessions.clear_columns = vec!["agent_thread_id".into()];
    s.cluster.namespaces = vec![args.namespace.clone()];
    s.cluster.page_size = args.page_size;
    s.cluster.request_timeout = std::time::Duration::from_secs(args.request_timeout_seconds);
    s.cluster.confirm_concurrency = args.confirm_concurrency;
    if let Some(n) = args.confirm_get_max {
        s.cluster.confirm_get_max = n;
    }
    // Both backends, as during centaur's migration, and no prefixes: centaur's one naming
    // scheme cannot have them.
    s.backends.agent_sandbox.enabled = true;
    s.backends.pod.object_name_prefix = String::new();
    s.backends.agent_sandbox.object_name_prefix = String::new();
    s.sweep.grace_period = std::time::Duration::from_secs(args.grace_seconds);
    s.sweep.batch_size = args.batch_size;
    s.validate()
        .map_err(|e| anyhow!("benchmark settings: {e}"))?;
    Ok(s)
}
