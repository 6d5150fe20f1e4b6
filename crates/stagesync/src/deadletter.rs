//! Dead-letter queue: changes that cannot be applied as they are (key collisions, schema version
//! ahead, documents staging refuses). They are kept — masked — in `<metadata_database>.dead_letters`
//! with the reason, so that the stream goes on and a person can look and `dlq replay` later.
//!
//! A change that fails again (after a restart replays it) bumps `attempts` and `lastSeen` of its
//! entry instead of adding a second one.
//!
//! An entry never holds what made the change fail: it keeps the production `_id`, the
//! operation, the reason and the change itself only while that is small
//! ([`FULL_CHANGE_BYTES`]); a larger change is kept as a bounded, masked excerpt (its size, and
//! its first fields with their types and short values). So an entry can always be stored — even
//! for a document too large for staging — and `dlq replay` re-reads the document from
//! production by its `_id` anyway.

use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use mongodb::options::{FindOptions, UpdateOptions};
use mongodb::{Collection, Database};
use serde::Serialize;

use crate::plan::Failed;
use crate::source::change::Change;

/// A change up to this size (as BSON) is kept whole in its dead letter; a larger one as an
/// excerpt.
pub const FULL_CHANGE_BYTES: usize = 8 * 1024;
/// An excerpt lists at most this many fields (of the document, of an update's set and removed
/// fields)…
const EXCERPT_FIELDS: usize = 20;
/// …with names and values cut to this many characters.
const EXCERPT_CHARS: usize = 48;
/// The longest error message kept.
const MESSAGE_CHARS: usize = 1024;
/// A production `_id` larger than this (as BSON) is not kept, only described (and such an entry
/// cannot be replayed).
const MAX_ID_BYTES: usize = 4 * 1024;

/// One dead letter, as `dlq list` / `dlq show` print it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub collection: String,
    pub business_key: Option<String>,
    pub production_id: String,
    pub operation: String,
    pub error_code: String,
    pub error_message: String,
    pub first_seen: String,
    pub last_seen: String,
    pub attempts: i64,
    /// The change itself (masked), as extended JSON.
    pub change: serde_json::Value,
}

#[derive(Clone)]
pub struct DeadLetters {
    sync: String,
    db: Database,
    coll: Collection<Document>,
}

impl DeadLetters {
    pub fn new(metadata: &Database, sync: &str) -> DeadLetters {
        DeadLetters {
            sync: sync.to_string(),
            db: metadata.clone(),
            coll: metadata.collection("dead_letters"),
        }
    }

    pub async fn ensure_indexes(&self) -> mongodb::error::Result<()> {
        self.db
            .run_command(doc! {
                "createIndexes": self.coll.name(),
                "indexes": [{ "key": { "sync": 1, "collection": 1, "productionId": 1, "clusterTime": 1 }, "name": "stagesync_dead_letter" }],
            })
            .await
            .map(|_| ())
    }

    /// Records a failed change (or counts one more attempt of a known one).
    pub async fn record(
        &self,
        collection: &str,
        business_key: Option<String>,
        change: &Change,
        failure: &Failed,
    ) -> mongodb::error::Result<()> {
        let now = DateTime::now();
        let (production_id, id_kept) = if bson_len(&change.prod_id) <= MAX_ID_BYTES {
            (change.prod_id.clone(), true)
        } else {
            (Bson::String(short_id(&change.prod_id)), false)
        };
        let filter = doc! {
            "sync": &self.sync,
            "collection": collection,
            "productionId": production_id,
            "clusterTime": change.cluster_time,
        };
        let mut set = doc! {
            "businessKey": business_key.map(Bson::String).unwrap_or(Bson::Null),
            "operation": change.op.as_str(),
            "change": bounded_change(change),
            "error": {
                "code": &failure.code,
                "message": crate::retry::excerpt(&failure.message, MESSAGE_CHARS),
            },
            "lastSeen": now,
        };
        if !id_kept {
            set.insert("productionIdTruncated", true);
        }
        let update = doc! {
            "$set": set,
            "$setOnInsert": { "firstSeen": now },
            "$inc": { "attempts": 1 },
        };
        self.coll
            .update_one(filter, update)
            .with_options(UpdateOptions::builder().upsert(true).build())
            .await
            .map(|_| ())
    }

    pub async fn count(&self, collection: Option<&str>) -> mongodb::error::Result<u64> {
        let mut filter = doc! { "sync": &self.sync };
        if let Some(c) = collection {
            filter.insert("collection", c);
        }
        self.coll.count_documents(filter).await
    }

    pub async fn list(&self) -> mongodb::error::Result<Vec<(ObjectId, Document)>> {
        let docs: Vec<Document> = self
            .coll
            .find(doc! { "sync": &self.sync })
            .with_options(
                FindOptions::builder()
                    .sort(doc! { "firstSeen": 1, "_id": 1 })
                    .build(),
            )
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| Some((d.get_object_id("_id").ok()?, d)))
            .collect())
    }

    pub async fn get(&self, id: ObjectId) -> mongodb::error::Result<Option<Document>> {
        self.coll
            .find_one(doc! { "_id": id, "sync": &self.sync })
            .await
    }

    pub async fn remove(&self, id: ObjectId) -> mongodb::error::Result<bool> {
        Ok(self
            .coll
            .delete_one(doc! { "_id": id, "sync": &self.sync })
            .await?
            .deleted_count
            == 1)
    }

    pub async fn purge_all(&self) -> mongodb::error::Result<u64> {
        Ok(self
            .coll
            .delete_many(doc! { "sync": &self.sync })
            .await?
            .deleted_count)
    }

    /// Marks another failed replay attempt.
    pub async fn touch(&self, id: ObjectId, failure: &Failed) -> mongodb::error::Result<()> {
        self.coll
            .update_one(
                doc! { "_id": id },
                doc! {
                    "$set": { "lastSeen": DateTime::now(), "error": { "code": &failure.code, "message": crate::retry::excerpt(&failure.message, MESSAGE_CHARS) } },
                    "$inc": { "attempts": 1 },
                },
            )
            .await
            .map(|_| ())
    }
}

fn bson_len(v: &Bson) -> usize {
    mongodb::bson::to_vec(&doc! { "v": v.clone() })
        .map(|b| b.len())
        .unwrap_or(usize::MAX)
}

/// A production `_id` for logs and messages: at most a short line.
pub fn short_id(id: &Bson) -> String {
    let text = match id {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(o) => o.to_hex(),
        other => match bson_len(other) {
            n if n > MAX_ID_BYTES => format!("{} of {n} bytes", type_name(other)),
            _ => other.to_string(),
        },
    };
    crate::retry::excerpt(&text, 2 * EXCERPT_CHARS)
}

/// What a dead letter keeps of a change: the change itself when small, else an excerpt.
pub fn bounded_change(change: &Change) -> Document {
    let full = change.to_document();
    let size = mongodb::bson::to_vec(&full)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if size <= FULL_CHANGE_BYTES {
        return full;
    }
    let id = if bson_len(&change.prod_id) <= MAX_ID_BYTES {
        change.prod_id.clone()
    } else {
        Bson::String(short_id(&change.prod_id))
    };
    let mut d = doc! {
        "operationType": change.op.as_str(),
        "documentKey": { "_id": id },
        "clusterTime": change.cluster_time,
    };
    if let Some(w) = change.wall_time {
        d.insert("wallTime", w);
    }
    let mut excerpt = doc! { "changeBytes": size as i64 };
    if let Some(full) = &change.doc {
        excerpt.insert(
            "documentBytes",
            mongodb::bson::to_vec(full)
                .map(|b| b.len() as i64)
                .unwrap_or(-1),
        );
        excerpt.insert("documentFields", full.len() as i64);
        excerpt.insert("firstFields", fields_excerpt(full));
    }
    if let Some(u) = &change.updated_fields {
        excerpt.insert("updatedFieldCount", u.len() as i64);
        excerpt.insert("updatedFields", fields_excerpt(u));
    }
    if !change.removed_fields.is_empty() {
        excerpt.insert("removedFieldCount", change.removed_fields.len() as i64);
        excerpt.insert(
            "removedFields",
            change
                .removed_fields
                .iter()
                .take(EXCERPT_FIELDS)
                .map(|f| Bson::String(crate::retry::excerpt(f, EXCERPT_CHARS)))
                .collect::<Vec<_>>(),
        );
    }
    d.insert("excerpt", excerpt);
    d
}

/// The first fields of a (masked) document as `{field, value}` pairs, values as short text.
fn fields_excerpt(d: &Document) -> Vec<Bson> {
    d.iter()
        .take(EXCERPT_FIELDS)
        .map(|(k, v)| {
            Bson::Document(doc! {
                "field": crate::retry::excerpt(k, EXCERPT_CHARS),
                "value": short_value(v),
            })
        })
        .collect()
}

/// A value as at most a few dozen characters: short scalars as they are, long strings cut,
/// documents, arrays and binaries by their size.
fn short_value(v: &Bson) -> String {
    match v {
        Bson::String(s) if s.chars().count() > EXCERPT_CHARS => format!(
            "{} ({} characters)",
            crate::retry::excerpt(s, EXCERPT_CHARS),
            s.chars().count()
        ),
        Bson::String(s) => format!("{s:?}"),
        Bson::Document(sub) => format!("document: {} fields, {} bytes", sub.len(), bson_len(v)),
        Bson::Array(items) => format!("array: {} items, {} bytes", items.len(), bson_len(v)),
        Bson::Binary(b) => format!("binary: {} bytes", b.bytes.len()),
        Bson::JavaScriptCode(_) | Bson::JavaScriptCodeWithScope(_) | Bson::RegularExpression(_) => {
            type_name(v).to_string()
        }
        other => crate::retry::excerpt(&other.to_string(), EXCERPT_CHARS),
    }
}

fn type_name(v: &Bson) -> &'static str {
    match v {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Array(_) => "array",
        Bson::Document(_) => "document",
        Bson::Boolean(_) => "bool",
        Bson::Null => "null",
        Bson::RegularExpression(_) => "regex",
        Bson::JavaScriptCode(_) | Bson::JavaScriptCodeWithScope(_) => "javascript",
        Bson::Int32(_) => "int",
        Bson::Int64(_) => "long",
        Bson::Timestamp(_) => "timestamp",
        Bson::Binary(_) => "binary",
        Bson::ObjectId(_) => "objectId",
        Bson::DateTime(_) => "date",
        Bson::Decimal128(_) => "decimal",
        _ => "value",
    }
}

/// The printable form of a stored dead letter.
pub fn describe(id: ObjectId, d: &Document) -> DeadLetter {
    let text = |k: &str| d.get_str(k).unwrap_or("").to_string();
    let time = |k: &str| {
        d.get_datetime(k)
            .map(|t| t.try_to_rfc3339_string().unwrap_or_default())
            .unwrap_or_default()
    };
    let error = d.get_document("error").ok();
    DeadLetter {
        id: id.to_hex(),
        collection: text("collection"),
        business_key: d.get_str("businessKey").ok().map(String::from),
        production_id: d
            .get("productionId")
            .map(|v| v.to_string())
            .unwrap_or_default(),
        operation: text("operation"),
        error_code: error
            .and_then(|e| e.get_str("code").ok())
            .unwrap_or("")
            .to_string(),
        error_message: error
            .and_then(|e| e.get_str("message").ok())
            .unwrap_or("")
            .to_string(),
        first_seen: time("firstSeen"),
        last_seen: time("lastSeen"),
        attempts: d
            .get_i32("attempts")
            .map(i64::from)
            .or_else(|_| d.get_i64("attempts"))
            .unwrap_or(0),
        change: d
            .get_document("change")
            .map(|c| Bson::Document(c.clone()).into_relaxed_extjson())
            .unwrap_or(serde_json::Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::change::Op;
    use mongodb::bson::Timestamp;

    fn change(doc: Document) -> Change {
        Change {
            op: Op::Insert,
            prod_id: doc.get("_id").cloned().unwrap_or(Bson::Int32(1)),
            doc: Some(doc),
            updated_fields: None,
            removed_fields: vec![],
            cluster_time: Timestamp {
                time: 1,
                increment: 1,
            },
            wall_time: None,
            pii: vec![],
        }
    }

    #[test]
    fn a_small_change_is_kept_whole() {
        let c = change(doc! { "_id": 1, "total": 9 });
        assert_eq!(bounded_change(&c), c.to_document());
    }

    #[test]
    fn a_large_change_is_kept_as_a_bounded_excerpt() {
        let mut d = doc! { "_id": 7, "big": "x".repeat(4 * 1024 * 1024) };
        for i in 0..100 {
            d.insert(
                format!("field_{i}_{}", "n".repeat(100)),
                doc! { "a": "y".repeat(1000) },
            );
        }
        let kept = bounded_change(&change(d));
        let size = mongodb::bson::to_vec(&kept).unwrap().len();
        assert!(size < FULL_CHANGE_BYTES, "{size} bytes: {kept}");
        assert_eq!(
            kept.get_document("documentKey").unwrap().get_i32("_id"),
            Ok(7)
        );
        let excerpt = kept.get_document("excerpt").unwrap();
        assert_eq!(excerpt.get_i64("documentFields"), Ok(102));
        assert_eq!(
            excerpt.get_array("firstFields").unwrap().len(),
            EXCERPT_FIELDS
        );
        assert!(!kept.contains_key("fullDocument"));
    }

    #[test]
    fn a_huge_id_is_described_not_kept() {
        let id = Bson::String("i".repeat(100_000));
        let short = short_id(&id);
        assert!(short.chars().count() <= 2 * EXCERPT_CHARS);
    }
}
