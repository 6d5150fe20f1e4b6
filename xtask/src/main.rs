//! Developer tasks for stagesync, kept out of the product crate users run:
//!
//! - `cargo xtask bench [...]` — stagesync next to the servers' own raw limits, in one run
//!   (writes docs/BENCHMARKS*.md);
//! - `cargo xtask demo` — the README's demo: local production and staging servers, live changes.
//!
//! Both drive the real `stagesync` binary as a child process, built by this task into the same
//! target directory first, and real server processes from `stagesync-testkit`.

mod bench;
mod demo;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "xtask",
    about = "stagesync's developer tasks: the benchmark and the demo"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Measure stagesync against the servers' raw limits on a local pair of servers.
    Bench(Box<bench::BenchArgs>),
    /// Start local production and staging servers, sync sample data and show it live.
    Demo,
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let exe = product_binary()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.task {
            Task::Bench(args) => bench::command(*args, exe).await,
            Task::Demo => demo::command(exe).await.map(|()| 0),
        }
    })
}

/// The `stagesync` binary next to this one (same target directory and profile). Under `cargo`
/// it is built first, so `cargo xtask …` always measures the current code.
fn product_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding the xtask executable")?;
    let dir = me
        .parent()
        .context("the xtask executable has no directory")?
        .to_path_buf();
    if let Some(cargo) = std::env::var_os("CARGO") {
        // Built together with xtask, so its dependencies get the features xtask's build gave
        // them: `-p stagesync` alone resolves other features for `mongodb` and rebuilds it
        // (minutes), then the next `cargo xtask` rebuilds it back.
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "--locked",
            "-q",
            "-p",
            "stagesync",
            "-p",
            "xtask",
            "--bin",
            "stagesync",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().context("running cargo build -p stagesync")?;
        if !status.success() {
            bail!("cargo build -p stagesync failed ({status})");
        }
    }
    let exe = dir.join("stagesync");
    if !exe.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p stagesync` (or run this task as `cargo xtask`)",
            exe.display()
        );
    }
    Ok(exe)
}
