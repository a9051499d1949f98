//! The report: the verdicts against the targets, and the markdown table. Every target that is
//! a ratio compares two scenarios of the same run.

use std::fmt::Write as _;

use sandbox_reconciler::config::Settings;
use serde::Serialize;

use crate::layout::{Layout, Shape};
use crate::load::LoadFigures;
use crate::measure::Machine;
use crate::scenarios::Measurement;
use crate::{Args, MIB};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Verdict {
    pub(crate) target: String,
    pub(crate) measured: String,
    pub(crate) limit: String,
    pub(crate) met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Results {
    pub(crate) args: Args,
    pub(crate) layout: Layout,
    pub(crate) machine: Machine,
    pub(crate) load: LoadFigures,
    pub(crate) scenarios: Vec<Measurement>,
    pub(crate) verdicts: Vec<Verdict>,
}

pub(crate) fn find<'a>(ms: &'a [Measurement], name: &str) -> Option<&'a Measurement> {
    ms.iter().find(|m| m.scenario == name)
}

/// Namespace GETs of every sweep's scope check (rule 10): kube-system and the one namespace.
const SCOPE_GETS: u64 = 2;
const DB_PER_BATCH: u64 = 4;
const DB_CONSTANT: u64 = 40;

pub(crate) fn confirm_get_max(args: &Args) -> usize {
    args.confirm_get_max
        .unwrap_or_else(|| Settings::default().cluster.confirm_get_max)
}

pub(crate) fn verdicts(args: &Args, layout: &Layout, ms: &[Measurement]) -> Vec<Verdict> {
    let mut v = Vec::new();
    let mut push = |target: String, measured: String, limit: String, met: bool| {
        v.push(Verdict {
            target,
            measured,
            limit,
            met,
        })
    };
    let pages = |n: usize| n.div_ceil(args.page_size as usize).max(1) as u64;
    let list_pages = pages(layout.pods) + pages(layout.sandboxes);
    let get_max = confirm_get_max(args);
    let size = format!(
        "{} rows / {} objects",
        layout.rows,
        layout.pods + layout.sandboxes
    );

    if let Some(m) = find(ms, "daemon") {
        push(
            format!(
                "daemon steady-state sweep wall ({size}, {} orphans)",
                m.orphans
            ),
            format!("{:.3} s", m.wall_seconds),
            "≤ 1.0 s".into(),
            m.wall_seconds <= 1.0,
        );
        push(
            "daemon steady-state API requests per sweep (watches excluded)".into(),
            format!(
                "{} ({} list, {} get; {} watch)",
                m.api_requests, m.requests.list, m.requests.get, m.requests.watch
            ),
            "≤ 10".into(),
            m.api_requests <= 10,
        );
        push(
            "daemon RSS with the cache filled (peak during the sweep)".into(),
            format!(
                "{:.0} MiB = {:.0} MB",
                m.rss_peak_mib,
                m.rss_peak_mib * MIB / 1e6
            ),
            "≤ 150 MB".into(),
            m.rss_peak_mib * MIB <= 150e6,
        );
    }
    for m in ms.iter().filter(|m| m.scenario.starts_with("daemon")) {
        let k = m.orphans as u64;
        let confirm = if m.orphans == 0 {
            0
        } else if m.orphans <= get_max {
            // centaur's names carry no prefix, so an orphan is `unknown`: one GET per backend.
            2 * k
        } else {
            // Proving the cache fresh reads the revision of every informer (unknown orphans).
            2
        };
        let bound = SCOPE_GETS + confirm;
        push(
            format!("API requests, {} (as designed)", m.scenario),
            m.api_requests.to_string(),
            format!(
                "≤ {bound} = {SCOPE_GETS} scope GETs + {}",
                if m.orphans == 0 {
                    "0".to_string()
                } else if m.orphans <= get_max {
                    format!("1 GET (of its backend) × {k} orphans (≤ confirm_get_max {get_max})")
                } else {
                    "1 revision read of the orphans' backend (cache proven fresh)".to_string()
                }
            ),
            m.api_requests <= bound,
        );
    }
    for m in ms.iter().filter(|m| m.scenario.starts_with("once")) {
        let bound = list_pages + SCOPE_GETS;
        push(
            format!("API requests, {} (as designed)", m.scenario),
            m.api_requests.to_string(),
            format!(
                "≤ {bound} = ⌈{}/{p}⌉ + ⌈{}/{p}⌉ pages + {SCOPE_GETS} scope GETs, no confirming GET",
                layout.pods,
                layout.sandboxes,
                p = args.page_size
            ),
            m.api_requests <= bound,
        );
    }
    if let Some(f) = find(ms, "floor-audit") {
        for name in ["daemon-cleanup", "once-cleanup"] {
            if let Some(c) = find(ms, name) {
                let ratio = c.wall_seconds / f.wall_seconds;
                push(
                    format!("{name} of {} orphans vs `floor-audit`", c.orphans),
                    format!(
                        "{:.2} s / {:.2} s = {ratio:.2}×",
                        c.wall_seconds, f.wall_seconds
                    ),
                    "≤ 1.5×".into(),
                    ratio <= 1.5,
                );
            }
        }
    }
    if let (Some(o), Some(l), Some(r)) = (
        find(ms, "once"),
        find(ms, "list-floor"),
        find(ms, "read-floor"),
    ) {
        let floor = l.wall_seconds + r.wall_seconds;
        let ratio = o.wall_seconds / floor;
        push(
            format!("--once ({size}) vs bare listing + database read"),
            format!(
                "{:.3} s / ({:.3} + {:.3} = {floor:.3} s) = {ratio:.2}×",
                o.wall_seconds, l.wall_seconds, r.wall_seconds
            ),
            "≤ 1.3×".into(),
            ratio <= 1.3,
        );
    }
    if let (Some(s), Some(n)) = (find(ms, "once-naive"), find(ms, "naive")) {
        let ratio = n.wall_seconds / s.wall_seconds;
        push(
            format!(
                "--once vs the naive script ({size}, {} orphans, {} shape)",
                s.orphans,
                layout.shape.name()
            ),
            format!(
                "{:.2} s / {:.3} s = {ratio:.1}×",
                n.wall_seconds, s.wall_seconds
            ),
            "≥ 30×".into(),
            ratio >= 30.0,
        );
    }
    for m in ms
        .iter()
        .filter(|m| m.scenario.starts_with("daemon") || m.scenario.starts_with("once"))
    {
        if let Some(rt) = m.db_round_trips {
            let batches = m.orphans.div_ceil(args.batch_size) as u64;
            let bound = batches * DB_PER_BATCH + DB_CONSTANT;
            push(
                format!("DB round trips, {}", m.scenario),
                rt.to_string(),
                format!(
                    "≤ {bound} = ⌈{}/{}⌉×{DB_PER_BATCH} + {DB_CONSTANT}",
                    m.orphans, args.batch_size
                ),
                rt <= bound,
            );
        }
    }
    v
}

pub(crate) fn fmt_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "–".to_string(), |v| v.to_string())
}

pub(crate) fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let a = &r.args;
    let l = &r.layout;
    let _ = writeln!(
        s,
        "## sandbox-reconciler benchmark\n\n\
         {} rows ({} gone, {} suspended of which {} paused-sandbox and {} fresh, {} live of which {} with an object, {} other; {} shape), \
         {} pods, {} sandboxes ({} paused), {} untracked objects ({} objects).\n\n\
         Settings: page size {}, batch size {}, confirm concurrency {}, confirm_get_max {}, grace {} s, request timeout {} s; \
         fake API: bookmarks every {} ms, churn elsewhere every {} ms during the daemon scenarios, latency {} ms. \
         Timed runs: {} (steady scenarios and floors), {} (clean-ups, naive, SQL floors); the median run is shown.\n",
        l.rows, l.gone, l.suspended, l.paused_sandboxes, l.fresh_suspended, l.live, l.live_with_object, l.other,
        l.shape.name(),
        l.pods, l.sandboxes, l.paused_sandboxes, l.untracked_objects,
        if a.lean_objects { "lean" } else { "realistic: managedFields, annotations, spec, status" },
        a.page_size, a.batch_size, a.confirm_concurrency, confirm_get_max(a), a.grace_seconds, a.request_timeout_seconds,
        a.bookmark_interval_ms, a.churn_ms, a.api_latency_ms,
        a.repeat.max(1), a.repeat_cleanup.max(1)
    );
    if l.shape == Shape::Backlog {
        let _ = writeln!(
            s,
            "Backlog shape: every suspended row is older than the grace period; `--suspended-pct` is not used (suspended = orphans + paused-Sandbox rows).\n"
        );
    }
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}, {}; shared_buffers {}, synchronous_commit {}, database connections {}. \
         Load: {:.1} s ({:.0} rows/s), table {:.0} MiB + indexes {:.0} MiB. Fake API server process: {:.0} MiB RSS.\n",
        m.nproc, m.cpu_model, m.memory_gib, m.kernel,
        m.postgres.split(" on ").next().unwrap_or(&m.postgres),
        m.shared_buffers, m.synchronous_commit, if m.tls { "with TLS" } else { "without TLS" }, r.load.seconds, r.load.rows_per_second,
        r.load.table_mib, r.load.indexes_mib, m.fake_api_rss_mib
    );
    for x in &r.scenarios {
        if let Some(c) = &x.cache_startup {
            let _ = writeln!(
                s,
                "Watch cache start-up (before `{}`, not timed in it): synced in {:.2} s with {} objects; {} list requests, {} watch requests, {} watches open; process RSS {:.0} → {:.0} MiB.\n",
                x.scenario, c.seconds, c.objects, c.requests.list, c.requests.watch, c.open_watches,
                c.rss_before_mib, c.rss_synced_mib
            );
        }
    }
    let _ = writeln!(
        s,
        "| scenario | orphans | ok | wall s | view / read / confirm (wait) / apply s | confirmation | API requests: list + get (watch) | DB round trips | RSS start → peak MiB | CPU s: self / fake API / machine | load avg |"
    );
    let _ = writeln!(s, "|---|---:|:-:|---:|---|---|---:|---:|---|---|---:|");
    for x in &r.scenarios {
        let phases = x.timings.as_ref().map_or_else(
            || match (x.naive_get_seconds, x.naive_db_seconds) {
                (Some(g), Some(d)) => format!("GETs {g:.2} / DB {d:.2}"),
                _ => "–".into(),
            },
            |t| {
                let wait = if t.confirm_wait > 0.0 {
                    format!(" (wait {:.3})", t.confirm_wait)
                } else {
                    String::new()
                };
                format!(
                    "{:.3} / {:.3} / {:.3}{wait} / {:.3}",
                    t.list_cluster, t.read_db, t.confirm, t.apply
                )
            },
        );
        let runs = if x.wall_seconds_runs.len() > 1 {
            format!(
                " ({})",
                x.wall_seconds_runs
                    .iter()
                    .map(|w| format!("{w:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        };
        let confirmation = match (&x.confirmation, x.confirmation_requests) {
            (Some(c), Some(n)) if n > 0 => format!("{c} ({n} req.)"),
            (Some(c), _) => c.clone(),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3}{} | {} | {} | {} + {} ({}) | {} | {:.0} → {:.0} | {:.2} / {:.2} / {:.2} | {:.1} |",
            x.scenario,
            x.orphans,
            if x.ok { "✓" } else { "✗" },
            x.wall_seconds,
            runs,
            phases,
            confirmation,
            x.requests.list,
            x.requests.get + x.requests.other,
            x.requests.watch,
            fmt_opt(x.db_round_trips),
            x.rss_start_mib,
            x.rss_peak_mib,
            x.cpu_self_seconds,
            x.cpu_fake_api_seconds,
            x.cpu_machine_seconds,
            x.load_average
        );
    }
    let _ = writeln!(s);
    for x in &r.scenarios {
        if let Some(e) = &x.cache_events {
            let relists: u64 = e.relists.values().sum();
            if relists > 0 || e.watch_restarts > 0 {
                let _ = writeln!(
                    s,
                    "`{}`: the cache relisted {relists} times ({:?}) and restarted its watches {} times during the run.",
                    x.scenario, e.relists, e.watch_restarts
                );
            }
        }
    }
    if let Some(n) = find(&r.scenarios, "naive") {
        let _ = writeln!(
            s,
            "Naive script: {} candidates (suspended rows older than the grace period) examined with {} GETs in {:.2} s, {} downgraded with {} database round trips in {:.2} s; {:.2} ms per candidate.",
            fmt_opt(n.naive_candidates),
            n.requests.get,
            n.naive_get_seconds.unwrap_or(0.0),
            n.downgraded,
            fmt_opt(n.db_round_trips),
            n.naive_db_seconds.unwrap_or(0.0),
            n.wall_seconds * 1e3 / n.naive_candidates.unwrap_or(1).max(1) as f64
        );
    }
    if let Some(c) = find(&r.scenarios, "floor") {
        if let Some(f) = find(&r.scenarios, "floor-audit") {
            let _ = writeln!(
                s,
                "SQL floors for {} rows: `floor` {:.2} s, `floor-audit` {:.2} s.",
                c.orphans, c.wall_seconds, f.wall_seconds
            );
        }
    }
    let _ = writeln!(
        s,
        "\nTargets (docs/PERFORMANCE.md; each ratio within this run):\n\n\
         | target | measured | limit | met |\n|---|---|---|:-:|"
    );
    for v in &r.verdicts {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            v.target,
            v.measured,
            v.limit,
            if v.met { "✓" } else { "✗" }
        );
    }
    s
}
