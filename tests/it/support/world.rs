//! One test's world, built in one place: the rows of the PostgreSQL test table, the objects of
//! the fake API server, the `Settings` the in-process sweeps use and the configuration file the
//! binary reads, written from the same `Settings`.
//!
//! ```ignore
//! let World { db, api, settings, .. } = World::seeded(20, 0)
//!     .await
//!     .row("paused", "suspended", "pod-paused", minutes(120))
//!     .pod("pod-paused")
//!     .settings(|s| s.cluster.confirm_get_max = 0)
//!     .build()
//!     .await;
//! ```

use std::path::PathBuf;
use std::process::Output;

use chrono::Duration;
use sandbox_reconciler::config::Settings;
use serde_json::Value;

use super::{exec, fake_api, run_binary, seeded, write_settings, FakeApiServer, TestDb, MANAGED};

/// A built world. `dir` holds `config` (and is where the binary's HOME and kubeconfig go);
/// it lives as long as the world.
pub struct World {
    pub db: TestDb,
    pub api: FakeApiServer,
    pub settings: Settings,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

/// What a world will hold; `build` writes it.
pub struct WorldBuilder {
    db: TestDb,
    api: FakeApiServer,
    settings: Settings,
    sql: Vec<String>,
    rows: Vec<(String, String, String, Duration)>,
}

impl World {
    /// The test table (`TestDb::new`) and an API server with namespace "agents" and the
    /// Sandbox API (`fake_api`), the test settings (`TestDb::settings`).
    #[allow(clippy::new_ret_no_self)] // a world starts as its builder
    pub async fn new() -> WorldBuilder {
        WorldBuilder::of(TestDb::new().await, fake_api().await)
    }

    /// `seeded(live, orphans)`'s world: live rows with their pods, orphans without.
    pub async fn seeded(live: usize, orphans: usize) -> WorldBuilder {
        let (db, api) = seeded(live, orphans).await;
        WorldBuilder::of(db, api)
    }

    /// centaur's migrated table (`TestDb::migrated(extra_sql)`), with the API of `new`.
    pub async fn migrated(extra_sql: &str) -> WorldBuilder {
        WorldBuilder::of(TestDb::migrated(extra_sql).await, fake_api().await)
    }

    /// centaur's migrated table and an API server with namespace "agents" that does not
    /// serve the Sandbox API (a bare-pod cluster).
    pub async fn migrated_bare_pods(extra_sql: &str) -> WorldBuilder {
        let api = FakeApiServer::start().await;
        api.add_namespace("agents");
        WorldBuilder::of(TestDb::migrated(extra_sql).await, api)
    }
}

impl WorldBuilder {
    fn of(db: TestDb, api: FakeApiServer) -> WorldBuilder {
        let settings = db.settings();
        WorldBuilder {
            db,
            api,
            settings,
            sql: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// The test schema, for SQL and table names made before `build`.
    pub fn db(&self) -> &TestDb {
        &self.db
    }

    /// How often the API server sends watch bookmarks (`FakeApiServer::set_bookmark_interval`).
    pub fn bookmark_interval(self, every: std::time::Duration) -> Self {
        self.api.set_bookmark_interval(every);
        self
    }

    /// SQL run first at `build`, before the rows are inserted.
    pub fn sql(mut self, sql: impl Into<String>) -> Self {
        self.sql.push(sql.into());
        self
    }

    /// A row of the test table, updated `age` ago (`TestDb::insert`).
    pub fn row(mut self, key: &str, state: &str, object: &str, age: Duration) -> Self {
        self.rows
            .push((key.into(), state.into(), object.into(), age));
        self
    }

    /// A managed pod in "agents".
    pub fn pod(self, name: &str) -> Self {
        self.pod_labelled(name, MANAGED)
    }

    /// Managed pods in "agents".
    pub fn pods(self, names: &[&str]) -> Self {
        names.iter().fold(self, |w, name| w.pod(name))
    }

    /// A pod in "agents" with these labels.
    pub fn pod_labelled(self, name: &str, labels: &[(&str, &str)]) -> Self {
        self.api.add_pod("agents", name, labels);
        self
    }

    /// A Sandbox of version v1alpha1 in "agents".
    pub fn sandbox(self, name: &str, spec: Value) -> Self {
        self.api.add_sandbox("v1alpha1", "agents", name, spec);
        self
    }

    /// Changes the settings (after `TestDb::settings`); `build` validates them.
    pub fn settings(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        change(&mut self.settings);
        self
    }

    /// The sessions table the settings name (`TestDb::table` unless changed).
    pub fn table(self, table: &str) -> Self {
        self.settings(|s| s.sessions.table = table.to_string())
    }

    /// Runs the SQL, inserts the rows, validates the settings and writes them as the
    /// configuration file.
    pub async fn build(self) -> World {
        for sql in &self.sql {
            exec(&self.db, sql).await;
        }
        for (key, state, object, age) in &self.rows {
            self.db.insert(key, state, object, *age).await;
        }
        self.settings.validate().expect("test settings are valid");
        let dir = tempfile::tempdir().unwrap();
        let config = write_settings(dir.path(), &self.settings, "");
        World {
            db: self.db,
            api: self.api,
            settings: self.settings,
            dir,
            config,
        }
    }
}

impl World {
    /// Runs the binary with `args` and `--config` naming this world's file, a kubeconfig for
    /// its API server and extra environment variables.
    pub async fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--config", self.config.to_str().unwrap()]);
        run_binary(self.dir.path(), Some(&self.api), &all, env).await
    }

    /// `--once` with this world's configuration.
    pub async fn once(&self, env: &[(&str, &str)]) -> Output {
        self.run(&["--once"], env).await
    }
}
