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
    // Where each batch ends: every `batch_size`-th `_id` after `last_id`, from one pass over
    // the `_id` index. Each batch is then a bounded range, which servers answer by reading that
    // range only; an open-ended `{_id: {$gt: x}}` with a limit is answered on some servers
    // (secantusd-rs) by materialising everything after `x` — quadratic over a snapshot.
    let bounds = loop {
        match batch_bounds(&source, filter.as_ref(), last_id.as_ref(), batch_size).await {
            Ok(b) => break b,
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
            }
        }
    };
    backoff.reset();
    let mut session: Option<ClientSession> = None;
    // The last range is open-ended: documents inserted after the pass are read too.
    let mut ranges = bounds.into_iter().map(Some).chain([None]);
    let mut upper = ranges.next().flatten();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let read = read_range(
            &source,
            &mut session,
            filter.as_ref(),
            last_id.as_ref(),
            upper.as_ref(),
        )
        .await;
        let (stamp, docs) = match read {
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
            batch.extend(Change::from_production(doc, &masker, stamp, wall));
        }
        if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
            return;
        }
        match upper.take() {
            // The range is read up to its bound (which may have been deleted meanwhile); the
            // raw `_id` stays in memory only.
            Some(bound) => {
                last_id = Some(bound);
                upper = ranges.next().flatten();
            }
            None => return,
        }
    }
}

/// Every `batch_size`-th `_id` after `after` (those `filter` matches), in `_id` order: the
/// upper bounds of the snapshot's batches.
async fn batch_bounds(
    source: &Collection<Document>,
    filter: Option<&crate::filter::Filter>,
    after: Option<&Bson>,
    batch_size: usize,
) -> mongodb::error::Result<Vec<Bson>> {
    let range = after_filter(after);
    let query = match filter {
        Some(f) => f.and(range),
        None => range,
    };
    let mut cursor = source
        .find(query)
        .projection(doc! { "_id": 1 })
        .sort(doc! { "_id": 1 })
        .batch_size(10_000)
        .await?;
    let mut bounds = Vec::new();
    let mut n = 0usize;
    while let Some(d) = cursor.try_next().await? {
        n += 1;
        if n.is_multiple_of(batch_size) {
            if let Some(id) = d.get("_id") {
                bounds.push(id.clone());
            }
        }
    }
    Ok(bounds)
}

/// `_id` after `after` in BSON order, across kinds: `$gt` within its kind (numbers, strings,
/// …: comparisons only match their own kind) or any kind sorting after it.
fn after_filter(after: Option<&Bson>) -> Document {
    match after {
        None => doc! {},
        Some(id) => {
            let later = later_id_types(id);
            if later.is_empty() {
                doc! { "_id": { "$gt": id.clone() } }
            } else {
                doc! { "$or": [ { "_id": { "$gt": id.clone() } }, { "_id": { "$type": later } } ] }
            }
        }
    }
}

/// `_id` up to `upto` (inclusive) in BSON order, across kinds.
fn upto_filter(upto: &Bson) -> Document {
    let earlier = earlier_id_types(upto);
    if earlier.is_empty() {
        doc! { "_id": { "$lte": upto.clone() } }
    } else {
        doc! { "$or": [ { "_id": { "$lte": upto.clone() } }, { "_id": { "$type": earlier } } ] }
    }
}

/// One batch: production's operation time, then (causally after it) the documents with an
/// `_id` after `after` and up to `upto` (to the end when `None`), in `_id` order.
///
/// Within one kind of `_id` the range is `{$gt: after, $lte: upto}`, read from the `_id` index
/// alone; a range that spans kinds (numbers, then strings, …) is the union of the end of the
/// first kind, the kinds between and the start of the last — rare, at most once per kind.
async fn read_range(
    source: &Collection<Document>,
    session: &mut Option<ClientSession>,
    filter: Option<&crate::filter::Filter>,
    after: Option<&Bson>,
    upto: Option<&Bson>,
) -> mongodb::error::Result<(Option<Timestamp>, Vec<Document>)> {
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
    // The session's operation time is the ping's: the find below waits until it reflects it.
    source
        .client()
        .database(&source.namespace().db)
        .run_command(doc! { "ping": 1 })
        .session(&mut *session)
        .await?;
    let stamp = session.operation_time();
    let range = match (after, upto) {
        (Some(a), Some(u)) if id_kind(a) == id_kind(u) => {
            doc! { "_id": { "$gt": a.clone(), "$lte": u.clone() } }
        }
        (a, Some(u)) => {
            let mut both = vec![upto_filter(u)];
            if a.is_some() {
                both.push(after_filter(a));
            }
            doc! { "$and": both }
        }
        (a, None) => after_filter(a),
    };
    let query = match filter {
        Some(f) => f.and(range),
        None => range,
    };
    let mut cursor = source
        .find(query)
        .sort(doc! { "_id": 1 })
        .session(&mut *session)
        .await?;
    let docs: Vec<Document> = cursor.stream(&mut *session).try_collect().await?;
    Ok((stamp, docs))
}

/// The `$type` codes of the `_id` kinds that sort before `id`'s kind in BSON order.
fn earlier_id_types(id: &Bson) -> Vec<i32> {
    ID_KINDS[..id_kind(id)]
        .iter()
        .flat_map(|g| g.iter().copied())
        .collect()
}

/// The `$type` codes of the kinds of `_id` in BSON comparison order: MinKey, null, numbers,
/// strings, objects, binary data, ObjectId, booleans, dates, timestamps, regular expressions
/// (and code), MaxKey. Arrays cannot be `_id`s.
const ID_KINDS: [&[i32]; 12] = [
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

/// The index of `id`'s kind in [`ID_KINDS`].
fn id_kind(id: &Bson) -> usize {
    match id {
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
    }
}

/// The `$type` codes of the `_id` kinds that sort after `id`'s kind in BSON order.
fn later_id_types(id: &Bson) -> Vec<i32> {
    ID_KINDS[id_kind(id) + 1..]
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
        assert_eq!(earlier_id_types(&Bson::from("a"))[..3], [-1, 10, 6]);
        assert!(earlier_id_types(&Bson::MinKey).is_empty());
    }
}
