//! The daemon's HTTP endpoint (hyper 1): `/metrics`, `/healthz`, `/readyz`, and
//! `/last-sweep` (the last sweep's summary, the same JSON document as `--once --output json`
//! with the change list capped), so an operator can see what the last sweep decided and why
//! through `kubectl port-forward`, without a database login.
//!
//! Serving is independent of sweeping: metrics are atomics rendered on demand and the health
//! state is a few atomics and a short-lived mutex, so a scrape never waits for a sweep and a
//! sweep never waits for a scrape. Connections are bounded: headers must arrive within a
//! deadline and fit a small buffer; only GET and HEAD are served.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::sweep::{SweepReport, SweepResult};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// What /healthz and /readyz report; shared with the daemon loop, which tells it what
/// happened (a tick was scheduled, a sweep started or finished, leadership changed, the worker
/// stopped) and never sets a field itself.
pub struct HealthState {
    /// Unix seconds when the next schedule tick is due.
    next_tick: AtomicI64,
    /// How late a tick may be before the scheduler counts as dead.
    tick_slack_seconds: i64,
    /// Unix seconds when the running sweep started; 0 when none runs.
    sweep_started_at: AtomicI64,
    /// A sweep running longer than this makes the daemon unhealthy (0 = no limit).
    max_sweep_seconds: i64,
    /// Cleared when the sweep worker exits.
    worker_alive: AtomicBool,
    leader: AtomicBool,
    /// The last finished sweep; `None` until the first sweep attempt finished.
    finished: Mutex<Option<FinishedSweep>>,
}

/// The last sweep, for /healthz.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastSweep {
    pub result: SweepResult,
    pub at: chrono::DateTime<chrono::Utc>,
    pub sweep_id: String,
}

/// The last finished sweep: its /healthz summary and its `GET /last-sweep` document, kept
/// together so that the two never describe different sweeps.
struct FinishedSweep {
    summary: LastSweep,
    document: String,
}

impl HealthState {
    /// A running worker whose first tick is not yet scheduled: `tick_slack_seconds` is how
    /// late a tick may be, `max_sweep_seconds` how long one sweep may run (0 = no limit).
    pub fn new(tick_slack_seconds: i64, max_sweep_seconds: i64) -> HealthState {
        HealthState {
            next_tick: AtomicI64::new(0),
            tick_slack_seconds,
            sweep_started_at: AtomicI64::new(0),
            max_sweep_seconds,
            worker_alive: AtomicBool::new(true),
            leader: AtomicBool::new(false),
            finished: Mutex::new(None),
        }
    }

    /// The schedule's next tick is due at `unix_seconds`.
    pub fn tick_scheduled(&self, unix_seconds: i64) {
        self.next_tick.store(unix_seconds, Ordering::Relaxed);
    }

    /// A sweep started now.
    pub fn sweep_started(&self) {
        self.sweep_started_at
            .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    }

    /// A sweep finished with this report: no sweep runs, and the report is the last sweep.
    pub fn sweep_finished(&self, report: &SweepReport) {
        self.sweep_started_at.store(0, Ordering::Relaxed);
        let finished = FinishedSweep {
            summary: LastSweep {
                result: report.result,
                at: report.started_at,
                sweep_id: report.sweep_id.to_string(),
            },
            document: crate::report::json_capped(report, crate::report::LAST_SWEEP_CHANGES),
        };
        if let Ok(mut last) = self.finished.lock() {
            *last = Some(finished);
        }
    }

    /// This replica now holds (`true`) or does not hold the writer lock.
    pub fn leadership_changed(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// The sweep worker exited.
    pub fn worker_stopped(&self) {
        self.worker_alive.store(false, Ordering::Relaxed);
    }

    /// Whether this replica holds the writer lock.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Ready once configuration is loaded and the first sweep attempt finished.
    pub fn is_ready(&self) -> bool {
        self.finished.lock().is_ok_and(|last| last.is_some())
    }

    /// The last finished sweep's summary, for /healthz.
    pub fn last_sweep(&self) -> Option<LastSweep> {
        let last = self.finished.lock().ok()?;
        last.as_ref().map(|f| f.summary.clone())
    }

    /// The last finished sweep's JSON document (`GET /last-sweep`).
    pub fn last_report(&self) -> Option<String> {
        let last = self.finished.lock().ok()?;
        last.as_ref().map(|f| f.document.clone())
    }

    /// Why the daemon is not healthy, or `None` when it is: the worker exited, the schedule's
    /// next tick is overdue, or one sweep has run too long (a hung database call).
    pub fn unhealthy(&self) -> Option<String> {
        let now = chrono::Utc::now().timestamp();
        if !self.worker_alive.load(Ordering::Relaxed) {
            return Some("the sweep worker stopped".into());
        }
        let due = self.next_tick.load(Ordering::Relaxed);
        if now > due.saturating_add(self.tick_slack_seconds) {
            return Some(format!(
                "the schedule tick due {}s ago did not happen",
                now - due
            ));
        }
        let started = self.sweep_started_at.load(Ordering::Relaxed);
        let limit = self.max_sweep_seconds;
        if started > 0 && limit > 0 && now - started > limit {
            return Some(format!(
                "the running sweep started {}s ago, longer than server.liveness_sweep_periods schedule periods ({limit}s)",
                now - started
            ));
        }
        None
    }

    /// Alive while the worker runs, the schedule ticks on time and no sweep hangs.
    pub fn is_alive(&self) -> bool {
        self.unhealthy().is_none()
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

fn route(
    req: &Request<Incoming>,
    metrics: &Metrics,
    health: &HealthState,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz" | "/last-sweep");
    if !known {
        return response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    let mut res = match path {
        "/metrics" => response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => {
            let problem = health.unhealthy();
            let alive = problem.is_none();
            let last = health.last_sweep();
            let body = serde_json::json!({
                "status": if alive { "ok" } else { "stalled" },
                "problem": problem,
                "leader": health.is_leader(),
                "version": env!("CARGO_PKG_VERSION"),
                "last_sweep": last,
            });
            let status = if alive {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            response(status, "application/json", format!("{body}\n"))
        }
        "/last-sweep" => match health.last_report() {
            Some(document) => response(StatusCode::OK, "application/json", document),
            None => response(
                StatusCode::NOT_FOUND,
                "application/json",
                "{\"error\": \"no sweep has finished yet\"}\n".into(),
            ),
        },
        _ => {
            if health.is_ready() {
                response(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: the first sweep attempt has not finished\n".into(),
                )
            }
        }
    };
    if req.method() == Method::HEAD {
        *res.body_mut() = Full::new(Bytes::new());
    }
    res
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accepting an HTTP connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let res = route(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(res) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            // An idle keep-alive connection is closed after a while regardless.
            let _ = tokio::time::timeout(Duration::from_secs(300), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(next_tick_in: i64, max_sweep: i64) -> HealthState {
        let h = HealthState::new(60, max_sweep);
        h.tick_scheduled(chrono::Utc::now().timestamp() + next_tick_in);
        h
    }

    /// A business-hours schedule: the next tick is tomorrow morning. Before, liveness used
    /// a period estimated from the next 12 runs (5 minutes) and failed every night.
    #[test]
    fn a_tick_due_tomorrow_is_healthy_tonight() {
        let h = health(14 * 3600, 900);
        assert!(h.is_alive(), "{:?}", h.unhealthy());
    }

    #[test]
    fn an_overdue_tick_is_unhealthy() {
        let h = health(-61, 900);
        assert!(h.unhealthy().is_some_and(|p| p.contains("tick")));
        let h = health(-30, 900);
        assert!(h.is_alive(), "within the slack");
    }

    /// A sweep stuck on a database call that never answers fails liveness once it has run
    /// longer than the configured number of periods.
    #[test]
    fn a_hung_sweep_is_unhealthy() {
        let h = health(300, 900);
        h.sweep_started();
        assert!(h.is_alive());
        h.sweep_started_at
            .store(chrono::Utc::now().timestamp() - 901, Ordering::Relaxed);
        assert!(h
            .unhealthy()
            .is_some_and(|p| p.contains("liveness_sweep_periods")));
        h.sweep_started_at.store(0, Ordering::Relaxed);
        assert!(h.is_alive());
    }

    #[test]
    fn a_stopped_worker_is_unhealthy() {
        let h = health(300, 900);
        h.worker_stopped();
        assert!(!h.is_alive());
    }
}
