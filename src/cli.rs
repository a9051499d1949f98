//! Command line: a daemon by default, `--once` for one sweep, `check` for a preflight.
//!
//! Exit status of `--once`: 0 the sweep completed; 1 it failed (database or API error,
//! or another reconciler holds the writer lock; nothing partial is left behind); 2 usage or
//! configuration error; 3 a guard refused to act.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::KubeCluster;
use crate::config::Settings;
use crate::daemon::DaemonError;
use crate::metrics::Metrics;
use crate::permissions::Mode;
use crate::progress::{SweepProgress, TerminalProgress};
use crate::report;
use crate::store::{Database, TableMapping};
use crate::sweep::{ClusterSource, ErrorKind, Reconciler, SweepOptions, SweepReport, SweepResult};

/// The exit status of every command, in one place (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The sweep (or command) completed.
    Ok = 0,
    /// It failed: a database or API error, or another reconciler holds the writer lock;
    /// nothing partial is left behind.
    Failed = 1,
    /// Usage or configuration error, including a table that does not fit the configuration.
    Config = 2,
    /// A guard refused to act.
    Refused = 3,
}

impl Exit {
    /// How a sweep ends the process: an enabled backend the API server does not serve is a
    /// configuration error (exit 2), not a failed sweep.
    pub fn of(report: &SweepReport) -> Exit {
        match report.result {
            SweepResult::Success => Exit::Ok,
            SweepResult::Refused => Exit::Refused,
            SweepResult::Failed if report.error_kind == Some(ErrorKind::NotServed) => Exit::Config,
            SweepResult::Failed | SweepResult::Skipped => Exit::Failed,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--version`: the crate version and the git commit the binary was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("SANDBOX_RECONCILER_REVISION"),
    ")"
);

/// Keeps an agent platform's session database honest about its Kubernetes cluster.
///
/// Global options (`--config`, `--log-format`, `--output`, `--dry-run`) are accepted before
/// and after a subcommand, as kubectl and cargo users expect.
#[derive(Debug, Parser)]
#[command(name = "sandbox-reconciler", version = VERSION, about)]
pub struct Cli {
    /// Configuration file (TOML); repeat to layer files. Environment variables
    /// SANDBOX_RECONCILER__SECTION__KEY and DATABASE_URL override them.
    #[arg(
        long = "config",
        short = 'c',
        value_name = "FILE",
        env = "SANDBOX_RECONCILER_CONFIG",
        value_delimiter = ',',
        global = true
    )]
    pub config: Vec<PathBuf>,

    /// Run exactly one sweep and exit.
    #[arg(long)]
    pub once: bool,

    /// Plan and report, but write nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,

    /// Override sweep.max_downgrades_per_sweep for this run.
    #[arg(long, value_name = "N")]
    pub max_downgrades: Option<usize>,

    /// Read the cluster from a `kubectl get pods,sandboxes -A -o json` dump instead of the
    /// API (implies --dry-run and --once).
    #[arg(long, value_name = "FILE")]
    pub cluster_snapshot: Option<PathBuf>,

    /// Summary format of --once and undo.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, global = true)]
    pub output: OutputFormat,

    /// Log format (logs go to standard error).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SANDBOX_RECONCILER_LOG_FORMAT", global = true)]
    pub log_format: LogFormat,

    /// Print every metric the binary exports (name, type, labels, help) and exit; the deploy
    /// checks and the README test read the metrics contract from here.
    #[arg(long, hide = true)]
    pub print_metrics: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Preflight: configuration, database table and columns, the backends' resources, API
    /// permissions. Exits 1 if any check fails.
    Check {
        /// Review the permissions of this mode (the Deployment's daemon, or --once).
        #[arg(long, value_enum, default_value_t = Mode::Daemon)]
        mode: Mode,
    },
    /// Print the Kubernetes permissions the reconciler needs with this configuration (the
    /// list `check` reviews and the deploy manifests grant).
    Permissions {
        /// The daemon (get, list, watch) or --once (get, list).
        #[arg(long, value_enum, default_value_t = Mode::Daemon)]
        mode: Mode,
        /// Declare every backend as if it were enabled (manifests that serve any profile).
        #[arg(long)]
        all_backends: bool,
    },
    /// Restore downgraded sessions from the audit records, for rows still exactly as the
    /// downgrade left them. Exits 1 on a database error.
    Undo {
        /// Undo every downgrade of this sweep (its id is in the summary and the logs).
        #[arg(long, value_name = "ID", required_unless_present = "session")]
        sweep: Option<uuid::Uuid>,
        /// Undo the latest downgrade of this session (with --sweep: only within that sweep).
        #[arg(long, value_name = "KEY")]
        session: Option<String>,
    },
    /// Why a sweep would (or would not) change this session, step by step: the row, each
    /// backend's answer, the guards, the cap, the audit records. Read-only (no lock, no
    /// write), so it runs beside the daemon. Exits 0 with an answer, 1 on a database or API
    /// error, 2 on a configuration error.
    Explain {
        /// The session's key (sessions.key_column).
        #[arg(long, value_name = "KEY")]
        session: String,
    },
    /// The audit records (downgrades and undos, newest first) as a table or JSON. Read-only.
    History {
        /// Only records younger than this: 90m, 24h, 7d.
        #[arg(long, value_name = "DURATION", value_parser = crate::history::parse_since)]
        since: Option<chrono::Duration>,
        /// Only this session's records.
        #[arg(long, value_name = "KEY")]
        session: Option<String>,
        /// Only this sweep's (or undo's) records.
        #[arg(long, value_name = "ID")]
        sweep: Option<uuid::Uuid>,
        /// At most this many records.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: i64,
    },
}

/// Whether logs may carry colour: only on a terminal, never with `NO_COLOR` set (any
/// non-empty value, see no-color.org), never in JSON.
pub fn log_colour(format: LogFormat, stderr_is_terminal: bool, no_color: Option<&str>) -> bool {
    format == LogFormat::Text && stderr_is_terminal && no_color.is_none_or(str::is_empty)
}

/// Sets up logging; RUST_LOG overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let colour = log_colour(
        format,
        std::io::stderr().is_terminal(),
        std::env::var("NO_COLOR").ok().as_deref(),
    );
    // kube-client's HTTP layer logs every failed request at ERROR on its own; the reconciler
    // logs each failure once, with what it was doing, so that line is off unless RUST_LOG
    // names kube_client itself.
    let env = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,kube=warn"));
    if !env.contains("kube_client") {
        if let Ok(off) = "kube_client::client::builder=off".parse() {
            filter = filter.add_directive(off);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Builds the reconciler from configuration; errors are configuration errors (exit 2).
pub async fn build(cli: &Cli, settings: Settings) -> Result<Reconciler, String> {
    let mapping = TableMapping::from_settings(&settings)?;
    let database = Database::new(&settings).map_err(|e| e.to_string())?;
    let source = match &cli.cluster_snapshot {
        Some(path) => {
            if !path.is_file() {
                return Err(format!(
                    "--cluster-snapshot {}: not found; pass the file written by `kubectl get pods,sandboxes -A -o json`",
                    path.display()
                ));
            }
            ClusterSource::Dump(path.clone())
        }
        None => ClusterSource::Api(Box::new(
            KubeCluster::connect(&settings)
                .await
                .map_err(|e| e.to_string())?,
        )),
    };
    Ok(Reconciler::new(settings, database, mapping, source))
}

/// Runs the command line; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    if cli.print_metrics {
        print!("{}", print_metrics(cli.output));
        return Exit::Ok.into();
    }
    let settings = match Settings::load(&cli.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Config.into();
        }
    };
    for (key, instead) in settings.deprecated_keys() {
        tracing::warn!("config key {key} is deprecated; use {instead}");
    }
    if let Some(command) = &cli.command {
        return run_command(&cli, command, settings).await;
    }
    let (reconciler, metrics, options) = match prepare_sweeps(&cli, settings).await {
        Ok(prepared) => prepared,
        Err(exit) => return exit,
    };
    if !cli.once && cli.cluster_snapshot.is_none() {
        run_daemon(reconciler, options, metrics).await
    } else {
        run_once(reconciler, &options, cli.output).await
    }
}

/// Runs a subcommand.
async fn run_command(cli: &Cli, command: &Command, settings: Settings) -> ExitCode {
    match command {
        Command::Check { mode } => run_check(&settings, *mode).await,
        Command::Permissions { mode, all_backends } => {
            let rules = crate::permissions::required(&settings, *mode, *all_backends);
            match cli.output {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&rules).unwrap_or_default()
                ),
                OutputFormat::Text => print!("{}", crate::permissions::text(&rules)),
            }
            Exit::Ok.into()
        }
        Command::Undo { sweep, session } => {
            let request = crate::undo::UndoRequest {
                sweep: *sweep,
                session: session.clone(),
                dry_run: cli.dry_run,
            };
            run_undo(&settings, &request, cli.output).await
        }
        Command::Explain { session } => run_explain(cli, settings, session, cli.output).await,
        Command::History {
            since,
            session,
            sweep,
            limit,
        } => {
            let filter = crate::history::HistoryFilter {
                since: *since,
                session: session.clone(),
                sweep: *sweep,
                limit: *limit,
            };
            run_history(&settings, &filter, cli.output).await
        }
    }
}

/// Builds the reconciler and its metrics for sweeping (the daemon or `--once`), and resolves
/// the table and runs the audit migrations once, before any sweep: a table that does not fit
/// the configuration is a configuration error (exit 2). A database that does not answer yet
/// is not: the sweep reports it (and the daemon retries).
async fn prepare_sweeps(
    cli: &Cli,
    settings: Settings,
) -> Result<(Reconciler, Arc<Metrics>, SweepOptions), ExitCode> {
    let metrics = Metrics::new(&settings);
    let mut reconciler = build(cli, settings).await.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(Exit::Config)
    })?;
    if let ClusterSource::Api(cluster) = &mut reconciler.source {
        metrics.observe_cluster(cluster);
    }
    let options = SweepOptions {
        dry_run: cli.dry_run,
        max_downgrades: cli.max_downgrades,
    };
    let dry_run = reconciler.is_dry_run(&options);
    if let Err(e) = reconciler.prepare_at_start(!dry_run).await {
        let message = crate::store::redact(&e.to_string(), &reconciler.settings.database.url);
        if e.is_configuration() {
            eprintln!("error: {message}");
            return Err(Exit::Config.into());
        }
        tracing::warn!("preparing the session table failed (retried by the sweep): {message}");
    }
    Ok((reconciler, metrics, options))
}

/// The daemon: checks the backends' resources, binds `server.listen` and runs until
/// SIGTERM/SIGINT.
async fn run_daemon(
    reconciler: Reconciler,
    options: SweepOptions,
    metrics: Arc<Metrics>,
) -> ExitCode {
    // An enabled backend the API server does not serve would fail every sweep: a
    // configuration error at start-up. An API server that does not answer yet is not (the
    // sweeps retry and report it).
    if let ClusterSource::Api(cluster) = &reconciler.source {
        match cluster.verify_served().await {
            Err(e) if e.is_configuration() => {
                eprintln!("error: {e}");
                return Exit::Config.into();
            }
            Err(e) => {
                tracing::warn!(
                    "checking the backends' resources failed (retried by the sweep): {e}"
                )
            }
            Ok(()) => {}
        }
    }
    let started = match listen(reconciler.settings.server.listen).await {
        Ok(listener) => {
            let shutdown = crate::daemon::wait_for_signal();
            crate::daemon::run(reconciler, options, metrics, listener, shutdown).await
        }
        Err(e) => Err(e),
    };
    match started {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            eprintln!("error: {e}");
            Exit::Config.into()
        }
    }
}

/// Binds `server.listen` (so a bad address fails at start-up).
async fn listen(addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| DaemonError::Listen {
            addr: addr.to_string(),
            message: e.to_string(),
        })
}

/// `--once` (or a cluster snapshot): one sweep, its summary on standard output.
async fn run_once(
    mut reconciler: Reconciler,
    options: &SweepOptions,
    output: OutputFormat,
) -> ExitCode {
    // SIGTERM/SIGINT: finish or roll back the batch in flight, start no other.
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        crate::daemon::wait_for_signal().await;
        tracing::warn!("stopping after the batch in flight (signal again to abort at once)");
        let _ = stop.send(true);
        crate::daemon::wait_for_signal().await;
        // An open batch rolls back as the connection closes.
        std::process::exit(130);
    });
    // Signs of life on a terminal (never in JSON output or when standard error is a file).
    let progress = show_progress(output).then(|| Arc::new(TerminalProgress::new()));
    if let Some(progress) = &progress {
        if let ClusterSource::Api(cluster) = &mut reconciler.source {
            let p = progress.clone();
            cluster.set_page_hook(Arc::new(move |backend, objects| {
                p.page_listed(backend, objects)
            }));
        }
        reconciler = reconciler.with_progress(progress.clone());
    }
    let report = reconciler.sweep(options, &stopped).await;
    if let Some(progress) = &progress {
        progress.finish();
    }
    match output {
        OutputFormat::Json => println!("{}", report::json(&report)),
        OutputFormat::Text => print!("{}", report::text(&report)),
    }
    Exit::of(&report).into()
}

/// Whether to draw progress: a text summary and a terminal on standard error.
fn show_progress(output: OutputFormat) -> bool {
    use std::io::IsTerminal;
    crate::progress::wanted(
        output == OutputFormat::Json,
        std::io::stderr().is_terminal(),
    )
}

/// The metrics contract: one line per metric (`NAME KIND LABELS HELP`, labels comma-separated
/// or `-`), or a JSON array.
pub fn print_metrics(output: OutputFormat) -> String {
    let metrics = Metrics::new(&Settings::default());
    let described = metrics.describe();
    match output {
        OutputFormat::Json => serde_json::to_string_pretty(described).unwrap_or_default() + "\n",
        OutputFormat::Text => described
            .iter()
            .map(|m| {
                let labels = if m.labels.is_empty() {
                    "-".to_string()
                } else {
                    m.labels.join(",")
                };
                format!("{} {} {labels} {}\n", m.name, m.kind, m.help)
            })
            .collect(),
    }
}

/// The database and the table mapping a read or undo command needs; a configuration error
/// is printed and ends the command with exit 2.
fn database_and_mapping(settings: &Settings) -> Result<(Database, TableMapping), ExitCode> {
    TableMapping::from_settings(settings)
        .and_then(|mapping| {
            Database::new(settings)
                .map(|db| (db, mapping))
                .map_err(|e| e.to_string())
        })
        .map_err(|e| {
            eprintln!("error: {e}");
            Exit::Config.into()
        })
}

async fn run_undo(
    settings: &Settings,
    request: &crate::undo::UndoRequest,
    output: OutputFormat,
) -> ExitCode {
    let (database, mapping) = match database_and_mapping(settings) {
        Ok(p) => p,
        Err(exit) => return exit,
    };
    let lock_wait = settings.database.writer_lock_wait;
    let spinner = show_progress(output).then(TerminalProgress::undo);
    let outcome = crate::undo::run(&database, &mapping, request, lock_wait).await;
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    answer(
        outcome.map_err(|e| (e.is_configuration(), e.to_string())),
        output,
        crate::undo::text,
        &settings.database.url,
    )
}

/// Prints a read command's answer (JSON, or its text rendering) and returns its exit status:
/// 0 answered, 2 a configuration error, 1 any other error (redacted of the database URL's
/// secrets).
fn answer<T: serde::Serialize>(
    outcome: Result<T, (bool, String)>,
    output: OutputFormat,
    text: impl Fn(&T) -> String,
    database_url: &str,
) -> ExitCode {
    match outcome {
        Ok(value) => {
            match output {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                ),
                OutputFormat::Text => print!("{}", text(&value)),
            }
            Exit::Ok.into()
        }
        Err((configuration, message)) => {
            eprintln!("error: {}", crate::store::redact(&message, database_url));
            if configuration {
                Exit::Config.into()
            } else {
                Exit::Failed.into()
            }
        }
    }
}

async fn run_explain(
    cli: &Cli,
    settings: Settings,
    session: &str,
    output: OutputFormat,
) -> ExitCode {
    let url = settings.database.url.clone();
    let reconciler = match build(cli, settings).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Config.into();
        }
    };
    let outcome = crate::explain::run(&reconciler, session).await;
    answer(
        outcome.map_err(|e| (e.is_configuration(), e.to_string())),
        output,
        crate::explain::text,
        &url,
    )
}

async fn run_history(
    settings: &Settings,
    filter: &crate::history::HistoryFilter,
    output: OutputFormat,
) -> ExitCode {
    let (database, mapping) = match database_and_mapping(settings) {
        Ok(p) => p,
        Err(exit) => return exit,
    };
    let outcome = async {
        let mut conn = database.connect().await?;
        let mapping = crate::store::resolve(&mut conn, &mapping).await?;
        crate::history::read(&mut conn, &mapping, filter).await
    }
    .await;
    answer(
        outcome.map_err(|e| (e.is_configuration(), e.to_string())),
        output,
        crate::history::text,
        &settings.database.url,
    )
}

async fn run_check(settings: &Settings, mode: Mode) -> ExitCode {
    let client = crate::cluster::client::connect(settings)
        .await
        .map_err(|e| e.to_string());
    let lines = crate::check::run(settings, mode, client).await;
    print!("{}", crate::check::render(&lines));
    if lines.iter().all(|l| l.ok) {
        Exit::Ok.into()
    } else {
        Exit::Failed.into()
    }
}
