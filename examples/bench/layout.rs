//! The data: one deterministic layout of rows and objects, shared by the database loader and
//! the fake cluster, and the rows themselves in COPY text format.

use std::fmt::Write as _;

use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::scenarios::Scenario;
use crate::Args;

/// splitmix64: a cheap, good-enough hash for deterministic per-row variety.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

pub(crate) fn rnd(seed: u64, i: usize, salt: u64) -> u64 {
    mix(seed ^ mix(((i as u64) << 8) | salt))
}

/// Object names as centaur gives them, pods and Sandboxes alike: one scheme,
/// `centaur-centaur-sandbox-<slug>-<sha10>`, so no `object_name_prefix` can tell the backends
/// apart and none is configured (a missing object is `unknown`, as on centaur's clusters).
pub(crate) const NAME_SCHEME: &str = "centaur-centaur-sandbox-bench-";

/// A bijective scramble of j on 40 bits (ten hex digits, as centaur's sha10), so names look
/// random but never collide.
fn scramble(j: u64) -> u64 {
    const MASK: u64 = (1 << 40) - 1;
    let y = j.wrapping_mul(0x5DEE_CE66_D1A5) & MASK;
    y ^ (y >> 21)
}

/// Which suspended rows the table holds besides the orphans and the paused Sandboxes' rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Shape {
    /// The shape of the earlier reference runs: the rest of the suspended share (`--suspended-pct`) are
    /// rows without an object updated within the grace period (sessions paused in the last
    /// hours), which no sweep and no naive script touches.
    Fresh,
    /// A real backlog: every suspended row is older than the grace period (pause is forever
    /// on the bare-pod backend: such a row is never resumed). A suspended row is then either
    /// an orphan or backed by its paused Sandbox; there are no other suspended rows (an old
    /// suspended row without an object would itself be an orphan).
    Backlog,
}

impl Shape {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Shape::Fresh => "fresh",
            Shape::Backlog => "backlog",
        }
    }
}

pub(crate) fn thread_key(i: usize) -> String {
    const CHANNELS: usize = 64;
    let channel = mix((i % CHANNELS) as u64) as u32;
    format!(
        "slack:C{channel:08X}:{}.{:06}",
        1_700_000_000 + i / CHANNELS,
        (i * 7919) % 1_000_000
    )
}

/// What one row is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot {
    /// Orphan number n: suspended with a missing object and old `updated_at` when n < k of the
    /// scenario, else gone (as after its clean-up).
    Designated(u32),
    /// Suspended, backed by paused Sandbox number t.
    Paused(u32),
    /// Suspended without object, but updated within the grace period.
    Fresh,
    /// Live row number l (its object, if any, follows from l).
    Live(u32),
    /// Other-state row number m.
    Other(u32),
    Gone,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Layout {
    pub(crate) rows: usize,
    pub(crate) pods: usize,
    pub(crate) sandboxes: usize,
    pub(crate) paused_sandboxes: usize,
    pub(crate) designated: usize,
    pub(crate) suspended: usize,
    pub(crate) fresh_suspended: usize,
    pub(crate) live: usize,
    pub(crate) live_with_object: usize,
    pub(crate) other: usize,
    pub(crate) other_with_object: usize,
    pub(crate) gone: usize,
    pub(crate) untracked_objects: usize,
    pub(crate) shape: Shape,
    /// Fresh suspended rows were updated within this many seconds (half the grace period).
    pub(crate) fresh_window_seconds: u64,
}

impl Layout {
    pub(crate) fn new(args: &Args, scenarios: &[Scenario]) -> Result<Layout> {
        let n = args.rows;
        let pct = |p: f64| ((n as f64) * p / 100.0).round() as usize;
        let paused = ((args.sandboxes as f64) * args.paused_sandbox_pct / 100.0).round() as usize;
        let paused = paused.min(args.sandboxes);
        let designated = scenarios.iter().map(|s| s.orphans(args)).max().unwrap_or(0);
        let mut suspended = match args.shape {
            Shape::Fresh => pct(args.suspended_pct),
            Shape::Backlog => designated + paused,
        };
        if suspended < designated + paused {
            eprintln!(
                "bench: {}% suspended rows are fewer than {designated} orphans + {paused} paused sandboxes; using {} suspended rows",
                args.suspended_pct,
                designated + paused
            );
            suspended = designated + paused;
        }
        let live = pct(args.live_pct);
        let other = pct(args.other_pct);
        if suspended + live + other > n {
            bail!("--rows {n} is too small for {suspended} suspended, {live} live and {other} other rows");
        }
        let running_sandboxes = args.sandboxes - paused;
        let live_with_object = live.min(args.pods + running_sandboxes);
        let spare_pods = args.pods.saturating_sub(live);
        let other_with_object = other.min(spare_pods);
        let referenced = paused + live_with_object + other_with_object;
        Ok(Layout {
            rows: n,
            pods: args.pods,
            sandboxes: args.sandboxes,
            paused_sandboxes: paused,
            designated,
            suspended,
            fresh_suspended: suspended - designated - paused,
            live,
            live_with_object,
            other,
            other_with_object,
            gone: n - suspended - live - other,
            untracked_objects: args.pods + args.sandboxes - referenced,
            shape: args.shape,
            fresh_window_seconds: (args.grace_seconds / 2).max(1),
        })
    }

    /// Every row's slot, shuffled deterministically.
    pub(crate) fn slots(&self, seed: u64) -> Vec<Slot> {
        let mut slots = Vec::with_capacity(self.rows);
        slots.extend((0..self.designated).map(|n| Slot::Designated(n as u32)));
        slots.extend((0..self.paused_sandboxes).map(|t| Slot::Paused(t as u32)));
        slots.extend((0..self.fresh_suspended).map(|_| Slot::Fresh));
        slots.extend((0..self.live).map(|l| Slot::Live(l as u32)));
        slots.extend((0..self.other).map(|m| Slot::Other(m as u32)));
        slots.extend((0..self.gone).map(|_| Slot::Gone));
        for i in (1..slots.len()).rev() {
            let j = (rnd(seed, i, 99) % (i as u64 + 1)) as usize;
            slots.swap(i, j);
        }
        slots
    }

    /// Object of live row l: pods first, then running sandboxes; `None` when objects ran out.
    pub(crate) fn live_object(&self, l: usize) -> Option<u64> {
        if l < self.pods {
            Some(l as u64)
        } else if l < self.live_with_object {
            Some((self.pods + self.paused_sandboxes + (l - self.pods)) as u64)
        } else {
            None
        }
    }

    pub(crate) fn missing_object(&self, i: usize) -> u64 {
        (self.pods + self.sandboxes + i) as u64
    }

    /// Object name of object index `j`: pods are 0..P, Sandboxes P..P+S, names that no object
    /// has start at P+S (those sessions' pods are gone). Distinct indexes get distinct names
    /// (the scramble is a bijection on 40 bits, far more than any run's objects).
    pub(crate) fn object_name(&self, j: u64) -> String {
        format!("{NAME_SCHEME}{:010x}", scramble(j))
    }
}

/// COPY text format helpers.
pub(crate) fn ts(buf: &mut String, t: DateTime<Utc>) {
    let _ = write!(buf, "{}", t.format("%Y-%m-%d %H:%M:%S%.6f+00"));
}

pub(crate) const HARNESSES: [&str; 3] = ["amp", "claude-code", "codex"];
pub(crate) const MODELS: [&str; 4] = [
    "claude-sonnet-4-5",
    "claude-opus-4-1",
    "gpt-5-codex",
    "claude-haiku-4-5",
];
pub(crate) const TOPICS: [&str; 8] = [
    "Fix flaky integration test in billing",
    "Investigate p99 latency regression",
    "Draft migration plan for sessions table",
    "Review PR: retry policy for webhooks",
    "Summarize incident 4711 timeline",
    "Add metrics to the ingest worker",
    "Bump dependencies and fix clippy",
    "Write runbook for cache eviction",
];

/// Appends one row in COPY text format; returns the designated line for orphan rows.
pub(crate) fn push_row(
    buf: &mut String,
    designated: &mut String,
    layout: &Layout,
    seed: u64,
    now: DateTime<Utc>,
    i: usize,
    slot: Slot,
) {
    let h = |salt: u64| rnd(seed, i, salt);
    let secs = |max: u64| chrono::Duration::microseconds((h(1) % (max * 1_000_000)) as i64);
    let day = 86_400u64;
    let (state, object, updated_at): (&str, u64, DateTime<Utc>) = match slot {
        Slot::Designated(_) => (
            "gone",
            layout.missing_object(i),
            now - chrono::Duration::days(2) - secs(58 * day),
        ),
        Slot::Paused(t) => (
            "suspended",
            (layout.pods + t as usize) as u64,
            now - chrono::Duration::days(1) - secs(29 * day),
        ),
        Slot::Fresh => (
            "suspended",
            layout.missing_object(i),
            now - secs(layout.fresh_window_seconds),
        ),
        Slot::Live(l) => {
            let state = match h(2) % 20 {
                0 => "delivering",
                1..=7 => "idle",
                _ => "running",
            };
            let object = layout
                .live_object(l as usize)
                .unwrap_or_else(|| layout.missing_object(i));
            (state, object, now - secs(3 * day))
        }
        Slot::Other(m) => {
            let state = ["creating", "error", "stopped"][(h(2) % 3) as usize];
            let object = if (m as usize) < layout.other_with_object {
                (layout.live + m as usize) as u64
            } else {
                layout.missing_object(i)
            };
            (state, object, now - secs(30 * day))
        }
        Slot::Gone => ("gone", layout.missing_object(i), now - secs(365 * day)),
    };
    let key = thread_key(i);
    let object = layout.object_name(object);
    let agent_thread = format!("T-{}", uuid::Uuid::from_u64_pair(h(3), i as u64));
    let started_at = updated_at - chrono::Duration::seconds((h(4) % (7 * day)) as i64);
    let harness = HARNESSES[(h(5) % 3) as usize];
    let n = "\\N";
    // thread_key, sandbox_id, harness, engine, state, last_delivered_id, thread_name
    let _ = write!(
        buf,
        "{key}\t{object}\t{harness}\t{harness}\t{state}\t{}.{:06}\t{} (#{i})\t",
        1_700_000_000 + h(6) % 50_000_000,
        h(7) % 1_000_000,
        TOPICS[(h(8) % 8) as usize]
    );
    // started_at, updated_at, agent_thread_id
    ts(buf, started_at);
    buf.push('\t');
    ts(buf, updated_at);
    buf.push('\t');
    if state == "gone" {
        buf.push_str(n);
    } else {
        buf.push_str(&agent_thread);
    }
    buf.push('\t');
    // inflight_turn_id, inflight_turn_input, inflight_started_at, inflight_attempts
    if state == "delivering" {
        let _ = write!(
            buf,
            "turn-{:016x}\t{{\"text\": \"please continue with the next step\", \"attachments\": []}}\t",
            h(9)
        );
        ts(buf, updated_at);
        buf.push_str("\t1\t");
    } else {
        let _ = write!(buf, "{n}\t{n}\t{n}\t0\t");
    }
    // last_result, last_result_at
    match h(10) % 4 {
        0 => {
            let _ = write!(buf, "{n}\t{n}\t");
        }
        1 => {
            buf.push_str("error: sandbox exited with code 137\t");
            ts(buf, updated_at);
            buf.push('\t');
        }
        _ => {
            buf.push_str("ok\t");
            ts(buf, updated_at);
            buf.push('\t');
        }
    }
    // wire_lease_id, wire_connected_at, wire_last_seen_at
    if state == "running" {
        let _ = write!(buf, "lease-{:016x}\t", h(11));
        ts(buf, started_at);
        buf.push('\t');
        ts(buf, updated_at);
        buf.push('\t');
    } else {
        let _ = write!(buf, "{n}\t{n}\t{n}\t");
    }
    // trace_id, model
    let _ = writeln!(
        buf,
        "{}\t{}",
        uuid::Uuid::from_u64_pair(h(12), i as u64),
        MODELS[(h(13) % 4) as usize]
    );
    if let Slot::Designated(d) = slot {
        let _ = write!(designated, "{d}\t{key}\t{object}\t");
        ts(designated, updated_at);
        let _ = writeln!(designated, "\t{agent_thread}");
    }
}

pub(crate) const COPY_COLUMNS: &str =
    "thread_key, sandbox_id, harness, engine, state, last_delivered_id, \
    thread_name, started_at, updated_at, agent_thread_id, inflight_turn_id, inflight_turn_input, \
    inflight_started_at, inflight_attempts, last_result, last_result_at, wire_lease_id, \
    wire_connected_at, wire_last_seen_at, trace_id, model";
