//! The `tokenrelay` binary: parses arguments, sets up logging, runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

/// glibc's malloc serialises the proxy's many small, short-lived allocations across
/// threads (arena locks showed up in profiles); mimalloc keeps them thread-local.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// A reverse proxy that keeps OAuth tokens fresh for the Gemini and Qwen APIs.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (default: ./config.toml when present, else built-in defaults).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Show every credential of a running instance: state, expiry, last refresh, last error.
    Status {
        /// The admin listener (default: server.admin_listen from the configuration).
        #[arg(long)]
        admin: Option<String>,
    },
    /// Force a refresh in a running instance: one credential (PROVIDER/ID) or all.
    Refresh {
        target: Option<String>,
        #[arg(long)]
        admin: Option<String>,
    },
    /// Show what a running instance's clients spent: tokens by client, model or
    /// credential over a time range, and each client's windows against its limits.
    Usage {
        /// Group by any of client, provider, model, credential (comma-separated).
        #[arg(long, default_value = "client")]
        by: String,
        /// RFC 3339, unix seconds, or a duration ago.
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(long)]
        until: Option<String>,
        /// One row per bucket of this length (5m, 1h, 1d); default: totals.
        #[arg(long)]
        step: Option<String>,
        #[arg(long)]
        admin: Option<String>,
    },
    /// Validate the configuration and credential files offline.
    Check,
    /// Exit 0 if a running instance answers /healthz (for container health checks).
    Health {
        #[arg(long)]
        admin: Option<String>,
    },
    /// Sign in again and write the credential where tokenrelay reads it: `gemini` (Google,
    /// your own Desktop OAuth client, loopback + PKCE) or `qwen` (device flow).
    Login(tokenrelay::ops::login::LoginArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let command = args.command.unwrap_or(Command::Run);
    // Held to the end of `main`: dropping it writes out the lines still queued.
    let _log_writer = matches!(command, Command::Run).then(init_logging).flatten();
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
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        use tokenrelay::ops::cli;
        match command {
            Command::Run => tokenrelay::run(config).await.map(|()| 0),
            Command::Status { admin } => cli::status(&config, admin.as_deref()).await,
            Command::Refresh { target, admin } => {
                cli::refresh(&config, admin.as_deref(), target.as_deref()).await
            }
            Command::Usage {
                by,
                since,
                until,
                step,
                admin,
            } => {
                cli::usage(
                    &config,
                    admin.as_deref(),
                    &by,
                    &since,
                    until.as_deref(),
                    step.as_deref(),
                )
                .await
            }
            Command::Check => cli::check(&config),
            Command::Health { admin } => cli::health(&config, admin.as_deref()).await,
            Command::Login(args) => Ok(tokenrelay::ops::login::login(&config, args).await),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("tokenrelay: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `TOKENRELAY_LOG` (EnvFilter syntax, default `info`) and `TOKENRELAY_LOG_FORMAT`
/// (`text` or `json`), to stderr through the batching log writer (`ops::logwriter`).
fn init_logging() -> Option<tokenrelay::ops::logwriter::LogGuard> {
    let (writer, guard) = match tokenrelay::ops::logwriter::start(std::io::stderr()) {
        Ok(w) => (Some(w.0), Some(w.1)),
        Err(e) => {
            eprintln!(
                "tokenrelay: cannot start the log writer thread ({e}); writing logs directly"
            );
            (None, None)
        }
    };
    let filter = EnvFilter::try_from_env("TOKENRELAY_LOG").unwrap_or_else(|e| {
        if std::env::var_os("TOKENRELAY_LOG").is_some() {
            eprintln!("tokenrelay: TOKENRELAY_LOG is not a valid filter ({e}); using \"info\"");
        }
        EnvFilter::new("info")
    });
    // Colours only on a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let json = std::env::var("TOKENRELAY_LOG_FORMAT").as_deref() == Ok("json");
    match (writer, json) {
        (Some(w), true) => builder.with_writer(w).json().flatten_event(true).init(),
        (Some(w), false) => builder.with_writer(w).init(),
        (None, true) => builder
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .init(),
        (None, false) => builder.with_writer(std::io::stderr).init(),
    }
    guard
}
