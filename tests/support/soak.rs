//! Soak harness with an oracle: the real daemon under application churn and faults.
//!
//! One run sets up a private PostgreSQL schema holding a centaur-shaped `sandbox_sessions`
//! table and the fake Kubernetes API server ([`super::fake_api`]) in this process, then starts
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
//!    (`evidence.listing_started_at`).
//!
//! Clocks: the database's clock is compared with this host's (and the daemons', which run
//! here) through an offset measured at the start, bounded by a round trip; every comparison
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
//!   enabled, `object_name_prefix` empty on both, pods and Sandboxes named alike (`s-N`).
//!   Every orphan is `unknown` and counts against both backends' guards, so the guards may
//!   refuse where the default run downgrades; the run passes on refusals alone (it must still
//!   reach verdicts, and the report says whether it downgraded, refused or both). Extra check
//!   ([`check_attribution_without_prefixes`]): every downgrade's audit `backend` is `unknown`.
//! - **Shared table** ([`SoakConfig::shared_table`]): the table gets a `cluster` column and the
//!   primary key `(cluster, thread_key)`; the daemons own scope `cluster-a`. A second
//!   application (another [`Sim`] confined to `cluster-b`) inserts and rewrites, under the keys
//!   of scope A's sessions, rows naming scope A's current or earlier (mostly deleted) objects,
//!   mostly `suspended`: exactly the rows a key-only UPDATE, or a sweep that read both scopes,
//!   would change. Extra checks: every audit record, of any action, has `session_scope` =
//!   `cluster-a` ([`check_audit_scope`]); every version the other application found under its
//!   row lock is the one it wrote last, and each of its rows ends as it left it
//!   ([`check_other_scope_untouched`]); [`other_scope_exposure`] counts the downgrades that had
//!   a suspended twin with the same key and object in scope B (the test requires some).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::fake_api::{FakeApiServer, Fault, FaultAction, FaultMatch, Kind, SANDBOX_GROUP};

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
// Configuration and report

/// The PostgreSQL server of the tests: `TEST_DATABASE_URL`, else the local trust-auth default.
pub fn database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// What one soak run does.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The `sandbox-reconciler` binary to run as daemons and `--once`.
    pub binary: PathBuf,
    /// PostgreSQL server; a private schema is created (and dropped after a passing run).
    pub database_url: String,
    /// How long the simulator, faults and daemons run together.
    pub duration: Duration,
    /// Seed of every random choice (timings still vary from run to run).
    pub seed: u64,
    /// Daemon replicas (they compete for the writer lock).
    pub replicas: usize,
    /// Run `--once` every few seconds beside the daemons.
    pub once_runs: bool,
    /// Switch faults on and off.
    pub faults: bool,
    /// Sessions the simulator keeps (it creates up to this many).
    pub sessions: usize,
    /// Concurrent simulator tasks.
    pub workers: usize,
    pub grace_period_seconds: u64,
    pub page_size: u32,
    pub request_timeout_seconds: u64,
    pub max_downgrades_per_sweep: usize,
    pub batch_size: usize,
    /// Keep the schema even after a passing run.
    pub keep_schema: bool,
    /// Where configs, kubeconfig and daemon logs go; a temporary directory (kept when the run
    /// fails) if `None`.
    pub work_dir: Option<PathBuf>,
    /// Print a progress line to stderr every few seconds.
    pub progress: bool,
    /// Variant: both backends enabled with `object_name_prefix` explicitly empty, and pods and
    /// Sandboxes named alike (`s-N`), so nothing tells a missing pod from a missing Sandbox:
    /// every orphan is attributed to `unknown` and counts against both backends' guards,
    /// which may legitimately refuse. (The default run configures no prefix either, but its
    /// names differ: `p-N` and `sb-N`.)
    pub backends_without_prefixes: bool,
    /// Variant: the session table is shared by two clusters. It gets a scope column
    /// (`cluster`) and the primary key `(cluster, thread_key)`; the daemons are configured for
    /// scope A (`sessions.scope_column`/`scope_value`), and a second application churns the
    /// rows of scope B, which use the same keys and object names as scope A's rows and refer to
    /// objects this fake cluster mostly does not have.
    pub shared_table: bool,
}

impl SoakConfig {
    pub fn new(binary: PathBuf, database_url: String) -> SoakConfig {
        SoakConfig {
            binary,
            database_url,
            duration: Duration::from_secs(60),
            seed: 1,
            replicas: 2,
            once_runs: true,
            faults: true,
            sessions: 150,
            workers: 4,
            grace_period_seconds: 2,
            page_size: 20,
            request_timeout_seconds: 2,
            max_downgrades_per_sweep: 25,
            batch_size: 7,
            keep_schema: false,
            work_dir: None,
            progress: false,
            backends_without_prefixes: false,
            shared_table: false,
        }
    }

    /// The variant's name, for the report.
    pub fn variant(&self) -> String {
        match (self.backends_without_prefixes, self.shared_table) {
            (false, false) => "default".to_string(),
            (true, false) => "backends-without-prefixes".to_string(),
            (false, true) => "shared-table".to_string(),
            (true, true) => "backends-without-prefixes+shared-table".to_string(),
        }
    }
}

/// A downgrade the oracle found wrong, with everything needed to investigate it.
#[derive(Debug, Clone, Serialize)]
pub struct WrongDowngrade {
    pub audit_id: i64,
    pub sweep_id: String,
    pub session_key: String,
    pub object: String,
    pub at: DateTime<Utc>,
    pub listing_started_at: Option<DateTime<Utc>>,
    pub old_updated_at: Option<DateTime<Utc>>,
    pub reasons: Vec<String>,
    pub evidence: Value,
    /// The object's life as the simulator recorded it.
    pub object_life: String,
    /// The application's versions of the row, oldest first.
    pub row_history: Vec<String>,
}

/// What the oracle saw of the other scope's rows (shared-table variant).
#[derive(Debug, Clone, Default, Serialize)]
pub struct OtherScopeReport {
    /// The scope the daemons act on (`sessions.scope_value`).
    pub own_scope: String,
    /// The other cluster's scope, whose rows they must never change.
    pub other_scope: String,
    pub rows_created: u64,
    pub rows_in_table: u64,
    /// Row versions the other scope's application wrote.
    pub writes: u64,
    pub operations: BTreeMap<String, u64>,
    pub app_errors: u64,
    /// Rows of the other scope whose history has a version its application did not write
    /// (something else changed the row), or that do not end as its application left them.
    pub rows_changed: u64,
    pub rows_lost: u64,
    /// Audit records, of any action, whose `session_scope` is not the daemons' scope.
    pub audit_records_outside_scope: u64,
    /// Audit records by `session_scope` ("NULL" when unset).
    pub audit_records_by_scope: BTreeMap<String, u64>,
    /// Downgrades in the daemons' scope at whose moment the other scope had a row with the
    /// same key, and of those, how many had a `suspended` row naming the same object: the rows
    /// a scope-blind (key-only) UPDATE would have changed too.
    pub downgrades_with_a_twin: u64,
    pub downgrades_with_a_suspended_twin: u64,
    /// Rows of the other scope at the end that are suspended, older than the grace period,
    /// and whose object this fake cluster does not have: what a reconciler that ignored the
    /// scope would take for orphans.
    pub orphan_lookalikes_at_end: u64,
    pub final_states: BTreeMap<String, u64>,
    pub problems: Vec<String>,
}

impl OtherScopeReport {
    fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.rows_changed > 0 {
            f.push(format!(
                "{} row(s) of scope {} changed by something other than their application",
                self.rows_changed, self.other_scope
            ));
        }
        if self.rows_lost > 0 {
            f.push(format!(
                "{} row(s) of scope {} lost",
                self.rows_lost, self.other_scope
            ));
        }
        if self.audit_records_outside_scope > 0 {
            f.push(format!(
                "{} audit record(s) outside scope {}",
                self.audit_records_outside_scope, self.own_scope
            ));
        }
        f
    }
}

/// Everything a run saw; printed as text and written as JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    /// See [`SoakConfig::variant`].
    pub variant: String,
    /// A run without any downgrade still passes if the guards refused (both backends without
    /// prefixes: the agent-sandbox guards may legitimately refuse every sweep that would act).
    pub refusals_may_replace_downgrades: bool,
    pub seed: u64,
    pub duration_seconds: f64,
    pub schema: String,
    pub work_dir: String,
    pub replicas: usize,
    /// `sweeps_total` of every daemon incarnation, by result.
    pub sweeps: BTreeMap<String, u64>,
    /// `--once` runs by outcome.
    pub once_runs: BTreeMap<String, u64>,
    /// Successful sweeps, daemons and `--once` together.
    pub sweeps_succeeded: u64,
    /// Downgrade records in the audit table.
    pub downgrades: u64,
    /// By the `backend` column of the audit records (the reconciler's attribution).
    pub downgrades_by_backend: BTreeMap<String, u64>,
    /// By the kind of object the session really had (the simulator's knowledge).
    pub downgrades_by_object_kind: BTreeMap<String, u64>,
    /// `sessions_downgraded_total` summed over daemon incarnations (a crashed incarnation's
    /// last sweeps and `--once` runs are not in it).
    pub downgrades_metric: u64,
    pub wrong_downgrades: u64,
    pub wrong: Vec<WrongDowngrade>,
    /// Downgrades in the audit table that no daemon or `--once` log line reported.
    pub downgrades_not_reported: u64,
    pub unreported_downgrades: Vec<String>,
    pub sessions_created: u64,
    pub rows_in_table: u64,
    pub rows_lost: u64,
    pub rows_inconsistent: u64,
    pub row_problems: Vec<String>,
    pub final_states: BTreeMap<String, u64>,
    pub app_operations: BTreeMap<String, u64>,
    pub app_errors: u64,
    pub app_error_samples: Vec<String>,
    /// PostgreSQL's clock minus this host's, in microseconds: [min, max].
    pub db_clock_offset_us: (i64, i64),
    pub faults_injected: BTreeMap<String, u64>,
    pub faults_total: u64,
    /// Evidence that the interesting interleavings happened.
    pub races: BTreeMap<String, u64>,
    /// `skipped_rows_total` summed over daemon incarnations, by reason.
    pub skipped_rows: BTreeMap<String, u64>,
    pub guard_refusals: BTreeMap<String, u64>,
    /// Guard refusals by reason from the "refusing to act" log lines of every daemon
    /// incarnation and `--once` run (the metrics miss a killed incarnation's last sweeps and
    /// every `--once` run).
    pub guard_refusals_logged: BTreeMap<String, u64>,
    /// One logged refusal message per reason.
    pub refusal_samples: BTreeMap<String, String>,
    /// Downgrades whose audit `backend` is not the one the configured prefixes allow
    /// (backends-without-prefixes variant: anything but `unknown`).
    pub downgrades_misattributed: u64,
    pub attribution_problems: Vec<String>,
    /// Shared-table variant only.
    pub other_scope: Option<OtherScopeReport>,
    /// Answers of the fake API server by status ("none": dropped or abandoned).
    pub api_answers: BTreeMap<String, u64>,
    pub daemon_starts: u64,
    pub daemon_exits: BTreeMap<String, u64>,
    /// Daemon log lines by level, plus "panicked".
    pub daemon_log_lines: BTreeMap<String, u64>,
    /// Harness-level findings: daemons that exited on their own, panics, unexpected errors.
    pub problems: Vec<String>,
}

impl SoakReport {
    /// Why the run failed; empty when it passed.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.wrong_downgrades > 0 {
            f.push(format!("{} wrong downgrade(s)", self.wrong_downgrades));
        }
        if self.rows_lost > 0 {
            f.push(format!("{} row(s) lost", self.rows_lost));
        }
        if self.rows_inconsistent > 0 {
            f.push(format!(
                "{} row(s) with an inconsistent history",
                self.rows_inconsistent
            ));
        }
        if self.downgrades == 0 {
            if !self.refusals_may_replace_downgrades {
                f.push("no downgrade happened: the soak proves nothing".to_string());
            } else if self.refusals_total() == 0 {
                f.push(
                    "neither a downgrade nor a guard refusal happened: the soak proves nothing"
                        .to_string(),
                );
            }
        }
        if self.sweeps_run() == 0 {
            f.push("no sweep ran to a verdict (success or refused)".to_string());
        }
        if self.downgrades_misattributed > 0 {
            f.push(format!(
                "{} downgrade(s) attributed to a backend no prefix allows",
                self.downgrades_misattributed
            ));
        }
        if let Some(other) = &self.other_scope {
            f.extend(other.failures());
        }
        if !self.problems.is_empty() {
            f.push(format!("{} harness problem(s)", self.problems.len()));
        }
        f
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// Guard refusals of every process, as logged.
    pub fn refusals_total(&self) -> u64 {
        self.guard_refusals_logged.values().sum()
    }

    /// Sweeps that reached a verdict: succeeded or refused by a guard (daemons and `--once`).
    pub fn sweeps_run(&self) -> u64 {
        let daemons = |r: &str| self.sweeps.get(r).copied().unwrap_or(0);
        let once = |r: &str| self.once_runs.get(r).copied().unwrap_or(0);
        daemons("success") + daemons("refused") + once("success") + once("refused")
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn text(&self) -> String {
        fn map(m: &BTreeMap<String, u64>) -> String {
            if m.is_empty() {
                return "-".to_string();
            }
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "soak ({}): {:.1}s, seed {}, {} replica(s), schema {}, work dir {}",
            self.variant,
            self.duration_seconds,
            self.seed,
            self.replicas,
            self.schema,
            self.work_dir
        );
        let _ = writeln!(w, "  sweeps (daemons):   {}", map(&self.sweeps));
        let _ = writeln!(w, "  --once runs:        {}", map(&self.once_runs));
        let _ = writeln!(w, "  sweeps succeeded:   {}", self.sweeps_succeeded);
        let _ = writeln!(
            w,
            "  downgrades:         {} (objects: {}; audit backend column: {}); sessions_downgraded_total over daemons: {}",
            self.downgrades,
            map(&self.downgrades_by_object_kind),
            map(&self.downgrades_by_backend),
            self.downgrades_metric
        );
        let _ = writeln!(w, "  wrong downgrades:   {}", self.wrong_downgrades);
        let _ = writeln!(
            w,
            "  not reported:       {} (audit records no process logged)",
            self.downgrades_not_reported
        );
        for u in &self.unreported_downgrades {
            let _ = writeln!(w, "      - {u}");
        }
        let _ = writeln!(
            w,
            "  rows lost:          {} (sessions created {}, rows in table {})",
            self.rows_lost, self.sessions_created, self.rows_in_table
        );
        let _ = writeln!(w, "  rows inconsistent:  {}", self.rows_inconsistent);
        let _ = writeln!(w, "  final states:       {}", map(&self.final_states));
        let total_ops: u64 = self.app_operations.values().sum();
        let _ = writeln!(
            w,
            "  app operations:     {total_ops} ({}); errors {}",
            map(&self.app_operations),
            self.app_errors
        );
        let _ = writeln!(
            w,
            "  faults injected:    {} ({})",
            self.faults_total,
            map(&self.faults_injected)
        );
        let _ = writeln!(w, "  races seen:         {}", map(&self.races));
        let _ = writeln!(w, "  skipped rows:       {}", map(&self.skipped_rows));
        let _ = writeln!(
            w,
            "  guard refusals:     {} (daemon metrics)",
            map(&self.guard_refusals)
        );
        let _ = writeln!(
            w,
            "  refusals logged:    {} (daemons and --once)",
            map(&self.guard_refusals_logged)
        );
        for (reason, detail) in &self.refusal_samples {
            let _ = writeln!(w, "      {reason}: {detail}");
        }
        let _ = writeln!(
            w,
            "  acted:              {} sweep(s) ran to a verdict; {} downgrade(s), {} guard refusal(s){}",
            self.sweeps_run(),
            self.downgrades,
            self.refusals_total(),
            match (self.downgrades > 0, self.refusals_total() > 0) {
                (true, true) => ": both downgraded and refused",
                (true, false) => ": downgraded, never refused",
                (false, true) => ": refused, never downgraded",
                (false, false) => ": NEITHER downgraded NOR refused",
            }
        );
        if self.variant.contains("backends-without-prefixes") {
            let _ = writeln!(
                w,
                "  misattributed:      {} (downgrades whose audit backend is not `unknown`)",
                self.downgrades_misattributed
            );
        }
        for p in self.attribution_problems.iter().take(KEEP) {
            let _ = writeln!(w, "  ATTRIBUTION: {p}");
        }
        if let Some(o) = &self.other_scope {
            let _ = writeln!(
                w,
                "  other scope {}:  {} rows created, {} in table, {} writes ({}), app errors {}",
                o.other_scope,
                o.rows_created,
                o.rows_in_table,
                o.writes,
                map(&o.operations),
                o.app_errors
            );
            let _ = writeln!(
                w,
                "      changed by others {}, lost {}, audit records outside scope {} {} (by scope: {})",
                o.rows_changed,
                o.rows_lost,
                o.audit_records_outside_scope,
                o.own_scope,
                map(&o.audit_records_by_scope)
            );
            let _ = writeln!(
                w,
                "      downgrades with a twin row in {}: {} (suspended, same object: {}); orphan look-alikes at the end: {}; final states {}",
                o.other_scope,
                o.downgrades_with_a_twin,
                o.downgrades_with_a_suspended_twin,
                o.orphan_lookalikes_at_end,
                map(&o.final_states)
            );
            for p in o.problems.iter().take(KEEP) {
                let _ = writeln!(w, "  OTHER SCOPE: {p}");
            }
        }
        let _ = writeln!(w, "  API answers:        {}", map(&self.api_answers));
        let _ = writeln!(
            w,
            "  daemons:            {} started; exits {}; log lines {}",
            self.daemon_starts,
            map(&self.daemon_exits),
            map(&self.daemon_log_lines)
        );
        for d in &self.wrong {
            let _ = writeln!(
                w,
                "  WRONG audit #{} sweep {} key {} object {} at {}:",
                d.audit_id, d.sweep_id, d.session_key, d.object, d.at
            );
            for r in &d.reasons {
                let _ = writeln!(w, "      - {r}");
            }
            let _ = writeln!(w, "      object: {}", d.object_life);
            for v in &d.row_history {
                let _ = writeln!(w, "      row: {v}");
            }
        }
        for p in self.row_problems.iter().take(KEEP) {
            let _ = writeln!(w, "  ROW: {p}");
        }
        for p in &self.problems {
            let _ = writeln!(w, "  PROBLEM: {p}");
        }
        for e in &self.app_error_samples {
            let _ = writeln!(w, "  app error: {e}");
        }
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(w, "RESULT: PASS");
        } else {
            let _ = writeln!(w, "RESULT: FAIL ({})", failures.join("; "));
        }
        out
    }
}

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
        refusals_may_replace_downgrades: cfg.backends_without_prefixes,
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

async fn soak(
    cfg: &SoakConfig,
    db: &SoakDb,
    api: Arc<FakeApiServer>,
    work_dir: &Path,
    kubeconfig: &Path,
    report: &mut SoakReport,
) -> Result<()> {
    let grace = chrono::Duration::seconds(cfg.grace_period_seconds as i64);
    let sim = Arc::new(Sim {
        api: api.clone(),
        pool: db.pool.clone(),
        table: db.table(),
        scope: cfg.shared_table.then_some(OWN_SCOPE),
        names_alike: cfg.backends_without_prefixes,
        target_sessions: cfg.sessions.max(4),
        grace,
        seq: AtomicU64::new(1),
        state: Mutex::new(SimState::default()),
    });
    // The other cluster's application (shared-table variant): it writes only rows of its own
    // scope, under the keys and object names of `sim`'s sessions, and never touches objects.
    let other = cfg.shared_table.then(|| {
        Arc::new(Sim {
            api: api.clone(),
            pool: db.pool.clone(),
            table: db.table(),
            scope: Some(OTHER_SCOPE),
            names_alike: cfg.backends_without_prefixes,
            target_sessions: 0,
            grace,
            seq: AtomicU64::new(1_000_000_000),
            state: Mutex::new(SimState::default()),
        })
    });
    let clock = ClockOffset::measure(&db.pool).await?;
    report.db_clock_offset_us = (
        clock.min.num_microseconds().unwrap_or(i64::MIN),
        clock.max.num_microseconds().unwrap_or(i64::MAX),
    );
    // A first population, so the daemons' first sweeps have something to look at.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    for _ in 0..cfg.sessions / 3 {
        sim.create_session(&mut rng).await?;
    }
    // Some of them paused already: the first orphans appear as soon as the grace period ends.
    for i in 0..cfg.sessions / 3 {
        if rng.random_bool(0.4) {
            sim.pause(i).await?;
        }
    }
    if let Some(other) = &other {
        // The other cluster has a suspended row under every key, naming the same object.
        for _ in 0..cfg.sessions / 3 {
            other.mirror_step(&sim, &mut rng, true).await?;
        }
    }

    let pg_port = pg_port(&cfg.database_url)?;
    let fleet = Arc::new(tokio::sync::Mutex::new(Fleet {
        binary: cfg.binary.clone(),
        dir: work_dir.to_path_buf(),
        kubeconfig: kubeconfig.to_path_buf(),
        settings: daemon_settings(cfg, db),
        replicas: Vec::new(),
        final_scrapes: Vec::new(),
        exits: BTreeMap::new(),
        starts: 0,
        problems: Vec::new(),
    }));
    {
        let mut f = fleet.lock().await;
        for _ in 0..cfg.replicas.max(1) {
            f.start().await?;
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let faults = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let once = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let kick_once = Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();

    let mut workers = tokio::task::JoinSet::new();
    for i in 0..cfg.workers.max(1) {
        let sim = sim.clone();
        let stop = stop_rx.clone();
        let rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(1 + i as u64));
        workers.spawn(app_worker(sim, stop, rng));
    }
    if let Some(other) = &other {
        workers.spawn(other_scope_worker(
            sim.clone(),
            other.clone(),
            stop_rx.clone(),
            StdRng::seed_from_u64(cfg.seed.wrapping_add(3000)),
        ));
    }
    let mut helpers = tokio::task::JoinSet::new();
    if cfg.faults {
        helpers.spawn(fault_switcher(
            FaultTargets {
                api: api.clone(),
                sim: sim.clone(),
                fleet: fleet.clone(),
                pool: db.pool.clone(),
                pg_port,
                counts: faults.clone(),
                kick_once: kick_once.clone(),
            },
            stop_rx.clone(),
            StdRng::seed_from_u64(cfg.seed.wrapping_add(1000)),
        ));
    }
    helpers.spawn(scraper(fleet.clone(), stop_rx.clone()));
    let once_task = cfg.once_runs.then(|| {
        tokio::spawn(once_runner(
            fleet.clone(),
            once.clone(),
            kick_once.clone(),
            stop_rx.clone(),
            StdRng::seed_from_u64(cfg.seed.wrapping_add(2000)),
        ))
    });

    // Let it run.
    let deadline = started + cfg.duration;
    let mut next_progress = started + Duration::from_secs(5);
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
        if cfg.progress && Instant::now() >= next_progress {
            next_progress += Duration::from_secs(5);
            let downgrades = db.downgrade_count().await;
            let ops: u64 = sim.lock().ops.values().sum();
            let nfaults: u64 = lock(&faults).values().sum();
            let sweeps = fleet.lock().await.sweeps_so_far();
            eprintln!(
                "soak [{:>4.0}s] app ops {ops}, downgrades {downgrades}, faults {nfaults}, daemon sweeps {}",
                started.elapsed().as_secs_f64(),
                sweeps
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }

    // Stop everything that changes the world, then the daemons.
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(joined) = workers.join_next().await {
            if let Err(e) = joined {
                sim.lock()
                    .errors
                    .push(format!("an application worker died: {e}"));
            }
        }
    })
    .await;
    if drained.is_err() {
        report
            .problems
            .push("the application workers did not stop within 20s".into());
        workers.abort_all();
    }
    if let Some(task) = once_task {
        // A `--once` still running is killed (kill_on_drop); its open transaction rolls back.
        task.abort();
        let _ = task.await;
    }
    while helpers.join_next().await.is_some() {}
    api.clear_faults();
    api.allow_all();
    report.duration_seconds = started.elapsed().as_secs_f64();

    let logs;
    {
        let mut f = fleet.lock().await;
        f.scrape_all().await;
        f.stop_all().await;
        report.daemon_starts = f.starts;
        report.daemon_exits = f.exits.clone();
        report.problems.extend(f.problems.iter().cloned());
        let scrapes = f.final_scrapes.clone();
        report.sweeps = sum_by_label(&scrapes, "sandbox_reconciler_sweeps_total", "result");
        report.skipped_rows =
            sum_by_label(&scrapes, "sandbox_reconciler_skipped_rows_total", "reason");
        report.guard_refusals = sum_by_label(
            &scrapes,
            "sandbox_reconciler_guard_refusals_total",
            "reason",
        );
        report.downgrades_metric = sum_by_label(
            &scrapes,
            "sandbox_reconciler_sessions_downgraded_total",
            "backend",
        )
        .values()
        .sum();
        logs = scan_logs(&f.dir);
        report.daemon_log_lines = logs.counts.clone();
        report.guard_refusals_logged = logs.refusals.clone();
        report.refusal_samples = logs.refusal_samples.clone();
    }
    if let Some(n) = report.daemon_log_lines.get("panicked") {
        report
            .problems
            .push(format!("{n} panic message(s) in the daemon logs"));
    }
    report.once_runs = lock(&once).clone();
    report.faults_injected = lock(&faults).clone();
    report.faults_total = report.faults_injected.values().sum();
    report.sweeps_succeeded = report.sweeps.get("success").copied().unwrap_or(0)
        + report.once_runs.get("success").copied().unwrap_or(0);
    for r in api.requests() {
        let key = r.status.map_or("none".to_string(), |s| s.to_string());
        *report.api_answers.entry(key).or_default() += 1;
    }

    // Judge.
    let audits = db.downgrades().await?;
    let rows = db.final_rows(sim.scope).await?;
    let other_rows = match &other {
        Some(o) => Some(db.final_rows(o.scope).await?),
        None => None,
    };
    let audit_scopes = db.audit_scopes().await?;
    let st = sim.lock();
    report.app_operations = st.ops.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    report.app_errors = st.errors.len() as u64;
    report.app_error_samples = st.errors.iter().take(KEEP).cloned().collect();
    judge(&st, &audits, &rows, &clock, report);
    account_for_downgrades(&audits, &logs, report);
    if cfg.backends_without_prefixes {
        check_attribution_without_prefixes(&audits, report);
    }
    if let (Some(other), Some(other_rows)) = (&other, &other_rows) {
        let ost = other.lock();
        let mut o = OtherScopeReport {
            own_scope: OWN_SCOPE.to_string(),
            other_scope: OTHER_SCOPE.to_string(),
            ..OtherScopeReport::default()
        };
        check_audit_scope(&audit_scopes, OWN_SCOPE, &mut o);
        check_other_scope_untouched(&ost, other_rows, &mut o);
        other_scope_exposure(&st, &ost, other_rows, &audits, &clock, sim.grace, &mut o);
        report.other_scope = Some(o);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The application simulator

/// Which backend a session lives on (fixed for its life).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Pod,
    Sandbox,
}

impl Backend {
    fn kind(self) -> Kind {
        match self {
            Backend::Pod => Kind::Pod,
            Backend::Sandbox => Kind::Sandbox,
        }
    }
}

struct SimSession {
    key: String,
    backend: Backend,
    /// An operation is in progress on this session.
    busy: bool,
}

/// One row version.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    state: String,
    object: String,
    updated_at: DateTime<Utc>,
    agent_thread_id: Option<String>,
}

impl Version {
    fn show(&self) -> String {
        format!(
            "{}/{} updated_at={} agent_thread_id={}",
            self.state,
            self.object,
            self.updated_at.format("%H:%M:%S%.6f"),
            self.agent_thread_id.as_deref().unwrap_or("NULL")
        )
    }
}

/// One row version the application wrote.
#[derive(Debug, Clone)]
struct AppWrite {
    op: &'static str,
    /// The state the application read when it decided on `op` (before taking the lock).
    seen_state: Option<String>,
    new: Version,
    /// The version it overwrote (read under the row lock); `None` for the INSERT.
    prev: Option<Version>,
    started: DateTime<Utc>,
    /// When the COMMIT returned: the version certainly existed from then on.
    committed: DateTime<Utc>,
}

/// One object's life in wall-clock time.
#[derive(Debug, Clone)]
struct ObjectLife {
    kind: Kind,
    session: String,
    /// Just after the fake server stored it.
    created_after: DateTime<Utc>,
    terminating_after: Option<DateTime<Utc>>,
    /// Just before it was removed.
    removed_before: Option<DateTime<Utc>>,
}

impl ObjectLife {
    /// Whether the object certainly existed at `t`, a PostgreSQL timestamp (which may lag the
    /// instant it stands for by up to a microsecond), given the database clock's offset.
    fn existed_at_db(&self, t: DateTime<Utc>, clock: &ClockOffset) -> bool {
        clock.latest_db(self.created_after) <= t
            && self
                .removed_before
                .is_none_or(|r| t + chrono::Duration::microseconds(1) <= clock.earliest_db(r))
    }

    /// Whether the object certainly existed at `t`, a time of this host's clock.
    fn existed_at_local(&self, t: DateTime<Utc>) -> bool {
        self.created_after <= t && self.removed_before.is_none_or(|r| t < r)
    }

    fn show(&self, name: &str) -> String {
        let ts = |t: &DateTime<Utc>| t.format("%H:%M:%S%.6f").to_string();
        format!(
            "{:?} {name} of {}: created {}, terminating {}, removed {}",
            self.kind,
            self.session,
            ts(&self.created_after),
            self.terminating_after
                .as_ref()
                .map_or("never".to_string(), ts),
            self.removed_before.as_ref().map_or("never".to_string(), ts)
        )
    }
}

/// PostgreSQL's clock minus this host's, bounded by a round trip: `min <= offset <= max`.
/// Both are the same clock when the server runs on this host; the bounds keep the oracle's
/// claims true when it does not.
#[derive(Debug, Clone, Copy)]
struct ClockOffset {
    min: chrono::Duration,
    max: chrono::Duration,
}

impl ClockOffset {
    /// The latest database time that local instant `t` can correspond to.
    fn latest_db(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        t + self.max
    }

    /// The earliest database time that local instant `t` can correspond to.
    fn earliest_db(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        t + self.min
    }

    /// Measures the offset; keeps the tightest of a few round trips.
    async fn measure(pool: &PgPool) -> Result<ClockOffset> {
        let mut best: Option<ClockOffset> = None;
        for _ in 0..7 {
            let before = Utc::now();
            let db: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
                .fetch_one(pool)
                .await?;
            let after = Utc::now();
            // db was read somewhere in [before, after] (+ a microsecond of truncation).
            let candidate = ClockOffset {
                min: db - after,
                max: db - before + chrono::Duration::microseconds(1),
            };
            if best.is_none_or(|b| candidate.max - candidate.min < b.max - b.min) {
                best = Some(candidate);
            }
        }
        best.ok_or_else(|| anyhow!("could not read the database clock"))
    }
}

#[derive(Default)]
struct SimState {
    sessions: Vec<SimSession>,
    next_session: u64,
    ops: BTreeMap<&'static str, u64>,
    errors: Vec<String>,
    objects: HashMap<String, ObjectLife>,
    writes: HashMap<String, Vec<AppWrite>>,
    /// Keys whose last COMMIT failed: whether it happened is unknown.
    uncertain: HashSet<String>,
}

struct Sim {
    api: Arc<FakeApiServer>,
    pool: PgPool,
    table: String,
    /// The value of the scope column (`SCOPE_COLUMN`) of the rows this application owns, in a
    /// shared table; `None` for the centaur table, which has no such column.
    scope: Option<&'static str>,
    /// Name pods and Sandboxes alike (`s-N`), so that no prefix tells them apart.
    names_alike: bool,
    target_sessions: usize,
    /// The daemons' grace period: suspended rows older than this are the ones being downgraded.
    grace: chrono::Duration,
    /// Object names and agent_thread_ids are numbered from here, never reused.
    seq: AtomicU64,
    state: Mutex<SimState>,
}

impl Sim {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        lock(&self.state)
    }

    fn count(&self, op: &'static str) {
        *self.lock().ops.entry(op).or_default() += 1;
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn new_object_name(&self, backend: Backend) -> String {
        match backend {
            _ if self.names_alike => format!("s-{}", self.next()),
            Backend::Pod => format!("p-{}", self.next()),
            Backend::Sandbox => format!("sb-{}", self.next()),
        }
    }

    /// The condition that confines a statement to this application's rows, after the key's:
    /// `" AND cluster = 'cluster-a'"` in a shared table, else nothing.
    fn scope_filter(&self) -> String {
        match self.scope {
            Some(scope) => format!(" AND {SCOPE_COLUMN} = '{scope}'"),
            None => String::new(),
        }
    }

    /// Creates a running object (pod, or Sandbox with one replica) and records its birth.
    fn create_object(&self, backend: Backend, name: &str, session: &str) {
        match backend {
            Backend::Pod => {
                self.api
                    .add_pod(NAMESPACE, name, &[MANAGED, ("centaur.ai/sandbox-id", name)])
            }
            Backend::Sandbox => {
                self.api
                    .add_sandbox("v1alpha1", NAMESPACE, name, json!({ "replicas": 1 }))
            }
        }
        let created_after = Utc::now();
        self.lock().objects.insert(
            name.to_string(),
            ObjectLife {
                kind: backend.kind(),
                session: session.to_string(),
                created_after,
                terminating_after: None,
                removed_before: None,
            },
        );
    }

    /// Removes an object; returns whether it existed.
    fn remove_object(&self, kind: Kind, name: &str) -> bool {
        let before = Utc::now();
        let removed = self.api.remove(kind, NAMESPACE, name);
        if removed {
            if let Some(life) = self.lock().objects.get_mut(name) {
                life.removed_before = Some(before);
            }
        }
        removed
    }

    /// Marks an object terminating (deletionTimestamp); returns whether it exists.
    fn terminate_object(&self, kind: Kind, name: &str) -> bool {
        let stamp = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let found = self.api.modify(kind, NAMESPACE, name, |o| {
            o["metadata"]["deletionTimestamp"] = Value::String(stamp);
            o["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        });
        if found {
            let after = Utc::now();
            if let Some(life) = self.lock().objects.get_mut(name) {
                life.terminating_after.get_or_insert(after);
            }
        }
        found
    }

    fn set_replicas(&self, name: &str, replicas: i64) -> bool {
        self.api.modify(Kind::Sandbox, NAMESPACE, name, |o| {
            o["spec"]["replicas"] = json!(replicas);
        })
    }

    /// Whether the platform would find the object (not removed, not terminating).
    fn object_usable(&self, name: &str) -> bool {
        self.lock()
            .objects
            .get(name)
            .is_some_and(|l| l.removed_before.is_none() && l.terminating_after.is_none())
    }

    fn error(&self, message: String) {
        self.lock().errors.push(message);
    }

    /// Creates a session: its object first, then the row `running` (as the platform does).
    async fn create_session(&self, rng: &mut StdRng) -> Result<()> {
        let backend = if rng.random_bool(0.5) {
            Backend::Pod
        } else {
            Backend::Sandbox
        };
        let key = {
            let mut st = self.lock();
            st.next_session += 1;
            format!("thread-{}", st.next_session)
        };
        let object = self.new_object_name(backend);
        self.create_object(backend, &object, &key);
        self.insert_row(&key, "create", "running", &object).await?;
        self.lock().sessions.push(SimSession {
            key,
            backend,
            busy: false,
        });
        Ok(())
    }

    /// The platform's INSERT of a new session's row (in its own scope), recorded as the row's
    /// first version.
    async fn insert_row(
        &self,
        key: &str,
        op: &'static str,
        state: &str,
        object: &str,
    ) -> Result<()> {
        let agent_thread_id = format!("at-{}", self.next());
        let started = Utc::now();
        let (scope_column, scope_value) = match self.scope {
            Some(scope) => (format!(", {SCOPE_COLUMN}"), format!(", '{scope}'")),
            None => (String::new(), String::new()),
        };
        let sql = format!(
            "INSERT INTO {} (thread_key, sandbox_id, state, agent_thread_id, updated_at{scope_column}) \
             VALUES ($1, $2, $3, $4, now(){scope_value}) RETURNING updated_at",
            self.table
        );
        let updated_at: DateTime<Utc> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(key)
            .bind(object)
            .bind(state)
            .bind(&agent_thread_id)
            .fetch_one(&self.pool)
            .await
            .with_context(|| format!("inserting session {key}"))?;
        let committed = Utc::now();
        let mut st = self.lock();
        st.writes
            .entry(key.to_string())
            .or_default()
            .push(AppWrite {
                op,
                seen_state: None,
                new: Version {
                    state: state.to_string(),
                    object: object.to_string(),
                    updated_at,
                    agent_thread_id: Some(agent_thread_id),
                },
                prev: None,
                started,
                committed,
            });
        *st.ops.entry(op).or_default() += 1;
        Ok(())
    }

    /// The platform's UPDATE: unconditional by key, `updated_at = now()`, a fresh
    /// agent_thread_id. It locks the row first to learn which version it overwrites; with
    /// `slow` it holds the lock that long before writing (a long transaction).
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        key: &str,
        op: &'static str,
        seen_state: &str,
        state: &str,
        object: &str,
        slow: Option<Duration>,
    ) -> Result<()> {
        let agent_thread_id = format!("at-{}", self.next());
        let started = Utc::now();
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT state, sandbox_id, updated_at, agent_thread_id FROM {} \
             WHERE thread_key = $1{} FOR UPDATE",
            self.table,
            self.scope_filter()
        );
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?
        else {
            bail!("{op} {key}: the row is gone");
        };
        let prev = Version {
            state: row.try_get(0)?,
            object: row.try_get(1)?,
            updated_at: row.try_get(2)?,
            agent_thread_id: row.try_get(3)?,
        };
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
        }
        let sql = format!(
            "UPDATE {} SET state = $2, sandbox_id = $3, agent_thread_id = $4, updated_at = now() \
             WHERE thread_key = $1{} RETURNING updated_at",
            self.table,
            self.scope_filter()
        );
        let updated_at: DateTime<Utc> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(key)
            .bind(state)
            .bind(object)
            .bind(&agent_thread_id)
            .fetch_one(&mut *tx)
            .await?;
        if let Err(e) = tx.commit().await {
            self.lock().uncertain.insert(key.to_string());
            bail!("{op} {key}: COMMIT failed, outcome unknown: {e}");
        }
        let committed = Utc::now();
        let mut st = self.lock();
        st.writes
            .entry(key.to_string())
            .or_default()
            .push(AppWrite {
                op,
                seen_state: Some(seen_state.to_string()),
                new: Version {
                    state: state.to_string(),
                    object: object.to_string(),
                    updated_at,
                    agent_thread_id: Some(agent_thread_id),
                },
                prev: Some(prev),
                started,
                committed,
            });
        *st.ops.entry(op).or_default() += 1;
        Ok(())
    }

    /// Holds the row locked for a while without changing it (a transaction in progress).
    async fn hold_row(&self, key: &str, d: Duration) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT 1 FROM {} WHERE thread_key = $1{} FOR UPDATE",
            self.table,
            self.scope_filter()
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tokio::time::sleep(d).await;
        tx.commit().await?;
        self.count("hold_row_lock");
        Ok(())
    }

    /// The usable objects of sessions the application last left running or idle.
    fn live_objects(&self) -> Vec<(Kind, String)> {
        let st = self.lock();
        st.sessions
            .iter()
            .filter_map(|s| Some((s.backend.kind(), st.writes.get(&s.key)?.last()?)))
            .filter(|(_, w)| matches!(w.new.state.as_str(), "running" | "idle"))
            .filter(|(_, w)| {
                st.objects
                    .get(&w.new.object)
                    .is_some_and(|l| l.removed_before.is_none() && l.terminating_after.is_none())
            })
            .map(|(kind, w)| (kind, w.new.object.clone()))
            .collect()
    }

    /// Pauses session `i` at once (set-up, before the daemons start).
    async fn pause(&self, i: usize) -> Result<()> {
        let (key, backend) = {
            let st = self.lock();
            let s = &st.sessions[i];
            (s.key.clone(), s.backend)
        };
        let Some(object) = self
            .lock()
            .writes
            .get(&key)
            .and_then(|w| w.last())
            .map(|w| w.new.object.clone())
        else {
            return Ok(());
        };
        match backend {
            Backend::Pod => {
                self.terminate_object(Kind::Pod, &object);
                self.write(&key, "suspend", "running", "suspended", &object, None)
                    .await?;
                self.remove_object(Kind::Pod, &object);
            }
            Backend::Sandbox => {
                self.set_replicas(&object, 0);
                self.write(&key, "suspend", "running", "suspended", &object, None)
                    .await?;
            }
        }
        Ok(())
    }

    /// Takes a random idle session for one operation; a fifth of the time one the application
    /// last left suspended longer ago than the grace period — a row the reconciler is about to
    /// downgrade, where the platform's changes race it (a user writing to a paused thread).
    fn claim(&self, rng: &mut StdRng) -> Option<(usize, String, Backend)> {
        let mut st = self.lock();
        let n = st.sessions.len();
        if n == 0 {
            return None;
        }
        if rng.random_bool(0.2) {
            let aged = Utc::now() - self.grace;
            let start = rng.random_range(0..n);
            let hot = (0..n).map(|k| (start + k) % n).find(|&i| {
                let s = &st.sessions[i];
                !s.busy
                    && st
                        .writes
                        .get(&s.key)
                        .and_then(|w| w.last())
                        .is_some_and(|w| w.new.state == "suspended" && w.committed < aged)
            });
            if let Some(i) = hot {
                let s = &mut st.sessions[i];
                s.busy = true;
                return Some((i, s.key.clone(), s.backend));
            }
        }
        for _ in 0..8 {
            let i = rng.random_range(0..n);
            let s = &mut st.sessions[i];
            if !s.busy {
                s.busy = true;
                return Some((i, s.key.clone(), s.backend));
            }
        }
        None
    }

    fn release(&self, i: usize) {
        if let Some(s) = self.lock().sessions.get_mut(i) {
            s.busy = false;
        }
    }

    /// One application step: create a session, or act on one.
    async fn step(self: &Arc<Self>, rng: &mut StdRng) -> Result<()> {
        let n = self.lock().sessions.len();
        if n < self.target_sessions
            && rng.random_bool(if n < self.target_sessions / 2 {
                0.5
            } else {
                0.1
            })
        {
            return self.create_session(rng).await;
        }
        let Some((i, key, backend)) = self.claim(rng) else {
            return Ok(());
        };
        let result = self.act(&key, backend, rng).await;
        self.release(i);
        result
    }

    async fn act(self: &Arc<Self>, key: &str, backend: Backend, rng: &mut StdRng) -> Result<()> {
        let sql = format!(
            "SELECT state, sandbox_id FROM {} WHERE thread_key = $1{}",
            self.table,
            self.scope_filter()
        );
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
        else {
            bail!("session {key}: its row is missing");
        };
        let state: String = row.try_get(0)?;
        let object: String = row.try_get(1)?;
        let usable = self.object_usable(&object);
        let sandbox = backend == Backend::Sandbox;
        let choices: Vec<(&'static str, u32)> = match state.as_str() {
            "running" | "idle" if !usable => vec![("mark_error", 1)],
            "running" | "idle" => vec![
                ("suspend", 30),
                ("toggle_idle", 10),
                ("touch", 8),
                ("stop", 3),
                ("evict_pod", if sandbox { 0 } else { 2 }),
                ("delete_live_sandbox", if sandbox { 1 } else { 0 }),
                ("nothing", 10),
            ],
            "suspended" => vec![
                ("resume", 25),
                ("touch", 6),
                ("stop", 3),
                ("orphan_sandbox", if sandbox && usable { 12 } else { 0 }),
                ("terminate_sandbox", if sandbox && usable { 4 } else { 0 }),
                ("hold_row_lock", 4),
                ("nothing", 15),
            ],
            "gone" | "stopped" | "error" => vec![("respawn", 20), ("nothing", 8)],
            _ => vec![("nothing", 1)],
        };
        let op = pick(rng, &choices).unwrap_or("nothing");
        let slow = rng
            .random_bool(0.2)
            .then(|| Duration::from_millis(rng.random_range(50..1000)));
        let kind = backend.kind();
        match op {
            "nothing" => {}
            "mark_error" => self.write(key, op, &state, "error", &object, slow).await?,
            "toggle_idle" => {
                let to = if state == "running" {
                    "idle"
                } else {
                    "running"
                };
                self.write(key, op, &state, to, &object, slow).await?;
            }
            "touch" => self.write(key, op, &state, &state, &object, slow).await?,
            "suspend" => match backend {
                Backend::Pod => {
                    // Pause deletes the pod: it terminates, and is gone a moment later.
                    self.terminate_object(kind, &object);
                    self.write(key, op, &state, "suspended", &object, slow)
                        .await?;
                    let delay = Duration::from_millis(rng.random_range(50..1500));
                    let sim = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        sim.remove_object(Kind::Pod, &object);
                    });
                }
                Backend::Sandbox => {
                    if self.set_replicas(&object, 0) {
                        self.write(key, op, &state, "suspended", &object, slow)
                            .await?;
                    } else {
                        self.write(key, "mark_error", &state, "error", &object, slow)
                            .await?;
                    }
                }
            },
            "resume" => {
                if sandbox && usable && self.set_replicas(&object, 1) {
                    self.write(key, op, &state, "running", &object, slow)
                        .await?;
                } else {
                    // A pod-backed session's pod is gone by design; a Sandbox deleted behind
                    // the platform's back is replaced. New object, new name, one UPDATE.
                    let fresh = self.new_object_name(backend);
                    self.create_object(backend, &fresh, key);
                    self.write(key, "resume_new_object", &state, "running", &fresh, slow)
                        .await?;
                }
            }
            "respawn" => {
                let fresh = self.new_object_name(backend);
                self.create_object(backend, &fresh, key);
                self.write(key, op, &state, "running", &fresh, slow).await?;
            }
            "stop" => {
                self.remove_object(kind, &object);
                self.write(key, op, &state, "stopped", &object, slow)
                    .await?;
            }
            "evict_pod" | "delete_live_sandbox" | "orphan_sandbox" => {
                // Behind the platform's back: the object goes, the row stays.
                if self.remove_object(kind, &object) {
                    self.count(op);
                }
            }
            "terminate_sandbox" => {
                // Deleted behind the platform's back, with a finalizer that takes a while.
                if self.terminate_object(kind, &object) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
                    self.remove_object(kind, &object);
                    self.count(op);
                }
            }
            "hold_row_lock" => {
                self.hold_row(key, Duration::from_millis(rng.random_range(300..1500)))
                    .await?
            }
            other => bail!("unknown operation {other}"),
        }
        Ok(())
    }
}

async fn app_worker(sim: Arc<Sim>, stop: watch::Receiver<bool>, mut rng: StdRng) {
    while !*stop.borrow() {
        if let Err(e) = sim.step(&mut rng).await {
            sim.error(format!("{e:#}"));
        }
        let think = Duration::from_millis(rng.random_range(30..250));
        if nap(&stop, think).await {
            break;
        }
    }
}

/// The other cluster's operations (shared-table variant): (operation, new state; "" keeps
/// the state), weighted. Mostly suspended, so its rows look like orphans to a reconciler
/// that ignores the scope.
const OTHER_SCOPE_OPS: &[((&str, &str), u32)] = &[
    (("other_scope_suspend", "suspended"), 50),
    (("other_scope_resume", "running"), 15),
    (("other_scope_idle", "idle"), 10),
    (("other_scope_gone", "gone"), 5),
    (("other_scope_stop", "stopped"), 5),
    (("other_scope_error", "error"), 5),
    (("other_scope_touch", ""), 10),
];

impl Sim {
    /// One step of the other cluster's application (shared-table variant; `self` is that
    /// application, `own` the daemons' scope's): under the key of one of `own`'s sessions it
    /// inserts or rewrites its own row, naming the object `own`'s row names now or, half of
    /// the time when there is one, an earlier object of that key that this fake cluster no
    /// longer has. With `create_only`, it only inserts a suspended row under a key it has no
    /// row for yet.
    async fn mirror_step(&self, own: &Sim, rng: &mut StdRng, create_only: bool) -> Result<()> {
        let (key, objects, absent) = {
            let own_st = own.lock();
            let st = self.lock();
            let n = own_st.sessions.len();
            if n == 0 {
                return Ok(());
            }
            let fresh: Vec<&SimSession> = own_st
                .sessions
                .iter()
                .filter(|s| !st.writes.contains_key(&s.key))
                .collect();
            let session = if create_only || (!fresh.is_empty() && rng.random_bool(0.5)) {
                match fresh.len() {
                    0 => return Ok(()),
                    m => fresh[rng.random_range(0..m)],
                }
            } else {
                &own_st.sessions[rng.random_range(0..n)]
            };
            let objects: Vec<String> = own_st
                .writes
                .get(&session.key)
                .map(|w| w.iter().map(|w| w.new.object.clone()).collect())
                .unwrap_or_default();
            let absent: Vec<String> = objects
                .iter()
                .filter(|o| {
                    own_st
                        .objects
                        .get(o.as_str())
                        .is_some_and(|l| l.removed_before.is_some())
                })
                .cloned()
                .collect();
            (session.key.clone(), objects, absent)
        };
        let Some(current) = objects.last().cloned() else {
            return Ok(());
        };
        let object = if !absent.is_empty() && rng.random_bool(0.5) {
            absent[rng.random_range(0..absent.len())].clone()
        } else {
            current
        };
        let seen = self
            .lock()
            .writes
            .get(&key)
            .and_then(|w| w.last())
            .map(|w| w.new.state.clone());
        match seen {
            None => {
                self.insert_row(&key, "other_scope_create", "suspended", &object)
                    .await
            }
            Some(_) if create_only => Ok(()),
            Some(seen) => {
                let (op, state) =
                    pick(rng, OTHER_SCOPE_OPS).unwrap_or(("other_scope_suspend", "suspended"));
                let state = if state.is_empty() {
                    seen.as_str()
                } else {
                    state
                };
                let slow = rng
                    .random_bool(0.1)
                    .then(|| Duration::from_millis(rng.random_range(50..500)));
                self.write(&key, op, &seen, state, &object, slow).await
            }
        }
    }
}

/// The other cluster's application (shared-table variant).
async fn other_scope_worker(
    own: Arc<Sim>,
    other: Arc<Sim>,
    stop: watch::Receiver<bool>,
    mut rng: StdRng,
) {
    while !*stop.borrow() {
        if let Err(e) = other.mirror_step(&own, &mut rng, false).await {
            other.error(format!("{e:#}"));
        }
        let think = Duration::from_millis(rng.random_range(20..150));
        if nap(&stop, think).await {
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Faults

const FAULT_KINDS: &[(&str, u32)] = &[
    ("list_500", 6),
    ("get_500", 4),
    ("list_503", 2),
    ("list_429_retry_after", 3),
    ("get_429", 2),
    ("expire_continue", 5),
    ("compact", 3),
    ("hang_short", 4),
    ("hang_long", 4),
    ("hang_confirm", 8),
    ("deny_list", 3),
    ("deny_get", 3),
    ("malformed_json", 4),
    ("wrong_kind", 2),
    ("item_without_name", 2),
    ("close_connection", 4),
    ("db_terminate", 5),
    ("mass_eviction", 2),
    ("replica_sigterm", 1),
    ("replica_sigkill", 1),
];

fn list_fault(resource: &str, action: FaultAction) -> Fault {
    Fault::on_list(resource, action)
}

/// What the fault switcher acts on.
struct FaultTargets {
    api: Arc<FakeApiServer>,
    sim: Arc<Sim>,
    fleet: Arc<tokio::sync::Mutex<Fleet>>,
    pool: PgPool,
    pg_port: u16,
    /// Faults injected, by kind.
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Wakes the `--once` runner (after the writer's connection was killed).
    kick_once: Arc<tokio::sync::Notify>,
}

/// Switches one fault on at a time, for a random while, with quiet gaps between.
async fn fault_switcher(targets: FaultTargets, stop: watch::Receiver<bool>, mut rng: StdRng) {
    let FaultTargets {
        api,
        sim,
        fleet,
        pool,
        pg_port,
        counts,
        kick_once,
    } = targets;
    loop {
        if nap(&stop, Duration::from_millis(rng.random_range(300..1500))).await {
            return;
        }
        let Some(kind) = pick(&mut rng, FAULT_KINDS) else {
            return;
        };
        let (resource, group, plural) = if rng.random_bool(0.5) {
            ("/pods", "", "pods")
        } else {
            ("/sandboxes", SANDBOX_GROUP, "sandboxes")
        };
        let on_get = rng.random_bool(0.5);
        let n = rng.random_range(1..=3usize);
        let mut injected = true;
        match kind {
            "list_500" => api.inject(Fault::on_list_page(
                resource,
                rng.random_range(0..3),
                FaultAction::Status(500, None),
            )),
            "get_500" => api.inject(Fault::on_get(resource, FaultAction::Status(500, None))),
            "list_503" => api.inject(list_fault(resource, FaultAction::Status(503, None)).times(n)),
            "list_429_retry_after" => {
                api.inject(list_fault(resource, FaultAction::Status(429, Some(1))).times(n))
            }
            "get_429" => {
                api.inject(Fault::on_get(resource, FaultAction::Status(429, Some(1))).times(n))
            }
            "expire_continue" => api.inject(Fault {
                matcher: FaultMatch {
                    method: Some("GET".into()),
                    path_contains: Some(resource.into()),
                    is_list: Some(true),
                    ..FaultMatch::default()
                },
                action: FaultAction::ExpireContinue,
                // Twice in a row aborts the listing; once restarts it.
                times: Some(rng.random_range(1..=2)),
            }),
            "compact" => api.compact(),
            "hang_short" | "hang_long" => {
                let ms = if kind == "hang_short" {
                    rng.random_range(200..1500)
                } else {
                    rng.random_range(2500..4000)
                };
                let action = FaultAction::Hang(Duration::from_millis(ms));
                let fault = if on_get {
                    Fault::on_get(resource, action)
                } else {
                    list_fault(resource, action)
                };
                api.inject(fault.times(n));
            }
            "hang_confirm" => {
                // Confirming GETs that take a while widen the gap between reading the rows
                // and writing them, where the application's changes race the downgrade.
                let ms = rng.random_range(300..1800);
                api.inject(
                    Fault::on_get(resource, FaultAction::Hang(Duration::from_millis(ms)))
                        .times(rng.random_range(2..=8)),
                );
            }
            "deny_list" => api.deny("list", group, plural),
            "deny_get" => api.deny("get", group, plural),
            "malformed_json" => {
                let fault = if on_get {
                    Fault::on_get(resource, FaultAction::MalformedJson)
                } else {
                    list_fault(resource, FaultAction::MalformedJson)
                };
                api.inject(fault.times(n));
            }
            "wrong_kind" => api.inject(list_fault(resource, FaultAction::WrongKind).once()),
            "item_without_name" => {
                api.inject(list_fault(resource, FaultAction::ItemWithoutName).once())
            }
            "close_connection" => {
                let fault = if on_get {
                    Fault::on_get(resource, FaultAction::CloseConnection)
                } else {
                    list_fault(resource, FaultAction::CloseConnection)
                };
                api.inject(fault.times(n));
            }
            "db_terminate" => {
                let pids = fleet.lock().await.pids();
                match terminate_backends(&pool, &pids, pg_port).await {
                    Ok(0) => injected = false,
                    // The writer lock is free until a daemon's next tick: a `--once` may win it.
                    Ok(_) => kick_once.notify_one(),
                    Err(e) => {
                        injected = false;
                        fleet
                            .lock()
                            .await
                            .problems
                            .push(format!("pg_terminate_backend failed: {e:#}"));
                    }
                }
            }
            "mass_eviction" => {
                // Most live objects vanish at once (a namespace wiped by mistake): the live
                // rows lose their objects and the misconfiguration guard should refuse until
                // the platform has noticed.
                let victims = sim.live_objects();
                let n = victims.len() * 7 / 10;
                for (kind, name) in victims.iter().take(n) {
                    sim.remove_object(*kind, name);
                }
                injected = n > 0;
            }
            "replica_sigterm" | "replica_sigkill" => {
                let mut f = fleet.lock().await;
                let i = rng.random_range(0..f.replicas.len().max(1));
                if let Err(e) = f.restart(i, kind == "replica_sigkill").await {
                    f.problems.push(format!("restarting a replica: {e:#}"));
                }
            }
            _ => injected = false,
        }
        if injected {
            *lock(&counts).entry(kind.to_string()).or_default() += 1;
        }
        let hold = Duration::from_millis(rng.random_range(500..2500));
        let stopped = nap(&stop, hold).await;
        api.clear_faults();
        api.allow_all();
        if stopped {
            return;
        }
    }
}

/// Terminates the PostgreSQL backends of the given processes (matched by their sockets'
/// local ports), and only those; returns how many.
async fn terminate_backends(pool: &PgPool, pids: &[u32], pg_port: u16) -> Result<u64> {
    let ports: Vec<i32> = client_ports(pids, pg_port)
        .into_iter()
        .map(i32::from)
        .collect();
    if ports.is_empty() {
        return Ok(0);
    }
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'sandbox-reconciler' AND datname = current_database() \
           AND client_port = ANY($1)",
    )
    .bind(&ports)
    .fetch_all(pool)
    .await?;
    Ok(killed.into_iter().filter(|k| *k).count() as u64)
}

/// Local ports of the TCP connections of `pids` to `remote_port` (Linux /proc).
fn client_ports(pids: &[u32], remote_port: u16) -> Vec<u16> {
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    inodes.insert(inode);
                }
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let inode = f[9].parse::<u64>().unwrap_or(0);
            if port(f[2]) == Some(remote_port) && inodes.contains(&inode) {
                if let Some(local) = port(f[1]) {
                    ports.push(local);
                }
            }
        }
    }
    ports
}

// ---------------------------------------------------------------------------------------------
// The daemons

struct Replica {
    child: Child,
    port: u16,
    pid: u32,
    last_scrape: String,
}

struct Fleet {
    binary: PathBuf,
    dir: PathBuf,
    kubeconfig: PathBuf,
    /// TOML shared by every replica and `--once` (the listen address is added per replica).
    settings: String,
    replicas: Vec<Replica>,
    /// The last scrape of every incarnation that ended.
    final_scrapes: Vec<String>,
    exits: BTreeMap<String, u64>,
    starts: u64,
    problems: Vec<String>,
}

fn daemon_settings(cfg: &SoakConfig, db: &SoakDb) -> String {
    // Shared table: the daemons own scope A only.
    let scope = if cfg.shared_table {
        format!("scope_column = \"{SCOPE_COLUMN}\"\nscope_value = \"{OWN_SCOPE}\"\n")
    } else {
        String::new()
    };
    // Both backends are enabled in every variant; this one says explicitly that neither
    // has a prefix (the default run leaves them unset, which is the same: empty).
    let backends = if cfg.backends_without_prefixes {
        "[backends.pod]\nenabled = true\nobject_name_prefix = \"\"\n\
         [backends.agent_sandbox]\nenabled = true\nobject_name_prefix = \"\"\n"
    } else {
        "[backends.agent_sandbox]\nenabled = true\n"
    };
    format!(
        "[database]\nurl = \"{url}\"\nconnect_timeout_seconds = 5\nstatement_timeout_seconds = 10\n\
         lock_timeout_seconds = 1\n\
         [sessions]\ntable = \"{table}\"\n{scope}\
         [audit]\ntable = \"{audit}\"\n\
         [cluster]\nnamespaces = [\"{NAMESPACE}\"]\npage_size = {page}\nrequest_timeout_seconds = {timeout}\n\
         confirm_concurrency = 4\n\
         {backends}\
         [sweep]\nschedule = \"*/1 * * * * *\"\ngrace_period_seconds = {grace}\n\
         max_downgrades_per_sweep = {cap}\nbatch_size = {batch}\n\
         [shutdown]\ntimeout_seconds = 5\n",
        url = cfg.database_url,
        table = db.table(),
        audit = db.audit_table(),
        page = cfg.page_size,
        timeout = cfg.request_timeout_seconds,
        grace = cfg.grace_period_seconds,
        cap = cfg.max_downgrades_per_sweep,
        batch = cfg.batch_size,
    )
}

impl Fleet {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        for (k, _) in std::env::vars() {
            if k.starts_with("SANDBOX_RECONCILER") {
                cmd.env_remove(k);
            }
        }
        cmd.env_remove("DATABASE_URL")
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,sqlx=warn,kube=warn")
            .kill_on_drop(true);
        cmd
    }

    async fn start(&mut self) -> Result<()> {
        let port = free_port()?;
        let config = self.dir.join(format!("daemon-{port}.toml"));
        std::fs::write(
            &config,
            format!("{}[server]\nlisten = \"127.0.0.1:{port}\"\n", self.settings),
        )?;
        let log = std::fs::File::create(self.dir.join(format!("daemon-{port}.log")))?;
        let child = self
            .command()
            .args([
                "--config",
                &config.to_string_lossy(),
                "--log-format",
                "json",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the daemon exited at once"))?;
        self.starts += 1;
        self.replicas.push(Replica {
            child,
            port,
            pid,
            last_scrape: String::new(),
        });
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        self.replicas.iter().map(|r| r.pid).collect()
    }

    /// Scrapes every replica; a replica that exited on its own is a problem, and replaced.
    async fn scrape_all(&mut self) {
        let mut dead = Vec::new();
        for (i, r) in self.replicas.iter_mut().enumerate() {
            if let Ok(Some(status)) = r.child.try_wait() {
                dead.push((i, status));
                continue;
            }
            if let Some((200, body)) = http_get(r.port, "/metrics").await {
                r.last_scrape = body;
            }
        }
        for (i, status) in dead.into_iter().rev() {
            let r = self.replicas.remove(i);
            self.problems.push(format!(
                "daemon pid {} (port {}) exited on its own: {status}; see daemon-{}.log",
                r.pid, r.port, r.port
            ));
            *self
                .exits
                .entry(format!("unexpected:{status}"))
                .or_default() += 1;
            self.final_scrapes.push(r.last_scrape);
            if let Err(e) = self.start().await {
                self.problems.push(format!("restarting a daemon: {e:#}"));
            }
        }
    }

    /// Stops replica `i` (SIGTERM, or SIGKILL when `crash`) and starts a new one.
    async fn restart(&mut self, i: usize, crash: bool) -> Result<()> {
        if i >= self.replicas.len() {
            return Ok(());
        }
        let mut r = self.replicas.remove(i);
        if let Some((200, body)) = http_get(r.port, "/metrics").await {
            r.last_scrape = body;
        }
        self.stop(r, crash).await;
        self.start().await
    }

    async fn stop(&mut self, mut r: Replica, crash: bool) {
        let label = if crash {
            let _ = r.child.start_kill();
            "sigkill"
        } else {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", &r.pid.to_string()])
                .status();
            "sigterm"
        };
        let status = match tokio::time::timeout(Duration::from_secs(15), r.child.wait()).await {
            Ok(Ok(status)) => status
                .code()
                .map_or("signal".to_string(), |c| format!("exit {c}")),
            _ => {
                let _ = r.child.start_kill();
                let _ = r.child.wait().await;
                self.problems.push(format!(
                    "daemon pid {} did not exit within 15s of SIGTERM",
                    r.pid
                ));
                "timeout".to_string()
            }
        };
        if !crash && status != "exit 0" {
            self.problems.push(format!(
                "daemon pid {} answered SIGTERM with {status} (expected exit 0); see daemon-{}.log",
                r.pid, r.port
            ));
        }
        *self.exits.entry(format!("{label}:{status}")).or_default() += 1;
        self.final_scrapes.push(r.last_scrape);
    }

    async fn stop_all(&mut self) {
        while let Some(r) = self.replicas.pop() {
            self.stop(r, false).await;
        }
    }

    fn sweeps_so_far(&self) -> BTreeMap<String, u64> {
        let scrapes: Vec<String> = self
            .final_scrapes
            .iter()
            .cloned()
            .chain(self.replicas.iter().map(|r| r.last_scrape.clone()))
            .collect();
        sum_by_label(&scrapes, "sandbox_reconciler_sweeps_total", "result")
    }
}

async fn scraper(fleet: Arc<tokio::sync::Mutex<Fleet>>, stop: watch::Receiver<bool>) {
    loop {
        fleet.lock().await.scrape_all().await;
        if nap(&stop, Duration::from_millis(700)).await {
            return;
        }
    }
}

/// Runs `--once` every few seconds beside the daemons; counts outcomes.
async fn once_runner(
    fleet: Arc<tokio::sync::Mutex<Fleet>>,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    kick: Arc<tokio::sync::Notify>,
    stop: watch::Receiver<bool>,
    mut rng: StdRng,
) {
    let mut n = 0u64;
    loop {
        let pause = Duration::from_millis(rng.random_range(2000..6000));
        let stopped = tokio::select! {
            stopped = nap(&stop, pause) => stopped,
            _ = kick.notified() => *stop.borrow(),
        };
        if stopped {
            return;
        }
        n += 1;
        let (mut cmd, config) = {
            let f = fleet.lock().await;
            let config = f.dir.join("once.toml");
            if std::fs::write(&config, &f.settings).is_err() {
                return;
            }
            (f.command(), config)
        };
        cmd.args([
            "--once",
            "--config",
            &config.to_string_lossy(),
            "--output",
            "json",
            "--log-format",
            "json",
        ])
        // Wait a little for the writer lock: sometimes it is free between two daemon sweeps.
        .env(
            "SANDBOX_RECONCILER__DATABASE__WRITER_LOCK_WAIT_SECONDS",
            "1",
        )
        .stderr(Stdio::piped())
        .stdout(Stdio::piped());
        let outcome = match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
            Err(_) => "timeout".to_string(),
            Ok(Err(e)) => format!("spawn_error: {e}"),
            Ok(Ok(out)) => {
                let dir = config.parent().unwrap_or(Path::new("."));
                let _ = std::fs::write(dir.join(format!("once-{n}.log")), &out.stderr);
                let _ = std::fs::write(dir.join(format!("once-{n}.json")), &out.stdout);
                let result = serde_json::from_slice::<Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v["result"].as_str().map(str::to_string));
                match (out.status.code(), result.as_deref()) {
                    (Some(0), _) => "success".to_string(),
                    (Some(3), _) => "refused".to_string(),
                    (Some(1), Some(r)) => r.to_string(),
                    (code, _) => {
                        format!("exit_{}", code.map_or("signal".into(), |c| c.to_string()))
                    }
                }
            }
        };
        if !matches!(
            outcome.as_str(),
            "success" | "refused" | "failed" | "skipped"
        ) {
            fleet
                .lock()
                .await
                .problems
                .push(format!("--once run {n} ended with {outcome}"));
        }
        *lock(&counts).entry(outcome).or_default() += 1;
    }
}

/// What the daemon and `--once` logs say.
#[derive(Default)]
struct LogFacts {
    /// Lines by level, plus "panicked".
    counts: BTreeMap<String, u64>,
    /// (sweep id, session key) of every "downgraded session to gone" line.
    downgraded: HashSet<(String, String)>,
    /// Sweeps that logged "sweep failed", with the error.
    failed: HashMap<String, String>,
    /// Sweeps that logged "sweep finished".
    finished: HashSet<String>,
    /// "refusing to act" lines by reason.
    refusals: BTreeMap<String, u64>,
    /// The first refusal message of each reason.
    refusal_samples: BTreeMap<String, String>,
}

/// Reads every daemon and `--once` log.
fn scan_logs(dir: &Path) -> LogFacts {
    let mut facts = LogFacts::default();
    let counts = &mut facts.counts;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return facts;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines() {
            if line.contains("panicked") {
                *counts.entry("panicked".to_string()).or_default() += 1;
            }
            let Ok(event) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let Some(level) = event["level"].as_str() {
                *counts.entry(level.to_lowercase()).or_default() += 1;
            }
            let sweep = event["sweep_id"].as_str().unwrap_or_default().to_string();
            match event["message"].as_str().unwrap_or_default() {
                "downgraded session to gone" => {
                    let key = event["key"].as_str().unwrap_or_default().to_string();
                    facts.downgraded.insert((sweep, key));
                }
                "sweep finished" => {
                    facts.finished.insert(sweep);
                }
                "sweep failed; nothing partial was written" => {
                    let error = event["error"].as_str().unwrap_or_default().to_string();
                    facts.failed.insert(sweep, error);
                }
                message if message.starts_with("refusing to act") => {
                    let reason = event["reason"].as_str().unwrap_or("none").to_string();
                    facts
                        .refusal_samples
                        .entry(reason.clone())
                        .or_insert_with(|| message.to_string());
                    *facts.refusals.entry(reason).or_default() += 1;
                }
                _ => {}
            }
        }
    }
    facts
}

// ---------------------------------------------------------------------------------------------
// The database

struct SoakDb {
    pool: PgPool,
    schema: String,
}

/// One `downgrade` audit record.
#[derive(Debug, Clone)]
struct AuditDowngrade {
    id: i64,
    sweep_id: String,
    at: DateTime<Utc>,
    session_key: String,
    object: String,
    backend: String,
    old_state: String,
    new_state: String,
    old_updated_at: Option<DateTime<Utc>>,
    new_updated_at: Option<DateTime<Utc>>,
    cleared: Value,
    evidence: Value,
}

/// The scope of one audit record, of any action.
#[derive(Debug, Clone)]
struct AuditScope {
    id: i64,
    action: String,
    session_key: String,
    scope: Option<String>,
}

impl SoakDb {
    /// A private schema with the centaur table; `shared`: with a scope column and the primary
    /// key `(cluster, thread_key)`, as when several clusters share one table.
    async fn create(url: &str, connections: usize, shared: bool) -> Result<SoakDb> {
        let pool = PgPoolOptions::new()
            .max_connections(connections as u32)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}", redact(url)))?;
        let schema = format!("soak_{}", uuid::Uuid::new_v4().simple());
        let fixture = include_str!("../fixtures/centaur_sandbox_sessions.sql");
        let shared_sql = if shared {
            format!(
                "ALTER TABLE sandbox_sessions ADD COLUMN {SCOPE_COLUMN} TEXT NOT NULL; \
                 ALTER TABLE sandbox_sessions DROP CONSTRAINT sandbox_sessions_pkey; \
                 ALTER TABLE sandbox_sessions ADD PRIMARY KEY ({SCOPE_COLUMN}, thread_key);"
            )
        } else {
            String::new()
        };
        let sql = format!(
            "CREATE SCHEMA {schema}; SET search_path = {schema}; {fixture}; {shared_sql} SET search_path = public"
        );
        let mut conn = pool.acquire().await?;
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .context("creating the soak schema")?;
        Ok(SoakDb { pool, schema })
    }

    fn table(&self) -> String {
        format!("{}.sandbox_sessions", self.schema)
    }

    fn audit_table(&self) -> String {
        format!("{}.reconciler_audit", self.schema)
    }

    async fn audit_exists(&self) -> bool {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
            .bind(self.audit_table())
            .fetch_one(&self.pool)
            .await
            .unwrap_or(false)
    }

    async fn downgrade_count(&self) -> i64 {
        if !self.audit_exists().await {
            return 0;
        }
        let sql = format!(
            "SELECT count(*) FROM {} WHERE action = 'downgrade'",
            self.audit_table()
        );
        sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    async fn downgrades(&self) -> Result<Vec<AuditDowngrade>> {
        if !self.audit_exists().await {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id, sweep_id::text, at, session_key, coalesce(object_name, ''), \
                    coalesce(backend, ''), old_state, new_state, old_updated_at, new_updated_at, \
                    cleared, evidence \
             FROM {} WHERE action = 'downgrade' ORDER BY id",
            self.audit_table()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .context("reading the audit table")?;
        rows.iter()
            .map(|r| {
                Ok(AuditDowngrade {
                    id: r.try_get(0)?,
                    sweep_id: r.try_get(1)?,
                    at: r.try_get(2)?,
                    session_key: r.try_get(3)?,
                    object: r.try_get(4)?,
                    backend: r.try_get(5)?,
                    old_state: r.try_get(6)?,
                    new_state: r.try_get(7)?,
                    old_updated_at: r.try_get(8)?,
                    new_updated_at: r.try_get(9)?,
                    cleared: r.try_get(10)?,
                    evidence: r.try_get(11)?,
                })
            })
            .collect()
    }

    /// Every audit record's scope.
    async fn audit_scopes(&self) -> Result<Vec<AuditScope>> {
        if !self.audit_exists().await {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id, action, session_key, session_scope FROM {} ORDER BY id",
            self.audit_table()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .context("reading the audit table's scopes")?;
        rows.iter()
            .map(|r| {
                Ok(AuditScope {
                    id: r.try_get(0)?,
                    action: r.try_get(1)?,
                    session_key: r.try_get(2)?,
                    scope: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// The rows as they are now, by key; only those of `scope` in a shared table.
    async fn final_rows(&self, scope: Option<&str>) -> Result<HashMap<String, Version>> {
        let filter = match scope {
            Some(scope) => format!(" WHERE {SCOPE_COLUMN} = '{scope}'"),
            None => String::new(),
        };
        let sql = format!(
            "SELECT thread_key, state, sandbox_id, updated_at, agent_thread_id FROM {}{filter}",
            self.table()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .context("reading the session table")?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0)?,
                    Version {
                        state: r.try_get(1)?,
                        object: r.try_get(2)?,
                        updated_at: r.try_get(3)?,
                        agent_thread_id: r.try_get(4)?,
                    },
                ))
            })
            .collect()
    }

    async fn drop_schema(&self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&self.pool).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The oracle

fn judge(
    st: &SimState,
    audits: &[AuditDowngrade],
    rows: &HashMap<String, Version>,
    clock: &ClockOffset,
    report: &mut SoakReport,
) {
    report.downgrades = audits.len() as u64;
    for d in audits {
        *report
            .downgrades_by_backend
            .entry(d.backend.clone())
            .or_default() += 1;
    }
    let mut by_key: HashMap<&str, Vec<&AuditDowngrade>> = HashMap::new();
    for d in audits {
        by_key.entry(d.session_key.as_str()).or_default().push(d);
    }
    let mut races: BTreeMap<String, u64> = BTreeMap::new();

    // Each downgrade on its own: was it right at the moment it was made?
    for d in audits {
        let writes = st
            .writes
            .get(d.session_key.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let life = st.objects.get(&d.object);
        let kind = life.map_or("unknown".to_string(), |l| {
            format!("{:?}", l.kind).to_lowercase()
        });
        *report.downgrades_by_object_kind.entry(kind).or_default() += 1;
        let listing_started_at = d.evidence["listing_started_at"]
            .as_str()
            .and_then(|s| s.parse::<DateTime<Utc>>().ok());
        let grace = d.evidence["grace_period_seconds"].as_i64();
        let mut reasons = Vec::new();

        if d.old_state != "suspended" || d.new_state != "gone" {
            reasons.push(format!(
                "changed state {} -> {}, not suspended -> gone",
                d.old_state, d.new_state
            ));
        }
        let version = writes
            .iter()
            .position(|w| Some(w.new.updated_at) == d.old_updated_at && w.new.object == d.object);
        match version {
            None => reasons.push(format!(
                "the application never wrote the version it overwrote (object {}, updated_at {:?})",
                d.object, d.old_updated_at
            )),
            Some(i) => {
                let v = &writes[i];
                if v.new.state != "suspended" {
                    reasons.push(format!(
                        "the version it overwrote was {} (written by {}), not suspended",
                        v.new.state, v.op
                    ));
                }
                if let Some(newer) = writes[i + 1..]
                    .iter()
                    .find(|w| clock.latest_db(w.committed) <= d.at)
                {
                    reasons.push(format!(
                        "the application had committed a newer version before the downgrade's transaction began: {} wrote {} (COMMIT returned {}, downgrade at {})",
                        newer.op,
                        newer.new.show(),
                        newer.committed.format("%H:%M:%S%.6f"),
                        d.at.format("%H:%M:%S%.6f")
                    ));
                }
                let cleared = d.cleared["agent_thread_id"].as_str();
                if cleared != v.new.agent_thread_id.as_deref() {
                    report.row_problems.push(format!(
                        "audit #{} of {}: cleared agent_thread_id {:?}, but the row held {:?}",
                        d.id, d.session_key, cleared, v.new.agent_thread_id
                    ));
                    report.rows_inconsistent += 1;
                }
            }
        }
        match life {
            None => reasons.push(format!(
                "object {} was never created by the simulator",
                d.object
            )),
            Some(life) => {
                if life.existed_at_db(d.at, clock) {
                    reasons.push(format!(
                        "the object existed when the downgrade's transaction began ({})",
                        life.show(&d.object)
                    ));
                } else if let Some(start) = listing_started_at {
                    if life.existed_at_local(start) {
                        *races
                            .entry("object_removed_during_the_sweep".into())
                            .or_default() += 1;
                    }
                }
            }
        }
        match (listing_started_at, grace, d.old_updated_at) {
            (Some(start), Some(grace), Some(old)) => {
                // `start` is the daemon's clock (this host's), `old` the database's.
                if old > clock.latest_db(start) - chrono::Duration::seconds(grace) {
                    reasons.push(format!(
                        "the row was within the grace period: updated_at {old}, listing started {start}, grace {grace}s"
                    ));
                }
                if clock.earliest_db(start) > d.at {
                    reasons.push(format!(
                        "the listing started ({start}) after the downgrade's transaction ({})",
                        d.at
                    ));
                }
            }
            _ => reasons.push(format!(
                "the audit record lacks listing_started_at / grace_period_seconds / old_updated_at: evidence {}",
                d.evidence
            )),
        }
        if !reasons.is_empty() {
            report.wrong.push(WrongDowngrade {
                audit_id: d.id,
                sweep_id: d.sweep_id.clone(),
                session_key: d.session_key.clone(),
                object: d.object.clone(),
                at: d.at,
                listing_started_at,
                old_updated_at: d.old_updated_at,
                reasons,
                evidence: d.evidence.clone(),
                object_life: life.map_or("unknown".into(), |l| l.show(&d.object)),
                row_history: writes
                    .iter()
                    .map(|w| {
                        format!(
                            "{} -> {} (started {}, committed {})",
                            w.op,
                            w.new.show(),
                            w.started.format("%H:%M:%S%.6f"),
                            w.committed.format("%H:%M:%S%.6f")
                        )
                    })
                    .collect(),
            });
        }
    }
    report.wrong_downgrades = report.wrong.len() as u64;

    // One writer: the apply transactions of two sweeps never interleave. (A necessary
    // condition only — sweeps that wrote nothing leave no trace here.)
    struct Span<'a> {
        sweep: &'a str,
        first: DateTime<Utc>,
        last: DateTime<Utc>,
    }
    let mut spans: BTreeMap<&str, Span> = BTreeMap::new();
    for d in audits {
        let span = spans.entry(d.sweep_id.as_str()).or_insert(Span {
            sweep: d.sweep_id.as_str(),
            first: d.at,
            last: d.at,
        });
        span.first = span.first.min(d.at);
        span.last = span.last.max(d.at);
    }
    let mut spans: Vec<Span> = spans.into_values().collect();
    spans.sort_by_key(|s| s.first);
    let mut writing: Option<&Span> = None;
    for span in &spans {
        if let Some(w) = writing {
            if span.first < w.last {
                report.problems.push(format!(
                    "one writer violated: sweep {} wrote at {} while sweep {} was still writing (until {})",
                    span.sweep, span.first, w.sweep, w.last
                ));
            }
        }
        if writing.is_none_or(|w| span.last > w.last) {
            writing = Some(span);
        }
    }
    races.insert("sweeps_that_downgraded".into(), spans.len() as u64);

    // Each row's history: one chain of versions ending in the row as it is now.
    report.sessions_created = st.writes.len() as u64;
    report.rows_in_table = rows.len() as u64;
    for v in rows.values() {
        *report.final_states.entry(v.state.clone()).or_default() += 1;
    }
    let mut keys: Vec<&String> = st.writes.keys().collect();
    keys.sort();
    for key in keys {
        let writes = &st.writes[key];
        let Some(row) = rows.get(key.as_str()) else {
            report.rows_lost += 1;
            report.row_problems.push(format!(
                "{key}: created by the application, missing from the table"
            ));
            continue;
        };
        if st.uncertain.contains(key.as_str()) {
            report.row_problems.push(format!(
                "{key}: an application COMMIT failed; history not checked"
            ));
            continue;
        }
        let downgrades = by_key.get(key.as_str()).cloned().unwrap_or_default();
        let mut used = vec![false; downgrades.len()];
        let mut problems = Vec::new();
        // The downgrade that took `from` to `to`, if any, not matched yet.
        let take = |from: &Version, to: &Version, used: &mut Vec<bool>| -> bool {
            let found = downgrades.iter().enumerate().position(|(j, d)| {
                !used[j]
                    && d.old_updated_at == Some(from.updated_at)
                    && d.object == from.object
                    && d.new_updated_at == Some(to.updated_at)
                    && to.state == "gone"
                    && to.object == from.object
                    && to.agent_thread_id.is_none()
            });
            if let Some(j) = found {
                used[j] = true;
            }
            found.is_some()
        };
        for i in 1..writes.len() {
            let before = &writes[i - 1].new;
            let Some(prev) = &writes[i].prev else {
                problems.push(format!(
                    "write #{i} ({}) has no previous version",
                    writes[i].op
                ));
                continue;
            };
            if prev == before {
                continue;
            }
            if take(before, prev, &mut used) {
                // Respawning a gone session is the normal flow; acting on a row read as
                // suspended that the reconciler downgraded meanwhile is the race.
                let race = if writes[i].seen_state.as_deref() == Some("gone") {
                    "app_respawned_a_downgraded_session"
                } else {
                    "app_overwrote_a_downgrade_it_had_not_seen"
                };
                *races.entry(race.into()).or_default() += 1;
                continue;
            }
            problems.push(format!(
                "write #{i} ({}) overwrote {}, but the previous version was {}",
                writes[i].op,
                prev.show(),
                before.show()
            ));
        }
        if let Some(last) = writes.last() {
            if *row != last.new && !take(&last.new, row, &mut used) {
                problems.push(format!(
                    "the row is {}, but the last version written was {} ({})",
                    row.show(),
                    last.new.show(),
                    last.op
                ));
            }
        }
        for (j, d) in downgrades.iter().enumerate() {
            if !used[j] {
                problems.push(format!(
                    "downgrade audit #{} (from updated_at {:?} to {:?}) is not part of the row's history",
                    d.id, d.old_updated_at, d.new_updated_at
                ));
            }
        }
        if !problems.is_empty() {
            report.rows_inconsistent += 1;
            for p in problems {
                report.row_problems.push(format!("{key}: {p}"));
            }
        }
    }
    for key in rows.keys() {
        if !st.writes.contains_key(key) {
            report.rows_inconsistent += 1;
            report.row_problems.push(format!(
                "{key}: in the table, never written by the application"
            ));
        }
    }
    let slow = st
        .writes
        .values()
        .flatten()
        .filter(|w| w.committed - w.new.updated_at > chrono::Duration::milliseconds(200))
        .count() as u64;
    races.insert("app_versions_committed_200ms_after_updated_at".into(), slow);
    report.races = races;
}

/// Every downgrade in the audit table should have been reported by the process that made it
/// (rule 9: a sweep's report is what operators see). A commit whose acknowledgement was lost
/// (connection killed during COMMIT) or a process killed right after it explains a few; they
/// are listed, not counted as failures (the audit record, which the oracle judges, exists).
fn account_for_downgrades(audits: &[AuditDowngrade], logs: &LogFacts, report: &mut SoakReport) {
    let mut unlogged: BTreeMap<&str, u64> = BTreeMap::new();
    for d in audits {
        if !logs
            .downgraded
            .contains(&(d.sweep_id.clone(), d.session_key.clone()))
        {
            *unlogged.entry(d.sweep_id.as_str()).or_default() += 1;
        }
    }
    for (sweep, n) in unlogged {
        report.downgrades_not_reported += n;
        let outcome = match (logs.failed.get(sweep), logs.finished.contains(sweep)) {
            (Some(error), _) => format!(
                "SUSPICIOUS: sweep {sweep} logged \"sweep failed; nothing partial was written\" ({error}), yet {n} of its downgrade(s) are committed in the audit table"
            ),
            (None, true) => format!("sweep {sweep} finished but did not log {n} of its downgrade(s)"),
            (None, false) => format!(
                "sweep {sweep} logged no outcome ({n} downgrade(s) committed; its process was killed or its log lost)"
            ),
        };
        report.unreported_downgrades.push(outcome);
    }
}

/// Backends-without-prefixes variant: no configured prefix tells a pod's name from a
/// Sandbox's, so the reconciler must attribute every downgrade to `unknown`, never silently to
/// one of the backends.
fn check_attribution_without_prefixes(audits: &[AuditDowngrade], report: &mut SoakReport) {
    for d in audits {
        if d.backend != "unknown" {
            report.downgrades_misattributed += 1;
            report.attribution_problems.push(format!(
                "audit #{} of {} (object {}) says backend {:?}; with no distinguishing prefix it must be \"unknown\"",
                d.id, d.session_key, d.object, d.backend
            ));
        }
    }
}

/// Shared-table variant: every audit record, of any action, belongs to the daemons' scope.
fn check_audit_scope(audit: &[AuditScope], own_scope: &str, o: &mut OtherScopeReport) {
    for a in audit {
        let label = a.scope.clone().unwrap_or_else(|| "NULL".to_string());
        *o.audit_records_by_scope.entry(label).or_default() += 1;
        if a.scope.as_deref() != Some(own_scope) {
            o.audit_records_outside_scope += 1;
            o.problems.push(format!(
                "audit #{} ({} of {}) has session_scope {:?}, not {own_scope:?}",
                a.id, a.action, a.session_key, a.scope
            ));
        }
    }
}

/// Shared-table variant: the other scope's rows change only by its own application. Its
/// application writes each row under a row lock and records the version it overwrote, so
/// every version it found must be the one it wrote last, and each row must end as it left
/// it; a row it never wrote, or a missing one, fails too.
fn check_other_scope_untouched(
    ost: &SimState,
    rows: &HashMap<String, Version>,
    o: &mut OtherScopeReport,
) {
    o.rows_created = ost.writes.len() as u64;
    o.rows_in_table = rows.len() as u64;
    o.writes = ost.writes.values().map(|w| w.len() as u64).sum();
    o.operations = ost.ops.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    o.app_errors = ost.errors.len() as u64;
    for e in ost.errors.iter().take(5) {
        o.problems
            .push(format!("application error (not a failure): {e}"));
    }
    for v in rows.values() {
        *o.final_states.entry(v.state.clone()).or_default() += 1;
    }
    let mut keys: Vec<&String> = ost.writes.keys().collect();
    keys.sort();
    for key in keys {
        let writes = &ost.writes[key];
        let Some(row) = rows.get(key.as_str()) else {
            o.rows_lost += 1;
            o.problems.push(format!(
                "{key}: written by the other scope's application, missing from the table"
            ));
            continue;
        };
        if ost.uncertain.contains(key.as_str()) {
            o.problems.push(format!(
                "{key}: an application COMMIT failed; history not checked"
            ));
            continue;
        }
        let mut changed = Vec::new();
        for i in 1..writes.len() {
            let before = &writes[i - 1].new;
            if writes[i].prev.as_ref() != Some(before) {
                changed.push(format!(
                    "write #{i} ({}) found {}, but its application had left {}",
                    writes[i].op,
                    writes[i]
                        .prev
                        .as_ref()
                        .map_or("nothing".into(), Version::show),
                    before.show()
                ));
            }
        }
        if let Some(last) = writes.last() {
            if *row != last.new {
                changed.push(format!(
                    "the row is {}, but its application left {} ({})",
                    row.show(),
                    last.new.show(),
                    last.op
                ));
            }
        }
        if !changed.is_empty() {
            o.rows_changed += 1;
            for c in changed {
                o.problems.push(format!("{key}: {c}"));
            }
        }
    }
    for key in rows.keys() {
        if !ost.writes.contains_key(key) {
            o.rows_changed += 1;
            o.problems.push(format!(
                "{key}: in the other scope, never written by its application"
            ));
        }
    }
}

/// Shared-table variant: evidence that the other scope's rows were a real temptation, not a
/// check that passes because nothing could go wrong. Counts the daemons' downgrades at whose
/// moment the other scope had a row under the same key (and a suspended one naming the same
/// object: exactly what a key-only UPDATE would have changed too), and the other scope's rows
/// that look like orphans at the end.
fn other_scope_exposure(
    st: &SimState,
    ost: &SimState,
    other_rows: &HashMap<String, Version>,
    audits: &[AuditDowngrade],
    clock: &ClockOffset,
    grace: chrono::Duration,
    o: &mut OtherScopeReport,
) {
    for d in audits {
        let Some(writes) = ost.writes.get(&d.session_key) else {
            continue;
        };
        // The other row's version at d.at: the last one certainly committed before it.
        let Some(twin) = writes
            .iter()
            .rev()
            .find(|w| clock.latest_db(w.committed) <= d.at)
        else {
            continue;
        };
        o.downgrades_with_a_twin += 1;
        if twin.new.state == "suspended" && twin.new.object == d.object {
            o.downgrades_with_a_suspended_twin += 1;
        }
    }
    let aged = clock.earliest_db(Utc::now()) - grace;
    o.orphan_lookalikes_at_end = other_rows
        .values()
        .filter(|v| v.state == "suspended" && v.updated_at < aged)
        .filter(|v| {
            st.objects
                .get(&v.object)
                .is_none_or(|l| l.removed_before.is_some())
        })
        .count() as u64;
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

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A raw HTTP/1.0 GET; returns (status, body).
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .ok()
        .flatten()
}

/// Sums a counter over expositions, by one label's value.
fn sum_by_label(expositions: &[String], metric: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let needle = format!("{label}=\"");
    for text in expositions {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(metric) else {
                continue;
            };
            let Some(rest) = rest.strip_prefix('{') else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let Some(v) = labels
                .split_once(&needle)
                .and_then(|(_, after)| after.split_once('"'))
                .map(|(v, _)| v)
            else {
                continue;
            };
            let n = value.trim().parse::<f64>().unwrap_or(0.0);
            *out.entry(v.to_string()).or_default() += n as u64;
        }
    }
    out
}

fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(s, rest)| {
        rest.split_once('@')
            .map(|(userinfo, host)| (s, userinfo, host))
    }) {
        Some((scheme, userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:****@{host}")
        }
        _ => url.to_string(),
    }
}

/// The port of a PostgreSQL URL (5432 when not given).
fn pg_port(url: &str) -> Result<u16> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("parsing {}", redact(url)))?;
    Ok(options.get_port())
}
