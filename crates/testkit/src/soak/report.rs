//! What a run saw, and whether it passed: the report printed as text and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::KEEP;

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
    pub(crate) fn failures(&self) -> Vec<String> {
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
            f.push("no downgrade happened: the soak proves nothing".to_string());
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
