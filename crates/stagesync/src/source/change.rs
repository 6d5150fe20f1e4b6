//! The engine's own view of one production change: what happened to which production document,
//! when, and (already masked) what that document looks like now.
//!
//! Change stream events are converted into [`Change`]s right where they are read, and masked in
//! the same step, so no later stage ever holds a raw production value.

use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};

use crate::transform::Masker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Insert,
    Update,
    Replace,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Replace => "replace",
            Op::Delete => "delete",
        }
    }
}

/// One document-level production change, masked.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub op: Op,
    /// The production `_id` (never masked: it is only used to find the staging document again).
    pub prod_id: Bson,
    /// The production document after the change (insert/replace: the event's; update: looked up
    /// at read time, so possibly newer than the event, or `None` when deleted since). Always
    /// `None` for deletes.
    pub doc: Option<Document>,
    /// Field paths set by an update, with their (masked) new values; kept for dead letters.
    pub updated_fields: Option<Document>,
    pub removed_fields: Vec<String>,
    /// Where the change stands in production's history; orders changes to one document.
    pub cluster_time: Timestamp,
    /// Production's wall clock at the change (MongoDB 6.0+); used for `deletedAt` and lag.
    pub wall_time: Option<DateTime>,
}

impl Change {
    /// A change for a document read by a snapshot: applied like a replace at `read_time`.
    pub fn from_snapshot(
        doc: Document,
        read_time: Timestamp,
        wall_time: DateTime,
    ) -> Option<Change> {
        let prod_id = doc.get("_id")?.clone();
        Some(Change {
            op: Op::Replace,
            prod_id,
            doc: Some(doc),
            updated_fields: None,
            removed_fields: vec![],
            cluster_time: read_time,
            wall_time: Some(wall_time),
        })
    }

    /// The change as stored in a dead letter: no unmasked value is ever in it.
    pub fn to_document(&self) -> Document {
        let mut d = doc! {
            "operationType": self.op.as_str(),
            "documentKey": { "_id": self.prod_id.clone() },
            "clusterTime": self.cluster_time,
        };
        if let Some(w) = self.wall_time {
            d.insert("wallTime", w);
        }
        if let Some(full) = &self.doc {
            d.insert("fullDocument", full.clone());
        }
        if let Some(u) = &self.updated_fields {
            d.insert(
                "updateDescription",
                doc! { "updatedFields": u.clone(), "removedFields": self.removed_fields.clone() },
            );
        }
        d
    }
}

/// What a change stream event means to the engine.
#[derive(Debug)]
pub enum Event {
    Change(Box<Change>),
    /// `drop`, `rename` or `dropDatabase` in production: logged and counted, never applied.
    Ddl {
        op: String,
    },
    /// The stream is over (after a drop/rename); reopen it with `startAfter`.
    Invalidate,
    /// An event kind stagesync does not act on (e.g. `createIndexes`).
    Ignored {
        op: String,
    },
}

/// Converts and masks one change stream event. Events without the fields a document change must
/// have (cluster time, document key) are reported as `Ignored` rather than guessed at.
pub fn convert(ev: ChangeStreamEvent<Document>, masker: &Masker) -> Event {
    let op = match &ev.operation_type {
        OperationType::Insert => Op::Insert,
        OperationType::Update => Op::Update,
        OperationType::Replace => Op::Replace,
        OperationType::Delete => Op::Delete,
        OperationType::Invalidate => return Event::Invalidate,
        OperationType::Drop => return Event::Ddl { op: "drop".into() },
        OperationType::Rename => {
            return Event::Ddl {
                op: "rename".into(),
            }
        }
        OperationType::DropDatabase => {
            return Event::Ddl {
                op: "dropDatabase".into(),
            }
        }
        OperationType::Other(other) => return Event::Ignored { op: other.clone() },
        _ => {
            return Event::Ignored {
                op: format!("{:?}", ev.operation_type),
            }
        }
    };
    let (Some(cluster_time), Some(prod_id)) = (
        ev.cluster_time,
        ev.document_key.as_ref().and_then(|k| k.get("_id")).cloned(),
    ) else {
        return Event::Ignored {
            op: format!("{} without clusterTime or documentKey", op.as_str()),
        };
    };
    let mut doc = if op == Op::Delete {
        None
    } else {
        ev.full_document
    };
    if let Some(d) = doc.as_mut() {
        masker.mask_document(d);
    }
    let (updated_fields, removed_fields) = match ev.update_description {
        Some(u) => {
            let mut updated = u.updated_fields;
            masker.mask_updated_fields(&mut updated);
            (Some(updated), u.removed_fields)
        }
        None => (None, vec![]),
    };
    Event::Change(Box::new(Change {
        op,
        prod_id,
        doc,
        updated_fields,
        removed_fields,
        cluster_time,
        wall_time: ev.wall_time,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_form_holds_the_masked_change() {
        let c = Change {
            op: Op::Update,
            prod_id: Bson::Int32(7),
            doc: Some(doc! {"_id": 7, "a": 1}),
            updated_fields: Some(doc! {"a": 1}),
            removed_fields: vec!["b".into()],
            cluster_time: Timestamp {
                time: 10,
                increment: 2,
            },
            wall_time: Some(DateTime::from_millis(1_000)),
        };
        assert_eq!(
            c.to_document(),
            doc! {
                "operationType": "update",
                "documentKey": { "_id": 7 },
                "clusterTime": Timestamp { time: 10, increment: 2 },
                "wallTime": DateTime::from_millis(1_000),
                "fullDocument": { "_id": 7, "a": 1 },
                "updateDescription": { "updatedFields": { "a": 1 }, "removedFields": ["b"] },
            }
        );
    }
}
