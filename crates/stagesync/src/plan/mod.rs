//! The planning core: from a batch of production changes and the staging documents they touch,
//! decide what to write. Pure functions, no I/O — the engine fetches, this decides, `apply`
//! writes. That split is what lets the property tests run the rules thousands of times.
//!
//! The rules (README, "How documents are matched and merged"):
//! 1. an insert adopts a staging document with the same business key (live or soft-deleted),
//!    else creates one;
//! 2. an update/replace finds the staging document by the recorded production `_id`, else by
//!    business key; production's fields win, staging-only and preserved fields stay;
//! 3. a delete soft-deletes (or hard-deletes, or is ignored) the document with that production `_id`;
//! 4. a change not newer than the document's recorded `ts` is skipped (replays are no-ops);
//! 5. with last-write-wins, a newer staging edit keeps its values;
//! 6. a change that would give a document another document's business key fails;
//! 7. a document whose schema version is ahead of staging's fails.
//!
//! Within a batch the changes are applied, in order, to an in-memory copy of the staging
//! documents; the batch then becomes one write per staging document (its final state), which is
//! how coalescing falls out: insert + updates → one insert, insert + delete → one soft-deleted
//! insert, and so on.
//!
//! Business keys move within a batch too (swaps, rotations, a key handed on). Rule 6 is judged
//! as production's order and the batch's end state allow, not at a moment update events read
//! late make up (see [`plan_batch`]); and since the final writes of a swap cannot all pass the
//! unique index in any order, documents giving their key to another first take a placeholder
//! key ([`Plan::vacate`], written before [`Plan::writes`]).

mod merge;
mod overlap;
pub mod paths;
mod pii;

use std::collections::HashMap;

use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};

pub use merge::diff;
pub use overlap::Touched;
pub use paths::{get_path, PathPatterns};
pub use pii::{mask_moved_values, PII_FIELD};

use crate::config::{CollectionConfig, Conflict, DeleteMode, NewDocumentId, SyncSettings};
use crate::source::change::{Change, Op};

/// One collection's matching and merging rules, taken from the config.
#[derive(Debug, Clone)]
pub struct Rules {
    pub business_key: Vec<String>,
    pub preserve: PathPatterns,
    pub deletes: DeleteMode,
    pub soft_delete_field: String,
    pub deleted_at_field: String,
    pub schema_guard: Option<(String, i64)>,
    pub meta_field: String,
    /// `Some(field)` with last-write-wins: the staging field holding the staging edit time.
    pub staging_updated_field: Option<String>,
    /// The `_id` of a new staging document (`new_document_id`).
    pub new_id: NewDocumentId,
    /// The subset of production synced (`filter`); `None`: every document.
    pub filter: Option<crate::filter::Filter>,
}

impl Rules {
    pub fn new(sync: &SyncSettings, c: &CollectionConfig) -> Rules {
        Rules {
            business_key: c.business_key.clone(),
            preserve: PathPatterns::new(&c.preserve),
            deletes: c.deletes,
            soft_delete_field: c.soft_delete_field.clone(),
            deleted_at_field: c.deleted_at_field.clone(),
            schema_guard: c.schema_version_field.clone().zip(c.max_schema_version),
            meta_field: sync.metadata_field.clone(),
            staging_updated_field: match sync.conflict {
                Conflict::LastWriteWins => sync.staging_updated_field.clone(),
                Conflict::ProductionWins => None,
            },
            new_id: c.new_document_id(sync),
            filter: c.filter_document().map(crate::filter::Filter::new),
        }
    }

    /// `query` restricted to the collection's subset (`filter`), for reading production.
    pub fn in_subset(&self, query: Document) -> Document {
        match &self.filter {
            Some(f) => f.and(query),
            None => query,
        }
    }

    /// The dotted path of a metadata sub-field, e.g. `_sync.id`.
    pub fn meta_path(&self, sub: &str) -> String {
        format!("{}.{sub}", self.meta_field)
    }

    /// The query for documents that have every business-key field (those the unique
    /// business-key index holds: it is partial on exactly this).
    pub fn has_key_filter(&self) -> Document {
        self.business_key
            .iter()
            .map(|f| (f.clone(), Bson::Document(doc! { "$exists": true })))
            .collect()
    }

    /// The business key of a document, or the first key field it lacks.
    pub fn key_of(&self, doc: &Document) -> Result<BusinessKey, String> {
        self.key_values(doc)
            .map(|values| BusinessKey(values.into_iter().cloned().collect()))
    }

    /// `key_of(doc)`'s [`BusinessKey::canonical`] bytes, or `None` when a key field is missing:
    /// what the planner's maps and sets hold. Read in place, without copying the values — the
    /// planner asks this several times per change.
    pub fn canonical_key(&self, doc: &Document) -> Option<Vec<u8>> {
        self.key_values(doc).ok().map(canonical_key_of)
    }

    /// The values of a document's business key fields, or the first field it lacks (missing
    /// or null).
    fn key_values<'d>(&self, doc: &'d Document) -> Result<Vec<&'d Bson>, String> {
        self.business_key
            .iter()
            .map(|field| match get_path(doc, field) {
                Some(Bson::Null) | None => Err(field.clone()),
                Some(v) => Ok(v),
            })
            .collect()
    }

    /// The first look-ups of a batch: the staging documents recorded as coming from the
    /// batch's production `_id`s (`_sync.id $in [...]`) and, when some of its changes may have
    /// been applied already, those that once did (`_sync.prior.id $in [...]`: their `prior`
    /// records say which changes of them were already applied, so replays stay no-ops) — two
    /// filters, sent as separate queries: one `$or` of the index scans costs staging more than
    /// the scans apart.
    ///
    /// Production `_id`s in `fresh` (see [`fresh_inserts`]) are not looked up: an `_id` or key
    /// staging already holds refuses their insert, which then takes the slow path. Nor are the
    /// former owners of `_id`s whose changes `novelty` says no run applied yet: a `prior`
    /// record only ever tells a change is stale ([`Novelty::may_have_applied`]), and the
    /// document carrying it, when the batch needs it for its key, is found by key. In a stream
    /// that is every change after its horizon: the second query is then not sent at all.
    pub fn owner_filters(
        &self,
        changes: &[Change],
        fresh: &Fresh,
        novelty: Novelty,
    ) -> Option<(Document, Option<Document>)> {
        let mut seen = std::collections::HashSet::new();
        let mut replayable = std::collections::HashSet::new();
        let mut ids: Vec<Bson> = Vec::new();
        let mut prior_ids: Vec<Bson> = Vec::new();
        for c in changes {
            let id = canonical(&c.prod_id);
            if fresh.contains(&id) {
                continue;
            }
            if seen.insert(id.clone()) {
                ids.push(c.prod_id.clone());
            }
            if novelty.may_have_applied(c) && replayable.insert(id) {
                prior_ids.push(c.prod_id.clone());
            }
        }
        (!ids.is_empty()).then(|| {
            (
                doc! { self.meta_path("id"): { "$in": ids } },
                (!prior_ids.is_empty())
                    .then(|| doc! { self.meta_path("prior.id"): { "$in": prior_ids } }),
            )
        })
    }

    /// With `new_document_id = "production"`, the staging documents whose own `_id` a new
    /// document of the batch could take (it takes its production `_id` only when no staging
    /// document holds it): the production `_id`s of changes carrying a document, except new
    /// ones (`fresh`) and those whose own staging document — found by
    /// [`Rules::owner_filters`] — already holds that `_id` (no other document can).
    pub fn id_holder_filter(
        &self,
        changes: &[Change],
        fresh: &Fresh,
        found: &[Document],
    ) -> Option<Document> {
        if self.new_id != NewDocumentId::Production {
            return None;
        }
        let settled: std::collections::HashSet<Vec<u8>> = found
            .iter()
            .filter_map(|d| {
                let id = d.get("_id")?;
                (meta_of(d, &self.meta_field)?.get("id")? == id).then(|| canonical(id))
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let creating: Vec<Bson> = changes
            .iter()
            .filter(|c| {
                let id = canonical(&c.prod_id);
                c.doc.is_some() && !fresh.contains(&id) && !settled.contains(&id) && seen.insert(id)
            })
            .map(|c| c.prod_id.clone())
            .collect();
        (!creating.is_empty()).then(|| doc! { "_id": { "$in": creating } })
    }

    /// The business keys the batch needs looked up, given the documents found by `_id`: every
    /// key of an insert (adoption), of a change whose `_id` staging does not know, or that
    /// differs from the found document's key (a key change must check who holds the new key).
    /// The common update that keeps its key needs no key lookup at all.
    ///
    /// The changes of production `_id`s in `fresh` need none: their documents are new.
    pub fn keys_to_look_up(
        &self,
        changes: &[Change],
        found_by_id: &[Document],
        fresh: &Fresh,
    ) -> Vec<BusinessKey> {
        let known: HashMap<Vec<u8>, Option<Vec<u8>>> = found_by_id
            .iter()
            .filter_map(|d| {
                let id = meta_of(d, &self.meta_field)?.get("id")?;
                Some((canonical(id), self.canonical_key(d)))
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        changes
            .iter()
            .filter_map(|c| {
                if fresh.contains(&canonical(&c.prod_id)) {
                    return None;
                }
                let key = self.key_of(c.doc.as_ref()?).ok()?;
                let canonical_key = key.canonical();
                let settled = c.op != Op::Insert
                    && known
                        .get(&canonical(&c.prod_id))
                        .is_some_and(|k| k.as_ref() == Some(&canonical_key));
                (!settled && seen.insert(canonical_key)).then_some(key)
            })
            .collect()
    }

    /// The second lookup: staging documents holding any of `keys`. Each key field is matched
    /// with `$in` (one index range scan on the unique key index instead of one `$or` branch per
    /// key); the result may hold extra documents, which the planner simply does not touch.
    pub fn key_filter(&self, keys: &[BusinessKey]) -> Option<Document> {
        if keys.is_empty() {
            return None;
        }
        let mut filter = Document::new();
        for (i, field) in self.business_key.iter().enumerate() {
            let mut seen = std::collections::HashSet::new();
            let values: Vec<Bson> = keys
                .iter()
                .map(|k| k.0[i].clone())
                .filter(|v| seen.insert(canonical(v)))
                .collect();
            filter.insert(field.clone(), doc! { "$in": values });
        }
        Some(filter)
    }
}

/// Canonical production `_id`s whose staging documents are known not to exist yet, so the
/// batch does not look them up (see [`fresh_inserts`]).
pub type Fresh = std::collections::HashSet<Vec<u8>>;

/// What a batch knows about which of its documents are new to staging (see [`fresh_inserts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Novelty {
    /// Nothing: every document is looked up (a replay, a prune, a snapshot continued or run
    /// again, a stream whose starting time is unknown).
    Unknown,
    /// A stream opened when production's time was this: no change after it can have been
    /// applied by any run, so its inserts after it are first-time inserts.
    InsertsAfter(Timestamp),
    /// The first copy into a staging collection that held no document from production when it
    /// started: every document of it is new (a snapshot copies each production `_id` once).
    Everything,
}

impl Novelty {
    /// A stream's novelty: inserts after `replayed_until`, or nothing when it is not known.
    pub fn inserts_after(replayed_until: Option<Timestamp>) -> Novelty {
        replayed_until.map_or(Novelty::Unknown, Novelty::InsertsAfter)
    }

    /// Whether some run may have applied `c` already (it is then a replay). No: a stream's
    /// change after its horizon, any change of a first snapshot. A batch retried after a
    /// failed attempt is a replay of that attempt, so it is retried with `Unknown`.
    pub fn may_have_applied(self, c: &Change) -> bool {
        match self {
            Novelty::Unknown => true,
            Novelty::InsertsAfter(t) => ts_key(c.cluster_time) <= ts_key(t),
            Novelty::Everything => false,
        }
    }
}

/// The production `_id`s of a batch that are new to staging. With
/// [`Novelty::InsertsAfter`]`(T)` (a stream), those inserted for the first time: their first
/// change in the batch is an insert newer than `T`. With [`Novelty::Everything`] (a first
/// snapshot), every one. In both, their later changes in the batch must keep the first one's
/// business key.
///
/// None of a stream's changes after `T` can have been applied already: every change this or
/// an earlier process may have applied is at or before `T` (production's time when this
/// stream was opened; a resumed stream replays from the checkpoint), except in a batch retried
/// after a failed attempt, which is therefore retried with [`Novelty::Unknown`]. And an insert is placed by its business key, not by its
/// production `_id`, so the one staging document recorded under that `_id` — the soft-deleted
/// twin left by an earlier production document with the same `_id` — does not change where it
/// goes. So the batch writes their documents without looking them up first — the look-ups are
/// most of what a burst of inserts costs staging. What only staging can tell is checked by
/// staging itself: an insert whose business key (or `_id`) is already held — a staging
/// document to adopt, a soft-deleted one to revive, a collision — is refused with a duplicate
/// key, and its changes are planned again with their look-ups (the slow path that judges
/// adoption and collisions exactly as before). An insert the plan itself does not apply (it
/// meets a key the batch knows to be held, say) reaches no staging check, and the changes after
/// it would miss that twin: [`unsure_fresh`] sends such `_id`s back to be looked up.
///
/// The key must not move within the batch: a document inserted onto a held key and moved on
/// would otherwise be written at its new key as a new document, where production's order
/// adopts the holder and moves it.
///
/// A first snapshot has no twins to miss: the staging collection held no document from
/// production when it started, and each production `_id` is copied once. Documents staging
/// held already (restored from a dump, say) refuse the blind inserts by key or `_id` and take
/// the slow path as above.
///
/// [`Novelty::Unknown`]: nothing is fresh.
pub fn fresh_inserts(rules: &Rules, changes: &[Change], novelty: Novelty) -> Fresh {
    let new_from = |c: &Change| match novelty {
        Novelty::Unknown => false,
        Novelty::InsertsAfter(t) => c.op == Op::Insert && ts_key(c.cluster_time) > ts_key(t),
        Novelty::Everything => c.doc.is_some(),
    };
    if novelty == Novelty::Unknown {
        return Fresh::new();
    }
    let key = |c: &Change| c.doc.as_ref().and_then(|d| rules.canonical_key(d));
    // Production `_id` → the insert's key, while every change so far keeps it.
    let mut candidates: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    for c in changes {
        let id = canonical(&c.prod_id);
        match candidates.get_mut(&id) {
            None => {
                let insert_key = if new_from(c) { key(c) } else { None };
                candidates.insert(id, insert_key);
            }
            // Keys are only read while the `_id` is still a candidate: most changes are not.
            Some(kept) if kept.is_some() => {
                let keeps = c.op == Op::Delete || c.doc.is_none() || key(c) == *kept;
                if !keeps {
                    *kept = None;
                }
            }
            Some(_) => {}
        }
    }
    candidates
        .into_iter()
        .filter_map(|(id, kept)| kept.map(|_| id))
        .collect()
}

/// The `_id`s of `fresh` (see [`fresh_inserts`]) the plan made from `outcomes` cannot write
/// blind: one of their changes was not applied (an insert refused for a key the batch holds,
/// a delete or update that found no document, …). Whatever made it so may also involve a
/// staging document the batch did not look up — the soft-deleted twin of a re-used production
/// `_id` that a later delete would have found, say — so these are looked up and the batch
/// planned again before anything is written. Skips that do not depend on staging (an update
/// of a document deleted before it was read, `deletes = "ignore"`) keep an `_id` fresh.
pub fn unsure_fresh(changes: &[Change], outcomes: &[Outcome], fresh: &Fresh) -> Fresh {
    if fresh.is_empty() {
        return Fresh::new();
    }
    changes
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| {
            !matches!(
                o,
                Outcome::Applied | Outcome::Skipped(Skip::NoFullDocument | Skip::DeleteIgnored)
            )
        })
        .map(|(c, _)| canonical(&c.prod_id))
        .filter(|id| fresh.contains(id))
        .collect()
}

/// The values of a document's business key fields, in configured order.
#[derive(Debug, Clone, PartialEq)]
pub struct BusinessKey(pub Vec<Bson>);

impl BusinessKey {
    /// A byte string equal for equal keys (BSON of the values), usable as a map key.
    pub fn canonical(&self) -> Vec<u8> {
        canonical_key_of(self.0.iter().collect())
    }

    pub fn filter(&self, fields: &[String]) -> Document {
        fields.iter().cloned().zip(self.0.iter().cloned()).collect()
    }

    /// `field=value, …` for logs and dead letters (values are already masked where configured).
    pub fn describe(&self, fields: &[String]) -> String {
        fields
            .iter()
            .zip(&self.0)
            .map(|(f, v)| format!("{f}={}", short(v)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn short(v: &Bson) -> String {
    let s = match v {
        Bson::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > 64 {
        format!("{}…", s.chars().take(64).collect::<String>())
    } else {
        s
    }
}

/// [`BusinessKey::canonical`] of a key's values.
fn canonical_key_of(values: Vec<&Bson>) -> Vec<u8> {
    let mut out = vec![b'k'];
    if !encode_fields(&mut out, values.iter().copied().enumerate()) {
        let d: Document = values
            .iter()
            .enumerate()
            .map(|(i, &v)| (i.to_string(), v.clone()))
            .collect();
        out.truncate(1);
        out.extend(mongodb::bson::to_vec(&d).unwrap_or_default());
    }
    out
}

/// A byte string equal for equal BSON values (used to index `_id`s): the BSON of `{"v": v}`.
pub fn canonical(v: &Bson) -> Vec<u8> {
    let mut out = vec![b'i'];
    // The common `_id` types are written directly (no clone, no serializer); see
    // `encode_fields`.
    if !encode_v(&mut out, v) {
        out.truncate(1);
        out.extend(mongodb::bson::to_vec(&doc! { "v": v.clone() }).unwrap_or_default());
    }
    out
}

/// Appends the BSON of `{"v": v}` when `v` is a string, 32/64-bit integer or ObjectId — the
/// bytes `bson::to_vec` writes — and returns false (having appended garbage) otherwise.
fn encode_v(out: &mut Vec<u8>, v: &Bson) -> bool {
    encode_document(out, |out| encode_element(out, "v", v))
}

/// Appends the BSON of the document `{"0": v0, "1": v1, …}` as [`encode_v`] does.
fn encode_fields<'a>(out: &mut Vec<u8>, values: impl Iterator<Item = (usize, &'a Bson)>) -> bool {
    encode_document(out, |out| {
        let mut name = String::new();
        for (i, v) in values {
            name.clear();
            use std::fmt::Write;
            let _ = write!(name, "{i}");
            if !encode_element(out, &name, v) {
                return false;
            }
        }
        true
    })
}

fn encode_document(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>) -> bool) -> bool {
    let start = out.len();
    out.extend([0u8; 4]);
    if !body(out) {
        return false;
    }
    out.push(0);
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    true
}

fn encode_element(out: &mut Vec<u8>, name: &str, v: &Bson) -> bool {
    let tag = match v {
        Bson::String(_) => 0x02,
        Bson::ObjectId(_) => 0x07,
        Bson::Int32(_) => 0x10,
        Bson::Int64(_) => 0x12,
        _ => return false,
    };
    out.push(tag);
    out.extend(name.as_bytes());
    out.push(0);
    match v {
        Bson::String(s) => {
            out.extend((s.len() as i32 + 1).to_le_bytes());
            out.extend(s.as_bytes());
            out.push(0);
        }
        Bson::ObjectId(oid) => out.extend(oid.bytes()),
        Bson::Int32(n) => out.extend(n.to_le_bytes()),
        Bson::Int64(n) => out.extend(n.to_le_bytes()),
        _ => unreachable!("tag checked above"),
    }
    true
}

/// What became of one change.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied,
    Skipped(Skip),
    Failed(Failed),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not newer than what the staging document already reflects (a replay).
    Stale,
    /// A delete or update of a document staging never received.
    Unknown,
    /// An update whose document was deleted before it could be looked up.
    NoFullDocument,
    /// `deletes = "ignore"`.
    DeleteIgnored,
    /// Last-write-wins: the staging edit is newer.
    StagingNewer,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Stale => "stale",
            Skip::Unknown => "unknown_document",
            Skip::NoFullDocument => "no_full_document",
            Skip::DeleteIgnored => "delete_ignored",
            Skip::StagingNewer => "staging_newer",
        }
    }
}

/// A change that cannot be applied as it is; it goes to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// Stable machine-readable reason: `key_collision`, `schema_ahead`, `missing_key`, or a
    /// staging error code name for failures found while writing.
    pub code: String,
    pub message: String,
}

impl Failed {
    fn outcome(code: &str, message: String) -> Outcome {
        Outcome::Failed(Failed {
            code: code.into(),
            message,
        })
    }
}

/// One write to staging: the final state of one staging document after the batch.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    Insert(Document),
    Update {
        id: Bson,
        set: Document,
        unset: Document,
    },
    Delete {
        id: Bson,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedWrite {
    pub op: WriteOp,
    /// Indices (into the batch) of the changes folded into this write.
    pub changes: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Temporary moves, written — and acknowledged — before `writes`: each staging document
    /// that gives its business key to another document of the batch (a key swap or rotation, a
    /// key handed on) first takes a placeholder key of its own, so that no order of `writes`
    /// can trip the unique business-key index. They carry no change (`changes` is empty); the
    /// document's final write sets its real key. See [`placeholder_key`].
    pub vacate: Vec<PlannedWrite>,
    /// The final state of each staging document the batch changes; no two of them depend on
    /// each other once `vacate` is written, so they can be applied in any order.
    pub writes: Vec<PlannedWrite>,
    /// One outcome per change of the batch, in order. `Applied` means "applied once the write
    /// that carries it succeeds".
    pub outcomes: Vec<Outcome>,
    /// Changes that created a staging document under a fresh `_id` although
    /// `new_document_id = "production"`: a staging document already held their production `_id`.
    pub fresh_ids: Vec<usize>,
    /// The documents the updates of `writes` leave in staging, whole (an insert's is its own
    /// document): see [`Plan::take_final_documents`].
    updated: Vec<Document>,
}

impl Plan {
    /// Moves the documents `writes` leave in staging, whole, out of the plan (a document
    /// deleted is not among them): the next batch can be planned against them before they are
    /// written (see [`Touched::planned_after`]). Taken once the writes are encoded
    /// (`Applier::encode`), so nothing is copied; an insert keeps only its `_id`, the one part
    /// of it read afterwards (by `references`). A batch nobody plans ahead of (a snapshot's, a
    /// replay's) takes nothing.
    pub fn take_final_documents(&mut self) -> Vec<Document> {
        let mut finals = Vec::with_capacity(self.writes.len());
        for w in &mut self.writes {
            if let WriteOp::Insert(d) = &mut w.op {
                let mut id_only = Document::new();
                if let Some(id) = d.get("_id") {
                    id_only.insert("_id", id.clone());
                }
                finals.push(std::mem::replace(d, id_only));
            }
        }
        finals.append(&mut self.updated);
        finals
    }
}

/// A staging document as the batch goes on.
struct Slot {
    original: Option<Document>,
    current: Option<Document>,
    changes: Vec<usize>,
}

/// What a whole batch does to each production document, computed once per batch.
struct BatchIndex {
    /// Production `_id` → its updates, replaces and hard deletes.
    moves: HashMap<Vec<u8>, Vec<Move>>,
    /// Production `_id` → the index of its last change.
    last_change: HashMap<Vec<u8>, usize>,
    /// Business key → the inserts carrying it: (index, production `_id`).
    inserts: HashMap<Vec<u8>, Vec<(usize, Vec<u8>)>>,
    /// Production `_id`s with an update: update events carry the document as it is when read,
    /// so where such a document stands at a given point of the batch is not known.
    read_late: std::collections::HashSet<Vec<u8>>,
}

impl BatchIndex {
    fn new(rules: &Rules, changes: &[Change]) -> BatchIndex {
        let mut index = BatchIndex {
            moves: HashMap::new(),
            last_change: HashMap::new(),
            inserts: HashMap::new(),
            read_late: std::collections::HashSet::new(),
        };
        for (at, c) in changes.iter().enumerate() {
            let id = canonical(&c.prod_id);
            index.last_change.insert(id.clone(), at);
            let key = |d: &Document| rules.canonical_key(d);
            match (c.op, &c.doc) {
                (Op::Insert, Some(d)) => {
                    if let Some(k) = key(d) {
                        index.inserts.entry(k).or_default().push((at, id));
                    }
                }
                (Op::Update | Op::Replace, Some(d)) => {
                    if c.op == Op::Update {
                        index.read_late.insert(id.clone());
                    }
                    let m = Move { at, leaves: key(d) };
                    index.moves.entry(id).or_default().push(m);
                }
                (Op::Update, None) => {
                    index.read_late.insert(id);
                }
                (Op::Delete, _) if rules.deletes == DeleteMode::Hard => {
                    let m = Move { at, leaves: None };
                    index.moves.entry(id).or_default().push(m);
                }
                _ => {}
            }
        }
        index
    }
}

/// An update, replace or hard delete of the batch: it moves (or removes) the staging document
/// of its production `_id`.
#[derive(Debug, Clone)]
struct Move {
    /// Index of the change in the batch.
    at: usize,
    /// The business key the change leaves the document at (`None`: none, or hard-deleted).
    leaves: Option<Vec<u8>>,
}

/// In-memory staging state of one batch, indexed three ways.
struct Working<'r> {
    rules: &'r Rules,
    slots: Vec<Slot>,
    by_prod_id: HashMap<Vec<u8>, usize>,
    by_key: HashMap<Vec<u8>, usize>,
    /// Production `_id` → the newest change of it known applied to a document it no longer owns.
    prior: HashMap<Vec<u8>, (u32, u32)>,
    /// What the whole batch does, for judging double holds of a key (see [`plan_batch`]).
    batch: &'r BatchIndex,
    /// The index of the change being planned.
    at: usize,
    /// Changes refused on a key collision without exception: their tentative move did not
    /// stand in an earlier pass (see [`plan_batch`]).
    strict: std::collections::HashSet<usize>,
    /// Moves accepted for now onto a key another document held at that moment, because the
    /// double hold may still end within the batch (see [`plan_batch`]): (change, slot, key).
    tentative: Vec<(usize, usize, Vec<u8>)>,
    /// Tentative moves that made another change fail (see [`Working::blame`]).
    blamed: Vec<usize>,
    /// The staging `_id`s of every document of the batch (fetched or created): a new document
    /// takes its production `_id` only when it is not among them.
    staging_ids: std::collections::HashSet<Vec<u8>>,
    /// See [`Plan::fresh_ids`].
    fresh_ids: Vec<usize>,
}

impl<'r> Working<'r> {
    fn new(rules: &'r Rules, batch: &'r BatchIndex, existing: Vec<Document>) -> Working<'r> {
        let mut w = Working {
            rules,
            batch,
            slots: Vec::new(),
            by_prod_id: HashMap::new(),
            by_key: HashMap::new(),
            prior: HashMap::new(),
            at: 0,
            strict: std::collections::HashSet::new(),
            tentative: Vec::new(),
            blamed: Vec::new(),
            staging_ids: std::collections::HashSet::new(),
            fresh_ids: Vec::new(),
        };
        let mut seen = std::collections::HashSet::new();
        for d in existing {
            if seen.insert(d.get("_id").map(canonical)) {
                w.add(Some(d.clone()), d);
            }
        }
        w
    }

    fn add(&mut self, original: Option<Document>, current: Document) -> usize {
        if let Some(id) = current.get("_id") {
            self.staging_ids.insert(canonical(id));
        }
        let i = self.slots.len();
        self.slots.push(Slot {
            original,
            current: Some(current),
            changes: vec![],
        });
        self.index(i);
        i
    }

    /// Indexes slot `i`. Two staging documents can claim one production `_id` (a re-inserted
    /// document adopting another's soft-deleted twin by key); the most recently synced claim
    /// wins, so the outcome does not depend on the order documents were fetched in.
    fn index(&mut self, i: usize) {
        let Some(doc) = &self.slots[i].current else {
            return;
        };
        let meta = meta_of(doc, &self.rules.meta_field);
        for p in meta
            .and_then(|m| m.get_array("prior").ok())
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_document())
        {
            if let (Some(id), Ok(ts)) = (p.get("id"), p.get_timestamp("ts")) {
                let newest = self.prior.entry(canonical(id)).or_insert(ts_key(ts));
                *newest = (*newest).max(ts_key(ts));
            }
        }
        if let Some(id) = meta.and_then(|m| m.get("id")) {
            let ts = meta.and_then(|m| m.get_timestamp("ts").ok()).map(ts_key);
            let slots = &self.slots;
            let meta_field = &self.rules.meta_field;
            let claim_ts = |j: usize| {
                slots[j]
                    .current
                    .as_ref()
                    .and_then(|d| meta_of(d, meta_field))
                    .and_then(|m| m.get_timestamp("ts").ok())
                    .map(ts_key)
            };
            match self.by_prod_id.entry(canonical(id)) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(i);
                }
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    if ts >= claim_ts(*e.get()) {
                        e.insert(i);
                    }
                }
            }
        }
        if let Some(k) = self.rules.canonical_key(doc) {
            self.by_key.entry(k).or_insert(i);
        }
    }

    /// Changes slot `i`'s document (or removes it, when `change` returns `None`), keeping the
    /// indexes right: claims the document gives up fall back to the next document holding them,
    /// exactly as a fresh lookup of the next batch would see it.
    fn update(&mut self, i: usize, change: impl FnOnce(Document) -> Option<Document>) {
        // Only the slot's current document put entries pointing at `i`: release those.
        let doc = self.slots[i]
            .current
            .take()
            .expect("updated slots are live");
        let id = meta_of(&doc, &self.rules.meta_field)
            .and_then(|m| m.get("id"))
            .map(canonical);
        let key = self.rules.canonical_key(&doc);
        let mut released_ids: Vec<Vec<u8>> = id
            .filter(|k| self.by_prod_id.get(k) == Some(&i))
            .into_iter()
            .collect();
        let mut released_keys: Vec<Vec<u8>> = key
            .filter(|k| self.by_key.get(k) == Some(&i))
            .into_iter()
            .collect();
        for k in &released_ids {
            self.by_prod_id.remove(k);
        }
        for k in &released_keys {
            self.by_key.remove(k);
        }
        self.slots[i].current = change(doc);
        self.index(i);
        // Claims the document kept are settled; a claim it gave up falls back to another
        // document holding it (rare: a key change or an adoption), found by one scan.
        released_ids.retain(|k| !self.by_prod_id.contains_key(k));
        released_keys.retain(|k| !self.by_key.contains_key(k));
        if released_ids.is_empty() && released_keys.is_empty() {
            return;
        }
        for j in (0..self.slots.len()).filter(|&j| j != i) {
            let Some(d) = &self.slots[j].current else {
                continue;
            };
            let claims_id = meta_of(d, &self.rules.meta_field)
                .and_then(|m| m.get("id"))
                .is_some_and(|id| released_ids.contains(&canonical(id)));
            let claims_key = self
                .rules
                .canonical_key(d)
                .is_some_and(|k| released_keys.contains(&k));
            if claims_id || claims_key {
                self.index(j);
            }
        }
    }

    fn doc(&self, i: usize) -> &Document {
        self.slots[i]
            .current
            .as_ref()
            .expect("located slots are live")
    }

    fn find_by_prod_id(&self, id: &Bson) -> Option<usize> {
        self.by_prod_id
            .get(&canonical(id))
            .copied()
            .filter(|&i| self.slots[i].current.is_some())
    }

    fn find_by_key(&self, key: &BusinessKey) -> Option<usize> {
        self.by_key
            .get(&key.canonical())
            .copied()
            .filter(|&i| self.slots[i].current.is_some())
    }

    /// True when a change of this production `_id` at `ts` was already applied to a document
    /// the `_id` has since lost to another owner (so it must not be applied again).
    fn seen_before(&self, c: &Change) -> bool {
        self.prior
            .get(&canonical(&c.prod_id))
            .is_some_and(|&newest| ts_key(c.cluster_time) <= newest)
    }

    /// True when staging document `i` already reflects `c` or something newer (the order rule).
    fn reflects(&self, i: usize, c: &Change) -> bool {
        meta_of(self.doc(i), &self.rules.meta_field)
            .and_then(|m| m.get_timestamp("ts").ok())
            .is_some_and(|seen| ts_key(c.cluster_time) <= ts_key(seen))
    }

    fn is_soft_deleted(&self, i: usize) -> bool {
        self.doc(i)
            .get_bool(&self.rules.soft_delete_field)
            .unwrap_or(false)
    }

    /// Adds fingerprints to slot `i`'s `_sync.pii` (nothing else changes, not even `ts`);
    /// true when some were new.
    fn remember_pii(&mut self, i: usize, pii: &[String]) -> bool {
        let meta_field = &self.rules.meta_field;
        let doc = self.slots[i]
            .current
            .as_mut()
            .expect("located slots are live");
        let mut meta = meta_of(doc, meta_field).cloned().unwrap_or_default();
        let mut known: std::collections::BTreeSet<String> = meta
            .get_array(PII_FIELD)
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let before = known.len();
        known.extend(pii.iter().cloned());
        if known.len() == before {
            return false;
        }
        meta.insert(PII_FIELD, known.into_iter().collect::<Vec<_>>());
        doc.insert(meta_field.clone(), meta);
        true
    }

    /// True when the batch may still move slot `i` off `key`: its production owner has a later
    /// change, or — staging-only or soft-deleted, so adopted by business key — a later insert
    /// carries `key`. Whether it does is checked at the end of the batch.
    fn involved_later(&self, i: usize, key: &[u8]) -> bool {
        let owner_changes_later = self
            .owner(i)
            .and_then(|id| self.batch.last_change.get(&canonical(id)))
            .is_some_and(|&last| last > self.at);
        let adopted_later = (self.owner(i).is_none() || self.is_soft_deleted(i))
            && self
                .batch
                .inserts
                .get(key)
                .is_some_and(|v| v.iter().any(|(at, _)| *at > self.at));
        owner_changes_later || adopted_later
    }

    /// True when slot `i`'s production owner has an update in this batch (see `read_late`).
    fn is_read_late(&self, i: usize) -> bool {
        self.owner(i)
            .is_some_and(|id| self.batch.read_late.contains(&canonical(id)))
    }

    /// True when the last update or replace of production `_id` `id` after the change being
    /// planned leaves its document at a key other than `key` (or is a hard delete).
    fn owner_moves_off_later(&self, id: &Bson, key: &[u8]) -> bool {
        self.last_move_leaves(&canonical(id), self.at, key)
    }

    /// True when the last update, replace or hard delete of production `_id` `id` (canonical)
    /// comes after change `after` and leaves its document at a key other than `key`.
    fn last_move_leaves(&self, id: &[u8], after: usize, key: &[u8]) -> bool {
        self.batch
            .moves
            .get(id)
            .and_then(|moves| moves.last())
            .is_some_and(|m| m.at > after && m.leaves.as_deref() != Some(key))
    }

    /// A change is refused because slot `holder` holds `key`: if a tentative move put it there,
    /// that move must not stand (it would make the batch refuse what one change at a time
    /// applies).
    fn blame(&mut self, holder: usize, key: &[u8]) {
        let culprits: Vec<usize> = self
            .tentative
            .iter()
            .filter(|(_, t, k)| *t == holder && k.as_slice() == key)
            .map(|(c, _, _)| *c)
            .collect();
        self.blamed.extend(culprits);
    }

    /// The tentative moves that must not stand: those whose key is still held by another
    /// document at the end of the batch, and those that made another change fail.
    fn unresolved_moves(&self) -> Vec<usize> {
        let key_of = |j: usize| {
            self.slots[j]
                .current
                .as_ref()
                .and_then(|d| self.rules.canonical_key(d))
        };
        self.tentative
            .iter()
            .filter(|(_, t, key)| {
                key_of(*t).as_ref() == Some(key)
                    && (0..self.slots.len()).any(|j| j != *t && key_of(j).as_ref() == Some(key))
            })
            .map(|(c, _, _)| *c)
            .chain(self.blamed.iter().copied())
            .collect()
    }

    /// The `_id` of a new staging document for production `_id` `prod_id` (`new_document_id`):
    /// the production `_id` unless a staging document of the batch holds it (a staging-only
    /// document, or one being replaced within the batch) — then, as with `"generate"`, a fresh
    /// ObjectId (recorded in `fresh_ids`).
    fn new_document_id(&mut self, prod_id: &Bson) -> Bson {
        if self.rules.new_id == NewDocumentId::Production {
            if !self.staging_ids.contains(&canonical(prod_id)) {
                return prod_id.clone();
            }
            self.fresh_ids.push(self.at);
        }
        Bson::ObjectId(mongodb::bson::oid::ObjectId::new())
    }

    fn owner(&self, i: usize) -> Option<&Bson> {
        meta_of(self.doc(i), &self.rules.meta_field).and_then(|m| m.get("id"))
    }
}

/// The metadata sub-document of a staging document, if any.
pub fn meta_of<'a>(doc: &'a Document, meta_field: &str) -> Option<&'a Document> {
    doc.get_document(meta_field).ok()
}

fn ts_key(t: Timestamp) -> (u32, u32) {
    (t.time, t.increment)
}

/// Plans one batch of one collection.
///
/// `existing` holds the staging documents found by [`Rules::owner_filters`],
/// [`Rules::id_holder_filter`] and
/// [`Rules::key_filter`] (duplicates are fine); `now` stands in for
/// a delete's wall time when production did not send one.
///
/// Business keys read late: update events carry production's document as it is when the
/// stream is read (`updateLookup`), not as the update left it. Within a batch, a document can
/// therefore show up at its final key before the change of the document that gives that key
/// away (a swap, a rotation) has been planned — or sit at a key it only holds before and after
/// the batch while another document passes through it. So when update events are involved (the
/// change is an update, or the holder's production owner has updates in this batch), a move
/// onto a key held by another document is accepted for now if the double hold may still end
/// within the batch: the holder changes later in it (its owner has a later change; a
/// staging-only or soft-deleted holder is adopted by a later insert of that key), or the moving
/// document leaves the key again.
///
/// Should the key still be held twice at the end, or the move make another change fail, the
/// batch is planned again with that change refused as a key collision — as it would have been
/// without the exception. Batches without updates are planned exactly one change at a time.
pub fn plan_batch(
    rules: &Rules,
    changes: &[Change],
    existing: Vec<Document>,
    now: DateTime,
) -> Plan {
    let batch = BatchIndex::new(rules, changes);
    let mut strict = std::collections::HashSet::new();
    let mut existing = existing;
    loop {
        let (w, outcomes) = plan_pass(rules, &batch, changes, existing, now, &strict);
        let unresolved = w.unresolved_moves();
        if unresolved.is_empty() {
            return finish_plan(rules, w, outcomes);
        }
        strict.extend(unresolved);
        // Start again from the staging documents as fetched.
        existing = w.slots.into_iter().filter_map(|s| s.original).collect();
    }
}

/// One pass of [`plan_batch`] over the whole batch.
fn plan_pass<'r>(
    rules: &'r Rules,
    batch: &'r BatchIndex,
    changes: &[Change],
    existing: Vec<Document>,
    now: DateTime,
    strict: &std::collections::HashSet<usize>,
) -> (Working<'r>, Vec<Outcome>) {
    let mut w = Working::new(rules, batch, existing);
    w.strict = strict.clone();
    let outcomes = changes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            w.at = i;
            let (outcome, slot) = plan_change(&mut w, c, now);
            match (&outcome, slot) {
                (Outcome::Applied, Some(s)) => w.slots[s].changes.push(i),
                // A change that fails still shows personal values: its document remembers their
                // fingerprints, so that a later `$rename` of one is masked — in staging and in
                // the dead letter of the next failure alike.
                (Outcome::Failed(_), _) if !c.pii.is_empty() => {
                    if let Some(s) = w.find_by_prod_id(&c.prod_id) {
                        if w.remember_pii(s, &c.pii) {
                            w.slots[s].changes.push(i);
                        }
                    }
                }
                _ => {}
            }
            outcome
        })
        .collect();
    (w, outcomes)
}

/// Turns the planned working state into writes (see [`Plan`]).
fn finish_plan(rules: &Rules, w: Working, outcomes: Vec<Outcome>) -> Plan {
    let fresh_ids: Vec<usize> = w
        .fresh_ids
        .iter()
        .copied()
        .filter(|&i| outcomes[i] == Outcome::Applied)
        .collect();
    let slots: Vec<Slot> = w
        .slots
        .into_iter()
        .filter(|s| !s.changes.is_empty())
        .collect();
    // Business keys at the start and at the end of the batch. A document that ends on a key
    // another written document holds at the start depends on that one moving first; a swap or
    // rotation makes those dependencies a cycle no order of final writes can satisfy. So every
    // document whose starting key is taken by another first moves to a placeholder key.
    let key_at = |d: Option<&Document>| d.and_then(|d| rules.canonical_key(d));
    // Each slot's key at the start and at the end of the batch, read once.
    type StartAndEnd = (Option<Vec<u8>>, Option<Vec<u8>>);
    let keys: Vec<StartAndEnd> = slots
        .iter()
        .map(|s| (key_at(s.original.as_ref()), key_at(s.current.as_ref())))
        .collect();
    let taken: std::collections::HashSet<&Vec<u8>> = keys
        .iter()
        .filter_map(|(start, end)| end.as_ref().filter(|&end| Some(end) != start.as_ref()))
        .collect();
    let mut vacate = Vec::new();
    let mut writes = Vec::new();
    let mut updated = Vec::new();
    for (s, (start, end)) in slots.into_iter().zip(&keys) {
        let gives_key_away = start
            .as_ref()
            .is_some_and(|k| taken.contains(k) && start != end);
        let op = match (s.original, s.current) {
            (None, Some(doc)) => WriteOp::Insert(doc),
            (Some(before), Some(after)) => {
                let (mut set, mut unset) = diff(&before, &after);
                if set.is_empty() && unset.is_empty() {
                    continue;
                }
                let id = before.get("_id").cloned().unwrap_or(Bson::Null);
                if gives_key_away {
                    vacate.push(placeholder_write(rules, &id));
                    // The placeholder replaced the first key field: the final write sets it
                    // (or removes it) even where the diff from the start does not.
                    let field = &rules.business_key[0];
                    force_path(
                        &mut set,
                        &mut unset,
                        field,
                        get_path(&after, field).cloned(),
                    );
                }
                updated.push(after);
                WriteOp::Update { id, set, unset }
            }
            (Some(before), None) => {
                let id = before.get("_id").cloned().unwrap_or(Bson::Null);
                if gives_key_away {
                    vacate.push(placeholder_write(rules, &id));
                }
                WriteOp::Delete { id }
            }
            (None, None) => continue,
        };
        writes.push(PlannedWrite {
            op,
            changes: s.changes,
        });
    }
    Plan {
        vacate,
        writes,
        outcomes,
        fresh_ids,
        updated,
    }
}

/// The placeholder a staging document holds between the two steps of a batch that moves its
/// business key to another document: its first key field becomes a string derived from its own
/// staging `_id`, so it is unique (also under a non-partial unique index) and cannot be a
/// production value by accident. Should stagesync stop between the steps, the next run replays
/// the batch (the placeholder write leaves `_sync.ts` alone) and writes the real key.
pub fn placeholder_key(staging_id: &Bson) -> Bson {
    Bson::String(format!(
        "stagesync:moving:{}",
        hex::encode(canonical(staging_id))
    ))
}

fn placeholder_write(rules: &Rules, staging_id: &Bson) -> PlannedWrite {
    let mut set = Document::new();
    set.insert(rules.business_key[0].clone(), placeholder_key(staging_id));
    PlannedWrite {
        op: WriteOp::Update {
            id: staging_id.clone(),
            set,
            unset: Document::new(),
        },
        changes: vec![],
    }
}

/// Makes an update set `path` to `value` (or unset it when `None`), unless an ancestor of
/// `path` is already set or unset whole; entries below `path` give way.
fn force_path(set: &mut Document, unset: &mut Document, path: &str, value: Option<Bson>) {
    let below = format!("{path}.");
    let covered = set
        .keys()
        .chain(unset.keys())
        .any(|k| path.starts_with(&format!("{k}.")));
    if covered {
        return;
    }
    for d in [&mut *set, &mut *unset] {
        let under: Vec<String> = d
            .keys()
            .filter(|k| *k == path || k.starts_with(&below))
            .cloned()
            .collect();
        for k in under {
            d.remove(&k);
        }
    }
    match value {
        Some(v) => {
            set.insert(path, v);
        }
        None => {
            unset.insert(path, "");
        }
    }
}

/// Applies one change to the working state; returns its outcome and the slot it changed.
fn plan_change(w: &mut Working, c: &Change, now: DateTime) -> (Outcome, Option<usize>) {
    let rules = w.rules;
    if w.seen_before(c) {
        return (Outcome::Skipped(Skip::Stale), None);
    }
    if c.op == Op::Delete {
        return plan_delete(w, c, now);
    }
    let Some(prod) = &c.doc else {
        return (Outcome::Skipped(Skip::NoFullDocument), None);
    };
    if let Some((field, max)) = &rules.schema_guard {
        if let Some(v) = get_path(prod, field).and_then(as_i64) {
            if v > *max {
                return (
                    Failed::outcome(
                        "schema_ahead",
                        format!("schema version {v} is ahead of staging's {max}"),
                    ),
                    None,
                );
            }
        }
    }
    let key = match rules.key_of(prod) {
        Ok(k) => k,
        Err(field) => {
            return (
                Failed::outcome(
                    "missing_key",
                    format!("the production document has no business key field `{field}`"),
                ),
                None,
            )
        }
    };
    // Locate the staging document: inserts by business key (adoption, else a new document),
    // updates by the recorded production `_id` first (so a business key change moves the same
    // document), then by key.
    let by_id = w.find_by_prod_id(&c.prod_id);
    let by_key = w.find_by_key(&key);
    // Already reflected where this `_id` lives now (e.g. a replayed insert of a document that
    // has since changed its key): nothing to do.
    if by_id.is_some_and(|t| w.reflects(t, c)) {
        return (Outcome::Skipped(Skip::Stale), None);
    }
    let target = match c.op {
        Op::Insert => by_key,
        _ => by_id.or(by_key),
    };
    if let Some(t) = target {
        if w.reflects(t, c) {
            return (Outcome::Skipped(Skip::Stale), None);
        }
        // Adopting a document by key: refuse to take over one that belongs to another live
        // production document (two production documents with one business key).
        if Some(t) == by_key && Some(t) != by_id && !w.is_soft_deleted(t) {
            if let Some(owner) = w.owner(t) {
                if *owner != c.prod_id {
                    let outcome = collision(rules, &key, w.doc(t), false);
                    w.blame(t, &key.canonical());
                    return (outcome, None);
                }
            }
        }
        // Moving to a business key held by another staging document: refused, unless the
        // double hold is an artifact of update events read late and ends within this batch
        // (see `plan_batch`).
        if let Some(other) = by_key.filter(|&o| o != t) {
            let k = key.canonical();
            let passing = (c.op == Op::Update || w.is_read_late(other))
                && (w.involved_later(other, &k) || w.owner_moves_off_later(&c.prod_id, &k));
            if passing && !w.strict.contains(&w.at) {
                w.tentative.push((w.at, t, key.canonical()));
            } else {
                let soft = w.is_soft_deleted(other);
                let outcome = collision(rules, &key, w.doc(other), soft);
                w.blame(other, &key.canonical());
                return (outcome, None);
            }
        }
        if let Some(field) = &rules.staging_updated_field {
            if let (Ok(edited), Some(change_time)) = (w.doc(t).get_datetime(field), c.wall_time) {
                if *edited > change_time {
                    return (Outcome::Skipped(Skip::StagingNewer), None);
                }
            }
        }
    }
    let slot = match target {
        Some(t) => t,
        None => {
            let id = w.new_document_id(&c.prod_id);
            w.add(None, doc! { "_id": id })
        }
    };
    w.update(slot, |mut staging| {
        merge_change(rules, &mut staging, prod, c);
        Some(staging)
    });
    (Outcome::Applied, Some(slot))
}

fn collision(rules: &Rules, key: &BusinessKey, holder: &Document, soft_deleted: bool) -> Outcome {
    let state = if soft_deleted { "soft-deleted" } else { "live" };
    let id = holder.get("_id").map(short).unwrap_or_default();
    Failed::outcome(
        "key_collision",
        format!(
            "business key {} already belongs to {state} staging document _id {id}",
            key.describe(&rules.business_key)
        ),
    )
}

/// Merges a production document into a staging document and records the metadata.
fn merge_change(rules: &Rules, staging: &mut Document, prod: &Document, c: &Change) {
    let prod_fields: Vec<String> = prod
        .keys()
        .filter(|k| *k != "_id" && **k != rules.meta_field)
        .cloned()
        .collect();
    let previously: Vec<String> = meta_of(staging, &rules.meta_field)
        .and_then(|m| m.get_array("fields").ok())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    merge::merge_into(staging, prod, &prod_fields, &previously, &rules.preserve);
    // Reviving: production has the document again, so the soft-delete marks go (unless
    // production itself owns fields of those names).
    for f in [&rules.soft_delete_field, &rules.deleted_at_field] {
        if !prod_fields.contains(f) {
            staging.remove(f);
        }
    }
    let mut meta = doc! { "id": c.prod_id.clone(), "ts": c.cluster_time, "fields": prod_fields };
    let prior = prior_owners_after(meta_of(staging, &rules.meta_field), &c.prod_id);
    if !prior.is_empty() {
        meta.insert("prior", prior);
    }
    // Fingerprints of the document's personal values, so a later `$rename` of one is still
    // masked (see `pii`).
    if !c.pii.is_empty() {
        meta.insert(PII_FIELD, c.pii.clone());
    }
    staging.insert(rules.meta_field.clone(), meta);
}

/// How many earlier owners a staging document remembers (see [`prior_owners_after`]).
const MAX_PRIOR_OWNERS: usize = 8;

/// When a document passes from one production `_id` to another (a re-insert adopting a
/// soft-deleted document by key), the old owner and the last change of it that was applied are
/// remembered in `prior: [{id, ts}]`, newest last. Without this, replaying the old owner's
/// changes would find no document of theirs and recreate ghosts; with it, they are recognised as
/// already applied (see `Working::seen_before`).
fn prior_owners_after(meta: Option<&Document>, new_owner: &Bson) -> Vec<Bson> {
    let Some(meta) = meta else { return vec![] };
    let mut prior: Vec<Bson> = meta.get_array("prior").cloned().unwrap_or_default();
    if let (Some(old), Ok(ts)) = (meta.get("id"), meta.get_timestamp("ts")) {
        if old != new_owner {
            prior.retain(|p| p.as_document().and_then(|d| d.get("id")) != Some(old));
            prior.push(Bson::Document(doc! { "id": old.clone(), "ts": ts }));
        }
    }
    let excess = prior.len().saturating_sub(MAX_PRIOR_OWNERS);
    prior.drain(..excess);
    prior
}

fn plan_delete(w: &mut Working, c: &Change, now: DateTime) -> (Outcome, Option<usize>) {
    let rules = w.rules;
    if rules.deletes == DeleteMode::Ignore {
        return (Outcome::Skipped(Skip::DeleteIgnored), None);
    }
    let Some(t) = w.find_by_prod_id(&c.prod_id) else {
        return (Outcome::Skipped(Skip::Unknown), None);
    };
    let meta = meta_of(w.doc(t), &rules.meta_field)
        .cloned()
        .unwrap_or_default();
    if let Ok(seen) = meta.get_timestamp("ts") {
        if ts_key(c.cluster_time) <= ts_key(seen) {
            return (Outcome::Skipped(Skip::Stale), None);
        }
    }
    match rules.deletes {
        DeleteMode::Hard => {
            w.update(t, |_| None);
        }
        _ => {
            let staging = w.slots[t].current.as_mut().expect("live slot");
            staging.insert(rules.soft_delete_field.clone(), true);
            staging.insert(rules.deleted_at_field.clone(), c.wall_time.unwrap_or(now));
            let mut meta = meta;
            meta.insert("ts", c.cluster_time);
            staging.insert(rules.meta_field.clone(), meta);
        }
    }
    (Outcome::Applied, Some(t))
}

fn as_i64(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(n) => Some(*n as i64),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) if f.is_finite() => Some(f.ceil() as i64),
        Bson::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
