//! What one soak run does.

use std::path::PathBuf;
use std::time::Duration;

/// What one soak run does.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The `sandbox-reconciler` binary to run as daemons and `--once` (built beforehand: the
    /// soak never runs cargo).
    pub binary: PathBuf,
    /// PostgreSQL server; a private schema is created (and dropped after a passing run).
    pub database_url: String,
    /// How long the simulator, faults and daemons run together.
    pub duration: Duration,
    /// Seed of every random choice (timings still vary from run to run).
    pub seed: u64,
    /// Daemon replicas (they compete for the writer lock).
    pub replicas: usize,
    /// Run `--once` every few seconds beside the daemons.
    pub once_runs: bool,
    /// Switch faults on and off.
    pub faults: bool,
    /// Sessions the simulator keeps (it creates up to this many).
    pub sessions: usize,
    /// Concurrent simulator tasks.
    pub workers: usize,
    pub grace_period_seconds: u64,
    pub page_size: u32,
    pub request_timeout_seconds: u64,
    pub max_downgrades_per_sweep: usize,
    pub batch_size: usize,
    /// Keep the schema even after a passing run.
    pub keep_schema: bool,
    /// Where configs, kubeconfig and daemon logs go; a temporary directory (kept when the run
    /// fails) if `None`.
    pub work_dir: Option<PathBuf>,
    /// Print a progress line to stderr every few seconds.
    pub progress: bool,
    /// Variant: both backends enabled with `object_name_prefix` explicitly empty, and pods and
    /// Sandboxes named alike (`s-N`), so nothing tells a missing pod from a missing Sandbox:
    /// every orphan is attributed to `unknown` and counts against both backends' guards,
    /// which may legitimately refuse. (The default run configures no prefix either, but its
    /// names differ: `p-N` and `sb-N`.)
    pub backends_without_prefixes: bool,
    /// Variant: the session table is shared by two clusters. It gets a scope column
    /// (`cluster`) and the primary key `(cluster, thread_key)`; the daemons are configured for
    /// scope A (`sessions.scope_column`/`scope_value`), and a second application churns the
    /// rows of scope B, which use the same keys and object names as scope A's rows and refer to
    /// objects this fake cluster mostly does not have.
    pub shared_table: bool,
}

impl SoakConfig {
    pub fn new(binary: PathBuf, database_url: String) -> SoakConfig {
        SoakConfig {
            binary,
            database_url,
            duration: Duration::from_secs(60),
            seed: 1,
            replicas: 2,
            once_runs: true,
            faults: true,
            sessions: 150,
            workers: 4,
            grace_period_seconds: 2,
            page_size: 20,
            request_timeout_seconds: 2,
            max_downgrades_per_sweep: 25,
            batch_size: 7,
            keep_schema: false,
            work_dir: None,
            progress: false,
            backends_without_prefixes: false,
            shared_table: false,
        }
    }

    /// The variant's name, for the report.
    pub fn variant(&self) -> String {
        match (self.backends_without_prefixes, self.shared_table) {
            (false, false) => "default".to_string(),
            (true, false) => "backends-without-prefixes".to_string(),
            (false, true) => "shared-table".to_string(),
            (true, true) => "backends-without-prefixes+shared-table".to_string(),
        }
    }
}
