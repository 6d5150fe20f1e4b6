//! The sync engine: what happens around each collection's [`Pipeline`] — snapshot or stream,
//! history lost — and which collections this process runs: a [`Coordinator`] holds its fair
//! share of collection leases ([`crate::lease`]) and a pipeline task per leased collection.

use std::collections::BTreeMap;
use std::time::Duration;

use mongodb::bson::DateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{InitialSync, OnHistoryLost};
use crate::context::Context;
use crate::error::{ErrorKind, Result, SyncError};
use crate::lease::{fair_share, Fence, LeaseStore};
use crate::pipeline::Pipeline;
use crate::plan::Rules;
use crate::retry::{retry, Gave, RetryPolicy};
use crate::source::stream::StartAt;

/// How long `run` waits for servers and stores unreachable at start before giving up
/// (`sync.startup_timeout`).
pub fn startup_timeout(ctx: &Context) -> Duration {
    ctx.config.sync.startup_timeout
}

/// Runs the configured collections until `shutdown`, sharing them through leases with any
/// other process of the same sync; the first collection that cannot go on stops them all.
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
    Coordinator::new(&ctx).run(shutdown).await
}

/// A collection this process holds: its lease and the task running its pipeline.
struct Held {
    fence: Fence,
    stop: CancellationToken,
    task: JoinHandle<Result<()>>,
    /// Set when this process gives the collection up (rebalancing): the lease is released
    /// once the task has stopped and saved its checkpoint.
    releasing: bool,
}

/// Takes, renews, balances and releases this process's collection leases, and runs a
/// pipeline task for each collection it holds.
struct Coordinator {
    ctx: Context,
    store: LeaseStore,
    held: BTreeMap<String, Held>,
}

impl Coordinator {
    fn new(ctx: &Context) -> Coordinator {
        let sync = &ctx.config.sync;
        Coordinator {
            store: LeaseStore::new(&ctx.meta_db, &sync.name, &ctx.instance_id, sync.lease_ttl),
            ctx: ctx.clone(),
            held: BTreeMap::new(),
        }
    }

    async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        // Renewal at a third of the lease: two renewals can fail before it expires.
        let mut tick = tokio::time::interval(self.store.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = tick.tick() => {}
            }
            if let Err(e) = self.reap().await {
                break Err(e);
            }
            // Lease work must never wait on a frozen server past the next renewal: the driver
            // has no socket timeout, so each round is bounded here.
            let round = self.store.ttl / 3;
            if tokio::time::timeout(round, self.renew()).await.is_err() {
                tracing::warn!(
                    "renewing leases took longer than {round:?}; retrying at the next renewal"
                );
                continue;
            }
            match tokio::time::timeout(round, self.balance(&shutdown)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot balance collection leases now; retrying at the next renewal")
                }
                Err(_) => tracing::warn!(
                    "balancing leases took longer than {round:?}; retrying at the next renewal"
                ),
            }
        };
        self.stop_all().await;
        result
    }

    /// Collects finished collection tasks: a lost lease drops the collection, a released one
    /// is handed back, any other error stops the process.
    async fn reap(&mut self) -> Result<()> {
        let finished: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.task.is_finished())
            .map(|(c, _)| c.clone())
            .collect();
        for collection in finished {
            let held = self.held.remove(&collection).expect("listed above");
            self.ctx
                .metrics
                .lease(&collection, &self.store.instance, false);
            let outcome = held
                .task
                .await
                .unwrap_or_else(|e| Err(SyncError::TaskFailed(e.to_string())));
            match outcome {
                Err(e) if e.kind() == ErrorKind::LeaseLost => {
                    tracing::warn!(collection = %collection, epoch = held.fence.epoch, error = %e, "lease lost: another process owns this collection now; dropped it");
                }
                Err(e) => return Err(e),
                Ok(()) => {
                    if let Err(e) = self.store.release(&held.fence).await {
                        tracing::warn!(collection = %collection, error = %e, "cannot release the lease; it expires by itself");
                    }
                    if held.releasing {
                        tracing::info!(collection = %collection, "handed the collection over (rebalancing)");
                    }
                }
            }
        }
        Ok(())
    }

    /// Renews every held lease; a lease that cannot be renewed stops its task (its fence
    /// turns invalid by itself before the lease can expire, even if renewals just fail).
    async fn renew(&mut self) {
        if let Err(e) = self.store.heartbeat().await {
            tracing::warn!(error = %e, "cannot announce this instance; retrying at the next renewal");
        }
        for (collection, held) in &self.held {
            match self.store.renew(&held.fence).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(collection = %collection, epoch = held.fence.epoch, "lease taken by another process; stopping this collection");
                    self.ctx
                        .metrics
                        .lease(collection, &self.store.instance, false);
                    held.stop.cancel();
                }
                Err(e) => {
                    tracing::warn!(collection = %collection, error = %e, "cannot renew the lease; the collection stops if this lasts");
                }
            }
        }
    }

    /// Holds the fair share of collections: gives extras up after a new process appeared,
    /// takes free or expired leases while below it.
    async fn balance(&mut self, shutdown: &CancellationToken) -> Result<()> {
        let collections: Vec<String> = self
            .ctx
            .config
            .collections
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let share = fair_share(collections.len(), self.store.live_instances().await?);
        let active = self.held.values().filter(|h| !h.releasing).count();
        if active > share {
            for (collection, held) in self
                .held
                .iter_mut()
                .rev()
                .filter(|(_, h)| !h.releasing)
                .take(active - share)
            {
                tracing::info!(collection = %collection, share, "another process joined; handing this collection over");
                held.releasing = true;
                held.stop.cancel();
            }
            return Ok(());
        }
        let now = DateTime::now();
        let leases = self.store.all().await?;
        for collection in collections {
            if self.held.len() >= share || shutdown.is_cancelled() {
                break;
            }
            if self.held.contains_key(&collection) {
                continue;
            }
            // Free, expired, or still ours from a task that just ended (a lapsed fence).
            let free = leases
                .iter()
                .find(|l| l.collection == collection)
                .is_none_or(|l| l.is_free(now) || l.owner.as_deref() == Some(&self.store.instance));
            if !free {
                continue;
            }
            let Some(fence) = self.store.acquire(&collection).await? else {
                continue;
            };
            // From now on a previous owner's checkpoint saves are refused.
            self.ctx.checkpoints.claim(&collection, fence.epoch).await?;
            tracing::info!(collection = %collection, epoch = fence.epoch, instance = %self.store.instance, "lease taken; syncing this collection");
            self.ctx
                .metrics
                .lease(&collection, &self.store.instance, true);
            let config = self
                .ctx
                .config
                .collection(&collection)
                .expect("configured")
                .clone();
            let pipeline = self.ctx.pipeline(&config).with_fence(fence.clone());
            let stop = shutdown.child_token();
            let task = tokio::spawn(sync_collection(pipeline, stop.clone()));
            self.held.insert(
                collection,
                Held {
                    fence,
                    stop,
                    task,
                    releasing: false,
                },
            );
        }
        Ok(())
    }

    /// Stops every task (each saves its checkpoint), releases the leases so another process
    /// can take over at once, and leaves the instance set.
    async fn stop_all(&mut self) {
        for held in self.held.values() {
            held.stop.cancel();
        }
        for (collection, held) in std::mem::take(&mut self.held) {
            self.ctx
                .metrics
                .lease(&collection, &self.store.instance, false);
            match held.task.await {
                Ok(Err(e)) if e.kind() != ErrorKind::LeaseLost => {
                    tracing::warn!(collection = %collection, error = %e, "the collection stopped with an error");
                }
                _ => {}
            }
            if let Err(e) = self.store.release(&held.fence).await {
                tracing::warn!(collection = %collection, error = %e, "cannot release the lease; it expires by itself");
            }
        }
        if let Err(e) = self.store.leave().await {
            tracing::debug!(error = %e, "cannot leave the instance set; the entry expires by itself");
        }
    }
}

/// Runs one collection until `shutdown`: snapshot if needed, then the change stream; when
/// production lost the history, follows `on_history_lost`.
pub async fn sync_collection(pipeline: Pipeline, shutdown: CancellationToken) -> Result<()> {
    // Pending reference fix-ups of this collection are swept while it is synced.
    let sweeper = pipeline
        .references
        .has_outgoing()
        .then(|| tokio::spawn(sweep_references(pipeline.clone(), shutdown.child_token())));
    let result = sync_collection_inner(&pipeline, &shutdown).await;
    if let Some(task) = sweeper {
        task.abort();
        let _ = task.await;
    }
    result
}

/// How often a collection's pending reference fix-ups are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Resolves the collection's pending reference fix-ups every [`SWEEP_EVERY`] (see
/// [`crate::references`]); failures are retried at the next round.
async fn sweep_references(pipeline: Pipeline, stop: CancellationToken) {
    let mut failing = false;
    loop {
        match pipeline.references.sweep().await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!(collection = %pipeline.name, "pending reference fix-ups are resolved again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(collection = %pipeline.name, error = %e, "cannot resolve pending reference fix-ups now; retrying");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}

async fn sync_collection_inner(pipeline: &Pipeline, shutdown: &CancellationToken) -> Result<()> {
    let pipeline = pipeline.clone();
    let shutdown = shutdown.clone();
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
        if ctx
            .config
            .collections
            .iter()
            .any(|c| !c.references.is_empty())
        {
            crate::references::References::ensure_indexes(&ctx.meta_db)
                .await
                .map_err(|e| SyncError::mongo("creating the pending-reference indexes", e))?;
        }
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
