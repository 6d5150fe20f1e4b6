//! The command line: a thin `clap` front over the library.
//!
//! Exit codes: 0 success (and `run` stopped by SIGINT/SIGTERM); 1 the command ran and found a
//! problem (drift for `verify`, a failed `check`, a fatal sync error); 2 bad input (config,
//! arguments) or an error before anything could be checked.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mongodb::bson::{doc, oid::ObjectId};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::{self, Context};

#[derive(Parser, Debug)]
#[command(
    name = "stagesync",
    version,
    about = "Keeps a staging MongoDB in sync with production through change streams.",
    long_about = "Keeps a staging MongoDB in sync with production through change streams: documents are matched \
                  by business keys (not _id), staging-only fields are kept, production deletes become soft \
                  deletes, and production wins for the fields it owns. See README.md."
)]
pub struct Cli {
    /// Log format: human lines on a terminal and JSON lines otherwise by default.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Log level filter (e.g. info, debug, stagesync=debug).
    #[arg(long, global = true, env = "STAGESYNC_LOG", default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
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
        /// Serve /livez (alias /healthz), /readyz, Prometheus /metrics and /status on ADDR.
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

/// An error with the exit code it stands for.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl Exit {
    pub fn usage(message: impl std::fmt::Display) -> Exit {
        Exit {
            code: 2,
            message: message.to_string(),
        }
    }
    pub fn failed(message: impl std::fmt::Display) -> Exit {
        Exit {
            code: 1,
            message: message.to_string(),
        }
    }
}

impl From<anyhow::Error> for Exit {
    fn from(e: anyhow::Error) -> Exit {
        Exit::usage(format!("{e:#}"))
    }
}

pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().flatten_event(true).try_init();
    } else {
        let _ = builder.with_target(false).try_init();
    }
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 2;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(exit) => {
            eprintln!("error: {}", exit.message);
            exit.code
        }
    }
}

pub fn load_config(arg: &ConfigArg) -> Result<Arc<Config>, Exit> {
    Config::load(&arg.config).map(Arc::new).map_err(Exit::usage)
}

async fn dispatch(command: Command) -> Result<i32, Exit> {
    match command {
        Command::Run {
            config,
            metrics_addr,
        } => run(load_config(&config)?, metrics_addr).await,
        Command::Check { config } => check(load_config(&config)?).await,
        Command::Snapshot {
            config,
            collections,
            no_prune,
        } => snapshot(load_config(&config)?, &collections, !no_prune).await,
        Command::Verify {
            config,
            collections,
            sample,
            json,
        } => crate::verify::command(load_config(&config)?, &collections, sample, json).await,
        Command::Dlq { action } => dlq(action).await,
        Command::Status { config, json } => status(load_config(&config)?, json).await,
        Command::MaskPreview {
            config,
            collection,
            limit,
        } => mask_preview(load_config(&config)?, &collection, limit).await,
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn stop_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("stopping: finishing the batch in flight and saving checkpoints");
        token.cancel();
    });
}

async fn run(config: Arc<Config>, metrics_addr: Option<SocketAddr>) -> Result<i32, Exit> {
    let ctx = Context::connect(config.clone()).await?;
    let shutdown = CancellationToken::new();
    stop_on_signals(shutdown.clone());
    // Stopped after the engine, so probes keep answering while it finishes.
    let telemetry_stop = CancellationToken::new();
    let server = match metrics_addr {
        Some(addr) => {
            let status_ctx = ctx.clone();
            let status: crate::telemetry::StatusProvider = Arc::new(move || {
                let ctx = status_ctx.clone();
                Box::pin(async move { status_json(&ctx).await.map_err(|e| e.message) })
            });
            let state = crate::telemetry::TelemetryState::new(ctx.metrics.clone(), status);
            let (_, task) = crate::telemetry::serve(addr, state, telemetry_stop.clone())
                .await
                .map_err(|e| Exit::usage(format!("cannot serve metrics on {addr}: {e}")))?;
            Some(task)
        }
        None => None,
    };
    tracing::info!(
        sync = %config.sync.name,
        collections = config.collections.len(),
        "stagesync run: production {} → staging {}",
        config.source.database,
        config.target.database
    );
    let result = engine::run(ctx, shutdown).await;
    telemetry_stop.cancel();
    if let Some(task) = server {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    match result {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            Ok(0)
        }
        Err(e) => Err(Exit::failed(e)),
    }
}

async fn check(config: Arc<Config>) -> Result<i32, Exit> {
    println!(
        "config {}: valid ({} collection(s))",
        config.path.display(),
        config.collections.len()
    );
    let ctx = Context::connect(config.clone()).await?;
    let mut ok = true;
    for (label, client) in [("production", &ctx.prod), ("staging", &ctx.staging)] {
        match client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
        {
            Ok(hello) => {
                let set = hello.get_str("setName").ok();
                let mongos = hello.get_str("msg").ok() == Some("isdbgrid");
                match (label, set, mongos) {
                    ("production", None, false) => {
                        ok = false;
                        println!("{label}: reachable, but NOT a replica set: change streams need a replica set or sharded cluster");
                    }
                    (_, Some(s), _) => println!("{label}: reachable (replica set `{s}`)"),
                    (_, None, true) => println!("{label}: reachable (sharded cluster)"),
                    _ => println!("{label}: reachable"),
                }
            }
            Err(e) => {
                ok = false;
                println!("{label}: NOT reachable: {e}");
            }
        }
    }
    if ok {
        for c in &config.collections {
            let cs = ctx.collection_sync(c);
            match crate::source::stream::open(
                &cs.source,
                &crate::source::stream::StartAt::Now,
                std::time::Duration::from_millis(100),
                1,
            )
            .await
            {
                Ok(_) => println!("production.{}: change stream opens", c.name),
                Err(e) => {
                    ok = false;
                    println!("production.{}: change stream FAILED: {e}", c.name);
                }
            }
        }
    }
    println!("indexes ensured on staging (created if missing, never dropped):");
    for c in &config.collections {
        let rules = crate::plan::Rules::new(&config.sync, c);
        for spec in crate::apply::index_specs(&rules) {
            println!("  {}.{}: {}", config.target.database, c.target_name(), spec);
        }
    }
    println!(
        "  {}.dead_letters: {{sync, collection, productionId, clusterTime}}",
        config.sync.metadata_database
    );
    if ok {
        println!("check passed");
        Ok(0)
    } else {
        println!("check FAILED");
        Ok(1)
    }
}

fn select_collections<'c>(
    config: &'c Config,
    names: &[String],
) -> Result<Vec<&'c crate::config::CollectionConfig>, Exit> {
    if names.is_empty() {
        return Ok(config.collections.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            config.collection(n).ok_or_else(|| {
                let known: Vec<&str> = config.collections.iter().map(|c| c.name.as_str()).collect();
                Exit::usage(format!(
                    "collection `{n}` is not configured; configured: {}",
                    known.join(", ")
                ))
            })
        })
        .collect()
}

async fn snapshot(config: Arc<Config>, names: &[String], prune: bool) -> Result<i32, Exit> {
    let selected = select_collections(&config, names)?;
    let ctx = Context::connect(config.clone()).await?;
    let shutdown = CancellationToken::new();
    stop_on_signals(shutdown.clone());
    engine::prepare_staging(&ctx, &shutdown)
        .await
        .map_err(Exit::failed)?;
    let mut tasks = tokio::task::JoinSet::new();
    for c in selected {
        let cs = ctx.collection_sync(c);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let name = cs.name.clone();
            (
                name,
                crate::snapshot::snapshot_collection(&cs, &stop, prune).await,
            )
        });
    }
    let mut code = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(Some(_)))) => {}
            Ok((name, Ok(None))) => {
                eprintln!("snapshot of `{name}` stopped before the end; run the command again to continue");
                code = 1;
            }
            Ok((name, Err(e))) => {
                eprintln!("error: snapshot of `{name}` failed: {e:#}");
                code = 1;
            }
            Err(e) => {
                eprintln!("error: a snapshot task crashed: {e}");
                code = 1;
            }
        }
    }
    Ok(code)
}

fn parse_id(id: &str) -> Result<ObjectId, Exit> {
    ObjectId::parse_str(id).map_err(|_| {
        Exit::usage(format!(
            "`{id}` is not a dead-letter id (24 hex characters, as `dlq list` prints)"
        ))
    })
}

async fn dlq(action: DlqAction) -> Result<i32, Exit> {
    match action {
        DlqAction::List { config, json } => {
            let ctx = Context::connect(load_config(&config)?).await?;
            let entries: Vec<_> = ctx
                .dead_letters
                .list()
                .await
                .map_err(|e| Exit::failed(format!("reading dead letters: {e}")))?
                .into_iter()
                .map(|(id, d)| crate::deadletter::describe(id, &d))
                .collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&entries).unwrap_or_default()
                );
            } else if entries.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:<24}  {:<14} {:<8} {:<16} {:>3}  business key / production _id",
                    "id", "collection", "op", "reason", "n"
                );
                for e in &entries {
                    println!(
                        "{:<24}  {:<14} {:<8} {:<16} {:>3}  {} / {}",
                        e.id,
                        e.collection,
                        e.operation,
                        e.error_code,
                        e.attempts,
                        e.business_key.as_deref().unwrap_or("-"),
                        e.production_id
                    );
                }
                println!("{} dead letter(s)", entries.len());
            }
            Ok(0)
        }
        DlqAction::Show { config, id, json } => {
            let ctx = Context::connect(load_config(&config)?).await?;
            let oid = parse_id(&id)?;
            let Some(d) = ctx
                .dead_letters
                .get(oid)
                .await
                .map_err(|e| Exit::failed(e.to_string()))?
            else {
                return Err(Exit::failed(format!("no dead letter with id {id}")));
            };
            let e = crate::deadletter::describe(oid, &d);
            if json {
                println!("{}", serde_json::to_string_pretty(&e).unwrap_or_default());
            } else {
                println!("id:            {}", e.id);
                println!("collection:    {}", e.collection);
                println!("operation:     {}", e.operation);
                println!(
                    "business key:  {}",
                    e.business_key.as_deref().unwrap_or("-")
                );
                println!("production _id:{}", e.production_id);
                println!("error:         {} — {}", e.error_code, e.error_message);
                println!("first seen:    {}", e.first_seen);
                println!("last seen:     {}", e.last_seen);
                println!("attempts:      {}", e.attempts);
                println!(
                    "change:        {}",
                    serde_json::to_string_pretty(&e.change).unwrap_or_default()
                );
            }
            Ok(0)
        }
        DlqAction::Replay { config, id, all } => {
            let ctx = Context::connect(load_config(&config)?).await?;
            let ids = match (id, all) {
                (Some(id), _) => vec![parse_id(&id)?],
                (None, _) => ctx
                    .dead_letters
                    .list()
                    .await
                    .map_err(|e| Exit::failed(e.to_string()))?
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect(),
            };
            let report = crate::replay::replay(&ctx, &ids).await?;
            println!(
                "replayed {} dead letter(s): {} applied, {} still failing",
                ids.len(),
                report.0,
                report.1
            );
            Ok(if report.1 == 0 { 0 } else { 1 })
        }
        DlqAction::Purge { config, id, all } => {
            let ctx = Context::connect(load_config(&config)?).await?;
            let n = match (id, all) {
                (Some(id), _) => u64::from(
                    ctx.dead_letters
                        .remove(parse_id(&id)?)
                        .await
                        .map_err(|e| Exit::failed(e.to_string()))?,
                ),
                (None, _) => ctx
                    .dead_letters
                    .purge_all()
                    .await
                    .map_err(|e| Exit::failed(e.to_string()))?,
            };
            println!("purged {n} dead letter(s)");
            Ok(0)
        }
    }
}

/// The JSON of `status --json` (also served at `/status` by `run --metrics-addr`).
async fn status_json(ctx: &Context) -> Result<serde_json::Value, Exit> {
    let now = mongodb::bson::DateTime::now();
    let mut rows = Vec::new();
    for c in &ctx.config.collections {
        let cp = ctx
            .checkpoints
            .load(&c.name)
            .await
            .map_err(|e| Exit::failed(format!("{e:#}")))?;
        let dead = ctx
            .dead_letters
            .count(Some(&c.name))
            .await
            .map_err(|e| Exit::failed(e.to_string()))?;
        let cp = cp.unwrap_or_default();
        let to_s =
            |t: Option<mongodb::bson::DateTime>| t.and_then(|t| t.try_to_rfc3339_string().ok());
        let cluster_time = cp
            .cluster_time
            .map(|t| mongodb::bson::DateTime::from_millis(i64::from(t.time) * 1000));
        let lag = cp
            .wall_time
            .or(cluster_time)
            .map(|w| (now.timestamp_millis() - w.timestamp_millis()) as f64 / 1000.0);
        rows.push(serde_json::json!({
            "collection": c.name,
            "checkpoint_saved_at": to_s(cp.saved_at),
            "checkpoint_time": to_s(cp.wall_time.or(cluster_time)),
            "lag_seconds": lag,
            "snapshot_in_progress": cp.snapshot.is_some(),
            "dead_letters": dead,
        }));
    }
    Ok(serde_json::Value::Array(rows))
}

async fn status(config: Arc<Config>, json: bool) -> Result<i32, Exit> {
    let ctx = Context::connect(config.clone()).await?;
    let rows = status_json(&ctx).await?;
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
    } else {
        println!(
            "{:<20} {:<26} {:>10} {:>12}",
            "collection", "checkpoint time", "lag (s)", "dead letters"
        );
        for r in rows {
            println!(
                "{:<20} {:<26} {:>10} {:>12}{}",
                r["collection"].as_str().unwrap_or(""),
                r["checkpoint_time"].as_str().unwrap_or("none yet"),
                r["lag_seconds"]
                    .as_f64()
                    .map(|l| format!("{l:.1}"))
                    .unwrap_or_else(|| "-".into()),
                r["dead_letters"],
                if r["snapshot_in_progress"].as_bool() == Some(true) {
                    "  (snapshot in progress)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(0)
}

async fn mask_preview(config: Arc<Config>, collection: &str, limit: i64) -> Result<i32, Exit> {
    let c = select_collections(&config, &[collection.to_string()])?[0];
    let ctx = Context::connect(config.clone()).await?;
    let cs = ctx.collection_sync(c);
    let docs = crate::transform::preview(&cs.source, &cs.masker, limit)
        .await
        .map_err(|e| Exit::failed(format!("reading production.{collection}: {e}")))?;
    for (raw, masked) in docs {
        println!("production (raw values shortened to their first character):\n  {raw}");
        println!("staging (masked):\n  {masked}\n");
    }
    Ok(0)
}
