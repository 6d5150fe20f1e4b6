//! The sync engine: what happens around each collection's [`Pipeline`] — snapshot or stream,
//! history lost, and running every configured collection until stopped.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{InitialSync, OnHistoryLost};
use crate::context::Context;
use crate::error::{ErrorKind, Result, SyncError};
use crate::pipeline::Pipeline;
use crate::plan::Rules;
use crate::retry::{retry, Gave, RetryPolicy};
use crate::source::stream::StartAt;

/// How long `run` waits for servers and stores unreachable at start before giving up
/// (`sync.startup_timeout`).
pub fn startup_timeout(ctx: &Context) -> Duration {
    ctx.config.sync.startup_timeout
}

/// Runs every configured collection until `shutdown`; the first collection that cannot go on
/// stops them all.
pub async fn run(ctx: Context, shutdown: CancellationToken) -> Result<()> {
    if !ctx.wait_reachable(startup_timeout(&ctx), &shutdown).await? {
        return Ok(());
    }
    // Before anything is written: staging is not production, the write concern works, every
    // collection can be synced.
    if !crate::preflight::check_all(&ctx, startup_timeout(&ctx), &shutdown).await? {
        return Ok(());
    }
    prepare_staging(&ctx, &shutdown).await?;
    let stop_all = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    for c in &ctx.config.collections {
        let pipeline = ctx.pipeline(c);
        let stop = stop_all.clone();
        tasks.spawn(async move { sync_collection(pipeline, stop).await });
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let r = joined.unwrap_or_else(|e| Err(SyncError::TaskFailed(e.to_string())));
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
            }
            stop_all.cancel();
        }
    }
    result
}

/// Runs one collection until `shutdown`: snapshot if needed, then the change stream; when
/// production lost the history, follows `on_history_lost`.
pub async fn sync_collection(pipeline: Pipeline, shutdown: CancellationToken) -> Result<()> {
    let config = pipeline.context().config.clone();
    let mut forced_resync = false;
    loop {
        let Some(checkpoint) = pipeline.load_checkpoint(&shutdown).await? else {
            return Ok(());
        };
        let needs_snapshot = std::mem::take(&mut forced_resync)
            || config.sync.initial_sync == InitialSync::Always
            || checkpoint.snapshot.is_some()
            || (config.sync.initial_sync == InitialSync::Auto
                && checkpoint.token.is_none()
                && checkpoint.cluster_time.is_none());
        let start = if needs_snapshot {
            match crate::snapshot::snapshot_collection(&pipeline, &shutdown, true).await? {
                Some(t) => StartAt::Time(t),
                None => return Ok(()), // stopped during the snapshot; progress is saved
            }
        } else if let Some(token) = checkpoint.resume_token() {
            StartAt::ResumeAfter(token)
        } else if let Some(t) = checkpoint.cluster_time {
            StartAt::Time(t)
        } else {
            StartAt::Now
        };
        match pipeline.follow(start, &shutdown).await {
            Err(e) if e.kind() == ErrorKind::HistoryLost => match config.sync.on_history_lost {
                OnHistoryLost::Fail => return Err(e),
                OnHistoryLost::Resync => {
                    tracing::warn!(collection = %pipeline.name, error = %e, "production no longer has the history to resume from; re-copying the collection (on_history_lost = \"resync\")");
                    forced_resync = true;
                }
            },
            other => return other,
        }
    }
}

/// Creates the indexes stagesync relies on, retrying while staging is unreachable.
pub async fn prepare_staging(ctx: &Context, shutdown: &CancellationToken) -> Result<()> {
    let create = || async {
        ctx.dead_letters
            .ensure_indexes()
            .await
            .map_err(|e| SyncError::mongo("creating the dead-letter indexes", e))?;
        for c in &ctx.config.collections {
            let rules = Rules::new(&ctx.config.sync, c);
            crate::apply::ensure_indexes(&ctx.staging_db, c.target_name(), &rules).await?;
        }
        Ok::<(), SyncError>(())
    };
    let said = |e: &SyncError, b: &crate::retry::Backoff| {
        if b.attempts() == 0 {
            tracing::warn!(error = %e, "staging unavailable while creating indexes; retrying");
        }
    };
    match retry(
        &RetryPolicy::default(),
        shutdown,
        create,
        SyncError::is_transient,
        said,
    )
    .await
    {
        Ok(_) | Err(Gave::Stopped) => Ok(()),
        Err(Gave::Up(e)) => Err(e),
    }
}
