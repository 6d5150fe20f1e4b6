//! Merging one production document into one staging document, and turning the result into the
//! smallest `$set` / `$unset` update.
//!
//! Ownership is decided per top-level field: production owns the fields its document has (and
//! had: recorded in the metadata `fields` list, so a field production drops is dropped from
//! staging too); every other field is staging's and never touched. `preserve` patterns carve
//! staging-owned parts out of production's fields, at any depth below embedded documents.

use mongodb::bson::{Bson, Document};

use super::paths::PathPatterns;

/// Writes production's `prod` into `staging` in place.
///
/// - `prod_fields`: the top-level fields production owns now (its document's keys, without
///   `_id` and the metadata field);
/// - `previously_owned`: the fields production owned at the last sync (metadata `fields`).
pub fn merge_into(
    staging: &mut Document,
    prod: &Document,
    prod_fields: &[String],
    previously_owned: &[String],
    preserve: &PathPatterns,
) {
    let mut path = Vec::new();
    for gone in previously_owned.iter().filter(|f| !prod_fields.contains(f)) {
        path.push(gone.clone());
        remove_owned(staging, gone, &mut path, preserve);
        path.pop();
    }
    for field in prod_fields {
        if let Some(value) = prod.get(field) {
            path.push(field.clone());
            assign_owned(staging, field, value, &mut path, preserve);
            path.pop();
        }
    }
}

/// Sets `doc[key] = value` for a production-owned key at `path`, keeping preserved parts.
fn assign_owned(
    doc: &mut Document,
    key: &str,
    value: &Bson,
    path: &mut Vec<String>,
    preserve: &PathPatterns,
) {
    if preserve.covers(path) {
        return;
    }
    if !preserve.has_below(path) {
        doc.insert(key, value.clone());
        return;
    }
    let Bson::Document(prod_sub) = value else {
        // Production has a scalar or array where staging keeps preserved sub-fields: the
        // preserved parts win, so the production value is not written over them.
        if !matches!(doc.get(key), Some(Bson::Document(_))) {
            doc.insert(key, value.clone());
        }
        return;
    };
    if !matches!(doc.get(key), Some(Bson::Document(_))) {
        doc.insert(key, Document::new());
    }
    let Some(Bson::Document(sub)) = doc.get_mut(key) else {
        return;
    };
    // Keys production no longer has (and staging does not own) go.
    let stale: Vec<String> = sub
        .keys()
        .filter(|k| !prod_sub.contains_key(k.as_str()))
        .cloned()
        .collect();
    for k in stale {
        path.push(k.clone());
        remove_owned(sub, &k, path, preserve);
        path.pop();
    }
    for (k, v) in prod_sub {
        path.push(k.clone());
        assign_owned(sub, k, v, path, preserve);
        path.pop();
    }
    if sub.is_empty() && !matches!(value, Bson::Document(d) if d.is_empty()) {
        doc.remove(key);
    }
}

/// Removes a production-owned key at `path`, keeping any preserved parts below it.
fn remove_owned(doc: &mut Document, key: &str, path: &mut Vec<String>, preserve: &PathPatterns) {
    if preserve.covers(path) {
        return;
    }
    if !preserve.has_below(path) {
        doc.remove(key);
        return;
    }
    let Some(Bson::Document(sub)) = doc.get_mut(key) else {
        doc.remove(key);
        return;
    };
    let keys: Vec<String> = sub.keys().cloned().collect();
    for k in keys {
        path.push(k.clone());
        remove_owned(sub, &k, path, preserve);
        path.pop();
    }
    if sub.is_empty() {
        doc.remove(key);
    }
}

/// Computes the update that turns `before` into `after`: `$set` of changed paths (descending into
/// embedded documents so concurrent staging edits elsewhere in them survive) and `$unset` of
/// removed ones.
pub fn diff(before: &Document, after: &Document) -> (Document, Document) {
    let mut set = Document::new();
    let mut unset = Document::new();
    diff_into(before, after, "", &mut set, &mut unset);
    (set, unset)
}

fn diff_into(
    before: &Document,
    after: &Document,
    prefix: &str,
    set: &mut Document,
    unset: &mut Document,
) {
    for (k, new) in after {
        let path = format!("{prefix}{k}");
        match before.get(k) {
            Some(old) if old == new => {}
            Some(Bson::Document(old_sub)) if plain_key(k) => match new {
                // Descend only where every name can be part of a dotted path: a field named
                // "c.d" inside would be read as c → d, so such a sub-document is set whole.
                Bson::Document(new_sub)
                    if !new_sub.is_empty()
                        && !old_sub.is_empty()
                        && old_sub.keys().chain(new_sub.keys()).all(|k| plain_key(k)) =>
                {
                    diff_into(old_sub, new_sub, &format!("{path}."), set, unset)
                }
                _ => {
                    set.insert(path, new.clone());
                }
            },
            _ => {
                set.insert(path, new.clone());
            }
        }
    }
    for k in before.keys().filter(|k| !after.contains_key(k.as_str())) {
        unset.insert(format!("{prefix}{k}"), "");
    }
}

/// Keys that can appear inside a dotted update path.
fn plain_key(k: &str) -> bool {
    !k.is_empty() && !k.contains('.') && !k.starts_with('$')
}
