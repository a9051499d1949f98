//! Soak harness with an oracle: the real daemon under application churn and faults.
//!
//! One run sets up a private PostgreSQL schema holding a centaur-shaped `sandbox_sessions`
//! table and the fake Kubernetes API server ([`crate::fake_api`]) in this process, then starts
//! `replicas` copies of the real `sandbox-reconciler` binary as daemons (sweep every second,
//! grace period 2 s, small pages, short request timeout, small cap and batches) and lets
//! three things run against them at once for `duration`:
//!
//! - an **application simulator** (`workers` tasks, seeded RNG) that behaves like the agent
//!   platform: it creates sessions (object first, then the row `running`), suspends them (bare
//!   pod: the pod is deleted — it is marked terminating and removed a moment later — and the row
//!   set `suspended`; agent-sandbox: `spec.replicas: 0` and the row `suspended`), resumes them
//!   (a pod-backed session gets a new pod with a new `sandbox_id`, written with the state in one
//!   UPDATE; a Sandbox is scaled back up, or replaced under a new name if it was deleted),
//!   respawns `gone`/`stopped`/`error` sessions, toggles running/idle, touches rows, stops
//!   sessions, marks sessions whose object vanished as `error`, holds row locks for a while,
//!   and — behind the platform's back — deletes the Sandbox of suspended sessions (the classic
//!   orphan), evicts pods of running sessions and lets Sandboxes terminate slowly. Every
//!   application UPDATE sets `updated_at = now()` and a fresh `agent_thread_id`, and is
//!   unconditional by key like the platform's (it locks the row, so it records exactly which
//!   version it overwrote); a fifth of them hold the row lock for up to a second first, so
//!   `updated_at` (transaction start) is older than the commit. A fifth of its operations go to
//!   sessions it left suspended longer than the grace period ago — the rows about to be
//!   downgraded — so its changes race the reconciler's. Operations on one session are
//!   serialised, as the platform serialises the messages of one thread. Object names are never
//!   reused (centaur names every new Sandbox afresh, too).
//! - a **fault switcher** that, at random intervals, injects one fault for a random while and
//!   clears it: API errors on list pages and GETs (500, 503, 429 with `Retry-After`), expired
//!   continue tokens and compactions, short and long hangs (below and above the request
//!   timeout), 403 (deny list/get), malformed JSON, lists of the wrong kind or with a nameless
//!   item, dropped connections, confirming GETs that hang for a while (widening the gap between
//!   reading rows and writing them); `pg_terminate_backend` of the daemons' own PostgreSQL
//!   connections (found through the daemons' sockets, so no other process on the server is
//!   touched); SIGTERM / SIGKILL of a replica, which is then started again; and a mass
//!   eviction of most running pods (the misconfiguration guard's case).
//! - occasional **`--once` runs** beside the daemons (one writer under churn: they mostly find
//!   the writer lock taken and say so).
//!
//! ## The oracle
//!
//! The simulator logs, in wall-clock time, every object's life (`created_after`: just after
//! the fake server stored it; `removed_before`: just before it was removed — so the object
//! *certainly* existed in between) and every row version it wrote (with the version it
//! overwrote, read under the row lock, and the time its COMMIT returned). After the run (daemons
//! stopped) every `downgrade` audit record `D` (its `at` is the start of the reconciler's apply
//! transaction, which begins after the listing and the confirming GETs) is judged **wrong** if:
//!
//! 1. `D` did not take a `suspended` row to `gone`;
//! 2. the application never wrote the version `D` claims to have overwritten (same
//!    `updated_at` and object), or that version was not `suspended`;
//! 3. the application had *committed* a newer version of the row (its COMMIT returned) before
//!    `D.at` — a correct conditional UPDATE cannot overwrite a version that is no longer the
//!    row's;
//! 4. the object existed at `D.at` (created before, not yet removed, terminating or not). Since
//!    names are never reused and an object is created before any row names it, such an object
//!    existed throughout the sweep (from before the listing started to the apply), so both
//!    the listing and the confirming GET must have seen it;
//! 5. the overwritten version was younger than the grace period at the listing start
//!    (`evidence.listing_started_at`, a time of the database's clock, like `updated_at`).
//!
//! Each rule is one function of [`oracle`] (`rule1_suspended_to_gone`,
//! `rule2_overwrote_a_suspended_version`, `rule3_no_newer_version_committed`,
//! `rule4_object_absent`, `rule5_outside_the_grace_period`).
//!
//! Clocks: the database's clock is compared with this host's (the simulator's record of
//! objects and writes) through an offset measured at the start, bounded by a round trip; every comparison
//! takes the bound that makes the claim certain.
//!
//! Also checked: the apply transactions of two sweeps never interleave (one writer), and every
//! audit record was reported by the process that wrote it (a "downgraded session to gone" log
//! line of that sweep); unreported ones are listed with what their sweep logged instead.
//!
//! **Rows lost** counts sessions the simulator created that are missing from the table.
//! **Rows inconsistent** counts broken histories: per session, the application's versions and
//! the downgrades must form one chain (each application write overwrote either the previous
//! application version or a downgrade of exactly that version; each downgrade appears exactly
//! once), the row as it is at the end must be the chain's last version, and each audit record
//! must hold the `agent_thread_id` the downgrade cleared.
//!
//! The run fails if there is a wrong downgrade, a lost or inconsistent row, no downgrade at
//! all (a soak that never downgrades proves nothing), no sweep that reached a verdict, or a
//! harness problem: a daemon panic, a daemon that exited on its own or not with 0 on SIGTERM,
//! two sweeps writing at once, a `--once` run that ended other than
//! success/failed/skipped/refused. Guard refusals are counted by reason from the daemons'
//! metrics and from every process's "refusing to act" log lines.
//!
//! ## Variants
//!
//! - **Backends without prefixes** ([`SoakConfig::backends_without_prefixes`]): both backends
//!   enabled, `object_name_prefix` empty on both, pods and Sandboxes named alike from
//!   centaur's one scheme (`centaur-centaur-sandbox-soak-<hex10>`), as centaur's clusters name
//!   them. Every orphan is `unknown`; the guards judge each backend by whether its listing holds
//!   objects the rows refer to, so the run must downgrade the orphans of both backends like
//!   the default run (a run without downgrades fails). Extra check
//!   ([`oracle::check_attribution_without_prefixes`]): every downgrade's audit `backend` is `unknown`.
//! - **Shared table** ([`SoakConfig::shared_table`]): the table gets a `cluster` column and the
//!   primary key `(cluster, thread_key)`; the daemons own scope `cluster-a`. A second
//!   application (another [`sim::Sim`] confined to `cluster-b`) inserts and rewrites, under the keys
//!   of scope A's sessions, rows naming scope A's current or earlier (mostly deleted) objects,
//!   mostly `suspended`: exactly the rows a key-only UPDATE, or a sweep that read both scopes,
//!   would change. Extra checks: every audit record, of any action, has `session_scope` =
//!   `cluster-a` ([`other_scope::check_audit_scope`]); every version the other application found under its
//!   row lock is the one it wrote last, and each of its rows ends as it left it
//!   ([`other_scope::check_untouched`]); [`other_scope::exposure`] counts the downgrades that had
//!   a suspended twin with the same key and object in scope B (the test requires some).
//!
//! ## Modules
//!
//! [`config`] what a run does; [`sim`] the simulated platform's state and primitive actions,
//! [`app`] its behaviour; [`other_scope`] the shared-table variant's second application and
//! its checks; [`faults`] the fault switcher; [`fleet`] the daemons and `--once` runs;
//! [`logs`] what their logs say; [`db`] the soak's schema and what the oracle reads back;
//! [`clock`] the database's clock against this host's; [`oracle`] the judgement, one function
//! per rule; [`report`] what a run saw and whether it passed.

mod app;
mod clock;
mod config;
mod db;
mod faults;
mod fleet;
mod logs;
mod oracle;
mod other_scope;
mod report;
mod sim;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub use config::SoakConfig;
pub use report::{OtherScopeReport, SoakReport, WrongDowngrade};

use clock::ClockOffset;
use db::SoakDb;
use fleet::Fleet;
use logs::LogFacts;
use sim::Sim;

use crate::exposition::sum_by_label;
use crate::fake_api::FakeApiServer;

/// Namespace of every object.
const NAMESPACE: &str = "agents";
/// The label the default pod backend selects on.
const MANAGED: (&str, &str) = ("centaur.ai/managed", "true");
/// At most this many problems of one kind are kept verbatim in the report.
const KEEP: usize = 25;
/// Shared-table variant: the scope column, the daemons' scope and the other cluster's.
const SCOPE_COLUMN: &str = "cluster";
const OWN_SCOPE: &str = "cluster-a";
const OTHER_SCOPE: &str = "cluster-b";

// ---------------------------------------------------------------------------------------------
// The run

/// Runs one soak and judges it. `Err` only when the harness itself could not run (no
/// PostgreSQL, no binary); a failing soak is an `Ok` report whose [`SoakReport::passed`] is
/// false.
pub async fn run(cfg: SoakConfig) -> Result<SoakReport> {
    if !cfg.binary.is_file() {
        bail!(
            "{}: no such binary; build it first (cargo build --bin sandbox-reconciler)",
            cfg.binary.display()
        );
    }
    let temp = match &cfg.work_dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("soak-").tempdir()?),
    };
    let work_dir = match (&cfg.work_dir, &temp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("a temporary directory was made above"),
    };
    std::fs::create_dir_all(&work_dir)?;

    let db = SoakDb::create(&cfg.database_url, cfg.workers + 8, cfg.shared_table).await?;
    let api = Arc::new(FakeApiServer::start().await);
    api.register_sandbox_version("v1alpha1");
    let kubeconfig = work_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);

    let mut report = SoakReport {
        variant: cfg.variant(),
        seed: cfg.seed,
        schema: db.schema.clone(),
        work_dir: work_dir.display().to_string(),
        replicas: cfg.replicas,
        ..SoakReport::default()
    };
    let outcome = soak(&cfg, &db, api.clone(), &work_dir, &kubeconfig, &mut report).await;
    if let Err(e) = outcome {
        report.problems.push(format!("the harness failed: {e:#}"));
    }
    api.shutdown();

    let keep = cfg.keep_schema || !report.passed();
    if keep {
        if let Some(t) = temp {
            // Keep the logs of a failing run for investigation.
            let _ = t.keep();
        }
    } else {
        db.drop_schema().await;
    }
    Ok(report)
}

/// One run: a first population, the daemons, then churn and faults for `cfg.duration`;
/// then everything stops and the oracle judges what happened.
async fn soak(
    cfg: &SoakConfig,
    db: &SoakDb,
    api: Arc<FakeApiServer>,
    work_dir: &Path,
    kubeconfig: &Path,
    report: &mut SoakReport,
) -> Result<()> {
    let grace = chrono::Duration::seconds(cfg.grace_period_seconds as i64);
    let names_alike = cfg.backends_without_prefixes;
    let own_scope = cfg.shared_table.then_some(OWN_SCOPE);
    let target = cfg.sessions.max(4);
    let sim = Arc::new(Sim::new(
        api.clone(),
        db,
        own_scope,
        names_alike,
        target,
        grace,
        1,
    ));
    // The other cluster's application (shared-table variant): it writes only rows of its own
    // scope, under the keys and object names of `sim`'s sessions, and never touches objects.
    let other = cfg.shared_table.then(|| {
        let seq = 1_000_000_000;
        Arc::new(Sim::new(
            api.clone(),
            db,
            Some(OTHER_SCOPE),
            names_alike,
            0,
            grace,
            seq,
        ))
    });
    let clock = ClockOffset::measure(&db.pool).await?;
    report.db_clock_offset_us = clock.bounds_us();
    populate(cfg, &sim, other.as_deref()).await?;

    let fleet = Arc::new(tokio::sync::Mutex::new(Fleet::new(
        cfg, db, work_dir, kubeconfig,
    )));
    {
        let mut f = fleet.lock().await;
        for _ in 0..cfg.replicas.max(1) {
            f.start().await?;
        }
    }
    let churn = Churn::start(cfg, db, &api, &sim, other.as_ref(), &fleet)?;
    churn.run_for(cfg, db, &sim, &fleet).await;
    churn.stop(&sim, report).await;
    api.clear_faults();
    api.allow_all();

    let logs = stop_daemons(&fleet, report).await;
    for r in api.requests() {
        let key = r.status.map_or("none".to_string(), |s| s.to_string());
        *report.api_answers.entry(key).or_default() += 1;
    }
    judge(cfg, db, &sim, other.as_deref(), &clock, &logs, report).await
}

/// A first population, so the daemons' first sweeps have something to look at; some of it
/// paused already, so the first orphans appear as soon as the grace period ends.
async fn populate(cfg: &SoakConfig, sim: &Sim, other: Option<&Sim>) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    for _ in 0..cfg.sessions / 3 {
        sim.create_session(&mut rng).await?;
    }
    for i in 0..cfg.sessions / 3 {
        if rng.random_bool(0.4) {
            sim.pause(i).await?;
        }
    }
    if let Some(other) = other {
        // The other cluster has a suspended row under every key, naming the same object.
        for _ in 0..cfg.sessions / 3 {
            other.mirror_step(sim, &mut rng, true).await?;
        }
    }
    Ok(())
}

/// Everything that changes the world while the daemons run: the application workers, the
/// fault switcher, the scraper and the `--once` runner.
struct Churn {
    stop: watch::Sender<bool>,
    workers: JoinSet<()>,
    helpers: JoinSet<()>,
    once_task: Option<JoinHandle<()>>,
    /// Faults injected, by kind.
    faults: Arc<Mutex<BTreeMap<String, u64>>>,
    /// `--once` runs, by outcome.
    once: Arc<Mutex<BTreeMap<String, u64>>>,
    started: Instant,
}

impl Churn {
    fn start(
        cfg: &SoakConfig,
        db: &SoakDb,
        api: &Arc<FakeApiServer>,
        sim: &Arc<Sim>,
        other: Option<&Arc<Sim>>,
        fleet: &Arc<tokio::sync::Mutex<Fleet>>,
    ) -> Result<Churn> {
        let (stop, stop_rx) = watch::channel(false);
        let faults = Arc::new(Mutex::new(BTreeMap::new()));
        let once = Arc::new(Mutex::new(BTreeMap::new()));
        let kick_once = Arc::new(tokio::sync::Notify::new());
        let seeded = |offset: u64| StdRng::seed_from_u64(cfg.seed.wrapping_add(offset));

        let mut workers = JoinSet::new();
        for i in 0..cfg.workers.max(1) {
            workers.spawn(app::app_worker(
                sim.clone(),
                stop_rx.clone(),
                seeded(1 + i as u64),
            ));
        }
        if let Some(other) = other {
            workers.spawn(other_scope::other_scope_worker(
                sim.clone(),
                other.clone(),
                stop_rx.clone(),
                seeded(3000),
            ));
        }
        let mut helpers = JoinSet::new();
        if cfg.faults {
            let targets = faults::FaultTargets {
                api: api.clone(),
                sim: sim.clone(),
                fleet: fleet.clone(),
                pool: db.pool.clone(),
                pg_port: crate::pg::port(&cfg.database_url)?,
                counts: faults.clone(),
                kick_once: kick_once.clone(),
            };
            helpers.spawn(faults::fault_switcher(
                targets,
                stop_rx.clone(),
                seeded(1000),
            ));
        }
        helpers.spawn(fleet::scraper(fleet.clone(), stop_rx.clone()));
        let once_task = cfg.once_runs.then(|| {
            tokio::spawn(fleet::once_runner(
                fleet.clone(),
                once.clone(),
                kick_once,
                stop_rx,
                seeded(2000),
            ))
        });
        Ok(Churn {
            stop,
            workers,
            helpers,
            once_task,
            faults,
            once,
            started: Instant::now(),
        })
    }

    /// Lets it run for `cfg.duration`, with a progress line every 5 s if asked for.
    async fn run_for(
        &self,
        cfg: &SoakConfig,
        db: &SoakDb,
        sim: &Sim,
        fleet: &tokio::sync::Mutex<Fleet>,
    ) {
        let deadline = self.started + cfg.duration;
        let mut next_progress = self.started + Duration::from_secs(5);
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(250))).await;
            if cfg.progress && Instant::now() >= next_progress {
                next_progress += Duration::from_secs(5);
                let downgrades = db.downgrade_count().await;
                let ops: u64 = sim.lock().ops.values().sum();
                let nfaults: u64 = lock(&self.faults).values().sum();
                let sweeps = fleet.lock().await.sweeps_so_far();
                eprintln!(
                    "soak [{:>4.0}s] app ops {ops}, downgrades {downgrades}, faults {nfaults}, daemon sweeps {}",
                    self.started.elapsed().as_secs_f64(),
                    sweeps
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
    }

    /// Stops everything that changes the world (not the daemons); records what it did.
    async fn stop(mut self, sim: &Sim, report: &mut SoakReport) {
        let _ = self.stop.send(true);
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(joined) = self.workers.join_next().await {
                if let Err(e) = joined {
                    sim.error(format!("an application worker died: {e}"));
                }
            }
        })
        .await;
        if drained.is_err() {
            report
                .problems
                .push("the application workers did not stop within 20s".into());
            self.workers.abort_all();
        }
        if let Some(task) = self.once_task.take() {
            // A `--once` still running is killed (kill_on_drop); its open transaction rolls back.
            task.abort();
            let _ = task.await;
        }
        while self.helpers.join_next().await.is_some() {}
        report.duration_seconds = self.started.elapsed().as_secs_f64();
        report.once_runs = lock(&self.once).clone();
        report.faults_injected = lock(&self.faults).clone();
        report.faults_total = report.faults_injected.values().sum();
    }
}

/// Stops the daemons (a last scrape first) and reads their metrics and every log.
async fn stop_daemons(fleet: &tokio::sync::Mutex<Fleet>, report: &mut SoakReport) -> LogFacts {
    let mut f = fleet.lock().await;
    f.scrape_all().await;
    f.stop_all().await;
    report.daemon_starts = f.starts;
    report.daemon_exits = f.exits.clone();
    report.problems.extend(f.problems.iter().cloned());
    let scrapes = &f.final_scrapes;
    report.sweeps = sum_by_label(scrapes, "sandbox_reconciler_sweeps_total", "result");
    report.skipped_rows = sum_by_label(scrapes, "sandbox_reconciler_skipped_rows_total", "reason");
    report.guard_refusals =
        sum_by_label(scrapes, "sandbox_reconciler_guard_refusals_total", "reason");
    report.downgrades_metric = sum_by_label(
        scrapes,
        "sandbox_reconciler_sessions_downgraded_total",
        "backend",
    )
    .values()
    .sum();
    let logs = logs::scan_logs(&f.dir);
    report.daemon_log_lines = logs.counts.clone();
    report.guard_refusals_logged = logs.refusals.clone();
    report.refusal_samples = logs.refusal_samples.clone();
    if let Some(n) = report.daemon_log_lines.get("panicked") {
        report
            .problems
            .push(format!("{n} panic message(s) in the daemon logs"));
    }
    report.sweeps_succeeded = report.sweeps.get("success").copied().unwrap_or(0)
        + report.once_runs.get("success").copied().unwrap_or(0);
    logs
}

/// Reads back the audit records and the rows, and lets the oracle judge them.
async fn judge(
    cfg: &SoakConfig,
    db: &SoakDb,
    sim: &Sim,
    other: Option<&Sim>,
    clock: &ClockOffset,
    logs: &LogFacts,
    report: &mut SoakReport,
) -> Result<()> {
    let audits = db.downgrades().await?;
    let rows = db.final_rows(sim.scope).await?;
    let other_rows = match other {
        Some(o) => Some(db.final_rows(o.scope).await?),
        None => None,
    };
    let audit_scopes = db.audit_scopes().await?;
    let st = sim.lock();
    report.app_operations = st.ops.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    report.app_errors = st.errors.len() as u64;
    report.app_error_samples = st.errors.iter().take(KEEP).cloned().collect();
    oracle::judge(&st, &audits, &rows, clock, report);
    oracle::account_for_downgrades(&audits, logs, report);
    if cfg.backends_without_prefixes {
        oracle::check_attribution_without_prefixes(&audits, report);
    }
    if let (Some(other), Some(other_rows)) = (other, &other_rows) {
        let ost = other.lock();
        let mut o = OtherScopeReport {
            own_scope: OWN_SCOPE.to_string(),
            other_scope: OTHER_SCOPE.to_string(),
            ..OtherScopeReport::default()
        };
        other_scope::check_audit_scope(&audit_scopes, OWN_SCOPE, &mut o);
        other_scope::check_untouched(&ost, other_rows, &mut o);
        other_scope::exposure(&st, &ost, other_rows, &audits, clock, sim.grace, &mut o);
        report.other_scope = Some(o);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps `d` unless `stop` turns true first; returns whether it did.
async fn nap(stop: &watch::Receiver<bool>, d: Duration) -> bool {
    let mut stop = stop.clone();
    if *stop.borrow() {
        return true;
    }
    let woken = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        woken = async { stop.wait_for(|s| *s).await.is_ok() } => woken,
    };
    woken || *stop.borrow()
}

/// A weighted random choice.
fn pick<T: Copy>(rng: &mut StdRng, choices: &[(T, u32)]) -> Option<T> {
    let total: u32 = choices.iter().map(|c| c.1).sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    for &(c, w) in choices {
        if x < w {
            return Some(c);
        }
        x -= w;
    }
    None
}
