//! The pure decision: session rows + cluster snapshot + policy + clock -> plan.
//!
//! Nothing here does I/O. Rows are fed one at a time ([`Planner::observe`]) so a sweep can
//! stream millions of rows from PostgreSQL without holding them; only orphan candidates are
//! kept, and of those only the oldest `max_downgrades` (a bounded heap). Every safety rule
//! that can be decided from values alone lives here and is tested with plain values: not seen
//! is not gone (an object in the snapshot protects its row), fresh rows are left alone, the
//! misconfiguration guards (global and per backend), and the per-sweep cap.
//!
//! The guards judge evidence, not attribution. A backend's listing is shown to look in the
//! right place when it is *anchored*: it holds at least one object that a row outside the
//! gone state refers to. The guards, in the order they are checked (docs/DESIGN.md, "Guards"):
//! 1. `empty_listing`: nothing at all was listed while rows are in live states.
//! 2. `backend_empty_listing` / `backend_listing_unrelated`: one backend's listing is not
//!    anchored (it is empty, or holds only objects no row refers to) while rows that could
//!    belong to it have no object. On the bare-pod backend only live rows count (a suspended
//!    row's pod is gone by design); on the agent-sandbox backend suspended rows count too (a
//!    paused Sandbox keeps its object). A row attributed to no backend (`unknown`) could
//!    belong to either, so it counts here for both.
//! 3. `selector_matches_nothing`: an anchored backend whose label selector selects none of
//!    the objects it listed: the selector is wrong, so its untracked figures would be too.
//! 4. `live_rows_missing`: most live rows have no object either.
//! 5. `suspended_objects_missing` (agent-sandbox only): more than a configured share of the
//!    suspended rows attributed to the backend have no Sandbox. Pausing never deletes a
//!    Sandbox, so a mass of such rows means the listing is looking in the wrong place.
//!    `unknown` rows do not count here: with both backends on under one naming scheme the
//!    pod era's orphans are `unknown`, and they say nothing about where Sandboxes are listed;
//!    guard 2 has already asked that the Sandbox listing be anchored.

use std::collections::{BTreeMap, BinaryHeap};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::snapshot::{BackendKind, ClusterSnapshot};

mod decide;
mod guard;

use decide::decide_marking;
pub use decide::{attribute, decide, is_valid_object_name};

/// One session row as read from the database. `None` is SQL NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub key: String,
    pub state: Option<String>,
    pub object: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// What the planner needs to know about states, grace and guards.
#[derive(Debug, Clone)]
pub struct Policy {
    pub suspended_state: String,
    pub gone_state: String,
    pub live_states: Vec<String>,
    pub other_states: Vec<String>,
    pub grace_period: Duration,
    pub max_downgrades: usize,
    pub max_live_missing_ratio: f64,
    pub min_live_missing: u64,
    /// Agent-sandbox backend: refuse when more than this share of its suspended rows have no
    /// Sandbox (1.0 disables this guard and the suspended-row part of the empty-listing guard).
    pub max_suspended_missing_ratio: f64,
    pub min_suspended_missing: u64,
}

/// A suspended row whose object is absent from the complete snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrphanedRow {
    pub key: String,
    pub object: String,
    pub state: String,
    pub updated_at: DateTime<Utc>,
    pub backend: BackendKind,
}

crate::label::labelled! {
    /// Why a row was passed over without being considered.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum SkipReason {
        /// The state column holds a value the configuration does not name.
        UnknownState = "unknown_state",
        /// The state column is NULL.
        NullState = "null_state",
        /// A suspended or live row without an object name.
        NullObjectName = "null_object_name",
        /// An object name Kubernetes could never have (too long, bad characters).
        InvalidObjectName = "invalid_object_name",
        /// A suspended or live row without `updated_at`.
        NullUpdatedAt = "null_updated_at",
        /// The row changed (or was locked by the application) between read and write.
        ChangedMeanwhile = "changed_meanwhile",
        /// The confirming GET did not answer 404 with certainty (error, timeout).
        ConfirmFailed = "confirm_failed",
        /// The confirming GET found the object (created or listed late).
        ObjectReappeared = "object_reappeared",
    }
}

/// Per-backend counts of one sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackendCounts {
    /// Objects listed.
    pub cluster_objects: u64,
    /// Listed objects no row (in any state) refers to.
    pub untracked_objects: u64,
    /// Rows in a live state whose object is listed.
    pub live_with_object: u64,
    /// Rows in a live state whose object is missing.
    pub live_without_object: u64,
    /// Suspended rows whose object exists (healthy for agent-sandbox).
    pub suspended_with_object: u64,
    /// Suspended rows whose object is missing, within the grace period or not.
    pub suspended_without_object: u64,
    /// Suspended rows past the grace period whose object is missing.
    pub orphaned_suspended: u64,
}

/// The misconfiguration guard's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum GuardVerdict {
    Proceed,
    Refuse {
        reason: RefusalReason,
        detail: String,
    },
}

crate::label::labelled! {
    /// Why a guard refused a sweep (the guards' order, then the checks before listing).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RefusalReason {
        /// The cluster listing is empty while live rows exist.
        EmptyListing = "empty_listing",
        /// One backend listed nothing while rows could belong to it.
        BackendEmptyListing = "backend_empty_listing",
        /// One backend listed objects, but none that a row refers to, while rows that could
        /// belong to it have no object (a wrong namespace or context holding unrelated
        /// objects).
        BackendListingUnrelated = "backend_listing_unrelated",
        /// A backend's label selector selects none of the objects it listed, though rows
        /// refer to them.
        SelectorMatchesNothing = "selector_matches_nothing",
        /// Most live rows have no object either.
        LiveRowsMissing = "live_rows_missing",
        /// Too many of the agent-sandbox backend's suspended rows have no Sandbox.
        SuspendedObjectsMissing = "suspended_objects_missing",
        /// A configured namespace does not exist (checked before listing).
        NamespaceMissing = "namespace_missing",
        /// The cluster is not the one `cluster.expected_uid` names.
        ClusterMismatch = "cluster_mismatch",
        /// Sandboxes exist while only the bare-pod backend is enabled (checked before
        /// listing).
        SandboxesUnwatched = "sandboxes_unwatched",
    }
}

/// The outcome of planning: what to downgrade, what waits, and what the sweep saw.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Orphans to confirm and downgrade this sweep, oldest first (empty when refused).
    pub downgrades: Vec<OrphanedRow>,
    /// Orphans beyond the cap (or all orphans when refused); they wait for a later sweep.
    pub deferred: u64,
    pub guard: GuardVerdict,
    pub rows_read: u64,
    pub rows_by_state: BTreeMap<String, u64>,
    pub backends: BTreeMap<BackendKind, BackendCounts>,
    pub skipped: BTreeMap<SkipReason, u64>,
    /// Suspended rows with a missing object left alone because they are inside the grace period.
    pub within_grace: u64,
    pub live_rows: u64,
    pub orphans_found: u64,
}

/// Streaming planner over one snapshot.
pub struct Planner<'a> {
    snapshot: &'a ClusterSnapshot,
    policy: &'a Policy,
    cutoff: DateTime<Utc>,
    /// Per backend, per object slot: whether a row names the object.
    referenced: Vec<Vec<bool>>,
    /// Per backend: rows outside the gone state whose object this backend listed (the
    /// evidence that its listing looks in the right place).
    anchors: Vec<u64>,
    /// The oldest `max_downgrades` orphans seen so far (a max-heap on age order, so the
    /// youngest kept orphan is dropped first).
    oldest: BinaryHeap<OldestFirst>,
    orphans_found: u64,
    rows_read: u64,
    rows_by_state: BTreeMap<String, u64>,
    backends: BTreeMap<BackendKind, BackendCounts>,
    skipped: BTreeMap<SkipReason, u64>,
    within_grace: u64,
    live_rows: u64,
}

/// What a sweep decides about one row, before the guards and the cap (which need the whole
/// table): the one decision, made by [`decide`]. [`Planner::observe`] counts it; `explain`
/// prints it. Variants in the order [`decide`] checks them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum RowVerdict {
    /// Passed over and counted under `reason` (NULL or unknown state, NULL or invalid object
    /// name, NULL `updated_at`). `live`: the row is in a live state (it counts as live).
    Skipped { reason: SkipReason, live: bool },
    /// A state the sweep never changes (gone, or one of `sessions.other_states`): its object
    /// only counts as referenced (and, outside the gone state, as evidence that the listing
    /// looks in the right place).
    OtherState { anchor: bool },
    /// A suspended or live row whose object the listing holds: kept. `backend` is the first
    /// enabled backend that has it; `paused`/`terminating` are its facts.
    Protected {
        backend: BackendKind,
        live: bool,
        paused: bool,
        terminating: bool,
    },
    /// A live row without object: kept, and counted by the guards.
    LiveWithoutObject { backend: BackendKind },
    /// A suspended row without object, updated after the cutoff (listing start − grace).
    WithinGrace {
        backend: BackendKind,
        updated_at: DateTime<Utc>,
        cutoff: DateTime<Utc>,
    },
    /// A suspended row without object, older than the cutoff: a downgrade candidate, subject to
    /// the guards and the cap (which take the oldest first: `updated_at`, then the key).
    Orphan {
        backend: BackendKind,
        updated_at: DateTime<Utc>,
    },
}

/// What a sweep does with one row once the whole table is planned: the verdict, the guards and
/// the cap together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RowOutcome {
    /// Among the oldest `max_downgrades` orphans and the guards proceed: confirmed and
    /// downgraded now.
    Downgrade,
    /// An orphan beyond the cap: waits for a later sweep. `position` is its 1-based place
    /// among the orphans, oldest first.
    Deferred { position: u64, cap: usize },
    /// An orphan, but a guard refuses the whole sweep.
    Refused { reason: RefusalReason },
    /// Not a candidate: the verdict says why.
    Kept,
}

impl RowOutcome {
    /// A short label: `downgrade`, `deferred`, `refused`, `kept`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RowOutcome::Downgrade => "downgrade",
            RowOutcome::Deferred { .. } => "deferred",
            RowOutcome::Refused { .. } => "refused",
            RowOutcome::Kept => "kept",
        }
    }
}

/// The outcome of the row `key` in `plan`, given its verdict (from the same planner's snapshot
/// and policy) and its place among the plan's orphans, oldest first (1-based; see
/// [`orphan_position`]).
pub fn outcome(
    plan: &Plan,
    verdict: &RowVerdict,
    key: &str,
    position: u64,
    cap: usize,
) -> RowOutcome {
    if !matches!(verdict, RowVerdict::Orphan { .. }) {
        return RowOutcome::Kept;
    }
    if let GuardVerdict::Refuse { reason, .. } = &plan.guard {
        return RowOutcome::Refused { reason: *reason };
    }
    if plan.downgrades.iter().any(|d| d.key == key) {
        RowOutcome::Downgrade
    } else {
        RowOutcome::Deferred { position, cap }
    }
}

/// The 1-based place of the orphan (`updated_at`, `key`) among `orphans` in the cap's order
/// (oldest `updated_at` first, ties by key): the cap keeps places `1..=max_downgrades`.
pub fn orphan_position<'o>(
    updated_at: DateTime<Utc>,
    key: &str,
    orphans: impl IntoIterator<Item = (DateTime<Utc>, &'o str)>,
) -> u64 {
    1 + orphans
        .into_iter()
        .filter(|o| *o < (updated_at, key))
        .count() as u64
}

impl<'a> Planner<'a> {
    /// `snapshot.database_clock` is the clock: rows updated within the grace period
    /// before the listing started are never candidates.
    pub fn new(snapshot: &'a ClusterSnapshot, policy: &'a Policy) -> Planner<'a> {
        let mut backends = BTreeMap::new();
        for view in &snapshot.backends {
            backends.insert(
                view.kind,
                BackendCounts {
                    cluster_objects: view.count(|f| f.managed) as u64,
                    ..BackendCounts::default()
                },
            );
        }
        Planner {
            snapshot,
            policy,
            cutoff: snapshot.database_clock - policy.grace_period,
            referenced: snapshot
                .backends
                .iter()
                .map(|b| vec![false; b.len()])
                .collect(),
            anchors: vec![0; snapshot.backends.len()],
            oldest: BinaryHeap::new(),
            orphans_found: 0,
            rows_read: 0,
            rows_by_state: BTreeMap::new(),
            backends,
            skipped: BTreeMap::new(),
            within_grace: 0,
            live_rows: 0,
        }
    }

    fn skip(&mut self, reason: SkipReason) {
        *self.skipped.entry(reason).or_default() += 1;
    }

    /// Records a row that only counts by state (e.g. read by a cheaper aggregate query).
    pub fn count_state(&mut self, state: Option<&str>, n: u64) {
        self.rows_read += n;
        let label = match state {
            None => {
                *self.skipped.entry(SkipReason::NullState).or_default() += n;
                "null"
            }
            Some(s) if self.is_known(s) => s,
            Some(_) => {
                *self.skipped.entry(SkipReason::UnknownState).or_default() += n;
                "unknown"
            }
        };
        // Called for every row: allocate the label only the first time it is seen.
        match self.rows_by_state.get_mut(label) {
            Some(count) => *count += n,
            None => {
                self.rows_by_state.insert(label.to_string(), n);
            }
        }
    }

    fn is_known(&self, state: &str) -> bool {
        let p = self.policy;
        state == p.suspended_state
            || state == p.gone_state
            || p.live_states.iter().any(|s| s == state)
            || p.other_states.iter().any(|s| s == state)
    }

    /// The backend a row with a missing object is counted under: among the enabled backends
    /// whose `object_name_prefix` starts the name ("" matches every name), the one with the
    /// strictly longest prefix; `Unknown` when none matches or two tie (both backends enabled
    /// without prefixes). Never a backend that is not enabled.
    fn attribute(&self, name: &str) -> BackendKind {
        attribute(&self.snapshot.backends, name)
    }

    /// The decision about one row, without counting it: [`decide`] over this planner's
    /// snapshot, policy and cutoff.
    pub fn verdict(&self, row: &SessionRow) -> RowVerdict {
        decide(self.snapshot, self.policy, self.cutoff, row)
    }

    /// Feeds one row. Rows are counted by state; suspended and live rows are matched
    /// against the snapshot. The decision is [`decide`]'s; this only counts it.
    pub fn observe(&mut self, row: &SessionRow) {
        self.count_state(row.state.as_deref(), 1);
        // Mark the objects the row refers to from the decision's own lookups; a row outside
        // the gone state also anchors each backend that lists its object.
        let anchor = row.state.as_deref() != Some(self.policy.gone_state.as_str());
        let (referenced, anchors) = (&mut self.referenced, &mut self.anchors);
        let verdict = decide_marking(self.snapshot, self.policy, self.cutoff, row, |i, slot| {
            referenced[i][slot] = true;
            if anchor {
                anchors[i] += 1;
            }
        });
        let live = matches!(
            verdict,
            RowVerdict::Protected { live: true, .. }
                | RowVerdict::LiveWithoutObject { .. }
                | RowVerdict::Skipped { live: true, .. }
        );
        if live {
            self.live_rows += 1;
        }
        self.count_verdict(row, verdict);
    }

    /// Counts one row's verdict under its backend; an orphan may be kept for the cap.
    fn count_verdict(&mut self, row: &SessionRow, verdict: RowVerdict) {
        match verdict {
            RowVerdict::Skipped { reason, .. } => match reason {
                // Counted by count_state already.
                SkipReason::NullState | SkipReason::UnknownState => {}
                SkipReason::NullUpdatedAt => {
                    // A suspended row without object and without updated_at: missing all
                    // the same.
                    if let Some(name) = row.object.as_deref() {
                        let backend = self.attribute(name);
                        self.backends
                            .entry(backend)
                            .or_default()
                            .suspended_without_object += 1;
                    }
                    self.skip(reason);
                }
                other => self.skip(other),
            },
            RowVerdict::OtherState { .. } => {}
            RowVerdict::Protected { backend, live, .. } => {
                let counts = self.backends.entry(backend).or_default();
                if live {
                    counts.live_with_object += 1;
                } else {
                    counts.suspended_with_object += 1;
                }
            }
            RowVerdict::LiveWithoutObject { backend } => {
                self.backends
                    .entry(backend)
                    .or_default()
                    .live_without_object += 1;
            }
            RowVerdict::WithinGrace { backend, .. } => {
                self.backends
                    .entry(backend)
                    .or_default()
                    .suspended_without_object += 1;
                self.within_grace += 1;
            }
            RowVerdict::Orphan {
                backend,
                updated_at,
            } => {
                let counts = self.backends.entry(backend).or_default();
                counts.suspended_without_object += 1;
                counts.orphaned_suspended += 1;
                self.orphans_found += 1;
                self.keep_if_among_oldest(row, backend, updated_at);
            }
        }
    }

    /// Keeps the orphan when it is among the `max_downgrades` oldest seen so far (oldest
    /// `updated_at` first, then key): the heap holds at most the cap.
    fn keep_if_among_oldest(
        &mut self,
        row: &SessionRow,
        backend: BackendKind,
        updated_at: DateTime<Utc>,
    ) {
        let cap = self.policy.max_downgrades;
        let older_than_kept = |kept: &OldestFirst| (updated_at, row.key.as_str()) < kept.order();
        if self.oldest.len() >= cap && !self.oldest.peek().is_some_and(older_than_kept) {
            return;
        }
        // Allocated only for the orphans the heap keeps.
        self.oldest.push(OldestFirst(OrphanedRow {
            key: row.key.clone(),
            object: row.object.clone().unwrap_or_default(),
            state: row.state.clone().unwrap_or_default(),
            updated_at,
            backend,
        }));
        if self.oldest.len() > cap {
            self.oldest.pop();
        }
    }

    /// Applies the guard and the cap and returns the plan.
    pub fn finish(mut self) -> Plan {
        for (i, view) in self.snapshot.backends.iter().enumerate() {
            let referenced = &self.referenced[i];
            let untracked = view
                .slots()
                .filter(|(slot, facts)| facts.managed && !referenced[*slot])
                .count();
            self.backends
                .entry(view.kind)
                .or_default()
                .untracked_objects = untracked as u64;
        }
        let guard = self.guard();
        let orphans_found = self.orphans_found;
        // into_sorted_vec is ascending in age order: oldest first.
        let oldest: Vec<OrphanedRow> = std::mem::take(&mut self.oldest)
            .into_sorted_vec()
            .into_iter()
            .map(|o| o.0)
            .collect();
        let (downgrades, deferred) = match guard {
            GuardVerdict::Proceed => {
                let deferred = orphans_found - oldest.len() as u64;
                (oldest, deferred)
            }
            GuardVerdict::Refuse { .. } => (Vec::new(), orphans_found),
        };
        Plan {
            downgrades,
            deferred,
            guard,
            rows_read: self.rows_read,
            rows_by_state: self.rows_by_state,
            backends: self.backends,
            skipped: self.skipped,
            within_grace: self.within_grace,
            live_rows: self.live_rows,
            orphans_found,
        }
    }
}

/// An orphan ordered by age (`updated_at`, then key): the heap's top is the youngest kept.
struct OldestFirst(OrphanedRow);

impl OldestFirst {
    fn order(&self) -> (DateTime<Utc>, &str) {
        (self.0.updated_at, self.0.key.as_str())
    }
}

impl PartialEq for OldestFirst {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for OldestFirst {}

impl PartialOrd for OldestFirst {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OldestFirst {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

/// Where rows read from the database go: straight into a [`Planner`] (the daemon, whose
/// cluster view exists before the rows are read), or into [`ReadRows`] to be planned once a
/// listing that started after the read is complete (a one-off sweep).
pub trait RowSink {
    /// Rows counted by state only (the gone rows, read by an aggregate).
    fn count_state(&mut self, state: Option<&str>, n: u64);
    fn observe(&mut self, row: &SessionRow);
}

impl RowSink for Planner<'_> {
    fn count_state(&mut self, state: Option<&str>, n: u64) {
        Planner::count_state(self, state, n);
    }

    fn observe(&mut self, row: &SessionRow) {
        Planner::observe(self, row);
    }
}

/// Rows held until the cluster has been listed.
#[derive(Debug, Default)]
pub struct ReadRows {
    counted: Vec<(Option<String>, u64)>,
    rows: Vec<SessionRow>,
}

impl RowSink for ReadRows {
    fn count_state(&mut self, state: Option<&str>, n: u64) {
        self.counted.push((state.map(str::to_string), n));
    }

    fn observe(&mut self, row: &SessionRow) {
        self.rows.push(row.clone());
    }
}

impl ReadRows {
    /// Feeds every held row to `planner`.
    pub fn replay(&self, planner: &mut Planner<'_>) {
        for (state, n) in &self.counted {
            planner.count_state(state.as_deref(), *n);
        }
        for row in &self.rows {
            planner.observe(row);
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Every held row, in the order read.
    pub fn rows(&self) -> &[SessionRow] {
        &self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Plans over a whole set of rows at once (convenience for tests and small inputs).
pub fn plan<'r>(
    snapshot: &ClusterSnapshot,
    policy: &Policy,
    rows: impl IntoIterator<Item = &'r SessionRow>,
) -> Plan {
    let mut planner = Planner::new(snapshot, policy);
    for row in rows {
        planner.observe(row);
    }
    planner.finish()
}

#[cfg(test)]
mod tests;
