//! `filter`: the subset of a production collection that is synced.
//!
//! A filter is a MongoDB query on the production document (`[[collections]] filter`). It is
//! evaluated in two places that must agree:
//!
//! - **by the servers**: a snapshot, `verify`, `prune` and `dlq replay` read production with
//!   it; the change stream drops inserts outside the subset in its `$match` stage
//!   ([`Filter::stream_stage`]);
//! - **by stagesync** ([`Filter::matches`]), on the raw document of every insert, update and
//!   replace event, before masking: an update or replace whose document no longer matches is
//!   turned into a delete of that document (handled per `deletes`), one whose document matches
//!   is applied as usual — a document entering the subset by an update is inserted (or
//!   adopted). Update and replace events cannot be filtered by the server: without the
//!   document's previous state, an event moving a document *out* of the subset looks like any
//!   other event of a document outside it.
//!
//! The config accepts only the operators implemented here (see
//! [`crate::config::filter::FIELD_OPERATORS`]), with MongoDB's meaning: a path descends into
//! arrays (`items.sku` reaches every element's `sku`), a condition on an array holds when it
//! holds for the array or one of its elements, numbers compare across types, comparisons
//! (`$gt`…) only between values of one type family, `null` matches a missing field.
//!
//! Pure: no I/O, no logging (a document's values never leave this module).

use std::cmp::Ordering;
use std::sync::Arc;

use mongodb::bson::{doc, Bson, Document};

/// A collection's filter. Cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    query: Arc<Document>,
}

impl Filter {
    pub fn new(query: Document) -> Filter {
        Filter {
            query: Arc::new(query),
        }
    }

    /// The query, for the servers.
    pub fn query(&self) -> &Document {
        &self.query
    }

    /// `other` and the filter, as one query for the servers.
    pub fn and(&self, other: Document) -> Document {
        if other.is_empty() {
            return (*self.query).clone();
        }
        doc! { "$and": [other, (*self.query).clone()] }
    }

    /// The `$match` stage of the change stream: inserts outside the subset are dropped by the
    /// server; every other event passes (see the module documentation).
    pub fn stream_stage(&self) -> Document {
        doc! { "$match": { "$or": [
            { "operationType": { "$ne": "insert" } },
            prefixed(&self.query, "fullDocument"),
        ] } }
    }

    /// True when the (raw, unmasked) production document belongs to the subset.
    pub fn matches(&self, doc: &Document) -> bool {
        matches_query(&self.query, doc)
    }
}

/// The query with every field path under `prefix` (`region` → `fullDocument.region`).
fn prefixed(query: &Document, prefix: &str) -> Document {
    query
        .iter()
        .map(|(k, v)| match k.as_str() {
            "$and" | "$or" | "$nor" => {
                let items = match v {
                    Bson::Array(a) => a
                        .iter()
                        .map(|q| match q {
                            Bson::Document(q) => Bson::Document(prefixed(q, prefix)),
                            other => other.clone(),
                        })
                        .collect(),
                    _ => vec![],
                };
                (k.clone(), Bson::Array(items))
            }
            _ => (format!("{prefix}.{k}"), v.clone()),
        })
        .collect()
}

fn matches_query(query: &Document, doc: &Document) -> bool {
    query.iter().all(|(k, v)| {
        let subqueries = || {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(Bson::as_document)
        };
        match k.as_str() {
            "$and" => subqueries().all(|q| matches_query(q, doc)),
            "$or" => subqueries().any(|q| matches_query(q, doc)),
            "$nor" => !subqueries().any(|q| matches_query(q, doc)),
            path => {
                let mut found = Vec::new();
                let segs: Vec<&str> = path.split('.').collect();
                resolve(doc, &segs, &mut found);
                condition_holds(&found, v)
            }
        }
    })
}

/// The values a dotted path reaches, descending into arrays (every element, and a numeric
/// segment as an index).
fn resolve<'a>(doc: &'a Document, segs: &[&str], out: &mut Vec<&'a Bson>) {
    let Some((first, rest)) = segs.split_first() else {
        return;
    };
    if let Some(v) = doc.get(*first) {
        descend(v, rest, out);
    }
}

fn descend<'a>(v: &'a Bson, segs: &[&str], out: &mut Vec<&'a Bson>) {
    let Some((first, rest)) = segs.split_first() else {
        out.push(v);
        return;
    };
    match v {
        Bson::Document(d) => {
            if let Some(inner) = d.get(*first) {
                descend(inner, rest, out);
            }
        }
        Bson::Array(items) => {
            if let Ok(i) = first.parse::<usize>() {
                if let Some(item) = items.get(i) {
                    descend(item, rest, out);
                }
            }
            for item in items {
                if let Bson::Document(d) = item {
                    if let Some(inner) = d.get(*first) {
                        descend(inner, rest, out);
                    }
                }
            }
        }
        _ => {}
    }
}

/// True when the condition (a value, or a document of operators) holds for the values found.
fn condition_holds(found: &[&Bson], condition: &Bson) -> bool {
    match condition {
        Bson::Document(ops) if ops.keys().next().is_some_and(|k| k.starts_with('$')) => {
            ops.iter().all(|(op, arg)| operator_holds(found, op, arg))
        }
        value => equals_any(found, value),
    }
}

/// Each value found, and for arrays each of their elements too.
fn candidates<'a>(found: &[&'a Bson]) -> Vec<&'a Bson> {
    let mut out = Vec::with_capacity(found.len());
    for v in found {
        out.push(*v);
        if let Bson::Array(items) = v {
            out.extend(items.iter());
        }
    }
    out
}

fn equals_any(found: &[&Bson], value: &Bson) -> bool {
    if *value == Bson::Null && found.is_empty() {
        return true; // `null` matches a missing field
    }
    candidates(found)
        .into_iter()
        .any(|c| values_equal(c, value))
}

fn operator_holds(found: &[&Bson], op: &str, arg: &Bson) -> bool {
    let compare = |wanted: &[Ordering]| {
        if *arg == Bson::Null {
            // `$gte: null` and `$lte: null` are equality with null; `$gt`/`$lt` never hold.
            return wanted.contains(&Ordering::Equal) && equals_any(found, arg);
        }
        candidates(found)
            .into_iter()
            .any(|c| compare(c, arg).is_some_and(|o| wanted.contains(&o)))
    };
    let list = || arg.as_array().map(Vec::as_slice).unwrap_or(&[]);
    match op {
        "$eq" => equals_any(found, arg),
        "$ne" => !equals_any(found, arg),
        "$gt" => compare(&[Ordering::Greater]),
        "$gte" => compare(&[Ordering::Greater, Ordering::Equal]),
        "$lt" => compare(&[Ordering::Less]),
        "$lte" => compare(&[Ordering::Less, Ordering::Equal]),
        "$in" => list().iter().any(|v| equals_any(found, v)),
        "$nin" => !list().iter().any(|v| equals_any(found, v)),
        "$all" => !list().is_empty() && list().iter().all(|v| equals_any(found, v)),
        "$exists" => found.is_empty() != arg.as_bool().unwrap_or(true),
        "$size" => {
            let n = as_f64(arg);
            found
                .iter()
                .any(|v| matches!(v, Bson::Array(items) if Some(items.len() as f64) == n))
        }
        "$not" => !condition_holds(found, arg),
        "$elemMatch" => {
            let Bson::Document(q) = arg else { return false };
            let on_values = q.keys().next().is_some_and(|k| k.starts_with('$'));
            found.iter().any(|v| match v {
                Bson::Array(items) => items.iter().any(|el| {
                    if on_values {
                        condition_holds(&[el], arg)
                    } else {
                        matches!(el, Bson::Document(d) if matches_query(q, d))
                    }
                }),
                _ => false,
            })
        }
        // The config refuses every other operator; should one get here, nothing matches
        // (syncing less rather than more).
        _ => false,
    }
}

fn as_f64(v: &Bson) -> Option<f64> {
    match v {
        Bson::Int32(n) => Some(f64::from(*n)),
        Bson::Int64(n) => Some(*n as f64),
        Bson::Double(f) => Some(*f),
        _ => None,
    }
}

/// Equality as a query sees it: numbers by value across types; documents (in field order) and
/// arrays element by element; everything else by type and value.
pub fn values_equal(a: &Bson, b: &Bson) -> bool {
    match (a, b) {
        (Bson::Document(x), Bson::Document(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((kx, vx), (ky, vy))| kx == ky && values_equal(vx, vy))
        }
        (Bson::Array(x), Bson::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| values_equal(p, q))
        }
        _ => match (as_f64(a), as_f64(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

/// The order of two values of one type family (numbers, strings, dates, ObjectIds, booleans,
/// timestamps); `None` across families, as `$gt` and friends never match across them.
fn compare(a: &Bson, b: &Bson) -> Option<Ordering> {
    if let (Some(x), Some(y)) = (as_f64(a), as_f64(b)) {
        // Int64 beyond 2^53 loses precision as f64; compare exactly when both are integers.
        if let (Some(i), Some(j)) = (as_i64(a), as_i64(b)) {
            return Some(i.cmp(&j));
        }
        return x.partial_cmp(&y);
    }
    match (a, b) {
        (Bson::String(x), Bson::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        (Bson::DateTime(x), Bson::DateTime(y)) => Some(x.cmp(y)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => Some(x.bytes().cmp(&y.bytes())),
        (Bson::Boolean(x), Bson::Boolean(y)) => Some(x.cmp(y)),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => {
            Some((x.time, x.increment).cmp(&(y.time, y.increment)))
        }
        _ => None,
    }
}

fn as_i64(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::DateTime;

    fn f(q: Document) -> Filter {
        Filter::new(q)
    }

    #[test]
    fn equality_ranges_and_types() {
        let eu_big = f(doc! { "region": "eu", "amount": { "$gte": 100 } });
        assert!(eu_big.matches(&doc! { "region": "eu", "amount": 100 }));
        assert!(eu_big.matches(&doc! { "region": "eu", "amount": 150.5 }));
        assert!(eu_big.matches(&doc! { "region": "eu", "amount": 100_i64 }));
        assert!(!eu_big.matches(&doc! { "region": "eu", "amount": 99 }));
        assert!(!eu_big.matches(&doc! { "region": "us", "amount": 500 }));
        // No comparison across type families.
        assert!(!eu_big.matches(&doc! { "region": "eu", "amount": "1000" }));
        assert!(!eu_big.matches(&doc! { "region": "eu" }));
        let recent = f(doc! { "at": { "$gt": DateTime::from_millis(1000) } });
        assert!(recent.matches(&doc! { "at": DateTime::from_millis(2000) }));
        assert!(!recent.matches(&doc! { "at": DateTime::from_millis(1000) }));
        assert!(f(doc! { "n": { "$lt": 9_007_199_254_740_993_i64 } })
            .matches(&doc! { "n": 9_007_199_254_740_992_i64 }));
    }

    #[test]
    fn arrays_and_paths() {
        let sku = f(doc! { "items.sku": "A" });
        assert!(sku.matches(&doc! { "items": [{ "sku": "B" }, { "sku": "A" }] }));
        assert!(!sku.matches(&doc! { "items": [{ "sku": "B" }] }));
        assert!(f(doc! { "tags": "x" }).matches(&doc! { "tags": ["y", "x"] }));
        assert!(f(doc! { "tags": ["y", "x"] }).matches(&doc! { "tags": ["y", "x"] }));
        assert!(f(doc! { "a.b.c": 1 }).matches(&doc! { "a": { "b": { "c": 1 } } }));
        assert!(f(doc! { "a.1": 5 }).matches(&doc! { "a": [4, 5] }));
        assert!(f(doc! { "tags": { "$size": 2 } }).matches(&doc! { "tags": [1, 2] }));
        assert!(
            f(doc! { "tags": { "$all": ["x", "y"] } }).matches(&doc! { "tags": ["y", "z", "x"] })
        );
        assert!(!f(doc! { "tags": { "$all": ["x", "q"] } }).matches(&doc! { "tags": ["y", "x"] }));
        let em = f(doc! { "items": { "$elemMatch": { "sku": "A", "qty": { "$gt": 2 } } } });
        assert!(em.matches(&doc! { "items": [{ "sku": "A", "qty": 3 }] }));
        assert!(
            !em.matches(&doc! { "items": [{ "sku": "A", "qty": 1 }, { "sku": "B", "qty": 5 }] })
        );
        assert!(f(doc! { "n": { "$elemMatch": { "$gt": 2, "$lt": 4 } } })
            .matches(&doc! { "n": [1, 3] }));
    }

    #[test]
    fn negations_nulls_and_logic() {
        assert!(f(doc! { "x": null }).matches(&doc! {}));
        assert!(f(doc! { "x": null }).matches(&doc! { "x": null }));
        assert!(!f(doc! { "x": null }).matches(&doc! { "x": 1 }));
        assert!(f(doc! { "x": { "$exists": false } }).matches(&doc! {}));
        assert!(!f(doc! { "x": { "$exists": true } }).matches(&doc! {}));
        assert!(f(doc! { "r": { "$ne": "eu" } }).matches(&doc! {}));
        assert!(!f(doc! { "tags": { "$ne": "x" } }).matches(&doc! { "tags": ["x"] }));
        assert!(f(doc! { "r": { "$nin": ["eu", "us"] } }).matches(&doc! { "r": "ch" }));
        assert!(f(doc! { "r": { "$in": ["eu", "us"] } }).matches(&doc! { "r": "us" }));
        assert!(f(doc! { "n": { "$not": { "$gt": 5 } } }).matches(&doc! { "n": 3 }));
        assert!(f(doc! { "n": { "$not": { "$gt": 5 } } }).matches(&doc! {}));
        let or = f(doc! { "$or": [{ "r": "eu" }, { "vip": true }] });
        assert!(or.matches(&doc! { "r": "us", "vip": true }));
        assert!(!or.matches(&doc! { "r": "us" }));
        assert!(f(doc! { "$nor": [{ "r": "eu" }] }).matches(&doc! { "r": "us" }));
        assert!(f(doc! { "$and": [{ "a": 1 }, { "b": 2 }] }).matches(&doc! { "a": 1, "b": 2 }));
        assert!(f(doc! {}).matches(&doc! { "anything": 1 }));
        assert!(f(doc! { "e": { "a": 1, "b": 2 } }).matches(&doc! { "e": { "a": 1, "b": 2.0 } }));
        assert!(!f(doc! { "e": { "a": 1 } }).matches(&doc! { "e": { "a": 1, "b": 2 } }));
    }

    #[test]
    fn the_stream_stage_filters_inserts_only() {
        let filter = f(doc! { "region": "eu", "$or": [{ "a": 1 }, { "b": { "$gt": 2 } }] });
        assert_eq!(
            filter.stream_stage(),
            doc! { "$match": { "$or": [
                { "operationType": { "$ne": "insert" } },
                { "fullDocument.region": "eu", "$or": [{ "fullDocument.a": 1 }, { "fullDocument.b": { "$gt": 2 } }] },
            ] } }
        );
        assert_eq!(
            filter.and(doc! { "_id": { "$gt": 5 } }),
            doc! { "$and": [{ "_id": { "$gt": 5 } }, { "region": "eu", "$or": [{ "a": 1 }, { "b": { "$gt": 2 } }] }] }
        );
    }
}
