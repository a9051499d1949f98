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

use crate::snapshot::{BackendKind, BackendView, ClusterSnapshot, ObjectFacts};

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

/// Whether `name` could be the name of a Pod or custom resource (RFC 1123 subdomain).
pub fn is_valid_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
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

/// The per-row decision of a sweep, a pure function of the row, the cluster view, the policy
/// and the cutoff (`database_clock − grace`): which state class, whether an object of its
/// name is listed by any backend (presence is by name), attribution of a missing object to a
/// backend, and the grace period. The guards and the cap are decided over the whole table
/// ([`Planner::finish`]).
pub fn decide(
    snapshot: &ClusterSnapshot,
    policy: &Policy,
    cutoff: DateTime<Utc>,
    row: &SessionRow,
) -> RowVerdict {
    decide_marking(snapshot, policy, cutoff, row, |_, _| {})
}

/// [`decide`], calling `found(backend index, slot)` for every backend whose listing has an
/// object of the row's name (each name is looked up once per backend: the planner marks the
/// objects rows refer to from the same lookups).
fn decide_marking(
    snapshot: &ClusterSnapshot,
    policy: &Policy,
    cutoff: DateTime<Utc>,
    row: &SessionRow,
    mut found: impl FnMut(usize, usize),
) -> RowVerdict {
    let state = match known_state(policy, row) {
        Ok(state) => state,
        Err(skipped) => return skipped,
    };
    let suspended = state == policy.suspended_state;
    let live = policy.live_states.iter().any(|l| l == state);
    let object = row.object.as_deref().filter(|o| !o.is_empty());
    // Every backend that lists the name; the first one's facts.
    let mut lookup = |name: &str| {
        let mut first: Option<(BackendKind, ObjectFacts)> = None;
        for (i, b) in snapshot.backends.iter().enumerate() {
            if let Some((slot, facts)) = b.entry(name) {
                found(i, slot);
                first.get_or_insert((b.kind, facts));
            }
        }
        first
    };
    if !suspended && !live {
        if let Some(name) = object {
            lookup(name);
        }
        return RowVerdict::OtherState {
            anchor: state != policy.gone_state,
        };
    }
    let Some(name) = object else {
        return RowVerdict::Skipped {
            reason: SkipReason::NullObjectName,
            live,
        };
    };
    if !is_valid_object_name(name) {
        return RowVerdict::Skipped {
            reason: SkipReason::InvalidObjectName,
            live,
        };
    }
    if let Some((backend, facts)) = lookup(name) {
        return RowVerdict::Protected {
            backend,
            live,
            paused: facts.suspended,
            terminating: facts.terminating,
        };
    }
    let backend = attribute(&snapshot.backends, name);
    if live {
        return RowVerdict::LiveWithoutObject { backend };
    }
    decide_missing(backend, cutoff, row)
}

/// The row's state when the policy knows it, else the verdict that skips the row.
fn known_state<'r>(policy: &Policy, row: &'r SessionRow) -> Result<&'r str, RowVerdict> {
    let known = |s: &str| {
        s == policy.suspended_state
            || s == policy.gone_state
            || policy.live_states.iter().any(|l| l == s)
            || policy.other_states.iter().any(|o| o == s)
    };
    match row.state.as_deref() {
        None => Err(RowVerdict::Skipped {
            reason: SkipReason::NullState,
            live: false,
        }),
        Some(s) if !known(s) => Err(RowVerdict::Skipped {
            reason: SkipReason::UnknownState,
            live: false,
        }),
        Some(s) => Ok(s),
    }
}

/// A suspended row whose object no backend lists: within the grace period, or an orphan.
fn decide_missing(backend: BackendKind, cutoff: DateTime<Utc>, row: &SessionRow) -> RowVerdict {
    let Some(updated_at) = row.updated_at else {
        return RowVerdict::Skipped {
            reason: SkipReason::NullUpdatedAt,
            live: false,
        };
    };
    if updated_at > cutoff {
        return RowVerdict::WithinGrace {
            backend,
            updated_at,
            cutoff,
        };
    }
    RowVerdict::Orphan {
        backend,
        updated_at,
    }
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

    /// The guards' verdict over the counts of a whole snapshot (see the module comment).
    fn guard(&self) -> GuardVerdict {
        self.refuse_empty_listing()
            .or_else(|| {
                self.snapshot
                    .backends
                    .iter()
                    .enumerate()
                    .find_map(|(i, view)| self.refuse_backend(i, view))
            })
            .or_else(|| self.refuse_live_rows_missing())
            .or_else(|| self.refuse_suspended_objects_missing())
            .unwrap_or(GuardVerdict::Proceed)
    }

    /// Whether the agent-sandbox backend's suspended-rows guard is on (a ratio of 1 is off).
    fn sandbox_suspended_guard(&self) -> bool {
        self.policy.max_suspended_missing_ratio < 1.0
    }

    /// An empty cluster listing while rows are live.
    fn refuse_empty_listing(&self) -> Option<GuardVerdict> {
        let total_objects: usize = self.snapshot.backends.iter().map(BackendView::len).sum();
        (total_objects == 0 && self.live_rows > 0).then(|| {
            refuse(
                RefusalReason::EmptyListing,
                format!(
                    "the cluster listing is empty but {} rows are in live states; check cluster.namespaces, the backends' label selectors and RBAC",
                    self.live_rows
                ),
            )
        })
    }

    /// One backend looking in the wrong place: no row refers to what it listed while rows
    /// that could be its own miss their object, or its selector selects none of them.
    fn refuse_backend(&self, i: usize, view: &BackendView) -> Option<GuardVerdict> {
        let unknown = self
            .backends
            .get(&BackendKind::Unknown)
            .cloned()
            .unwrap_or_default();
        let sandbox_suspended_guard = self.sandbox_suspended_guard();
        let own = self.backends.get(&view.kind).cloned().unwrap_or_default();
        // Rows whose object is missing and that could belong to this backend.
        let live_missing = own.live_without_object + unknown.live_without_object;
        let suspended_missing = own.suspended_without_object + unknown.suspended_without_object;
        let signal = match view.kind {
            BackendKind::AgentSandbox if sandbox_suspended_guard => {
                live_missing + suspended_missing
            }
            _ => live_missing,
        };
        let anchored = self.anchors[i] > 0;
        if !anchored && signal > 0 {
            let (reason, what) = if view.is_empty() {
                (
                    RefusalReason::BackendEmptyListing,
                    "listed no objects".to_string(),
                )
            } else {
                (
                    RefusalReason::BackendListingUnrelated,
                    format!(
                        "listed {} objects, none of which a session row refers to,",
                        view.len()
                    ),
                )
            };
            return Some(refuse(
                reason,
                format!(
                    "the {} backend {what} but {signal} rows that could belong to it have no object; it is probably looking in the wrong place: check cluster.namespaces, its label selector, its API version and RBAC{}",
                    view.kind,
                    match view.kind {
                        BackendKind::AgentSandbox => " (on a cluster without Sandboxes yet, use the bare-pod profile, config/centaur.toml)",
                        _ => "",
                    }
                ),
            ));
        }
        if anchored && view.count(|f| f.managed) == 0 {
            return Some(refuse(
                RefusalReason::SelectorMatchesNothing,
                format!(
                    "the {} backend's label selector selects none of the {} objects it listed, though {} rows refer to them; fix backends.{}.label_selector (or set it to \"\")",
                    view.kind,
                    view.len(),
                    self.anchors[i],
                    view.kind.config_section()
                ),
            ));
        }
        None
    }

    /// More live rows without an object than the ratio allows.
    fn refuse_live_rows_missing(&self) -> Option<GuardVerdict> {
        let p = self.policy;
        let live_missing: u64 = self.backends.values().map(|c| c.live_without_object).sum();
        if live_missing >= p.min_live_missing.max(1)
            && live_missing as f64 > p.max_live_missing_ratio * self.live_rows as f64
        {
            return Some(refuse(
                RefusalReason::LiveRowsMissing,
                format!(
                    "{live_missing} of {} live rows have no object either (more than {:.0}%); the namespace, label selector or RBAC is probably wrong",
                    self.live_rows,
                    p.max_live_missing_ratio * 100.0
                ),
            ));
        }
        None
    }

    /// More of the agent-sandbox backend's suspended rows without a Sandbox than the ratio
    /// allows (pausing keeps the Sandbox).
    fn refuse_suspended_objects_missing(&self) -> Option<GuardVerdict> {
        let p = self.policy;
        if self.sandbox_suspended_guard()
            && self
                .snapshot
                .backends
                .iter()
                .any(|v| v.kind == BackendKind::AgentSandbox)
        {
            let own = self
                .backends
                .get(&BackendKind::AgentSandbox)
                .cloned()
                .unwrap_or_default();
            // Only the rows attributed to this backend: `unknown` rows could be the bare-pod
            // era's, whose pods are gone by design (see the module comment).
            let missing = own.suspended_without_object;
            let all = missing + own.suspended_with_object;
            if missing >= p.min_suspended_missing.max(1)
                && missing as f64 > p.max_suspended_missing_ratio * all as f64
            {
                return Some(refuse(
                    RefusalReason::SuspendedObjectsMissing,
                    format!(
                        "{missing} of {all} suspended rows of the agent-sandbox backend have no Sandbox (more than {:.0}%); pausing keeps the Sandbox, so the listing is probably looking in the wrong place (namespace, label selector, API version). If the Sandboxes really were deleted, run once with guard.max_suspended_missing_ratio = 1",
                        p.max_suspended_missing_ratio * 100.0
                    ),
                ));
            }
        }
        None
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

fn refuse(reason: RefusalReason, detail: String) -> GuardVerdict {
    GuardVerdict::Refuse { reason, detail }
}

/// See [`Planner::attribute`].
pub fn attribute(backends: &[BackendView], name: &str) -> BackendKind {
    let mut best: Option<&BackendView> = None;
    let mut tie = false;
    for b in backends {
        if !name.starts_with(b.name_prefix.as_str()) {
            continue;
        }
        match best {
            Some(x) if b.name_prefix.len() < x.name_prefix.len() => {}
            Some(x) if b.name_prefix.len() == x.name_prefix.len() => tie = true,
            _ => {
                best = Some(b);
                tie = false;
            }
        }
    }
    match best {
        Some(b) if !tie => b.kind,
        _ => BackendKind::Unknown,
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
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            suspended_state: "suspended".into(),
            gone_state: "gone".into(),
            live_states: vec!["running".into(), "idle".into()],
            other_states: vec!["creating".into()],
            grace_period: Duration::minutes(10),
            max_downgrades: 100,
            max_live_missing_ratio: 0.5,
            min_live_missing: 1,
            max_suspended_missing_ratio: 0.5,
            min_suspended_missing: 3,
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-01-01T12:00:00Z".parse().unwrap()
    }

    fn snapshot(pods: &[&str], sandboxes: &[&str]) -> ClusterSnapshot {
        let mut s = ClusterSnapshot::new(now());
        let mut p = BackendView::new(BackendKind::Pod, "");
        for name in pods {
            p.insert(name, ObjectFacts::default());
        }
        let mut b = BackendView::new(BackendKind::AgentSandbox, "");
        for name in sandboxes {
            b.insert(
                name,
                ObjectFacts {
                    suspended: true,
                    ..ObjectFacts::default()
                },
            );
        }
        s.backends.push(p);
        s.backends.push(b);
        s
    }

    fn row(key: &str, state: &str, object: &str, age_min: i64) -> SessionRow {
        SessionRow {
            key: key.into(),
            state: Some(state.into()),
            object: Some(object.into()),
            updated_at: Some(now() - Duration::minutes(age_min)),
        }
    }

    #[test]
    fn orphan_found_present_kept_fresh_kept() {
        let snap = snapshot(&["live-1", "sus-present"], &["sus-sandbox"]);
        let rows = vec![
            row("a", "running", "live-1", 60),
            row("b", "suspended", "sus-present", 60),
            row("c", "suspended", "sus-sandbox", 60),
            row("d", "suspended", "sus-missing", 60),
            row("e", "suspended", "sus-fresh", 5),
        ];
        let plan = plan(&snap, &policy(), &rows);
        assert_eq!(plan.guard, GuardVerdict::Proceed);
        let keys: Vec<_> = plan.downgrades.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, vec!["d"]);
        assert_eq!(plan.within_grace, 1);
        assert_eq!(
            plan.backends[&BackendKind::AgentSandbox].suspended_with_object,
            1
        );
        assert_eq!(plan.backends[&BackendKind::Pod].suspended_with_object, 1);
    }

    /// One function decides: each row's verdict, with the guards and the cap applied by
    /// [`outcome`], adds up to exactly the plan's counts, and the downgrades are the rows whose
    /// outcome is `Downgrade`.
    #[test]
    fn each_rows_verdict_adds_up_to_the_plan() {
        let mut snap = snapshot(&["live-1", "sus-present", "term"], &["sb-paused"]);
        snap.backends[0].insert(
            "term",
            ObjectFacts {
                terminating: true,
                ..ObjectFacts::default()
            },
        );
        let mut rows = vec![
            row("a", "running", "live-1", 60),
            row("b", "idle", "live-missing", 60),
            row("c", "running", "live-1", 60),
            row("d", "running", "live-1", 60),
            row("e", "suspended", "sus-present", 60),
            row("f", "suspended", "term", 60),
            row("g", "suspended", "sb-paused", 60),
            row("h", "suspended", "fresh", 5),
            row("i", "weird", "x", 60),
            row("j", "creating", "sb-paused", 60),
            row("k", "suspended", "Bad_Name", 60),
            SessionRow {
                object: None,
                ..row("l", "suspended", "", 60)
            },
            SessionRow {
                updated_at: None,
                ..row("m", "suspended", "no-time", 60)
            },
        ];
        for i in 0..5 {
            rows.push(row(
                &format!("o{i}"),
                "suspended",
                &format!("gone-{i}"),
                100 + i,
            ));
        }
        let mut p = policy();
        p.max_downgrades = 2;
        p.max_suspended_missing_ratio = 1.0;
        let cutoff = snap.database_clock - p.grace_period;
        let plan = plan(&snap, &p, &rows);
        assert_eq!(plan.guard, GuardVerdict::Proceed, "{:?}", plan.guard);
        let verdicts: Vec<RowVerdict> = rows.iter().map(|r| decide(&snap, &p, cutoff, r)).collect();
        let orphans: Vec<(DateTime<Utc>, &str)> = rows
            .iter()
            .zip(&verdicts)
            .filter_map(|(r, v)| match v {
                RowVerdict::Orphan { updated_at, .. } => Some((*updated_at, r.key.as_str())),
                _ => None,
            })
            .collect();
        let outcomes: Vec<RowOutcome> = rows
            .iter()
            .zip(&verdicts)
            .map(|(r, v)| {
                let position = match v {
                    RowVerdict::Orphan { updated_at, .. } => {
                        orphan_position(*updated_at, &r.key, orphans.iter().copied())
                    }
                    _ => 0,
                };
                outcome(&plan, v, &r.key, position, p.max_downgrades)
            })
            .collect();
        let downgraded: Vec<&str> = rows
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o == RowOutcome::Downgrade)
            .map(|(r, _)| r.key.as_str())
            .collect();
        assert_eq!(downgraded, vec!["o3", "o4"]);
        let keys: Vec<&str> = plan.downgrades.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, vec!["o4", "o3"]);
        let deferred: Vec<u64> = outcomes
            .iter()
            .filter_map(|o| match o {
                RowOutcome::Deferred { position, .. } => Some(*position),
                _ => None,
            })
            .collect();
        assert_eq!(deferred, vec![5, 4, 3]);
        assert_eq!(deferred.len() as u64, plan.deferred);
        assert_eq!(orphans.len() as u64, plan.orphans_found);
        let within = verdicts
            .iter()
            .filter(|v| matches!(v, RowVerdict::WithinGrace { .. }))
            .count() as u64;
        assert_eq!(within, plan.within_grace);
        let mut skipped = BTreeMap::new();
        for v in &verdicts {
            if let RowVerdict::Skipped { reason, .. } = v {
                *skipped.entry(*reason).or_insert(0u64) += 1;
            }
        }
        assert_eq!(skipped, plan.skipped);
        assert_eq!(
            verdicts[5],
            RowVerdict::Protected {
                backend: BackendKind::Pod,
                live: false,
                paused: false,
                terminating: true
            }
        );
        assert_eq!(
            verdicts[6],
            RowVerdict::Protected {
                backend: BackendKind::AgentSandbox,
                live: false,
                paused: true,
                terminating: false
            }
        );
        assert_eq!(
            verdicts[1],
            RowVerdict::LiveWithoutObject {
                backend: BackendKind::Unknown
            }
        );
        assert_eq!(plan.backends[&BackendKind::Unknown].live_without_object, 1);
        assert_eq!(plan.live_rows, 4);
        // A refusal is every orphan's outcome.
        let mut strict = p.clone();
        strict.max_live_missing_ratio = 0.1;
        let refused = super::plan(&snap, &strict, &rows);
        assert_eq!(
            outcome(&refused, &verdicts[13], &rows[13].key, 1, 2),
            RowOutcome::Refused {
                reason: RefusalReason::LiveRowsMissing
            }
        );
        assert_eq!(
            outcome(&refused, &verdicts[0], &rows[0].key, 0, 2),
            RowOutcome::Kept
        );
    }

    #[test]
    fn cap_keeps_oldest_and_defers_rest() {
        let snap = snapshot(&["live"], &[]);
        let mut rows = vec![row("live", "running", "live", 100)];
        for i in 0..10 {
            rows.push(row(
                &format!("k{i}"),
                "suspended",
                &format!("o{i}"),
                100 + i,
            ));
        }
        let mut p = policy();
        p.max_downgrades = 3;
        // Both backends without prefixes and no Sandbox at all: the orphans could be
        // Sandboxes, so only with that guard off.
        p.max_suspended_missing_ratio = 1.0;
        let plan = plan(&snap, &p, &rows);
        let keys: Vec<_> = plan.downgrades.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, vec!["k9", "k8", "k7"]);
        assert_eq!(plan.deferred, 7);
        assert_eq!(plan.orphans_found, 10);
    }

    #[test]
    fn guard_refuses_when_most_live_rows_missing() {
        let snap = snapshot(&["x"], &["sb"]);
        let rows = vec![
            row("a", "running", "gone-1", 60),
            row("b", "idle", "gone-2", 60),
            row("c", "running", "x", 60),
            row("d", "suspended", "gone-3", 60),
            // The Sandbox listing is anchored: this guard is about the live rows.
            row("e", "suspended", "sb", 60),
        ];
        let plan = plan(&snap, &policy(), &rows);
        assert!(matches!(
            plan.guard,
            GuardVerdict::Refuse {
                reason: RefusalReason::LiveRowsMissing,
                ..
            }
        ));
        assert!(plan.downgrades.is_empty());
        assert_eq!(plan.deferred, 1);
    }

    #[test]
    fn guard_refuses_empty_listing() {
        let snap = snapshot(&[], &[]);
        let rows = vec![row("a", "running", "p", 60), row("d", "suspended", "q", 60)];
        let plan = plan(&snap, &policy(), &rows);
        assert!(matches!(
            plan.guard,
            GuardVerdict::Refuse {
                reason: RefusalReason::EmptyListing,
                ..
            }
        ));
    }

    #[test]
    fn bad_rows_skipped_and_counted() {
        let snap = snapshot(&["x"], &[]);
        let mut rows = vec![row("a", "running", "x", 60)];
        rows.push(SessionRow {
            object: None,
            ..row("n", "suspended", "", 60)
        });
        rows.push(row("u", "weird", "y", 60));
        rows.push(row("l", "suspended", &"a".repeat(300), 60));
        rows.push(row("ü", "suspended", "Ünicode", 60));
        rows.push(SessionRow {
            state: None,
            ..row("s", "", "z", 60)
        });
        let plan = plan(&snap, &policy(), &rows);
        assert!(plan.downgrades.is_empty());
        assert_eq!(plan.skipped[&SkipReason::NullObjectName], 1);
        assert_eq!(plan.skipped[&SkipReason::UnknownState], 1);
        assert_eq!(plan.skipped[&SkipReason::InvalidObjectName], 2);
        assert_eq!(plan.skipped[&SkipReason::NullState], 1);
        assert_eq!(plan.rows_by_state["unknown"], 1);
    }

    #[test]
    fn untracked_objects_counted() {
        let snap = snapshot(&["a", "leaked"], &["sb"]);
        let rows = vec![row("1", "running", "a", 60), row("2", "gone", "sb", 60)];
        let plan = plan(&snap, &policy(), &rows);
        assert_eq!(plan.backends[&BackendKind::Pod].untracked_objects, 1);
        assert_eq!(
            plan.backends[&BackendKind::AgentSandbox].untracked_objects,
            0
        );
    }

    fn view(kind: BackendKind, prefix: &str, names: &[&str], suspended: bool) -> BackendView {
        let mut v = BackendView::new(kind, prefix);
        for n in names {
            v.insert(
                n,
                ObjectFacts {
                    suspended,
                    ..ObjectFacts::default()
                },
            );
        }
        v
    }

    #[test]
    fn attribution_needs_a_distinguishing_prefix() {
        let both = vec![
            view(BackendKind::Pod, "", &[], false),
            view(BackendKind::AgentSandbox, "", &[], true),
        ];
        assert_eq!(attribute(&both, "sb-1"), BackendKind::Unknown);
        let prefixed = vec![
            view(BackendKind::Pod, "pod-", &[], false),
            view(BackendKind::AgentSandbox, "sb-", &[], true),
        ];
        assert_eq!(attribute(&prefixed, "sb-1"), BackendKind::AgentSandbox);
        assert_eq!(attribute(&prefixed, "pod-1"), BackendKind::Pod);
        assert_eq!(attribute(&prefixed, "other"), BackendKind::Unknown);
        // Only the sandbox backend is enabled: never "pod", whatever the name.
        let sandbox_only = vec![view(BackendKind::AgentSandbox, "", &[], true)];
        assert_eq!(attribute(&sandbox_only, "pod-1"), BackendKind::AgentSandbox);
        let sandbox_prefixed = vec![view(BackendKind::AgentSandbox, "sb-", &[], true)];
        assert_eq!(attribute(&sandbox_prefixed, "pod-1"), BackendKind::Unknown);
        // The longer prefix wins.
        let nested = vec![
            view(BackendKind::Pod, "s", &[], false),
            view(BackendKind::AgentSandbox, "sb-", &[], true),
        ];
        assert_eq!(attribute(&nested, "sb-1"), BackendKind::AgentSandbox);
    }

    /// Quiet hour, namespace typo: only paused Sandboxes' rows, an empty Sandbox listing.
    #[test]
    fn empty_sandbox_listing_with_suspended_rows_refuses() {
        let mut snap = ClusterSnapshot::new(now());
        snap.backends
            .push(view(BackendKind::AgentSandbox, "", &[], true));
        let rows: Vec<_> = (0..5)
            .map(|i| row(&format!("k{i}"), "suspended", &format!("sb-{i}"), 600))
            .collect();
        let plan = plan(&snap, &policy(), &rows);
        assert!(
            matches!(
                plan.guard,
                GuardVerdict::Refuse {
                    reason: RefusalReason::BackendEmptyListing,
                    ..
                }
            ),
            "{:?}",
            plan.guard
        );
        assert!(plan.downgrades.is_empty());
        // The bare-pod backend's suspended pods are gone by design: an empty pod listing
        // with only suspended rows is normal and proceeds.
        let mut pods = ClusterSnapshot::new(now());
        pods.backends.push(view(BackendKind::Pod, "", &[], false));
        let plan = super::plan(&pods, &policy(), &rows);
        assert_eq!(plan.guard, GuardVerdict::Proceed);
        assert_eq!(plan.downgrades.len(), 5);
        // ...but not with live rows that have no pod.
        let mut live = rows.clone();
        live.push(row("l", "running", "pod-l", 60));
        let plan = super::plan(&pods, &policy(), &live);
        assert!(matches!(
            plan.guard,
            GuardVerdict::Refuse {
                reason: RefusalReason::EmptyListing | RefusalReason::BackendEmptyListing,
                ..
            }
        ));
    }

    #[test]
    fn most_suspended_sandboxes_missing_refuses_unless_turned_off() {
        let mut snap = ClusterSnapshot::new(now());
        snap.backends
            .push(view(BackendKind::AgentSandbox, "", &["sb-kept"], true));
        let mut rows = vec![row("kept", "suspended", "sb-kept", 600)];
        for i in 0..4 {
            rows.push(row(&format!("k{i}"), "suspended", &format!("sb-{i}"), 600));
        }
        let refused = plan(&snap, &policy(), &rows);
        assert!(matches!(
            refused.guard,
            GuardVerdict::Refuse {
                reason: RefusalReason::SuspendedObjectsMissing,
                ..
            }
        ));
        let mut off = policy();
        off.max_suspended_missing_ratio = 1.0;
        let allowed = plan(&snap, &off, &rows);
        assert_eq!(allowed.guard, GuardVerdict::Proceed);
        assert_eq!(allowed.downgrades.len(), 4);
        // A few missing Sandboxes among many paused ones proceed at the default.
        for i in 0..10 {
            let name = format!("sb-p{i}");
            snap.backends[0].insert(&name, ObjectFacts::default());
            rows.push(row(&format!("p{i}"), "suspended", &name, 600));
        }
        let few = plan(&snap, &policy(), &rows);
        assert_eq!(few.guard, GuardVerdict::Proceed);
    }

    #[test]
    fn unknown_orphans_are_reported_as_unknown() {
        let snap = snapshot(&["live"], &["sb"]);
        let rows = vec![
            row("a", "running", "live", 60),
            row("b", "suspended", "sb", 60),
            row("o", "suspended", "gone-1", 60),
        ];
        let plan = plan(&snap, &policy(), &rows);
        assert_eq!(plan.downgrades[0].backend, BackendKind::Unknown);
        assert_eq!(plan.backends[&BackendKind::Unknown].orphaned_suspended, 1);
        assert!(
            !plan.backends.contains_key(&BackendKind::Pod)
                || plan.backends[&BackendKind::Pod].orphaned_suspended == 0
        );
    }

    #[test]
    fn the_cap_keeps_the_oldest_without_sorting_everything() {
        let snap = snapshot(&["live"], &[]);
        let mut rows = vec![row("live", "running", "live", 100)];
        // Ages in a scrambled order, with ties broken by key.
        for (i, age) in [130, 110, 150, 120, 150, 140, 100].iter().enumerate() {
            rows.push(row(&format!("k{i}"), "suspended", &format!("o{i}"), *age));
        }
        let mut p = policy();
        p.max_downgrades = 3;
        p.max_suspended_missing_ratio = 1.0;
        let plan = plan(&snap, &p, &rows);
        let keys: Vec<_> = plan.downgrades.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, vec!["k2", "k4", "k5"]);
        assert_eq!(plan.deferred, 4);
        p.max_downgrades = 0;
        let none = super::plan(&snap, &p, &rows);
        assert!(none.downgrades.is_empty());
        assert_eq!(none.deferred, 7);
    }

    fn refusal(plan: &Plan) -> Option<RefusalReason> {
        match &plan.guard {
            GuardVerdict::Refuse { reason, .. } => Some(*reason),
            GuardVerdict::Proceed => None,
        }
    }

    /// centaur names pods and Sandboxes from one scheme, so with both backends on (a
    /// migration) no prefix tells them apart: the pod era's orphans are `unknown`. A Sandbox
    /// listing that holds the paused Sandboxes the rows refer to is in the right place, and
    /// the unknown orphans must not count against its missing-share.
    #[test]
    fn both_eras_orphans_are_cleared_when_each_listing_is_anchored() {
        let name = |i: usize| format!("centaur-centaur-sandbox-slack-c07-{i:010x}");
        let mut snap = ClusterSnapshot::new(now());
        snap.backends
            .push(view(BackendKind::Pod, "", &[&name(100)], false));
        let paused: Vec<String> = (0..1).map(|i| name(200 + i)).collect();
        let paused: Vec<&str> = paused.iter().map(String::as_str).collect();
        snap.backends
            .push(view(BackendKind::AgentSandbox, "", &paused, true));
        let mut rows = vec![row("live", "running", &name(100), 60)];
        rows.push(row("paused", "suspended", &name(200), 600));
        for i in 0..6 {
            rows.push(row(&format!("old-{i}"), "suspended", &name(i), 600));
        }
        let plan = plan(&snap, &policy(), &rows);
        assert_eq!(plan.guard, GuardVerdict::Proceed, "{:?}", plan.guard);
        assert_eq!(plan.downgrades.len(), 6);
        assert!(plan
            .downgrades
            .iter()
            .all(|o| o.backend == BackendKind::Unknown && o.key.starts_with("old-")));

        // No live pod at all (every live session already runs in a Sandbox): still fine, the
        // bare-pod backend has no row that needs a pod.
        let mut no_pods = snap.clone();
        no_pods.backends[0] = view(BackendKind::Pod, "", &[], false);
        let rows_no_live: Vec<_> = rows[1..].to_vec();
        let plan = super::plan(&no_pods, &policy(), &rows_no_live);
        assert_eq!(plan.guard, GuardVerdict::Proceed, "{:?}", plan.guard);
        assert_eq!(plan.downgrades.len(), 6);
    }

    /// A namespace that exists but is the wrong one, at a quiet hour: it holds Sandboxes, but
    /// none that a row refers to, and the rows' paused Sandboxes are elsewhere.
    #[test]
    fn a_listing_of_unrelated_objects_refuses() {
        for kinds in [
            vec![BackendKind::AgentSandbox],
            vec![BackendKind::Pod, BackendKind::AgentSandbox],
        ] {
            let mut snap = ClusterSnapshot::new(now());
            for kind in &kinds {
                let names: &[&str] = match kind {
                    BackendKind::Pod => &["someone-elses-pod"],
                    _ => &["someone-elses-sandbox", "another-one"],
                };
                snap.backends.push(view(*kind, "", names, true));
            }
            let rows: Vec<_> = (0..5)
                .map(|i| row(&format!("k{i}"), "suspended", &format!("sb-{i}"), 600))
                .collect();
            let plan = plan(&snap, &policy(), &rows);
            assert_eq!(
                refusal(&plan),
                Some(RefusalReason::BackendListingUnrelated),
                "{kinds:?}: {:?}",
                plan.guard
            );
            assert!(plan.downgrades.is_empty());
            assert_eq!(plan.deferred, 5);
        }
    }

    /// A label selector that selects nothing: the rows' objects are there by name (so nothing
    /// is absent), but the configuration is wrong and the figures would lie.
    #[test]
    fn a_selector_that_selects_nothing_refuses() {
        let mut snap = ClusterSnapshot::new(now());
        let mut sandboxes = BackendView::new(BackendKind::AgentSandbox, "");
        for name in ["sb-1", "sb-2"] {
            sandboxes.insert(
                name,
                ObjectFacts {
                    suspended: true,
                    managed: false,
                    ..ObjectFacts::default()
                },
            );
        }
        snap.backends.push(sandboxes);
        let rows = vec![
            row("a", "suspended", "sb-1", 600),
            row("b", "suspended", "sb-2", 600),
            row("c", "suspended", "sb-3", 600),
        ];
        let plan = plan(&snap, &policy(), &rows);
        assert_eq!(
            refusal(&plan),
            Some(RefusalReason::SelectorMatchesNothing),
            "{:?}",
            plan.guard
        );
        assert!(plan.downgrades.is_empty());
        // With one object selected the same rows proceed and the orphan is downgraded.
        snap.backends[0].insert(
            "sb-1",
            ObjectFacts {
                suspended: true,
                ..ObjectFacts::default()
            },
        );
        let plan = super::plan(&snap, &policy(), &rows);
        assert_eq!(plan.guard, GuardVerdict::Proceed, "{:?}", plan.guard);
        assert_eq!(plan.downgrades.len(), 1);
    }
}
