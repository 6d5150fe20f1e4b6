//! Source stage, snapshot part: reads a production collection's current documents in `_id`
//! order, masked, in batches — the input of an initial snapshot — each batch stamped with the
//! production time it is known to reflect. `last_id` (where a resumed snapshot continues) is
//! the id as staging sees it: masked when a rule names `_id`.

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::{ClientSession, Collection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::change::Change;
use crate::error::{Result, SyncError};
use crate::retry::{RetryPolicy, Wait};
use crate::transform::Masker;

/// Reads `source` after `last_id` in `_id` order — only the documents `filter` matches, when
/// given — each document masked, sending batches of at most `batch_size` to `tx` until the end
/// or `shutdown`. A read broken by an outage is retried
/// after the last document read.
///
/// Each batch is one query, made after reading production's operation time `S` and causally
/// after it (a session read with `afterClusterTime: S`): its documents reflect every change up
/// to `S` at least, and are stamped with `S` (never less than `read_time`, where the change
/// stream takes over). So a change of a document that happened after the snapshot started but
/// before the document was read is recognised as already applied when the stream replays it:
/// stamped with `read_time` instead, a document read late (a long snapshot, or one continued
/// after a restart) had such changes applied once more on top of its newer state — an insert
/// matched by its old business key adopting or creating a second staging document, a key
/// collision with the copy of a document that took the key since.
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
    let batch_size = batch_size.max(1);
    let mut last_id = last_id;
    let mut backoff = RetryPolicy::default().backoff();
    let failed = |e: mongodb::error::Error| {
        SyncError::mongo(format!("reading production.{name} for the snapshot"), e)
    };
    // A resumed snapshot's position is a masked `_id` when a rule names `_id` (progress is
    // checkpointed as staging sees ids): find the production `_id` it stands for.
    if let Some(masked) = last_id.take_if(|_| masker.masks_id()) {
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
    let mut session: Option<ClientSession> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let read = read_batch(
            &source,
            &mut session,
            filter.as_ref(),
            last_id.as_ref(),
            batch_size,
        )
        .await;
        let (stamp, docs, more) = match read {
            Ok(r) => r,
            Err(e) => {
                // A new session after an outage (the old one may be tied to a dead server).
                session = None;
                let e = failed(e);
                if !e.is_transient() {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                tracing::warn!(collection = %name, error = %e, "production unavailable during the snapshot; retrying");
                if backoff.wait(&shutdown).await != Wait::Retry {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        let stamp = stamp.map_or(read_time, |s| s.max(read_time));
        let wall = DateTime::from_millis(i64::from(stamp.time) * 1000);
        let mut batch = Vec::with_capacity(docs.len());
        for doc in docs {
            // The raw `_id` stays in memory only, to read on after it.
            if let Some(raw_id) = doc.get("_id") {
                last_id = Some(raw_id.clone());
            }
            batch.extend(Change::from_production(doc, &masker, stamp, wall));
        }
        if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
            return;
        }
        if !more {
            return;
        }
    }
}

/// One batch: production's operation time, then (causally after it) up to `batch_size`
/// documents after `after` in `_id` order, and whether there may be more.
///
/// The read continues from `after` with an index seek, `{_id: {$gt: after}}` — which only
/// matches `_id`s of the same kind (numbers, strings, ObjectIds, …). When that kind is used
/// up, the documents whose `_id` kinds sort after it in BSON order are read next
/// (`{_id: {$type: [...]}}`, sorted by `_id`): a mixed-type collection is read in full, in
/// order, and each query still starts where the last one ended. (Seeking with the `min`
/// cursor option instead is read as a scan from the start on some servers: quadratic.)
async fn read_batch(
    source: &Collection<Document>,
    session: &mut Option<ClientSession>,
    filter: Option<&crate::filter::Filter>,
    after: Option<&Bson>,
    batch_size: usize,
) -> mongodb::error::Result<(Option<Timestamp>, Vec<Document>, bool)> {
    let session = match session {
        Some(s) => s,
        None => session.insert(
            source
                .client()
                .start_session()
                .causal_consistency(true)
                .await?,
        ),
    };
    // The session's operation time is the ping's: the finds below wait until they reflect it.
    source
        .client()
        .database(&source.namespace().db)
        .run_command(doc! { "ping": 1 })
        .session(&mut *session)
        .await?;
    let stamp = session.operation_time();
    let with_filter = |range: Document| match filter {
        Some(f) => f.and(range),
        None => range,
    };
    let mut docs: Vec<Document> = Vec::new();
    let mut ranges: Vec<Document> = match after {
        None => vec![doc! {}],
        Some(id) => {
            let mut r = vec![doc! { "_id": { "$gt": id.clone() } }];
            let later = later_id_types(id);
            if !later.is_empty() {
                r.push(doc! { "_id": { "$type": later } });
            }
            r
        }
    };
    ranges.reverse();
    while let Some(range) = ranges.pop() {
        let want = batch_size - docs.len();
        let mut cursor = source
            .find(with_filter(range))
            .sort(doc! { "_id": 1 })
            .limit(want as i64)
            .batch_size(want as u32)
            .session(&mut *session)
            .await?;
        let found: Vec<Document> = cursor.stream(&mut *session).try_collect().await?;
        docs.extend(found);
        if docs.len() >= batch_size {
            return Ok((stamp, docs, true));
        }
    }
    Ok((stamp, docs, false))
}

/// The `$type` codes of the `_id` kinds that sort after `id`'s kind in BSON comparison order
/// (MinKey, null, numbers, strings, objects, binary data, ObjectId, booleans, dates,
/// timestamps, regular expressions, MaxKey; arrays cannot be `_id`s).
fn later_id_types(id: &Bson) -> Vec<i32> {
    const ORDER: [&[i32]; 12] = [
        &[-1],             // minKey
        &[10, 6],          // null, undefined
        &[1, 16, 18, 19],  // double, int, long, decimal
        &[2, 14],          // string, symbol
        &[3],              // object
        &[5],              // binData
        &[7],              // objectId
        &[8],              // bool
        &[9],              // date
        &[17],             // timestamp
        &[11, 13, 15, 12], // regex, javascript, javascriptWithScope, dbPointer
        &[127],            // maxKey
    ];
    let rank = match id {
        Bson::MinKey => 0,
        Bson::Null | Bson::Undefined => 1,
        Bson::Double(_) | Bson::Int32(_) | Bson::Int64(_) | Bson::Decimal128(_) => 2,
        Bson::String(_) | Bson::Symbol(_) => 3,
        Bson::Document(_) | Bson::Array(_) => 4,
        Bson::Binary(_) => 5,
        Bson::ObjectId(_) => 6,
        Bson::Boolean(_) => 7,
        Bson::DateTime(_) => 8,
        Bson::Timestamp(_) => 9,
        Bson::RegularExpression(_)
        | Bson::JavaScriptCode(_)
        | Bson::JavaScriptCodeWithScope(_)
        | Bson::DbPointer(_) => 10,
        Bson::MaxKey => 11,
    };
    ORDER[rank + 1..]
        .iter()
        .flat_map(|g| g.iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_id_types_follow_bson_order() {
        assert_eq!(
            later_id_types(&Bson::ObjectId(mongodb::bson::oid::ObjectId::new()))[..2],
            [8, 9]
        );
        let after_numbers = later_id_types(&Bson::Int32(4));
        assert_eq!(after_numbers[..2], [2, 14]);
        assert!(
            !after_numbers.contains(&18),
            "the same kind (long) is read by $gt"
        );
        assert!(later_id_types(&Bson::MaxKey).is_empty());
    }
}
