//! The shared-table variant: a second application, the other cluster's, writes rows of its
//! own scope under the same keys and object names; the checks that the reconciler never
//! touched them, and the evidence that they were a real temptation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use rand::rngs::StdRng;
use rand::Rng;
use tokio::sync::watch;

use super::clock::ClockOffset;
use super::db::{AuditDowngrade, AuditScope};
use super::report::OtherScopeReport;
use super::sim::{RowFate, Sim, SimSession, SimState, Version, UNKNOWN_HISTORY};
use super::{nap, pick};

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
    pub(crate) async fn mirror_step(
        &self,
        own: &Sim,
        rng: &mut StdRng,
        create_only: bool,
    ) -> Result<()> {
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
pub(crate) async fn other_scope_worker(
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

/// Shared-table variant: every audit record, of any action, belongs to the daemons' scope.
pub(crate) fn check_audit_scope(audit: &[AuditScope], own_scope: &str, o: &mut OtherScopeReport) {
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
pub(crate) fn check_untouched(
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
    for (key, writes, fate) in ost.written_rows(rows) {
        let row = match fate {
            RowFate::Present(row) => row,
            RowFate::Lost => {
                o.rows_lost += 1;
                o.problems.push(format!(
                    "{key}: written by the other scope's application, missing from the table"
                ));
                continue;
            }
            RowFate::Unknown => {
                o.problems.push(format!("{key}: {UNKNOWN_HISTORY}"));
                continue;
            }
        };
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
pub(crate) fn exposure(
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
