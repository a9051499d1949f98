//! Command line: a daemon by default, `--once` for one sweep, subcommands for operators.
//!
//! Exit status of `--once`: 0 the sweep completed; 1 it failed (database or API error,
//! or another reconciler holds the writer lock; nothing partial is left behind); 2 usage or
//! configuration error; 3 a guard refused to act.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use tokio::sync::watch;

use crate::cluster::KubeCluster;
use crate::config::Settings;
use crate::report;
use crate::store::{Database, TableMapping};
use crate::sweep::{ClusterSource, Reconciler, SweepOptions, SweepResult};

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_REFUSED: u8 = 3;

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

/// Keeps an agent platform's session database honest about its Kubernetes cluster.
#[derive(Debug, Parser)]
#[command(name = "sandbox-reconciler", version, about)]
pub struct Cli {
    /// Configuration file (TOML); repeat to layer files. Environment variables
    /// SANDBOX_RECONCILER__SECTION__KEY and DATABASE_URL override them.
    #[arg(long = "config", short = 'c', value_name = "FILE", env = "SANDBOX_RECONCILER_CONFIG", value_delimiter = ',')]
    pub config: Vec<PathBuf>,

    /// Run exactly one sweep and exit.
    #[arg(long)]
    pub once: bool,

    /// Plan and report, but write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Override sweep.max_downgrades_per_sweep for this run.
    #[arg(long, value_name = "N")]
    pub max_downgrades: Option<usize>,

    /// Read the cluster from a `kubectl get pods,sandboxes -A -o json` dump instead of the
    /// API (implies --dry-run and --once).
    #[arg(long, value_name = "FILE")]
    pub cluster_snapshot: Option<PathBuf>,

    /// Summary format of --once.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Log format (logs go to standard error).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SANDBOX_RECONCILER_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// Sets up logging; RUST_LOG overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        None => ClusterSource::Api(KubeCluster::connect(&settings).await.map_err(|e| e.to_string())?),
    };
    Ok(Reconciler {
        settings,
        database,
        mapping,
        source,
    })
}

/// Runs the command line; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let settings = match Settings::load(&cli.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !cli.once && cli.cluster_snapshot.is_none() {
        eprintln!("error: daemon mode is not available in this build; run with --once");
        return ExitCode::from(EXIT_CONFIG);
    }
    let reconciler = match build(&cli, settings).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let options = SweepOptions {
        dry_run: cli.dry_run,
        max_downgrades: cli.max_downgrades,
    };
    let (_stop, stopped) = watch::channel(false);
    let report = reconciler.sweep(&options, &stopped).await;
    match cli.output {
        OutputFormat::Json => println!("{}", report::json(&report)),
        OutputFormat::Text => print!("{}", report::text(&report)),
    }
    ExitCode::from(match report.result {
        SweepResult::Success => EXIT_OK,
        SweepResult::Refused => EXIT_REFUSED,
        SweepResult::Failed | SweepResult::Skipped => EXIT_FAILED,
    })
}
