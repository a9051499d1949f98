//! A daemon spawned as a process, scraped and signalled.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::{block_audit, wait_for_blocked_batch, FakeApiServer, TestDb};

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

    pub async fn metrics(&self) -> String {
        match http(self.port, "GET", "/metrics").await {
            Some((200, body)) => body,
            _ => String::new(),
        }
    }

    /// Waits until `pred` holds on the exposition, or panics after `secs`.
    pub async fn wait_metrics(&self, secs: u64, what: &str, pred: impl Fn(&str) -> bool) -> String {
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
