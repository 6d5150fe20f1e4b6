//! `[collections.references]`: references between documents, rewritten to staging `_id`s.
//!
//! Production `orders.customerId` holds the production `_id` of a customer. In staging that
//! customer is the document whose `_sync.id` is that `_id` — usually under the same `_id`
//! (`new_document_id = "production"`), but under its own staging `_id` when it was adopted by
//! business key (or got a fresh id). So before a batch is planned, every configured reference
//! of its production documents is looked up in the referenced staging collection (one query
//! per referenced collection and batch, `_sync.id $in [...]`, on the `_sync.id` index) and
//! rewritten to the staging `_id` it maps to ([`References::remap`]) — the merge then writes
//! the rewritten value like any production value (so only production-owned fields are ever
//! remapped, and `verify`, planning through the same step, compares the rewritten value).
//!
//! A reference whose document is not in staging yet (collections stream independently) keeps
//! its production value, and a **pending fix-up** is recorded in
//! `<metadata_database>.pending_references` — *before* the document holding it is written, so
//! a `kill -9` at any point loses none. Pending fix-ups are resolved
//! - right after the batch that recorded them, should the referenced document have arrived
//!   meanwhile — judged from what the batch wrote, not from the records: another resolver may
//!   have settled one on the document as it was while the batch's writes were in flight (one
//!   still waiting is recorded again);
//! - as soon as the referenced document arrives: every batch of a referenced collection
//!   (stream, snapshot, adoption, replay) resolves the fix-ups waiting for its `_id`s;
//! - by a sweep every few seconds while the referencing collection is synced, which also
//!   catches what a crash interrupted and drops fix-ups whose document no longer holds the
//!   reference.
//!
//! A fix-up rewrites the value in the staging document by compare-and-set on the top-level
//! field holding it (only if production owns that field), so it never overwrites a newer
//! write. References that never resolve stay as they are, are counted
//! (`stagesync_references_pending`) and listed by `verify`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::{Collection, Database};

use crate::config::Config;
use crate::error::{MongoContext, Result};
use crate::metrics::Metrics;
use crate::plan::{canonical, meta_of, PathPatterns, PlannedWrite, WriteOp};
use crate::source::change::Change;

/// The metadata collection holding pending fix-ups.
pub const PENDING_COLLECTION: &str = "pending_references";

/// Canonical production `_id` → (staging `_id`, its `_sync.ts`).
type Claims = HashMap<Vec<u8>, (Bson, Option<(u32, u32)>)>;

/// Per referencing document ((collection, canonical staging `_id`)): its staging `_id`, the
/// rewrites (path, production `_id`, staging `_id`) and the pending records they settle.
type PerDocument = HashMap<(String, Vec<u8>), (Bson, Vec<(String, Bson, Bson)>, Vec<Bson>)>;

/// Pending fix-ups read per round of a resolution.
const RESOLVE_BATCH: i64 = 5000;

/// One configured reference of a collection.
#[derive(Debug, Clone)]
struct Reference {
    /// The field path holding production `_id`s (dots; descends through arrays).
    path: String,
    /// The referenced collection (production name).
    referenced: String,
}

/// A reference of a batch's document whose document is not in staging.
#[derive(Debug, Clone, PartialEq)]
pub struct Unresolved {
    /// Index of the change in the batch.
    pub change: usize,
    pub path: String,
    pub referenced: String,
    /// The production `_id` referred to (masked where `_id` is).
    pub value: Bson,
}

/// Where the pending fix-ups being settled come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recheck {
    /// Read from the metadata database: one still waiting stays as it is.
    Stored,
    /// Made from a batch just written: one still waiting is stored again, in case another
    /// resolver deleted its record while the batch was in flight.
    Written,
}

/// One collection's references and the pending fix-ups it takes part in. Cheap to clone.
#[derive(Clone)]
pub struct References {
    collection: String,
    sync_name: String,
    config: Arc<Config>,
    staging_db: Database,
    meta_db: Database,
    pending: Collection<Document>,
    metrics: Arc<Metrics>,
    outgoing: Vec<Reference>,
    /// Some configured collection references this one.
    incoming: bool,
}

impl References {
    pub fn new(
        config: Arc<Config>,
        staging_db: Database,
        meta_db: &Database,
        metrics: Arc<Metrics>,
        collection: &str,
    ) -> References {
        let outgoing = config
            .collection(collection)
            .map(|c| {
                c.references
                    .iter()
                    .map(|(path, referenced)| Reference {
                        path: path.clone(),
                        referenced: referenced.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let incoming = config
            .collections
            .iter()
            .any(|c| c.references.values().any(|r| r == collection));
        References {
            collection: collection.to_string(),
            sync_name: config.sync.name.clone(),
            pending: meta_db.collection(PENDING_COLLECTION),
            meta_db: meta_db.clone(),
            staging_db,
            metrics,
            outgoing,
            incoming,
            config,
        }
    }

    /// True when this collection has references of its own.
    pub fn has_outgoing(&self) -> bool {
        !self.outgoing.is_empty()
    }

    fn meta_field(&self) -> &str {
        &self.config.sync.metadata_field
    }

    fn staging_of(&self, collection: &str) -> Option<Collection<Document>> {
        let c = self.config.collection(collection)?;
        Some(self.staging_db.collection(c.target_name()))
    }

    /// Staging `_id`s of the documents recorded as coming from production `_id`s `values` of
    /// collection `referenced` (canonical production `_id` → staging `_id`). When two claim
    /// one production `_id`, the most recently synced wins (as in the planner).
    async fn staging_ids(
        &self,
        referenced: &str,
        values: Vec<Bson>,
    ) -> Result<HashMap<Vec<u8>, Bson>> {
        let mut found: Claims = HashMap::new();
        let Some(staging) = self.staging_of(referenced) else {
            return Ok(HashMap::new());
        };
        let meta = self.meta_field().to_string();
        let what = || format!("looking up references in staging.{}", staging.name());
        for chunk in values.chunks(5000) {
            let docs: Vec<Document> = staging
                .find(doc! { format!("{meta}.id"): { "$in": chunk.to_vec() } })
                .projection(doc! { "_id": 1, format!("{meta}.id"): 1, format!("{meta}.ts"): 1 })
                .await
                .with_context(what)?
                .try_collect()
                .await
                .with_context(what)?;
            for d in docs {
                let Some(m) = meta_of(&d, &meta) else {
                    continue;
                };
                let (Some(id), Some(staging_id)) = (m.get("id"), d.get("_id")) else {
                    continue;
                };
                let ts = m.get_timestamp("ts").ok().map(|t| (t.time, t.increment));
                let entry = found
                    .entry(canonical(id))
                    .or_insert((staging_id.clone(), ts));
                if ts > entry.1 {
                    *entry = (staging_id.clone(), ts);
                }
            }
        }
        Ok(found.into_iter().map(|(k, (v, _))| (k, v)).collect())
    }

    /// Whether [`References::remap`] reads staging (this collection has references to rewrite).
    pub fn remaps(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Rewrites the batch's references to staging `_id`s (see the module documentation);
    /// returns the changes as rewritten and the references whose document is not in staging.
    pub async fn remap<'c>(
        &self,
        changes: std::borrow::Cow<'c, [Change]>,
    ) -> Result<(std::borrow::Cow<'c, [Change]>, Vec<Unresolved>)> {
        if self.outgoing.is_empty() {
            return Ok((changes, vec![]));
        }
        // The values to look up, per referenced collection.
        let mut wanted: HashMap<&str, (HashSet<Vec<u8>>, Vec<Bson>)> = HashMap::new();
        for c in changes.iter() {
            let Some(d) = &c.doc else { continue };
            for r in &self.outgoing {
                for v in values_at(d, &r.path) {
                    let (seen, list) = wanted.entry(&r.referenced).or_default();
                    if seen.insert(canonical(&v)) {
                        list.push(v);
                    }
                }
            }
        }
        if wanted.is_empty() {
            return Ok((changes, vec![]));
        }
        let mut maps: HashMap<&str, HashMap<Vec<u8>, Bson>> = HashMap::new();
        for (referenced, (_, values)) in wanted {
            maps.insert(referenced, self.staging_ids(referenced, values).await?);
        }
        let mut unresolved = Vec::new();
        let mut rewritten: Option<Vec<Change>> = None;
        let mut remapped = 0u64;
        for (i, c) in changes.iter().enumerate() {
            let Some(d) = &c.doc else { continue };
            let mut doc = None::<Document>;
            for r in &self.outgoing {
                let map = &maps[r.referenced.as_str()];
                let target = doc.get_or_insert_with(|| d.clone());
                let changed = rewrite_at(target, &r.path, &mut |v| match map.get(&canonical(v)) {
                    Some(staging_id) if staging_id != v => Some(staging_id.clone()),
                    Some(_) => None,
                    None => {
                        unresolved.push(Unresolved {
                            change: i,
                            path: r.path.clone(),
                            referenced: r.referenced.clone(),
                            value: v.clone(),
                        });
                        None
                    }
                });
                remapped += changed as u64;
            }
            if let Some(doc) = doc.filter(|nd| nd != d) {
                let all = rewritten.get_or_insert_with(|| changes.to_vec());
                all[i].doc = Some(doc);
            }
        }
        if remapped > 0 {
            self.metrics
                .references_remapped
                .with_label_values(&[&self.collection])
                .inc_by(remapped);
        }
        Ok((
            match rewritten {
                Some(all) => std::borrow::Cow::Owned(all),
                None => changes,
            },
            unresolved,
        ))
    }

    /// The pending fix-ups of a planned batch, as stored: one record per reference of a
    /// document it writes (inserted or updated) whose referenced document is not in staging,
    /// keyed by sync, collection, staging `_id`, path and production value.
    fn pending_records(&self, writes: &[PlannedWrite], unresolved: &[Unresolved]) -> Vec<Document> {
        let mut by_change: HashMap<usize, Vec<&Unresolved>> = HashMap::new();
        for u in unresolved {
            by_change.entry(u.change).or_default().push(u);
        }
        let now = DateTime::now();
        let mut records = Vec::new();
        for w in writes {
            let staging_id = match &w.op {
                WriteOp::Insert(d) => d.get("_id").cloned(),
                WriteOp::Update { id, .. } => Some(id.clone()),
                WriteOp::Delete { .. } => None,
            };
            let Some(staging_id) = staging_id else {
                continue;
            };
            for u in w.changes.iter().filter_map(|i| by_change.get(i)).flatten() {
                records.push(doc! {
                    "_id": {
                        "s": &self.sync_name, "c": &self.collection, "d": staging_id.clone(),
                        "p": &u.path, "v": u.value.clone(),
                    },
                    "sync": &self.sync_name,
                    "collection": &self.collection,
                    "stagingId": staging_id.clone(),
                    "field": &u.path,
                    "references": &u.referenced,
                    "value": u.value.clone(),
                    "since": now,
                });
            }
        }
        records
    }

    /// Stores `records` (see [`References::pending_records`]); one already stored is kept as
    /// it is.
    async fn record(&self, records: Vec<Document>) -> Result<()> {
        let statements: Vec<Document> = records
            .into_iter()
            .map(|mut r| {
                let key = r.remove("_id").unwrap_or(Bson::Null);
                doc! { "q": { "_id": key }, "u": { "$setOnInsert": r }, "upsert": true }
            })
            .collect();
        for chunk in statements.chunks(500) {
            self.meta_db.run_command(doc! {
                "update": PENDING_COLLECTION,
                "updates": chunk.to_vec(),
                "ordered": false,
                "writeConcern": crate::apply::write_concern_doc(&self.config.sync.write_concern),
            })
            .await
            .context("recording pending reference fix-ups")?;
        }
        Ok(())
    }

    /// Records the pending fix-ups of a planned batch — before its writes, so that a crash
    /// after a write never leaves a reference nobody will fix.
    pub async fn before_writes(
        &self,
        writes: &[PlannedWrite],
        unresolved: &[Unresolved],
    ) -> Result<()> {
        if unresolved.is_empty() {
            return Ok(());
        }
        self.record(self.pending_records(writes, unresolved)).await
    }

    /// After a batch was written: resolves its own fix-ups whose document arrived meanwhile,
    /// and — when other collections refer to this one — those waiting for the documents of
    /// this batch.
    ///
    /// The batch's own fix-ups are judged from what it wrote, not from the stored records:
    /// while its writes were in flight, another resolver (this collection's sweep, or a batch
    /// of the referenced collection) may have settled a record on the document as it was
    /// before the write — not written yet, or not holding the reference yet — and the write
    /// then put the production value in. So each is fixed up now if its document arrived, or
    /// recorded again if it still waits.
    pub async fn after_writes(
        &self,
        writes: &[PlannedWrite],
        changes: &[Change],
        unresolved: &[Unresolved],
    ) -> Result<()> {
        if !unresolved.is_empty() {
            let again = self
                .settle(self.pending_records(writes, unresolved), Recheck::Written)
                .await?;
            // A referenced document may have arrived, and its batch resolved what it found,
            // before these were stored again: look once more.
            self.settle(again, Recheck::Stored).await?;
        }
        if self.incoming {
            let mut seen = HashSet::new();
            let ids: Vec<Bson> = changes
                .iter()
                .filter(|c| c.doc.is_some() && seen.insert(canonical(&c.prod_id)))
                .map(|c| c.prod_id.clone())
                .collect();
            if !ids.is_empty() {
                self.resolve(doc! {
                    "sync": &self.sync_name, "references": &self.collection, "value": { "$in": ids },
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Resolves this collection's pending fix-ups whose document arrived, drops those whose
    /// document no longer holds the reference, and updates `stagesync_references_pending`.
    /// Returns how many are still pending.
    pub async fn sweep(&self) -> Result<u64> {
        if self.outgoing.is_empty() {
            return Ok(0);
        }
        let filter = doc! { "sync": &self.sync_name, "collection": &self.collection };
        self.resolve(filter.clone()).await?;
        let left = self
            .pending
            .count_documents(filter)
            .await
            .context("counting pending reference fix-ups")?;
        self.metrics
            .references_pending
            .with_label_values(&[&self.collection])
            .set(left as i64);
        Ok(left)
    }

    /// Resolves the pending fix-ups matching `filter` whose document is in staging now.
    async fn resolve(&self, filter: Document) -> Result<()> {
        let what = "resolving pending reference fix-ups";
        let records: Vec<Document> = self
            .pending
            .find(filter)
            .limit(RESOLVE_BATCH)
            .await
            .context(what)?
            .try_collect()
            .await
            .context(what)?;
        self.settle(records, Recheck::Stored).await.map(|_| ())
    }

    /// Fixes up the documents of `records` whose referenced document is in staging now and
    /// deletes the records settled; returns those stored again (see [`Recheck`]).
    async fn settle(&self, records: Vec<Document>, recheck: Recheck) -> Result<Vec<Document>> {
        let what = "resolving pending reference fix-ups";
        if records.is_empty() {
            return Ok(vec![]);
        }
        // Where each referred-to document is in staging now.
        let mut by_referenced: HashMap<String, Vec<Bson>> = HashMap::new();
        for r in &records {
            if let (Ok(referenced), Some(v)) = (r.get_str("references"), r.get("value")) {
                by_referenced
                    .entry(referenced.to_string())
                    .or_default()
                    .push(v.clone());
            }
        }
        let mut maps: HashMap<String, HashMap<Vec<u8>, Bson>> = HashMap::new();
        for (referenced, values) in by_referenced {
            let map = self.staging_ids(&referenced, values).await?;
            maps.insert(referenced, map);
        }
        // Per referencing document: the rewrites to make, and the records they settle.
        let mut per_doc: PerDocument = HashMap::new();
        let mut settled: Vec<Bson> = Vec::new();
        let mut waiting_docs: PerDocument = HashMap::new();
        for r in &records {
            let (
                Ok(collection),
                Ok(referenced),
                Ok(field),
                Some(value),
                Some(staging_id),
                Some(key),
            ) = (
                r.get_str("collection"),
                r.get_str("references"),
                r.get_str("field"),
                r.get("value"),
                r.get("stagingId"),
                r.get("_id"),
            )
            else {
                // Not a record of ours (or damaged): nothing can resolve it.
                settled.extend(r.get("_id").cloned());
                continue;
            };
            let slot = (collection.to_string(), canonical(staging_id));
            match maps.get(referenced).and_then(|m| m.get(&canonical(value))) {
                Some(target) => {
                    let e = per_doc
                        .entry(slot)
                        .or_insert_with(|| (staging_id.clone(), vec![], vec![]));
                    e.1.push((field.to_string(), value.clone(), target.clone()));
                    e.2.push(key.clone());
                }
                None => {
                    // Still waiting; checked below whether its document still holds it.
                    let e = waiting_docs
                        .entry(slot)
                        .or_insert_with(|| (staging_id.clone(), vec![], vec![]));
                    e.1.push((field.to_string(), value.clone(), Bson::Null));
                    e.2.push(key.clone());
                }
            }
        }
        // Records to store again (see [`Recheck::Written`]).
        let mut still_waiting = Vec::new();
        for ((collection, _), (staging_id, rewrites, keys)) in per_doc {
            if self.fix_up(&collection, &staging_id, &rewrites).await? {
                settled.extend(keys);
            } else if recheck == Recheck::Written {
                still_waiting.extend(keys);
            }
        }
        // Waiting fix-ups of this collection whose document is gone or no longer holds the
        // reference are dropped (checked only by sweeps of the referencing collection).
        for ((collection, _), (staging_id, refs, keys)) in waiting_docs {
            if collection != self.collection {
                continue;
            }
            if !self.still_holds(&collection, &staging_id, &refs).await? {
                settled.extend(keys);
            } else if recheck == Recheck::Written {
                still_waiting.extend(keys);
            }
        }
        let again: Vec<Document> = records
            .into_iter()
            .filter(|r| r.get("_id").is_some_and(|k| still_waiting.contains(k)))
            .collect();
        if !again.is_empty() {
            self.record(again.clone()).await?;
        }
        for chunk in settled.chunks(1000) {
            self.pending
                .delete_many(doc! { "_id": { "$in": chunk.to_vec() } })
                .await
                .context(what)?;
        }
        Ok(again)
    }

    /// Rewrites, in staging document `staging_id` of `collection`, each `(path, production
    /// _id, staging _id)` — by compare-and-set on the top-level fields holding them, and only
    /// in fields production owns. `Ok(true)` once nothing is left to do (rewritten, or
    /// nothing to rewrite); `Ok(false)` when the document kept changing (retried later).
    async fn fix_up(
        &self,
        collection: &str,
        staging_id: &Bson,
        rewrites: &[(String, Bson, Bson)],
    ) -> Result<bool> {
        let Some(staging) = self.staging_of(collection) else {
            return Ok(true);
        };
        let preserve = self
            .config
            .collection(collection)
            .map(|c| PathPatterns::new(&c.preserve))
            .unwrap_or_else(|| PathPatterns::new::<&str>(&[]));
        let what = || format!("fixing up references in staging.{}", staging.name());
        for _attempt in 0..3 {
            let Some(current) = staging
                .find_one(doc! { "_id": staging_id.clone() })
                .await
                .with_context(what)?
            else {
                return Ok(true); // the document is gone: nothing to fix
            };
            let owned: HashSet<String> = meta_of(&current, self.meta_field())
                .and_then(|m| m.get_array("fields").ok())
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let mut updated = current.clone();
            let mut count = 0u64;
            for (path, from, to) in rewrites {
                let top = path.split('.').next().unwrap_or(path);
                if !owned.contains(top) || preserve.covers(&path.split('.').collect::<Vec<_>>()) {
                    continue; // staging owns it: never remapped
                }
                let from = canonical(from);
                count += rewrite_at(&mut updated, path, &mut |v| {
                    (canonical(v) == from).then(|| to.clone())
                }) as u64;
            }
            if count == 0 {
                return Ok(true);
            }
            let mut filter = doc! { "_id": staging_id.clone() };
            let mut set = Document::new();
            for (k, v) in &updated {
                if current.get(k) != Some(v) {
                    filter.insert(k.clone(), current.get(k).cloned().unwrap_or(Bson::Null));
                    set.insert(k.clone(), v.clone());
                }
            }
            let result = staging
                .update_one(filter, doc! { "$set": set })
                .await
                .with_context(what)?;
            if result.matched_count == 1 {
                self.metrics
                    .references_remapped
                    .with_label_values(&[collection])
                    .inc_by(count);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// True when staging document `staging_id` of `collection` still holds one of the
    /// references `refs` (path, production `_id`) in a field production owns.
    async fn still_holds(
        &self,
        collection: &str,
        staging_id: &Bson,
        refs: &[(String, Bson, Bson)],
    ) -> Result<bool> {
        let Some(staging) = self.staging_of(collection) else {
            return Ok(false);
        };
        let Some(current) = staging
            .find_one(doc! { "_id": staging_id.clone() })
            .await
            .with_context(|| format!("reading staging.{}", staging.name()))?
        else {
            return Ok(false);
        };
        Ok(refs.iter().any(|(path, value, _)| {
            let wanted = canonical(value);
            values_at(&current, path)
                .iter()
                .any(|v| canonical(v) == wanted)
        }))
    }

    /// Creates the indexes of the pending fix-ups (idempotent).
    pub async fn ensure_indexes(meta_db: &Database) -> mongodb::error::Result<()> {
        meta_db
            .run_command(doc! {
                "createIndexes": PENDING_COLLECTION,
                "indexes": [
                    { "key": { "sync": 1, "references": 1, "value": 1 }, "name": "by_referenced" },
                    { "key": { "sync": 1, "collection": 1 }, "name": "by_collection" },
                ],
            })
            .await
            .map(|_| ())
    }
}

/// The values a reference path reaches in a document (descending through arrays; an array at
/// the end gives its elements), without nulls, arrays and documents-as-arrays.
pub fn values_at(doc: &Document, path: &str) -> Vec<Bson> {
    let mut out = Vec::new();
    let segs: Vec<&str> = path.split('.').collect();
    collect(doc, &segs, &mut out);
    out
}

fn collect(doc: &Document, segs: &[&str], out: &mut Vec<Bson>) {
    let Some((first, rest)) = segs.split_first() else {
        return;
    };
    match (doc.get(*first), rest.is_empty()) {
        (None | Some(Bson::Null), _) => {}
        (Some(Bson::Array(items)), true) => out.extend(
            items
                .iter()
                .filter(|v| !matches!(v, Bson::Null | Bson::Array(_)))
                .cloned(),
        ),
        (Some(v), true) => out.push(v.clone()),
        (Some(Bson::Document(d)), false) => collect(d, rest, out),
        (Some(Bson::Array(items)), false) => {
            for item in items {
                if let Bson::Document(d) = item {
                    collect(d, rest, out);
                }
            }
        }
        (Some(_), false) => {}
    }
}

/// Replaces, at every place `path` reaches (as [`values_at`] finds them), each value for which
/// `f` returns a replacement; returns how many were replaced.
pub fn rewrite_at(
    doc: &mut Document,
    path: &str,
    f: &mut dyn FnMut(&Bson) -> Option<Bson>,
) -> usize {
    let segs: Vec<&str> = path.split('.').collect();
    rewrite(doc, &segs, f)
}

fn rewrite(doc: &mut Document, segs: &[&str], f: &mut dyn FnMut(&Bson) -> Option<Bson>) -> usize {
    let Some((first, rest)) = segs.split_first() else {
        return 0;
    };
    let Some(v) = doc.get_mut(*first) else {
        return 0;
    };
    let mut one = |v: &mut Bson| match f(v) {
        Some(new) => {
            *v = new;
            1
        }
        None => 0,
    };
    match (v, rest.is_empty()) {
        (Bson::Null, _) => 0,
        (Bson::Array(items), true) => items
            .iter_mut()
            .filter(|v| !matches!(v, Bson::Null | Bson::Array(_)))
            .map(&mut one)
            .sum(),
        (v, true) => one(v),
        (Bson::Document(d), false) => rewrite(d, rest, f),
        (Bson::Array(items), false) => items
            .iter_mut()
            .map(|item| match item {
                Bson::Document(d) => rewrite(d, rest, f),
                _ => 0,
            })
            .sum(),
        (_, false) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_found_through_arrays() {
        let d = doc! {
            "customerId": 7,
            "items": [{ "productId": "p1" }, { "productId": "p2" }, { "other": 1 }],
            "tags": ["t1", null, "t2"],
            "nested": { "ref": { "$oid": "x" } },
            "gone": null,
        };
        assert_eq!(values_at(&d, "customerId"), vec![Bson::Int32(7)]);
        assert_eq!(
            values_at(&d, "items.productId"),
            vec![Bson::from("p1"), Bson::from("p2")]
        );
        assert_eq!(
            values_at(&d, "tags"),
            vec![Bson::from("t1"), Bson::from("t2")]
        );
        assert_eq!(values_at(&d, "nested.ref").len(), 1);
        assert!(values_at(&d, "gone").is_empty());
        assert!(values_at(&d, "missing.path").is_empty());
    }

    #[test]
    fn rewrites_replace_only_what_the_function_maps() {
        let mut d = doc! {
            "customerId": 7,
            "items": [{ "productId": "p1" }, { "productId": "p2" }],
            "tags": ["p1", "p2"],
        };
        let mut map = |v: &Bson| (v == &Bson::from("p1")).then(|| Bson::from("s1"));
        assert_eq!(rewrite_at(&mut d, "items.productId", &mut map), 1);
        assert_eq!(rewrite_at(&mut d, "tags", &mut map), 1);
        assert_eq!(rewrite_at(&mut d, "customerId", &mut map), 0);
        assert_eq!(
            d,
            doc! {
                "customerId": 7,
                "items": [{ "productId": "s1" }, { "productId": "p2" }],
                "tags": ["s1", "p2"],
            }
        );
    }
}
