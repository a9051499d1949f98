//! Benchmark harness: sweeps over a million sessions and 120k cluster objects, against a
//! naive per-row clean-up script and the raw SQL floor. Results and method: docs/PERFORMANCE.md.
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
//! - `steady`: the library's real `Reconciler::sweep` with a handful of orphans;
//! - `cleanup`: the same with `--orphans` orphans, the per-sweep cap lifted;
//! - `sweep-naive`: the same with `--naive-orphans` orphans, to compare with...
//! - `naive`: what a hand-written clean-up script does: select the old suspended rows, GET each
//!   row's Pod and Sandbox, and UPDATE + INSERT the audit record per row in its own transaction;
//! - `floor`: one `UPDATE ... FROM unnest($1)` of the `--orphans` rows, and `floor-audit`: the
//!   same with the audit INSERT in the same statement.
//!
//! Every scenario runs twice: a timed pass on direct connections (the figures), then a
//! counting pass whose database connections go through a small TCP proxy that counts the
//! server's ReadyForQuery messages, i.e. completed round trips (pg_stat_statements is not
//! loaded on these servers, and a proxy in the timed pass would slow the per-row baseline more
//! than the batched sweep). Any scenario that fails or changes the wrong number of rows makes
//! the process exit 1.

#[path = "../tests/support/fake_api.rs"]
mod fake_api;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::Api;
use sandbox_reconciler::cluster::{BackendKind, KubeCluster};
use sandbox_reconciler::config::Settings;
use sandbox_reconciler::store::{self, Database, TableMapping};
use sandbox_reconciler::sweep::{ClusterSource, Reconciler, SweepOptions, SweepResult, Timings};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

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
    /// cluster.page_size
    #[arg(long, default_value_t = 500)]
    page_size: u32,
    /// sweep.batch_size
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// cluster.confirm_concurrency
    #[arg(long, default_value_t = 16)]
    confirm_concurrency: usize,
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
        default_value = "steady,cleanup,sweep-naive,naive,floor,floor-audit"
    )]
    scenarios: Vec<Scenario>,
    /// Timed runs per scenario; the median run is reported
    #[arg(long, default_value_t = 1)]
    repeat: usize,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    Steady,
    Cleanup,
    SweepNaive,
    Naive,
    Floor,
    FloorAudit,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Cleanup => "cleanup",
            Scenario::SweepNaive => "sweep-naive",
            Scenario::Naive => "naive",
            Scenario::Floor => "floor",
            Scenario::FloorAudit => "floor-audit",
        }
    }

    fn orphans(self, args: &Args) -> usize {
        match self {
            Scenario::Steady => args.steady_orphans,
            Scenario::Cleanup | Scenario::Floor | Scenario::FloorAudit => args.orphans,
            Scenario::SweepNaive | Scenario::Naive => args.naive_orphans,
        }
    }

    fn is_sweep(self) -> bool {
        matches!(
            self,
            Scenario::Steady | Scenario::Cleanup | Scenario::SweepNaive
        )
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.serve_fake_api {
        return runtime.block_on(serve_fake_api(args));
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

// ---------------------------------------------------------------------------------------------
// The data: one deterministic layout shared by the database loader and the fake cluster.

/// splitmix64: a cheap, good-enough hash for deterministic per-row variety.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn rnd(seed: u64, i: usize, salt: u64) -> u64 {
    mix(seed ^ mix(((i as u64) << 8) | salt))
}

/// Object name of object index `j`: a bijective scramble of j, so names look random but never
/// collide. Pods are 0..P, Sandboxes P..P+S, names that no object has start at P+S.
fn object_name(j: u64) -> String {
    const MASK: u64 = (1 << 48) - 1;
    let y = j.wrapping_mul(0x5DEE_CE66_D1A5) & MASK;
    format!("sb-{:012x}", y ^ (y >> 21))
}

fn thread_key(i: usize) -> String {
    const CHANNELS: usize = 64;
    let channel = mix((i % CHANNELS) as u64) as u32;
    format!(
        "slack:C{channel:08X}:{}.{:06}",
        1_700_000_000 + i / CHANNELS,
        (i * 7919) % 1_000_000
    )
}

/// What one row is.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// Orphan number n: suspended with a missing object and old `updated_at` when n < k of the
    /// scenario, else gone (as after its clean-up).
    Designated(u32),
    /// Suspended, backed by paused Sandbox number t.
    Paused(u32),
    /// Suspended without object, but updated within the grace period.
    Fresh,
    /// Live row number l (its object, if any, follows from l).
    Live(u32),
    /// Other-state row number m.
    Other(u32),
    Gone,
}

#[derive(Debug, Clone, Serialize)]
struct Layout {
    rows: usize,
    pods: usize,
    sandboxes: usize,
    paused_sandboxes: usize,
    designated: usize,
    suspended: usize,
    fresh_suspended: usize,
    live: usize,
    live_with_object: usize,
    other: usize,
    other_with_object: usize,
    gone: usize,
    untracked_objects: usize,
    /// Fresh suspended rows were updated within this many seconds (half the grace period).
    fresh_window_seconds: u64,
}

impl Layout {
    fn new(args: &Args, scenarios: &[Scenario]) -> Result<Layout> {
        let n = args.rows;
        let pct = |p: f64| ((n as f64) * p / 100.0).round() as usize;
        let paused = ((args.sandboxes as f64) * args.paused_sandbox_pct / 100.0).round() as usize;
        let paused = paused.min(args.sandboxes);
        let designated = scenarios.iter().map(|s| s.orphans(args)).max().unwrap_or(0);
        let mut suspended = pct(args.suspended_pct);
        if suspended < designated + paused {
            eprintln!(
                "bench: {}% suspended rows are fewer than {designated} orphans + {paused} paused sandboxes; using {} suspended rows",
                args.suspended_pct,
                designated + paused
            );
            suspended = designated + paused;
        }
        let live = pct(args.live_pct);
        let other = pct(args.other_pct);
        if suspended + live + other > n {
            bail!("--rows {n} is too small for {suspended} suspended, {live} live and {other} other rows");
        }
        let running_sandboxes = args.sandboxes - paused;
        let live_with_object = live.min(args.pods + running_sandboxes);
        let spare_pods = args.pods.saturating_sub(live);
        let other_with_object = other.min(spare_pods);
        let referenced = paused + live_with_object + other_with_object;
        Ok(Layout {
            rows: n,
            pods: args.pods,
            sandboxes: args.sandboxes,
            paused_sandboxes: paused,
            designated,
            suspended,
            fresh_suspended: suspended - designated - paused,
            live,
            live_with_object,
            other,
            other_with_object,
            gone: n - suspended - live - other,
            untracked_objects: args.pods + args.sandboxes - referenced,
            fresh_window_seconds: (args.grace_seconds / 2).max(1),
        })
    }

    /// Every row's slot, shuffled deterministically.
    fn slots(&self, seed: u64) -> Vec<Slot> {
        let mut slots = Vec::with_capacity(self.rows);
        slots.extend((0..self.designated).map(|n| Slot::Designated(n as u32)));
        slots.extend((0..self.paused_sandboxes).map(|t| Slot::Paused(t as u32)));
        slots.extend((0..self.fresh_suspended).map(|_| Slot::Fresh));
        slots.extend((0..self.live).map(|l| Slot::Live(l as u32)));
        slots.extend((0..self.other).map(|m| Slot::Other(m as u32)));
        slots.extend((0..self.gone).map(|_| Slot::Gone));
        for i in (1..slots.len()).rev() {
            let j = (rnd(seed, i, 99) % (i as u64 + 1)) as usize;
            slots.swap(i, j);
        }
        slots
    }

    /// Object of live row l: pods first, then running sandboxes; `None` when objects ran out.
    fn live_object(&self, l: usize) -> Option<u64> {
        if l < self.pods {
            Some(l as u64)
        } else if l < self.live_with_object {
            Some((self.pods + self.paused_sandboxes + (l - self.pods)) as u64)
        } else {
            None
        }
    }

    fn missing_object(&self, i: usize) -> u64 {
        (self.pods + self.sandboxes + i) as u64
    }
}

/// COPY text format helpers.
fn ts(buf: &mut String, t: DateTime<Utc>) {
    let _ = write!(buf, "{}", t.format("%Y-%m-%d %H:%M:%S%.6f+00"));
}

const HARNESSES: [&str; 3] = ["amp", "claude-code", "codex"];
const MODELS: [&str; 4] = [
    "claude-sonnet-4-5",
    "claude-opus-4-1",
    "gpt-5-codex",
    "claude-haiku-4-5",
];
const TOPICS: [&str; 8] = [
    "Fix flaky integration test in billing",
    "Investigate p99 latency regression",
    "Draft migration plan for sessions table",
    "Review PR: retry policy for webhooks",
    "Summarize incident 4711 timeline",
    "Add metrics to the ingest worker",
    "Bump dependencies and fix clippy",
    "Write runbook for cache eviction",
];

/// Appends one row in COPY text format; returns the designated line for orphan rows.
fn push_row(
    buf: &mut String,
    designated: &mut String,
    layout: &Layout,
    seed: u64,
    now: DateTime<Utc>,
    i: usize,
    slot: Slot,
) {
    let h = |salt: u64| rnd(seed, i, salt);
    let secs = |max: u64| chrono::Duration::microseconds((h(1) % (max * 1_000_000)) as i64);
    let day = 86_400u64;
    let (state, object, updated_at): (&str, u64, DateTime<Utc>) = match slot {
        Slot::Designated(_) => (
            "gone",
            layout.missing_object(i),
            now - chrono::Duration::days(2) - secs(58 * day),
        ),
        Slot::Paused(t) => (
            "suspended",
            (layout.pods + t as usize) as u64,
            now - chrono::Duration::days(1) - secs(29 * day),
        ),
        Slot::Fresh => (
            "suspended",
            layout.missing_object(i),
            now - secs(layout.fresh_window_seconds),
        ),
        Slot::Live(l) => {
            let state = match h(2) % 20 {
                0 => "delivering",
                1..=7 => "idle",
                _ => "running",
            };
            let object = layout
                .live_object(l as usize)
                .unwrap_or_else(|| layout.missing_object(i));
            (state, object, now - secs(3 * day))
        }
        Slot::Other(m) => {
            let state = ["creating", "error", "stopped"][(h(2) % 3) as usize];
            let object = if (m as usize) < layout.other_with_object {
                (layout.live + m as usize) as u64
            } else {
                layout.missing_object(i)
            };
            (state, object, now - secs(30 * day))
        }
        Slot::Gone => ("gone", layout.missing_object(i), now - secs(365 * day)),
    };
    let key = thread_key(i);
    let object = object_name(object);
    let agent_thread = format!("T-{}", uuid::Uuid::from_u64_pair(h(3), i as u64));
    let started_at = updated_at - chrono::Duration::seconds((h(4) % (7 * day)) as i64);
    let harness = HARNESSES[(h(5) % 3) as usize];
    let n = "\\N";
    // thread_key, sandbox_id, harness, engine, state, last_delivered_id, thread_name
    let _ = write!(
        buf,
        "{key}\t{object}\t{harness}\t{harness}\t{state}\t{}.{:06}\t{} (#{i})\t",
        1_700_000_000 + h(6) % 50_000_000,
        h(7) % 1_000_000,
        TOPICS[(h(8) % 8) as usize]
    );
    // started_at, updated_at, agent_thread_id
    ts(buf, started_at);
    buf.push('\t');
    ts(buf, updated_at);
    buf.push('\t');
    if state == "gone" {
        buf.push_str(n);
    } else {
        buf.push_str(&agent_thread);
    }
    buf.push('\t');
    // inflight_turn_id, inflight_turn_input, inflight_started_at, inflight_attempts
    if state == "delivering" {
        let _ = write!(
            buf,
            "turn-{:016x}\t{{\"text\": \"please continue with the next step\", \"attachments\": []}}\t",
            h(9)
        );
        ts(buf, updated_at);
        buf.push_str("\t1\t");
    } else {
        let _ = write!(buf, "{n}\t{n}\t{n}\t0\t");
    }
    // last_result, last_result_at
    match h(10) % 4 {
        0 => {
            let _ = write!(buf, "{n}\t{n}\t");
        }
        1 => {
            buf.push_str("error: sandbox exited with code 137\t");
            ts(buf, updated_at);
            buf.push('\t');
        }
        _ => {
            buf.push_str("ok\t");
            ts(buf, updated_at);
            buf.push('\t');
        }
    }
    // wire_lease_id, wire_connected_at, wire_last_seen_at
    if state == "running" {
        let _ = write!(buf, "lease-{:016x}\t", h(11));
        ts(buf, started_at);
        buf.push('\t');
        ts(buf, updated_at);
        buf.push('\t');
    } else {
        let _ = write!(buf, "{n}\t{n}\t{n}\t");
    }
    // trace_id, model
    let _ = writeln!(
        buf,
        "{}\t{}",
        uuid::Uuid::from_u64_pair(h(12), i as u64),
        MODELS[(h(13) % 4) as usize]
    );
    if let Slot::Designated(d) = slot {
        let _ = write!(designated, "{d}\t{key}\t{object}\t");
        ts(designated, updated_at);
        let _ = writeln!(designated, "\t{agent_thread}");
    }
}

const COPY_COLUMNS: &str = "thread_key, sandbox_id, harness, engine, state, last_delivered_id, \
    thread_name, started_at, updated_at, agent_thread_id, inflight_turn_id, inflight_turn_input, \
    inflight_started_at, inflight_attempts, last_result, last_result_at, wire_lease_id, \
    wire_connected_at, wire_last_seen_at, trace_id, model";

// ---------------------------------------------------------------------------------------------
// The fake API server, in a child process.

/// Child process: populate the fake API server, print `ready <url>`, then answer `count`,
/// `clear` and `rss` on stdin until EOF.
async fn serve_fake_api(args: Args) -> Result<()> {
    let layout = Layout::new(&args, &args.scenarios)?;
    let api = fake_api::FakeApiServer::start().await;
    let ns = args.namespace.as_str();
    let created = "2026-01-01T00:00:00Z";
    let managed_pod = json!([
        {"manager": "centaur", "operation": "Update", "apiVersion": "v1", "time": created,
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:centaur.ai/harness": {}},
            "f:labels": {".": {}, "f:app": {}, "f:centaur.ai/managed": {}, "f:centaur.ai/sandbox-id": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"sandbox\"}": {".": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                "f:resources": {".": {}, "f:limits": {".": {}, "f:cpu": {}, "f:memory": {}}}}},
                "f:restartPolicy": {}, "f:terminationGracePeriodSeconds": {}}}},
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": created,
         "fieldsType": "FieldsV1", "subresource": "status", "fieldsV1": {"f:status": {
            "f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}},
            "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {".": {}, "k:{\"ip\":\"10.0.0.1\"}": {".": {}, "f:ip": {}}}, "f:startTime": {}}}}
    ]);
    let managed_sandbox = json!([
        {"manager": "centaur", "operation": "Update", "apiVersion": "agents.x-k8s.io/v1alpha1", "time": created,
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
            "f:spec": {".": {}, "f:podTemplate": {".": {}, "f:spec": {".": {}, "f:containers": {}}}, "f:replicas": {}}}},
        {"manager": "agent-sandbox-controller", "operation": "Update", "apiVersion": "agents.x-k8s.io/v1alpha1", "time": created,
         "fieldsType": "FieldsV1", "subresource": "status", "fieldsV1": {"f:status": {".": {}, "f:conditions": {}, "f:replicas": {}, "f:selector": {}}}}
    ]);
    for j in 0..layout.pods {
        let name = object_name(j as u64);
        let mut meta = json!({
            "labels": {"app": "centaur-sandbox", "centaur.ai/managed": "true", "centaur.ai/sandbox-id": name},
        });
        if !args.lean_objects {
            meta["annotations"] = json!({"centaur.ai/harness": HARNESSES[j % 3]});
            meta["managedFields"] = managed_pod.clone();
        }
        let pod = json!({
            "metadata": meta,
            "spec": {"containers": [{"name": "sandbox", "image": "ghcr.io/example/centaur-sandbox:2026.01",
                       "imagePullPolicy": "IfNotPresent",
                       "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}}],
                     "restartPolicy": "Never", "terminationGracePeriodSeconds": 30},
            "status": {"phase": "Running", "hostIP": "10.1.0.4", "podIP": "10.0.0.1",
                       "startTime": created}
        });
        api.add_object(fake_api::Kind::Pod, ns, &name, pod);
    }
    for t in 0..layout.sandboxes {
        let name = object_name((layout.pods + t) as u64);
        let replicas = i64::from(t >= layout.paused_sandboxes);
        let ready = if replicas == 1 { "True" } else { "False" };
        let mut meta = json!({"labels": {"app": "centaur-sandbox"}});
        if !args.lean_objects {
            meta["managedFields"] = managed_sandbox.clone();
        }
        let sandbox = json!({
            "apiVersion": "agents.x-k8s.io/v1alpha1",
            "kind": "Sandbox",
            "metadata": meta,
            "spec": {"replicas": replicas, "podTemplate": {"spec": {"containers": [
                {"name": "sandbox", "image": "ghcr.io/example/centaur-sandbox:2026.01",
                 "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}}]}}},
            "status": {"replicas": replicas, "selector": format!("agents.x-k8s.io/sandbox-name={name}"),
                       "conditions": [{"type": "Ready", "status": ready,
                                       "lastTransitionTime": created}]}
        });
        api.add_object(fake_api::Kind::Sandbox, ns, &name, sandbox);
    }
    if args.api_latency_ms > 0 {
        api.inject(fake_api::Fault::always(fake_api::FaultAction::Hang(
            Duration::from_millis(args.api_latency_ms),
        )));
    }
    let mut out = tokio::io::stdout();
    out.write_all(format!("ready {}\n", api.url()).as_bytes())
        .await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let answer = match line.trim() {
            "count" => api.request_count().to_string(),
            "clear" => {
                api.clear_requests();
                "ok".to_string()
            }
            "rss" => format!(
                "{} {}",
                status_kb("VmRSS").unwrap_or(0),
                status_kb("VmHWM").unwrap_or(0)
            ),
            other => format!("unknown command {other:?}"),
        };
        out.write_all(format!("{answer}\n").as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}

/// The parent's handle on the child.
struct FakeCluster {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    url: String,
    pid: u32,
}

impl FakeCluster {
    async fn start(args: &Args) -> Result<FakeCluster> {
        let exe = std::env::current_exe()?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--serve-fake-api")
            .args(["--rows", &args.rows.to_string()])
            .args(["--pods", &args.pods.to_string()])
            .args(["--sandboxes", &args.sandboxes.to_string()])
            .args(["--paused-sandbox-pct", &args.paused_sandbox_pct.to_string()])
            .args(["--orphans", &args.orphans.to_string()])
            .args(["--steady-orphans", &args.steady_orphans.to_string()])
            .args(["--naive-orphans", &args.naive_orphans.to_string()])
            .args(["--suspended-pct", &args.suspended_pct.to_string()])
            .args(["--live-pct", &args.live_pct.to_string()])
            .args(["--other-pct", &args.other_pct.to_string()])
            .args(["--namespace", &args.namespace])
            .args(["--api-latency-ms", &args.api_latency_ms.to_string()])
            .args([
                "--scenarios",
                &args
                    .scenarios
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(","),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if args.lean_objects {
            cmd.arg("--lean-objects");
        }
        let mut child = cmd
            .spawn()
            .context("starting the fake API server process")?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut stdout = BufReader::new(stdout).lines();
        let ready = stdout
            .next_line()
            .await?
            .ok_or_else(|| anyhow!("the fake API server process exited before it was ready"))?;
        let url = ready
            .strip_prefix("ready ")
            .ok_or_else(|| anyhow!("unexpected line from the fake API server: {ready}"))?
            .to_string();
        Ok(FakeCluster {
            child,
            stdin,
            stdout,
            url,
            pid,
        })
    }

    async fn ask(&mut self, command: &str) -> Result<String> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        self.stdout
            .next_line()
            .await?
            .ok_or_else(|| anyhow!("the fake API server process exited"))
    }

    async fn request_count(&mut self) -> Result<u64> {
        Ok(self.ask("count").await?.parse()?)
    }

    async fn clear(&mut self) -> Result<()> {
        self.ask("clear").await.map(|_| ())
    }

    async fn rss_mib(&mut self) -> Result<f64> {
        let answer = self.ask("rss").await?;
        let kb: u64 = answer.split(' ').next().unwrap_or("0").parse()?;
        Ok(kb as f64 / 1024.0)
    }

    fn client(&self) -> Result<kube::Client> {
        let config = kube::Config::new(self.url.parse()?);
        Ok(kube::Client::try_from(config)?)
    }

    async fn stop(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.kill().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Counting proxy: completed round trips = ReadyForQuery messages from the server.

#[derive(Default)]
struct ProxyCounters {
    ready_for_query: AtomicU64,
    connections: AtomicU64,
    bytes_to_server: AtomicU64,
    bytes_to_client: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct ProxyFigures {
    round_trips: u64,
    connections: u64,
    bytes_to_server: u64,
    bytes_to_client: u64,
}

impl ProxyCounters {
    fn figures(&self) -> ProxyFigures {
        ProxyFigures {
            round_trips: self.ready_for_query.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            bytes_to_server: self.bytes_to_server.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
        }
    }
}

impl std::ops::Sub for ProxyFigures {
    type Output = ProxyFigures;
    fn sub(self, o: ProxyFigures) -> ProxyFigures {
        ProxyFigures {
            round_trips: self.round_trips - o.round_trips,
            connections: self.connections - o.connections,
            bytes_to_server: self.bytes_to_server - o.bytes_to_server,
            bytes_to_client: self.bytes_to_client - o.bytes_to_client,
        }
    }
}

/// Starts the proxy in front of `upstream`; needs `sslmode=disable` on the client side so the
/// server's first byte already is a framed message.
async fn start_proxy(upstream: SocketAddr) -> Result<(SocketAddr, Arc<ProxyCounters>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let counters = Arc::new(ProxyCounters::default());
    let shared = counters.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counters = shared.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                counters.connections.fetch_add(1, Ordering::Relaxed);
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up_counters = counters.clone();
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        up_counters
                            .bytes_to_server
                            .fetch_add(n as u64, Ordering::Relaxed);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let (mut header, mut have, mut skip) = ([0u8; 5], 0usize, 0usize);
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut i = 0;
                        while i < n {
                            if skip > 0 {
                                let take = skip.min(n - i);
                                skip -= take;
                                i += take;
                                continue;
                            }
                            header[have] = buf[i];
                            have += 1;
                            i += 1;
                            if have == 5 {
                                let len = u32::from_be_bytes([
                                    header[1], header[2], header[3], header[4],
                                ]) as usize;
                                if header[0] == b'Z' {
                                    counters.ready_for_query.fetch_add(1, Ordering::Relaxed);
                                }
                                skip = len.saturating_sub(4);
                                have = 0;
                            }
                        }
                        counters
                            .bytes_to_client
                            .fetch_add(n as u64, Ordering::Relaxed);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    Ok((addr, counters))
}

// ---------------------------------------------------------------------------------------------
// Process figures.

fn status_kb(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

extern "C" {
    fn malloc_trim(pad: usize) -> i32;
    fn sysconf(name: i32) -> i64;
}

fn clock_ticks() -> f64 {
    // _SC_CLK_TCK = 2 on Linux.
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { sysconf(2) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of a process (`self` or a pid).
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / clock_ticks()
}

/// The 1-minute load average.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Busy CPU seconds of the whole machine (all cores).
fn machine_busy_seconds() -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = text.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, x)| x)
        .sum();
    busy / clock_ticks()
}

/// Peak resident memory of this process during a scenario: VmHWM after resetting it through
/// /proc/self/clear_refs, and a 5 ms VmRSS sampler as a cross-check (and fallback).
struct RssWatch {
    start_kb: u64,
    /// Only when VmHWM could not be reset (sampling costs a few percent of a core).
    sampler: Option<(Arc<AtomicBool>, std::thread::JoinHandle<u64>)>,
}

impl RssWatch {
    fn start() -> RssWatch {
        // SAFETY: malloc_trim only returns free heap memory to the kernel.
        unsafe {
            malloc_trim(0);
        }
        let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let start_kb = status_kb("VmRSS").unwrap_or(0);
        let sampler = (!hwm_reset).then(|| {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut peak = 0;
                while !flag.load(Ordering::Relaxed) {
                    peak = peak.max(status_kb("VmRSS").unwrap_or(0));
                    std::thread::sleep(Duration::from_millis(10));
                }
                peak.max(status_kb("VmRSS").unwrap_or(0))
            });
            (stop, thread)
        });
        RssWatch { start_kb, sampler }
    }

    /// (start MiB, peak MiB, how the peak was measured)
    fn finish(self) -> (f64, f64, &'static str) {
        let (peak, how) = match self.sampler {
            None => (
                status_kb("VmHWM").unwrap_or(0),
                "VmHWM (reset by clear_refs)",
            ),
            Some((stop, thread)) => {
                stop.store(true, Ordering::Relaxed);
                (thread.join().unwrap_or(0), "VmRSS sampled every 10 ms")
            }
        };
        (self.start_kb as f64 / 1024.0, peak as f64 / 1024.0, how)
    }
}

// ---------------------------------------------------------------------------------------------
// Database set-up and resets.

fn with_database(url: &str, database: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow!("not a URL: {url}"))?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or(before_query);
    let mut out = format!("{scheme}://{authority}/{database}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

fn with_host_port_nossl(url: &str, addr: SocketAddr) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow!("not a URL: {url}"))?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, q),
        None => (rest, ""),
    };
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    let params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("sslmode="))
        .chain(["sslmode=disable"])
        .collect();
    Ok(format!(
        "{scheme}://{}{addr}/{path}?{}",
        userinfo.unwrap_or_default(),
        params.join("&")
    ))
}

async fn exec(conn: &mut PgConnection, sql: &str) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(conn)
        .await
        .with_context(|| format!("running: {}", sql.chars().take(120).collect::<String>()))?;
    Ok(())
}

/// Holds a session advisory lock keyed by the benchmark database's name for the whole run, so
/// two runs never drop each other's database; the lock goes with the returned connection.
async fn claim_database(args: &Args) -> Result<PgConnection> {
    let mut conn = PgConnection::connect(&args.admin_url)
        .await
        .context("connecting to --admin-url")?;
    let claimed: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(hashtext('sandbox-reconciler-bench:' || $1))",
    )
    .bind(&args.database)
    .fetch_one(&mut conn)
    .await?;
    if !claimed {
        bail!(
            "another benchmark run is using database {}; wait for it or pass another --database",
            args.database
        );
    }
    Ok(conn)
}

async fn create_database(args: &Args, bench_url: &str) -> Result<()> {
    if !args
        .database
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!("--database must be lower-case letters, digits and _");
    }
    let mut admin = PgConnection::connect(&args.admin_url)
        .await
        .context("connecting to --admin-url")?;
    exec(
        &mut admin,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", args.database),
    )
    .await?;
    exec(&mut admin, &format!("CREATE DATABASE {}", args.database)).await?;
    for setting in &args.database_settings {
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| anyhow!("--database-setting {setting}: expected NAME=VALUE"))?;
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            bail!("--database-setting {setting}: not a setting name");
        }
        exec(
            &mut admin,
            &format!(
                "ALTER DATABASE {} SET {name} = '{}'",
                args.database,
                value.replace('\'', "''")
            ),
        )
        .await?;
    }
    admin.close().await?;
    let mut conn = PgConnection::connect(bench_url).await?;
    exec(
        &mut conn,
        include_str!("../tests/fixtures/centaur_sandbox_sessions.sql"),
    )
    .await?;
    exec(
        &mut conn,
        &format!(
            "CREATE TABLE {DESIGNATED} (n INTEGER PRIMARY KEY, thread_key TEXT NOT NULL, \
             sandbox_id TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL, agent_thread_id TEXT)"
        ),
    )
    .await?;
    conn.close().await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
struct LoadFigures {
    seconds: f64,
    rows_per_second: f64,
    table_mib: f64,
    indexes_mib: f64,
}

async fn load(args: &Args, layout: &Layout, bench_url: &str) -> Result<LoadFigures> {
    let started = Instant::now();
    let now = Utc::now();
    // No TLS for the bulk load: encrypting 300 MB would only slow the set-up down.
    let options: PgConnectOptions = bench_url.parse()?;
    let mut conn =
        PgConnection::connect_with(&options.ssl_mode(sqlx::postgres::PgSslMode::Disable)).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    let (seed, layout_copy) = (args.seed, layout.clone());
    let generator = tokio::task::spawn_blocking(move || {
        let slots = layout_copy.slots(seed);
        let mut designated = String::new();
        let mut buf = String::with_capacity(4 << 20);
        for (i, slot) in slots.iter().enumerate() {
            push_row(&mut buf, &mut designated, &layout_copy, seed, now, i, *slot);
            if buf.len() >= 4 << 20 {
                let full = std::mem::replace(&mut buf, String::with_capacity(4 << 20));
                if tx.blocking_send(full).is_err() {
                    return designated;
                }
            }
        }
        if !buf.is_empty() {
            let _ = tx.blocking_send(buf);
        }
        designated
    });
    let mut copy = conn
        .copy_in_raw(&format!("COPY {TABLE} ({COPY_COLUMNS}) FROM STDIN"))
        .await?;
    while let Some(chunk) = rx.recv().await {
        copy.send(chunk.into_bytes()).await?;
    }
    let copied = copy.finish().await?;
    let designated = generator.await?;
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {DESIGNATED} (n, thread_key, sandbox_id, updated_at, agent_thread_id) FROM STDIN"
        ))
        .await?;
    copy.send(designated.into_bytes()).await?;
    copy.finish().await?;
    if copied as usize != layout.rows {
        bail!("COPY loaded {copied} rows, expected {}", layout.rows);
    }
    // The reconciler's audit table, created the way a sweep creates it.
    let settings = bench_settings(args, bench_url)?;
    let mapping = TableMapping::from_settings(&settings).map_err(|e| anyhow!(e))?;
    store::migrate(&mut conn, &mapping).await?;
    // Benchmark hygiene: no autovacuum in the middle of a timed scenario (each reset vacuums).
    exec(
        &mut conn,
        &format!(
            "ALTER TABLE {TABLE} SET (autovacuum_enabled = off); \
             ALTER TABLE {AUDIT} SET (autovacuum_enabled = off)"
        ),
    )
    .await?;
    exec(&mut conn, &format!("VACUUM (FREEZE, ANALYZE) {TABLE}")).await?;
    exec(&mut conn, &format!("VACUUM ANALYZE {DESIGNATED}")).await?;
    exec(&mut conn, "CHECKPOINT").await?;
    let seconds = started.elapsed().as_secs_f64();
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT pg_table_size('{TABLE}')::float8, pg_indexes_size('{TABLE}')::float8"
    )))
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    Ok(LoadFigures {
        seconds,
        rows_per_second: layout.rows as f64 / seconds,
        table_mib: row.get::<f64, _>(0) / MIB,
        indexes_mib: row.get::<f64, _>(1) / MIB,
    })
}

/// Makes exactly orphans 0..k suspended (as loaded) and every other designated row gone,
/// empties the audit table, vacuums and checkpoints. Not timed.
async fn reset(bench_url: &str, k: usize) -> Result<()> {
    let mut conn = PgConnection::connect(bench_url).await?;
    let sql = format!(
        "UPDATE {TABLE} s SET state = v.state, updated_at = v.updated_at, agent_thread_id = v.agent \
         FROM (SELECT thread_key, updated_at, \
                      CASE WHEN n < $1 THEN 'suspended' ELSE 'gone' END AS state, \
                      CASE WHEN n < $1 THEN agent_thread_id END AS agent \
               FROM {DESIGNATED}) v \
         WHERE s.thread_key = v.thread_key \
           AND (s.state, s.updated_at, s.agent_thread_id) IS DISTINCT FROM (v.state, v.updated_at, v.agent)"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(k as i32)
        .execute(&mut conn)
        .await
        .context("resetting the orphans")?;
    exec(&mut conn, &format!("TRUNCATE {AUDIT} RESTART IDENTITY")).await?;
    exec(&mut conn, &format!("VACUUM ANALYZE {TABLE}")).await?;
    exec(&mut conn, "CHECKPOINT").await?;
    conn.close().await?;
    Ok(())
}

/// (designated rows now gone among 0..k, audit rows, suspended rows without object left among 0..k)
async fn outcome(bench_url: &str, k: usize) -> Result<(i64, i64)> {
    let mut conn = PgConnection::connect(bench_url).await?;
    let gone: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {TABLE} s JOIN {DESIGNATED} d USING (thread_key) \
         WHERE d.n < $1 AND s.state = 'gone' AND s.agent_thread_id IS NULL"
    )))
    .bind(k as i32)
    .fetch_one(&mut conn)
    .await?;
    let audit: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {AUDIT}")))
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok((gone, audit))
}

fn bench_settings(args: &Args, url: &str) -> Result<Settings> {
    let mut s = Settings::default();
    s.database.url = url.to_string();
    s.database.statement_timeout_seconds = 600;
    s.sessions.table = TABLE.into();
    s.audit.table = AUDIT.into();
    s.cluster.namespaces = vec![args.namespace.clone()];
    s.cluster.page_size = args.page_size;
    s.cluster.request_timeout_seconds = 120;
    s.cluster.confirm_concurrency = args.confirm_concurrency;
    s.backends.agent_sandbox.enabled = true;
    s.sweep.grace_period_seconds = args.grace_seconds;
    s.sweep.batch_size = args.batch_size;
    s.validate()
        .map_err(|e| anyhow!("benchmark settings: {e}"))?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

#[derive(Debug, Clone, Default, Serialize)]
struct Measurement {
    scenario: String,
    orphans: usize,
    ok: bool,
    problems: Vec<String>,
    wall_seconds: f64,
    /// Every timed run's wall time (the reported run is the median one).
    wall_seconds_runs: Vec<f64>,
    /// /proc/loadavg (1 min) when the run started: other work on the machine.
    load_average: f64,
    rss_start_mib: f64,
    rss_peak_mib: f64,
    rss_method: String,
    api_requests: u64,
    db_round_trips: Option<u64>,
    db_connections: Option<u64>,
    db_bytes_to_client: Option<u64>,
    counting_pass_wall_seconds: Option<f64>,
    cpu_self_seconds: f64,
    cpu_fake_api_seconds: f64,
    cpu_machine_seconds: f64,
    rows_read: u64,
    downgraded: u64,
    audit_rows: i64,
    timings: Option<Timings>,
    /// naive: candidates examined, seconds in GETs, seconds in the database
    naive_candidates: Option<u64>,
    naive_get_seconds: Option<f64>,
    naive_db_seconds: Option<f64>,
    list_requests: Option<u64>,
    extra: BTreeMap<String, Value>,
}

struct Bench {
    args: Args,
    layout: Layout,
    direct_url: String,
    proxied_url: String,
    proxy: Arc<ProxyCounters>,
    fake: FakeCluster,
    kube: kube::Client,
}

impl Bench {
    fn reconciler(&self, url: &str) -> Result<Reconciler> {
        let settings = bench_settings(&self.args, url)?;
        let cluster = KubeCluster::with_client(self.kube.clone(), &settings);
        Ok(Reconciler::new(
            settings.clone(),
            Database::new(&settings)?,
            TableMapping::from_settings(&settings).map_err(|e| anyhow!(e))?,
            ClusterSource::Api(Box::new(cluster)),
        ))
    }

    /// One scenario: timed `--repeat` times on direct connections (the median run is
    /// reported), then once more through the counting proxy.
    async fn scenario(&mut self, scenario: Scenario) -> Result<Measurement> {
        let k = scenario.orphans(&self.args);
        let mut runs = Vec::new();
        for run in 0..self.args.repeat.max(1) {
            eprintln!(
                "bench: {} ({k} orphans), run {}...",
                scenario.name(),
                run + 1
            );
            runs.push(self.timed(scenario, k).await?);
        }
        let walls: Vec<f64> = runs.iter().map(|m| m.wall_seconds).collect();
        let problems: Vec<String> = runs.iter().flat_map(|m| m.problems.clone()).collect();
        runs.sort_by(|a, b| a.wall_seconds.total_cmp(&b.wall_seconds));
        let mut m = runs.swap_remove(runs.len() / 2);
        m.wall_seconds_runs = walls;
        m.problems = problems;

        if !self.args.no_round_trips {
            reset(&self.direct_url, k).await?;
            self.fake.clear().await?;
            let before = self.proxy.figures();
            let mut counted = Measurement::default();
            let url = self.proxied_url.clone();
            let started = Instant::now();
            let result = self.execute(scenario, k, &url, &mut counted).await;
            m.counting_pass_wall_seconds = Some(started.elapsed().as_secs_f64());
            let figures = self.proxy.figures() - before;
            m.db_round_trips = Some(figures.round_trips);
            m.db_connections = Some(figures.connections);
            m.db_bytes_to_client = Some(figures.bytes_to_client);
            if let Err(e) = result {
                m.problems.push(format!("counting pass: {e:#}"));
            }
            if counted.downgraded != m.downgraded {
                m.problems.push(format!(
                    "counting pass downgraded {} rows, timed pass {}",
                    counted.downgraded, m.downgraded
                ));
            }
        }
        m.ok = m.problems.is_empty();
        for p in &m.problems {
            eprintln!("bench: {} FAILED: {p}", scenario.name());
        }
        Ok(m)
    }

    /// One timed run on direct connections, after a reset; checked.
    async fn timed(&mut self, scenario: Scenario, k: usize) -> Result<Measurement> {
        reset(&self.direct_url, k).await?;
        self.fake.clear().await?;
        let mut m = Measurement {
            scenario: scenario.name().to_string(),
            orphans: k,
            load_average: load_average(),
            ..Measurement::default()
        };
        let url = self.direct_url.clone();
        let (cpu0, fake0, machine0) = (
            cpu_seconds("self"),
            cpu_seconds(&self.fake.pid.to_string()),
            machine_busy_seconds(),
        );
        let watch = RssWatch::start();
        let started = Instant::now();
        let result = self.execute(scenario, k, &url, &mut m).await;
        m.wall_seconds = started.elapsed().as_secs_f64();
        if let Some(statement) = m.extra.get("statement_seconds").and_then(Value::as_f64) {
            // The floors time their one statement only (not connecting, not fetching the keys).
            m.extra
                .insert("wall_with_setup_seconds".into(), json!(m.wall_seconds));
            m.wall_seconds = statement;
        }
        let (start, peak, how) = watch.finish();
        m.rss_start_mib = start;
        m.rss_peak_mib = peak;
        m.rss_method = how.to_string();
        m.cpu_self_seconds = cpu_seconds("self") - cpu0;
        m.cpu_fake_api_seconds = cpu_seconds(&self.fake.pid.to_string()) - fake0;
        m.cpu_machine_seconds = machine_busy_seconds() - machine0;
        m.api_requests = self.fake.request_count().await?;
        if let Err(e) = result {
            m.problems.push(format!("{e:#}"));
        }
        self.check(scenario, k, &mut m).await?;
        Ok(m)
    }

    async fn execute(
        &mut self,
        scenario: Scenario,
        k: usize,
        url: &str,
        m: &mut Measurement,
    ) -> Result<()> {
        match scenario {
            Scenario::Steady | Scenario::Cleanup | Scenario::SweepNaive => {
                let reconciler = self.reconciler(url)?;
                let (_tx, rx) = tokio::sync::watch::channel(false);
                let max_downgrades = (scenario != Scenario::Steady).then_some(k.max(1));
                let report = reconciler
                    .sweep(
                        &SweepOptions {
                            dry_run: false,
                            max_downgrades,
                        },
                        &rx,
                    )
                    .await;
                m.rows_read = report.rows_read;
                m.downgraded = report.downgraded;
                m.timings = Some(report.timings.clone());
                m.list_requests = Some(report.backends.values().map(|b| b.list_requests).sum());
                m.extra.insert("confirmed".into(), json!(report.confirmed));
                m.extra
                    .insert("orphans_found".into(), json!(report.orphans_found));
                m.extra.insert("deferred".into(), json!(report.deferred));
                m.extra
                    .insert("within_grace".into(), json!(report.within_grace));
                m.extra.insert("skipped".into(), json!(report.skipped));
                m.extra.insert("live_rows".into(), json!(report.live_rows));
                m.extra.insert(
                    "backends".into(),
                    serde_json::to_value(&report.backends).unwrap_or(Value::Null),
                );
                if report.result != SweepResult::Success {
                    bail!(
                        "sweep ended {:?}: {}",
                        report.result,
                        report.error.unwrap_or_default()
                    );
                }
                Ok(())
            }
            Scenario::Naive => self.naive(url, m).await,
            Scenario::Floor | Scenario::FloorAudit => {
                let mut conn = PgConnection::connect(url).await?;
                let keys: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT thread_key FROM {DESIGNATED} WHERE n < $1 ORDER BY n"
                )))
                .bind(k as i32)
                .fetch_all(&mut conn)
                .await?;
                let update = format!(
                    "UPDATE {TABLE} t SET state = 'gone', updated_at = now(), agent_thread_id = NULL \
                     FROM unnest($1::text[]) AS k(key) WHERE t.thread_key = k.key"
                );
                let started = Instant::now();
                let changed = if scenario == Scenario::Floor {
                    sqlx::query(AssertSqlSafe(update))
                        .bind(&keys)
                        .execute(&mut conn)
                        .await?
                        .rows_affected()
                } else {
                    let sql = format!(
                        "WITH upd AS ({update} RETURNING t.thread_key, t.sandbox_id, t.updated_at) \
                         INSERT INTO {AUDIT} (sweep_id, action, session_table, session_key, object_name, \
                             backend, old_state, new_state, old_updated_at, new_updated_at, cleared, reason, evidence) \
                         SELECT $2, 'downgrade', '{TABLE}', thread_key, sandbox_id, 'pod', 'suspended', 'gone', \
                                NULL, updated_at, '{{}}'::jsonb, 'orphaned_suspended', '{{}}'::jsonb FROM upd"
                    );
                    sqlx::query(AssertSqlSafe(sql))
                        .bind(&keys)
                        .bind(uuid::Uuid::new_v4())
                        .execute(&mut conn)
                        .await?
                        .rows_affected()
                };
                m.extra.insert(
                    "statement_seconds".into(),
                    json!(started.elapsed().as_secs_f64()),
                );
                m.downgraded = changed;
                conn.close().await?;
                Ok(())
            }
        }
    }

    /// The hand-written clean-up script: select the old suspended rows, then per row a GET of
    /// the Pod and (if absent) of the Sandbox, and if both answer 404 one transaction with the
    /// conditional UPDATE and the audit INSERT. Sequential, as such scripts are.
    async fn naive(&mut self, url: &str, m: &mut Measurement) -> Result<()> {
        let mut conn = PgConnection::connect(url).await?;
        let cutoff = Utc::now() - chrono::Duration::seconds(self.args.grace_seconds as i64);
        let rows: Vec<(String, String, DateTime<Utc>, Option<String>)> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT thread_key, sandbox_id, updated_at, agent_thread_id FROM {TABLE} \
                 WHERE state = 'suspended' AND updated_at < $1 ORDER BY updated_at"
            )))
            .bind(cutoff)
            .fetch_all(&mut conn)
            .await?;
        let ns = self.args.namespace.as_str();
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), ns);
        let resource = ApiResource {
            group: "agents.x-k8s.io".into(),
            version: "v1alpha1".into(),
            api_version: "agents.x-k8s.io/v1alpha1".into(),
            kind: "Sandbox".into(),
            plural: "sandboxes".into(),
        };
        let sandboxes: Api<DynamicObject> = Api::namespaced_with(self.kube.clone(), ns, &resource);
        let sweep_id = uuid::Uuid::new_v4();
        let update = format!(
            "UPDATE {TABLE} SET state = 'gone', updated_at = now(), agent_thread_id = NULL \
             WHERE thread_key = $1 AND state = 'suspended' AND sandbox_id = $2 AND updated_at = $3 \
             RETURNING updated_at"
        );
        let insert = format!(
            "INSERT INTO {AUDIT} (sweep_id, action, session_table, session_key, object_name, backend, \
                 old_state, new_state, old_updated_at, new_updated_at, cleared, reason, evidence) \
             VALUES ($1, 'downgrade', '{TABLE}', $2, $3, $4, 'suspended', 'gone', $5, $6, $7, \
                     'orphaned_suspended', $8)"
        );
        let (mut get_time, mut db_time) = (Duration::ZERO, Duration::ZERO);
        let mut downgraded = 0u64;
        m.naive_candidates = Some(rows.len() as u64);
        for (key, object, updated_at, agent_thread) in &rows {
            let t = Instant::now();
            let present =
                pods.get_opt(object).await?.is_some() || sandboxes.get_opt(object).await?.is_some();
            get_time += t.elapsed();
            if present {
                continue;
            }
            let t = Instant::now();
            let mut tx = conn.begin().await?;
            let new_updated: Option<DateTime<Utc>> =
                sqlx::query_scalar(AssertSqlSafe(update.clone()))
                    .bind(key)
                    .bind(object)
                    .bind(updated_at)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(new_updated) = new_updated {
                let evidence = json!({
                    "absence": format!("GET pods {ns}/{object}: 404; GET sandboxes {ns}/{object}: 404"),
                });
                sqlx::query(AssertSqlSafe(insert.clone()))
                    .bind(sweep_id)
                    .bind(key)
                    .bind(object)
                    .bind(BackendKind::Pod.as_str())
                    .bind(updated_at)
                    .bind(new_updated)
                    .bind(json!({ "agent_thread_id": agent_thread }))
                    .bind(evidence)
                    .execute(&mut *tx)
                    .await?;
                downgraded += 1;
            }
            tx.commit().await?;
            db_time += t.elapsed();
        }
        conn.close().await?;
        m.downgraded = downgraded;
        m.naive_get_seconds = Some(get_time.as_secs_f64());
        m.naive_db_seconds = Some(db_time.as_secs_f64());
        Ok(())
    }

    /// Checks the scenario changed exactly its orphans (and, for sweeps, audited them).
    async fn check(&mut self, scenario: Scenario, k: usize, m: &mut Measurement) -> Result<()> {
        let (gone, audit) = outcome(&self.direct_url, k).await?;
        m.audit_rows = audit;
        let expect = |m: &mut Measurement, what: &str, got: u64, want: u64| {
            if got != want {
                m.problems
                    .push(format!("{what}: got {got}, expected {want}"));
            }
        };
        expect(m, "rows downgraded", m.downgraded, k as u64);
        expect(
            m,
            "orphans now gone with cleared columns",
            gone as u64,
            k as u64,
        );
        let audited = match scenario {
            Scenario::Floor => 0,
            _ => k as u64,
        };
        expect(m, "audit records", audit as u64, audited);
        if scenario.is_sweep() {
            expect(m, "rows read", m.rows_read, self.layout.rows as u64);
            let confirmed = m
                .extra
                .get("confirmed")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            expect(m, "orphans confirmed by GET", confirmed, k as u64);
            let found = m
                .extra
                .get("orphans_found")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            expect(m, "orphans found", found, k as u64);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// EXPLAIN of the sweep's queries.

async fn explain(args: &Args, bench_url: &str, path: &std::path::Path) -> Result<()> {
    reset(bench_url, args.orphans).await?;
    let settings = bench_settings(args, bench_url)?;
    let mapping = TableMapping::from_settings(&settings).map_err(|e| anyhow!(e))?;
    let mut conn = PgConnection::connect(bench_url).await?;
    let mut out = String::new();
    let plan = |rows: Vec<sqlx::postgres::PgRow>| -> String {
        rows.iter()
            .map(|r| r.get::<String, _>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Warm the cache the way the sweep before it would have.
    let _: i64 = sqlx::query_scalar(AssertSqlSafe(mapping.count_gone_sql()))
        .bind("gone")
        .fetch_one(&mut conn)
        .await?;
    for (title, sql) in [
        (
            "Count of gone rows (`TableMapping::count_gone_sql`)",
            mapping.count_gone_sql(),
        ),
        (
            "Read query (`TableMapping::select_rows_sql`)",
            mapping.select_rows_sql(),
        ),
    ] {
        let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS) {sql}")))
            .bind("gone")
            .fetch_all(&mut conn)
            .await?;
        let _ = write!(
            out,
            "### {title}\n\n```sql\n{sql}\n-- $1 = 'gone'\n```\n\n```\n{}\n```\n\n",
            plan(rows)
        );
    }
    // One downgrade batch of the clean-up, rolled back.
    let batch: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT thread_key, sandbox_id, updated_at FROM {DESIGNATED} WHERE n < $1 ORDER BY n"
    )))
    .bind(args.batch_size.min(args.orphans) as i32)
    .fetch_all(&mut conn)
    .await?;
    let keys: Vec<&str> = batch.iter().map(|b| b.0.as_str()).collect();
    let objects: Vec<&str> = batch.iter().map(|b| b.1.as_str()).collect();
    let updated: Vec<DateTime<Utc>> = batch.iter().map(|b| b.2).collect();
    let backends: Vec<&str> = batch.iter().map(|_| "pod").collect();
    let evidence: Vec<String> = batch
        .iter()
        .map(|b| {
            json!({"absence": format!("GET pods agents/{}: 404; GET sandboxes agents/{}: 404", b.1, b.1)})
                .to_string()
        })
        .collect();
    let sql = mapping.downgrade_sql();
    let mut tx = conn.begin().await?;
    let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS) {sql}")))
        .bind(&keys)
        .bind(&objects)
        .bind(&updated)
        .bind(&backends)
        .bind(&evidence)
        .bind("suspended")
        .bind("gone")
        .bind(uuid::Uuid::new_v4())
        .bind(TABLE)
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    let _ = write!(
        out,
        "### One downgrade batch of {} rows (`TableMapping::downgrade_sql`), rolled back\n\n```sql\n{sql}\n```\n\n```\n{}\n```\n",
        keys.len(),
        plan(rows)
    );
    conn.close().await?;
    std::fs::write(path, out)?;
    eprintln!("bench: EXPLAIN output written to {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run and its report.

#[derive(Debug, Clone, Serialize)]
struct Machine {
    nproc: usize,
    memory_gib: f64,
    cpu_model: String,
    kernel: String,
    postgres: String,
    shared_buffers: String,
    synchronous_commit: String,
    /// Whether the timed pass's database connections use TLS (sslmode of --admin-url).
    tls: bool,
    fake_api_rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Verdict {
    target: String,
    measured: String,
    limit: String,
    met: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Results {
    args: Args,
    layout: Layout,
    machine: Machine,
    load: LoadFigures,
    scenarios: Vec<Measurement>,
    verdicts: Vec<Verdict>,
}

async fn machine(bench_url: &str, fake_rss: f64) -> Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let memory_kb: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut conn = PgConnection::connect(bench_url).await?;
    let postgres: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut conn)
        .await?;
    let shared_buffers: String = sqlx::query_scalar("SHOW shared_buffers")
        .fetch_one(&mut conn)
        .await?;
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut conn)
        .await?;
    let tls: bool = sqlx::query_scalar(
        "SELECT coalesce(bool_or(ssl), false) FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    Ok(Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: memory_kb / 1024.0 / 1024.0,
        cpu_model,
        kernel,
        postgres,
        shared_buffers,
        synchronous_commit,
        tls,
        fake_api_rss_mib: fake_rss,
    })
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
    let (proxy_addr, proxy) = start_proxy(upstream).await?;
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
    let machine = machine(&direct_url, fake_rss).await?;
    let kube = fake.client()?;
    let mut bench = Bench {
        args: args.clone(),
        layout: layout.clone(),
        direct_url: direct_url.clone(),
        proxied_url,
        proxy,
        fake,
        kube,
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
    let mut measurements = Vec::new();
    for scenario in &scenarios {
        measurements.push(bench.scenario(*scenario).await?);
    }
    if let Some(path) = &args.explain {
        explain(&args, &direct_url, path).await?;
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

fn find<'a>(ms: &'a [Measurement], name: &str) -> Option<&'a Measurement> {
    ms.iter().find(|m| m.scenario == name)
}

fn verdicts(args: &Args, layout: &Layout, ms: &[Measurement]) -> Vec<Verdict> {
    let mut v = Vec::new();
    let mut push = |target: &str, measured: String, limit: String, met: bool| {
        v.push(Verdict {
            target: target.into(),
            measured,
            limit,
            met,
        })
    };
    let pages = |n: usize| n.div_ceil(args.page_size as usize).max(1) as u64;
    // Backends probed per confirmation: pods and sandboxes.
    const PROBES: u64 = 2;
    const API_CONSTANT: u64 = 5;
    const DB_PER_BATCH: u64 = 4;
    const DB_CONSTANT: u64 = 40;
    if let Some(m) = find(ms, "steady") {
        push(
            "steady-state sweep wall time",
            format!("{:.2} s", m.wall_seconds),
            "≤ 2 s".into(),
            m.wall_seconds <= 2.0,
        );
        push(
            "steady-state sweep peak RSS",
            format!("{:.0} MiB", m.rss_peak_mib),
            "≤ 200 MB".into(),
            m.rss_peak_mib * MIB <= 200e6,
        );
    }
    if let Some(m) = find(ms, "cleanup") {
        push(
            &format!("clean-up of {} orphans (confirm + audit)", m.orphans),
            format!("{:.2} s", m.wall_seconds),
            "≤ 10 s".into(),
            m.wall_seconds <= 10.0,
        );
    }
    if let (Some(s), Some(n)) = (find(ms, "sweep-naive"), find(ms, "naive")) {
        let ratio = n.wall_seconds / s.wall_seconds;
        push(
            &format!("sweep vs naive at {} orphans", s.orphans),
            format!("{ratio:.1}×"),
            "≥ 20×".into(),
            ratio >= 20.0,
        );
    }
    if let (Some(c), Some(f)) = (find(ms, "cleanup"), find(ms, "floor")) {
        let apply = c.timings.as_ref().map_or(0.0, |t| t.apply);
        let ratio = apply / f.wall_seconds;
        push(
            "apply phase vs raw SQL floor",
            format!("{apply:.2} s / {:.2} s = {ratio:.1}×", f.wall_seconds),
            "≤ 3×".into(),
            ratio <= 3.0,
        );
    }
    for m in ms
        .iter()
        .filter(|m| matches!(m.scenario.as_str(), "steady" | "cleanup" | "sweep-naive"))
    {
        let bound =
            pages(layout.pods) + pages(layout.sandboxes) + PROBES * m.orphans as u64 + API_CONSTANT;
        push(
            &format!("API requests, {}", m.scenario),
            m.api_requests.to_string(),
            format!(
                "≤ {bound} = ⌈{}/{p}⌉ + ⌈{}/{p}⌉ + {PROBES}×{} + {API_CONSTANT}",
                layout.pods,
                layout.sandboxes,
                m.orphans,
                p = args.page_size
            ),
            m.api_requests <= bound,
        );
        if let Some(rt) = m.db_round_trips {
            let batches = m.orphans.div_ceil(args.batch_size) as u64;
            let bound = batches * DB_PER_BATCH + DB_CONSTANT;
            push(
                &format!("DB round trips, {}", m.scenario),
                rt.to_string(),
                format!(
                    "≤ {bound} = ⌈{}/{}⌉×{DB_PER_BATCH} + {DB_CONSTANT}",
                    m.orphans, args.batch_size
                ),
                rt <= bound,
            );
        }
    }
    v
}

fn fmt_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "–".to_string(), |v| v.to_string())
}

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let a = &r.args;
    let l = &r.layout;
    let _ = writeln!(
        s,
        "## sandbox-reconciler benchmark\n\n\
         {} rows ({} gone, {} suspended of which {} paused-sandbox and {} fresh, {} live of which {} with an object, {} other), \
         {} pods, {} sandboxes ({} paused), {} untracked objects; page size {}, batch size {}, confirm concurrency {}, grace {} s; API latency {} ms; {} objects; {} timed run(s) per scenario (median shown).\n",
        l.rows, l.gone, l.suspended, l.paused_sandboxes, l.fresh_suspended, l.live, l.live_with_object, l.other,
        l.pods, l.sandboxes, l.paused_sandboxes, l.untracked_objects, a.page_size, a.batch_size, a.confirm_concurrency, a.grace_seconds,
        a.api_latency_ms, if a.lean_objects { "lean" } else { "realistic (managedFields)" }, a.repeat.max(1)
    );
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}, {}; shared_buffers {}, synchronous_commit {}, database connections {}. \
         Load: {:.1} s ({:.0} rows/s), table {:.0} MiB + indexes {:.0} MiB. Fake API server process: {:.0} MiB RSS.\n",
        m.nproc, m.cpu_model, m.memory_gib, m.kernel,
        m.postgres.split(" on ").next().unwrap_or(&m.postgres),
        m.shared_buffers, m.synchronous_commit, if m.tls { "with TLS" } else { "without TLS" }, r.load.seconds, r.load.rows_per_second,
        r.load.table_mib, r.load.indexes_mib, m.fake_api_rss_mib
    );
    let _ = writeln!(
        s,
        "| scenario | orphans | ok | wall s | list / read / confirm / apply s | rows read/s | downgrades/s | RSS start → peak MiB | API requests | DB round trips | CPU s: self / fake API / machine | load avg |"
    );
    let _ = writeln!(
        s,
        "|---|---:|:-:|---:|---|---:|---:|---|---:|---:|---|---:|"
    );
    for x in &r.scenarios {
        let phases = x.timings.as_ref().map_or_else(
            || match (x.naive_get_seconds, x.naive_db_seconds) {
                (Some(g), Some(d)) => format!("GETs {g:.2} / DB {d:.2}"),
                _ => "–".into(),
            },
            |t| {
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2}",
                    t.list_cluster, t.read_db, t.confirm, t.apply
                )
            },
        );
        let rows_per_s = if x.rows_read > 0 {
            format!("{:.0}", x.rows_read as f64 / x.wall_seconds)
        } else {
            "–".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {} | {} | {:.0} | {:.0} → {:.0} | {} | {} | {:.2} / {:.2} / {:.2} | {:.1} |",
            x.scenario,
            x.orphans,
            if x.ok { "✓" } else { "✗" },
            x.wall_seconds,
            phases,
            rows_per_s,
            x.downgraded as f64 / x.wall_seconds,
            x.rss_start_mib,
            x.rss_peak_mib,
            x.api_requests,
            fmt_opt(x.db_round_trips),
            x.cpu_self_seconds,
            x.cpu_fake_api_seconds,
            x.cpu_machine_seconds,
            x.load_average
        );
    }
    let _ = writeln!(s);
    if let (Some(sw), Some(n)) = (
        find(&r.scenarios, "sweep-naive"),
        find(&r.scenarios, "naive"),
    ) {
        let per_row = n.wall_seconds / n.orphans.max(1) as f64;
        let _ = writeln!(
            s,
            "Naive baseline: {} candidates (old suspended rows) examined, {} downgraded in {:.2} s = {:.2} ms per orphan \
             ({:.0} rows/s); the sweep did the same {} in {:.2} s: **{:.1}×**.",
            fmt_opt(n.naive_candidates),
            n.downgraded,
            n.wall_seconds,
            per_row * 1e3,
            1.0 / per_row,
            sw.orphans,
            sw.wall_seconds,
            n.wall_seconds / sw.wall_seconds
        );
        if let Some(c) = find(&r.scenarios, "cleanup") {
            let extrapolated = per_row * c.orphans as f64;
            let _ = writeln!(
                s,
                "Extrapolated to {} orphans the naive script would take ~{:.0} s vs {:.2} s for the clean-up sweep (~{:.0}×).",
                c.orphans,
                extrapolated,
                c.wall_seconds,
                extrapolated / c.wall_seconds
            );
        }
    }
    if let Some(c) = find(&r.scenarios, "cleanup") {
        if let Some(t) = &c.timings {
            for f in ["floor", "floor-audit"] {
                if let Some(x) = find(&r.scenarios, f) {
                    let _ = writeln!(
                        s,
                        "Apply phase {:.2} s vs `{f}` {:.2} s: {:.1}×.",
                        t.apply,
                        x.wall_seconds,
                        t.apply / x.wall_seconds
                    );
                }
            }
        }
    }
    let _ = writeln!(
        s,
        "\nTargets (set for the reference sizes: 1M rows, 100k pods, 20k sandboxes, 100k orphans, 10k naive orphans):\n\n\
         | target | measured | limit | met |\n|---|---|---|:-:|"
    );
    for v in &r.verdicts {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            v.target,
            v.measured,
            v.limit,
            if v.met { "✓" } else { "✗" }
        );
    }
    s
}
