//! A daemon spawned as a process, and a raw HTTP client to talk to it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::{block_audit, wait_for_blocked_batch, FakeApiServer, TestDb};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A raw HTTP/1.0 request; returns (status, body).
pub async fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Value of a metric line (exact name with labels) in an exposition.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

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
