//! `sandbox-reconciler explain --session KEY`: why a sweep would (or would not) change one
//! session, step by step in the sweep's own order, without a database login.
//!
//! Explain runs exactly the read, list and plan phases of a one-off dry-run sweep
//! (`--once --dry-run`): the scope checks, the database clock, every row read in one READ ONLY
//! transaction, then one complete listing of every backend (rule 2(b)), then the planner over
//! the whole table, so the guards' verdict and the cap's order are the sweep's. The row's own
//! decision is [`plan::decide`], the function [`plan::Planner::observe`] counts: explain prints
//! its verdict, it does not decide again. On top it looks the row's object up with a GET in
//! every enabled backend and namespace (rule 2(a), shown as evidence, not used to decide) and
//! reads the key's last audit records.
//!
//! Read-only: no writer lock, no migration, no DDL, no write; the reads run in READ ONLY
//! transactions. It works beside a running daemon. A missing audit table is reported, not
//! created.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::cluster::{
    dump, ClusterError, ClusterSnapshot, LookupAnswer, ObjectLookup, ScopeVerdict,
};
use crate::history::{self, AuditRecord, HistoryFilter};
use crate::plan::{
    self, GuardVerdict, Planner, ReadRows, RefusalReason, RowOutcome, RowVerdict, SessionRow,
};
use crate::store::{self, StoreError};
use crate::sweep::{ClusterSource, Reconciler};

/// How many of the key's audit records are shown.
pub const AUDIT_RECORDS: i64 = 10;

/// Why explain could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl ExplainError {
    /// A configuration error (exit 2), not a failure of the database or the API (exit 1).
    pub fn is_configuration(&self) -> bool {
        match self {
            ExplainError::Store(e) => e.is_configuration(),
            ExplainError::Cluster(e) => e.is_configuration(),
        }
    }
}

/// The row as read.
#[derive(Debug, Clone, Serialize)]
pub struct RowAsRead {
    pub state: Option<String>,
    pub object: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Age against the database clock, in seconds.
    pub age_seconds: Option<i64>,
}

/// One step of the trace.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: &'static str,
    pub answer: String,
}

/// Everything explain found out about one session.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub session: String,
    pub table: String,
    /// The database clock read before the rows (the grace period's reference).
    pub database_clock: DateTime<Utc>,
    pub grace_period_seconds: u64,
    /// Rows updated after this are within the grace period.
    pub cutoff: DateTime<Utc>,
    pub cluster_uid: Option<String>,
    /// `None`: no row with this key (in this scope) exists.
    pub row: Option<RowAsRead>,
    /// The per-row decision (`None` when the row does not exist).
    pub verdict: Option<RowVerdict>,
    /// The whole table's guard verdict, a refusal of the scope checks included.
    pub guard: GuardVerdict,
    /// The orphans found and the cap, and this row's place among them (orphans only).
    pub orphans_found: u64,
    pub cap: usize,
    pub cap_position: Option<u64>,
    /// What a sweep would do now (`None` when the row does not exist).
    pub outcome: Option<RowOutcome>,
    /// The GETs of the row's object in every enabled backend and namespace.
    pub lookups: Vec<ObjectLookup>,
    pub audit_table_exists: bool,
    /// The key's last audit records, newest first.
    pub audit: Vec<AuditRecord>,
    /// The trace, in the sweep's order.
    pub steps: Vec<Step>,
    /// One sentence: what would happen and why.
    pub summary: String,
}

/// The trace as it is written, step by step.
#[derive(Default)]
struct Trace(Vec<Step>);

impl Trace {
    fn step(&mut self, step: &'static str, answer: String) {
        self.0.push(Step { step, answer });
    }
}

/// What the scope check found: the cluster's identity and the refusal, if any.
#[derive(Default)]
struct Scope {
    cluster_uid: Option<String>,
    refusal: Option<(RefusalReason, String)>,
}

/// The whole table's plan and this row's place in it.
struct RowPlan {
    verdict: Option<RowVerdict>,
    plan: plan::Plan,
    position: Option<u64>,
    outcome: Option<RowOutcome>,
}

/// Explains what a one-off sweep would do with the row `key` now.
pub async fn run(reconciler: &Reconciler, key: &str) -> Result<Explanation, ExplainError> {
    let settings = &reconciler.settings;
    let mut conn = reconciler.database.connect().await?;
    // Resolve through the catalog only: no migration.
    let mapping = reconciler.prepare(&mut conn, false).await?;
    let policy = reconciler.policy(None);
    let mut trace = Trace::default();

    // 1. Scope (rule 10), as the sweep checks it before anything else.
    let scope = check_scope(reconciler, &mut trace).await?;
    // 2. The clock, then the rows, then one complete listing (rule 2(b)).
    let clock = store::database_now(&mut conn, &mapping).await?;
    let mut rows = ReadRows::default();
    store::read_rows(&mut conn, &mapping, &mut rows).await?;
    let snapshot = list(reconciler, clock, &scope).await?;
    let cutoff = snapshot.database_clock - policy.grace_period;
    trace_view(&mut trace, settings, &rows, &snapshot, (clock, cutoff));
    // 3. The plan of the whole table, exactly as the sweep plans it.
    let mine: Option<SessionRow> = match rows.rows().iter().find(|r| r.key == key) {
        Some(r) => Some(r.clone()),
        // Gone rows are only counted by the sweep; read this one for the trace.
        None => store::read_row(&mut conn, &mapping, key).await?,
    };
    let planned = plan_row(&snapshot, &policy, &rows, mine.as_ref(), &scope);
    // 4. The row's own trace.
    match (&mine, &planned.verdict) {
        (Some(r), Some(v)) => trace_row(&mut |s, a| trace.step(s, a), r, v, &policy, clock),
        _ => trace.step(
            "row",
            format!("no row with key {key:?} in {}", mapping.table_display()),
        ),
    }
    trace_guard_and_cap(&mut trace, &planned, policy.max_downgrades);
    // 5. The GETs of rule 2(a), as extra evidence.
    let lookups = look_up(reconciler, mine.as_ref()).await;
    for l in &lookups {
        trace.step("get", lookup_text(l));
    }
    // 6. The audit records of the key.
    let filter = HistoryFilter {
        session: Some(key.to_string()),
        limit: AUDIT_RECORDS,
        ..HistoryFilter::default()
    };
    let audit = history::read(&mut conn, &mapping, &filter).await?;
    trace_audit(&mut trace, &audit);
    let gone = mine.as_ref().and_then(|r| r.state.as_deref()) == Some(policy.gone_state.as_str());
    let summary = summarise(key, &planned, &audit.records, gone);
    trace.step("outcome", summary.clone());
    Ok(Explanation {
        session: key.to_string(),
        table: mapping.table_display(),
        database_clock: clock,
        grace_period_seconds: settings.sweep.grace_period.as_secs(),
        cutoff,
        cluster_uid: scope.cluster_uid,
        row: mine.as_ref().map(|r| RowAsRead {
            state: r.state.clone(),
            object: r.object.clone(),
            updated_at: r.updated_at,
            age_seconds: r.updated_at.map(|u| (clock - u).num_seconds()),
        }),
        verdict: planned.verdict,
        guard: planned.plan.guard.clone(),
        orphans_found: planned.plan.orphans_found,
        cap: policy.max_downgrades,
        cap_position: planned.position,
        outcome: planned.outcome,
        lookups,
        audit_table_exists: audit.audit_table_exists,
        audit: audit.records,
        steps: trace.0,
        summary,
    })
}

/// The scope checks of rule 10, as the sweep runs them (a snapshot file has none).
async fn check_scope(reconciler: &Reconciler, trace: &mut Trace) -> Result<Scope, ExplainError> {
    let cluster = match &reconciler.source {
        ClusterSource::Api(cluster) => cluster,
        ClusterSource::Dump(path) => {
            trace.step(
                "scope",
                format!("cluster snapshot file {} (no scope check)", path.display()),
            );
            return Ok(Scope::default());
        }
    };
    let expected = reconciler.settings.cluster.expected_uid;
    Ok(match cluster.verify_scope(expected).await? {
        ScopeVerdict::Proceed { cluster_uid } => {
            trace.step(
                "scope",
                format!("cluster {cluster_uid}; every configured namespace exists"),
            );
            Scope {
                cluster_uid: Some(cluster_uid),
                refusal: None,
            }
        }
        ScopeVerdict::Refuse {
            reason,
            detail,
            cluster_uid,
        } => {
            trace.step("scope", format!("REFUSED ({}): {detail}", reason.as_str()));
            Scope {
                cluster_uid: Some(cluster_uid),
                refusal: Some((reason, detail)),
            }
        }
    })
}

/// One complete listing of every backend (or the snapshot file), stamped with the clock.
async fn list(
    reconciler: &Reconciler,
    clock: DateTime<Utc>,
    scope: &Scope,
) -> Result<ClusterSnapshot, ExplainError> {
    let mut snapshot = match &reconciler.source {
        ClusterSource::Api(cluster) => {
            let mut s = cluster.snapshot().await?;
            s.database_clock = clock;
            s.cluster_uid = scope.cluster_uid.clone();
            s
        }
        ClusterSource::Dump(path) => dump::load(path, &reconciler.settings)?,
    };
    if snapshot.cluster_uid.is_none() {
        snapshot.cluster_uid = scope.cluster_uid.clone();
    }
    Ok(snapshot)
}

/// The clock and view steps.
fn trace_view(
    trace: &mut Trace,
    settings: &crate::config::Settings,
    rows: &ReadRows,
    snapshot: &ClusterSnapshot,
    (clock, cutoff): (DateTime<Utc>, DateTime<Utc>),
) {
    trace.step(
        "clock",
        format!(
            "database clock {}; grace period {}s, so rows updated after {} are left alone",
            clock.to_rfc3339(),
            settings.sweep.grace_period.as_secs(),
            cutoff.to_rfc3339()
        ),
    );
    let listed: Vec<String> = snapshot
        .backends
        .iter()
        .map(|b| format!("{} {} objects", b.kind, b.len()))
        .collect();
    trace.step(
        "view",
        format!(
            "{} rows read (outside the gone state), then a complete listing: {}",
            rows.len(),
            listed.join(", ")
        ),
    );
}

/// Plans the whole table as the sweep does and places `mine` in it: its verdict, its
/// position in the cap's order (orphans only) and what a sweep would do with it.
fn plan_row(
    snapshot: &ClusterSnapshot,
    policy: &plan::Policy,
    rows: &ReadRows,
    mine: Option<&SessionRow>,
    scope: &Scope,
) -> RowPlan {
    let mut planner = Planner::new(snapshot, policy);
    rows.replay(&mut planner);
    let verdict = mine.map(|r| planner.verdict(r));
    let position = match (&verdict, mine) {
        (Some(RowVerdict::Orphan { updated_at, .. }), Some(row)) => {
            let orphans: Vec<(DateTime<Utc>, String)> = rows
                .rows()
                .iter()
                .filter_map(|r| match planner.verdict(r) {
                    RowVerdict::Orphan { updated_at, .. } => Some((updated_at, r.key.clone())),
                    _ => None,
                })
                .collect();
            Some(plan::orphan_position(
                *updated_at,
                &row.key,
                orphans.iter().map(|(u, k)| (*u, k.as_str())),
            ))
        }
        _ => None,
    };
    let mut plan = planner.finish();
    if let Some((reason, detail)) = &scope.refusal {
        // The sweep stops at the scope check: nothing is planned.
        plan.guard = GuardVerdict::Refuse {
            reason: *reason,
            detail: detail.clone(),
        };
        plan.downgrades.clear();
    }
    let outcome = verdict.as_ref().zip(mine).map(|(v, row)| {
        plan::outcome(
            &plan,
            v,
            &row.key,
            position.unwrap_or(0),
            policy.max_downgrades,
        )
    });
    RowPlan {
        verdict,
        plan,
        position,
        outcome,
    }
}

/// The guard and cap steps, for a row that exists.
fn trace_guard_and_cap(trace: &mut Trace, planned: &RowPlan, cap: usize) {
    if planned.verdict.is_none() {
        return;
    }
    trace.step("guard", guard_text(&planned.plan.guard));
    let found = planned.plan.orphans_found;
    trace.step(
        "cap",
        match planned.position {
            Some(p) => format!(
                "orphan {p} of {found} in the cap's order (oldest updated_at first); the cap takes {cap} per sweep"
            ),
            None => format!(
                "not an orphan; {found} orphans in the table, the cap takes {cap} per sweep"
            ),
        },
    );
}

/// The GETs of the row's object in every enabled backend and namespace.
async fn look_up(reconciler: &Reconciler, mine: Option<&SessionRow>) -> Vec<ObjectLookup> {
    let name = mine
        .and_then(|r| r.object.as_deref())
        .filter(|n| plan::is_valid_object_name(n));
    match (&reconciler.source, name) {
        (ClusterSource::Api(cluster), Some(name)) => cluster.lookup(name).await,
        _ => Vec::new(),
    }
}

/// The audit step.
fn trace_audit(trace: &mut Trace, audit: &history::History) {
    let answer = if !audit.audit_table_exists {
        format!(
            "the audit table {} does not exist: no sweep has written yet",
            audit.audit_table
        )
    } else if audit.records.is_empty() {
        "no audit records for this key".into()
    } else {
        format!("{} record(s), newest first (below)", audit.records.len())
    };
    trace.step("audit", answer);
}

/// One sentence: what a sweep would do now and why, and how to undo a past downgrade.
fn summarise(key: &str, planned: &RowPlan, records: &[AuditRecord], gone: bool) -> String {
    let mut text = match (&planned.outcome, &planned.verdict) {
        (Some(o), Some(v)) => outcome_sentence(o, v, &planned.plan.guard),
        _ => missing_sentence(key, records),
    };
    if let Some(last) = records.first().filter(|r| gone && r.action == "downgrade") {
        let _ = write!(
            text,
            "; downgraded at {} by sweep {}: `undo --session {key}` restores it",
            last.at
                .map(|a| a.to_rfc3339())
                .unwrap_or_else(|| "?".into()),
            last.sweep_id.as_deref().unwrap_or("?")
        );
    }
    text
}

/// The row's steps: state, object per backend, attribution, grace.
fn trace_row(
    step: &mut impl FnMut(&'static str, String),
    row: &SessionRow,
    verdict: &RowVerdict,
    policy: &plan::Policy,
    clock: DateTime<Utc>,
) {
    let state = row.state.as_deref().unwrap_or("NULL");
    let class = if row.state.as_deref() == Some(policy.suspended_state.as_str()) {
        "suspended: a candidate if its object is gone"
    } else if policy
        .live_states
        .iter()
        .any(|s| Some(s.as_str()) == row.state.as_deref())
    {
        "live: must have an object (counted by the guards), never downgraded"
    } else if row.state.as_deref() == Some(policy.gone_state.as_str()) {
        "gone: only counted"
    } else if policy
        .other_states
        .iter()
        .any(|s| Some(s.as_str()) == row.state.as_deref())
    {
        "another known state: never downgraded"
    } else {
        "not a state the configuration names: skipped"
    };
    step("state", format!("{state} ({class})"));
    let object = row.object.as_deref().unwrap_or("NULL");
    let age = row
        .updated_at
        .map(|u| format!("{}s ago", (clock - u).num_seconds()))
        .unwrap_or_else(|| "NULL".into());
    step(
        "row",
        format!(
            "object {object}, updated_at {} ({age})",
            row.updated_at
                .map(|u| u.to_rfc3339())
                .unwrap_or_else(|| "NULL".into())
        ),
    );
    let answer = match verdict {
        RowVerdict::Skipped { reason, .. } => format!("skipped: {}", reason.as_str()),
        RowVerdict::OtherState { .. } => "not matched against the cluster".into(),
        RowVerdict::Protected {
            backend,
            paused,
            terminating,
            ..
        } => format!(
            "found in the {backend} listing{}{}: the object exists, the row is kept",
            if *paused { " (paused on purpose)" } else { "" },
            if *terminating {
                " (terminating: not absent yet)"
            } else {
                ""
            }
        ),
        RowVerdict::LiveWithoutObject { backend } => format!(
            "absent from every backend's listing; attributed to {backend}; a live row without object is never downgraded, it counts against the guards"
        ),
        RowVerdict::WithinGrace {
            backend,
            updated_at,
            cutoff,
        } => format!(
            "absent from every backend's listing; attributed to {backend}; but updated at {} after the cutoff {}: within the grace period, left alone",
            updated_at.to_rfc3339(),
            cutoff.to_rfc3339()
        ),
        RowVerdict::Orphan { backend, .. } => format!(
            "absent from every backend's listing (complete, started after the rows were read); attributed to {backend}; older than the grace period: an orphan"
        ),
    };
    step("object", answer);
}

fn guard_text(guard: &GuardVerdict) -> String {
    match guard {
        GuardVerdict::Proceed => "proceed: no guard refuses".into(),
        GuardVerdict::Refuse { reason, detail } => {
            format!("REFUSED ({}): {detail}", reason.as_str())
        }
    }
}

fn lookup_text(l: &ObjectLookup) -> String {
    let answer = match &l.answer {
        LookupAnswer::Found {
            paused,
            terminating,
            ..
        } => format!(
            "found{}{}",
            if *paused { ", paused" } else { "" },
            if *terminating { ", terminating" } else { "" }
        ),
        LookupAnswer::Absent => "absent (404 NotFound)".into(),
        LookupAnswer::Error { message } => format!("error: {message}"),
    };
    format!("{} ({}): {answer}", l.request, l.backend)
}

fn outcome_sentence(outcome: &RowOutcome, verdict: &RowVerdict, guard: &GuardVerdict) -> String {
    match outcome {
        RowOutcome::Downgrade => "would downgrade now: an orphan within the cap, no guard refuses".into(),
        RowOutcome::Deferred { position, cap } => format!(
            "deferred by the cap: orphan {position} in the cap's order, the cap takes {cap} per sweep; a later sweep downgrades it"
        ),
        RowOutcome::Refused { reason } => format!(
            "kept: an orphan, but the guard {} refuses the whole sweep ({})",
            reason.as_str(),
            match guard {
                GuardVerdict::Refuse { detail, .. } => detail.as_str(),
                GuardVerdict::Proceed => "",
            }
        ),
        RowOutcome::Kept => format!("kept: {}", kept_reason(verdict)),
    }
}

/// Why a row that is not an orphan is kept, in a few words.
pub fn kept_reason(verdict: &RowVerdict) -> String {
    match verdict {
        RowVerdict::Skipped { reason, .. } => format!("skipped ({})", reason.as_str()),
        RowVerdict::OtherState { .. } => "not in the suspended state".into(),
        RowVerdict::Protected {
            backend,
            paused: true,
            ..
        } => format!("its object exists in {backend} (paused)"),
        RowVerdict::Protected {
            backend,
            terminating: true,
            ..
        } => format!("its object exists in {backend} (terminating)"),
        RowVerdict::Protected { backend, .. } => format!("its object exists in {backend}"),
        RowVerdict::LiveWithoutObject { .. } => "a live row without object".into(),
        RowVerdict::WithinGrace { .. } => "within the grace period".into(),
        RowVerdict::Orphan { .. } => "an orphan".into(),
    }
}

fn missing_sentence(key: &str, audit: &[AuditRecord]) -> String {
    let last = audit.iter().find(|r| r.action == "downgrade");
    match last {
        Some(r) => format!(
            "the row is gone; last downgraded at {}{}",
            r.at.map(|a| a.to_rfc3339()).unwrap_or_else(|| "?".into()),
            if r.row_image {
                format!("; `undo --session {key}` can restore it from its row image")
            } else {
                "; its audit record has no row image (written by an older release): restore it by hand from the audit record".into()
            }
        ),
        None => "no such row, and no audit record of it".into(),
    }
}

/// The explanation as text: the trace, then the audit records.
pub fn text(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "session {} in {}", e.session, e.table);
    let width = e.steps.iter().map(|s| s.step.len()).max().unwrap_or(0);
    for (i, s) in e.steps.iter().enumerate() {
        let _ = writeln!(out, "  {:>2}. {:<width$}  {}", i + 1, s.step, s.answer);
    }
    if !e.audit.is_empty() {
        let _ = writeln!(out, "audit records (newest first):");
        for r in &e.audit {
            let _ = writeln!(out, "  {}", history::line(r));
        }
    }
    let _ = writeln!(out, "=> {}", e.summary);
    out
}
