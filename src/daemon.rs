//! Daemon mode: scheduled sweeps, single-flight, leadership, graceful shutdown.
//!
//! A tokio-cron-scheduler job turns the `sweep.schedule` cron expression into ticks; one
//! worker task runs sweeps, one at a time (a tick that finds a sweep running is skipped and
//! counted). One sweep runs at start-up.
//!
//! Leadership (docs/DESIGN.md, rule 8) is a PostgreSQL session advisory lock, chosen over a
//! Kubernetes Lease because it lives in the database being written: whoever holds it is the
//! only process that can write, even a `--once` run from a laptop with no access to the
//! cluster's Lease objects, and it needs no extra RBAC. The writer keeps one dedicated
//! connection that holds the lock and carries every read and write of its sweeps; the lock
//! cannot outlive that connection and no write happens on any other. Before each sweep the
//! connection is checked; if it was lost, so was the lock, and the replica competes for it
//! again like any standby. A standby stays ready, reports `leader 0` and tries to take the
//! lock at every tick, so it takes over within one schedule period after the writer dies.
//!
//! Liveness is judged against the schedule itself: after each tick the daemon exports when
//! the next one is due (`next_sweep_timestamp_seconds`), and `/healthz` fails only when that
//! moment has passed without a tick, or when one sweep has run longer than
//! `server.liveness_sweep_periods` periods. A business-hours schedule is therefore healthy
//! all night.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sqlx::PgConnection;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::cluster::cache::ClusterCache;
use crate::config::Settings;
use crate::http::{self, HealthState};
use crate::metrics::Metrics;
use crate::store;
use crate::store::TableMapping;
use crate::sweep::{ClusterSource, ErrorKind, Reconciler, SweepOptions, SweepReport, SweepResult};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("server.listen {addr}: cannot listen ({message}); choose a free address:port")]
    Listen { addr: String, message: String },
    #[error("sweep.schedule: {0}")]
    Schedule(String),
}

/// The writer lock and the connection that holds it.
struct Leadership {
    conn: Option<PgConnection>,
    /// The resolved mapping the lock was taken with (its keys are the canonical table's).
    mapping: Option<TableMapping>,
}

impl Leadership {
    /// Makes sure this replica holds the writer lock; `Ok(false)` when another does. A
    /// connection kept from an earlier sweep must still answer and its server session still
    /// hold the lock; otherwise it is dropped and the lock taken afresh.
    async fn ensure(&mut self, reconciler: &Reconciler) -> Result<bool, store::StoreError> {
        if let (Some(conn), Some(mapping)) = (&mut self.conn, &self.mapping) {
            match store::holds_writer_lock(conn, mapping).await {
                Ok(true) => return Ok(true),
                Ok(false) => tracing::warn!(
                    "the writer connection's server session no longer holds the writer lock (a pooler may have moved it); reconnecting"
                ),
                Err(_) => tracing::warn!("lost the writer connection, and the writer lock with it"),
            }
            self.conn = None;
        }
        let mut conn = reconciler.database.connect().await?;
        // The lock is keyed by the table's canonical name, so resolve it first.
        let mapping: TableMapping = reconciler.prepare(&mut conn, true).await?;
        if store::try_writer_lock(&mut conn, &mapping).await? {
            tracing::info!("took the writer lock: this replica now sweeps");
            self.conn = Some(conn);
            self.mapping = Some(mapping);
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

/// Runs the daemon: serves HTTP on `listener` (already bound, so the caller owns the address
/// and its errors) and sweeps on the schedule until `shutdown` resolves; returns when shut
/// down. The binary passes SIGTERM/SIGINT as `shutdown`.
pub async fn run(
    reconciler: Reconciler,
    options: SweepOptions,
    metrics: Arc<Metrics>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let settings = reconciler.settings.clone();
    let schedule = ScheduleClock::from_settings(&settings, metrics.clone());
    let dry_run = options.dry_run || settings.sweep.dry_run;
    metrics.process.dry_run.set(i64::from(dry_run));
    schedule.ticked();
    let listen = listener
        .local_addr()
        .map_or_else(|_| settings.server.listen.to_string(), |a| a.to_string());
    tracing::info!(
        listen = %listen,
        schedule = %settings.sweep.schedule,
        period_seconds = schedule.period.as_secs(),
        dry_run,
        "sandbox-reconciler daemon started"
    );
    let running = Running::start(reconciler, options, metrics, listener, schedule).await?;
    shutdown.await;
    running.stop(&settings).await;
    Ok(())
}

/// The daemon's tasks while it runs: the HTTP server, the scheduler, the sweep worker.
struct Running {
    stop_tx: watch::Sender<bool>,
    cache: Option<Arc<ClusterCache>>,
    scheduler: JobScheduler,
    worker: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts the watch cache (API source), the HTTP server, the scheduler and the worker.
    async fn start(
        reconciler: Reconciler,
        options: SweepOptions,
        metrics: Arc<Metrics>,
        listener: TcpListener,
        schedule: ScheduleClock,
    ) -> Result<Running, DaemonError> {
        let reconciler = with_watch_cache(reconciler, &metrics);
        let cache = reconciler.cache().cloned();
        let (stop_tx, stop_rx) = watch::channel(false);
        let health = schedule.health.clone();
        let server = tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            health.clone(),
            stop_rx.clone(),
        ));
        // Ticks: capacity one, and a tick that finds a sweep running is dropped and counted.
        let (tick_tx, tick_rx) = mpsc::channel::<()>(1);
        let running = Arc::new(AtomicBool::new(false));
        let expression = reconciler.settings.sweep.schedule.expression().to_string();
        let scheduler = start_scheduler(&expression, tick_tx, running.clone(), schedule).await?;
        let worker = tokio::spawn(
            Worker {
                reconciler,
                options,
                metrics,
                health,
                running,
            }
            .run(tick_rx, stop_rx),
        );
        Ok(Running {
            stop_tx,
            cache,
            scheduler,
            worker,
            server,
        })
    }

    /// Starts no new sweep, gives the one in flight `shutdown.timeout_seconds` to finish, and
    /// stops serving.
    async fn stop(mut self, settings: &Settings) {
        tracing::info!(
            "shutting down: no new sweeps; an apply batch in flight may take up to {}s",
            settings.shutdown.timeout.as_secs()
        );
        let _ = self.stop_tx.send(true);
        if let Some(cache) = &self.cache {
            cache.stop();
        }
        let _ = self.scheduler.shutdown().await;
        let grace = settings.shutdown.timeout;
        match tokio::time::timeout(grace, self.worker).await {
            Ok(_) => tracing::info!("sweep worker stopped"),
            Err(_) => tracing::warn!(
                "the sweep did not stop within shutdown.timeout_seconds; its open batch rolls back as the connection closes"
            ),
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.server).await;
    }
}

/// List once, then watch: with the API as source, sweeps read the cluster from the cache.
fn with_watch_cache(reconciler: Reconciler, metrics: &Arc<Metrics>) -> Reconciler {
    match &reconciler.source {
        ClusterSource::Api(cluster) => {
            let cache = ClusterCache::start(cluster, metrics.clone());
            metrics.observe_cache(cache.clone());
            reconciler.with_cache(cache)
        }
        ClusterSource::Dump(_) => reconciler,
    }
}

/// The schedule's clock: when the next tick is due, for the metric and for liveness.
#[derive(Clone)]
struct ScheduleClock {
    cron: crate::config::Schedule,
    period: Duration,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
}

impl ScheduleClock {
    /// Exports `sweep.schedule`'s period and sets liveness: a tick may be a minute (plus the
    /// jitter) late, a sweep may run `server.liveness_sweep_periods` periods.
    fn from_settings(settings: &Settings, metrics: Arc<Metrics>) -> ScheduleClock {
        let cron = settings.sweep.schedule.clone();
        let period = cron.period();
        metrics
            .schedule
            .sweep_interval_seconds
            .set(period.as_secs_f64());
        let health = Arc::new(HealthState::new(
            60 + settings.sweep.jitter.as_secs() as i64,
            (settings.server.liveness_sweep_periods * period.as_secs().max(1)) as i64,
        ));
        ScheduleClock {
            cron,
            period,
            metrics,
            health,
        }
    }

    /// Records a tick (or the start): the next one is due at the schedule's next occurrence.
    fn ticked(&self) {
        let now = chrono::Utc::now();
        let next = self
            .cron
            .next_after(&now)
            .map(|t| t.timestamp())
            .unwrap_or(i64::MAX);
        self.metrics
            .schedule
            .next_sweep_timestamp_seconds
            .set(next as f64);
        self.health.tick_scheduled(next);
    }
}

async fn start_scheduler(
    expression: &str,
    tick_tx: mpsc::Sender<()>,
    running: Arc<AtomicBool>,
    schedule: ScheduleClock,
) -> Result<JobScheduler, DaemonError> {
    let err = |e: tokio_cron_scheduler::JobSchedulerError| DaemonError::Schedule(e.to_string());
    let scheduler = JobScheduler::new().await.map_err(err)?;
    let job = Job::new_async(expression, move |_, _| {
        let tick_tx = tick_tx.clone();
        let running = running.clone();
        let schedule = schedule.clone();
        Box::pin(async move {
            schedule.ticked();
            let metrics = &schedule.metrics;
            if running.load(Ordering::Acquire) || tick_tx.try_send(()).is_err() {
                metrics.sweep.count(SweepResult::Skipped);
                tracing::warn!("schedule tick skipped: the previous sweep is still running");
            }
        })
    })
    .map_err(err)?;
    scheduler.add(job).await.map_err(err)?;
    scheduler.start().await.map_err(err)?;
    Ok(scheduler)
}

/// Marks the worker dead when it exits for any reason (including a panic).
struct AliveGuard(Arc<HealthState>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.worker_stopped();
    }
}

/// The one task that runs sweeps, one at a time: one at start-up, then one per tick.
struct Worker {
    reconciler: Reconciler,
    options: SweepOptions,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
    /// Set while a sweep runs, so that the scheduler skips the ticks that find one running.
    running: Arc<AtomicBool>,
}

impl Worker {
    async fn run(self, mut ticks: mpsc::Receiver<()>, mut stop: watch::Receiver<bool>) {
        let _guard = AliveGuard(self.health.clone());
        let mut leadership = Leadership {
            conn: None,
            mapping: None,
        };
        let jitter = self.reconciler.settings.sweep.jitter;
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    tick = ticks.recv() => if tick.is_none() { return },
                    _ = stop.changed() => return,
                }
                if !jitter.is_zero() {
                    let delay = rand::rng().random_range(0..=jitter.as_secs() * 1000);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
            first = false;
            if *stop.borrow() {
                return;
            }
            self.sweep(&mut leadership, &stop).await;
        }
    }

    /// Runs one scheduled sweep and records what it did.
    async fn sweep(&self, leadership: &mut Leadership, stop: &watch::Receiver<bool>) {
        self.running.store(true, Ordering::Release);
        self.health.sweep_started();
        let report = scheduled_sweep(&self.reconciler, &self.options, leadership, stop).await;
        self.running.store(false, Ordering::Release);
        self.metrics.record(&report);
        let leader = leadership.conn.is_some();
        self.metrics.schedule.leader.set(i64::from(leader));
        self.health.leadership_changed(leader);
        self.health.sweep_finished(&report);
        log_summary(&report);
    }
}

/// One scheduled sweep of the daemon: a dry run sweeps without the lock; otherwise this
/// replica first makes sure it holds the writer lock (a standby reports a skipped sweep) and
/// sweeps on the connection that holds it.
async fn scheduled_sweep(
    reconciler: &Reconciler,
    options: &SweepOptions,
    leadership: &mut Leadership,
    stop: &watch::Receiver<bool>,
) -> SweepReport {
    let dry_run = options.dry_run || reconciler.settings.sweep.dry_run;
    if dry_run {
        // A dry run writes nothing and needs no lock.
        return reconciler.sweep(options, stop).await;
    }
    match leadership.ensure(reconciler).await {
        Ok(true) => {}
        Ok(false) => {
            return reconciler.skipped_report(
                options,
                "another replica holds the writer lock; standing by",
            )
        }
        Err(e) => {
            // Report as a failed sweep with the database error.
            let mut report = reconciler.skipped_report(options, "");
            report.result = SweepResult::Failed;
            report.error_kind = Some(ErrorKind::Database);
            report.error = Some(store::redact(
                &e.to_string(),
                &reconciler.settings.database.url,
            ));
            return report;
        }
    }
    let Some(conn) = leadership.conn.as_mut() else {
        return reconciler.skipped_report(options, "no writer connection");
    };
    let report = reconciler.sweep_on(conn, options, stop).await;
    if report.error_kind == Some(ErrorKind::Database) {
        // The connection may be broken; check it (and the lock) before the next sweep.
        if !store::ping(conn, &reconciler.mapping).await {
            tracing::warn!("the writer connection failed; the writer lock is released");
            leadership.conn = None;
        }
    }
    report
}

fn log_summary(r: &SweepReport) {
    let fields = (
        r.sweep_id.to_string(),
        r.rows_read,
        r.orphans_found,
        r.downgraded,
        r.deferred,
        r.timings.total,
    );
    match r.result {
        SweepResult::Success => tracing::info!(
            sweep_id = %fields.0, result = r.result.as_str(), dry_run = r.dry_run, rows = fields.1,
            orphans = fields.2, downgraded = fields.3, deferred = fields.4,
            seconds = fields.5, "sweep finished"
        ),
        SweepResult::Skipped => tracing::info!(
            sweep_id = %fields.0, result = r.result.as_str(),
            reason = r.error.as_deref().unwrap_or(""), "sweep skipped"
        ),
        SweepResult::Refused => tracing::error!(
            sweep_id = %fields.0, result = r.result.as_str(), rows = fields.1, orphans = fields.2,
            seconds = fields.5, "sweep refused by a guard"
        ),
        SweepResult::Failed => tracing::error!(
            sweep_id = %fields.0, result = r.result.as_str(), error = r.error.as_deref().unwrap_or(""),
            seconds = fields.5, "sweep failed; nothing partial was written"
        ),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
