//! Entry point: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use sandbox_reconciler::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(cli.log_format);
    cli::run(cli).await
}
