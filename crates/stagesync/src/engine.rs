//! The sync engine: wires source → transform → plan → apply → checkpoint for each collection.
//!
//! `Context` holds the connections and stores shared by every collection; `CollectionSync` is one
//! collection's pipeline and its single entry point for writing, [`CollectionSync::apply_changes`],
//! which live changes, snapshots and dead-letter replays all go through — so the rules are the
//! same whichever way a document arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document, Timestamp};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection, Database};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::apply::{Applier, WriteLimiter, WriteResult};
use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::config::{CollectionConfig, Config, InitialSync, OnHistoryLost};
use crate::deadletter::DeadLetters;
use crate::metrics::Metrics;
use crate::plan::{plan_batch, Failed, Outcome, Rules, Skip};
use crate::retry::{classify, Backoff, Failure};
use crate::source::change::Change;
use crate::source::stream::{self, Batch, ReaderMessage, ReaderSettings, StartAt};
use crate::transform::Masker;

/// How long a stopping run lets the batch in flight finish before abandoning it (`run` must
/// exit within 10 s of SIGTERM).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Why `run` stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "production no longer has the change history to resume `{collection}` from its checkpoint ({detail}). \
         To recover: run `stagesync snapshot -c FILE --collection {collection}` (re-copies it and resets the \
         checkpoint), or set `[sync] on_history_lost = \"resync\"` to do this automatically"
    )]
    HistoryLost { collection: String, detail: String },
    #[error("{0}")]
    Fatal(String),
}

/// Connections and stores shared by every collection.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub prod: Client,
    pub staging: Client,
    pub prod_db: Database,
    pub staging_db: Database,
    pub meta_db: Database,
    pub checkpoints: CheckpointStore,
    pub dead_letters: DeadLetters,
    pub metrics: Arc<Metrics>,
    pub limiter: Option<Arc<WriteLimiter>>,
    /// Bounds how many collections are snapshotted at once.
    pub snapshot_slots: Arc<tokio::sync::Semaphore>,
}

/// Connects to a server; the driver connects lazily, so this only validates the URI.
pub async fn client(uri: &str, label: &str) -> anyhow::Result<Client> {
    let mut options = ClientOptions::parse(uri)
        .await
        .map_err(|e| anyhow::anyhow!("the {label} URI is not usable: {e}"))?;
    options.app_name = Some("stagesync".into());
    // Short server selection: outages surface quickly and are retried by our own loop, which
    // logs them once, instead of stalling each operation for the driver's default 30 s.
    options.server_selection_timeout = Some(Duration::from_secs(5));
    options.connect_timeout = Some(Duration::from_secs(5));
    Ok(Client::with_options(options)?)
}

/// Waits until the server answers `ping`, retrying with backoff (and saying so) until `shutdown`.
pub async fn wait_until_reachable(
    client: &Client,
    label: &str,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut said = false;
    loop {
        match client
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .await
        {
            Ok(_) => {
                if said {
                    tracing::info!("{label} is reachable again");
                }
                return true;
            }
            Err(e) => {
                if !said {
                    tracing::warn!(error = %e, "{label} is not reachable; waiting and retrying");
                    said = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

impl Context {
    pub async fn connect(config: Arc<Config>) -> anyhow::Result<Context> {
        let prod = client(&config.source.uri, "production (`source.uri`)").await?;
        let staging = client(&config.target.uri, "staging (`target.uri`)").await?;
        let prod_db = prod.database(&config.source.database);
        let staging_db = staging.database(&config.target.database);
        // Checkpoints and dead letters are written with the configured write concern too.
        let meta_db = staging.database_with_options(
            &config.sync.metadata_database,
            mongodb::options::DatabaseOptions::builder()
                .write_concern(crate::apply::write_concern(&config.sync.write_concern))
                .build(),
        );
        let checkpoints = CheckpointStore::open(&config, &meta_db).await?;
        let dead_letters = DeadLetters::new(&meta_db, &config.sync.name);
        let limiter = config
            .sync
            .max_writes_per_second
            .and_then(WriteLimiter::new);
        let snapshot_concurrency = config.sync.snapshot_concurrency;
        let metrics = Arc::new(Metrics::new(crate::health::Health::new(
            config.collections.iter().map(|c| c.name.clone()),
            crate::health::DEFAULT_STALL_AFTER,
        )));
        Ok(Context {
            config,
            prod,
            staging,
            prod_db,
            staging_db,
            meta_db,
            checkpoints,
            dead_letters,
            metrics,
            limiter,
            snapshot_slots: Arc::new(tokio::sync::Semaphore::new(snapshot_concurrency)),
        })
    }

    pub fn collection_sync(&self, c: &CollectionConfig) -> CollectionSync {
        CollectionSync::new(self, c)
    }

    /// Production's current operation time: where a snapshot reads from.
    pub async fn production_time(&self) -> anyhow::Result<Timestamp> {
        let reply = self.prod_db.run_command(doc! { "ping": 1 }).await?;
        let from_reply = reply.get_timestamp("operationTime").ok().or_else(|| {
            reply
                .get_document("$clusterTime")
                .ok()
                .and_then(|c| c.get_timestamp("clusterTime").ok())
        });
        if let Some(t) = from_reply {
            return Ok(t);
        }
        let hello = self
            .prod
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await?;
        hello
            .get_document("lastWrite")
            .ok()
            .and_then(|w| w.get_document("opTime").ok())
            .and_then(|o| o.get_timestamp("ts").ok())
            .or_else(|| hello.get_timestamp("operationTime").ok())
            .ok_or_else(|| {
                anyhow::anyhow!("production did not report an operation time; is it a replica set?")
            })
    }
}

/// Where a batch of changes comes from: decides dead-lettering and lag accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The change stream: failures are dead-lettered, lag is measured.
    Stream,
    /// A snapshot copy or prune: failures are dead-lettered; no lag (the copy is not a change).
    Snapshot,
    /// `dlq replay`: failures stay in their existing dead letter.
    Replay,
}

/// What one `apply_changes` call did.
#[derive(Debug, Default, Clone)]
pub struct BatchReport {
    pub applied: usize,
    pub skipped: usize,
    pub failed: usize,
    /// One per change, in order.
    pub outcomes: Vec<Outcome>,
}

/// One collection's pipeline.
#[derive(Clone)]
pub struct CollectionSync {
    pub name: String,
    pub target: String,
    pub rules: Rules,
    pub masker: Masker,
    pub applier: Applier,
    pub source: Collection<Document>,
    pub staging: Collection<Document>,
    ctx: Context,
}

impl CollectionSync {
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    pub fn new(ctx: &Context, c: &CollectionConfig) -> CollectionSync {
        let config = &ctx.config;
        CollectionSync {
            name: c.name.clone(),
            target: c.target_name().to_string(),
            rules: Rules::new(&config.sync, c),
            masker: Masker::new(config.masking.as_ref(), &c.mask),
            applier: Applier::new(
                ctx.staging_db.clone(),
                c.target_name(),
                &config.sync.write_concern,
                config.sync.apply_concurrency,
                ctx.limiter.clone(),
            ),
            source: ctx.prod_db.collection(&c.name),
            staging: ctx.staging_db.collection(c.target_name()),
            ctx: ctx.clone(),
        }
    }

    /// Fetches, plans and writes one batch of changes; records the ones that cannot be applied
    /// in the dead-letter queue (unless replaying one). `Err` only for transient trouble (the
    /// caller retries the whole batch: replays are no-ops thanks to the order rule).
    pub async fn apply_changes(
        &self,
        changes: &[Change],
        origin: Origin,
    ) -> mongodb::error::Result<BatchReport> {
        let (mut outcomes, duplicate_key) = self.plan_and_write(changes, true).await?;
        // A duplicate key error can come from two documents of the batch trading keys in
        // parallel chunks; try those once more, alone, now that the rest is written.
        if !duplicate_key.is_empty() {
            let retry: Vec<Change> = duplicate_key.iter().map(|&i| changes[i].clone()).collect();
            let (second, _) = self.plan_and_write(&retry, false).await?;
            for (k, &i) in duplicate_key.iter().enumerate() {
                outcomes[i] = second[k].clone();
            }
        }
        let mut report = BatchReport::default();
        for (c, outcome) in changes.iter().zip(&outcomes) {
            match outcome {
                Outcome::Applied => {
                    report.applied += 1;
                    self.ctx.metrics.applied(&self.name, c.op.as_str());
                    if let (Origin::Stream, Some(w)) = (origin, c.wall_time) {
                        let lag = (DateTime::now().timestamp_millis() - w.timestamp_millis()).max(0)
                            as f64
                            / 1000.0;
                        self.ctx
                            .metrics
                            .lag_seconds
                            .with_label_values(&[&self.name])
                            .observe(lag);
                    }
                }
                Outcome::Skipped(s) => {
                    report.skipped += 1;
                    self.ctx
                        .metrics
                        .skipped(&self.name, c.op.as_str(), s.as_str());
                    if *s == Skip::StagingNewer {
                        self.ctx
                            .metrics
                            .conflicts
                            .with_label_values(&[&self.name])
                            .inc();
                        tracing::info!(collection = %self.name, production_id = %c.prod_id, "last-write-wins: staging's edit is newer; kept");
                    }
                }
                Outcome::Failed(f) => {
                    report.failed += 1;
                    if origin != Origin::Replay {
                        self.dead_letter(c, f).await?;
                    }
                }
            }
        }
        self.ctx.metrics.batch_size.observe(changes.len() as f64);
        report.outcomes = outcomes;
        Ok(report)
    }

    /// The staging documents a batch may touch: two set-based queries, by recorded production
    /// `_id` and then by the business keys still needed (see [`Rules::keys_to_look_up`]).
    pub async fn fetch_existing(
        &self,
        changes: &[Change],
    ) -> mongodb::error::Result<Vec<Document>> {
        let mut existing: Vec<Document> = match self.rules.id_filter(changes) {
            Some(filter) => self.staging.find(filter).await?.try_collect().await?,
            None => vec![],
        };
        let keys = self.rules.keys_to_look_up(changes, &existing);
        if let Some(filter) = self.rules.key_filter(&keys) {
            let by_key: Vec<Document> = self.staging.find(filter).await?.try_collect().await?;
            existing.extend(by_key);
        }
        Ok(existing)
    }

    /// Returns each change's outcome and, when `set_aside_duplicate_keys`, the indices whose
    /// write hit a duplicate key (left for a second pass instead of failing them now).
    async fn plan_and_write(
        &self,
        changes: &[Change],
        set_aside_duplicate_keys: bool,
    ) -> mongodb::error::Result<(Vec<Outcome>, Vec<usize>)> {
        let existing = self.fetch_existing(changes).await?;
        let plan = plan_batch(&self.rules, changes, existing, DateTime::now());
        let results = self.applier.apply(&plan.writes).await?;
        let mut outcomes = plan.outcomes;
        let mut duplicate_key = Vec::new();
        for (write, result) in plan.writes.iter().zip(&results) {
            if let WriteResult::Refused { code, message } = result {
                if result.is_duplicate_key() && set_aside_duplicate_keys {
                    duplicate_key.extend(write.changes.iter().copied());
                    continue;
                }
                for &i in &write.changes {
                    outcomes[i] = Outcome::Failed(Failed {
                        code: staging_code(*code),
                        message: message.clone(),
                    });
                }
            }
        }
        duplicate_key.sort_unstable();
        Ok((outcomes, duplicate_key))
    }

    async fn dead_letter(&self, c: &Change, f: &Failed) -> mongodb::error::Result<()> {
        let key = c
            .doc
            .as_ref()
            .and_then(|d| self.rules.key_of(d).ok())
            .map(|k| k.describe(&self.rules.business_key));
        tracing::warn!(
            collection = %self.name,
            business_key = key.as_deref().unwrap_or("-"),
            production_id = %c.prod_id,
            operation = c.op.as_str(),
            reason = %f.code,
            "change not applied: {}; sent to the dead-letter queue",
            f.message
        );
        self.ctx.dead_letters.record(&self.name, key, c, f).await?;
        self.ctx
            .metrics
            .dead_lettered(&self.name, c.op.as_str(), &f.code);
        Ok(())
    }

    /// Applies a batch, retrying transient failures forever (logging the outage once).
    pub async fn apply_with_retry(
        &self,
        changes: &[Change],
        origin: Origin,
        shutdown: &CancellationToken,
    ) -> Option<BatchReport> {
        let mut backoff = Backoff::default();
        let mut outage: Option<Instant> = None;
        loop {
            let apply = self.apply_changes(changes, origin);
            tokio::pin!(apply);
            let result = tokio::select! {
                r = &mut apply => r,
                // Stopping: give the batch in flight a moment to finish, else abandon it (its
                // position was never checkpointed, so the next run reads it again).
                _ = shutdown.cancelled() => match tokio::time::timeout(SHUTDOWN_GRACE, &mut apply).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(collection = %self.name, changes = changes.len(), "stopping: the batch in flight is abandoned and will be read again from the checkpoint");
                        return None;
                    }
                },
            };
            match result {
                Ok(report) => {
                    if let Some(since) = outage {
                        tracing::info!(collection = %self.name, after_secs = since.elapsed().as_secs(), "staging is back; sync resumed");
                    }
                    return Some(report);
                }
                Err(e) => {
                    let failure = classify(&e);
                    self.ctx
                        .metrics
                        .retries
                        .with_label_values(&["staging"])
                        .inc();
                    if failure == Failure::Transient {
                        if outage.is_none() {
                            outage = Some(Instant::now());
                            tracing::warn!(collection = %self.name, error = %e, "staging unavailable; retrying with backoff, nothing is skipped");
                        }
                    } else if backoff.attempts() % 10 == 0 {
                        tracing::error!(collection = %self.name, error = %e, "applying a batch failed; retrying");
                    }
                    // A batch is abandoned only when stopping; it was never checkpointed.
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Runs this collection until `shutdown`: snapshot if needed, then the change stream.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), EngineError> {
        let config = self.ctx.config.clone();
        let mut forced_resync = false;
        loop {
            let checkpoint = self.load_checkpoint(&shutdown).await?;
            let Some(checkpoint) = checkpoint else {
                return Ok(());
            };
            let needs_snapshot = std::mem::take(&mut forced_resync)
                || config.sync.initial_sync == InitialSync::Always
                || checkpoint.snapshot.is_some()
                || (config.sync.initial_sync == InitialSync::Auto
                    && checkpoint.token.is_none()
                    && checkpoint.cluster_time.is_none());
            let start = if needs_snapshot {
                match crate::snapshot::snapshot_collection(&self, &shutdown, true).await {
                    Ok(Some(t)) => StartAt::Time(t),
                    Ok(None) => return Ok(()), // stopped during the snapshot; progress is saved
                    Err(e) => {
                        return Err(EngineError::Fatal(format!(
                            "snapshot of `{}` failed: {e:#}",
                            self.name
                        )))
                    }
                }
            } else if let Some(token) = checkpoint.resume_token() {
                StartAt::ResumeAfter(token)
            } else if let Some(t) = checkpoint.cluster_time {
                StartAt::Time(t)
            } else {
                StartAt::Now
            };
            match self.stream(start, &shutdown).await {
                Ok(()) => return Ok(()),
                Err(EngineError::HistoryLost { collection, detail }) => {
                    match config.sync.on_history_lost {
                        OnHistoryLost::Fail => {
                            return Err(EngineError::HistoryLost { collection, detail })
                        }
                        OnHistoryLost::Resync => {
                            tracing::warn!(collection = %collection, detail = %detail, "production no longer has the history to resume from; re-copying the collection (on_history_lost = \"resync\")");
                            forced_resync = true;
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Loads the checkpoint, waiting out a store outage. `None` when stopped meanwhile.
    async fn load_checkpoint(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Checkpoint>, EngineError> {
        let mut backoff = Backoff::default();
        loop {
            match self.ctx.checkpoints.load(&self.name).await {
                Ok(cp) => return Ok(Some(cp.unwrap_or_default())),
                Err(e) => {
                    if backoff.attempts() == 0 {
                        tracing::warn!(collection = %self.name, error = %e, "cannot read the checkpoint; retrying");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Saves a checkpoint, retrying transient failures (the position must not be lost).
    pub async fn save_checkpoint(&self, cp: &Checkpoint, shutdown: &CancellationToken) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match self.ctx.checkpoints.save(&self.name, cp).await {
                Ok(()) => {
                    self.ctx.metrics.checkpoint_saved(&self.name);
                    return true;
                }
                Err(e) => {
                    if backoff.attempts() == 0 {
                        tracing::warn!(collection = %self.name, error = %e, "cannot save the checkpoint; retrying");
                    }
                    if shutdown.is_cancelled() && backoff.attempts() > 5 {
                        return false;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Follows the change stream from `start`, applying batches, until `shutdown`.
    async fn stream(
        &self,
        start: StartAt,
        shutdown: &CancellationToken,
    ) -> Result<(), EngineError> {
        let sync = &self.ctx.config.sync;
        let settings = ReaderSettings {
            batch_max_events: sync.batch_max_events,
            batch_max_wait: Duration::from_millis(sync.batch_max_wait_ms),
            idle_report: sync.checkpoint_interval,
        };
        // Two batches in flight at most: one being applied, one being read.
        let (tx, mut rx) = mpsc::channel(2);
        let reader_stop = shutdown.child_token();
        let reader = tokio::spawn(stream::read(
            self.source.clone(),
            start,
            self.masker.clone(),
            settings,
            tx,
            reader_stop.clone(),
            self.ctx.metrics.clone(),
        ));
        let mut pending: Option<Checkpoint> = None;
        let mut last_save = Instant::now() - sync.checkpoint_interval;
        let mut saved_once = false;
        let result = loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                m = rx.recv() => m,
            };
            match message {
                None => break Ok(()),
                Some(ReaderMessage::HistoryLost(detail)) => {
                    break Err(EngineError::HistoryLost {
                        collection: self.name.clone(),
                        detail,
                    })
                }
                Some(ReaderMessage::Fatal(m)) => break Err(EngineError::Fatal(m)),
                Some(ReaderMessage::Batch(batch)) => {
                    if !batch.changes.is_empty()
                        && self
                            .apply_with_retry(&batch.changes, Origin::Stream, shutdown)
                            .await
                            .is_none()
                    {
                        break Ok(()); // stopping: this batch is abandoned, its position not saved
                    }
                    pending = Some(position_checkpoint(&batch, pending.take()));
                    if !saved_once || last_save.elapsed() >= sync.checkpoint_interval {
                        if let Some(cp) = pending.take() {
                            self.save_checkpoint(&cp, shutdown).await;
                            last_save = Instant::now();
                            saved_once = true;
                        }
                    }
                }
            }
        };
        // Dropping the receiver frees a reader blocked on a full channel (staging behind).
        drop(rx);
        reader_stop.cancel();
        let _ = reader.await;
        if let Some(cp) = pending {
            self.save_checkpoint(&cp, shutdown).await;
        }
        result
    }
}

/// The checkpoint a fully applied batch allows.
fn position_checkpoint(batch: &Batch, previous: Option<Checkpoint>) -> Checkpoint {
    let previous = previous.unwrap_or_default();
    let p = &batch.position;
    Checkpoint {
        token: p
            .token
            .as_ref()
            .and_then(|t| mongodb::bson::to_bson(t).ok())
            .or(previous.token),
        cluster_time: p.cluster_time.or(previous.cluster_time),
        wall_time: p.wall_time.or(previous.wall_time),
        saved_at: None,
        snapshot: None,
    }
}

/// A staging write error code as a dead-letter reason.
fn staging_code(code: i32) -> String {
    match code {
        11000 => "key_collision".into(),
        10334 => "document_too_large".into(),
        121 => "validation_failed".into(),
        other => format!("staging_error_{other}"),
    }
}

/// Runs every configured collection until `shutdown`; the first collection that cannot go on
/// stops them all.
pub async fn run(ctx: Context, shutdown: CancellationToken) -> Result<(), EngineError> {
    if !wait_until_reachable(&ctx.prod, "production", &shutdown).await
        || !wait_until_reachable(&ctx.staging, "staging", &shutdown).await
    {
        return Ok(());
    }
    prepare_staging(&ctx, &shutdown).await?;
    let stop_all = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    for c in &ctx.config.collections {
        let cs = ctx.collection_sync(c);
        let stop = stop_all.clone();
        tasks.spawn(async move { cs.run(stop).await });
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let r = joined.unwrap_or_else(|e| {
            Err(EngineError::Fatal(format!(
                "a collection task crashed: {e}"
            )))
        });
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
            }
            stop_all.cancel();
        }
    }
    result
}

/// Creates the indexes stagesync relies on, retrying while staging is unreachable.
pub async fn prepare_staging(
    ctx: &Context,
    shutdown: &CancellationToken,
) -> Result<(), EngineError> {
    let mut backoff = Backoff::default();
    loop {
        let mut result = ctx
            .dead_letters
            .ensure_indexes()
            .await
            .map_err(anyhow::Error::from);
        for c in &ctx.config.collections {
            if result.is_err() {
                break;
            }
            let rules = Rules::new(&ctx.config.sync, c);
            result = crate::apply::ensure_indexes(&ctx.staging_db, c.target_name(), &rules).await;
        }
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                let transient = e
                    .downcast_ref::<mongodb::error::Error>()
                    .map(|m| classify(m) == Failure::Transient)
                    .unwrap_or(false);
                if !transient {
                    return Err(EngineError::Fatal(format!("{e:#}")));
                }
                tracing::warn!(error = %e, "staging unavailable while creating indexes; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}
