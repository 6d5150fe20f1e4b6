//! Dead-letter queue: changes that cannot be applied as they are (key collisions, schema version
//! ahead, documents staging refuses). They are kept — masked — in `<metadata_database>.dead_letters`
//! with the reason, so that the stream goes on and a person can look and `dlq replay` later.
//!
//! A change that fails again (after a restart replays it) bumps `attempts` and `lastSeen` of its
//! entry instead of adding a second one.

use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use mongodb::options::{FindOptions, UpdateOptions};
use mongodb::{Collection, Database};
use serde::Serialize;

use crate::plan::Failed;
use crate::source::change::Change;

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
        let filter = doc! {
            "sync": &self.sync,
            "collection": collection,
            "productionId": change.prod_id.clone(),
            "clusterTime": change.cluster_time,
        };
        let update = doc! {
            "$set": {
                "businessKey": business_key.map(Bson::String).unwrap_or(Bson::Null),
                "operation": change.op.as_str(),
                "change": change.to_document(),
                "error": { "code": &failure.code, "message": &failure.message },
                "lastSeen": now,
            },
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
                    "$set": { "lastSeen": DateTime::now(), "error": { "code": &failure.code, "message": &failure.message } },
                    "$inc": { "attempts": 1 },
                },
            )
            .await
            .map(|_| ())
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
