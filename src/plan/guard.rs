//! The guards over a whole table's counts ([`Planner::guard`]), in the order the module
//! header of `plan` lists them; the first that refuses decides.

use super::{GuardVerdict, Planner, RefusalReason};
use crate::snapshot::{BackendKind, BackendView};

impl Planner<'_> {
    /// The guards' verdict over the counts of a whole snapshot (see the module comment).
    pub(super) fn guard(&self) -> GuardVerdict {
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
}

fn refuse(reason: RefusalReason, detail: String) -> GuardVerdict {
    GuardVerdict::Refuse { reason, detail }
}
