//! One collection's pipeline, stage by stage as the README names them:
//!
//! ```text
//! source ──▶ transform ──▶ plan ──────────▶ apply ──────────▶ checkpoint
//! (change     (masking,     (look up staging, (bulk writes     (resume position, saved
//!  stream or   in the        match, merge,     to staging)      after staging acked)
//!  snapshot)   reader)       coalesce)            └─▶ deadletter (changes staging refuses)
//! ```
//!
//! [`Pipeline::apply_changes`] is the single entry point for writing: live changes
//! ([`Pipeline::follow`]), snapshots, prunes, dead-letter replays and `verify` all go through
//! the same lookup → plan → apply path, so the rules are the same whichever way a document
//! arrives. What happens around it — snapshot or stream, history lost — is [`crate::engine`].

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{DateTime, Document, Timestamp};
use mongodb::Collection;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::apply::unique::{KeySet, UniqueIndexes};
use crate::apply::{Applier, WriteResult};
use crate::checkpoint::Checkpoint;
use crate::config::CollectionConfig;
use crate::context::Context;
use crate::error::{ErrorKind, MongoContext, Result, SyncError};
use crate::lease::Fence;
use crate::metrics::Side;
use crate::plan::{
    canonical, fresh_inserts, mask_moved_values, plan_batch, unsure_fresh, Failed, Fresh, Novelty,
    Outcome, PlannedWrite, Rules, Skip, Touched, WriteOp,
};
use crate::retry::{retry, Backoff, Gave, RetryPolicy};
use crate::source::change::Change;
use crate::source::stream::{self, Batch, ReaderMessage, ReaderSettings, StartAt};
use crate::throttle::{LogThrottle, Verdict};
use crate::transform::Masker;

/// How long a stopping run lets the batch in flight finish before abandoning it (`run` must
/// exit within 10 s of SIGTERM).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);
/// How long a stopping run keeps trying to save its last checkpoint.
const STOP_SAVE_GRACE: Duration = Duration::from_secs(3);

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

/// When a batch may start the staging reads and writes that depend on the batch before it.
///
/// A snapshot plans a batch while the one before it is being written (`crate::snapshot`): its
/// copies need no look-up, so the planning — most of stagesync's share of the work — overlaps
/// staging's. Whatever reads or writes staging waits for its turn, so staging sees the batches
/// one after the other, as it would without the overlap — with one exception ([`Turn::beside`]):
/// a first snapshot's blind inserts go beside the batch before when no unique index of staging
/// can see a key in both, so that staging has the next command at hand when it acknowledges one.
#[derive(Clone, Default)]
pub struct Turn {
    /// Set to true once the batch before is written.
    after: Option<watch::Receiver<bool>>,
    beside: Option<Beside>,
}

/// What a batch says, once planned, to the batch after it (see [`Turn::beside`]).
#[derive(Clone, Debug, Default)]
pub enum Blind {
    /// Not planned yet.
    #[default]
    Pending,
    /// Its first pass writes nothing but blind inserts, with these unique-index keys.
    Inserts(Arc<KeySet>),
    /// Anything else: the batch after it waits for its turn.
    Other,
}

#[derive(Clone)]
struct Beside {
    indexes: Arc<UniqueIndexes>,
    /// What the batch before inserts blind; `None` for the first batch.
    before: Option<watch::Receiver<Blind>>,
    /// Where this batch says what it inserts blind.
    says: Arc<watch::Sender<Blind>>,
}

impl Turn {
    /// No batch to wait for.
    pub fn now() -> Turn {
        Turn::default()
    }

    /// After the batch that sets `done` to true. Should it give up instead (drop the sender),
    /// this batch is abandoned too: it must not write ahead of one that was never written.
    pub fn after(done: watch::Receiver<bool>) -> Turn {
        Turn {
            after: Some(done),
            beside: None,
        }
    }

    /// This turn, for a batch of a first snapshot whose first pass may go without waiting for
    /// it: when it writes only blind inserts (no look-up, no key moved, no reference to
    /// record), and no index of `indexes` can see one of their keys among the blind inserts of
    /// the batch before (`before`, what that batch said). Its look-ups, its second pass and
    /// anything else still wait. Returns where this batch says what it inserts blind.
    ///
    /// Why that keeps the result of writing the batches one after the other: an insert staging
    /// takes writes nothing the batch before could have needed (its keys are its own), and one
    /// staging refuses is planned again, after the batch before, as it would have been. See
    /// `crate::apply::unique` for which keys count as the same.
    pub fn beside(
        self,
        indexes: Arc<UniqueIndexes>,
        before: Option<watch::Receiver<Blind>>,
    ) -> (Turn, watch::Receiver<Blind>) {
        let (says, said) = watch::channel(Blind::Pending);
        let turn = Turn {
            beside: Some(Beside {
                indexes,
                before,
                says: Arc::new(says),
            }),
            ..self
        };
        (turn, said)
    }

    async fn wait(&self) -> Result<()> {
        let Some(done) = &self.after else {
            return Ok(());
        };
        match done.clone().wait_for(|done| *done).await {
            Ok(_) => Ok(()),
            Err(_) => Err(SyncError::Staging(
                "the batch before this one was not written; this one is not written either (the \
                 next run continues from the last batch saved)"
                    .into(),
            )),
        }
    }

    /// Waits for the turn of a pass's writes, unless they may go beside the batch before (see
    /// [`Turn::beside`]; `blind`: the writes when they are all blind inserts). The first pass
    /// to get here says what the batch inserts blind, for the batch after it.
    async fn wait_to_write(&self, blind: Option<&[PlannedWrite]>) -> Result<()> {
        let Some(beside) = &self.beside else {
            return self.wait().await;
        };
        let keys = blind.and_then(|writes| {
            let docs = writes.iter().map(|w| match &w.op {
                WriteOp::Insert(doc) => Some(doc),
                _ => None,
            });
            let docs: Option<Vec<&Document>> = docs.collect();
            beside.indexes.keys_of(docs?).map(Arc::new)
        });
        let said = keys.clone().map_or(Blind::Other, Blind::Inserts);
        // Said once: a retry or a second pass writes no key the batch after could meet that the
        // first pass's inserts did not hold already.
        beside.says.send_if_modified(|b| {
            let first = matches!(b, Blind::Pending);
            if first {
                *b = said;
            }
            first
        });
        let (Some(keys), Some(before)) = (keys, &beside.before) else {
            return self.wait().await;
        };
        let mut before = before.clone();
        let apart = tokio::select! {
            turn = self.wait() => return turn,
            // Gone without saying: the batch before failed, and the turn says so.
            known = before.wait_for(|b| !matches!(b, Blind::Pending)) => match known {
                Ok(b) => matches!(&*b, Blind::Inserts(k) if k.is_apart_from(&keys)),
                Err(_) => false,
            },
        };
        if apart {
            Ok(())
        } else {
            self.wait().await
        }
    }
}

/// What one `apply_changes` call did.
#[derive(Debug, Default, Clone)]
pub struct BatchReport {
    pub applied: usize,
    pub skipped: usize,
    pub failed: usize,
    /// One per change, in order.
    pub outcomes: Vec<Outcome>,
    /// What the batch wrote, for the look-ups of the next batch made meanwhile (see
    /// [`Touched`]); `None` when not known exactly (the batch was retried).
    pub touched: Option<Touched>,
    /// Changes of documents written without a look-up that took the slow path after all (staging
    /// or the plan found their key or `_id` held; see [`fresh_inserts`]).
    pub looked_up_again: usize,
    /// Whether the batch's first pass landed exactly as planned, in one attempt.
    pub landed: Landed,
}

/// Whether a batch's writes left staging as its plan said (see [`Touched::planned_after`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Landed {
    /// Every write of the first pass was taken and every update or delete found its document,
    /// in one attempt: staging holds the plan's `finals`.
    AsPlanned,
    /// Anything else (a refusal, a second pass, a guard that held, a retry): the next batch is
    /// planned after this one, from corrected look-ups.
    #[default]
    Otherwise,
}

/// How a stream batch overlaps its neighbours: what was done for it while the batch before it
/// was written, and where to hand what it plans to leave in staging, for the batch after it.
pub struct Overlap {
    pub ahead: Ahead,
    pub basis: Option<tokio::sync::oneshot::Sender<Basis>>,
}

impl Overlap {
    /// No neighbour: a snapshot, prune, replay or `verify` batch.
    pub fn none() -> Overlap {
        Overlap {
            ahead: Ahead::Nothing,
            basis: None,
        }
    }
}

/// What a batch brings from the time the batch before it was being written.
pub enum Ahead {
    /// Nothing: the batch looks itself up.
    Nothing,
    /// Its look-ups, made exact (see [`Pipeline::refresh_looked_up`]).
    LookedUp(Vec<Document>),
    /// Its first pass, planned against the state the batch before planned to leave, which it
    /// did ([`Landed::AsPlanned`]).
    Planned(Box<Planned>),
}

/// What a batch's first pass plans to leave in staging, handed to the next batch's planning
/// before it is written: the documents it writes, and their final states.
pub struct Basis {
    /// Only its written documents ([`Touched::written_only`]).
    touched: Touched,
    finals: Vec<Document>,
}

/// A first pass planned ahead (see [`Pipeline::work_ahead`]).
pub struct Planned {
    /// The changes as planned, when the plan masked some of their values (otherwise the batch's
    /// own changes).
    masked: Option<Vec<Change>>,
    prepared: Prepared,
    touched: Touched,
    /// The batch's new documents ([`fresh_inserts`]), as the plan took them.
    fresh: Fresh,
}

/// One pass over a batch, planned and encoded, not written yet ([`Pipeline::prepare`]).
pub struct Prepared {
    unresolved: Vec<crate::references::Unresolved>,
    plan: crate::plan::Plan,
    vacate: crate::apply::Encoded,
    writes: crate::apply::Encoded,
    looked_up_again: usize,
}

/// What [`Pipeline::write_prepared`] did.
struct Written<'c> {
    /// The changes as planned (masked with staging's knowledge too).
    changes: Cow<'c, [Change]>,
    outcomes: Vec<Outcome>,
    /// In the first pass, the changes whose write hit a duplicate key (left for the second).
    duplicate_key: Vec<usize>,
    looked_up_again: usize,
    landed: Landed,
}

/// A stream batch and what was done for it while the batch before was written.
struct AheadWork {
    batch: Batch,
    /// Its look-ups, made while the batch before was written (`None`: they failed).
    found: Option<Vec<Document>>,
    /// Its first pass, planned against the batch before's planned final state.
    planned: Option<Box<Planned>>,
}

/// One collection's stages and the connections they use.
#[derive(Clone)]
pub struct Pipeline {
    pub name: String,
    pub target: String,
    pub rules: Rules,
    pub masker: Masker,
    pub applier: Applier,
    pub source: Collection<Document>,
    pub staging: Collection<Document>,
    /// `[collections.references]`: remapping and pending fix-ups ([`crate::references`]).
    pub references: crate::references::References,
    /// Per-change warnings (dead letters) are throttled: a poison burst logs a few lines.
    warnings: Arc<LogThrottle>,
    /// The collection's lease, when this process runs it under one (see [`crate::lease`]):
    /// nothing is written once it is no longer valid, checkpoint saves carry its epoch.
    fence: Option<Fence>,
    ctx: Context,
}

/// Dead-letter warnings logged per minute and collection before they are only counted.
const WARNINGS_PER_MINUTE: u32 = 20;

impl Pipeline {
    pub fn new(ctx: &Context, c: &CollectionConfig) -> Pipeline {
        let config = &ctx.config;
        Pipeline {
            name: c.name.clone(),
            target: c.target_name().to_string(),
            rules: Rules::new(&config.sync, c),
            masker: Masker::new(config.masking.as_ref(), &config.mask_rules(c)),
            applier: Applier::new(
                ctx.staging_db.clone(),
                c.target_name(),
                &config.sync.write_concern,
                config.sync.apply_concurrency,
                ctx.limiter.clone(),
                &config.sync.metadata_field,
            ),
            source: ctx.prod_db.collection(&c.name),
            staging: ctx.staging_db.collection(c.target_name()),
            references: crate::references::References::new(
                config.clone(),
                ctx.staging_db.clone(),
                &ctx.meta_db,
                ctx.metrics.clone(),
                &c.name,
            ),
            warnings: Arc::new(LogThrottle::new(
                WARNINGS_PER_MINUTE,
                Duration::from_secs(60),
            )),
            fence: None,
            ctx: ctx.clone(),
        }
    }

    /// This pipeline, acting under a collection lease.
    pub fn with_fence(mut self, fence: Fence) -> Pipeline {
        self.fence = Some(fence);
        self
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// `Err(LeaseLost)` once the lease this pipeline runs under may have passed to another
    /// process (a failed renewal, or this process was paused past its window).
    pub fn check_fence(&self) -> Result<()> {
        match &self.fence {
            Some(f) if !f.is_valid() => Err(SyncError::LeaseLost {
                collection: self.name.clone(),
                detail: format!("lease epoch {} was not renewed in time", f.epoch),
            }),
            _ => Ok(()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // plan → apply → deadletter: one batch

    /// Looks up, plans and writes one batch of changes; records the ones that cannot be applied
    /// in the dead-letter queue (unless replaying one). `Err` only for trouble with the whole
    /// request (the caller retries the batch: replays are no-ops thanks to the order rule).
    pub async fn apply_changes(&self, changes: &[Change], origin: Origin) -> Result<BatchReport> {
        self.apply_batch(
            changes,
            origin,
            Novelty::Unknown,
            Overlap::none(),
            &Turn::now(),
        )
        .await
    }

    /// [`Pipeline::apply_changes`] for a stream or snapshot batch: the documents `novelty`
    /// says are new (a stream's inserts after production's time when it was opened, a first
    /// snapshot's documents) are written without looking them up first (see
    /// [`fresh_inserts`]); `overlap.ahead` is what was done for the batch while the one before
    /// it was written (see [`Pipeline::work_ahead`]); `overlap.basis`, when given, receives
    /// what the first pass plans to leave in staging, before it writes it: the next batch is
    /// planned against that meanwhile.
    async fn apply_batch(
        &self,
        changes: &[Change],
        origin: Origin,
        novelty: Novelty,
        overlap: Overlap,
        turn: &Turn,
    ) -> Result<BatchReport> {
        let Overlap { mut ahead, basis } = overlap;
        // A plan made ahead made the batch's new documents out already.
        let fresh = match &mut ahead {
            Ahead::Planned(planned) => std::mem::take(&mut planned.fresh),
            _ => fresh_inserts(&self.rules, changes, novelty),
        };
        let first = Pass::First {
            fresh: &fresh,
            novelty,
        };
        let mut touched = Touched::default();
        let (planned_changes, mut prepared) = match ahead {
            Ahead::Planned(planned) => {
                let Planned {
                    masked,
                    prepared,
                    touched: read,
                    fresh: _,
                } = *planned;
                touched = read;
                // Unmasked by the plan: the batch's changes as they came.
                let planned_changes = match masked {
                    Some(masked) => Cow::Owned(masked),
                    None => Cow::Borrowed(changes),
                };
                (planned_changes, prepared)
            }
            Ahead::LookedUp(found) => {
                self.prepare_now(changes, first, Some(found), turn, &mut touched)
                    .await?
            }
            Ahead::Nothing => {
                self.prepare_now(changes, first, None, turn, &mut touched)
                    .await?
            }
        };
        if let Some(basis) = basis {
            // The receiver is gone when the next batch is not planned ahead: nothing to do.
            let _ = basis.send(Basis {
                touched: touched.written_only(),
                finals: prepared.plan.take_final_documents(),
            });
        }
        // From here on `changes` are the ones planned: masked with staging's knowledge too.
        let Written {
            changes,
            mut outcomes,
            duplicate_key,
            mut looked_up_again,
            landed,
        } = self
            .write_prepared(planned_changes, prepared, first, turn)
            .await?;
        // A duplicate key error can come from two documents of the batch trading keys in
        // parallel chunks, or from an insert written without a look-up whose key (or `_id`)
        // staging already holds (a document to adopt or revive, or a collision): plan those
        // once more, alone and with every look-up, now that the rest is written.
        if !duplicate_key.is_empty() {
            if !fresh.is_empty() {
                looked_up_again += duplicate_key.len();
            }
            let retry: Vec<Change> = duplicate_key.iter().map(|&i| changes[i].clone()).collect();
            let second = self
                .plan_and_write(&retry, Pass::Second, None, turn, &mut touched)
                .await?;
            for (k, &i) in duplicate_key.iter().enumerate() {
                outcomes[i] = second.outcomes[k].clone();
            }
        }
        let metrics = &self.ctx.metrics;
        if looked_up_again > 0 {
            metrics.fresh_insert_fallbacks(&self.name, looked_up_again);
        }
        let mut report = BatchReport::default();
        for (c, outcome) in changes.iter().zip(&outcomes) {
            match outcome {
                Outcome::Applied => {
                    report.applied += 1;
                    metrics.applied(&self.name, c.op.as_str());
                    if origin == Origin::Stream {
                        // The change's production time → staging acknowledged it. Its wall time
                        // has milliseconds (servers 6.0+ send it); a cluster time only seconds.
                        match c.wall_time {
                            Some(w) => metrics.lag(
                                &self.name,
                                (DateTime::now().timestamp_millis() - w.timestamp_millis()) as f64
                                    / 1000.0,
                            ),
                            None => {
                                metrics.lag_since_cluster_time(&self.name, c.cluster_time);
                            }
                        }
                    }
                }
                Outcome::Skipped(s) => {
                    report.skipped += 1;
                    metrics.skipped(&self.name, c.op.as_str(), s.as_str());
                    if *s == Skip::StagingNewer {
                        metrics.conflict(&self.name);
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
        metrics.batch(changes.len());
        if let Some(suppressed) = self.warnings.take_due_summary(Instant::now()) {
            self.summarise_suppressed(suppressed);
        }
        report.outcomes = outcomes;
        report.touched = Some(touched);
        report.looked_up_again = looked_up_again;
        report.landed = landed;
        Ok(report)
    }

    /// [`Pipeline::prepare`] for a pass planned now, which may ask staging what it needs.
    async fn prepare_now<'c>(
        &self,
        changes: &'c [Change],
        pass: Pass<'_>,
        looked_up: Option<Vec<Document>>,
        turn: &Turn,
        touched: &mut Touched,
    ) -> Result<(Cow<'c, [Change]>, Prepared)> {
        match self
            .prepare(changes, pass, looked_up, turn, touched, false)
            .await?
        {
            Some(prepared) => Ok(prepared),
            // `prepare` only gives up on a batch planned ahead.
            None => Err(SyncError::TaskFailed(format!(
                "a batch of `{}` planned now was not prepared",
                self.name
            ))),
        }
    }

    /// What can be done for a stream batch while the batch before it is still being written:
    /// its look-ups ([`Pipeline::refresh_looked_up`] corrects them once that batch is done),
    /// and, once `basis` says what that batch plans to leave in staging, its plan against that
    /// state (used only if that batch lands as planned; see [`Touched::planned_after`]).
    async fn work_ahead(
        &self,
        batch: Batch,
        novelty: Novelty,
        basis: Option<tokio::sync::oneshot::Receiver<Basis>>,
    ) -> AheadWork {
        let fresh = fresh_inserts(&self.rules, &batch.changes, novelty);
        // `None` when they failed: the batch then looks everything up itself.
        let found = self
            .fetch_existing_except(&batch.changes, &fresh, novelty, &Turn::now())
            .await
            .ok();
        let planned = match (&found, basis) {
            (Some(found), Some(basis)) => match basis.await {
                Ok(basis) => {
                    let mut existing = found.clone();
                    basis.touched.planned_after(
                        &self.rules,
                        &batch.changes,
                        &mut existing,
                        basis.finals,
                    );
                    let mut touched = Touched::default();
                    let first = Pass::First {
                        fresh: &fresh,
                        novelty,
                    };
                    match self
                        .prepare(
                            &batch.changes,
                            first,
                            Some(existing),
                            &Turn::now(),
                            &mut touched,
                            true,
                        )
                        .await
                    {
                        Ok(Some((changes, prepared))) => Some(Box::new(Planned {
                            masked: match changes {
                                Cow::Owned(masked) => Some(masked),
                                Cow::Borrowed(_) => None,
                            },
                            prepared,
                            touched,
                            fresh,
                        })),
                        _ => None,
                    }
                }
                // The batch before failed before it was planned.
                Err(_) => None,
            },
            _ => None,
        };
        AheadWork {
            batch,
            found,
            planned,
        }
    }

    /// Look-ups made ahead, made exact now that the batch written meanwhile (`before`) is
    /// acknowledged: the documents it wrote are dropped and the changes that can meet them are
    /// looked up again (see [`Touched`]). `None` when that is not possible (the batch before
    /// was retried, or the second look-up failed): the batch then looks everything up itself.
    async fn refresh_looked_up(
        &self,
        changes: &[Change],
        novelty: Novelty,
        mut looked_up: Vec<Document>,
        before: Option<Touched>,
    ) -> Option<Vec<Document>> {
        let mut touched = before?;
        touched.drop_written(&self.rules, &mut looked_up);
        let again: Vec<Change> = changes
            .iter()
            .filter(|c| touched.meets(&self.rules, c))
            .cloned()
            .collect();
        if !again.is_empty() {
            // New documents are judged on the whole batch (a later key move makes one not new).
            let fresh = fresh_inserts(&self.rules, changes, novelty);
            looked_up.extend(
                self.fetch_existing_except(&again, &fresh, novelty, &Turn::now())
                    .await
                    .ok()?,
            );
        }
        Some(looked_up)
    }

    /// The lookup part of the plan stage: the staging documents a batch may touch, in a few
    /// set-based queries — by recorded production `_id` (current and prior owners, side by
    /// side), by own `_id` where a new document may take it, then by the business keys still
    /// needed (see [`Rules::keys_to_look_up`]).
    pub async fn fetch_existing(&self, changes: &[Change]) -> Result<Vec<Document>> {
        self.fetch_existing_except(changes, &Fresh::new(), Novelty::Unknown, &Turn::now())
            .await
    }

    /// [`Pipeline::fetch_existing`], leaving out the documents known to be new, and the former
    /// owners of those `novelty` says were never applied (see [`Rules::owner_filters`]); each
    /// query waits for `turn` (none is made when every document is new).
    async fn fetch_existing_except(
        &self,
        changes: &[Change],
        fresh: &Fresh,
        novelty: Novelty,
        turn: &Turn,
    ) -> Result<Vec<Document>> {
        let what = || format!("looking up staging.{}", self.target);
        let find = |filter: Document| async move {
            turn.wait().await?;
            self.staging
                .find(filter)
                .await
                .with_context(what)?
                .try_collect::<Vec<Document>>()
                .await
                .with_context(what)
        };
        let mut existing: Vec<Document> = match self.rules.owner_filters(changes, fresh, novelty) {
            Some((owners, Some(prior_owners))) => {
                let (mut found, prior) = futures::try_join!(find(owners), find(prior_owners))?;
                found.extend(prior);
                found
            }
            Some((owners, None)) => find(owners).await?,
            None => vec![],
        };
        if let Some(filter) = self.rules.id_holder_filter(changes, fresh, &existing) {
            existing.extend(find(filter).await?);
        }
        let keys = self.rules.keys_to_look_up(changes, &existing, fresh);
        if let Some(filter) = self.rules.key_filter(&keys) {
            existing.extend(find(filter).await?);
        }
        Ok(existing)
    }

    /// Returns the changes as planned (with the values staging knows to be personal masked:
    /// [`crate::plan::mask_moved_values`]), each change's outcome and, in the first pass, the
    /// indices whose write hit a duplicate key (left for the second pass instead of failing
    /// them now), how many changes of `fresh` documents the plan sent back to be looked up
    /// ([`unsure_fresh`]), and whether every write landed as planned (see [`Landed`]).
    async fn plan_and_write<'c>(
        &self,
        changes: &'c [Change],
        pass: Pass<'_>,
        looked_up: Option<Vec<Document>>,
        turn: &Turn,
        touched: &mut Touched,
    ) -> Result<Written<'c>> {
        let (changes, prepared) = self
            .prepare_now(changes, pass, looked_up, turn, touched)
            .await?;
        self.write_prepared(changes, prepared, pass, turn).await
    }

    /// The look-ups (unless given) and the plan of one pass over a batch, its writes encoded;
    /// nothing is written. `ahead`: planned while the batch before is being written, so staging
    /// must not be asked anything — `None` when the plan would need to ask (it looks some new
    /// documents up after all, or references are remapped).
    async fn prepare<'c>(
        &self,
        changes: &'c [Change],
        pass: Pass<'_>,
        looked_up: Option<Vec<Document>>,
        turn: &Turn,
        touched: &mut Touched,
        ahead: bool,
    ) -> Result<Option<(Cow<'c, [Change]>, Prepared)>> {
        let no_fresh = Fresh::new();
        let (fresh, novelty) = match pass {
            Pass::First { fresh, novelty } => (fresh, novelty),
            Pass::Second => (&no_fresh, Novelty::Unknown),
        };
        if ahead && self.references.remaps() {
            return Ok(None);
        }
        let mut existing = match looked_up {
            Some(found) => found,
            None => {
                self.fetch_existing_except(changes, fresh, novelty, turn)
                    .await?
            }
        };
        let mut fresh = Cow::Borrowed(fresh);
        let mut looked_up_again = 0;
        let (changes, unresolved, plan) = loop {
            let masked = mask_moved_values(&self.rules, &self.masker, changes, &existing);
            // References rewritten to staging `_id`s; those not resolvable yet are recorded as
            // pending fix-ups before anything is written (`crate::references`).
            if self.references.remaps() {
                turn.wait().await?;
            }
            let (masked, unresolved) = self.references.remap(masked).await?;
            let plan = plan_batch(&self.rules, &masked, existing.clone(), DateTime::now());
            // New documents the plan could not write blind: look them up, plan again (rare).
            let unsure = unsure_fresh(&masked, &plan.outcomes, &fresh);
            if unsure.is_empty() {
                break (masked, unresolved, plan);
            }
            if ahead {
                return Ok(None);
            }
            fresh.to_mut().retain(|id| !unsure.contains(id));
            let again: Vec<Change> = changes
                .iter()
                .filter(|c| unsure.contains(&canonical(&c.prod_id)))
                .cloned()
                .collect();
            looked_up_again += again.len();
            existing.extend(
                self.fetch_existing_except(&again, &fresh, novelty, turn)
                    .await?,
            );
        };
        // Field names like "c.d" or "$x" need another form of update (rare: a key scan).
        let names = crate::apply::LiteralNames::collect(&existing, &changes);
        // Recorded before anything is sent: a write that fails half-way has still touched.
        touched.record_read(&self.rules, &changes, &existing);
        touched.record_writes(&plan);
        // Each write is conditional on staging's copy being older than the newest change it
        // carries: a stale writer (a paused process, a second owner) never puts older state back.
        let guards = |writes: &[PlannedWrite]| -> Vec<Option<Timestamp>> {
            writes
                .iter()
                .map(|w| w.changes.last().map(|&i| changes[i].cluster_time))
                .collect()
        };
        // Encoded before waiting for the turn: a snapshot batch is ready to send the moment the
        // batch before it is written, and staging does not wait for stagesync in between.
        let vacate = self
            .applier
            .encode(&plan.vacate, &guards(&plan.vacate), &names)
            .await;
        let writes = self
            .applier
            .encode(&plan.writes, &guards(&plan.writes), &names)
            .await;
        Ok(Some((
            changes,
            Prepared {
                unresolved,
                plan,
                vacate,
                writes,
                looked_up_again,
            },
        )))
    }

    /// The writing half of [`Pipeline::plan_and_write`]: waits for the turn, sends the
    /// temporary key moves, then the final writes, and sorts out what staging refused.
    async fn write_prepared<'c>(
        &self,
        changes: Cow<'c, [Change]>,
        prepared: Prepared,
        pass: Pass<'_>,
        turn: &Turn,
    ) -> Result<Written<'c>> {
        let Prepared {
            unresolved,
            mut plan,
            vacate,
            writes,
            looked_up_again,
        } = prepared;
        let set_aside_duplicate_keys = matches!(pass, Pass::First { .. });
        let blind = set_aside_duplicate_keys
            && plan.vacate.is_empty()
            && unresolved.is_empty()
            && !self.references.remaps();
        turn.wait_to_write(blind.then_some(plan.writes.as_slice()))
            .await?;
        self.references
            .before_writes(&plan.writes, &unresolved)
            .await?;
        let mut landed = Landed::AsPlanned;
        // Key swaps and rotations: placeholder keys first, acknowledged, then the final writes.
        if !plan.vacate.is_empty() {
            let moved = self.applier.send(&plan.vacate, vacate).await?;
            if moved.missed > 0 {
                landed = Landed::Otherwise;
            }
            for (write, result) in plan.vacate.iter().zip(&moved.results) {
                if let (WriteResult::Refused { code, .. }, WriteOp::Update { id, .. }) =
                    (result, &write.op)
                {
                    landed = Landed::Otherwise;
                    // The writes that needed its key will fail and be dead-lettered.
                    tracing::warn!(collection = %self.name, staging_id = %id, code, "staging refused a temporary key move");
                }
            }
        }
        let sent = self.applier.send(&plan.writes, writes).await?;
        if sent.missed > 0 {
            landed = Landed::Otherwise;
        }
        let mut outcomes = std::mem::take(&mut plan.outcomes);
        let mut duplicate_key = Vec::new();
        for (write, result) in plan.writes.iter().zip(&sent.results) {
            if let WriteResult::Refused { code, message } = result {
                landed = Landed::Otherwise;
                if result.is_duplicate_key() && set_aside_duplicate_keys {
                    duplicate_key.extend(write.changes.iter().copied());
                    continue;
                }
                for &i in &write.changes {
                    outcomes[i] = Outcome::Failed(Failed {
                        code: staging_code(*code, message),
                        message: message.clone(),
                    });
                }
            }
        }
        duplicate_key.sort_unstable();
        self.references
            .after_writes(&plan.writes, &changes, &unresolved)
            .await?;
        self.note_fresh_ids(&changes, &plan.fresh_ids, &outcomes, &duplicate_key);
        Ok(Written {
            changes,
            outcomes,
            duplicate_key,
            looked_up_again,
            landed,
        })
    }

    /// Counts (and logs, once per document: later changes find it by `_sync.id`) the new
    /// documents written under a fresh `_id` because their production `_id` was taken.
    fn note_fresh_ids(
        &self,
        changes: &[Change],
        fresh: &[usize],
        outcomes: &[Outcome],
        set_aside: &[usize],
    ) {
        for &i in fresh {
            if outcomes[i] == Outcome::Applied && set_aside.binary_search(&i).is_err() {
                self.ctx.metrics.fresh_id(&self.name);
                tracing::info!(collection = %self.name, production_id = %crate::deadletter::short_id(&changes[i].prod_id), "a staging document already holds this production _id; the new document got a fresh _id (new_document_id = \"production\")");
            }
        }
    }

    async fn dead_letter(&self, c: &Change, f: &Failed) -> Result<()> {
        let key = c
            .doc
            .as_ref()
            .and_then(|d| self.rules.key_of(d).ok())
            .map(|k| k.describe(&self.rules.business_key));
        self.ctx
            .dead_letters
            .record(&self.name, key.clone(), c, f)
            .await
            .context("writing a dead letter")?;
        // Logged and counted once stored: neither claims an entry the queue does not hold.
        self.ctx
            .metrics
            .dead_lettered(&self.name, c.op.as_str(), &f.code);
        if let Verdict::Log { suppressed } = self.warnings.admit(Instant::now()) {
            self.summarise_suppressed(suppressed);
            tracing::warn!(
                collection = %self.name,
                business_key = key.as_deref().unwrap_or("-"),
                production_id = %crate::deadletter::short_id(&c.prod_id),
                operation = c.op.as_str(),
                reason = %f.code,
                "change not applied: {}; sent to the dead-letter queue",
                crate::retry::excerpt(&f.message, crate::retry::DETAIL_CHARS)
            );
        }
        Ok(())
    }

    fn summarise_suppressed(&self, suppressed: u64) {
        if suppressed > 0 {
            tracing::warn!(collection = %self.name, suppressed, "{suppressed} more changes were sent to the dead-letter queue in the last minute (not logged one by one; see `stagesync dlq list` and stagesync_changes_dead_lettered_total)");
        }
    }

    /// Applies a batch, retrying failures of the whole request (logging an outage once) — all
    /// but fatal ones (e.g. a write concern staging can never satisfy), which are returned.
    /// `Ok(None)` when stopping: the batch is abandoned (its position was never checkpointed,
    /// so the next run reads it again).
    pub async fn apply_with_retry(
        &self,
        changes: &[Change],
        origin: Origin,
        novelty: Novelty,
        overlap: Overlap,
        turn: &Turn,
        shutdown: &CancellationToken,
    ) -> Result<Option<BatchReport>> {
        let mut outage: Option<Instant> = None;
        // Look-ups and plans made ahead serve the first attempt only; a retry looks up again,
        // and the next batch's plan against this one's (`basis`) is not used after a retry.
        let overlap = std::sync::Mutex::new(Some(overlap));
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let attempt = || async {
            self.check_fence()?;
            let before = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let overlap = overlap
                .lock()
                .map(|mut o| o.take())
                .unwrap_or(None)
                .unwrap_or_else(Overlap::none);
            // A failed attempt may have written part of the batch: the next one replays it,
            // so it looks everything up (see `Novelty::may_have_applied`).
            let novelty = if before == 0 {
                novelty
            } else {
                Novelty::Unknown
            };
            let apply = self.apply_batch(changes, origin, novelty, overlap, turn);
            tokio::pin!(apply);
            tokio::select! {
                r = &mut apply => r.map(Some),
                // Stopping: give the batch in flight a moment to finish, else abandon it.
                _ = shutdown.cancelled() => match tokio::time::timeout(SHUTDOWN_GRACE, &mut apply).await {
                    Ok(r) => r.map(Some),
                    Err(_) => Ok(None),
                },
            }
        };
        let health = self.ctx.metrics.health();
        let observe = |e: &SyncError, backoff: &Backoff| {
            self.ctx.metrics.retry(Side::Staging);
            if e.is_transient() {
                if outage.is_none() {
                    outage = Some(Instant::now());
                    health.staging_unreachable();
                    tracing::warn!(collection = %self.name, error = %e, "staging unavailable; retrying with backoff, nothing is skipped");
                }
            } else if backoff.attempts().is_multiple_of(10) {
                tracing::error!(collection = %self.name, error = %e, "applying a batch failed; retrying");
            }
        };
        // Anything but a fatal error that fails the whole request is retried: a batch is
        // abandoned only when stopping, or when the collection's lease is lost.
        let retryable =
            |e: &SyncError| !matches!(e.kind(), ErrorKind::Fatal | ErrorKind::LeaseLost);
        match retry(
            &RetryPolicy::default(),
            shutdown,
            attempt,
            retryable,
            observe,
        )
        .await
        {
            Ok((Some(mut report), _)) => {
                // A retried batch may have written more than its last attempt planned.
                if attempts.load(std::sync::atomic::Ordering::Relaxed) > 1 {
                    report.touched = None;
                    report.landed = Landed::Otherwise;
                }
                if let Some(since) = outage {
                    health.staging_reachable();
                    tracing::info!(collection = %self.name, after_secs = since.elapsed().as_secs(), "staging is back; sync resumed");
                }
                Ok(Some(report))
            }
            Ok((None, _)) | Err(Gave::Stopped) => {
                tracing::warn!(collection = %self.name, changes = changes.len(), "stopping: the batch in flight is abandoned and will be read again from the checkpoint");
                Ok(None)
            }
            Err(Gave::Up(e)) => Err(e),
        }
    }

    // -----------------------------------------------------------------------------------------
    // checkpoint

    /// Loads the checkpoint, waiting out a store outage. `None` when stopped meanwhile.
    pub async fn load_checkpoint(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Checkpoint>> {
        let load = || self.ctx.checkpoints.load(&self.name);
        let said = |e: &SyncError, b: &Backoff| {
            if b.attempts() == 0 {
                tracing::warn!(collection = %self.name, error = %e, "cannot read the checkpoint; retrying");
            }
        };
        match retry(
            &RetryPolicy::default(),
            shutdown,
            load,
            SyncError::is_transient,
            said,
        )
        .await
        {
            Ok((cp, _)) => Ok(Some(cp.unwrap_or_default())),
            Err(Gave::Stopped) => Ok(None),
            Err(Gave::Up(e)) => Err(e),
        }
    }

    /// Saves a checkpoint, retrying failures until it is saved (the position must not be
    /// lost) — once stopping, for [`STOP_SAVE_GRACE`] at most (the next run then replays a
    /// little more). `Ok(true)` when saved; `Err(LeaseLost)` when the save was fenced off
    /// (another process owns the collection now).
    pub async fn save_checkpoint(
        &self,
        cp: &Checkpoint,
        shutdown: &CancellationToken,
    ) -> Result<bool> {
        let never = CancellationToken::new();
        let mut backoff = RetryPolicy::default().backoff();
        let mut stopping_since: Option<Instant> = None;
        let epoch = self.fence.as_ref().map(|f| f.epoch);
        loop {
            self.check_fence()?;
            match self.ctx.checkpoints.save(&self.name, cp, epoch).await {
                Ok(()) => {
                    self.ctx.metrics.checkpoint_saved(&self.name);
                    return Ok(true);
                }
                // Fenced off, or a failure no retry fixes: stop this collection.
                Err(e) if matches!(e.kind(), ErrorKind::LeaseLost | ErrorKind::Fatal) => {
                    return Err(e)
                }
                Err(e) => {
                    self.ctx
                        .metrics
                        .health()
                        .checkpoint_save_failed(&self.name, &e.to_string());
                    if backoff.attempts() == 0 {
                        tracing::warn!(collection = %self.name, store = self.ctx.checkpoints.location(), error = %e, "checkpoint store unavailable: cannot save the checkpoint; retrying with backoff");
                    }
                    if shutdown.is_cancelled() {
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= STOP_SAVE_GRACE {
                            tracing::warn!(collection = %self.name, error = %e, "stopping without saving the last checkpoint; the next run replays from the previous one");
                            return Ok(false);
                        }
                    }
                    // A stop during the pause ends it early, so the grace period starts.
                    let stop = if shutdown.is_cancelled() {
                        &never
                    } else {
                        shutdown
                    };
                    backoff.wait(stop).await;
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // source → … → checkpoint: the live loop

    /// Follows the change stream from `start`, applying batches and checkpointing after them,
    /// until `shutdown`.
    pub async fn follow(&self, start: StartAt, shutdown: &CancellationToken) -> Result<()> {
        let sync = &self.ctx.config.sync;
        let settings = ReaderSettings {
            batch_max_events: sync.batch_max_events,
            batch_max_wait: Duration::from_millis(sync.batch_max_wait_ms),
            idle_report: sync.checkpoint_interval,
            filter: self.rules.filter.clone(),
        };
        let start_time = match &start {
            StartAt::Time(t) => Some(*t),
            _ => None,
        };
        // What the position stands for, carried from one checkpoint to the next: a batch that
        // only moves the token (the stream opening, an idle stream) keeps the cluster and wall
        // time already known — from the checkpoint the stream starts from, or the snapshot's
        // read time.
        let loaded = self.ctx.checkpoints.load(&self.name).await.ok().flatten();
        // The changes after this moment were never applied by any run; the inserts among them
        // are new to staging (see `fresh_inserts`). A checkpoint saved at a clean stop says
        // where that is (`Checkpoint::horizon`); otherwise (after a crash, a snapshot) it is
        // production's time now, and the changes in between are looked up. Unknown: look
        // everything up.
        let saved_horizon = loaded
            .as_ref()
            .and_then(|cp| cp.horizon)
            .filter(|_| matches!(start, StartAt::ResumeAfter(_)));
        let replayed_until = match saved_horizon {
            Some(t) => Some(t),
            None => match self.ctx.production_time().await {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::debug!(collection = %self.name, error = %e, "production's time is unknown; every change is looked up");
                    None
                }
            },
        };
        let novelty = Novelty::inserts_after(replayed_until);
        let mut position = match loaded {
            Some(cp) => Checkpoint {
                token: cp.token,
                cluster_time: cp.cluster_time,
                wall_time: cp.wall_time,
                ..Checkpoint::default()
            },
            None => Checkpoint::default(),
        };
        position.cluster_time = position.cluster_time.max(start_time);
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
        let health = self.ctx.metrics.health().clone();
        let mut pending: Option<Checkpoint> = None;
        let mut last_save = Instant::now() - sync.checkpoint_interval;
        let mut saved_once = false;
        // Stage overlap: while a batch is written, the next one (when the reader has it) is
        // taken from the channel and looked up in a task of its own; once the first is
        // acknowledged, those look-ups are corrected for what it wrote (see `Touched`).
        let mut ahead: Option<tokio::task::JoinHandle<AheadWork>> = None;
        // A message received while a batch was written, that is not a batch to look up.
        let mut carried: Option<ReaderMessage> = None;
        let mut reader_done = false;
        // What the batch written last changed, for correcting the look-ups made meanwhile, and
        // whether it landed as planned (then the plan made meanwhile stands).
        let mut touched: Option<Touched> = None;
        let mut landed = Landed::Otherwise;
        // A batch was abandoned in flight (stopping): the position is then not exact.
        let mut abandoned = false;
        // Every change up to `replayed_until` is applied (see the final save).
        let mut past_horizon = false;
        let result = loop {
            let (batch, prepared) = if let Some(task) = ahead.take() {
                match task.await {
                    Ok(AheadWork {
                        batch,
                        found,
                        planned,
                    }) => {
                        let before = touched.take();
                        let prepared = match (planned, found) {
                            (Some(planned), _)
                                if landed == Landed::AsPlanned && before.is_some() =>
                            {
                                self.ctx.metrics.planned_ahead(&self.name);
                                Ahead::Planned(planned)
                            }
                            (_, Some(found)) => match self
                                .refresh_looked_up(&batch.changes, novelty, found, before)
                                .await
                            {
                                Some(found) => Ahead::LookedUp(found),
                                None => Ahead::Nothing,
                            },
                            (_, None) => Ahead::Nothing,
                        };
                        (batch, prepared)
                    }
                    Err(e) => {
                        break Err(SyncError::TaskFailed(format!(
                            "the look-up task of `{}`: {e}",
                            self.name
                        )))
                    }
                }
            } else {
                let message = match carried.take() {
                    Some(m) => Some(m),
                    None if reader_done => None,
                    None => tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        m = rx.recv() => m,
                    },
                };
                match message {
                    None => break Ok(()),
                    Some(ReaderMessage::Failed(e)) => break Err(e),
                    Some(ReaderMessage::Batch(batch)) => (batch, Ahead::Nothing),
                }
            };
            touched = None;
            landed = Landed::Otherwise;
            if !batch.changes.is_empty() {
                let now = Turn::now();
                // What this batch plans to leave in staging, for planning the next one meanwhile.
                let (basis, basis_rx) = tokio::sync::oneshot::channel();
                let mut basis_rx = Some(basis_rx);
                let apply = self.apply_with_retry(
                    &batch.changes,
                    Origin::Stream,
                    novelty,
                    Overlap {
                        ahead: prepared,
                        basis: Some(basis),
                    },
                    &now,
                    shutdown,
                );
                tokio::pin!(apply);
                let applied = loop {
                    tokio::select! {
                        r = &mut apply => break r,
                        m = rx.recv(), if ahead.is_none() && carried.is_none() && !reader_done => match m {
                            Some(ReaderMessage::Batch(next)) if !next.changes.is_empty() => {
                                let pipeline = self.clone();
                                let basis = basis_rx.take();
                                ahead = Some(tokio::spawn(async move {
                                    pipeline.work_ahead(next, novelty, basis).await
                                }));
                            }
                            Some(other) => carried = Some(other),
                            None => reader_done = true,
                        },
                    }
                };
                match applied {
                    Ok(Some(report)) => {
                        touched = report.touched;
                        landed = report.landed;
                    }
                    // Stopping: this batch is abandoned, its position not saved.
                    Ok(None) => {
                        abandoned = true;
                        break Ok(());
                    }
                    Err(e) => break Err(e),
                }
            }
            // Applied, or an empty batch: the stream confirmed it is idle.
            health.progress(&self.name);
            // Caught up with production at a moment after `replayed_until` was read.
            past_horizon |= batch.position.present;
            position = position_checkpoint(&batch, &position);
            pending = Some(position.clone());
            if !saved_once || last_save.elapsed() >= sync.checkpoint_interval {
                if let Some(cp) = pending.take() {
                    if let Err(e) = self.save_checkpoint(&cp, shutdown).await {
                        break Err(e);
                    }
                    last_save = Instant::now();
                    saved_once = true;
                }
            }
            free_elsewhere(batch);
        };
        // A batch read ahead is abandoned with the run: its position was never saved.
        if let Some(task) = ahead.take() {
            task.abort();
        }
        health.stream_closed(
            &self.name,
            match &result {
                Ok(()) => "stopping",
                Err(_) => "the stream failed",
            },
        );
        // Dropping the receiver frees a reader blocked on a full channel (staging behind).
        drop(rx);
        reader_stop.cancel();
        let _ = reader.await;
        match result {
            Err(e) => Err(e),
            // A batch abandoned half-way may have written part of itself past the position:
            // the position is saved without a horizon.
            Ok(()) if abandoned => match pending {
                Some(cp) => self.save_checkpoint(&cp, shutdown).await.map(|_| ()),
                None => Ok(()),
            },
            // Stopped between batches: this run applied every change up to the position and
            // none after it, earlier runs none after `replayed_until` (a stream caught up with
            // the present has no change between the two), which the next run can rely on.
            Ok(()) => {
                let horizon = stop_horizon(position.cluster_time, replayed_until, past_horizon);
                if horizon.is_none() && pending.is_none() {
                    return Ok(());
                }
                let stopped = Checkpoint {
                    horizon,
                    ..position
                };
                self.save_checkpoint(&stopped, shutdown).await.map(|_| ())
            }
        }
    }
}

/// Which pass over a batch [`Pipeline::plan_and_write`] makes.
#[derive(Clone, Copy)]
enum Pass<'a> {
    /// The batch: the documents in `fresh` (new by `novelty`) are written without a look-up,
    /// and writes refused with a duplicate key are set aside for the second pass.
    First { fresh: &'a Fresh, novelty: Novelty },
    /// The changes set aside, alone, once the rest of the batch is written: everything is
    /// looked up, as for a possible replay, and a refusal is final.
    Second,
}

/// Frees `value` on a thread of its own. Freeing a batch's thousand documents takes about a
/// millisecond, and between two batches staging waits for every moment stagesync spends.
/// Not used for a plan: once [`crate::plan::Plan::take_final_documents`] took its documents a
/// stream batch's plan is small, and freeing a snapshot's plans elsewhere raised its peak RSS
/// by 15-23 MiB in A/B runs (memory freed by another thread is given back later) for no
/// measurable gain.
fn free_elsewhere<T: Send + 'static>(value: T) {
    tokio::task::spawn_blocking(move || drop(value));
}

/// [`Checkpoint::horizon`] at a clean stop: no run applied a change after it. This run applied
/// changes up to `position` only; earlier ones none after `replayed_until`. Without the
/// latter, only a stream that caught up with the present (`caught_up`: no change between the
/// two) can say it.
fn stop_horizon(
    position: Option<Timestamp>,
    replayed_until: Option<Timestamp>,
    caught_up: bool,
) -> Option<Timestamp> {
    let key = |t: &Timestamp| (t.time, t.increment);
    match (position, replayed_until) {
        (Some(p), Some(h)) => Some(std::cmp::max_by_key(p, h, key)),
        (None, h) => h,
        (p, None) if caught_up => p,
        (Some(_), None) => None,
    }
}

/// The checkpoint a fully applied batch allows: its position, and what `previous` knew for
/// what the batch does not say (a batch without changes carries no cluster time).
fn position_checkpoint(batch: &Batch, previous: &Checkpoint) -> Checkpoint {
    let p = &batch.position;
    Checkpoint {
        token: p
            .token
            .as_ref()
            .and_then(|t| mongodb::bson::to_bson(t).ok())
            .or_else(|| previous.token.clone()),
        cluster_time: p.cluster_time.max(previous.cluster_time),
        wall_time: p.wall_time.or(previous.wall_time),
        saved_at: None,
        snapshot: None,
        horizon: None,
    }
}

/// A staging write error as a dead-letter reason.
fn staging_code(code: i32, message: &str) -> String {
    match code {
        11000 => "key_collision".into(),
        121 => "validation_failed".into(),
        _ if crate::apply::is_size_error(code, message) => "document_too_large".into(),
        other => format!("staging_error_{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(time: u32) -> Timestamp {
        Timestamp { time, increment: 1 }
    }

    #[test]
    fn a_clean_stop_says_no_change_after_the_later_of_its_position_and_its_start_was_applied() {
        // Applied past the horizon it started with: its position.
        assert_eq!(stop_horizon(Some(ts(9)), Some(ts(5)), false), Some(ts(9)));
        // Saw no change after it (an idle stream, a stop right after opening): the horizon
        // it started with still holds, whether or not it caught up with the present.
        assert_eq!(stop_horizon(Some(ts(3)), Some(ts(5)), false), Some(ts(5)));
        assert_eq!(stop_horizon(None, Some(ts(5)), false), Some(ts(5)));
        // Production's time was unknown at the start: only a stream that caught up knows.
        assert_eq!(stop_horizon(Some(ts(3)), None, true), Some(ts(3)));
        assert_eq!(stop_horizon(Some(ts(3)), None, false), None);
        assert_eq!(stop_horizon(None, None, true), None);
    }
}
