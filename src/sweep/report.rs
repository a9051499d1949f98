//! What a sweep saw and did, and how it is told: [`SweepReport`] is filled in phase by phase
//! (the plan's figures, the confirmation, each batch) and ends as the sweep's only output; the
//! summaries print it, text for people (`--once`), JSON (`--output json`, `GET /last-sweep`)
//! for machines, and `Metrics::record` reads it. How absence was proven is recorded as
//! [`Confirmation`] and worded by [`ConfirmBy`].

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::cluster::{BackendKind, ClusterError, ClusterSnapshot};
use crate::plan::{GuardVerdict, Plan, RefusalReason, SkipReason};
use crate::store::StoreError;
use crate::sweep::{ConfirmBy, SweepError};

crate::label::labelled! {
    /// How a sweep ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SweepResult {
        Success = "success",
        Failed = "failed",
        Refused = "refused",
        /// Another reconciler holds the writer lock.
        Skipped = "skipped",
    }
}

crate::label::labelled! {
    /// A bounded label for why a sweep failed (or was skipped): the store's lock and errors,
    /// each kind of cluster error, a shutdown.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ErrorKind {
        /// Another reconciler holds the writer lock.
        LockBusy = "lock_busy",
        /// Any other database error.
        Database = "database",
        /// Stopped by shutdown before the sweep finished.
        Interrupted = "interrupted",
        /// The cluster's client could not be configured.
        Config = "config",
        /// The API server answered 403.
        Forbidden = "forbidden",
        /// The API server answered another error status.
        Api = "api",
        /// A listing's continue token expired twice.
        Expired = "expired",
        /// An enabled backend's resource is not served: a configuration error (exit 2).
        NotServed = "not_served",
        /// No answer in time.
        Timeout = "timeout",
        /// An answer that could not be read.
        Malformed = "malformed",
        /// The connection to the API server failed.
        Transport = "transport",
        /// A snapshot file could not be read.
        Dump = "dump",
        /// The cluster's identity could not be read.
        Identity = "identity",
    }
}

impl ErrorKind {
    /// The kind of a sweep's error.
    pub fn of(error: &SweepError) -> ErrorKind {
        match error {
            SweepError::Store(StoreError::LockBusy { .. }) => ErrorKind::LockBusy,
            SweepError::Store(_) => ErrorKind::Database,
            SweepError::Cluster(c) => ErrorKind::of_cluster(c),
            SweepError::Interrupted => ErrorKind::Interrupted,
        }
    }

    /// The kind of a cluster error.
    pub fn of_cluster(error: &ClusterError) -> ErrorKind {
        match error {
            ClusterError::Config(_) => ErrorKind::Config,
            ClusterError::Forbidden { .. } => ErrorKind::Forbidden,
            ClusterError::Api { .. } => ErrorKind::Api,
            ClusterError::Expired { .. } => ErrorKind::Expired,
            ClusterError::NotServed { .. } => ErrorKind::NotServed,
            ClusterError::Timeout { .. } => ErrorKind::Timeout,
            ClusterError::Malformed { .. } => ErrorKind::Malformed,
            ClusterError::Transport { .. } => ErrorKind::Transport,
            ClusterError::Dump { .. } => ErrorKind::Dump,
            ClusterError::Identity(_) => ErrorKind::Identity,
        }
    }
}

crate::label::labelled! {
    /// The timed phases of a sweep (`Timings`), as `sweep_phase_duration_seconds` labels them.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SweepPhase {
        ListCluster = "list_cluster",
        ReadDb = "read_db",
        Confirm = "confirm",
        Apply = "apply",
    }
}

/// How the absence of an orphan's object was established (rule 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confirmation {
    /// Not established (no orphans selected, or the sweep stopped before).
    None,
    /// (a) A direct GET per object answered 404 `NotFound`.
    Get,
    /// (b) Missing from a complete, consistent listing that started after the rows were read.
    Listing,
    /// (c) Missing from the watch cache, proven at least as fresh as a revision taken after
    /// the rows were read.
    WatchCache,
    /// Only the complete listing (sweep.confirmation = "none").
    ListingOnly,
    /// Only the snapshot file.
    SnapshotFile,
}

/// Per-backend figures of one sweep.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackendReport {
    pub cluster_objects: u64,
    pub terminating_objects: u64,
    pub suspended_objects: u64,
    pub untracked_objects: u64,
    pub live_without_object: u64,
    pub suspended_with_object: u64,
    pub orphaned_suspended: u64,
    pub downgraded: u64,
    pub list_requests: u64,
}

/// One row the sweep changed (or, in a dry run, would change).
#[derive(Debug, Clone, Serialize)]
pub struct ChangeLine {
    pub key: String,
    pub object: String,
    pub backend: BackendKind,
    pub updated_at: DateTime<Utc>,
    pub evidence: String,
}

/// Phase timings in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub list_cluster: f64,
    pub read_db: f64,
    pub confirm: f64,
    /// Part of `confirm`: waiting for the watch cache to reach a revision taken after the
    /// read (rule 2(c)), up to about one bookmark interval of the API server.
    pub confirm_wait: f64,
    pub apply: f64,
    pub total: f64,
}

/// Everything a sweep saw and did; printed as text or JSON and fed to metrics.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub sweep_id: uuid::Uuid,
    pub started_at: DateTime<Utc>,
    pub dry_run: bool,
    pub cluster_source: String,
    pub result: SweepResult,
    pub error: Option<String>,
    /// A bounded label for the failure, when failed (or skipped for the writer lock).
    pub error_kind: Option<ErrorKind>,
    pub guard: Option<GuardVerdict>,
    pub rows_read: u64,
    pub rows_by_state: BTreeMap<String, u64>,
    pub live_rows: u64,
    pub backends: BTreeMap<BackendKind, BackendReport>,
    pub orphans_found: u64,
    pub within_grace: u64,
    pub selected: u64,
    /// How absences were confirmed.
    pub confirmation: Confirmation,
    /// Orphans confirmed absent.
    pub confirmed: u64,
    /// API requests the confirmation took (GETs, revision reads, a fresh listing's pages).
    pub confirmation_requests: u64,
    /// Where the sweep's view of the cluster came from: "listing" (a complete listing),
    /// "watch cache", or "snapshot file".
    pub cluster_view: String,
    pub downgraded: u64,
    pub deferred: u64,
    pub skipped: BTreeMap<SkipReason, u64>,
    pub timings: Timings,
    /// Apply transactions attempted (0: the apply phase did not run).
    pub batches: u64,
    /// Apply transactions whose COMMIT got no answer in time (or whose connection failed
    /// during it): they may or may not have been committed. The next sweep re-reads the rows.
    pub outcome_unknown_batches: u64,
    /// The cluster's identity (the kube-system Namespace's UID), when read from the API.
    pub cluster_uid: Option<String>,
    /// The API server URL, when read from the API.
    pub cluster_server: Option<String>,
    /// The session table by its canonical `schema.table`, once resolved.
    pub table: Option<String>,
    /// Rows changed (or that would change, in a dry run).
    pub changes: Vec<ChangeLine>,
}

impl SweepReport {
    pub(super) fn new(dry_run: bool, source: String) -> SweepReport {
        SweepReport {
            sweep_id: uuid::Uuid::new_v4(),
            started_at: Utc::now(),
            dry_run,
            cluster_source: source,
            result: SweepResult::Failed,
            error: None,
            error_kind: None,
            guard: None,
            rows_read: 0,
            rows_by_state: BTreeMap::new(),
            live_rows: 0,
            backends: BTreeMap::new(),
            orphans_found: 0,
            within_grace: 0,
            selected: 0,
            confirmation: Confirmation::None,
            confirmed: 0,
            confirmation_requests: 0,
            cluster_view: String::new(),
            downgraded: 0,
            deferred: 0,
            skipped: BTreeMap::new(),
            timings: Timings::default(),
            outcome_unknown_batches: 0,
            batches: 0,
            cluster_uid: None,
            cluster_server: None,
            table: None,
            changes: Vec::new(),
        }
    }

    pub(super) fn skip(&mut self, reason: SkipReason, n: u64) {
        if n > 0 {
            *self.skipped.entry(reason).or_default() += n;
        }
    }

    pub(super) fn absorb_plan(&mut self, plan: &Plan, snapshot: &ClusterSnapshot) {
        self.guard = Some(plan.guard.clone());
        self.rows_read = plan.rows_read;
        self.rows_by_state = plan.rows_by_state.clone();
        self.live_rows = plan.live_rows;
        self.orphans_found = plan.orphans_found;
        self.within_grace = plan.within_grace;
        self.deferred = plan.deferred;
        self.selected = plan.downgrades.len() as u64;
        for (reason, n) in &plan.skipped {
            self.skip(*reason, *n);
        }
        for view in &snapshot.backends {
            let counts = plan.backends.get(&view.kind).cloned().unwrap_or_default();
            self.backends.insert(
                view.kind,
                BackendReport {
                    cluster_objects: counts.cluster_objects,
                    terminating_objects: view.count(|f| f.terminating) as u64,
                    suspended_objects: view.count(|f| f.suspended) as u64,
                    untracked_objects: counts.untracked_objects,
                    live_without_object: counts.live_without_object,
                    suspended_with_object: counts.suspended_with_object,
                    orphaned_suspended: counts.orphaned_suspended,
                    downgraded: 0,
                    list_requests: view.requests,
                },
            );
        }
        // Rows attributed to no backend have no listing of their own but are reported.
        if let Some(unknown) = plan.backends.get(&BackendKind::Unknown) {
            self.backends.insert(
                BackendKind::Unknown,
                BackendReport {
                    live_without_object: unknown.live_without_object,
                    orphaned_suspended: unknown.orphaned_suspended,
                    ..BackendReport::default()
                },
            );
        }
    }

    /// After the apply phase: the state counts as the sweep left the table, so the
    /// `sessions{state}` gauge agrees with the database right after a clean-up.
    pub(super) fn count_downgrades(&mut self, suspended: &str, gone: &str) {
        if self.downgraded == 0 {
            return;
        }
        if let Some(n) = self.rows_by_state.get_mut(suspended) {
            *n = n.saturating_sub(self.downgraded);
        }
        *self.rows_by_state.entry(gone.to_string()).or_default() += self.downgraded;
    }

    pub(super) fn refuse(&mut self, reason: RefusalReason, detail: String) -> SweepResult {
        tracing::error!(
            sweep_id = %self.sweep_id,
            reason = reason.as_str(),
            "refusing to act: {detail}"
        );
        self.guard = Some(GuardVerdict::Refuse { reason, detail });
        SweepResult::Refused
    }

    /// The guards' verdict on a plan (rules 5 and 10): `Some(Refused)` when it refuses.
    pub(super) fn refused_by(&mut self, guard: &GuardVerdict) -> Option<SweepResult> {
        match guard {
            GuardVerdict::Refuse { reason, detail } => Some(self.refuse(*reason, detail.clone())),
            GuardVerdict::Proceed => None,
        }
    }
}

/// At most this many changed rows are listed in the text summary (JSON lists all).
const TEXT_CHANGE_LINES: usize = 50;

/// Renders the report as JSON.
pub fn json(report: &SweepReport) -> String {
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// At most this many changed rows are listed by the daemon's `GET /last-sweep`.
pub const LAST_SWEEP_CHANGES: usize = 100;

/// The same document as `--once --output json`, with the change list capped at `cap` rows and
/// the cap stated (`changes_total`, `changes_cap`) and the command that shows the audit records
/// the sweep wrote (`history`), for the daemon's `GET /last-sweep`.
pub fn json_capped(report: &SweepReport, cap: usize) -> String {
    let total = report.changes.len();
    let mut value = serde_json::to_value(report).unwrap_or_default();
    if let Some(changes) = value.get_mut("changes").and_then(|c| c.as_array_mut()) {
        changes.truncate(cap);
    }
    if let Some(object) = value.as_object_mut() {
        object.insert("changes_total".into(), total.into());
        object.insert("changes_cap".into(), cap.into());
        // What to run for the audit records this sweep wrote.
        object.insert(
            "history".into(),
            format!("sandbox-reconciler history --sweep {}", report.sweep_id).into(),
        );
    }
    serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
}

/// Renders the report as a short text summary: what ran where, what it saw, what it
/// decided, how long it took, and the rows it changed.
pub fn text(r: &SweepReport) -> String {
    let mut out = String::new();
    header(&mut out, r);
    if r.result == SweepResult::Failed && r.rows_read == 0 {
        return out;
    }
    observations(&mut out, r);
    decisions(&mut out, r);
    changes(&mut out, r);
    out
}

/// The sweep, its result, the cluster and table it looked at, and the error if any.
fn header(out: &mut String, r: &SweepReport) {
    let mode = if r.dry_run {
        " (dry run: nothing written)"
    } else {
        ""
    };
    let _ = writeln!(out, "sweep {} {}{mode}", r.sweep_id, r.result.as_str());
    let identity = r
        .cluster_uid
        .as_ref()
        .map(|u| format!(" (cluster {u})"))
        .unwrap_or_default();
    let view = if r.cluster_view.is_empty() {
        String::new()
    } else {
        format!(", view: {}", r.cluster_view)
    };
    let _ = writeln!(out, "  cluster:  {}{identity}{view}", r.cluster_source);
    if let Some(table) = &r.table {
        let _ = writeln!(out, "  table:    {table}");
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "  error:    {e}");
    }
    if r.outcome_unknown_batches > 0 {
        let _ = writeln!(
            out,
            "  unknown:  {} batch(es) may or may not have been committed; see the audit records of sweep {}",
            r.outcome_unknown_batches, r.sweep_id
        );
    }
}

/// Rows by state and each backend's figures.
fn observations(out: &mut String, r: &SweepReport) {
    let states: Vec<String> = r
        .rows_by_state
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect();
    let _ = writeln!(
        out,
        "  rows:     {} read ({})",
        r.rows_read,
        states.join(", ")
    );
    for (backend, b) in &r.backends {
        let _ = writeln!(
            out,
            "  {backend}: {} objects ({} terminating, {} suspended), {} untracked, {} live rows without object, {} suspended rows with object, {} orphaned suspended rows",
            b.cluster_objects,
            b.terminating_objects,
            b.suspended_objects,
            b.untracked_objects,
            b.live_without_object,
            b.suspended_with_object,
            b.orphaned_suspended
        );
    }
}

/// The guard's verdict, the orphans and what became of them, skips and timings.
fn decisions(out: &mut String, r: &SweepReport) {
    match &r.guard {
        Some(GuardVerdict::Refuse { reason, detail }) => {
            let _ = writeln!(out, "  guard:    REFUSED ({}): {detail}", reason.as_str());
        }
        Some(GuardVerdict::Proceed) => {
            let _ = writeln!(out, "  guard:    ok");
        }
        None => {}
    }
    let confirmed = ConfirmBy::recorded(r.confirmation).summary(r);
    let _ = writeln!(
        out,
        "  orphans:  {} found, {} within grace, {} selected, {confirmed}, {} {}, {} deferred",
        r.orphans_found,
        r.within_grace,
        r.selected,
        if r.dry_run {
            r.changes.len() as u64
        } else {
            r.downgraded
        },
        if r.dry_run {
            "would be downgraded"
        } else {
            "downgraded"
        },
        r.deferred
    );
    if !r.skipped.is_empty() {
        let skipped: Vec<String> = r
            .skipped
            .iter()
            .map(|(k, n)| format!("{}={n}", k.as_str()))
            .collect();
        let _ = writeln!(out, "  skipped:  {}", skipped.join(", "));
    }
    let t = &r.timings;
    let _ = writeln!(
        out,
        "  timings:  list_cluster {:.3}s, read_db {:.3}s, confirm {:.3}s, apply {:.3}s, total {:.3}s",
        t.list_cluster, t.read_db, t.confirm, t.apply, t.total
    );
}

/// The rows changed (or that would change), at most [`TEXT_CHANGE_LINES`] of them.
fn changes(out: &mut String, r: &SweepReport) {
    if !r.changes.is_empty() {
        let verb = if r.dry_run {
            "would downgrade"
        } else {
            "downgraded"
        };
        let _ = writeln!(out, "  {verb}:");
        for c in r.changes.iter().take(TEXT_CHANGE_LINES) {
            let _ = writeln!(
                out,
                "    {}  object={} backend={} updated_at={}",
                c.key,
                c.object,
                c.backend,
                c.updated_at.to_rfc3339()
            );
        }
        if r.changes.len() > TEXT_CHANGE_LINES {
            let _ = writeln!(
                out,
                "    ... and {} more (use --output json for all)",
                r.changes.len() - TEXT_CHANGE_LINES
            );
        }
    }
}
