//! The command line: a thin `clap` front over the library, and the only place (with
//! `main.rs`) that uses `anyhow` and decides exit codes.
//!
//! Exit codes: 0 success, or `run` stopped by SIGINT/SIGTERM; 1 the command ran and found a
//! problem (drift for `verify`, a failed `check`, dead letters still failing a replay); 2 bad
//! usage or config; 3 a runtime failure (a server unreachable past its limit, a fatal sync
//! error).

mod commands;
mod logging;
mod output;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use logging::LogFormat;

/// The command ran and did its job.
pub const EXIT_OK: i32 = 0;
/// The command ran and found a problem (drift, a failed check, replays still failing).
pub const EXIT_PROBLEM: i32 = 1;
/// Bad usage or configuration.
pub const EXIT_USAGE: i32 = 2;
/// A runtime failure: a server unreachable past its limit, a fatal sync error.
pub const EXIT_RUNTIME: i32 = 3;

const EXIT_CODES_HELP: &str = "Exit codes:
  0  success; `run` stopped by SIGINT or SIGTERM
  1  the command ran and found a problem (verify: drift; check: a check failed; dlq replay: entries still failing)
  2  bad usage or configuration (also: staging is production, a write concern staging refuses, a view)
  3  a runtime failure (a server unreachable past sync.startup_timeout, a fatal sync error)";

#[derive(Parser, Debug)]
#[command(
    name = "stagesync",
    version,
    about = "Keeps a staging MongoDB in sync with production through change streams.",
    long_about = "Keeps a staging MongoDB in sync with production through change streams: documents are matched \
                  by business keys (not _id), staging-only fields are kept, production deletes become soft \
                  deletes, and production wins for the fields it owns. See README.md.",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Log format: human lines on a terminal and JSON lines otherwise by default.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Log level: error, warn, info, debug or trace, or a filter like `stagesync=debug,info`.
    /// `RUST_LOG`, when set, overrides it.
    #[arg(long, global = true, env = "STAGESYNC_LOG", default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// The configuration file (TOML).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Follow production's change streams and merge every change into staging until stopped.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// This process's name among the processes sharing the sync's collections (the lease
        /// owner); default: hostname-pid.
        #[arg(long, value_name = "ID")]
        instance_id: Option<String>,
        /// Serve /metrics, /livez, /readyz and /status on this address (port 0: any free port).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<SocketAddr>,
    },
    /// Validate the config, connect to both sides, confirm change streams, list the indexes.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Copy production's current documents into staging (then `run` continues from there).
    Snapshot {
        #[command(flatten)]
        config: ConfigArg,
        /// Only these collections (default: all configured).
        #[arg(long = "collection", value_name = "NAME")]
        collections: Vec<String>,
        /// Do not soft-delete staging documents whose production document is gone.
        #[arg(long)]
        no_prune: bool,
    },
    /// Compare production (masked) with staging by business key; exit 1 on drift.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long = "collection", value_name = "NAME")]
        collections: Vec<String>,
        /// Check N random production documents instead of everything.
        #[arg(long, value_name = "N")]
        sample: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Inspect, replay or purge the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Per collection: checkpoint time, lag, dead letters.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Show sample production documents next to their masked form.
    MaskPreview {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, value_name = "NAME")]
        collection: String,
        #[arg(long, default_value_t = 5)]
        limit: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// List dead letters.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter, with the (masked) change.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Re-read the current production document and apply it through the normal merge path.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete dead letters.
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    record_panics();
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_format, &cli.log_level) {
        eprintln!("error: {e}");
        return EXIT_USAGE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_RUNTIME;
        }
    };
    let code = match runtime.block_on(commands::dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit_code(&e)
        }
    };
    // Background tasks (signal handler, telemetry) end with the runtime; every client was
    // shut down by its command.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

/// With `STAGESYNC_PANIC_LOG=FILE`, every panic of this process (any thread, including the
/// driver's background tasks) is also appended to FILE. CI sets it for the whole test run and
/// fails when the file is not empty, so a panic at teardown is caught the first time it
/// happens rather than when it happens to break a test's output.
fn record_panics() {
    let Some(path) = std::env::var_os("STAGESYNC_PANIC_LOG") else {
        return;
    };
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let args: Vec<String> = std::env::args().skip(1).collect();
            let _ = writeln!(
                f,
                "stagesync (pid {}, args: {}) panicked: {info}",
                std::process::id(),
                args.join(" ")
            );
        }
        previous(info);
    }));
}

/// A mistake in how the command was called (an unknown collection, a malformed id): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code an error stands for: 2 for the user's input, 3 for anything at run time.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.is::<UsageError>() || cause.is::<crate::config::ConfigError>() {
            return EXIT_USAGE;
        }
        if let Some(s) = cause.downcast_ref::<crate::error::SyncError>() {
            return if s.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_RUNTIME
            };
        }
    }
    EXIT_RUNTIME
}
