//! Source stage, snapshot part: reads a production collection's current documents in `_id`
//! order, masked, in batches — the input of an initial snapshot. `last_id` (where a resumed
//! snapshot continues) is the id as staging sees it: masked when a rule names `_id`.

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::options::FindOptions;
use mongodb::Collection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::change::Change;
use crate::error::{Result, SyncError};
use crate::retry::{RetryPolicy, Wait};
use crate::transform::Masker;

/// Reads `source` after `last_id` in `_id` order — only the documents `filter` matches, when
/// given — each document masked and stamped with `read_time`, sending batches of `batch_size`
/// to `tx` until the end or `shutdown`. A cursor broken by an outage is reopened after the
/// last document read.
#[allow(clippy::too_many_arguments)]
pub async fn read_documents(
    source: Collection<Document>,
    masker: Masker,
    filter: Option<crate::filter::Filter>,
    read_time: Timestamp,
    last_id: Option<Bson>,
    batch_size: usize,
    tx: mpsc::Sender<Result<Vec<Change>>>,
    shutdown: CancellationToken,
) {
    let name = source.name().to_string();
    let mut last_id = last_id;
    let mut backoff = RetryPolicy::default().backoff();
    let wall = DateTime::from_millis(i64::from(read_time.time) * 1000);
    let failed = |e: mongodb::error::Error| {
        SyncError::mongo(format!("reading production.{name} for the snapshot"), e)
    };
    // A resumed snapshot's position is a masked `_id` when a rule names `_id` (progress is
    // checkpointed as staging sees ids): find the production `_id` it stands for.
    if let (true, Some(masked)) = (masker.masks_id(), last_id.take()) {
        loop {
            match crate::transform::ids::resume_after_masked(&source, &masker, &masked).await {
                Ok(Some(raw)) => last_id = Some(raw),
                Ok(None) => {
                    tracing::info!(collection = %name, "the snapshot's last copied document is gone from production; copying from the start again");
                }
                Err(e) => {
                    let e = failed(e);
                    if !e.is_transient() {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    tracing::warn!(collection = %name, error = %e, "production unavailable while resuming the snapshot; retrying");
                    if backoff.wait(&shutdown).await != Wait::Retry {
                        return;
                    }
                    continue;
                }
            }
            break;
        }
        backoff.reset();
    }
    'reopen: loop {
        let after = match &last_id {
            Some(id) => doc! { "_id": { "$gt": id.clone() } },
            None => doc! {},
        };
        let query = match &filter {
            Some(f) => f.and(after),
            None => after,
        };
        let options = FindOptions::builder()
            .sort(doc! { "_id": 1 })
            .batch_size(batch_size as u32)
            .build();
        let mut cursor = match source.find(query).with_options(options).await {
            Ok(c) => c,
            Err(e) => {
                let e = failed(e);
                if !e.is_transient() {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                tracing::warn!(collection = %name, error = %e, "production unavailable during the snapshot; retrying");
                if backoff.wait(&shutdown).await != Wait::Retry {
                    return;
                }
                continue 'reopen;
            }
        };
        backoff.reset();
        let mut batch = Vec::with_capacity(batch_size);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match cursor.try_next().await {
                Ok(Some(doc)) => {
                    // The raw `_id` stays in memory only, to reopen the cursor after it.
                    let raw_id = doc.get("_id").cloned();
                    if let Some(change) = Change::from_production(doc, &masker, read_time, wall) {
                        last_id = raw_id;
                        batch.push(change);
                    }
                    if batch.len() >= batch_size
                        && tx.send(Ok(std::mem::take(&mut batch))).await.is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {
                    if !batch.is_empty() {
                        let _ = tx.send(Ok(batch)).await;
                    }
                    return;
                }
                Err(e) => {
                    if !batch.is_empty() && tx.send(Ok(std::mem::take(&mut batch))).await.is_err() {
                        return;
                    }
                    let e = failed(e);
                    if !e.is_transient() {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    tracing::warn!(collection = %name, error = %e, "production cursor lost during the snapshot; reopening");
                    if backoff.wait(&shutdown).await != Wait::Retry {
                        return;
                    }
                    continue 'reopen;
                }
            }
        }
    }
}
