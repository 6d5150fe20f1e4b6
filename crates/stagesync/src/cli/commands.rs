//! One function per subcommand. Each builds a [`Context`], does its work, and closes the
//! clients on every path (see [`with_context`]). Data goes to stdout, diagnostics to stderr.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use mongodb::bson::oid::ObjectId;
use tokio_util::sync::CancellationToken;

use super::{output, Command, ConfigArg, DlqAction, UsageError, EXIT_OK, EXIT_PROBLEM};
use crate::config::{CollectionConfig, Config};
use crate::context::Context;
use crate::engine;

pub async fn dispatch(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Run {
            config,
            instance_id,
            metrics_addr,
        } => run(load_config(&config)?, instance_id, metrics_addr).await,
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
        } => verify(load_config(&config)?, &collections, sample, json).await,
        Command::Dlq { action } => dlq(action).await,
        Command::Status { config, json } => status(load_config(&config)?, json).await,
        Command::MaskPreview {
            config,
            collection,
            limit,
        } => mask_preview(load_config(&config)?, &collection, limit).await,
    }
}

fn load_config(arg: &ConfigArg) -> anyhow::Result<Arc<Config>> {
    Ok(Arc::new(Config::load(&arg.config)?))
}

/// Runs `body` with a fresh [`Context`] and shuts its clients down afterwards, whatever
/// `body` returned: a driver left to the runtime's teardown can panic there.
async fn with_context<T, F, Fut>(config: Arc<Config>, body: F) -> anyhow::Result<T>
where
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let ctx = Context::connect(config).await?;
    let result = body(ctx.clone()).await;
    ctx.shutdown().await;
    result
}

/// Cancels `token` on SIGINT or SIGTERM.
fn stop_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("stopping: finishing the batch in flight and saving checkpoints");
        token.cancel();
    });
}

fn select_collections<'c>(
    config: &'c Config,
    names: &[String],
) -> anyhow::Result<Vec<&'c CollectionConfig>> {
    if names.is_empty() {
        return Ok(config.collections.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            config.collection(n).ok_or_else(|| {
                let known: Vec<&str> = config.collections.iter().map(|c| c.name.as_str()).collect();
                UsageError(format!(
                    "collection `{n}` is not configured; configured: {}",
                    known.join(", ")
                ))
                .into()
            })
        })
        .collect()
}

async fn run(
    config: Arc<Config>,
    instance_id: Option<String>,
    metrics_addr: Option<SocketAddr>,
) -> anyhow::Result<i32> {
    with_context(config.clone(), |ctx| async move {
        let ctx = match instance_id.as_deref().map(str::trim) {
            Some("") => return Err(UsageError("--instance-id must not be empty".into()).into()),
            Some(id) => ctx.with_instance_id(id),
            None => ctx,
        };
        let shutdown = CancellationToken::new();
        stop_on_signals(shutdown.clone());
        // Stopped after the engine, so probes keep answering while it finishes.
        let telemetry_stop = CancellationToken::new();
        let server = match metrics_addr {
            Some(addr) => {
                let status_ctx = ctx.clone();
                let status: crate::telemetry::StatusProvider = Arc::new(move || {
                    let ctx = status_ctx.clone();
                    Box::pin(async move {
                        crate::status::collect(&ctx)
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|rows| serde_json::to_value(rows).map_err(|e| e.to_string()))
                    })
                });
                let state = crate::telemetry::TelemetryState::new(ctx.metrics.clone(), status);
                let (_, task) = crate::telemetry::serve(addr, state, telemetry_stop.clone())
                    .await
                    .map_err(|e| {
                        UsageError(format!("--metrics-addr {addr}: cannot serve there: {e}"))
                    })?;
                Some(task)
            }
            None => None,
        };
        tracing::info!(
            sync = %config.sync.name,
            instance = %ctx.instance_id,
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
        result?;
        tracing::info!("stopped cleanly");
        Ok(EXIT_OK)
    })
    .await
}

async fn check(config: Arc<Config>) -> anyhow::Result<i32> {
    println!(
        "config {}: valid ({} collection(s))",
        config.path.display(),
        config.collections.len()
    );
    with_context(config.clone(), |ctx| async move {
        let outcome = output::check(&ctx).await;
        let ok = !outcome.failed && !outcome.refused;
        println!("{}", if ok { "check passed" } else { "check FAILED" });
        Ok(if outcome.refused {
            super::EXIT_USAGE
        } else if outcome.failed {
            EXIT_PROBLEM
        } else {
            EXIT_OK
        })
    })
    .await
}

async fn snapshot(config: Arc<Config>, names: &[String], prune: bool) -> anyhow::Result<i32> {
    let selected: Vec<CollectionConfig> = select_collections(&config, names)?
        .into_iter()
        .cloned()
        .collect();
    with_context(config, |ctx| async move {
        let shutdown = CancellationToken::new();
        stop_on_signals(shutdown.clone());
        if !ctx
            .wait_reachable(engine::startup_timeout(&ctx), &shutdown)
            .await?
        {
            eprintln!("snapshot stopped before it started");
            return Ok(EXIT_PROBLEM);
        }
        if !crate::preflight::check_all(&ctx, engine::startup_timeout(&ctx), &shutdown).await? {
            eprintln!("snapshot stopped before it started");
            return Ok(EXIT_PROBLEM);
        }
        engine::prepare_staging(&ctx, &shutdown).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for c in &selected {
            let pipeline = ctx.pipeline(c);
            let stop = shutdown.clone();
            tasks.spawn(async move {
                let name = pipeline.name.clone();
                let result = crate::snapshot::snapshot_collection(&pipeline, &stop, prune).await;
                (name, result)
            });
        }
        let mut code = EXIT_OK;
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(Some(_)))) => {}
                Ok((name, Ok(None))) => {
                    eprintln!("snapshot of `{name}` stopped before the end; run the command again to continue");
                    code = EXIT_PROBLEM;
                }
                Ok((name, Err(e))) => {
                    failure.get_or_insert(anyhow::Error::new(e).context(format!("snapshot of `{name}` failed")));
                }
                Err(e) => {
                    failure.get_or_insert(anyhow::anyhow!("a snapshot task crashed: {e}"));
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(code),
        }
    })
    .await
}

async fn verify(
    config: Arc<Config>,
    names: &[String],
    sample: Option<u64>,
    json: bool,
) -> anyhow::Result<i32> {
    let selected: Vec<CollectionConfig> = select_collections(&config, names)?
        .into_iter()
        .cloned()
        .collect();
    with_context(config, |ctx| async move {
        let mut collections = Vec::new();
        for c in &selected {
            let report = crate::verify::verify_collection(&ctx.pipeline(c), sample)
                .await
                .with_context(|| format!("verifying `{}`", c.name))?;
            collections.push(report);
        }
        let report = crate::verify::Report {
            in_sync: collections.iter().all(|c| c.drift_count() == 0),
            collections,
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            output::verify(&report);
        }
        Ok(if report.in_sync {
            EXIT_OK
        } else {
            EXIT_PROBLEM
        })
    })
    .await
}

fn parse_id(id: &str) -> anyhow::Result<ObjectId> {
    ObjectId::parse_str(id).map_err(|_| {
        UsageError(format!(
            "`{id}` is not a dead-letter id (24 hex characters, as `dlq list` prints)"
        ))
        .into()
    })
}

async fn dlq(action: DlqAction) -> anyhow::Result<i32> {
    match action {
        DlqAction::List { config, json } => {
            with_context(load_config(&config)?, |ctx| async move {
                let entries: Vec<_> = ctx
                    .dead_letters
                    .list()
                    .await
                    .context("reading the dead-letter queue")?
                    .into_iter()
                    .map(|(id, d)| crate::deadletter::describe(id, &d))
                    .collect();
                if json {
                    println!("{}", serde_json::to_string_pretty(&entries)?);
                } else {
                    output::dead_letters(&entries);
                }
                Ok(EXIT_OK)
            })
            .await
        }
        DlqAction::Show { config, id, json } => {
            let oid = parse_id(&id)?;
            with_context(load_config(&config)?, |ctx| async move {
                let Some(d) = ctx
                    .dead_letters
                    .get(oid)
                    .await
                    .context("reading the dead-letter queue")?
                else {
                    eprintln!("no dead letter with id {id}");
                    return Ok(EXIT_PROBLEM);
                };
                let e = crate::deadletter::describe(oid, &d);
                if json {
                    println!("{}", serde_json::to_string_pretty(&e)?);
                } else {
                    output::dead_letter(&e);
                }
                Ok(EXIT_OK)
            })
            .await
        }
        DlqAction::Replay { config, id, all } => {
            let one = match (id, all) {
                (Some(id), _) => Some(parse_id(&id)?),
                (None, _) => None,
            };
            with_context(load_config(&config)?, |ctx| async move {
                // A replay writes staging: the same refusals as `run`, once.
                crate::preflight::target_is_not_source(&ctx).await?;
                crate::preflight::collections_are_syncable(&ctx).await?;
                crate::preflight::write_concern_is_usable(&ctx).await?;
                let ids = match one {
                    Some(id) => vec![id],
                    None => ctx
                        .dead_letters
                        .list()
                        .await
                        .context("reading the dead-letter queue")?
                        .into_iter()
                        .map(|(id, _)| id)
                        .collect(),
                };
                let report = crate::replay::replay(&ctx, &ids).await?;
                for (id, why) in &report.failing {
                    eprintln!("dead letter {}: still failing: {why}", id.to_hex());
                }
                println!(
                    "replayed {} dead letter(s): {} applied, {} still failing",
                    ids.len(),
                    report.applied,
                    report.failing.len()
                );
                Ok(if report.failing.is_empty() {
                    EXIT_OK
                } else {
                    EXIT_PROBLEM
                })
            })
            .await
        }
        DlqAction::Purge { config, id, all } => {
            let one = match (id, all) {
                (Some(id), _) => Some(parse_id(&id)?),
                (None, _) => None,
            };
            with_context(load_config(&config)?, |ctx| async move {
                // Purging deletes from the metadata database: never production's.
                crate::preflight::target_is_not_source(&ctx).await?;
                let n = match one {
                    Some(id) => u64::from(
                        ctx.dead_letters
                            .remove(id)
                            .await
                            .context("updating the dead-letter queue")?,
                    ),
                    None => ctx
                        .dead_letters
                        .purge_all()
                        .await
                        .context("updating the dead-letter queue")?,
                };
                println!("purged {n} dead letter(s)");
                Ok(EXIT_OK)
            })
            .await
        }
    }
}

async fn status(config: Arc<Config>, json: bool) -> anyhow::Result<i32> {
    with_context(config, |ctx| async move {
        let rows = crate::status::collect(&ctx).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            output::status(&rows);
        }
        Ok(EXIT_OK)
    })
    .await
}

async fn mask_preview(config: Arc<Config>, collection: &str, limit: i64) -> anyhow::Result<i32> {
    let c = select_collections(&config, &[collection.to_string()])?[0].clone();
    with_context(config, |ctx| async move {
        let pipeline = ctx.pipeline(&c);
        let docs = crate::transform::preview(&pipeline.source, &pipeline.masker, limit)
            .await
            .with_context(|| format!("reading production.{}", c.name))?;
        for (raw, masked) in docs {
            println!("production (raw values shortened to their first character):\n  {raw}");
            println!("staging (masked):\n  {masked}\n");
        }
        Ok(EXIT_OK)
    })
    .await
}
