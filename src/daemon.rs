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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sqlx::PgConnection;
use tokio::sync::{mpsc, watch};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::cluster::cache::ClusterCache;
use crate::config::{parse_schedule, schedule_period};
use crate::http::{self, HealthState, LastSweep};
use crate::metrics::Metrics;
use crate::store;
use crate::store::TableMapping;
use crate::sweep::{Reconciler, SweepOptions, SweepReport, SweepResult};

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

/// Runs the daemon until SIGTERM/SIGINT; returns when shut down.
pub async fn run(
    reconciler: Reconciler,
    options: SweepOptions,
    metrics: Arc<Metrics>,
) -> Result<(), DaemonError> {
    let settings = reconciler.settings.clone();
    let cron = parse_schedule(&settings.sweep.schedule).map_err(DaemonError::Schedule)?;
    let period = schedule_period(&cron);
    metrics.sweep_interval_seconds.set(period.as_secs_f64());
    metrics
        .dry_run
        .set(i64::from(options.dry_run || settings.sweep.dry_run));

    let health = Arc::new(HealthState::default());
    health.worker_alive.store(true, Ordering::Relaxed);
    health
        .tick_slack_seconds
        .store(60 + settings.sweep.jitter_seconds as i64, Ordering::Relaxed);
    health.max_sweep_seconds.store(
        (settings.server.liveness_sweep_periods * period.as_secs().max(1)) as i64,
        Ordering::Relaxed,
    );
    let schedule = Schedule {
        cron: cron.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
    };
    schedule.ticked();

    let addr: std::net::SocketAddr =
        settings
            .server
            .listen
            .parse()
            .map_err(|e: std::net::AddrParseError| DaemonError::Listen {
                addr: settings.server.listen.clone(),
                message: e.to_string(),
            })?;
    let listener = http::bind(addr).await.map_err(|e| DaemonError::Listen {
        addr: settings.server.listen.clone(),
        message: e.to_string(),
    })?;
    tracing::info!(
        listen = %addr,
        schedule = %settings.sweep.schedule,
        period_seconds = period.as_secs(),
        dry_run = options.dry_run || settings.sweep.dry_run,
        "sandbox-reconciler daemon started"
    );

    // List once, then watch: sweeps read the cluster from the cache (sweep.rs).
    let reconciler = match &reconciler.source {
        crate::sweep::ClusterSource::Api(cluster) => {
            let cache = ClusterCache::start(cluster, metrics.clone());
            metrics.observe_cache(cache.clone());
            reconciler.with_cache(cache)
        }
        crate::sweep::ClusterSource::Dump(_) => reconciler,
    };

    let cache = reconciler.cache().cloned();
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        stop_rx.clone(),
    ));

    // Ticks: capacity one, and a tick that finds a sweep running is dropped and counted.
    let (tick_tx, tick_rx) = mpsc::channel::<()>(1);
    let running = Arc::new(AtomicBool::new(false));
    let scheduler =
        start_scheduler(&settings.sweep.schedule, tick_tx, running.clone(), schedule).await?;

    let worker = tokio::spawn(worker(
        reconciler,
        options,
        metrics.clone(),
        health.clone(),
        tick_rx,
        running,
        stop_rx.clone(),
    ));

    wait_for_signal().await;
    tracing::info!(
        "shutting down: no new sweeps; an apply batch in flight may take up to {}s",
        settings.shutdown.timeout_seconds
    );
    let _ = stop_tx.send(true);
    if let Some(cache) = &cache {
        cache.stop();
    }
    let mut scheduler = scheduler;
    let _ = scheduler.shutdown().await;
    let grace = Duration::from_secs(settings.shutdown.timeout_seconds);
    match tokio::time::timeout(grace, worker).await {
        Ok(_) => tracing::info!("sweep worker stopped"),
        Err(_) => tracing::warn!(
            "the sweep did not stop within shutdown.timeout_seconds; its open batch rolls back as the connection closes"
        ),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    Ok(())
}

/// The schedule's clock: when the next tick is due, for the metric and for liveness.
#[derive(Clone)]
struct Schedule {
    cron: croner::Cron,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
}

impl Schedule {
    /// Records a tick (or the start): the next one is due at the schedule's next occurrence.
    fn ticked(&self) {
        let now = chrono::Utc::now();
        let next = self
            .cron
            .find_next_occurrence(&now, false)
            .map(|t| t.timestamp())
            .unwrap_or(i64::MAX);
        self.metrics.next_sweep_timestamp_seconds.set(next as f64);
        self.health.next_tick.store(next, Ordering::Relaxed);
    }
}

async fn start_scheduler(
    expression: &str,
    tick_tx: mpsc::Sender<()>,
    running: Arc<AtomicBool>,
    schedule: Schedule,
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
                metrics.sweeps_total.with_label_values(&["skipped"]).inc();
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
        self.0.worker_alive.store(false, Ordering::Relaxed);
    }
}

async fn worker(
    reconciler: Reconciler,
    options: SweepOptions,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
    mut ticks: mpsc::Receiver<()>,
    running: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let _guard = AliveGuard(health.clone());
    let mut leadership = Leadership {
        conn: None,
        mapping: None,
    };
    let jitter = reconciler.settings.sweep.jitter_seconds;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                tick = ticks.recv() => if tick.is_none() { return },
                _ = stop.changed() => return,
            }
            if jitter > 0 {
                let delay = rand::rng().random_range(0..=jitter * 1000);
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
        running.store(true, Ordering::Release);
        health.sweep_started(true);
        let report = sweep_once(&reconciler, &options, &mut leadership, &stop).await;
        health.sweep_started(false);
        running.store(false, Ordering::Release);
        metrics.record(&report);
        metrics.leader.set(i64::from(leadership.conn.is_some()));
        health
            .leader
            .store(leadership.conn.is_some(), Ordering::Relaxed);
        if let Ok(mut last) = health.last_sweep.lock() {
            *last = Some(LastSweep {
                result: report.result.as_str(),
                at: report.started_at,
                sweep_id: report.sweep_id.to_string(),
            });
        }
        if let Ok(mut last) = health.last_report.lock() {
            *last = Some(crate::report::json_capped(
                &report,
                crate::report::LAST_SWEEP_CHANGES,
            ));
        }
        health.ready.store(true, Ordering::Relaxed);
        log_summary(&report);
    }
}

async fn sweep_once(
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
            report.error_kind = Some("database");
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
    if report.error_kind == Some("database") {
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
            sweep_id = %fields.0, result = "success", dry_run = r.dry_run, rows = fields.1,
            orphans = fields.2, downgraded = fields.3, deferred = fields.4,
            seconds = fields.5, "sweep finished"
        ),
        SweepResult::Skipped => tracing::info!(
            sweep_id = %fields.0, result = "skipped",
            reason = r.error.as_deref().unwrap_or(""), "sweep skipped"
        ),
        SweepResult::Refused => tracing::error!(
            sweep_id = %fields.0, result = "refused", rows = fields.1, orphans = fields.2,
            seconds = fields.5, "sweep refused by a guard"
        ),
        SweepResult::Failed => tracing::error!(
            sweep_id = %fields.0, result = "failed", error = r.error.as_deref().unwrap_or(""),
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
