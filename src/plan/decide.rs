//! The one decision about one row ([`decide`]): its state class, whether any backend lists an
//! object of its name, the backend a missing object is attributed to, and the grace period.

use chrono::{DateTime, Utc};

use super::{Policy, RowVerdict, SessionRow, SkipReason};
use crate::snapshot::{BackendKind, BackendView, ClusterSnapshot, ObjectFacts};

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
pub(super) fn decide_marking(
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
