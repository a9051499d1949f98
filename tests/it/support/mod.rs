//! The helpers that need the reconciler's own types: a private PostgreSQL schema per test
//! with settings pointing at it, sweeps in-process, the real binary as a process. What needs
//! only PostgreSQL, the network or a fake cluster is in `testkit`.

pub mod daemon;
mod world;

pub use world::{World, WorldBuilder};

use std::path::{Path, PathBuf};
use std::process::Output;

use chrono::{DateTime, Duration, Utc};
use sandbox_reconciler::cluster::KubeCluster;
use sandbox_reconciler::config::Settings;
use sandbox_reconciler::store::{Database, StoreError, TableMapping};
use sandbox_reconciler::sweep::{ClusterSource, Reconciler, SweepOptions, SweepReport};
use sandbox_reconciler::undo::{self, UndoReport, UndoRequest};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool, Row};

pub use testkit::fake_api::{FakeApiServer, Fault, FaultAction, Kind};

pub use testkit::pg::database_url;

/// A private schema holding a centaur-shaped `sandbox_sessions` table.
pub struct TestDb {
    pub pool: PgPool,
    pub schema: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url())
            .await
            .expect("PostgreSQL must be running (scripts/ensure-postgres.sh starts it)");
        let schema = testkit::pg::create_sessions_schema(&pool, "t", "")
            .await
            .unwrap();
        TestDb { pool, schema }
    }

    /// A private schema holding centaur's table as its migrations leave it
    /// (`../shared/fixtures/centaur_sandbox_sessions_migrated.sql`), after `extra_sql`.
    pub async fn migrated(extra_sql: &str) -> TestDb {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url())
            .await
            .expect("PostgreSQL must be running (scripts/ensure-postgres.sh starts it)");
        let schema = testkit::pg::create_schema_with(
            &pool,
            "m",
            testkit::pg::CENTAUR_MIGRATED_SQL,
            extra_sql,
        )
        .await
        .unwrap();
        TestDb { pool, schema }
    }

    pub fn table(&self) -> String {
        format!("{}.sandbox_sessions", self.schema)
    }

    pub fn audit_table(&self) -> String {
        format!("{}.reconciler_audit", self.schema)
    }

    /// Inserts a session row updated `age` ago.
    pub async fn insert(&self, key: &str, state: &str, object: &str, age: Duration) {
        self.insert_at(key, state, object, Utc::now() - age).await;
    }

    pub async fn insert_at(&self, key: &str, state: &str, object: &str, updated_at: DateTime<Utc>) {
        let sql = format!(
            "INSERT INTO {} (thread_key, sandbox_id, state, updated_at, agent_thread_id) \
             VALUES ($1, $2, $3, $4, $5)",
            self.table()
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .bind(object)
            .bind(state)
            .bind(updated_at)
            .bind(format!("agent-{key}"))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// State and agent_thread_id of a row.
    pub async fn row(&self, key: &str) -> (String, Option<String>) {
        let sql = format!(
            "SELECT state, agent_thread_id FROM {} WHERE thread_key = $1",
            self.table()
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    pub async fn state(&self, key: &str) -> String {
        self.row(key).await.0
    }

    /// Number of audit records; 0 when the audit table does not exist yet.
    pub async fn audit_count(&self) -> i64 {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(self.audit_table())
            .fetch_one(&self.pool)
            .await
            .unwrap();
        if !exists {
            return 0;
        }
        let sql = format!("SELECT count(*) FROM {}", self.audit_table());
        sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Rows per state, for "nothing changed" assertions.
    pub async fn fingerprint(&self) -> Vec<(String, String, Option<String>)> {
        let sql = format!(
            "SELECT thread_key, state, agent_thread_id FROM {} ORDER BY thread_key",
            self.table()
        );
        sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// Settings for this schema: pods and sandboxes (names "sb-…", so a missing object is
    /// attributed to a backend) in namespace "agents", no grace for rows older than 10 minutes.
    pub fn settings(&self) -> Settings {
        let mut s = Settings::default();
        s.database.url = database_url();
        s.sessions.table = self.table();
        s.audit.table = self.audit_table();
        s.cluster.namespaces = vec!["agents".into()];
        s.cluster.page_size = 2;
        s.cluster.request_timeout = std::time::Duration::from_secs(5);
        s.backends.agent_sandbox.enabled = true;
        s.backends.agent_sandbox.object_name_prefix = "sb-".into();
        s.sweep.grace_period = std::time::Duration::from_secs(600);
        s.guard.min_live_missing = 1;
        // The tests exercise a profile that clears a column (the default clears none).
        s.sessions.clear_columns = vec!["agent_thread_id".into()];
        s.validate().expect("test settings are valid");
        s
    }

    /// The same settings as a TOML file for the binary, `extra` appended.
    pub fn write_config(&self, dir: &Path, extra: &str) -> PathBuf {
        write_settings(dir, &self.settings(), extra)
    }
}

/// Builds an in-process reconciler talking to `api` with the real kube::Client.
pub fn reconciler(settings: Settings, api: &FakeApiServer) -> Reconciler {
    let cluster = KubeCluster::with_client(api.client(), &settings);
    Reconciler::new(
        settings.clone(),
        Database::new(&settings).unwrap(),
        TableMapping::from_settings(&settings).unwrap(),
        ClusterSource::Api(Box::new(cluster)),
    )
}

/// Runs one sweep in-process.
pub async fn sweep(settings: Settings, api: &FakeApiServer, dry_run: bool) -> SweepReport {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    reconciler(settings, api)
        .sweep(
            &SweepOptions {
                dry_run,
                max_downgrades: None,
            },
            &rx,
        )
        .await
}

/// Runs the real binary with `args`, a kubeconfig for `api` (if any) and extra env vars.
pub async fn run_binary(
    dir: &Path,
    api: Option<&FakeApiServer>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandbox-reconciler"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .env("HOME", dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("SANDBOX_RECONCILER") {
            cmd.env_remove(k);
        }
    }
    let kubeconfig = dir.join("kubeconfig");
    if let Some(api) = api {
        api.write_kubeconfig(&kubeconfig);
    }
    cmd.env("KUBECONFIG", &kubeconfig);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.kill_on_drop(true);
    tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("binary finished within 60s")
        .expect("binary ran")
}

/// Runs the real binary once (`--once --config <config>`) against `api`, with extra env vars.
pub async fn run_once(
    dir: &Path,
    api: &FakeApiServer,
    config: &Path,
    env: &[(&str, &str)],
) -> Output {
    run_binary(
        dir,
        Some(api),
        &["--once", "--config", config.to_str().unwrap()],
        env,
    )
    .await
}

/// Pods labelled the way the default backend selects them.
pub const MANAGED: &[(&str, &str)] = &[("centaur.ai/managed", "true")];

/// A typical world: `live` running sessions with their pods (`live-i` / `pod-live-i`) and
/// `orphans` suspended sessions whose pods are gone (`orphan-i` / `pod-gone-i`, oldest last),
/// with the Sandbox API served.
pub async fn seeded(live: usize, orphans: usize) -> (TestDb, FakeApiServer) {
    let db = TestDb::new().await;
    let api = fake_api().await;
    for i in 0..live {
        api.add_pod("agents", &format!("pod-live-{i}"), MANAGED);
        db.insert(
            &format!("live-{i}"),
            "running",
            &format!("pod-live-{i}"),
            minutes(60),
        )
        .await;
    }
    for i in 0..orphans {
        db.insert(
            &format!("orphan-{i}"),
            "suspended",
            &format!("pod-gone-{i}"),
            minutes(60 + i as i64),
        )
        .await;
    }
    (db, api)
}

/// Creates the audit table, then holds it locked so the next apply batch blocks inside its
/// transaction. Returns the transaction holding the lock.
pub async fn block_audit(db: &TestDb) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let settings = db.settings();
    let mut conn = Database::new(&settings).unwrap().connect().await.unwrap();
    let mapping = TableMapping::from_settings(&settings).unwrap();
    sandbox_reconciler::store::migrate(&mut conn, &mapping)
        .await
        .unwrap();
    let mut blocker = db.pool.begin().await.unwrap();
    let lock = format!("LOCK TABLE {} IN EXCLUSIVE MODE", db.audit_table());
    sqlx::query(AssertSqlSafe(lock))
        .execute(&mut *blocker)
        .await
        .unwrap();
    blocker
}

/// Waits until a reconciler's apply batch is blocked on a lock; returns its backend pid.
pub async fn wait_for_blocked_batch(db: &TestDb) -> i32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'sandbox-reconciler' \
             AND wait_event_type = 'Lock' AND query ILIKE '%unnest%' LIMIT 1",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no apply batch blocked on the audit table"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub fn minutes(n: i64) -> Duration {
    Duration::minutes(n)
}

/// An API server with the namespace the test settings name and the Sandbox API served.
pub async fn fake_api() -> FakeApiServer {
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_namespace("agents");
    api
}

/// Runs `sql` (one or more statements) in the test database; panics with the SQL on error.
pub async fn exec(db: &TestDb, sql: &str) {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A process's standard output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process's standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes `settings`, every key of them, as a configuration file in `dir`, with `extra` (TOML)
/// laid over it key by key; returns its path. The binary reads back what the in-process sweeps
/// use.
pub fn write_settings(dir: &Path, settings: &Settings, extra: &str) -> PathBuf {
    let mut doc = serde_json::to_value(settings).unwrap();
    if !extra.trim().is_empty() {
        let over: serde_json::Value = config::Config::builder()
            .add_source(config::File::from_str(extra, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .unwrap_or_else(|e| panic!("extra configuration {extra:?}: {e}"));
        lay_over(&mut doc, over);
    }
    let mut text = String::new();
    write_toml_table(&mut text, "", &doc);
    let path = dir.join(format!("config-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    path
}

fn lay_over(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(base), serde_json::Value::Object(over)) => {
            for (k, v) in over {
                lay_over(base.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (base, over) => *base = over,
    }
}

/// A JSON object as TOML: its scalars and arrays under `[path]`, then its tables. JSON's
/// strings, numbers, booleans and arrays of them are TOML's too.
fn write_toml_table(out: &mut String, path: &str, table: &serde_json::Value) {
    let map = table.as_object().expect("settings are tables of values");
    let (tables, values): (Vec<_>, Vec<_>) = map.iter().partition(|(_, v)| v.is_object());
    if !path.is_empty() {
        out.push_str(&format!("[{path}]\n"));
    }
    for (k, v) in values {
        out.push_str(&format!("{k} = {v}\n"));
    }
    for (k, v) in tables {
        let sub = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        write_toml_table(out, &sub, v);
    }
}

/// Undoes every downgrade of sweep `sweep` in-process, with the database and table of
/// `settings` and no wait for the writer lock.
pub async fn undo_sweep(settings: &Settings, sweep: uuid::Uuid) -> Result<UndoReport, StoreError> {
    undo_in_process(settings, Some(sweep), None).await
}

/// Undoes the last downgrade of session `key` in-process, like `undo_sweep`.
pub async fn undo_session(settings: &Settings, key: &str) -> Result<UndoReport, StoreError> {
    undo_in_process(settings, None, Some(key.to_string())).await
}

async fn undo_in_process(
    settings: &Settings,
    sweep: Option<uuid::Uuid>,
    session: Option<String>,
) -> Result<UndoReport, StoreError> {
    let request = UndoRequest {
        sweep,
        session,
        dry_run: false,
    };
    undo::run(
        &Database::new(settings).unwrap(),
        &TableMapping::from_settings(settings).unwrap(),
        &request,
        std::time::Duration::ZERO,
    )
    .await
}
