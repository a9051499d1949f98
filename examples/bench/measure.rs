//! Process and machine figures: CPU seconds, resident memory, load, and what the machine is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use sqlx::{Connection, PgConnection};

pub(crate) fn status_kb(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

extern "C" {
    pub(crate) fn malloc_trim(pad: usize) -> i32;
    pub(crate) fn sysconf(name: i32) -> i64;
}

pub(crate) fn clock_ticks() -> f64 {
    // _SC_CLK_TCK = 2 on Linux.
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { sysconf(2) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of a process (`self` or a pid).
pub(crate) fn cpu_seconds(pid: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / clock_ticks()
}

/// The 1-minute load average.
pub(crate) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Busy CPU seconds of the whole machine (all cores).
pub(crate) fn machine_busy_seconds() -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = text.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, x)| x)
        .sum();
    busy / clock_ticks()
}

/// Peak resident memory of this process during a scenario: VmHWM after resetting it through
/// /proc/self/clear_refs, and a 5 ms VmRSS sampler as a cross-check (and fallback).
pub(crate) struct RssWatch {
    pub(crate) start_kb: u64,
    /// Only when VmHWM could not be reset (sampling costs a few percent of a core).
    pub(crate) sampler: Option<(Arc<AtomicBool>, std::thread::JoinHandle<u64>)>,
}

impl RssWatch {
    pub(crate) fn start() -> RssWatch {
        // SAFETY: malloc_trim only returns free heap memory to the kernel.
        unsafe {
            malloc_trim(0);
        }
        let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let start_kb = status_kb("VmRSS").unwrap_or(0);
        let sampler = (!hwm_reset).then(|| {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut peak = 0;
                while !flag.load(Ordering::Relaxed) {
                    peak = peak.max(status_kb("VmRSS").unwrap_or(0));
                    std::thread::sleep(Duration::from_millis(10));
                }
                peak.max(status_kb("VmRSS").unwrap_or(0))
            });
            (stop, thread)
        });
        RssWatch { start_kb, sampler }
    }

    /// (start MiB, peak MiB, how the peak was measured)
    pub(crate) fn finish(self) -> (f64, f64, &'static str) {
        let (peak, how) = match self.sampler {
            None => (
                status_kb("VmHWM").unwrap_or(0),
                "VmHWM (reset by clear_refs)",
            ),
            Some((stop, thread)) => {
                stop.store(true, Ordering::Relaxed);
                (thread.join().unwrap_or(0), "VmRSS sampled every 10 ms")
            }
        };
        (self.start_kb as f64 / 1024.0, peak as f64 / 1024.0, how)
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) memory_gib: f64,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    pub(crate) postgres: String,
    pub(crate) shared_buffers: String,
    pub(crate) synchronous_commit: String,
    /// Whether the timed pass's database connections use TLS (sslmode of --admin-url).
    pub(crate) tls: bool,
    pub(crate) fake_api_rss_mib: f64,
}

pub(crate) async fn machine(bench_url: &str, fake_rss: f64) -> Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let memory_kb: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut conn = PgConnection::connect(bench_url).await?;
    let postgres: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut conn)
        .await?;
    let shared_buffers: String = sqlx::query_scalar("SHOW shared_buffers")
        .fetch_one(&mut conn)
        .await?;
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut conn)
        .await?;
    let tls: bool = sqlx::query_scalar(
        "SELECT coalesce(bool_or(ssl), false) FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    Ok(Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: memory_kb / 1024.0 / 1024.0,
        cpu_model,
        kernel,
        postgres,
        shared_buffers,
        synchronous_commit,
        tls,
        fake_api_rss_mib: fake_rss,
    })
}
