//! The fault switcher: one fault at a time, for a random while, against the fake API server,
//! the daemons' PostgreSQL connections, the daemons themselves, or the cluster's objects.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::watch;

use super::fleet::Fleet;
use super::sim::Sim;
use super::{lock, nap, pick};
use crate::fake_api::{FakeApiServer, Fault, FaultAction, FaultMatch, SANDBOX_GROUP};

const FAULT_KINDS: &[(&str, u32)] = &[
    ("list_500", 6),
    ("get_500", 4),
    ("list_503", 2),
    ("list_429_retry_after", 3),
    ("get_429", 2),
    ("expire_continue", 5),
    ("compact", 3),
    ("hang_short", 4),
    ("hang_long", 4),
    ("hang_confirm", 8),
    ("deny_list", 3),
    ("deny_get", 3),
    ("malformed_json", 4),
    ("wrong_kind", 2),
    ("item_without_name", 2),
    ("close_connection", 4),
    ("db_terminate", 5),
    ("mass_eviction", 2),
    ("replica_sigterm", 1),
    ("replica_sigkill", 1),
];

fn list_fault(resource: &str, action: FaultAction) -> Fault {
    Fault::on_list(resource, action)
}

/// What the fault switcher acts on.
pub(crate) struct FaultTargets {
    pub(crate) api: Arc<FakeApiServer>,
    pub(crate) sim: Arc<Sim>,
    pub(crate) fleet: Arc<tokio::sync::Mutex<Fleet>>,
    pub(crate) pool: PgPool,
    pub(crate) pg_port: u16,
    /// Faults injected, by kind.
    pub(crate) counts: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Wakes the `--once` runner (after the writer's connection was killed).
    pub(crate) kick_once: Arc<tokio::sync::Notify>,
}

/// Switches one fault on at a time, for a random while, with quiet gaps between.
pub(crate) async fn fault_switcher(
    targets: FaultTargets,
    stop: watch::Receiver<bool>,
    mut rng: StdRng,
) {
    let FaultTargets {
        api,
        sim,
        fleet,
        pool,
        pg_port,
        counts,
        kick_once,
    } = targets;
    loop {
        if nap(&stop, Duration::from_millis(rng.random_range(300..1500))).await {
            return;
        }
        let Some(kind) = pick(&mut rng, FAULT_KINDS) else {
            return;
        };
        let (resource, group, plural) = if rng.random_bool(0.5) {
            ("/pods", "", "pods")
        } else {
            ("/sandboxes", SANDBOX_GROUP, "sandboxes")
        };
        let on_get = rng.random_bool(0.5);
        let n = rng.random_range(1..=3usize);
        let mut injected = true;
        match kind {
            "list_500" => api.inject(Fault::on_list_page(
                resource,
                rng.random_range(0..3),
                FaultAction::Status(500, None),
            )),
            "get_500" => api.inject(Fault::on_get(resource, FaultAction::Status(500, None))),
            "list_503" => api.inject(list_fault(resource, FaultAction::Status(503, None)).times(n)),
            "list_429_retry_after" => {
                api.inject(list_fault(resource, FaultAction::Status(429, Some(1))).times(n))
            }
            "get_429" => {
                api.inject(Fault::on_get(resource, FaultAction::Status(429, Some(1))).times(n))
            }
            "expire_continue" => api.inject(Fault {
                matcher: FaultMatch {
                    method: Some("GET".into()),
                    path_contains: Some(resource.into()),
                    is_list: Some(true),
                    ..FaultMatch::default()
                },
                action: FaultAction::ExpireContinue,
                // Twice in a row aborts the listing; once restarts it.
                times: Some(rng.random_range(1..=2)),
            }),
            "compact" => api.compact(),
            "hang_short" | "hang_long" => {
                let ms = if kind == "hang_short" {
                    rng.random_range(200..1500)
                } else {
                    rng.random_range(2500..4000)
                };
                let action = FaultAction::Hang(Duration::from_millis(ms));
                let fault = if on_get {
                    Fault::on_get(resource, action)
                } else {
                    list_fault(resource, action)
                };
                api.inject(fault.times(n));
            }
            "hang_confirm" => {
                // Confirming GETs that take a while widen the gap between reading the rows
                // and writing them, where the application's changes race the downgrade.
                let ms = rng.random_range(300..1800);
                api.inject(
                    Fault::on_get(resource, FaultAction::Hang(Duration::from_millis(ms)))
                        .times(rng.random_range(2..=8)),
                );
            }
            "deny_list" => api.deny("list", group, plural),
            "deny_get" => api.deny("get", group, plural),
            "malformed_json" => {
                let fault = if on_get {
                    Fault::on_get(resource, FaultAction::MalformedJson)
                } else {
                    list_fault(resource, FaultAction::MalformedJson)
                };
                api.inject(fault.times(n));
            }
            "wrong_kind" => api.inject(list_fault(resource, FaultAction::WrongKind).once()),
            "item_without_name" => {
                api.inject(list_fault(resource, FaultAction::ItemWithoutName).once())
            }
            "close_connection" => {
                let fault = if on_get {
                    Fault::on_get(resource, FaultAction::CloseConnection)
                } else {
                    list_fault(resource, FaultAction::CloseConnection)
                };
                api.inject(fault.times(n));
            }
            "db_terminate" => {
                let pids = fleet.lock().await.pids();
                match terminate_backends(&pool, &pids, pg_port).await {
                    Ok(0) => injected = false,
                    // The writer lock is free until a daemon's next tick: a `--once` may win it.
                    Ok(_) => kick_once.notify_one(),
                    Err(e) => {
                        injected = false;
                        fleet
                            .lock()
                            .await
                            .problems
                            .push(format!("pg_terminate_backend failed: {e:#}"));
                    }
                }
            }
            "mass_eviction" => {
                // Most live objects vanish at once (a namespace wiped by mistake): the live
                // rows lose their objects and the misconfiguration guard should refuse until
                // the platform has noticed.
                let victims = sim.live_objects();
                let n = victims.len() * 7 / 10;
                for (kind, name) in victims.iter().take(n) {
                    sim.remove_object(*kind, name);
                }
                injected = n > 0;
            }
            "replica_sigterm" | "replica_sigkill" => {
                let mut f = fleet.lock().await;
                let i = rng.random_range(0..f.replicas.len().max(1));
                if let Err(e) = f.restart(i, kind == "replica_sigkill").await {
                    f.problems.push(format!("restarting a replica: {e:#}"));
                }
            }
            _ => injected = false,
        }
        if injected {
            *lock(&counts).entry(kind.to_string()).or_default() += 1;
        }
        let hold = Duration::from_millis(rng.random_range(500..2500));
        let stopped = nap(&stop, hold).await;
        api.clear_faults();
        api.allow_all();
        if stopped {
            return;
        }
    }
}

/// Terminates the PostgreSQL backends of the given processes (matched by their sockets'
/// local ports), and only those; returns how many.
async fn terminate_backends(pool: &PgPool, pids: &[u32], pg_port: u16) -> Result<u64> {
    let ports: Vec<i32> = client_ports(pids, pg_port)
        .into_iter()
        .map(i32::from)
        .collect();
    if ports.is_empty() {
        return Ok(0);
    }
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'sandbox-reconciler' AND datname = current_database() \
           AND client_port = ANY($1)",
    )
    .bind(&ports)
    .fetch_all(pool)
    .await?;
    Ok(killed.into_iter().filter(|k| *k).count() as u64)
}

/// Local ports of the TCP connections of `pids` to `remote_port` (Linux /proc).
fn client_ports(pids: &[u32], remote_port: u16) -> Vec<u16> {
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    inodes.insert(inode);
                }
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let inode = f[9].parse::<u64>().unwrap_or(0);
            if port(f[2]) == Some(remote_port) && inodes.contains(&inode) {
                if let Some(local) = port(f[1]) {
                    ports.push(local);
                }
            }
        }
    }
    ports
}
