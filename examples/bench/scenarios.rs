//! The scenarios: the daemon's sweep on its watch cache, the one-off sweep, each against its
//! floor measured in the same run (a bare listing and the database read; the raw SQL write),
//! and the naive per-row clean-up script; each timed, then counted through the proxy, and
//! checked.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, Utc};
use clap::ValueEnum;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::Api;
use sandbox_reconciler::cluster::cache::{CacheObserver, ClusterCache, RelistReason};
use sandbox_reconciler::cluster::{BackendKind, KubeCluster};
use sandbox_reconciler::plan::{RowSink, SessionRow};
use sandbox_reconciler::store::{self, Database, TableMapping};
use sandbox_reconciler::sweep::{
    ClusterSource, Reconciler, SweepOptions, SweepReport, SweepResult, Timings,
};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};

use crate::cluster::{FakeCluster, RequestCounts};
use crate::layout::Layout;
use crate::load::{outcome, reset};
use crate::measure::{
    cpu_seconds, load_average, machine_busy_seconds, malloc_trim, status_kb, RssWatch,
};
use crate::proxy::ProxyCounters;
use crate::{bench_settings, Args, AUDIT, DESIGNATED, TABLE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Scenario {
    Daemon,
    DaemonCleanup,
    Once,
    ListFloor,
    ReadFloor,
    OnceCleanup,
    OnceNaive,
    Naive,
    Floor,
    FloorAudit,
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Daemon => "daemon",
            Scenario::DaemonCleanup => "daemon-cleanup",
            Scenario::Once => "once",
            Scenario::ListFloor => "list-floor",
            Scenario::ReadFloor => "read-floor",
            Scenario::OnceCleanup => "once-cleanup",
            Scenario::OnceNaive => "once-naive",
            Scenario::Naive => "naive",
            Scenario::Floor => "floor",
            Scenario::FloorAudit => "floor-audit",
        }
    }

    /// Orphaned suspended rows in the table while the scenario runs.
    pub(crate) fn orphans(self, args: &Args) -> usize {
        match self {
            Scenario::Daemon | Scenario::Once | Scenario::ListFloor | Scenario::ReadFloor => {
                args.steady_orphans
            }
            Scenario::DaemonCleanup
            | Scenario::OnceCleanup
            | Scenario::Floor
            | Scenario::FloorAudit => args.orphans,
            Scenario::OnceNaive | Scenario::Naive => args.naive_orphans,
        }
    }

    /// Rows the scenario must change.
    pub(crate) fn changes(self, args: &Args) -> usize {
        match self {
            Scenario::ListFloor | Scenario::ReadFloor => 0,
            _ => self.orphans(args),
        }
    }

    pub(crate) fn is_sweep(self) -> bool {
        matches!(
            self,
            Scenario::Daemon
                | Scenario::DaemonCleanup
                | Scenario::Once
                | Scenario::OnceCleanup
                | Scenario::OnceNaive
        )
    }

    pub(crate) fn is_daemon(self) -> bool {
        matches!(self, Scenario::Daemon | Scenario::DaemonCleanup)
    }

    /// Steady-state scenarios and their floors (repeated `--repeat` times).
    pub(crate) fn is_steady(self) -> bool {
        matches!(
            self,
            Scenario::Daemon | Scenario::Once | Scenario::ListFloor | Scenario::ReadFloor
        )
    }
}

/// What the daemon's watch cache cost to start: one complete listing per backend, then the
/// watches.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct CacheStartup {
    pub(crate) seconds: f64,
    pub(crate) requests: RequestCounts,
    pub(crate) objects: u64,
    pub(crate) rss_before_mib: f64,
    pub(crate) rss_synced_mib: f64,
    pub(crate) open_watches: u64,
}

/// What the cache reported to its observer during one scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct CacheEvents {
    /// Relists other than the first listing, by reason.
    pub(crate) relists: BTreeMap<String, u64>,
    pub(crate) watch_restarts: u64,
}

#[derive(Default)]
pub(crate) struct CountingObserver {
    /// One counter per relist reason, in `RelistReason::ALL`'s order (sized by it, so a new
    /// reason cannot go uncounted).
    relists: [AtomicU64; RelistReason::ALL.len()],
    watch_restarts: AtomicU64,
}

impl CacheObserver for CountingObserver {
    fn relisted(&self, _backend: BackendKind, reason: RelistReason) {
        if let Some(i) = RelistReason::ALL.iter().position(|r| *r == reason) {
            self.relists[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn watch_restarted(&self, _backend: BackendKind) {
        self.watch_restarts.fetch_add(1, Ordering::Relaxed);
    }
}

impl CountingObserver {
    fn figures(&self) -> CacheEvents {
        let relists = RelistReason::ALL
            .iter()
            .zip(&self.relists)
            .filter(|(r, _)| **r != RelistReason::Initial)
            .map(|(r, n)| (r.as_str().to_string(), n.load(Ordering::Relaxed)))
            .collect();
        CacheEvents {
            relists,
            watch_restarts: self.watch_restarts.load(Ordering::Relaxed),
        }
    }
}

impl CacheEvents {
    fn since(&self, before: &CacheEvents) -> CacheEvents {
        CacheEvents {
            relists: self
                .relists
                .iter()
                .map(|(k, v)| (k.clone(), v - before.relists.get(k).copied().unwrap_or(0)))
                .collect(),
            watch_restarts: self.watch_restarts - before.watch_restarts,
        }
    }
}

/// The running daemon's cache (started once, kept across the daemon scenarios).
pub(crate) struct DaemonState {
    cache: Arc<ClusterCache>,
    observer: Arc<CountingObserver>,
    startup: CacheStartup,
    /// The startup figures are reported with the first daemon scenario after the start.
    reported: bool,
}

/// Counts rows without keeping them: the database read's floor.
#[derive(Default)]
struct CountSink {
    counted: u64,
    rows: u64,
    bytes: u64,
}

impl RowSink for CountSink {
    fn count_state(&mut self, _state: Option<&str>, n: u64) {
        self.counted += n;
    }

    fn observe(&mut self, row: &SessionRow) {
        self.rows += 1;
        self.bytes += (row.key.len() + row.object.as_ref().map_or(0, String::len)) as u64;
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Measurement {
    pub(crate) scenario: String,
    pub(crate) orphans: usize,
    pub(crate) ok: bool,
    pub(crate) problems: Vec<String>,
    pub(crate) wall_seconds: f64,
    /// Every timed run's wall time (the reported run is the median one).
    pub(crate) wall_seconds_runs: Vec<f64>,
    /// /proc/loadavg (1 min) when the run started: other work on the machine.
    pub(crate) load_average: f64,
    pub(crate) rss_start_mib: f64,
    pub(crate) rss_peak_mib: f64,
    pub(crate) rss_method: String,
    /// API requests other than watches (lists, GETs, anything else).
    pub(crate) api_requests: u64,
    /// The same by kind, watches included (a watch is counted once, when it starts).
    pub(crate) requests: RequestCounts,
    /// Watch streams open at the end of the run (daemon scenarios).
    pub(crate) open_watches: Option<u64>,
    pub(crate) db_round_trips: Option<u64>,
    pub(crate) db_connections: Option<u64>,
    pub(crate) db_bytes_to_client: Option<u64>,
    pub(crate) counting_pass_wall_seconds: Option<f64>,
    pub(crate) cpu_self_seconds: f64,
    pub(crate) cpu_fake_api_seconds: f64,
    pub(crate) cpu_machine_seconds: f64,
    pub(crate) rows_read: u64,
    pub(crate) downgraded: u64,
    pub(crate) audit_rows: i64,
    pub(crate) timings: Option<Timings>,
    /// How the sweep confirmed absences ("get", "listing", "watch_cache", ...).
    pub(crate) confirmation: Option<String>,
    pub(crate) confirmation_requests: Option<u64>,
    /// Where the sweep's view of the cluster came from.
    pub(crate) cluster_view: Option<String>,
    /// Daemon scenarios: what the cache reported during the run.
    pub(crate) cache_events: Option<CacheEvents>,
    /// The first daemon scenario: what starting the cache cost.
    pub(crate) cache_startup: Option<CacheStartup>,
    /// naive: candidates examined, seconds in GETs, seconds in the database
    pub(crate) naive_candidates: Option<u64>,
    pub(crate) naive_get_seconds: Option<f64>,
    pub(crate) naive_db_seconds: Option<f64>,
    pub(crate) list_requests: Option<u64>,
    pub(crate) objects_listed: Option<u64>,
    pub(crate) extra: BTreeMap<String, Value>,
}

pub(crate) struct Bench {
    pub(crate) args: Args,
    pub(crate) layout: Layout,
    pub(crate) direct_url: String,
    pub(crate) proxied_url: String,
    pub(crate) proxy: Arc<ProxyCounters>,
    pub(crate) fake: FakeCluster,
    pub(crate) kube: kube::Client,
    pub(crate) daemon: Option<DaemonState>,
}

impl Bench {
    pub(crate) fn reconciler(&self, url: &str) -> Result<Reconciler> {
        let settings = bench_settings(&self.args, url)?;
        let cluster = KubeCluster::with_client(self.kube.clone(), &settings);
        Ok(Reconciler::new(
            settings.clone(),
            Database::new(&settings)?,
            TableMapping::from_settings(&settings).map_err(|e| anyhow!(e))?,
            ClusterSource::Api(Box::new(cluster)),
        ))
    }

    /// Starts the daemon's watch cache (untimed) unless it runs, and waits until it is synced
    /// and watching; then the cluster starts churning elsewhere.
    async fn ensure_daemon(&mut self) -> Result<()> {
        if self.daemon.is_some() {
            return Ok(());
        }
        eprintln!("bench: starting the daemon's watch cache...");
        // SAFETY: malloc_trim only returns free heap memory to the kernel.
        unsafe {
            malloc_trim(0);
        }
        let rss_before = status_kb("VmRSS").unwrap_or(0) as f64 / 1024.0;
        self.fake.clear().await?;
        let settings = bench_settings(&self.args, &self.direct_url)?;
        let cluster = KubeCluster::with_client(self.kube.clone(), &settings);
        let observer = Arc::new(CountingObserver::default());
        let started = Instant::now();
        let cache = ClusterCache::start(&cluster, observer.clone());
        if !cache.wait_synced(Duration::from_secs(600)).await {
            bail!("the watch cache did not sync within 600 s");
        }
        let seconds = started.elapsed().as_secs_f64();
        // The synced flag is set before each informer's watch starts: wait for the watches.
        let informers = 2;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut open = self.fake.open_watches().await?;
        while open < informers && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            open = self.fake.open_watches().await?;
        }
        let requests = self.fake.counts().await?;
        let objects: u64 = cache.status().objects.iter().map(|(_, n)| n).sum();
        // SAFETY: as above.
        unsafe {
            malloc_trim(0);
        }
        let rss_synced = status_kb("VmRSS").unwrap_or(0) as f64 / 1024.0;
        eprintln!(
            "bench: watch cache synced in {seconds:.2}s: {objects} objects, {} list requests, {open} watches, RSS {rss_before:.0} -> {rss_synced:.0} MiB",
            requests.list
        );
        self.fake.churn(true).await?;
        self.daemon = Some(DaemonState {
            cache,
            observer,
            startup: CacheStartup {
                seconds,
                requests,
                objects,
                rss_before_mib: rss_before,
                rss_synced_mib: rss_synced,
                open_watches: open,
            },
            reported: false,
        });
        Ok(())
    }

    /// Stops the daemon's cache (before a scenario that is not the daemon's, so that its
    /// memory and its watches are not counted there).
    pub(crate) async fn stop_daemon(&mut self) -> Result<()> {
        if let Some(daemon) = self.daemon.take() {
            daemon.cache.stop();
            drop(daemon);
            self.fake.churn(false).await?;
        }
        Ok(())
    }

    fn daemon_reconciler(&self, url: &str) -> Result<Reconciler> {
        let cache = self
            .daemon
            .as_ref()
            .ok_or_else(|| anyhow!("the daemon's cache is not running"))?
            .cache
            .clone();
        Ok(self.reconciler(url)?.with_cache(cache))
    }

    /// How many timed runs a scenario gets: `--repeat`, or `--repeat-cleanup` for the
    /// clean-ups, the naive script and the SQL floors.
    pub(crate) fn runs_of(&self, scenario: Scenario) -> usize {
        if scenario.is_steady() {
            self.args.repeat.max(1)
        } else {
            self.args.repeat_cleanup.max(1)
        }
    }

    /// Starts or stops the daemon's cache as the scenario needs; returns its orphan count.
    async fn ready_for(&mut self, scenario: Scenario) -> Result<usize> {
        if scenario.is_daemon() {
            self.ensure_daemon().await?;
        } else {
            self.stop_daemon().await?;
        }
        Ok(scenario.orphans(&self.args))
    }

    /// One timed run of a scenario on direct connections (the daemon's cache started or
    /// stopped as the scenario needs).
    pub(crate) async fn run(&mut self, scenario: Scenario, run: usize) -> Result<Measurement> {
        let k = self.ready_for(scenario).await?;
        eprintln!(
            "bench: {} ({k} orphans), run {}...",
            scenario.name(),
            run + 1
        );
        self.timed(scenario, k).await
    }

    /// A scenario's result from its timed runs (the median run is reported), then one more
    /// run through the counting proxy.
    pub(crate) async fn finish(
        &mut self,
        scenario: Scenario,
        mut runs: Vec<Measurement>,
    ) -> Result<Measurement> {
        let k = self.ready_for(scenario).await?;
        let walls: Vec<f64> = runs.iter().map(|m| m.wall_seconds).collect();
        let problems: Vec<String> = runs.iter().flat_map(|m| m.problems.clone()).collect();
        runs.sort_by(|a, b| a.wall_seconds.total_cmp(&b.wall_seconds));
        let mut m = runs.swap_remove(runs.len() / 2);
        m.wall_seconds_runs = walls;
        m.problems = problems;
        if let Some(daemon) = &mut self.daemon {
            if !daemon.reported {
                m.cache_startup = Some(daemon.startup.clone());
                daemon.reported = true;
            }
        }

        if !self.args.no_round_trips && scenario != Scenario::ListFloor {
            reset(&self.direct_url, k).await?;
            self.fake.clear().await?;
            let before = self.proxy.figures();
            let mut counted = Measurement::default();
            let url = self.proxied_url.clone();
            let started = Instant::now();
            let result = self.execute(scenario, k, &url, &mut counted).await;
            m.counting_pass_wall_seconds = Some(started.elapsed().as_secs_f64());
            let figures = self.proxy.figures() - before;
            // The daemon's leader connection exists before its sweep: count the sweep only.
            let round_trips = counted
                .extra
                .get("timed_round_trips")
                .and_then(Value::as_u64)
                .unwrap_or(figures.round_trips);
            m.db_round_trips = Some(round_trips);
            m.db_connections = Some(figures.connections);
            m.db_bytes_to_client = Some(figures.bytes_to_client);
            if let Err(e) = result {
                m.problems.push(format!("counting pass: {e:#}"));
            }
            if counted.downgraded != m.downgraded {
                m.problems.push(format!(
                    "counting pass downgraded {} rows, timed pass {}",
                    counted.downgraded, m.downgraded
                ));
            }
        }
        m.ok = m.problems.is_empty();
        for p in &m.problems {
            eprintln!("bench: {} FAILED: {p}", scenario.name());
        }
        Ok(m)
    }

    /// One timed run on direct connections, after a reset; checked.
    pub(crate) async fn timed(&mut self, scenario: Scenario, k: usize) -> Result<Measurement> {
        reset(&self.direct_url, k).await?;
        self.fake.clear().await?;
        let mut m = Measurement {
            scenario: scenario.name().to_string(),
            orphans: k,
            load_average: load_average(),
            ..Measurement::default()
        };
        let url = self.direct_url.clone();
        let cache_before = self.daemon.as_ref().map(|d| d.observer.figures());
        let (cpu0, fake0, machine0) = (
            cpu_seconds("self"),
            cpu_seconds(&self.fake.pid.to_string()),
            machine_busy_seconds(),
        );
        let watch = RssWatch::start();
        let started = Instant::now();
        let result = self.execute(scenario, k, &url, &mut m).await;
        m.wall_seconds = started.elapsed().as_secs_f64();
        if let Some(timed) = m.extra.get("timed_seconds").and_then(Value::as_f64) {
            // Set-up that is not the measured work (a connection the daemon already holds,
            // the floors' keys) is not timed.
            m.extra
                .insert("wall_with_setup_seconds".into(), json!(m.wall_seconds));
            m.wall_seconds = timed;
        }
        let (start, peak, how) = watch.finish();
        m.rss_start_mib = start;
        m.rss_peak_mib = peak;
        m.rss_method = how.to_string();
        m.cpu_self_seconds = cpu_seconds("self") - cpu0;
        m.cpu_fake_api_seconds = cpu_seconds(&self.fake.pid.to_string()) - fake0;
        m.cpu_machine_seconds = machine_busy_seconds() - machine0;
        m.requests = self.fake.counts().await?;
        m.api_requests = m.requests.api();
        if let (Some(daemon), Some(before)) = (&self.daemon, cache_before) {
            m.cache_events = Some(daemon.observer.figures().since(&before));
            m.open_watches = Some(self.fake.open_watches().await?);
        }
        if let Err(e) = result {
            m.problems.push(format!("{e:#}"));
        }
        self.check(scenario, k, &mut m).await?;
        Ok(m)
    }

    fn absorb(m: &mut Measurement, report: &SweepReport) -> Result<()> {
        m.rows_read = report.rows_read;
        m.downgraded = report.downgraded;
        m.timings = Some(report.timings.clone());
        m.list_requests = Some(report.backends.values().map(|b| b.list_requests).sum());
        m.confirmation = serde_json::to_value(report.confirmation)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        m.confirmation_requests = Some(report.confirmation_requests);
        m.cluster_view = Some(report.cluster_view.clone());
        m.extra.insert("confirmed".into(), json!(report.confirmed));
        m.extra
            .insert("orphans_found".into(), json!(report.orphans_found));
        m.extra.insert("deferred".into(), json!(report.deferred));
        m.extra
            .insert("within_grace".into(), json!(report.within_grace));
        m.extra.insert("skipped".into(), json!(report.skipped));
        m.extra.insert("live_rows".into(), json!(report.live_rows));
        m.extra.insert("batches".into(), json!(report.batches));
        m.extra.insert(
            "backends".into(),
            serde_json::to_value(&report.backends).unwrap_or(Value::Null),
        );
        if report.result != SweepResult::Success {
            bail!(
                "sweep ended {:?}: {}",
                report.result,
                report.error.clone().unwrap_or_default()
            );
        }
        Ok(())
    }

    pub(crate) async fn execute(
        &mut self,
        scenario: Scenario,
        k: usize,
        url: &str,
        m: &mut Measurement,
    ) -> Result<()> {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        match scenario {
            Scenario::Daemon | Scenario::DaemonCleanup => {
                // The daemon's leader holds its connection and the writer lock across sweeps
                // (daemon::Leadership): set up before the sweep, not timed.
                let reconciler = self.daemon_reconciler(url)?;
                let mut conn = reconciler.database.connect().await?;
                let mapping = reconciler.prepare(&mut conn, true).await?;
                if !store::try_writer_lock(&mut conn, &mapping).await? {
                    bail!("another process holds the writer lock");
                }
                let options = SweepOptions {
                    dry_run: false,
                    max_downgrades: (scenario == Scenario::DaemonCleanup).then_some(k.max(1)),
                };
                let before = self.proxy.figures();
                let started = Instant::now();
                let report = reconciler.sweep_on(&mut conn, &options, &rx).await;
                m.extra.insert(
                    "timed_seconds".into(),
                    json!(started.elapsed().as_secs_f64()),
                );
                m.extra.insert(
                    "timed_round_trips".into(),
                    json!((self.proxy.figures() - before).round_trips),
                );
                let _ = conn.close().await;
                Self::absorb(m, &report)
            }
            Scenario::Once | Scenario::OnceCleanup | Scenario::OnceNaive => {
                let reconciler = self.reconciler(url)?;
                let options = SweepOptions {
                    dry_run: false,
                    max_downgrades: (scenario != Scenario::Once).then_some(k.max(1)),
                };
                let report = reconciler.sweep(&options, &rx).await;
                Self::absorb(m, &report)
            }
            Scenario::ListFloor => {
                let settings = bench_settings(&self.args, url)?;
                let cluster = KubeCluster::with_client(self.kube.clone(), &settings);
                let started = Instant::now();
                let snapshot = cluster.snapshot().await?;
                m.extra.insert(
                    "timed_seconds".into(),
                    json!(started.elapsed().as_secs_f64()),
                );
                m.objects_listed = Some(snapshot.backends.iter().map(|b| b.len() as u64).sum());
                m.list_requests = Some(snapshot.backends.iter().map(|b| b.requests).sum());
                Ok(())
            }
            Scenario::ReadFloor => {
                let reconciler = self.reconciler(url)?;
                let mut conn = reconciler.database.connect().await?;
                let mapping = reconciler.prepare(&mut conn, false).await?;
                let mut sink = CountSink::default();
                let started = Instant::now();
                store::read_rows(&mut conn, &mapping, &mut sink).await?;
                m.extra.insert(
                    "timed_seconds".into(),
                    json!(started.elapsed().as_secs_f64()),
                );
                m.rows_read = sink.counted + sink.rows;
                m.extra.insert("rows_streamed".into(), json!(sink.rows));
                m.extra.insert("text_bytes".into(), json!(sink.bytes));
                let _ = conn.close().await;
                Ok(())
            }
            Scenario::Naive => self.naive(url, m).await,
            Scenario::Floor | Scenario::FloorAudit => {
                let mut conn = PgConnection::connect(url).await?;
                let keys: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT thread_key FROM {DESIGNATED} WHERE n < $1 ORDER BY n"
                )))
                .bind(k as i32)
                .fetch_all(&mut conn)
                .await?;
                let update = format!(
                    "UPDATE {TABLE} t SET state = 'gone', updated_at = now(), agent_thread_id = NULL \
                     FROM unnest($1::text[]) AS k(key) WHERE t.thread_key = k.key"
                );
                let started = Instant::now();
                let changed = if scenario == Scenario::Floor {
                    sqlx::query(AssertSqlSafe(update))
                        .bind(&keys)
                        .execute(&mut conn)
                        .await?
                        .rows_affected()
                } else {
                    let sql = format!(
                        "WITH upd AS ({update} RETURNING t.thread_key, t.sandbox_id, t.updated_at) \
                         INSERT INTO {AUDIT} (sweep_id, action, session_table, session_key, object_name, \
                             backend, old_state, new_state, old_updated_at, new_updated_at, cleared, reason, evidence) \
                         SELECT $2, 'downgrade', '{TABLE}', thread_key, sandbox_id, 'pod', 'suspended', 'gone', \
                                NULL, updated_at, '{{}}'::jsonb, 'orphaned_suspended', '{{}}'::jsonb FROM upd"
                    );
                    sqlx::query(AssertSqlSafe(sql))
                        .bind(&keys)
                        .bind(uuid::Uuid::new_v4())
                        .execute(&mut conn)
                        .await?
                        .rows_affected()
                };
                m.extra.insert(
                    "timed_seconds".into(),
                    json!(started.elapsed().as_secs_f64()),
                );
                m.downgraded = changed;
                conn.close().await?;
                Ok(())
            }
        }
    }

    /// The hand-written clean-up script: select every suspended row older than the grace
    /// period, then per row a GET per backend (the Pod, and the Sandbox if there is no Pod), and
    /// if both answer 404 one transaction with the conditional UPDATE and the audit INSERT.
    /// Sequential, as such scripts are.
    pub(crate) async fn naive(&mut self, url: &str, m: &mut Measurement) -> Result<()> {
        let mut conn = PgConnection::connect(url).await?;
        let cutoff = Utc::now() - chrono::Duration::seconds(self.args.grace_seconds as i64);
        let rows: Vec<(String, String, DateTime<Utc>, Option<String>)> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT thread_key, sandbox_id, updated_at, agent_thread_id FROM {TABLE} \
                 WHERE state = 'suspended' AND updated_at < $1 ORDER BY updated_at"
            )))
            .bind(cutoff)
            .fetch_all(&mut conn)
            .await?;
        let ns = self.args.namespace.as_str();
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), ns);
        let resource = ApiResource {
            group: "agents.x-k8s.io".into(),
            version: "v1alpha1".into(),
            api_version: "agents.x-k8s.io/v1alpha1".into(),
            kind: "Sandbox".into(),
            plural: "sandboxes".into(),
        };
        let sandboxes: Api<DynamicObject> = Api::namespaced_with(self.kube.clone(), ns, &resource);
        let sweep_id = uuid::Uuid::new_v4();
        let update = format!(
            "UPDATE {TABLE} SET state = 'gone', updated_at = now(), agent_thread_id = NULL \
             WHERE thread_key = $1 AND state = 'suspended' AND sandbox_id = $2 AND updated_at = $3 \
             RETURNING updated_at"
        );
        let insert = format!(
            "INSERT INTO {AUDIT} (sweep_id, action, session_table, session_key, object_name, backend, \
                 old_state, new_state, old_updated_at, new_updated_at, cleared, reason, evidence) \
             VALUES ($1, 'downgrade', '{TABLE}', $2, $3, $4, 'suspended', 'gone', $5, $6, $7, \
                     'orphaned_suspended', $8)"
        );
        let (mut get_time, mut db_time) = (Duration::ZERO, Duration::ZERO);
        let mut downgraded = 0u64;
        m.naive_candidates = Some(rows.len() as u64);
        for (key, object, updated_at, agent_thread) in &rows {
            let t = Instant::now();
            let present =
                pods.get_opt(object).await?.is_some() || sandboxes.get_opt(object).await?.is_some();
            get_time += t.elapsed();
            if present {
                continue;
            }
            let t = Instant::now();
            let mut tx = conn.begin().await?;
            let new_updated: Option<DateTime<Utc>> =
                sqlx::query_scalar(AssertSqlSafe(update.clone()))
                    .bind(key)
                    .bind(object)
                    .bind(updated_at)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(new_updated) = new_updated {
                let evidence = json!({
                    "absence": format!("GET pods {ns}/{object}: 404; GET sandboxes {ns}/{object}: 404"),
                });
                sqlx::query(AssertSqlSafe(insert.clone()))
                    .bind(sweep_id)
                    .bind(key)
                    .bind(object)
                    .bind(BackendKind::Pod.as_str())
                    .bind(updated_at)
                    .bind(new_updated)
                    .bind(json!({ "agent_thread_id": agent_thread }))
                    .bind(evidence)
                    .execute(&mut *tx)
                    .await?;
                downgraded += 1;
            }
            tx.commit().await?;
            db_time += t.elapsed();
        }
        conn.close().await?;
        m.downgraded = downgraded;
        m.naive_get_seconds = Some(get_time.as_secs_f64());
        m.naive_db_seconds = Some(db_time.as_secs_f64());
        Ok(())
    }

    /// Checks the scenario changed exactly its orphans (and, for sweeps, audited them, read
    /// every row and confirmed the way the scenario means to).
    pub(crate) async fn check(
        &mut self,
        scenario: Scenario,
        k: usize,
        m: &mut Measurement,
    ) -> Result<()> {
        let (gone, audit) = outcome(&self.direct_url, k).await?;
        m.audit_rows = audit;
        let want = scenario.changes(&self.args) as u64;
        let expect = |m: &mut Measurement, what: &str, got: u64, want: u64| {
            if got != want {
                m.problems
                    .push(format!("{what}: got {got}, expected {want}"));
            }
        };
        expect(m, "rows downgraded", m.downgraded, want);
        expect(
            m,
            "orphans now gone with cleared columns",
            gone as u64,
            want,
        );
        let audited = match scenario {
            Scenario::Floor => 0,
            _ => want,
        };
        expect(m, "audit records", audit as u64, audited);
        if scenario.is_sweep() || scenario == Scenario::ReadFloor {
            expect(m, "rows read", m.rows_read, self.layout.rows as u64);
        }
        if scenario == Scenario::ListFloor {
            let objects = (self.layout.pods + self.layout.sandboxes) as u64;
            expect(m, "objects listed", m.objects_listed.unwrap_or(0), objects);
        }
        if scenario.is_sweep() {
            let get =
                |m: &Measurement, key: &str| m.extra.get(key).and_then(Value::as_u64).unwrap_or(0);
            let confirmed = get(m, "confirmed");
            expect(m, "orphans confirmed absent", confirmed, k as u64);
            let found = get(m, "orphans_found");
            expect(m, "orphans found", found, k as u64);
            let settings = bench_settings(&self.args, &self.direct_url)?;
            let (view, confirmation) = if scenario.is_daemon() {
                let how = if k == 0 {
                    "none"
                } else if k <= settings.cluster.confirm_get_max {
                    "get"
                } else {
                    "watch_cache"
                };
                ("watch cache", how)
            } else {
                ("listing", if k == 0 { "none" } else { "listing" })
            };
            if m.cluster_view.as_deref() != Some(view) {
                m.problems.push(format!(
                    "cluster view: got {:?}, expected {view:?}",
                    m.cluster_view
                ));
            }
            if m.confirmation.as_deref() != Some(confirmation) {
                m.problems.push(format!(
                    "confirmation: got {:?}, expected {confirmation:?}",
                    m.confirmation
                ));
            }
        }
        Ok(())
    }
}
