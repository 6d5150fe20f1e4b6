//! Initial snapshot: copies a production collection into staging, then hands off to the change
//! stream without a gap.
//!
//! 1. Read production's operation time `T` *before* copying.
//! 2. Copy every document in `_id` order through the same path as live changes (masking,
//!    business-key adoption, merge, metadata), each batch stamped with the production time it
//!    was read at (`S ≥ T`, see [`scan::read_documents`]). Progress (last `_id`) is
//!    checkpointed, so a killed snapshot continues where it stopped. A first copy into a
//!    collection holding nothing from production writes without looking documents up first
//!    (staging's unique indexes catch the ones to adopt: `plan::fresh_inserts`).
//! 3. Soft-delete staging documents that came from production but whose source is gone
//!    (unless `--no-prune`); staging-only documents are never touched.
//! 4. The change stream starts *at* `T`, so no change made during the copy is missed: one the
//!    copy of its document already reflects (made before `S`) is skipped by the order rule, one
//!    made after it is applied. A snapshot continued after a restart reads the rest of the
//!    collection much later than `T`; the stamps keep the stream's replay of everything since
//!    `T` from applying old changes on top of those newer copies.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::Checkpoint;
use crate::error::{MongoContext, Result, SyncError};
use crate::pipeline::{BatchReport, Blind, Origin, Overlap, Pipeline, Turn};
use crate::plan::Novelty;
use crate::source::change::Change;
use crate::source::scan;

/// Copies one collection. Returns the operation time the change stream must start at, or `None`
/// when stopped part-way (progress is saved; the next run continues).
pub async fn snapshot_collection(
    cs: &Pipeline,
    shutdown: &CancellationToken,
    prune: bool,
) -> Result<Option<Timestamp>> {
    // The semaphore is never closed, so acquiring only waits for a free slot.
    let _slot = cs.context().snapshot_slots.clone().acquire_owned().await;
    let Some(previous) = cs.load_checkpoint(shutdown).await? else {
        return Ok(None);
    };
    let (read_time, mut last_id, mut copied) = match previous.snapshot.as_ref() {
        Some(s) if s.get_timestamp("readTime").is_ok() => (
            s.get_timestamp("readTime").expect("checked"),
            s.get("lastId").cloned().filter(|v| *v != Bson::Null),
            s.get_i64("copied").unwrap_or(0) as u64,
        ),
        _ => (cs.context().production_time().await?, None, 0),
    };
    if last_id.is_some() {
        tracing::info!(collection = %cs.name, copied, "continuing an interrupted snapshot");
    }
    // A first copy into a staging collection that holds nothing from production writes its
    // documents without looking each one up first (see `plan::fresh_inserts`); a continued
    // snapshot, or one into a collection synced before, looks every document up.
    let mut novelty = if last_id.is_none() && !holds_synced_documents(cs).await {
        Novelty::Everything
    } else {
        Novelty::Unknown
    };
    // Staging's unique indexes, which tell when a blind batch may be written beside the one
    // before it (`Turn::beside`).
    let unique = match novelty {
        Novelty::Everything => Some(Arc::new(crate::apply::unique_indexes(&cs.staging).await)),
        _ => None,
    };
    save_progress(cs, read_time, &last_id, copied, shutdown).await?;
    // The total is for the progress bar and log only, and some servers count the documents to
    // estimate it (a third of a second per 300 000 on secantusd-rs): the copy does not wait.
    let mut estimate = Some({
        let source = cs.source.clone();
        tokio::spawn(async move { source.estimated_document_count().await })
    });
    let mut progress = Progress::new(&cs.name, copied);
    let health = cs.context().metrics.health().clone();
    health.snapshot_started(&cs.name);

    let (tx, mut rx) = mpsc::channel::<Result<Vec<Change>>>(2);
    let reader = tokio::spawn(scan::read_documents(
        cs.source.clone(),
        cs.masker.clone(),
        cs.rules.filter.clone(),
        read_time,
        last_id.clone(),
        cs.context().config.sync.snapshot_batch_size,
        tx,
        shutdown.clone(),
    ));
    let mut stopped = false;
    let mut failure = None;
    let mut reader_failure = None;
    let mut reader_done = false;
    // Two batches at a time: the one being written and the next, planned meanwhile. The next
    // waits for its turn before it reads or writes staging (`Turn`), so staging still sees the
    // batches one after the other; with nothing to look up, the planning is what overlaps —
    // and, in a first copy, the blind inserts of two batches whose keys are apart.
    let mut copying: VecDeque<Copying> = VecDeque::with_capacity(2);
    loop {
        if copying.len() < 2 && !reader_done {
            match rx.recv().await {
                Some(Ok(changes)) => {
                    let turn = copying.back().map_or_else(Turn::now, Copying::turn);
                    // Only while every document is new: a batch looked up waits its turn anyway.
                    let (turn, says) = match &unique {
                        Some(indexes) if novelty == Novelty::Everything => {
                            let before = copying.back().and_then(|c| c.says.clone());
                            let (turn, says) = turn.beside(indexes.clone(), before);
                            (turn, Some(says))
                        }
                        _ => (turn, None),
                    };
                    copying.push_back(Copying::start(cs, changes, novelty, turn, says, shutdown));
                    continue;
                }
                Some(Err(e)) => {
                    reader_failure = Some(e);
                    reader_done = true;
                }
                None => reader_done = true,
            }
        }
        let Some(oldest) = copying.pop_front() else {
            break;
        };
        let (count, batch_last_id) = (oldest.count, oldest.last_id.clone());
        match oldest.finish().await {
            Ok(Some(report)) => {
                // Most keys already held (staging restored from a dump, say): each blind insert
                // would be refused and looked up after all, so look up first from here on.
                if novelty == Novelty::Everything && report.looked_up_again * 2 > count {
                    tracing::info!(collection = %cs.name, "staging already holds the business keys of most documents copied; looking every document up from here on");
                    novelty = Novelty::Unknown;
                }
            }
            Ok(None) => {
                stopped = true;
                break;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        copied += count as u64;
        last_id = batch_last_id;
        if let Some(total) = estimate.take_if(|t| t.is_finished()) {
            if let Ok(Ok(total)) = total.await {
                progress.set_total(total);
            }
        }
        progress.set(copied);
        health.snapshot_progress(&cs.name);
        if let Err(e) = save_progress(cs, read_time, &last_id, copied, shutdown).await {
            failure = Some(e);
            break;
        }
    }
    // A batch still queued behind one that was not written writes nothing (its turn never
    // comes); stop it now.
    for c in copying {
        c.abandon().await;
    }
    if failure.is_none() {
        failure = reader_failure;
    }
    // Stop the reader and wait until it is gone: its production cursor must be closed while
    // the client is still open (a cursor dropped at runtime teardown makes the driver panic).
    drop(rx);
    reader.abort();
    let _ = reader.await;
    if let Some(estimate) = estimate {
        estimate.abort();
        let _ = estimate.await;
    }
    health.snapshot_finished(&cs.name);
    if let Some(e) = failure {
        progress.abandon();
        return Err(e);
    }
    if stopped || shutdown.is_cancelled() {
        progress.abandon();
        return Ok(None);
    }
    progress.finish();
    let pruned = if prune {
        prune_stale(cs, read_time, shutdown).await?
    } else {
        0
    };
    tracing::info!(collection = %cs.name, copied, pruned, "snapshot complete; the change stream continues from the snapshot's start");
    // The stream takes over at the read time; its first checkpoint replaces this one.
    let handoff = Checkpoint {
        cluster_time: Some(read_time),
        ..Checkpoint::default()
    };
    cs.save_checkpoint(&handoff, shutdown).await?;
    Ok(Some(read_time))
}

/// One batch of copies, applied in a task of its own (see the loop in [`snapshot_collection`]).
struct Copying {
    task: tokio::task::JoinHandle<Result<Option<BatchReport>>>,
    /// Set once the batch is written, for the batch after it.
    done: watch::Receiver<bool>,
    count: usize,
    last_id: Option<Bson>,
    /// What the batch inserts blind, once planned (see `Turn::beside`).
    says: Option<watch::Receiver<Blind>>,
}

impl Copying {
    fn start(
        cs: &Pipeline,
        changes: Vec<Change>,
        novelty: Novelty,
        turn: Turn,
        says: Option<watch::Receiver<Blind>>,
        shutdown: &CancellationToken,
    ) -> Copying {
        let (done_tx, done) = watch::channel(false);
        let count = changes.len();
        let last_id = changes.last().map(|c| c.prod_id.clone());
        let cs = cs.clone();
        let shutdown = shutdown.clone();
        let task = tokio::spawn(async move {
            let report = cs
                .apply_with_retry(
                    &changes,
                    Origin::Snapshot,
                    novelty,
                    Overlap::none(),
                    &turn,
                    &shutdown,
                )
                .await;
            if matches!(report, Ok(Some(_))) {
                let _ = done_tx.send(true);
            }
            report
        });
        Copying {
            task,
            done,
            count,
            last_id,
            says,
        }
    }

    /// The turn of the batch after this one.
    fn turn(&self) -> Turn {
        Turn::after(self.done.clone())
    }

    async fn finish(self) -> Result<Option<BatchReport>> {
        match self.task.await {
            Ok(report) => report,
            Err(e) => Err(SyncError::TaskFailed(format!("a snapshot batch: {e}"))),
        }
    }

    async fn abandon(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Whether any staging document records a production `_id` (a look-up error counts as yes:
/// looking everything up is always correct, only slower).
async fn holds_synced_documents(cs: &Pipeline) -> bool {
    let found = cs
        .staging
        .find_one(doc! { cs.rules.meta_path("id"): { "$exists": true } })
        .projection(doc! { "_id": 1 })
        .await;
    match found {
        Ok(found) => found.is_some(),
        Err(e) => {
            tracing::debug!(collection = %cs.name, error = %e, "could not tell whether staging holds synced documents; looking every document up");
            true
        }
    }
}

async fn save_progress(
    cs: &Pipeline,
    read_time: Timestamp,
    last_id: &Option<Bson>,
    copied: u64,
    shutdown: &CancellationToken,
) -> Result<()> {
    let cp = Checkpoint {
        snapshot: Some(doc! {
            "readTime": read_time,
            "lastId": last_id.clone().unwrap_or(Bson::Null),
            "copied": copied as i64,
        }),
        ..Checkpoint::default()
    };
    cs.save_checkpoint(&cp, shutdown).await.map(|_| ())
}

/// Deletes (per `deletes`) the staging documents from production whose source no longer exists
/// (or, with a `filter`, no longer belongs to the subset).
/// Candidates are documents the copy did not stamp (`ts` older than the read time; every copy
/// is stamped at or after it) and not
/// soft-deleted yet; each is checked against production before anything is written.
async fn prune_stale(
    cs: &Pipeline,
    read_time: Timestamp,
    shutdown: &CancellationToken,
) -> Result<u64> {
    let rules = &cs.rules;
    let filter = doc! {
        rules.meta_path("id"): { "$exists": true },
        rules.meta_path("ts"): { "$lt": read_time },
        &rules.soft_delete_field: { "$ne": true },
    };
    let projection = doc! { rules.meta_path("id"): 1 };
    let what = || {
        format!(
            "finding staging.{} documents whose source may be gone",
            cs.target
        )
    };
    let candidates: Vec<Document> = cs
        .staging
        .find(filter)
        .projection(projection)
        .await
        .with_context(what)?
        .try_collect()
        .await
        .with_context(what)?;
    let ids: Vec<Bson> = candidates
        .iter()
        .filter_map(|d| {
            crate::plan::meta_of(d, &rules.meta_field)
                .and_then(|m| m.get("id"))
                .cloned()
        })
        .collect();
    let mut pruned = 0;
    let checking = || {
        format!(
            "checking which production.{} documents still exist",
            cs.name
        )
    };
    // With a masked `_id`, staging holds masked ids only: production's ids are read once and
    // masked to find which candidates still exist (see `transform::ids`).
    let still_there = if cs.masker.masks_id() {
        Some(
            crate::transform::ids::find_raw_ids(
                &cs.source,
                &cs.masker,
                &ids,
                rules.filter.as_ref(),
            )
            .await
            .with_context(checking)?,
        )
    } else {
        None
    };
    for chunk in ids.chunks(1000) {
        let present: std::collections::HashSet<Vec<u8>> = match &still_there {
            Some(raw) => chunk
                .iter()
                .filter(|id| raw.contains(id))
                .map(crate::plan::canonical)
                .collect(),
            None => cs
                .source
                .find(rules.in_subset(doc! { "_id": { "$in": chunk.to_vec() } }))
                .projection(doc! { "_id": 1 })
                .await
                .with_context(checking)?
                .try_collect::<Vec<Document>>()
                .await
                .with_context(checking)?
                .iter()
                .filter_map(|d| d.get("_id").map(crate::plan::canonical))
                .collect(),
        };
        let gone: Vec<Change> = chunk
            .iter()
            .filter(|id| !present.contains(&crate::plan::canonical(id)))
            .map(|id| Change::delete(id.clone(), read_time, Some(DateTime::now())))
            .collect();
        if gone.is_empty() {
            continue;
        }
        match cs
            .apply_with_retry(
                &gone,
                Origin::Snapshot,
                Novelty::Unknown,
                Overlap::none(),
                &Turn::now(),
                shutdown,
            )
            .await?
        {
            Some(report) => pruned += report.applied as u64,
            None => break,
        }
    }
    Ok(pruned)
}

/// A progress bar on a terminal; a log line every few seconds otherwise.
struct Progress {
    name: String,
    bar: Option<ProgressBar>,
    /// Production's estimate, once known (0 until then).
    total: u64,
    started: Instant,
    last_log: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(name: &str, done: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(done);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>16} [{bar:30}] {pos}/{len} docs {per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(name.to_string());
            bar.set_position(done);
            bar
        });
        Progress {
            name: name.to_string(),
            bar,
            total: 0,
            started: Instant::now(),
            last_log: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Some(bar) = &self.bar {
            bar.set_length(total.max(bar.position()));
        }
    }

    fn set(&self, done: u64) {
        if let Some(bar) = &self.bar {
            if done > bar.length().unwrap_or(0) {
                bar.set_length(done);
            }
            bar.set_position(done);
            return;
        }
        let mut last = self.last_log.lock().expect("not poisoned");
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(collection = %self.name, copied = done, estimated_total = self.total, docs_per_sec = rate as u64, "snapshot in progress");
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }

    fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
