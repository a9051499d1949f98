//! The oracle: after the run, every downgrade is judged against what the simulator knows,
//! one function per rule (the rules are listed in the documentation of the `soak` module);
//! then the one-writer rule, and every row's history.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use super::clock::ClockOffset;
use super::db::AuditDowngrade;
use super::logs::LogFacts;
use super::report::{SoakReport, WrongDowngrade};
use super::sim::{AppWrite, ObjectLife, RowFate, SimState, Version, UNKNOWN_HISTORY};

/// Evidence that the interesting interleavings happened, by name.
type Races = BTreeMap<String, u64>;

/// Judges every downgrade on its own (rules 1 to 5), the apply transactions of the sweeps
/// together (one writer), and every row's history (one chain of versions).
pub(crate) fn judge(
    st: &SimState,
    audits: &[AuditDowngrade],
    rows: &HashMap<String, Version>,
    clock: &ClockOffset,
    report: &mut SoakReport,
) {
    report.downgrades = audits.len() as u64;
    for d in audits {
        *report
            .downgrades_by_backend
            .entry(d.backend.clone())
            .or_default() += 1;
    }
    let mut races = Races::new();
    for d in audits {
        judge_downgrade(st, d, clock, &mut races, report);
    }
    report.wrong_downgrades = report.wrong.len() as u64;
    check_one_writer(audits, &mut races, report);
    check_row_histories(st, audits, rows, &mut races, report);
    let slow = st
        .writes
        .values()
        .flatten()
        .filter(|w| w.committed - w.new.updated_at > chrono::Duration::milliseconds(200))
        .count() as u64;
    races.insert("app_versions_committed_200ms_after_updated_at".into(), slow);
    report.races = races;
}

// ---------------------------------------------------------------------------------------------
// Each downgrade on its own: was it right at the moment it was made?

fn judge_downgrade(
    st: &SimState,
    d: &AuditDowngrade,
    clock: &ClockOffset,
    races: &mut Races,
    report: &mut SoakReport,
) {
    let writes = st
        .writes
        .get(d.session_key.as_str())
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let life = st.objects.get(&d.object);
    let kind = life.map_or("unknown".to_string(), |l| {
        format!("{:?}", l.kind).to_lowercase()
    });
    *report.downgrades_by_object_kind.entry(kind).or_default() += 1;
    let listing_started_at = d.evidence["listing_started_at"]
        .as_str()
        .and_then(|s| s.parse::<DateTime<Utc>>().ok());

    let mut reasons = Vec::new();
    reasons.extend(rule1_suspended_to_gone(d));
    let (overwritten, wrong_version) = rule2_overwrote_a_suspended_version(writes, d);
    reasons.extend(wrong_version);
    if let Some(i) = overwritten {
        reasons.extend(rule3_no_newer_version_committed(&writes[i + 1..], d, clock));
        check_cleared_thread(d, &writes[i], report);
    }
    reasons.extend(rule4_object_absent(
        life,
        d,
        clock,
        listing_started_at,
        races,
    ));
    reasons.extend(rule5_outside_the_grace_period(d, listing_started_at));
    if !reasons.is_empty() {
        report.wrong.push(WrongDowngrade {
            audit_id: d.id,
            sweep_id: d.sweep_id.clone(),
            session_key: d.session_key.clone(),
            object: d.object.clone(),
            at: d.at,
            listing_started_at,
            old_updated_at: d.old_updated_at,
            reasons,
            evidence: d.evidence.clone(),
            object_life: life.map_or("unknown".into(), |l| l.show(&d.object)),
            row_history: writes
                .iter()
                .map(|w| {
                    format!(
                        "{} -> {} (started {}, committed {})",
                        w.op,
                        w.new.show(),
                        w.started.format("%H:%M:%S%.6f"),
                        w.committed.format("%H:%M:%S%.6f")
                    )
                })
                .collect(),
        });
    }
}

/// Rule 1: a downgrade takes a `suspended` row to `gone`, nothing else.
fn rule1_suspended_to_gone(d: &AuditDowngrade) -> Option<String> {
    (d.old_state != "suspended" || d.new_state != "gone").then(|| {
        format!(
            "changed state {} -> {}, not suspended -> gone",
            d.old_state, d.new_state
        )
    })
}

/// Rule 2: the application wrote the version the downgrade claims to have overwritten (same
/// `updated_at` and object), and that version was `suspended`. Returns the version's index in
/// `writes`, if found, and what is wrong.
fn rule2_overwrote_a_suspended_version(
    writes: &[AppWrite],
    d: &AuditDowngrade,
) -> (Option<usize>, Option<String>) {
    let found = writes
        .iter()
        .position(|w| Some(w.new.updated_at) == d.old_updated_at && w.new.object == d.object);
    match found {
        None => (
            None,
            Some(format!(
                "the application never wrote the version it overwrote (object {}, updated_at {:?})",
                d.object, d.old_updated_at
            )),
        ),
        Some(i) => {
            let v = &writes[i];
            let wrong = (v.new.state != "suspended").then(|| {
                format!(
                    "the version it overwrote was {} (written by {}), not suspended",
                    v.new.state, v.op
                )
            });
            (Some(i), wrong)
        }
    }
}

/// Rule 3: the application had not *committed* a newer version of the row (its COMMIT had
/// not returned) when the downgrade's transaction began: a correct conditional UPDATE cannot
/// overwrite a version that is no longer the row's. `later` are the versions written after
/// the overwritten one.
fn rule3_no_newer_version_committed(
    later: &[AppWrite],
    d: &AuditDowngrade,
    clock: &ClockOffset,
) -> Option<String> {
    let newer = later
        .iter()
        .find(|w| clock.latest_db(w.committed) <= d.at)?;
    Some(format!(
        "the application had committed a newer version before the downgrade's transaction began: {} wrote {} (COMMIT returned {}, downgrade at {})",
        newer.op,
        newer.new.show(),
        newer.committed.format("%H:%M:%S%.6f"),
        d.at.format("%H:%M:%S%.6f")
    ))
}

/// Not a rule of the downgrade but of the row's history: the audit record holds the
/// `agent_thread_id` the downgrade cleared, which is the overwritten version's.
fn check_cleared_thread(d: &AuditDowngrade, overwritten: &AppWrite, report: &mut SoakReport) {
    let cleared = d.cleared["agent_thread_id"].as_str();
    if cleared != overwritten.new.agent_thread_id.as_deref() {
        report.row_problems.push(format!(
            "audit #{} of {}: cleared agent_thread_id {:?}, but the row held {:?}",
            d.id, d.session_key, cleared, overwritten.new.agent_thread_id
        ));
        report.rows_inconsistent += 1;
    }
}

/// Rule 4: the object did not exist when the downgrade's transaction began (created before,
/// not yet removed, terminating or not). Names are never reused and an object is created
/// before any row names it, so such an object existed throughout the sweep and both the
/// listing and the confirming GET must have seen it. Counts the objects removed while the
/// sweep ran (a race the soak wants to see).
fn rule4_object_absent(
    life: Option<&ObjectLife>,
    d: &AuditDowngrade,
    clock: &ClockOffset,
    listing_started_at: Option<DateTime<Utc>>,
    races: &mut Races,
) -> Option<String> {
    let Some(life) = life else {
        return Some(format!(
            "object {} was never created by the simulator",
            d.object
        ));
    };
    if life.existed_at_db(d.at, clock) {
        return Some(format!(
            "the object existed when the downgrade's transaction began ({})",
            life.show(&d.object)
        ));
    }
    if listing_started_at.is_some_and(|start| life.existed_at_db(start, clock)) {
        *races
            .entry("object_removed_during_the_sweep".into())
            .or_default() += 1;
    }
    None
}

/// Rule 5: the overwritten version was older than the grace period when the listing started
/// (`evidence.listing_started_at`, a time of the database's clock, as `updated_at` and the
/// downgrade's transaction time are), and the listing started before the downgrade's
/// transaction.
fn rule5_outside_the_grace_period(
    d: &AuditDowngrade,
    listing_started_at: Option<DateTime<Utc>>,
) -> Vec<String> {
    let grace = d.evidence["grace_period_seconds"].as_i64();
    let (Some(start), Some(grace), Some(old)) = (listing_started_at, grace, d.old_updated_at)
    else {
        return vec![format!(
            "the audit record lacks listing_started_at / grace_period_seconds / old_updated_at: evidence {}",
            d.evidence
        )];
    };
    let mut reasons = Vec::new();
    // `start`, `old` and `d.at` are all times of the database's clock.
    if old > start - chrono::Duration::seconds(grace) {
        reasons.push(format!(
            "the row was within the grace period: updated_at {old}, listing started {start}, grace {grace}s"
        ));
    }
    if start > d.at {
        reasons.push(format!(
            "the listing started ({start}) after the downgrade's transaction ({})",
            d.at
        ));
    }
    reasons
}

// ---------------------------------------------------------------------------------------------
// The sweeps together, and the rows

/// One writer: the apply transactions of two sweeps never interleave. (A necessary condition
/// only: sweeps that wrote nothing leave no trace here.)
fn check_one_writer(audits: &[AuditDowngrade], races: &mut Races, report: &mut SoakReport) {
    struct Span<'a> {
        sweep: &'a str,
        first: DateTime<Utc>,
        last: DateTime<Utc>,
    }
    let mut spans: BTreeMap<&str, Span> = BTreeMap::new();
    for d in audits {
        let span = spans.entry(d.sweep_id.as_str()).or_insert(Span {
            sweep: d.sweep_id.as_str(),
            first: d.at,
            last: d.at,
        });
        span.first = span.first.min(d.at);
        span.last = span.last.max(d.at);
    }
    let mut spans: Vec<Span> = spans.into_values().collect();
    spans.sort_by_key(|s| s.first);
    let mut writing: Option<&Span> = None;
    for span in &spans {
        if let Some(w) = writing {
            if span.first < w.last {
                report.problems.push(format!(
                    "one writer violated: sweep {} wrote at {} while sweep {} was still writing (until {})",
                    span.sweep, span.first, w.sweep, w.last
                ));
            }
        }
        if writing.is_none_or(|w| span.last > w.last) {
            writing = Some(span);
        }
    }
    races.insert("sweeps_that_downgraded".into(), spans.len() as u64);
}

/// Every row: created by the application and still there, its history one chain of versions
/// ending in the row as it is now; no row the application never wrote.
fn check_row_histories(
    st: &SimState,
    audits: &[AuditDowngrade],
    rows: &HashMap<String, Version>,
    races: &mut Races,
    report: &mut SoakReport,
) {
    let mut by_key: HashMap<&str, Vec<&AuditDowngrade>> = HashMap::new();
    for d in audits {
        by_key.entry(d.session_key.as_str()).or_default().push(d);
    }
    report.sessions_created = st.writes.len() as u64;
    report.rows_in_table = rows.len() as u64;
    for v in rows.values() {
        *report.final_states.entry(v.state.clone()).or_default() += 1;
    }
    for (key, writes, fate) in st.written_rows(rows) {
        let row = match fate {
            RowFate::Present(row) => row,
            RowFate::Lost => {
                report.rows_lost += 1;
                report.row_problems.push(format!(
                    "{key}: created by the application, missing from the table"
                ));
                continue;
            }
            RowFate::Unknown => {
                report
                    .row_problems
                    .push(format!("{key}: {UNKNOWN_HISTORY}"));
                continue;
            }
        };
        let downgrades = by_key.get(key).cloned().unwrap_or_default();
        let problems = check_row_history(writes, row, &downgrades, races);
        if !problems.is_empty() {
            report.rows_inconsistent += 1;
            for p in problems {
                report.row_problems.push(format!("{key}: {p}"));
            }
        }
    }
    for key in rows.keys() {
        if !st.writes.contains_key(key) {
            report.rows_inconsistent += 1;
            report.row_problems.push(format!(
                "{key}: in the table, never written by the application"
            ));
        }
    }
}

/// One row's history: each application write overwrote either the previous application
/// version or a downgrade of exactly that version; each downgrade appears exactly once; the
/// row as it is now is the chain's last version. Returns what is wrong.
fn check_row_history(
    writes: &[AppWrite],
    row: &Version,
    downgrades: &[&AuditDowngrade],
    races: &mut Races,
) -> Vec<String> {
    let mut used = vec![false; downgrades.len()];
    let mut problems = Vec::new();
    // The downgrade that took `from` to `to`, if any, not matched yet.
    let take = |from: &Version, to: &Version, used: &mut Vec<bool>| -> bool {
        let found = downgrades.iter().enumerate().position(|(j, d)| {
            !used[j]
                && d.old_updated_at == Some(from.updated_at)
                && d.object == from.object
                && d.new_updated_at == Some(to.updated_at)
                && to.state == "gone"
                && to.object == from.object
                && to.agent_thread_id.is_none()
        });
        if let Some(j) = found {
            used[j] = true;
        }
        found.is_some()
    };
    for i in 1..writes.len() {
        let before = &writes[i - 1].new;
        let Some(prev) = &writes[i].prev else {
            problems.push(format!(
                "write #{i} ({}) has no previous version",
                writes[i].op
            ));
            continue;
        };
        if prev == before {
            continue;
        }
        if take(before, prev, &mut used) {
            // Respawning a gone session is the normal flow; acting on a row read as
            // suspended that the reconciler downgraded meanwhile is the race.
            let race = if writes[i].seen_state.as_deref() == Some("gone") {
                "app_respawned_a_downgraded_session"
            } else {
                "app_overwrote_a_downgrade_it_had_not_seen"
            };
            *races.entry(race.into()).or_default() += 1;
            continue;
        }
        problems.push(format!(
            "write #{i} ({}) overwrote {}, but the previous version was {}",
            writes[i].op,
            prev.show(),
            before.show()
        ));
    }
    if let Some(last) = writes.last() {
        if *row != last.new && !take(&last.new, row, &mut used) {
            problems.push(format!(
                "the row is {}, but the last version written was {} ({})",
                row.show(),
                last.new.show(),
                last.op
            ));
        }
    }
    for (j, d) in downgrades.iter().enumerate() {
        if !used[j] {
            problems.push(format!(
                "downgrade audit #{} (from updated_at {:?} to {:?}) is not part of the row's history",
                d.id, d.old_updated_at, d.new_updated_at
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// What the processes said about their downgrades

/// Every downgrade in the audit table should have been reported by the process that made it
/// (rule 9: a sweep's report is what operators see). A commit whose acknowledgement was lost
/// (connection killed during COMMIT) or a process killed right after it explains a few; they
/// are listed, not counted as failures (the audit record, which the oracle judges, exists).
pub(crate) fn account_for_downgrades(
    audits: &[AuditDowngrade],
    logs: &LogFacts,
    report: &mut SoakReport,
) {
    let mut unlogged: BTreeMap<&str, u64> = BTreeMap::new();
    for d in audits {
        if !logs
            .downgraded
            .contains(&(d.sweep_id.clone(), d.session_key.clone()))
        {
            *unlogged.entry(d.sweep_id.as_str()).or_default() += 1;
        }
    }
    for (sweep, n) in unlogged {
        report.downgrades_not_reported += n;
        let outcome = match (logs.failed.get(sweep), logs.finished.contains(sweep)) {
            (Some(error), _) => format!(
                "SUSPICIOUS: sweep {sweep} logged \"sweep failed; nothing partial was written\" ({error}), yet {n} of its downgrade(s) are committed in the audit table"
            ),
            (None, true) => format!("sweep {sweep} finished but did not log {n} of its downgrade(s)"),
            (None, false) => format!(
                "sweep {sweep} logged no outcome ({n} downgrade(s) committed; its process was killed or its log lost)"
            ),
        };
        report.unreported_downgrades.push(outcome);
    }
}

/// Backends-without-prefixes variant: no configured prefix tells a pod's name from a
/// Sandbox's, so the reconciler must attribute every downgrade to `unknown`, never silently to
/// one of the backends.
pub(crate) fn check_attribution_without_prefixes(
    audits: &[AuditDowngrade],
    report: &mut SoakReport,
) {
    for d in audits {
        if d.backend != "unknown" {
            report.downgrades_misattributed += 1;
            report.attribution_problems.push(format!(
                "audit #{} of {} (object {}) says backend {:?}; with no distinguishing prefix it must be \"unknown\"",
                d.id, d.session_key, d.object, d.backend
            ));
        }
    }
}
