//! What one batch changed in staging, so the next batch's look-ups can start while this one is
//! still being written.
//!
//! The stream pipeline looks batch N+1 up while batch N's writes are in flight. Those look-ups
//! may have seen a document N was writing in any state, so when N is done the pipeline keeps
//! what N cannot have changed and asks staging again for the rest:
//!
//! - every looked-up document N wrote is dropped (its state is unknown);
//! - the changes of N+1 that can meet a document N wrote — same production `_id` (current or
//!   prior owner) or same business key as anything N read or wrote — are looked up again.
//!
//! Why that is enough: a document N did not write is as it was, and the look-up of a change
//! that shares no `_id` or key with N finds the same documents before and after N (the
//! documents N wrote end with owners, prior owners and keys that all come from N's changes and
//! from the documents N read, which `Touched` records). The property test in `plan::tests`
//! checks the result against looking every batch up after the previous one.
//!
//! The pipeline goes one step further when it can: it plans N+1 while N is still being written,
//! against the state N's plan says staging will be in ([`Touched::planned_after`]): the
//! looked-up documents N writes are replaced by their planned final states, and the rest are
//! kept. That plan is used only if N lands exactly as planned — every write taken and every
//! update or delete matching its document, in one attempt; otherwise N+1 is planned again
//! after N, with the corrected look-ups above. The property test
//! `planning_the_next_batch_while_writing_changes_nothing` checks it.

use std::collections::HashSet;

use mongodb::bson::{Bson, Document};

use super::{canonical, meta_of, Plan, Rules, WriteOp};
use crate::source::change::Change;

/// The staging documents a batch wrote, and the production `_id`s and business keys through
/// which another batch's look-ups could meet them.
#[derive(Debug, Default, Clone)]
pub struct Touched {
    /// Canonical staging `_id`s written (placeholder moves included).
    written: HashSet<Vec<u8>>,
    /// Canonical production `_id`s: of the batch's changes, and the owners and prior owners of
    /// the documents it read.
    ids: HashSet<Vec<u8>>,
    /// Canonical business keys: of the batch's changes and of the documents it read.
    keys: HashSet<Vec<u8>>,
}

impl Touched {
    /// Records one planned (and sent) pass of a batch: its changes, the staging documents it
    /// read and the writes of its plan.
    pub fn record(
        &mut self,
        rules: &Rules,
        changes: &[Change],
        existing: &[Document],
        plan: &Plan,
    ) {
        self.record_read(rules, changes, existing);
        self.record_writes(plan);
    }

    /// The first half of [`Touched::record`], before the plan consumes what was read.
    pub fn record_read(&mut self, rules: &Rules, changes: &[Change], existing: &[Document]) {
        for c in changes {
            self.ids.insert(canonical(&c.prod_id));
            if let Some(k) = c.doc.as_ref().and_then(|d| rules.canonical_key(d)) {
                self.keys.insert(k);
            }
        }
        for d in existing {
            self.note_document(rules, d);
        }
    }

    /// The second half of [`Touched::record`]: the staging documents the plan writes.
    pub fn record_writes(&mut self, plan: &Plan) {
        for w in plan.vacate.iter().chain(&plan.writes) {
            let id = match &w.op {
                WriteOp::Insert(d) => d.get("_id"),
                WriteOp::Update { id, .. } | WriteOp::Delete { id } => Some(id),
            };
            if let Some(id) = id {
                self.written.insert(canonical(id));
            }
        }
    }

    /// The owner, prior owners and key of a staging document.
    fn note_document(&mut self, rules: &Rules, d: &Document) {
        if let Some(meta) = meta_of(d, &rules.meta_field) {
            if let Some(id) = meta.get("id") {
                self.ids.insert(canonical(id));
            }
            if let Ok(prior) = meta.get_array("prior") {
                for p in prior.iter().filter_map(Bson::as_document) {
                    if let Some(id) = p.get("id") {
                        self.ids.insert(canonical(id));
                    }
                }
            }
        }
        if let Some(k) = rules.canonical_key(d) {
            self.keys.insert(k);
        }
    }

    /// Splits documents looked up while this batch was being written into those it cannot
    /// have changed (kept) and those it wrote (returned: their state is unknown). What the
    /// dropped documents were also counts as touched: a change of the next batch that found
    /// one of them must be looked up again.
    pub fn drop_written(&mut self, rules: &Rules, prefetched: &mut Vec<Document>) -> usize {
        let (stale, kept): (Vec<Document>, Vec<Document>) =
            std::mem::take(prefetched).into_iter().partition(|d| {
                d.get("_id")
                    .is_some_and(|id| self.written.contains(&canonical(id)))
            });
        *prefetched = kept;
        for d in &stale {
            self.note_document(rules, d);
        }
        stale.len()
    }

    /// Look-ups of the next batch's `changes` made while this batch was being written, turned
    /// into what they find once its writes land as planned: the documents it writes are
    /// replaced by their final states ([`Plan::finals`]) that a look-up of `changes` could
    /// find — owned or formerly owned by one of their production `_id`s, holding one as its
    /// own `_id`, or holding one of their business keys. That may be more than the look-ups
    /// would return (they skip what they already know); the plan ignores documents no change
    /// meets.
    pub fn planned_after(
        &self,
        rules: &Rules,
        changes: &[Change],
        prefetched: &mut Vec<Document>,
        finals: Vec<Document>,
    ) {
        prefetched.retain(|d| {
            !d.get("_id")
                .is_some_and(|id| self.written.contains(&canonical(id)))
        });
        let ids: HashSet<Vec<u8>> = changes.iter().map(|c| canonical(&c.prod_id)).collect();
        let keys: HashSet<Vec<u8>> = changes
            .iter()
            .filter_map(|c| rules.canonical_key(c.doc.as_ref()?))
            .collect();
        let found = |d: &Document| {
            let mut owners = Touched::default();
            owners.note_document(rules, d);
            d.get("_id").is_some_and(|id| ids.contains(&canonical(id)))
                || owners.ids.iter().any(|id| ids.contains(id))
                || owners.keys.iter().any(|k| keys.contains(k))
        };
        prefetched.extend(finals.into_iter().filter(found));
    }

    /// True when a look-up for `c` may find a document this batch wrote.
    pub fn meets(&self, rules: &Rules, c: &Change) -> bool {
        self.ids.contains(&canonical(&c.prod_id))
            || c.doc
                .as_ref()
                .and_then(|d| rules.canonical_key(d))
                .is_some_and(|k| self.keys.contains(&k))
    }

    /// The documents written, alone: all [`Touched::planned_after`] needs.
    pub fn written_only(&self) -> Touched {
        Touched {
            written: self.written.clone(),
            ..Touched::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.written.is_empty()
    }
}
