//! The daemons: replicas of the real binary competing for the writer lock, restarted when a
//! fault stops them, scraped for their metrics; and the occasional `--once` run beside them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::config::SoakConfig;
use super::db::SoakDb;
use super::{lock, nap, NAMESPACE, OWN_SCOPE, SCOPE_COLUMN};
use crate::exposition::sum_by_label;
use crate::net::{free_port, http_within};

/// How long a scrape of a daemon's `/metrics` may take.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(3);

/// One daemon process.
pub(crate) struct Replica {
    child: Child,
    port: u16,
    pid: u32,
    last_scrape: String,
}

/// The daemon replicas, and what the ones that ended left behind.
pub(crate) struct Fleet {
    pub(crate) binary: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) kubeconfig: PathBuf,
    /// TOML shared by every replica and `--once` (the listen address is added per replica).
    pub(crate) settings: String,
    pub(crate) replicas: Vec<Replica>,
    /// The last scrape of every incarnation that ended.
    pub(crate) final_scrapes: Vec<String>,
    pub(crate) exits: BTreeMap<String, u64>,
    pub(crate) starts: u64,
    pub(crate) problems: Vec<String>,
}

/// The configuration every replica and `--once` run shares.
fn daemon_settings(cfg: &SoakConfig, db: &SoakDb) -> String {
    // Shared table: the daemons own scope A only.
    let scope = if cfg.shared_table {
        format!("scope_column = \"{SCOPE_COLUMN}\"\nscope_value = \"{OWN_SCOPE}\"\n")
    } else {
        String::new()
    };
    // Both backends are enabled in every variant; this one says explicitly that neither
    // has a prefix (the default run leaves them unset, which is the same: empty).
    let backends = if cfg.backends_without_prefixes {
        "[backends.pod]\nenabled = true\nobject_name_prefix = \"\"\n\
         [backends.agent_sandbox]\nenabled = true\nobject_name_prefix = \"\"\n"
    } else {
        "[backends.agent_sandbox]\nenabled = true\n"
    };
    format!(
        "[database]\nurl = \"{url}\"\nconnect_timeout_seconds = 5\nstatement_timeout_seconds = 10\n\
         lock_timeout_seconds = 1\n\
         [sessions]\ntable = \"{table}\"\nclear_columns = [\"agent_thread_id\"]\n{scope}\
         [audit]\ntable = \"{audit}\"\n\
         [cluster]\nnamespaces = [\"{NAMESPACE}\"]\npage_size = {page}\nrequest_timeout_seconds = {timeout}\n\
         confirm_concurrency = 4\n\
         {backends}\
         [sweep]\nschedule = \"*/1 * * * * *\"\ngrace_period_seconds = {grace}\n\
         max_downgrades_per_sweep = {cap}\nbatch_size = {batch}\n\
         [shutdown]\ntimeout_seconds = 5\n",
        url = cfg.database_url,
        table = db.table(),
        audit = db.audit_table(),
        page = cfg.page_size,
        timeout = cfg.request_timeout_seconds,
        grace = cfg.grace_period_seconds,
        cap = cfg.max_downgrades_per_sweep,
        batch = cfg.batch_size,
    )
}

impl Fleet {
    /// No replica yet; [`Fleet::start`] starts one.
    pub(crate) fn new(cfg: &SoakConfig, db: &SoakDb, dir: &Path, kubeconfig: &Path) -> Fleet {
        Fleet {
            binary: cfg.binary.clone(),
            dir: dir.to_path_buf(),
            kubeconfig: kubeconfig.to_path_buf(),
            settings: daemon_settings(cfg, db),
            replicas: Vec::new(),
            final_scrapes: Vec::new(),
            exits: BTreeMap::new(),
            starts: 0,
            problems: Vec::new(),
        }
    }

    /// The binary with the environment every run gets: the fake cluster's kubeconfig, no
    /// inherited reconciler settings.
    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        for (k, _) in std::env::vars() {
            if k.starts_with("SANDBOX_RECONCILER") {
                cmd.env_remove(k);
            }
        }
        cmd.env_remove("DATABASE_URL")
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,sqlx=warn,kube=warn")
            .kill_on_drop(true);
        cmd
    }

    pub(crate) async fn start(&mut self) -> Result<()> {
        let port = free_port();
        let config = self.dir.join(format!("daemon-{port}.toml"));
        std::fs::write(
            &config,
            format!("{}[server]\nlisten = \"127.0.0.1:{port}\"\n", self.settings),
        )?;
        let log = std::fs::File::create(self.dir.join(format!("daemon-{port}.log")))?;
        let child = self
            .command()
            .args([
                "--config",
                &config.to_string_lossy(),
                "--log-format",
                "json",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the daemon exited at once"))?;
        self.starts += 1;
        self.replicas.push(Replica {
            child,
            port,
            pid,
            last_scrape: String::new(),
        });
        Ok(())
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.replicas.iter().map(|r| r.pid).collect()
    }

    /// Scrapes every replica; a replica that exited on its own is a problem, and replaced.
    pub(crate) async fn scrape_all(&mut self) {
        let mut dead = Vec::new();
        for (i, r) in self.replicas.iter_mut().enumerate() {
            if let Ok(Some(status)) = r.child.try_wait() {
                dead.push((i, status));
                continue;
            }
            if let Some((200, body)) = http_within(SCRAPE_DEADLINE, r.port, "GET", "/metrics").await
            {
                r.last_scrape = body;
            }
        }
        for (i, status) in dead.into_iter().rev() {
            let r = self.replicas.remove(i);
            self.problems.push(format!(
                "daemon pid {} (port {}) exited on its own: {status}; see daemon-{}.log",
                r.pid, r.port, r.port
            ));
            *self
                .exits
                .entry(format!("unexpected:{status}"))
                .or_default() += 1;
            self.final_scrapes.push(r.last_scrape);
            if let Err(e) = self.start().await {
                self.problems.push(format!("restarting a daemon: {e:#}"));
            }
        }
    }

    /// Stops replica `i` (SIGTERM, or SIGKILL when `crash`) and starts a new one.
    pub(crate) async fn restart(&mut self, i: usize, crash: bool) -> Result<()> {
        if i >= self.replicas.len() {
            return Ok(());
        }
        let mut r = self.replicas.remove(i);
        if let Some((200, body)) = http_within(SCRAPE_DEADLINE, r.port, "GET", "/metrics").await {
            r.last_scrape = body;
        }
        self.stop(r, crash).await;
        self.start().await
    }

    async fn stop(&mut self, mut r: Replica, crash: bool) {
        let label = if crash {
            let _ = r.child.start_kill();
            "sigkill"
        } else {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", &r.pid.to_string()])
                .status();
            "sigterm"
        };
        let status = match tokio::time::timeout(Duration::from_secs(15), r.child.wait()).await {
            Ok(Ok(status)) => status
                .code()
                .map_or("signal".to_string(), |c| format!("exit {c}")),
            _ => {
                let _ = r.child.start_kill();
                let _ = r.child.wait().await;
                self.problems.push(format!(
                    "daemon pid {} did not exit within 15s of SIGTERM",
                    r.pid
                ));
                "timeout".to_string()
            }
        };
        if !crash && status != "exit 0" {
            self.problems.push(format!(
                "daemon pid {} answered SIGTERM with {status} (expected exit 0); see daemon-{}.log",
                r.pid, r.port
            ));
        }
        *self.exits.entry(format!("{label}:{status}")).or_default() += 1;
        self.final_scrapes.push(r.last_scrape);
    }

    pub(crate) async fn stop_all(&mut self) {
        while let Some(r) = self.replicas.pop() {
            self.stop(r, false).await;
        }
    }

    pub(crate) fn sweeps_so_far(&self) -> BTreeMap<String, u64> {
        let scrapes: Vec<String> = self
            .final_scrapes
            .iter()
            .cloned()
            .chain(self.replicas.iter().map(|r| r.last_scrape.clone()))
            .collect();
        sum_by_label(&scrapes, "sandbox_reconciler_sweeps_total", "result")
    }
}

pub(crate) async fn scraper(fleet: Arc<tokio::sync::Mutex<Fleet>>, stop: watch::Receiver<bool>) {
    loop {
        fleet.lock().await.scrape_all().await;
        if nap(&stop, Duration::from_millis(700)).await {
            return;
        }
    }
}

/// Runs `--once` every few seconds beside the daemons; counts outcomes.
pub(crate) async fn once_runner(
    fleet: Arc<tokio::sync::Mutex<Fleet>>,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    kick: Arc<tokio::sync::Notify>,
    stop: watch::Receiver<bool>,
    mut rng: StdRng,
) {
    let mut n = 0u64;
    loop {
        let pause = Duration::from_millis(rng.random_range(2000..6000));
        let stopped = tokio::select! {
            stopped = nap(&stop, pause) => stopped,
            _ = kick.notified() => *stop.borrow(),
        };
        if stopped {
            return;
        }
        n += 1;
        let (mut cmd, config) = {
            let f = fleet.lock().await;
            let config = f.dir.join("once.toml");
            if std::fs::write(&config, &f.settings).is_err() {
                return;
            }
            (f.command(), config)
        };
        cmd.args([
            "--once",
            "--config",
            &config.to_string_lossy(),
            "--output",
            "json",
            "--log-format",
            "json",
        ])
        // Wait a little for the writer lock: sometimes it is free between two daemon sweeps.
        .env(
            "SANDBOX_RECONCILER__DATABASE__WRITER_LOCK_WAIT_SECONDS",
            "1",
        )
        .stderr(Stdio::piped())
        .stdout(Stdio::piped());
        let outcome = match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
            Err(_) => "timeout".to_string(),
            Ok(Err(e)) => format!("spawn_error: {e}"),
            Ok(Ok(out)) => {
                let dir = config.parent().unwrap_or(Path::new("."));
                let _ = std::fs::write(dir.join(format!("once-{n}.log")), &out.stderr);
                let _ = std::fs::write(dir.join(format!("once-{n}.json")), &out.stdout);
                let result = serde_json::from_slice::<Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v["result"].as_str().map(str::to_string));
                match (out.status.code(), result.as_deref()) {
                    (Some(0), _) => "success".to_string(),
                    (Some(3), _) => "refused".to_string(),
                    (Some(1), Some(r)) => r.to_string(),
                    (code, _) => {
                        format!("exit_{}", code.map_or("signal".into(), |c| c.to_string()))
                    }
                }
            }
        };
        if !matches!(
            outcome.as_str(),
            "success" | "refused" | "failed" | "skipped"
        ) {
            fleet
                .lock()
                .await
                .problems
                .push(format!("--once run {n} ended with {outcome}"));
        }
        *lock(&counts).entry(outcome).or_default() += 1;
    }
}
