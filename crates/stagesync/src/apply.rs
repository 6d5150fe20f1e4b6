//! Apply stage: turns a batch's planned writes into a few bulk commands on staging.
//!
//! It uses the classic `insert` / `update` / `delete` commands with many statements each, which
//! every MongoDB version (and every wire-compatible server) supports, rather than `bulkWrite`
//! (8.0+). Statements are unordered: the planner emits at most one write per staging document,
//! so no two statements of a batch depend on each other, and chunks run concurrently.

use std::num::NonZeroU32;
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use mongodb::bson::{doc, Bson, Document, Timestamp};
use mongodb::Database;

use crate::config::WriteConcernSetting;
use crate::error::{MongoContext, Result, SyncError};
use crate::plan::{PlannedWrite, Rules, WriteOp};
use crate::retry::DUPLICATE_KEY;

/// Largest number of statements in one command, and a soft cap on its size.
const MAX_STATEMENTS: usize = 500;
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;
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

/// Writes to one staging collection.
#[derive(Clone)]
pub struct Applier {
    db: Database,
    collection: String,
    write_concern: Document,
    concurrency: usize,
    limiter: Option<Arc<WriteLimiter>>,
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
            write_concern: write_concern_doc(write_concern),
            concurrency: concurrency.max(1),
            limiter,
        }
    }

    /// Writes everything; one result per write, in order. `Err` only for failures of the whole
    /// request (network, staging down, write concern not satisfied): the caller retries the batch.
    ///
    /// `guards[i]` is the cluster time of the newest change write `i` carries: updates and
    /// deletes then only touch a staging document whose `_sync.ts` is older (or absent) — a
    /// compare-and-set that keeps a stale writer from replacing newer state. (Inserts are
    /// guarded by the unique indexes.)
    pub async fn apply(
        &self,
        writes: &[PlannedWrite],
        guards: &[Option<Timestamp>],
    ) -> Result<Vec<WriteResult>> {
        let chunks = self.chunks(writes);
        let mut results = vec![WriteResult::Done; writes.len()];
        let outcomes: Vec<Result<Vec<(usize, WriteResult)>>> = stream::iter(chunks)
            .map(|chunk| self.run_chunk(writes, guards, chunk))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for outcome in outcomes {
            for (i, r) in outcome? {
                results[i] = r;
            }
        }
        Ok(results)
    }

    /// Groups write indices by command kind into chunks bounded in count and size, spread over
    /// the concurrency.
    fn chunks(&self, writes: &[PlannedWrite]) -> Vec<Vec<usize>> {
        let per_kind = |kind: u8| -> Vec<usize> {
            (0..writes.len())
                .filter(|&i| kind_of(&writes[i].op) == kind)
                .collect()
        };
        let mut chunks = Vec::new();
        for kind in 0..3u8 {
            let idx = per_kind(kind);
            if idx.is_empty() {
                continue;
            }
            let spread = idx.len().div_ceil(self.concurrency).max(1);
            // With a rate limit, a chunk may not exceed the token bucket's burst.
            let cap = match &self.limiter {
                Some(l) => spread.min(l.burst as usize),
                None => spread.min(MAX_STATEMENTS),
            };
            let mut current = Vec::new();
            let mut bytes = 0usize;
            for i in idx {
                let size = approx_size(&writes[i].op);
                if !current.is_empty() && (current.len() >= cap || bytes + size > MAX_COMMAND_BYTES)
                {
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
        guards: &[Option<Timestamp>],
        chunk: Vec<usize>,
    ) -> Result<Vec<(usize, WriteResult)>> {
        if let Some(l) = &self.limiter {
            if let Some(n) = NonZeroU32::new(chunk.len() as u32) {
                // `until_n_ready` only fails when n exceeds the burst, which chunking prevents.
                let _ = l.bucket.until_n_ready(n).await;
            }
        }
        let command = match kind_of(&writes[chunk[0]].op) {
            0 => doc! {
                "insert": &self.collection,
                "documents": chunk.iter().map(|&i| match &writes[i].op {
                    WriteOp::Insert(d) => Bson::Document(d.clone()),
                    _ => unreachable!("chunked by kind"),
                }).collect::<Vec<_>>(),
            },
            1 => doc! {
                "update": &self.collection,
                "updates": chunk.iter().map(|&i| match &writes[i].op {
                    WriteOp::Update { id, set, unset } => {
                        let mut u = Document::new();
                        if !set.is_empty() { u.insert("$set", set.clone()); }
                        if !unset.is_empty() { u.insert("$unset", unset.clone()); }
                        Bson::Document(doc! { "q": self.guarded(id, guards.get(i).copied().flatten()), "u": u, "upsert": false })
                    }
                    _ => unreachable!("chunked by kind"),
                }).collect::<Vec<_>>(),
            },
            _ => doc! {
                "delete": &self.collection,
                "deletes": chunk.iter().map(|&i| match &writes[i].op {
                    WriteOp::Delete { id } => Bson::Document(doc! { "q": self.guarded(id, guards.get(i).copied().flatten()), "limit": 1 }),
                    _ => unreachable!("chunked by kind"),
                }).collect::<Vec<_>>(),
            },
        };
        let mut command = command;
        command.insert("ordered", false);
        command.insert("writeConcern", self.write_concern.clone());
        let reply = self
            .db
            .run_command(command)
            .await
            .with_context(|| format!("writing to staging.{}", self.collection))?;
        if let Ok(wce) = reply.get_document("writeConcernError") {
            // The writes happened but are not yet durable as asked: retry the batch (replays
            // are no-ops thanks to the order rule).
            return Err(SyncError::WriteConcern(
                wce.get_str("errmsg").unwrap_or("").to_string(),
            ));
        }
        let mut out: Vec<(usize, WriteResult)> =
            chunk.iter().map(|&i| (i, WriteResult::Done)).collect();
        if let Ok(errors) = reply.get_array("writeErrors") {
            for e in errors.iter().filter_map(|e| e.as_document()) {
                let index = e.get_i32("index").map(|i| i as usize).unwrap_or(usize::MAX);
                if let Some(slot) = out.get_mut(index) {
                    slot.1 = WriteResult::Refused {
                        code: e.get_i32("code").unwrap_or(0),
                        message: e.get_str("errmsg").unwrap_or("").to_string(),
                    };
                }
            }
        }
        Ok(out)
    }
}

fn kind_of(op: &WriteOp) -> u8 {
    match op {
        WriteOp::Insert(_) => 0,
        WriteOp::Update { .. } => 1,
        WriteOp::Delete { .. } => 2,
    }
}

fn approx_size(op: &WriteOp) -> usize {
    let doc_len = |d: &Document| mongodb::bson::to_vec(d).map(|v| v.len()).unwrap_or(1024);
    match op {
        WriteOp::Insert(d) => doc_len(d),
        WriteOp::Update { set, unset, .. } => doc_len(set) + doc_len(unset) + 64,
        WriteOp::Delete { .. } => 64,
    }
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

/// The configured write concern as a command's `writeConcern` document.
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
    let partial: Document = rules
        .business_key
        .iter()
        .map(|f| (f.clone(), Bson::Document(doc! { "$exists": true })))
        .collect();
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
