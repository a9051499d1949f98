//! The planner's unit tests: plain values in, verdicts and plans out.

use super::*;
use crate::snapshot::{BackendView, ObjectFacts};

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
