//! Apply stage: turns a batch's planned writes into a few bulk commands on staging.
//!
//! It uses the classic `insert` / `update` / `delete` commands with many statements each, which
//! every MongoDB version (and every wire-compatible server) supports, rather than `bulkWrite`
//! (8.0+); inserts go through the driver's `insert_many`, so their documents travel as a
//! document sequence (see `Applier::insert_chunk`). Statements are unordered: the planner
//! emits at most one write per staging document, so no two statements of a batch depend on
//! each other, and chunks run concurrently.

pub mod unique;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use mongodb::bson::{doc, Bson, Document, RawArrayBuf, RawDocumentBuf, Timestamp};
use mongodb::Database;

use crate::config::WriteConcernSetting;
use crate::error::{Result, SyncError};
use crate::plan::{canonical, PlannedWrite, Rules, WriteOp};
use crate::retry::{command_code, DUPLICATE_KEY, WRITE_CONCERN_UNSATISFIABLE};
use crate::source::change::Change;

/// Largest number of statements in one command, and a soft cap on its size. (1000, a default
/// batch in one command per kind of write, was no faster: docs/BENCHMARKS.md, note 10.)
const MAX_STATEMENTS: usize = 500;
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;
/// `maxBsonObjectSize` when staging does not say (every MongoDB since 1.8: 16 MiB).
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;
/// `BSONObjectTooLarge`: the code a write refused for its size carries.
pub const DOCUMENT_TOO_LARGE: i32 = 10334;
/// `BadValue`: the code of a write refused because BSON cannot encode it.
pub const BAD_VALUE: i32 = 2;
/// Chunk size under `max_writes_per_second`: the token bucket's largest burst.
const RATE_LIMITED_CHUNK: u32 = 100;

/// What became of one planned write.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResult {
    Done,
    /// Refused by staging for this document only (duplicate key, validation, too large, ...).
    Refused {
        code: i32,
        message: String,
    },
}

impl WriteResult {
    pub fn is_duplicate_key(&self) -> bool {
        matches!(self, WriteResult::Refused { code, .. } if *code == DUPLICATE_KEY)
    }
}

/// True for a server error about a document's (or a command's) size: `BSONObjectTooLarge`,
/// "resulting document after update is larger than …", and the like.
pub fn is_size_error(code: i32, message: &str) -> bool {
    if matches!(code, DOCUMENT_TOO_LARGE | 17419 | 17420 | 13134) {
        return true;
    }
    let m = message.to_ascii_lowercase();
    m.contains("too large") || m.contains("larger than") || m.contains("exceeds maximum")
}

/// What [`Applier::send`] did.
#[derive(Debug)]
pub struct Sent {
    /// One per write.
    pub results: Vec<WriteResult>,
    /// Updates and deletes staging took but that found no document: one whose `_sync.ts` guard
    /// held (staging's copy is as new as the change: a replay, or another writer got there
    /// first), or one that is gone. Not an error; it only says staging is not as planned.
    pub missed: usize,
}

/// What one command did: a result per statement it carried, and how many of its updates or
/// deletes found no document (see [`Sent::missed`]).
struct Chunk {
    results: Vec<(usize, WriteResult)>,
    missed: usize,
}

/// A batch's writes encoded and grouped into commands, not sent yet ([`Applier::encode`]).
pub struct Encoded {
    /// One per write: `Done` until sent, or the write's refusal when it cannot be sent.
    results: Vec<WriteResult>,
    /// One per write: the statement its command carries (`None` when refused).
    statements: Vec<Option<RawDocumentBuf>>,
    /// Indices of the statements each command carries.
    chunks: Vec<Vec<usize>>,
}

/// Writes to one staging collection.
#[derive(Clone)]
pub struct Applier {
    db: Database,
    collection: String,
    /// `writeConcern` of every command, encoded once.
    write_concern: RawDocumentBuf,
    /// The same for the driver's `insert_many` ([`Applier::insert_chunk`]).
    driver_write_concern: mongodb::options::WriteConcern,
    write_concern_setting: WriteConcernSetting,
    concurrency: usize,
    limiter: Option<Arc<WriteLimiter>>,
    /// Staging's `maxBsonObjectSize`, asked once (`hello`).
    max_document_bytes: Arc<tokio::sync::OnceCell<usize>>,
    /// The per-document metadata field (`_sync`), whose `ts` guards every update.
    meta_field: String,
}

impl Applier {
    pub fn new(
        db: Database,
        collection: &str,
        write_concern: &WriteConcernSetting,
        concurrency: usize,
        limiter: Option<Arc<WriteLimiter>>,
        meta_field: &str,
    ) -> Applier {
        Applier {
            meta_field: meta_field.to_string(),
            db,
            collection: collection.to_string(),
            write_concern: raw_write_concern(write_concern),
            driver_write_concern: self::write_concern(write_concern),
            write_concern_setting: write_concern.clone(),
            concurrency: concurrency.max(1),
            limiter,
            max_document_bytes: Arc::default(),
        }
    }

    /// Staging's largest document (`maxBsonObjectSize` from `hello`, asked once; 16 MiB when
    /// it cannot be asked).
    pub async fn max_document_bytes(&self) -> usize {
        let ask = || async {
            let hello = self.db.run_command(doc! { "hello": 1 }).await?;
            Ok::<usize, mongodb::error::Error>(
                hello
                    .get_i32("maxBsonObjectSize")
                    .ok()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .unwrap_or(DEFAULT_MAX_DOCUMENT_BYTES),
            )
        };
        match self.max_document_bytes.get_or_try_init(ask).await {
            Ok(n) => *n,
            Err(_) => DEFAULT_MAX_DOCUMENT_BYTES,
        }
    }

    /// Writes everything; one result per write, in order. `Err` only for failures of the whole
    /// request (network, staging down, write concern not satisfied): the caller retries the batch.
    ///
    /// A write that cannot fit in a staging document is refused here, before anything is sent
    /// ([`DOCUMENT_TOO_LARGE`]); a command that fails as a whole because of the size of what
    /// it carries is split until the one write responsible is refused alone — so one oversized
    /// change never fails (and stalls) the others.
    ///
    /// `guards[i]` is the cluster time of the newest change write `i` carries: updates and
    /// deletes then only touch a staging document whose `_sync.ts` is older (or absent) — a
    /// compare-and-set that keeps a stale writer (a paused process, a second owner, a replay)
    /// from replacing newer state. Inserts are guarded by the unique indexes.
    pub async fn apply(
        &self,
        writes: &[PlannedWrite],
        guards: &[Option<Timestamp>],
    ) -> Result<Vec<WriteResult>> {
        self.apply_with_names(writes, guards, &LiteralNames::default())
            .await
    }

    /// [`Applier::apply`], for writes that may touch top-level field names `$set` and `$unset`
    /// cannot address (see [`LiteralNames`]).
    pub async fn apply_with_names(
        &self,
        writes: &[PlannedWrite],
        guards: &[Option<Timestamp>],
        names: &LiteralNames,
    ) -> Result<Vec<WriteResult>> {
        let encoded = self.encode(writes, guards, names).await;
        Ok(self.send(writes, encoded).await?.results)
    }

    /// The first half of [`Applier::apply_with_names`]: every write encoded as the statement
    /// its command carries, and grouped into commands. Nothing is sent, so a batch can do
    /// this while the batch before it is still being written.
    pub async fn encode(
        &self,
        writes: &[PlannedWrite],
        guards: &[Option<Timestamp>],
        names: &LiteralNames,
    ) -> Encoded {
        let max = self.max_document_bytes().await;
        let mut results = vec![WriteResult::Done; writes.len()];
        let mut statements = Vec::with_capacity(writes.len());
        for (i, w) in writes.iter().enumerate() {
            let guard = guards.get(i).copied().flatten();
            match self.statement(w, guard, names, max) {
                Ok(s) => statements.push(Some(s)),
                Err(refused) => {
                    results[i] = refused;
                    statements.push(None);
                }
            }
        }
        let chunks = chunks(writes, &statements, self.limiter.as_ref().map(|l| l.burst));
        Encoded {
            results,
            statements,
            chunks,
        }
    }

    /// The second half of [`Applier::apply_with_names`]: sends the commands of
    /// [`Applier::encode`] (made from the same `writes`), `apply_concurrency` at a time.
    pub async fn send(&self, writes: &[PlannedWrite], encoded: Encoded) -> Result<Sent> {
        let Encoded {
            mut results,
            statements,
            chunks,
        } = encoded;
        let outcomes: Vec<Result<Chunk>> = stream::iter(chunks)
            .map(|chunk| self.run_chunk_or_split(writes, &statements, chunk))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut missed = 0;
        for outcome in outcomes {
            let chunk = outcome?;
            missed += chunk.missed;
            for (i, r) in chunk.results {
                results[i] = r;
            }
        }
        Ok(Sent { results, missed })
    }

    /// [`Applier::run_chunk`]; when the whole command fails for a size reason, the halves are
    /// tried on their own, down to single writes, which are then refused.
    fn run_chunk_or_split<'a>(
        &'a self,
        writes: &'a [PlannedWrite],
        statements: &'a [Option<RawDocumentBuf>],
        chunk: Vec<usize>,
    ) -> futures::future::BoxFuture<'a, Result<Chunk>> {
        Box::pin(async move {
            let error = match self.run_chunk(writes, statements, &chunk).await {
                Ok(done) => return Ok(done),
                Err(e) => e,
            };
            let size_failure = match &error {
                SyncError::Mongo { error: e, .. } => match e.kind.as_ref() {
                    mongodb::error::ErrorKind::Command(c) => is_size_error(c.code, &c.message),
                    mongodb::error::ErrorKind::InvalidArgument { message, .. } => {
                        is_size_error(0, message)
                    }
                    _ => false,
                },
                _ => false,
            };
            if !size_failure {
                return Err(error);
            }
            if chunk.len() == 1 {
                let message = match &error {
                    SyncError::Mongo { error: e, .. } => crate::retry::describe(e),
                    other => other.to_string(),
                };
                return Ok(Chunk {
                    results: vec![(
                        chunk[0],
                        WriteResult::Refused {
                            code: DOCUMENT_TOO_LARGE,
                            message,
                        },
                    )],
                    missed: 0,
                });
            }
            let (left, right) = chunk.split_at(chunk.len() / 2);
            let mut done = self
                .run_chunk_or_split(writes, statements, left.to_vec())
                .await?;
            let right = self
                .run_chunk_or_split(writes, statements, right.to_vec())
                .await?;
            done.results.extend(right.results);
            done.missed += right.missed;
            Ok(done)
        })
    }

    /// The statement a write becomes in its command (the document of an `insert`, the
    /// `{q, u}` of an `update`, the `{q, limit}` of a `delete`), encoded once: its exact size
    /// decides the chunks, and the command copies its bytes instead of cloning the document.
    /// `Err` is the write's own refusal: a document staging cannot hold or BSON cannot encode.
    fn statement(
        &self,
        write: &PlannedWrite,
        guard: Option<Timestamp>,
        names: &LiteralNames,
        max: usize,
    ) -> std::result::Result<RawDocumentBuf, WriteResult> {
        match &write.op {
            WriteOp::Insert(d) => {
                let raw = encode(d, "the document")?;
                refuse_if_too_large("the document", raw.as_bytes().len(), max)?;
                Ok(raw)
            }
            WriteOp::Update { id, set, unset } => {
                let new_values = encode(set, "the update's new values")?;
                // The document the update produces holds all of `$set`.
                refuse_if_too_large("the update's new values", new_values.as_bytes().len(), max)?;
                let literal = names.of(write, id);
                if needs_pipeline(set, unset, &literal) {
                    let q = self.guarded(id, guard);
                    let u = pipeline_update(set, unset, &literal);
                    return encode(&doc! { "q": q, "u": u, "upsert": false }, "the update");
                }
                let q = encode(&self.guarded(id, guard), "the update's filter")?;
                let mut u = RawDocumentBuf::new();
                if !set.is_empty() {
                    u.append("$set", new_values);
                }
                if !unset.is_empty() {
                    u.append("$unset", encode(unset, "the update's removed fields")?);
                }
                let mut statement = RawDocumentBuf::new();
                statement.append("q", q);
                statement.append("u", u);
                statement.append("upsert", false);
                Ok(statement)
            }
            WriteOp::Delete { id } => {
                let q = encode(&self.guarded(id, guard), "the delete's filter")?;
                let mut statement = RawDocumentBuf::new();
                statement.append("q", q);
                statement.append("limit", 1);
                Ok(statement)
            }
        }
    }

    /// The filter of an update or delete: by `_id`, and only while staging's copy is older
    /// than the change being written.
    fn guarded(&self, id: &Bson, guard: Option<Timestamp>) -> Document {
        let mut q = doc! { "_id": id.clone() };
        if let Some(ts) = guard {
            // "Older than ts, or absent" as one predicate: `$not: {$gte}` also matches a
            // missing field, and a top-level `$or` would keep some servers from using the
            // `_id` index for the statement.
            q.insert(
                format!("{}.ts", self.meta_field),
                doc! { "$not": { "$gte": ts } },
            );
        }
        q
    }

    async fn run_chunk(
        &self,
        writes: &[PlannedWrite],
        statements: &[Option<RawDocumentBuf>],
        chunk: &[usize],
    ) -> Result<Chunk> {
        if let Some(l) = &self.limiter {
            if let Some(n) = NonZeroU32::new(chunk.len() as u32) {
                // `until_n_ready` only fails when n exceeds the burst, which chunking prevents.
                let _ = l.bucket.until_n_ready(n).await;
            }
        }
        let (name, field) = match kind_of(&writes[chunk[0]].op) {
            0 => return self.insert_chunk(statements, chunk).await,
            1 => ("update", "updates"),
            _ => ("delete", "deletes"),
        };
        let mut list = RawArrayBuf::new();
        let mut sent = 0usize;
        for s in chunk.iter().filter_map(|&i| statements[i].as_ref()) {
            list.push(s.clone());
            sent += 1;
        }
        let mut command = RawDocumentBuf::new();
        command.append(name, self.collection.as_str());
        command.append(field, list);
        command.append("ordered", false);
        command.append_ref("writeConcern", &self.write_concern);
        let reply = self
            .db
            .run_raw_command(command)
            .await
            .map_err(|e| self.command_failed(e))?;
        if let Ok(wce) = reply.get_document("writeConcernError") {
            let message = wce.get_str("errmsg").unwrap_or("");
            return Err(self.write_concern_failed(message, wce.get_i32("code").unwrap_or(0)));
        }
        let mut out: Vec<(usize, WriteResult)> =
            chunk.iter().map(|&i| (i, WriteResult::Done)).collect();
        let mut refused = 0;
        if let Ok(errors) = reply.get_array("writeErrors") {
            for e in errors.iter().filter_map(|e| e.as_document()) {
                refused += 1;
                let index = e.get_i32("index").map(|i| i as usize).unwrap_or(usize::MAX);
                if let Some(slot) = out.get_mut(index) {
                    slot.1 = WriteResult::Refused {
                        code: e.get_i32("code").unwrap_or(0),
                        message: e.get_str("errmsg").unwrap_or("").to_string(),
                    };
                }
            }
        }
        // `n`: documents inserted, matched by an update, or deleted.
        let n = match reply.get("n") {
            Some(Bson::Int32(n)) => *n as usize,
            Some(Bson::Int64(n)) => *n as usize,
            _ => 0,
        };
        Ok(Chunk {
            results: out,
            missed: sent.saturating_sub(refused + n),
        })
    }

    /// Inserts go through the driver's `insert_many` rather than a hand-built command: it
    /// sends the documents as an OP_MSG document sequence, the form every driver uses for
    /// inserts, which a server can store from the bytes it received. The same documents as an
    /// array inside the command body are decoded as part of the whole command first: on
    /// secantusd-rs that cost staging a quarter of its CPU per copied document
    /// (docs/BENCHMARKS.md, note 11). Unordered, with the configured write concern, like the
    /// other commands; a chunk fits in one command, so the driver never splits it.
    async fn insert_chunk(
        &self,
        statements: &[Option<RawDocumentBuf>],
        chunk: &[usize],
    ) -> Result<Chunk> {
        use mongodb::error::ErrorKind as DriverErrorKind;
        let documents = chunk.iter().filter_map(|&i| statements[i].as_ref());
        let inserted = self
            .db
            .collection::<RawDocumentBuf>(&self.collection)
            .insert_many(documents)
            .ordered(false)
            .write_concern(self.driver_write_concern.clone())
            .await;
        let mut out: Vec<(usize, WriteResult)> =
            chunk.iter().map(|&i| (i, WriteResult::Done)).collect();
        if let Err(failure) = inserted {
            let DriverErrorKind::InsertMany(refusals) = failure.kind.as_ref() else {
                return Err(self.command_failed(failure));
            };
            if let Some(wce) = &refusals.write_concern_error {
                return Err(self.write_concern_failed(&wce.message, wce.code));
            }
            for e in refusals.write_errors.iter().flatten() {
                if let Some(slot) = out.get_mut(e.index) {
                    slot.1 = WriteResult::Refused {
                        code: e.code,
                        message: e.message.clone(),
                    };
                }
            }
        }
        // An insert is either stored or refused: none is missed.
        Ok(Chunk {
            results: out,
            missed: 0,
        })
    }

    /// A command that failed as a whole.
    fn command_failed(&self, e: mongodb::error::Error) -> SyncError {
        if command_code(&e).is_some_and(|c| WRITE_CONCERN_UNSATISFIABLE.contains(&c)) {
            return write_concern_refused(&self.write_concern_setting, &crate::retry::describe(&e));
        }
        SyncError::mongo(format!("writing to staging.{}", self.collection), e)
    }

    /// Writes that happened but are not (yet) as durable as the write concern asks.
    fn write_concern_failed(&self, message: &str, code: i32) -> SyncError {
        if WRITE_CONCERN_UNSATISFIABLE.contains(&code) {
            // An unknown tag, more nodes than staging has: no retry can satisfy it.
            return write_concern_refused(
                &self.write_concern_setting,
                &format!("{message} (code {code})"),
            );
        }
        // Retried as a batch (replays are no-ops thanks to the order rule).
        SyncError::WriteConcern(message.to_string())
    }
}

/// Groups the encoded statements (`None`: refused before sending) by command kind into chunks
/// bounded in count and size; `burst`: the rate limiter's, which no chunk may exceed.
fn chunks(
    writes: &[PlannedWrite],
    statements: &[Option<RawDocumentBuf>],
    burst: Option<u32>,
) -> Vec<Vec<usize>> {
    let mut chunks = Vec::new();
    for kind in 0..3u8 {
        let idx: Vec<usize> = (0..writes.len())
            .filter(|&i| statements[i].is_some() && kind_of(&writes[i].op) == kind)
            .collect();
        if idx.is_empty() {
            continue;
        }
        // As few commands as the statement cap allows, filled evenly: each command costs
        // staging a write and a wait for its write concern of its own, and concurrent
        // update commands on one collection contend with each other (docs/BENCHMARKS.md,
        // notes 9 and 10). Commands of different kinds, and those of a kind too large for one,
        // still run concurrently, up to `apply_concurrency`.
        let commands = idx.len().div_ceil(MAX_STATEMENTS);
        let spread = idx.len().div_ceil(commands);
        let cap = match burst {
            Some(burst) => spread.min(burst as usize),
            None => spread,
        };
        let mut current = Vec::new();
        let mut bytes = 0usize;
        for i in idx {
            let size = statements[i].as_ref().map_or(0, |s| s.as_bytes().len());
            if !current.is_empty() && (current.len() >= cap || bytes + size > MAX_COMMAND_BYTES) {
                chunks.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += size;
            current.push(i);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
    }
    chunks
}

fn kind_of(op: &WriteOp) -> u8 {
    match op {
        WriteOp::Insert(_) => 0,
        WriteOp::Update { .. } => 1,
        WriteOp::Delete { .. } => 2,
    }
}

/// Top-level field names that `$set` and `$unset` cannot address, per document of a batch.
///
/// MongoDB 5.0+ stores field names containing dots or starting with `$` (set with `$setField`),
/// but update operators read such a name as a path: `$set: {"c.d": 1}` writes `c: {d: 1}`. The
/// planner's update paths for such a top-level field are the name itself, so when the
/// production document of a change (or the staging document it updates) has that name at the
/// top level, the update is sent as a pipeline that sets or removes it with `$setField`.
#[derive(Debug, Default)]
pub struct LiteralNames {
    /// By staging `_id`: names of the looked-up staging document.
    staging: HashMap<Vec<u8>, Vec<String>>,
    /// By index into the batch: names of the change's production document.
    production: HashMap<usize, Vec<String>>,
}

impl LiteralNames {
    /// Scans the top-level names of the batch's documents (the usual batch has none).
    pub fn collect(existing: &[Document], changes: &[Change]) -> LiteralNames {
        let unsafe_names = |d: &Document| -> Vec<String> {
            d.keys()
                .filter(|k| k.contains('.') || k.starts_with('$'))
                .cloned()
                .collect()
        };
        let mut names = LiteralNames::default();
        for d in existing {
            let found = unsafe_names(d);
            if let (false, Some(id)) = (found.is_empty(), d.get("_id")) {
                names.staging.insert(canonical(id), found);
            }
        }
        for (i, c) in changes.iter().enumerate() {
            if let Some(d) = &c.doc {
                let found = unsafe_names(d);
                if !found.is_empty() {
                    names.production.insert(i, found);
                }
            }
        }
        names
    }

    /// The names of the documents `write` (of staging document `id`) involves.
    fn of(&self, write: &PlannedWrite, id: &Bson) -> Vec<&str> {
        if self.staging.is_empty() && self.production.is_empty() {
            return vec![];
        }
        let mut out: Vec<&str> = self
            .staging
            .get(&canonical(id))
            .into_iter()
            .flatten()
            .chain(
                write
                    .changes
                    .iter()
                    .filter_map(|i| self.production.get(i))
                    .flatten(),
            )
            .map(String::as_str)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Whether an update touches a literal top-level name (see [`LiteralNames`]) and so must be
/// sent as a pipeline ([`pipeline_update`]) rather than `$set`/`$unset` operators.
fn needs_pipeline(set: &Document, unset: &Document, literal: &[&str]) -> bool {
    !literal.is_empty()
        && set
            .keys()
            .chain(unset.keys())
            .any(|k| literal.contains(&k.as_str()))
}

/// The `u` of an update that touches literal top-level names (`literal`): an update pipeline
/// of `$set`/`$unset` stages for the plain paths (values wrapped in `$literal`, so no value is
/// read as an expression) and a `$setField` per literal name (`$$REMOVE` removes one).
fn pipeline_update(set: &Document, unset: &Document, literal: &[&str]) -> Bson {
    let is_literal = |k: &str| literal.contains(&k);
    let set_field = |name: &str, value: Bson| {
        Bson::Document(doc! { "$replaceWith": { "$setField": {
            "field": { "$literal": name },
            "input": "$$ROOT",
            "value": value,
        } } })
    };
    let mut stages = Vec::new();
    let plain_set: Document = set
        .iter()
        .filter(|(k, _)| !is_literal(k))
        .map(|(k, v)| (k.clone(), Bson::Document(doc! { "$literal": v.clone() })))
        .collect();
    if !plain_set.is_empty() {
        stages.push(Bson::Document(doc! { "$set": plain_set }));
    }
    for (k, v) in set.iter().filter(|(k, _)| is_literal(k)) {
        stages.push(set_field(k, Bson::Document(doc! { "$literal": v.clone() })));
    }
    let plain_unset: Vec<Bson> = unset
        .keys()
        .filter(|k| !is_literal(k))
        .map(|k| Bson::String(k.clone()))
        .collect();
    if !plain_unset.is_empty() {
        stages.push(Bson::Document(doc! { "$unset": plain_unset }));
    }
    for k in unset.keys().filter(|k| is_literal(k)) {
        stages.push(set_field(k, Bson::String("$$REMOVE".into())));
    }
    Bson::Array(stages)
}

/// A write's part encoded as BSON, or the write's refusal when it cannot be (a value the BSON
/// encoder rejects, such as a field name holding a NUL byte).
fn encode(d: &Document, what: &str) -> std::result::Result<RawDocumentBuf, WriteResult> {
    RawDocumentBuf::from_document(d).map_err(|e| WriteResult::Refused {
        code: BAD_VALUE,
        message: format!("{what} cannot be encoded as BSON: {e}"),
    })
}

/// Refuses a write whose document cannot exist in staging: `size` bytes (an insert's
/// document, or an update's `$set`, which the document it produces holds all of) over `max`.
fn refuse_if_too_large(
    what: &str,
    size: usize,
    max: usize,
) -> std::result::Result<(), WriteResult> {
    if size <= max {
        return Ok(());
    }
    Err(WriteResult::Refused {
        code: DOCUMENT_TOO_LARGE,
        message: format!(
            "{what} would take {size} bytes in staging (with stagesync's metadata), over staging's \
             maxBsonObjectSize of {max} bytes"
        ),
    })
}

/// The driver's form of the configured write concern.
pub fn write_concern(w: &WriteConcernSetting) -> mongodb::options::WriteConcern {
    use mongodb::options::Acknowledgment;
    let w = match w {
        WriteConcernSetting::Nodes(n) => Acknowledgment::Nodes(*n),
        WriteConcernSetting::Tag(t) if t == "majority" => Acknowledgment::Majority,
        WriteConcernSetting::Tag(t) => Acknowledgment::Custom(t.clone()),
    };
    mongodb::options::WriteConcern::builder().w(w).build()
}

/// `1`, `"majority"`, `"tag"`: the setting as the config file spells it.
pub fn describe_write_concern(w: &WriteConcernSetting) -> String {
    match w {
        WriteConcernSetting::Nodes(n) => n.to_string(),
        WriteConcernSetting::Tag(t) => format!("\"{t}\""),
    }
}

/// The error for a write concern staging refuses for good.
pub fn write_concern_refused(w: &WriteConcernSetting, reason: &str) -> SyncError {
    SyncError::InvalidSetting {
        key: "sync.write_concern".into(),
        detail: format!(
            "staging cannot satisfy write concern {}: {}. Use \"majority\", a number of nodes \
             staging has, or a tag its replica set defines",
            describe_write_concern(w),
            crate::retry::excerpt(reason, crate::retry::DETAIL_CHARS)
        ),
    }
}

/// The configured write concern as a command's `writeConcern` document.
/// [`write_concern_doc`] as the raw BSON a command built from raw statements carries.
fn raw_write_concern(w: &WriteConcernSetting) -> RawDocumentBuf {
    let mut raw = RawDocumentBuf::new();
    match w {
        WriteConcernSetting::Nodes(n) => raw.append("w", *n as i32),
        WriteConcernSetting::Tag(t) => raw.append("w", t.as_str()),
    }
    raw
}

pub fn write_concern_doc(w: &WriteConcernSetting) -> Document {
    match w {
        WriteConcernSetting::Nodes(n) => doc! { "w": *n as i32 },
        WriteConcernSetting::Tag(t) => doc! { "w": t.clone() },
    }
}

/// A token bucket on staging writes (`max_writes_per_second`), shared by every collection.
pub struct WriteLimiter {
    bucket: DefaultDirectRateLimiter,
    /// The largest number of documents one command may write at once.
    burst: u32,
}

impl WriteLimiter {
    /// A bucket refilled at `per_second` documents per second, holding a tenth of a second's
    /// worth (so the rate holds over any second, not just on average).
    pub fn new(per_second: u32) -> Option<Arc<WriteLimiter>> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = (per_second / 10).clamp(1, RATE_LIMITED_CHUNK);
        let quota =
            Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).expect("clamped to ≥ 1"));
        Some(Arc::new(WriteLimiter {
            bucket: RateLimiter::direct(quota),
            burst,
        }))
    }
}

/// The indexes stagesync needs on a staging collection: a unique compound index on the business
/// key (partial: only documents that have every key field) and one on the recorded production `_id`.
pub fn index_specs(rules: &Rules) -> Vec<Document> {
    let key: Document = rules
        .business_key
        .iter()
        .map(|f| (f.clone(), Bson::Int32(1)))
        .collect();
    let partial = rules.has_key_filter();
    vec![
        doc! { "key": key, "name": "stagesync_business_key", "unique": true, "partialFilterExpression": partial },
        doc! { "key": { rules.meta_path("id"): 1 }, "name": "stagesync_production_id" },
        doc! { "key": { rules.meta_path("prior.id"): 1 }, "name": "stagesync_prior_production_id" },
    ]
}

/// Creates the indexes if missing; never drops anything. An equivalent index under another
/// name is accepted as it is.
pub async fn ensure_indexes(db: &Database, collection: &str, rules: &Rules) -> Result<()> {
    for spec in index_specs(rules) {
        let name = spec.get_str("name").unwrap_or("").to_string();
        let result = db
            .run_command(doc! { "createIndexes": collection, "indexes": [spec] })
            .await;
        match result {
            Ok(_) => {}
            Err(e) => match crate::retry::command_code(&e) {
                Some(85) | Some(86) => {
                    tracing::info!(collection, index = %name, "an equivalent index already exists; keeping it");
                }
                Some(DUPLICATE_KEY) => return Err(SyncError::Staging(format!(
                    "cannot create the unique business-key index on staging collection `{collection}`: \
                     it already holds documents with the same business key. Find them with \
                     `stagesync verify`, merge or remove the duplicates, then start again"
                ))),
                _ => return Err(SyncError::mongo(format!("creating index {name} on staging collection `{collection}`"), e)),
            },
        }
    }
    Ok(())
}

/// The key documents of the indexes a staging collection has; `None` when it does not exist
/// (or cannot be read).
pub async fn existing_index_keys(db: &Database, collection: &str) -> Option<Vec<Document>> {
    use futures::TryStreamExt;
    let coll = db.collection::<Document>(collection);
    let indexes: Vec<mongodb::IndexModel> =
        coll.list_indexes().await.ok()?.try_collect().await.ok()?;
    Some(indexes.into_iter().map(|i| i.keys).collect())
}

/// The unique indexes of a staging collection (see [`unique`]); unknown when they cannot be
/// read.
pub async fn unique_indexes(coll: &mongodb::Collection<Document>) -> unique::UniqueIndexes {
    use futures::TryStreamExt;
    let listed: mongodb::error::Result<Vec<mongodb::IndexModel>> =
        async { coll.list_indexes().await?.try_collect().await }.await;
    let Ok(listed) = listed else {
        return unique::UniqueIndexes::unknown();
    };
    let specs: Vec<Document> = listed
        .into_iter()
        .map(|index| {
            let mut spec = doc! { "key": index.keys };
            if let Some(options) = index.options {
                if options.unique == Some(true) {
                    spec.insert("unique", true);
                }
                if options.collation.is_some() {
                    spec.insert("collation", doc! {});
                }
            }
            spec
        })
        .collect();
    unique::UniqueIndexes::from_specs(&specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_bson_cannot_encode_is_refused_alone_with_a_reason() {
        let refused = encode(&doc! { "bad\0name": 1 }, "the document").unwrap_err();
        match refused {
            WriteResult::Refused { code, message } => {
                assert_eq!(code, BAD_VALUE);
                assert!(
                    message.starts_with("the document cannot be encoded as BSON"),
                    "{message}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn planned(ops: impl IntoIterator<Item = WriteOp>) -> Vec<PlannedWrite> {
        ops.into_iter()
            .enumerate()
            .map(|(i, op)| PlannedWrite {
                op,
                changes: vec![i],
            })
            .collect()
    }

    fn encoded(writes: &[PlannedWrite], bytes: usize) -> Vec<Option<RawDocumentBuf>> {
        let pad = "x".repeat(bytes);
        writes
            .iter()
            .map(|_| Some(RawDocumentBuf::from_document(&doc! { "pad": &pad }).unwrap()))
            .collect()
    }

    #[test]
    fn each_kind_of_write_goes_in_as_few_commands_as_the_cap_allows_filled_evenly() {
        let mut ops: Vec<WriteOp> = (0..700)
            .map(|i| WriteOp::Insert(doc! { "_id": i }))
            .collect();
        ops.extend((0..300).map(|i| WriteOp::Update {
            id: Bson::Int32(i),
            set: doc! { "a": 1 },
            unset: Document::new(),
        }));
        let writes = planned(ops);
        let sizes: Vec<usize> = chunks(&writes, &encoded(&writes, 10), None)
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [350, 350, 300]);
    }

    #[test]
    fn no_command_exceeds_the_count_size_or_rate_caps() {
        let writes = planned((0..2200).map(|i| WriteOp::Insert(doc! { "_id": i })));
        let sizes = |bytes, burst| -> Vec<usize> {
            chunks(&writes, &encoded(&writes, bytes), burst)
                .iter()
                .map(Vec::len)
                .collect()
        };
        assert_eq!(sizes(10, None), [440; 5]);
        assert_eq!(sizes(10, Some(200)).iter().max(), Some(&200));
        // Statements of ~32 KiB: the 8 MiB size cap splits before the count cap does.
        let big = sizes(32 * 1024, None);
        assert!(big.len() > 5 && big.iter().all(|&n| n < 440), "{big:?}");
        assert_eq!(big.iter().sum::<usize>(), 2200);
    }

    #[test]
    fn a_statement_refused_before_sending_is_in_no_command() {
        let writes = planned((0..10).map(|i| WriteOp::Insert(doc! { "_id": i })));
        let mut statements = encoded(&writes, 10);
        statements[3] = None;
        let all: Vec<usize> = chunks(&writes, &statements, None).concat();
        assert_eq!(all, [0, 1, 2, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn commands_carry_the_configured_write_concern() {
        for w in [
            WriteConcernSetting::Nodes(2),
            WriteConcernSetting::Tag("majority".into()),
        ] {
            let raw = raw_write_concern(&w).to_document().unwrap();
            assert_eq!(raw, write_concern_doc(&w));
        }
    }

    #[test]
    fn a_write_over_stagings_document_limit_is_refused_with_both_sizes() {
        assert!(refuse_if_too_large("the document", 100, 100).is_ok());
        match refuse_if_too_large("the document", 101, 100) {
            Err(WriteResult::Refused { code, message }) => {
                assert_eq!(code, DOCUMENT_TOO_LARGE);
                assert!(message.contains("101 bytes"), "{message}");
                assert!(
                    message.contains("maxBsonObjectSize of 100 bytes"),
                    "{message}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
