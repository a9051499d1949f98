//! The daemon under test: [`InProcessDaemon`] runs `daemon::run` in this process on a bound
//! listener with a shutdown it controls (most daemon tests); [`Daemon`] spawns the binary,
//! for what only a process shows (signals, exit codes, logs, the environment). Both are
//! scraped through [`Scrape`].

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sandbox_reconciler::config::{Schedule, Settings};
use sandbox_reconciler::daemon::{self, DaemonError};
use sandbox_reconciler::metrics::Metrics;
use sandbox_reconciler::sweep::{ClusterSource, SweepOptions};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{block_audit, reconciler, wait_for_blocked_batch, FakeApiServer, TestDb};

pub use testkit::exposition::metric;
pub use testkit::net::{free_port, http};

pub struct Daemon {
    pub child: Child,
    pub port: u16,
}

impl Daemon {
    pub async fn start(
        dir: &Path,
        db: &TestDb,
        api: &FakeApiServer,
        env: &[(&str, &str)],
    ) -> Daemon {
        let port = free_port();
        let config = db.write_config(
            dir,
            &format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[sweep]\nschedule = \"*/1 * * * * *\"\n"
            ),
        );
        let kubeconfig = dir.join(format!("kubeconfig-{port}"));
        api.write_kubeconfig(&kubeconfig);
        let log = std::fs::File::create(dir.join(format!("daemon-{port}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sandbox-reconciler"))
            .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Daemon { child, port }
    }

    /// Starts a daemon whose first apply batch (3 rows) is blocked inside its transaction on
    /// the locked audit table; returns it with the transaction holding that lock.
    pub async fn start_blocked_in_apply(
        dir: &Path,
        db: &TestDb,
        api: &FakeApiServer,
    ) -> (Daemon, sqlx::Transaction<'static, sqlx::Postgres>) {
        let blocker = block_audit(db).await;
        let daemon = Daemon::start(
            dir,
            db,
            api,
            &[
                ("SANDBOX_RECONCILER__SWEEP__BATCH_SIZE", "3"),
                ("SANDBOX_RECONCILER__DATABASE__LOCK_TIMEOUT_SECONDS", "60"),
            ],
        )
        .await;
        wait_for_blocked_batch(db).await;
        (daemon, blocker)
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        tokio::time::timeout(Duration::from_secs(secs), self.child.wait())
            .await
            .expect("daemon exits in time")
            .unwrap()
            .code()
    }
}

impl Scrape for Daemon {
    fn port(&self) -> u16 {
        self.port
    }
}

/// A daemon's HTTP endpoints, in process or not. (The futures need not be `Send`: tests
/// await them in place.)
#[allow(async_fn_in_trait)]
pub trait Scrape {
    fn port(&self) -> u16;

    async fn metrics(&self) -> String {
        match http(self.port(), "GET", "/metrics").await {
            Some((200, body)) => body,
            _ => String::new(),
        }
    }

    /// Waits until `pred` holds on the exposition, or panics after `secs`.
    async fn wait_metrics(&self, secs: u64, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.metrics().await;
            if pred(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last scrape:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `daemon::run` in this process: the database's settings with a schedule of every second,
/// edited by the test, on a listener bound to a free loopback port, as the CLI starts it
/// (request metrics observed, the table prepared first).
pub struct InProcessDaemon {
    pub port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), DaemonError>>,
}

impl InProcessDaemon {
    pub async fn start(db: &TestDb, api: &FakeApiServer) -> InProcessDaemon {
        Self::start_with(db, api, |_| {}).await
    }

    pub async fn start_with(
        db: &TestDb,
        api: &FakeApiServer,
        edit: impl FnOnce(&mut Settings),
    ) -> InProcessDaemon {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut settings = db.settings();
        settings.server.listen = addr;
        settings.sweep.schedule = Schedule::parse("*/1 * * * * *").unwrap();
        edit(&mut settings);
        let metrics = Metrics::new(&settings);
        let mut reconciler = reconciler(settings, api);
        if let ClusterSource::Api(cluster) = &mut reconciler.source {
            metrics.observe_cluster(cluster);
        }
        reconciler
            .prepare_at_start(true)
            .await
            .expect("the session table is prepared");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(
            reconciler,
            SweepOptions::default(),
            metrics,
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        InProcessDaemon {
            port: addr.port(),
            stop: Some(stop),
            task,
        }
    }

    /// Shuts down as SIGTERM does (the sweep in flight finishes); the daemon's result.
    pub async fn stop(mut self, secs: u64) -> Result<(), DaemonError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(secs), &mut self.task)
            .await
            .expect("the daemon stops in time")
            .expect("the daemon task does not panic")
    }

    /// Ends the daemon at once, as a killed process ends: its connections close, so the
    /// writer lock is released by the database.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Scrape for InProcessDaemon {
    fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for InProcessDaemon {
    fn drop(&mut self) {
        self.task.abort();
    }
}
