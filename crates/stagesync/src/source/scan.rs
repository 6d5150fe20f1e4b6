//! Source stage, snapshot part: reads a production collection's current documents in `_id`
//! order, masked, in batches — the input of an initial snapshot — each batch stamped with the
//! production time it is known to reflect. `last_id` (where a resumed snapshot continues) is
//! the id as staging sees it: masked when a rule names `_id`.

use futures::TryStreamExt;
use mongodb::action::Action;
use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::{ClientSession, Collection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::change::Change;
use crate::error::{Result, SyncError};
use crate::retry::{Backoff, RetryPolicy, Wait};
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
                    let resuming = "while resuming the snapshot";
                    if !retry_after(failed(e), &name, resuming, &tx, &mut backoff, &shutdown).await
                    {
                        return;
                    }
                    continue;
                }
            }
            break;
        }
        backoff.reset();
    }
    // Where each batch ends: every `batch_size`-th `_id` of one pass over the `_id` index,
    // read as the copy goes. Each batch is then a bounded range, which servers answer by
    // reading that range only; an open-ended `{_id: {$gt: x}}` with a limit is answered on some
    // servers (secantusd-rs) by materialising everything after `x` — quadratic over a
    // snapshot. The first batch is read as soon as the pass names its bound, not after the
    // whole pass.
    let mut bounds = Bounds::new(filter.clone(), last_id.clone(), batch_size);
    let mut session: Option<ClientSession> = None;
    // The bound of a range whose read failed, read again after the wait.
    let mut retry: Option<Bson> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let bound = match retry.take() {
            Some(bound) => bound,
            None => match bounds.next(&source).await {
                Ok(Some(bound)) => bound,
                // The pass is over and every range up to its last `_id` is copied. A document
                // inserted since has an `_id` the pass did not see, and the change stream,
                // which starts before the copy, brings it.
                Ok(None) => return,
                Err(e) => {
                    if !retry_after(failed(e), &name, DURING, &tx, &mut backoff, &shutdown).await {
                        return;
                    }
                    continue;
                }
            },
        };
        // A first range starts at the first `_id` the pass saw, as an index range: documents
        // before it were inserted after the copy began, which the stream brings.
        let lower = match (&last_id, bounds.first()) {
            (Some(after), _) => Lower::After(after),
            (None, Some(first)) => Lower::From(first),
            (None, None) => Lower::Start,
        };
        let read = read_range(&source, &mut session, filter.as_ref(), lower, &bound).await;
        let (stamp, docs) = match read {
            Ok(r) => r,
            Err(e) => {
                // A new session after an outage (the old one may be tied to a dead server).
                session = None;
                retry = Some(bound);
                if !retry_after(failed(e), &name, DURING, &tx, &mut backoff, &shutdown).await {
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
        // The range is read up to its bound (which may have been deleted meanwhile); the raw
        // `_id` stays in memory only.
        last_id = Some(bound);
    }
}

const DURING: &str = "during the snapshot";

/// After a failed read of production: a lasting error goes to the copy and the reader stops
/// (false); a transient one is waited out with the backoff (true: read again), unless the
/// shutdown comes first. `when` completes "production unavailable …" in the log.
async fn retry_after(
    error: SyncError,
    collection: &str,
    when: &str,
    tx: &mpsc::Sender<Result<Vec<Change>>>,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> bool {
    if !error.is_transient() {
        let _ = tx.send(Err(error)).await;
        return false;
    }
    tracing::warn!(collection, error = %error, "production unavailable {when}; retrying");
    backoff.wait(shutdown).await == Wait::Retry
}

/// How many batches' worth of `_id`s the pass reads first, with a limit, before the rest.
///
/// Some servers (secantusd-rs) answer a projected, sorted query by sorting and projecting the
/// whole result before its first batch: seconds for a million documents, during which the copy
/// could not start. The same query with a limit answers in about the time of the sort, so the
/// pass reads a head of `HEAD_BATCHES` bounds that way and opens the rest (after the head's
/// last `_id`) in the background while the head's batches are copied. On servers that stream
/// from the `_id` index (MongoDB) both answer at once and the split costs one more query.
const HEAD_BATCHES: usize = 128;

/// The upper bounds of the snapshot's batches, in `_id` order: every `batch_size`-th `_id` of
/// one pass over the `_id` index (those `filter` matches) after where the copy stands, then the
/// last `_id` of the pass. The pass is read as the bounds are asked for, its head first (see
/// [`HEAD_BATCHES`]); broken by an outage, it is opened again after the last bound handed out.
struct Bounds {
    filter: Option<crate::filter::Filter>,
    batch_size: usize,
    /// The head's `_id`s not yet counted.
    head: std::collections::VecDeque<Bson>,
    /// The rest of the pass after the head, or that the pass is not open yet.
    rest: Rest,
    /// Where the pass (re)opens: after the last bound handed out; until the first, after the
    /// copy's position (`None`: at the start of the collection).
    after: Option<Bson>,
    /// `_id`s read since the last bound handed out, and the last of them.
    counted: usize,
    last_seen: Option<Bson>,
    /// The first `_id` of a pass opened at the start of the collection.
    first: Option<Bson>,
    done: bool,
}

/// The part of the pass after its head.
enum Rest {
    /// The pass is not open: its head is read first.
    Unopened,
    /// The head was the whole pass.
    None,
    /// Being opened by a task of its own, while the head is copied.
    Opening(OpenTask),
    Open(Box<mongodb::Cursor<Document>>),
}

/// A background open of the rest of the pass, aborted when dropped: the reader may stop at any
/// time, and no task of it may outlive it holding a production cursor (dropped at runtime
/// teardown, a cursor makes the driver panic).
struct OpenTask(tokio::task::JoinHandle<mongodb::error::Result<mongodb::Cursor<Document>>>);

impl Drop for OpenTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Bounds {
    fn new(
        filter: Option<crate::filter::Filter>,
        after: Option<Bson>,
        batch_size: usize,
    ) -> Bounds {
        Bounds {
            filter,
            batch_size,
            head: std::collections::VecDeque::new(),
            rest: Rest::Unopened,
            after,
            counted: 0,
            last_seen: None,
            first: None,
            done: false,
        }
    }

    /// The first `_id` of the collection, once the pass started there has read it.
    fn first(&self) -> Option<&Bson> {
        self.first.as_ref()
    }

    /// The next bound; `None` once the pass is over and its last `_id` handed out.
    async fn next(
        &mut self,
        source: &Collection<Document>,
    ) -> mongodb::error::Result<Option<Bson>> {
        if self.done {
            return Ok(None);
        }
        let result = self.read(source).await;
        if result.is_err() {
            // Opened again after the last bound handed out: the `_id`s counted since are read
            // once more.
            self.head.clear();
            self.rest = Rest::Unopened;
            self.counted = 0;
            self.last_seen = None;
        }
        result
    }

    async fn read(
        &mut self,
        source: &Collection<Document>,
    ) -> mongodb::error::Result<Option<Bson>> {
        while let Some(id) = self.next_id(source).await? {
            if self.first.is_none() && self.after.is_none() {
                self.first = Some(id.clone());
            }
            self.counted += 1;
            if self.counted == self.batch_size {
                self.counted = 0;
                self.last_seen = None;
                self.after = Some(id.clone());
                return Ok(Some(id));
            }
            self.last_seen = Some(id);
        }
        self.done = true;
        self.rest = Rest::None;
        Ok(self.last_seen.take())
    }

    /// The pass's next `_id`, opening it first if needed.
    async fn next_id(
        &mut self,
        source: &Collection<Document>,
    ) -> mongodb::error::Result<Option<Bson>> {
        if matches!(self.rest, Rest::Unopened) {
            self.open(source).await?;
        }
        if let Some(id) = self.head.pop_front() {
            return Ok(Some(id));
        }
        if let Rest::Opening(task) = &mut self.rest {
            let opened = (&mut task.0).await.map_err(|e| {
                mongodb::error::Error::custom(format!("opening the rest of the pass: {e}"))
            })??;
            self.rest = Rest::Open(Box::new(opened));
        }
        let Rest::Open(cursor) = &mut self.rest else {
            return Ok(None);
        };
        while let Some(d) = cursor.try_next().await? {
            if let Some(id) = d.get("_id") {
                return Ok(Some(id.clone()));
            }
        }
        Ok(None)
    }

    /// Reads the head of the pass after `after` and, when it is full, starts opening the rest.
    async fn open(&mut self, source: &Collection<Document>) -> mongodb::error::Result<()> {
        let head_len = HEAD_BATCHES.saturating_mul(self.batch_size);
        let limit = i64::try_from(head_len).unwrap_or(i64::MAX);
        let mut head = open_pass(
            source.clone(),
            self.pass_query(self.after.as_ref()),
            Some(limit),
        )
        .await?;
        let mut read = 0;
        while let Some(d) = head.try_next().await? {
            read += 1;
            if let Some(id) = d.get("_id") {
                self.head.push_back(id.clone());
            }
        }
        self.rest = match self.head.back() {
            Some(last) if read == head_len => {
                let rest = open_pass(source.clone(), self.pass_query(Some(last)), None);
                Rest::Opening(OpenTask(tokio::spawn(rest)))
            }
            _ => Rest::None,
        };
        Ok(())
    }

    /// The pass's query: the `_id`s after `after` that the filter matches.
    fn pass_query(&self, after: Option<&Bson>) -> Document {
        let range = after_filter(after);
        match &self.filter {
            Some(f) => f.and(range),
            None => range,
        }
    }
}

/// Opens the pass (or a part of it): the `_id`s `query` matches, in order, at most `limit`.
async fn open_pass(
    source: Collection<Document>,
    query: Document,
    limit: Option<i64>,
) -> mongodb::error::Result<mongodb::Cursor<Document>> {
    source
        .find(query)
        .projection(doc! { "_id": 1 })
        .sort(doc! { "_id": 1 })
        .batch_size(10_000)
        .optional(limit, |find, limit| find.limit(limit))
        .await
}

/// Where a snapshot range starts.
#[derive(Clone, Copy)]
enum Lower<'a> {
    /// At the start of the collection, in BSON order across kinds of `_id`.
    Start,
    /// At this `_id`, included.
    From(&'a Bson),
    /// After this `_id`.
    After(&'a Bson),
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
/// `_id` from `lower` up to `upto` (included), in `_id` order.
///
/// Within one kind of `_id` the range is `{$gt: after, $lte: upto}` (or `$gte` from a first
/// `_id`), read from the `_id` index alone; a range that spans kinds (numbers, then strings, …)
/// is the union of the end of the first kind, the kinds between and the start of the last —
/// rare, at most once per kind.
async fn read_range(
    source: &Collection<Document>,
    session: &mut Option<ClientSession>,
    filter: Option<&crate::filter::Filter>,
    lower: Lower<'_>,
    upto: &Bson,
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
    let range = match lower {
        Lower::After(a) if id_kind(a) == id_kind(upto) => {
            doc! { "_id": { "$gt": a.clone(), "$lte": upto.clone() } }
        }
        Lower::From(f) if id_kind(f) == id_kind(upto) => {
            doc! { "_id": { "$gte": f.clone(), "$lte": upto.clone() } }
        }
        Lower::After(a) => doc! { "$and": [upto_filter(upto), after_filter(Some(a))] },
        Lower::From(_) | Lower::Start => upto_filter(upto),
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
