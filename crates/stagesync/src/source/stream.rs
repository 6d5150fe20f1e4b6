//! Source stage, live part: reads one production collection's change stream into batches.
//!
//! A reader task per collection converts (and masks) events, groups them into batches that close
//! on size (`batch_max_events`) or age (`batch_max_wait_ms`), and hands them to the applier over a
//! bounded channel — so reading the next batch overlaps applying this one, and a slow staging
//! holds the reader back instead of filling memory.
//!
//! Every batch carries the resume position after its last event. When the stream is idle the
//! reader still sends empty batches with the newer post-batch token, so checkpoints keep up with
//! production's history and do not fall out of the oplog.

use std::time::{Duration, Instant};

use mongodb::bson::{DateTime, Document, Timestamp};
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::options::FullDocumentType;
use mongodb::Collection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::change::{convert, Change, Event};
use crate::error::{ErrorKind, SyncError};
use crate::metrics::{Metrics, Side};
use crate::retry::{classify, RetryPolicy, Wait};
use crate::transform::Masker;

/// Where a stream starts.
#[derive(Debug, Clone)]
pub enum StartAt {
    /// From a checkpoint.
    ResumeAfter(ResumeToken),
    /// After an `invalidate` event (a drop or rename in production).
    StartAfter(ResumeToken),
    /// At a production operation time (inclusive): the snapshot hand-off.
    Time(Timestamp),
    /// From now on.
    Now,
}

/// The stream position a batch reaches.
#[derive(Debug, Clone)]
pub struct Position {
    pub token: Option<ResumeToken>,
    pub cluster_time: Option<Timestamp>,
    pub wall_time: Option<DateTime>,
    /// The server had nothing more when the batch closed: every change made before that
    /// moment is in this batch or an earlier one.
    pub present: bool,
}

#[derive(Debug)]
pub struct Batch {
    pub changes: Vec<Change>,
    pub position: Position,
}

#[derive(Debug)]
pub enum ReaderMessage {
    Batch(Batch),
    /// The reader cannot go on: [`SyncError::HistoryLost`] when production no longer has the
    /// history to resume from (or refused the stored token), else an error no retry fixes.
    Failed(SyncError),
}

#[derive(Debug, Clone)]
pub struct ReaderSettings {
    pub batch_max_events: usize,
    pub batch_max_wait: Duration,
    /// How often an idle stream reports its newer position.
    pub idle_report: Duration,
    /// The collection's subset (`filter`), if any.
    pub filter: Option<crate::filter::Filter>,
}

/// Opens a change stream on `coll` with full documents looked up for updates; with a
/// `filter`, inserts outside the subset are dropped by the server ([`crate::filter`]).
pub async fn open(
    coll: &Collection<Document>,
    start: &StartAt,
    max_await: Duration,
    batch_size: u32,
    filter: Option<&crate::filter::Filter>,
) -> mongodb::error::Result<ChangeStream<ChangeStreamEvent<Document>>> {
    let pipeline: Vec<Document> = filter.map(|f| f.stream_stage()).into_iter().collect();
    let watch = coll
        .watch()
        .pipeline(pipeline)
        .full_document(FullDocumentType::UpdateLookup)
        .max_await_time(max_await)
        .batch_size(batch_size);
    match start {
        StartAt::ResumeAfter(t) => watch.resume_after(t.clone()).await,
        StartAt::StartAfter(t) => watch.start_after(t.clone()).await,
        StartAt::Time(ts) => watch.start_at_operation_time(*ts).await,
        StartAt::Now => watch.await,
    }
}

/// Reads `coll` from `start` until `shutdown`, sending batches to `tx`.
pub async fn read(
    coll: Collection<Document>,
    mut start: StartAt,
    masker: Masker,
    settings: ReaderSettings,
    tx: mpsc::Sender<ReaderMessage>,
    shutdown: CancellationToken,
    metrics: std::sync::Arc<Metrics>,
) {
    let name = coll.name().to_string();
    let history_lost = |detail: String| {
        ReaderMessage::Failed(SyncError::HistoryLost {
            collection: name.clone(),
            detail,
        })
    };
    let mut backoff = RetryPolicy::default().backoff();
    let mut outage: Option<Instant> = None;
    // Only the very first open may hit an unusable stored token; later reopens use tokens this
    // reader just received.
    let mut first_open = true;
    'reopen: loop {
        let mut stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = open(&coll, &start, settings.batch_max_wait, settings.batch_max_events as u32, settings.filter.as_ref()) => s,
        };
        let mut stream = match stream.as_mut() {
            Ok(_) => stream.expect("checked"),
            Err(e) => {
                let failure = classify(e);
                let from_checkpoint = first_open && matches!(start, StartAt::ResumeAfter(_));
                if failure == ErrorKind::HistoryLost
                    || (failure != ErrorKind::Transient && from_checkpoint)
                {
                    let _ = tx.send(history_lost(crate::retry::describe(e))).await;
                    return;
                }
                if failure != ErrorKind::Transient {
                    let e = SyncError::mongo(
                        format!("cannot open the change stream of `{name}`"),
                        e.clone(),
                    );
                    let _ = tx.send(ReaderMessage::Failed(e)).await;
                    return;
                }
                note_outage(&mut outage, &name, e, &metrics);
                if backoff.wait(&shutdown).await != Wait::Retry {
                    return;
                }
                continue 'reopen;
            }
        };
        first_open = false;
        metrics.health().stream_opened(&name);
        metrics.health().production_reachable();
        if let Some(since) = outage.take() {
            tracing::info!(collection = %name, after_secs = since.elapsed().as_secs(), "production change stream is back");
        }
        backoff.reset();
        // The first checkpoint is written as soon as the stream opens, before any change.
        let opened_at = Position {
            token: stream.resume_token(),
            cluster_time: None,
            wall_time: None,
            present: false,
        };
        if tx
            .send(ReaderMessage::Batch(Batch {
                changes: vec![],
                position: opened_at,
            }))
            .await
            .is_err()
        {
            return;
        }
        let mut changes: Vec<Change> = Vec::new();
        let mut position = Position {
            token: stream.resume_token(),
            cluster_time: None,
            wall_time: None,
            present: false,
        };
        let mut batch_started = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return, // the open batch is abandoned, never checkpointed
                n = stream.next_if_any() => n,
            };
            match next {
                Ok(Some(event)) => {
                    let token = event.id.clone();
                    let (cluster_time, wall_time) = (event.cluster_time, event.wall_time);
                    match convert(event, &masker, settings.filter.as_ref()) {
                        Event::Change(c) => {
                            if changes.is_empty() {
                                batch_started = Instant::now();
                            }
                            metrics.read(&name, c.op.as_str());
                            changes.push(*c);
                        }
                        Event::Ddl { op } => {
                            tracing::warn!(collection = %name, operation = %op, "production collection changed shape; staging data is kept as it is");
                            metrics.ddl_event(&name, &op);
                        }
                        Event::Ignored { op } => {
                            tracing::debug!(collection = %name, operation = %op, "event ignored")
                        }
                        Event::Invalidate => {
                            tracing::warn!(collection = %name, "change stream invalidated (collection dropped or renamed in production); reopening after it");
                            position = Position {
                                token: Some(token.clone()),
                                cluster_time,
                                wall_time,
                                present: false,
                            };
                            let batch = Batch {
                                changes: std::mem::take(&mut changes),
                                position: position.clone(),
                            };
                            if tx.send(ReaderMessage::Batch(batch)).await.is_err() {
                                return;
                            }
                            start = StartAt::StartAfter(token);
                            continue 'reopen;
                        }
                    }
                    position = Position {
                        token: Some(token),
                        cluster_time,
                        wall_time,
                        present: false,
                    };
                }
                Ok(None) => {
                    // The server had nothing more right now; the post-batch token moves on, and
                    // the position stands for this moment (so status shows no lag when idle).
                    if changes.is_empty() {
                        if let Some(t) = stream.resume_token() {
                            position.token = Some(t);
                            position.wall_time = Some(DateTime::now());
                        }
                    }
                    position.present = true;
                }
                Err(e) => {
                    if classify(&e) == ErrorKind::HistoryLost {
                        let _ = tx.send(history_lost(crate::retry::describe(&e))).await;
                        return;
                    }
                    // Send what was read (it is complete up to `position`), then reopen from there.
                    if !changes.is_empty() {
                        let batch = Batch {
                            changes: std::mem::take(&mut changes),
                            position: position.clone(),
                        };
                        if tx.send(ReaderMessage::Batch(batch)).await.is_err() {
                            return;
                        }
                    }
                    note_outage(&mut outage, &name, &e, &metrics);
                    if let Some(t) = position.token.clone() {
                        start = StartAt::ResumeAfter(t);
                    }
                    if backoff.wait(&shutdown).await != Wait::Retry {
                        return;
                    }
                    continue 'reopen;
                }
            }
            let full = changes.len() >= settings.batch_max_events;
            let aged = !changes.is_empty() && batch_started.elapsed() >= settings.batch_max_wait;
            let idle = changes.is_empty() && last_report.elapsed() >= settings.idle_report;
            if full || aged || idle {
                let batch = Batch {
                    changes: std::mem::take(&mut changes),
                    position: position.clone(),
                };
                if tx.send(ReaderMessage::Batch(batch)).await.is_err() {
                    return;
                }
                last_report = Instant::now();
            }
        }
    }
}

fn note_outage(
    outage: &mut Option<Instant>,
    name: &str,
    e: &mongodb::error::Error,
    metrics: &Metrics,
) {
    metrics.retry(Side::Production);
    metrics
        .health()
        .stream_closed(name, "production change stream unavailable");
    if outage.is_none() {
        *outage = Some(Instant::now());
        tracing::warn!(collection = %name, error = %crate::retry::describe(e), "production change stream unavailable; retrying with backoff until it is back");
    }
}
