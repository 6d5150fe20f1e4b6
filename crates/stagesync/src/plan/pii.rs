//! The second half of masking, which needs the staging documents: personal values that left
//! their masked path in production (`$rename`, a pipeline copy) before this batch.
//!
//! Conversion masks every value an event itself shows to be personal (`transform`). What it
//! cannot know is that `legacySsn` holds the value `ssn` held two events ago: the raw value is
//! gone from the event. Staging remembers it as a keyed fingerprint in `_sync.pii`; this pass
//! masks, in each change, every unruled value with a recorded fingerprint — before planning,
//! writing or dead-lettering sees the change.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use mongodb::bson::Document;

use super::{canonical, meta_of, Rules};
use crate::source::change::Change;
use crate::transform::Masker;

/// The sub-field of the metadata holding a document's personal-value fingerprints.
pub const PII_FIELD: &str = "pii";

/// Masks the values of `changes` that staging's `_sync.pii` (of the documents in `existing`
/// recorded as theirs), or an earlier change of the same document in the batch, knows to be
/// personal. Returns the changes unchanged (borrowed) when there is nothing to mask.
///
/// Each change's `pii` becomes its own fingerprints plus the recorded ones its document still
/// holds, which is what the planner records next. Idempotent: running it again on its output
/// changes nothing.
pub fn mask_moved_values<'c>(
    rules: &Rules,
    masker: &Masker,
    changes: &'c [Change],
    existing: &[Document],
) -> Cow<'c, [Change]> {
    if masker.is_empty() {
        return Cow::Borrowed(changes);
    }
    // Production `_id` → every fingerprint recorded for it (a union: over-approximating only
    // masks more).
    let mut known: HashMap<Vec<u8>, BTreeSet<String>> = HashMap::new();
    for d in existing {
        let Some(meta) = meta_of(d, &rules.meta_field) else {
            continue;
        };
        let (Some(id), Ok(pii)) = (meta.get("id"), meta.get_array(PII_FIELD)) else {
            continue;
        };
        known
            .entry(canonical(id))
            .or_default()
            .extend(pii.iter().filter_map(|f| f.as_str().map(String::from)));
    }
    let mut out: Option<Vec<Change>> = None;
    for (i, c) in changes.iter().enumerate() {
        let recorded = known.entry(canonical(&c.prod_id)).or_default();
        let orphans: Vec<String> = recorded
            .iter()
            .filter(|f| c.pii.binary_search(f).is_err())
            .cloned()
            .collect();
        if !orphans.is_empty() && (c.doc.is_some() || c.updated_fields.is_some()) {
            let mut masked = c.clone();
            let found = masker.mask_known_values(
                masked.doc.as_mut(),
                masked.updated_fields.as_mut(),
                &orphans,
            );
            if !found.is_empty() {
                let mut pii: BTreeSet<String> = masked.pii.drain(..).collect();
                pii.extend(found);
                masked.pii = pii.into_iter().collect();
                out.get_or_insert_with(|| changes.to_vec())[i] = masked;
            }
        }
        let effective = match &out {
            Some(o) => &o[i].pii,
            None => &c.pii,
        };
        recorded.extend(effective.iter().cloned());
    }
    match out {
        Some(o) => Cow::Owned(o),
        None => Cow::Borrowed(changes),
    }
}
