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
    /// The production `_id` as staging records it (`_sync.id`): masked when a rule names `_id`
    /// (deterministic, so it still finds the staging document again), else as it is.
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
    /// Keyed fingerprints of the personal values of `doc` (`"<rule>:<hex>"`, sorted), recorded
    /// in the staging document's `_sync.pii` so that a value moved off its masked path by a
    /// later change is still recognised (see `transform`). Never the values themselves.
    pub pii: Vec<String>,
}

impl Change {
    /// A change for a raw production document read by a snapshot, `verify` or `dlq replay`:
    /// masked here (its `_id` too, when a rule names it), applied like a replace at `read_time`.
    pub fn from_production(
        mut raw: Document,
        masker: &Masker,
        read_time: Timestamp,
        wall_time: DateTime,
    ) -> Option<Change> {
        let pii = masker.mask_event(Some(&mut raw), None);
        let mut change = Change::from_snapshot(raw, read_time, wall_time)?;
        change.pii = pii;
        Some(change)
    }

    /// A change for an already masked document read by a snapshot: applied like a replace at
    /// `read_time`. (No personal-value fingerprints: prefer [`Change::from_production`].)
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
            pii: vec![],
        })
    }

    /// A delete of production `_id` `prod_id` (already masked) at `cluster_time`.
    pub fn delete(prod_id: Bson, cluster_time: Timestamp, wall_time: Option<DateTime>) -> Change {
        Change {
            op: Op::Delete,
            prod_id,
            doc: None,
            updated_fields: None,
            removed_fields: vec![],
            cluster_time,
            wall_time,
            pii: vec![],
        }
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
///
/// With a `filter`, an insert, update or replace whose (raw) document is outside the subset
/// becomes a delete of that document: it left the subset, or never was in it (then the delete
/// finds nothing to do). See [`crate::filter`].
pub fn convert(
    ev: ChangeStreamEvent<Document>,
    masker: &Masker,
    filter: Option<&crate::filter::Filter>,
) -> Event {
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
    let prod_id = masker.mask_id(prod_id);
    let mut doc = if op == Op::Delete {
        None
    } else {
        ev.full_document
    };
    if let (Some(filter), Some(raw)) = (filter, doc.as_ref()) {
        if !filter.matches(raw) {
            return Event::Change(Box::new(Change::delete(
                prod_id,
                cluster_time,
                ev.wall_time,
            )));
        }
    }
    let (mut updated_fields, removed_fields) = match ev.update_description {
        Some(u) => (Some(u.updated_fields), u.removed_fields),
        None => (None, vec![]),
    };
    // The document, the update description and `_id`, masked together: a value copied or
    // renamed away from a masked path in this event is masked wherever it landed.
    let pii = masker.mask_event(doc.as_mut(), updated_fields.as_mut());
    Event::Change(Box::new(Change {
        op,
        prod_id,
        doc,
        updated_fields,
        removed_fields,
        cluster_time,
        wall_time: ev.wall_time,
        pii,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_and_an_email_id_are_masked_as_they_are_converted() {
        let settings = crate::config::MaskingSettings {
            key: "0123456789abcdef-change-test".into(),
            email_domain: "example.com".into(),
            redact_text: "[redacted]".into(),
        };
        let rules = [("_id", "hash"), ("ssn", "hash"), ("email", "email")]
            .iter()
            .map(|(p, r)| (p.to_string(), r.to_string()))
            .collect();
        let masker = Masker::new(Some(&settings), &rules);
        let event: ChangeStreamEvent<Document> = mongodb::bson::from_document(doc! {
            "_id": { "_data": "00" },
            "operationType": "update",
            "clusterTime": Timestamp { time: 5, increment: 1 },
            "ns": { "db": "p", "coll": "u" },
            "documentKey": { "_id": "ann@x.com" },
            "fullDocument": { "_id": "ann@x.com", "email": "ann@x.com", "legacySsn": "123-45-6789", "ssn": "123-45-6789" },
            "updateDescription": {
                "updatedFields": { "legacySsn": "123-45-6789", "alias": "ann@x.com" },
                "removedFields": ["old"],
            },
        })
        .unwrap();
        let Event::Change(c) = convert(event, &masker, None) else {
            panic!("a document change");
        };
        assert_eq!(c.prod_id, masker.mask_id(Bson::from("ann@x.com")));
        let text = Bson::Document(c.to_document())
            .into_relaxed_extjson()
            .to_string();
        assert!(!text.contains("ann@x.com"), "{text}");
        assert!(!text.contains("123-45-6789"), "{text}");
        // Two personal values: the address (the id's and `email`'s; `hash` reveals less, so a
        // copy takes the id's mask) and the SSN.
        assert_eq!(c.pii.len(), 2, "{:?}", c.pii);
        let full = c.doc.as_ref().unwrap();
        assert_eq!(full.get("legacySsn"), full.get("ssn"));
        assert_eq!(
            c.updated_fields.as_ref().unwrap().get("alias"),
            Some(&c.prod_id),
            "a copy of the id is masked like the id"
        );
    }

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
            pii: vec![],
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
