//! The pure decision: session rows + cluster snapshot + policy + clock -> plan.
//!
//! Nothing here does I/O. Rows are fed one at a time ([`Planner::observe`]) so a sweep can
//! stream millions of rows from PostgreSQL without holding them; only orphan candidates are
//! kept. Every safety rule that can be decided from values alone lives here and is tested
//! with plain values: not seen is not gone (an object in the snapshot protects its row),
//! fresh rows are left alone, the misconfiguration guard, and the per-sweep cap.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::cluster::{BackendKind, ClusterSnapshot};

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

/// Why a row was passed over without being considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The state column holds a value the configuration does not name.
    UnknownState,
    /// The state column is NULL.
    NullState,
    /// A suspended or live row without an object name.
    NullObjectName,
    /// An object name Kubernetes could never have (too long, bad characters).
    InvalidObjectName,
    /// A suspended or live row without `updated_at`.
    NullUpdatedAt,
    /// The row changed (or was locked by the application) between read and write.
    ChangedMeanwhile,
    /// The confirming GET did not answer 404 with certainty (error, timeout).
    ConfirmFailed,
    /// The confirming GET found the object (created or listed late).
    ObjectReappeared,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::UnknownState => "unknown_state",
            SkipReason::NullState => "null_state",
            SkipReason::NullObjectName => "null_object_name",
            SkipReason::InvalidObjectName => "invalid_object_name",
            SkipReason::NullUpdatedAt => "null_updated_at",
            SkipReason::ChangedMeanwhile => "changed_meanwhile",
            SkipReason::ConfirmFailed => "confirm_failed",
            SkipReason::ObjectReappeared => "object_reappeared",
        }
    }
}

/// Per-backend counts of one sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackendCounts {
    /// Objects listed.
    pub cluster_objects: u64,
    /// Listed objects no row (in any state) refers to.
    pub untracked_objects: u64,
    /// Rows in a live state whose object is missing.
    pub live_without_object: u64,
    /// Suspended rows whose object exists (healthy for agent-sandbox).
    pub suspended_with_object: u64,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The cluster listing is empty while live rows exist.
    EmptyListing,
    /// Most live rows have no object either.
    LiveRowsMissing,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::EmptyListing => "empty_listing",
            RefusalReason::LiveRowsMissing => "live_rows_missing",
        }
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
    referenced: Vec<HashSet<&'a str>>,
    orphans: Vec<OrphanedRow>,
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

impl<'a> Planner<'a> {
    /// `snapshot.listing_started_at` is the clock: rows updated within the grace period
    /// before the listing started are never candidates.
    pub fn new(snapshot: &'a ClusterSnapshot, policy: &'a Policy) -> Planner<'a> {
        let mut backends = BTreeMap::new();
        for view in &snapshot.backends {
            backends.insert(
                view.kind,
                BackendCounts {
                    cluster_objects: view.len() as u64,
                    ..BackendCounts::default()
                },
            );
        }
        Planner {
            snapshot,
            policy,
            cutoff: snapshot.listing_started_at - policy.grace_period,
            referenced: snapshot.backends.iter().map(|_| HashSet::new()).collect(),
            orphans: Vec::new(),
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
                "null".to_string()
            }
            Some(s) if self.is_known(s) => s.to_string(),
            Some(_) => {
                *self.skipped.entry(SkipReason::UnknownState).or_default() += n;
                "unknown".to_string()
            }
        };
        *self.rows_by_state.entry(label).or_default() += n;
    }

    fn is_known(&self, state: &str) -> bool {
        let p = self.policy;
        state == p.suspended_state
            || state == p.gone_state
            || p.live_states.iter().any(|s| s == state)
            || p.other_states.iter().any(|s| s == state)
    }

    /// The backend a row with a missing object is counted under: the one with the longest
    /// `object_name_prefix` that matches the name (the first backend on a tie).
    fn attribute(&self, name: &str) -> BackendKind {
        let mut best: Option<&crate::cluster::BackendView> = None;
        for b in &self.snapshot.backends {
            if name.starts_with(b.name_prefix.as_str())
                && best.is_none_or(|x| b.name_prefix.len() > x.name_prefix.len())
            {
                best = Some(b);
            }
        }
        best.map_or(BackendKind::Pod, |b| b.kind)
    }

    /// Marks every backend's object of that name as referenced by a row.
    fn reference(&mut self, name: &str) -> Option<usize> {
        let mut first = None;
        for (i, b) in self.snapshot.backends.iter().enumerate() {
            if let Some(key) = b.key_of(name) {
                self.referenced[i].insert(key);
                first.get_or_insert(i);
            }
        }
        first
    }

    /// Feeds one row. Rows are counted by state; suspended and live rows are matched
    /// against the snapshot.
    pub fn observe(&mut self, row: &SessionRow) {
        self.count_state(row.state.as_deref(), 1);
        let Some(state) = row.state.as_deref().filter(|s| self.is_known(s)) else {
            return;
        };
        let suspended = state == self.policy.suspended_state;
        let live = self.policy.live_states.iter().any(|s| s == state);
        if live {
            self.live_rows += 1;
        }
        let object = row.object.as_deref().filter(|o| !o.is_empty());
        if !suspended && !live {
            // Other states only protect their objects from being counted as untracked.
            if let Some(name) = object {
                self.reference(name);
            }
            return;
        }
        let Some(name) = object else {
            self.skip(SkipReason::NullObjectName);
            return;
        };
        if !is_valid_object_name(name) {
            self.skip(SkipReason::InvalidObjectName);
            return;
        }
        if let Some(i) = self.reference(name) {
            if suspended {
                let kind = self.snapshot.backends[i].kind;
                self.backends.entry(kind).or_default().suspended_with_object += 1;
            }
            return;
        }
        let backend = self.attribute(name);
        if live {
            self.backends
                .entry(backend)
                .or_default()
                .live_without_object += 1;
            return;
        }
        let Some(updated_at) = row.updated_at else {
            self.skip(SkipReason::NullUpdatedAt);
            return;
        };
        if updated_at > self.cutoff {
            self.within_grace += 1;
            return;
        }
        self.orphans.push(OrphanedRow {
            key: row.key.clone(),
            object: name.to_string(),
            state: state.to_string(),
            updated_at,
            backend,
        });
    }

    /// Applies the guard and the cap and returns the plan.
    pub fn finish(mut self) -> Plan {
        for (i, view) in self.snapshot.backends.iter().enumerate() {
            let counts = self.backends.entry(view.kind).or_default();
            counts.untracked_objects = (view.len() - self.referenced[i].len()) as u64;
        }
        for orphan in &self.orphans {
            self.backends
                .entry(orphan.backend)
                .or_default()
                .orphaned_suspended += 1;
        }
        let live_missing: u64 = self.backends.values().map(|c| c.live_without_object).sum();
        let total_objects: usize = self.snapshot.backends.iter().map(|b| b.len()).sum();
        let guard = if total_objects == 0 && self.live_rows > 0 {
            GuardVerdict::Refuse {
                reason: RefusalReason::EmptyListing,
                detail: format!(
                    "the cluster listing is empty but {} rows are in live states; check cluster.namespaces, the backends' label selectors and RBAC",
                    self.live_rows
                ),
            }
        } else if live_missing >= self.policy.min_live_missing.max(1)
            && live_missing as f64 > self.policy.max_live_missing_ratio * self.live_rows as f64
        {
            GuardVerdict::Refuse {
                reason: RefusalReason::LiveRowsMissing,
                detail: format!(
                    "{live_missing} of {} live rows have no object either (more than {:.0}%); the namespace, label selector or RBAC is probably wrong",
                    self.live_rows,
                    self.policy.max_live_missing_ratio * 100.0
                ),
            }
        } else {
            GuardVerdict::Proceed
        };
        let orphans_found = self.orphans.len() as u64;
        let mut orphans = std::mem::take(&mut self.orphans);
        let (downgrades, deferred) = match guard {
            GuardVerdict::Proceed => {
                orphans.sort_by(|a, b| a.updated_at.cmp(&b.updated_at).then(a.key.cmp(&b.key)));
                let cap = self.policy.max_downgrades.min(orphans.len());
                let deferred = (orphans.len() - cap) as u64;
                orphans.truncate(cap);
                (orphans, deferred)
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
    use crate::cluster::{BackendView, ObjectFacts};

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
        let plan = plan(&snap, &p, &rows);
        let keys: Vec<_> = plan.downgrades.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, vec!["k9", "k8", "k7"]);
        assert_eq!(plan.deferred, 7);
        assert_eq!(plan.orphans_found, 10);
    }

    #[test]
    fn guard_refuses_when_most_live_rows_missing() {
        let snap = snapshot(&["x"], &[]);
        let rows = vec![
            row("a", "running", "gone-1", 60),
            row("b", "idle", "gone-2", 60),
            row("c", "running", "x", 60),
            row("d", "suspended", "gone-3", 60),
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
}
