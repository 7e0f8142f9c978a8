//! The `tokenrelay` binary: parses arguments, sets up logging, runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A reverse proxy that keeps OAuth tokens fresh for the Gemini and Qwen APIs.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (default: ./config.toml when present, else built-in defaults).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let config = match tokenrelay::Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tokenrelay: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokenrelay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tokenrelay::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `TOKENRELAY_LOG` (EnvFilter syntax, default `info`) and `TOKENRELAY_LOG_FORMAT`
/// (`text` or `json`).
fn init_logging() {
    let filter = EnvFilter::try_from_env("TOKENRELAY_LOG").unwrap_or_else(|e| {
        if std::env::var_os("TOKENRELAY_LOG").is_some() {
            eprintln!("tokenrelay: TOKENRELAY_LOG is not a valid filter ({e}); using \"info\"");
        }
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("TOKENRELAY_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().flatten_event(true).init(),
        _ => builder.init(),
    }
}
