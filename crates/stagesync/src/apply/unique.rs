//! Which values staging's unique indexes would hold equal.
//!
//! A first snapshot writes its documents blind: an insert whose business key (or any other
//! unique value) staging already holds is refused, and that document alone is looked up and
//! planned again. When two batches are written at once, a key both of them hold would go to
//! whichever staging happens to take first — not necessarily the earlier batch, as it does when
//! they are written one after the other. So a batch may be written beside the one before it only
//! when no unique index of staging can see the same key in both ([`KeySet::is_apart_from`]).
//!
//! Everything here errs one way: two values the server holds equal always give the same key,
//! while some values the server holds different give the same key too (they only keep two
//! batches one after the other). What cannot be told for sure (an array on an indexed path, a
//! `Decimal128`, an index with a collation or of a special kind) gives no key set at all.

use std::collections::HashSet;

use mongodb::bson::{Bson, Document};

/// The unique indexes of one staging collection, as far as key equality goes.
#[derive(Debug, Clone, PartialEq)]
pub struct UniqueIndexes {
    /// The dotted paths of each unique index; `None` when one of them cannot be reasoned about.
    indexes: Option<Vec<Vec<String>>>,
}

impl UniqueIndexes {
    /// Reads them from the index specifications `listIndexes` returns. The `_id` index is
    /// unique without saying so. A partial or sparse index holds fewer documents than a plain
    /// one, so it is taken as plain (that can only find more collisions). An index with a
    /// collation, or whose keys are not ascending or descending (text, hashed, geo, wildcard),
    /// makes the whole set unknown.
    pub fn from_specs(specs: &[Document]) -> UniqueIndexes {
        let mut indexes = Vec::new();
        for spec in specs {
            let Ok(key) = spec.get_document("key") else {
                return UniqueIndexes::unknown();
            };
            let is_id = key.len() == 1 && key.contains_key("_id");
            if !is_id && !matches!(spec.get("unique"), Some(Bson::Boolean(true))) {
                continue;
            }
            if spec.contains_key("collation") {
                return UniqueIndexes::unknown();
            }
            let mut fields = Vec::with_capacity(key.len());
            for (path, direction) in key {
                let plain = match direction {
                    Bson::Int32(n) => *n == 1 || *n == -1,
                    Bson::Int64(n) => *n == 1 || *n == -1,
                    Bson::Double(n) => *n == 1.0 || *n == -1.0,
                    _ => false,
                };
                if !plain || path.contains("$**") {
                    return UniqueIndexes::unknown();
                }
                fields.push(path.clone());
            }
            indexes.push(fields);
        }
        UniqueIndexes {
            indexes: Some(indexes),
        }
    }

    /// Nothing can be told: no two batches are written at once.
    pub fn unknown() -> UniqueIndexes {
        UniqueIndexes { indexes: None }
    }

    /// The keys `docs` give each unique index; `None` when one of them cannot be told.
    pub fn keys_of<'a>(&self, docs: impl IntoIterator<Item = &'a Document>) -> Option<KeySet> {
        let indexes = self.indexes.as_ref()?;
        let mut keys = HashSet::new();
        for doc in docs {
            for (i, fields) in indexes.iter().enumerate() {
                let mut key = vec![i as u8, (i >> 8) as u8];
                for path in fields {
                    push_value(&mut key, value_at(doc, path)?)?;
                }
                keys.insert(key);
            }
        }
        Some(KeySet(keys))
    }
}

/// The unique-index keys of a batch's documents (see [`UniqueIndexes::keys_of`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeySet(HashSet<Vec<u8>>);

impl KeySet {
    /// Whether no unique index can see the same key in both.
    pub fn is_apart_from(&self, other: &KeySet) -> bool {
        let (small, large) = if self.0.len() <= other.0.len() {
            (&self.0, &other.0)
        } else {
            (&other.0, &self.0)
        };
        small.is_disjoint(large)
    }
}

/// The value an index sees at a dotted path: `Some(None)` when missing (indexed as null),
/// `None` when an array lies on the way (each element would be a key of its own).
fn value_at<'a>(doc: &'a Document, path: &str) -> Option<Option<&'a Bson>> {
    let mut current = doc;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let value = match current.get(part) {
            None => return Some(None),
            Some(v) => v,
        };
        match (value, parts.peek()) {
            (Bson::Array(_), _) => return None,
            (_, None) => return Some(Some(value)),
            (Bson::Document(d), Some(_)) => current = d,
            // A scalar on the way: the path below it is missing.
            (_, Some(_)) => return Some(None),
        }
    }
    Some(None)
}

/// Appends a value's key: the same bytes for values the server holds equal in an index without
/// a collation. `None` for a value that cannot be told for sure.
fn push_value(key: &mut Vec<u8>, value: Option<&Bson>) -> Option<()> {
    let number = |key: &mut Vec<u8>, n: f64| {
        key.push(2);
        // One NaN and one zero: the server holds all NaNs equal, and 0.0 equal to -0.0.
        let n = if n.is_nan() {
            f64::NAN
        } else if n == 0.0 {
            0.0
        } else {
            n
        };
        key.extend_from_slice(&n.to_bits().to_be_bytes());
    };
    match value {
        // A missing field is indexed as null; `undefined` too.
        None | Some(Bson::Null) | Some(Bson::Undefined) => key.push(1),
        // Every number is compared by value across types: as doubles, equal values stay equal
        // (an integer beyond 2^53 may meet a neighbour, which only finds a collision).
        Some(Bson::Int32(n)) => number(key, f64::from(*n)),
        Some(Bson::Int64(n)) => number(key, *n as f64),
        Some(Bson::Double(n)) => number(key, *n),
        Some(Bson::Decimal128(_)) => return None,
        Some(Bson::String(s)) | Some(Bson::Symbol(s)) => {
            key.push(3);
            key.extend_from_slice(&(s.len() as u64).to_be_bytes());
            key.extend_from_slice(s.as_bytes());
        }
        // A sub-document is one value, compared field by field (names and order included).
        Some(Bson::Document(d)) => {
            key.push(4);
            key.extend_from_slice(&(d.len() as u64).to_be_bytes());
            for (name, v) in d {
                key.extend_from_slice(&(name.len() as u64).to_be_bytes());
                key.extend_from_slice(name.as_bytes());
                push_value(key, Some(v))?;
            }
        }
        // Below the indexed path (inside a sub-document) an array is one value too.
        Some(Bson::Array(items)) => {
            key.push(5);
            key.extend_from_slice(&(items.len() as u64).to_be_bytes());
            for v in items {
                push_value(key, Some(v))?;
            }
        }
        // Any other type is equal only to itself, byte for byte.
        Some(other) => {
            key.push(6);
            key.push(other.element_type() as u8);
            let bytes = mongodb::bson::to_vec(&mongodb::bson::doc! { "": other.clone() }).ok()?;
            key.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            key.extend_from_slice(&bytes);
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId, Decimal128, Timestamp};

    fn stagesync_and(extra: &[Document]) -> UniqueIndexes {
        let mut specs = vec![
            doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" },
            doc! { "v": 2, "key": { "userEmail": 1, "accountId": 1 }, "name": "stagesync_business_key",
            "unique": true, "partialFilterExpression": { "userEmail": { "$exists": true }, "accountId": { "$exists": true } } },
            doc! { "v": 2, "key": { "_sync.id": 1 }, "name": "stagesync_production_id" },
        ];
        specs.extend_from_slice(extra);
        UniqueIndexes::from_specs(&specs)
    }

    fn apart(indexes: &UniqueIndexes, a: Document, b: Document) -> Option<bool> {
        Some(
            indexes
                .keys_of([&a])?
                .is_apart_from(&indexes.keys_of([&b])?),
        )
    }

    #[test]
    fn values_the_server_holds_equal_are_never_apart() {
        let ix = stagesync_and(&[]);
        let key = |email: Bson, account: Bson| doc! { "_id": ObjectId::new(), "userEmail": email, "accountId": account };
        let same = [
            (Bson::Int32(1), Bson::Double(1.0)),
            (Bson::Int64(1), Bson::Int32(1)),
            (Bson::Double(0.0), Bson::Double(-0.0)),
            (Bson::Double(f64::NAN), Bson::Double(-f64::NAN)),
            (Bson::Null, Bson::Undefined),
            (Bson::String("s".into()), Bson::Symbol("s".into())),
        ];
        for (a, b) in same {
            assert_eq!(
                apart(
                    &ix,
                    key("a@x".into(), a.clone()),
                    key("a@x".into(), b.clone())
                ),
                Some(false),
                "{a:?} and {b:?}"
            );
        }
        // A missing field is indexed as null.
        let missing = doc! { "_id": 1, "userEmail": "a@x" };
        assert_eq!(
            apart(&ix, missing, key("a@x".into(), Bson::Null)),
            Some(false)
        );
        // Sub-documents compare their numbers by value too.
        assert_eq!(
            apart(
                &ix,
                key(doc! { "n": 1 }.into(), Bson::Int32(1)),
                key(doc! { "n": 1.0 }.into(), Bson::Int32(1))
            ),
            Some(false)
        );
        // The same `_id` under two types.
        assert_eq!(
            apart(&ix, doc! { "_id": 7 }, doc! { "_id": 7i64 }),
            Some(false)
        );
    }

    #[test]
    fn different_keys_are_apart_and_a_non_unique_index_does_not_count() {
        let ix = stagesync_and(&[]);
        let a =
            doc! { "_id": 1, "userEmail": "a@x", "accountId": 1, "_sync": { "id": 1 }, "total": 5 };
        let b =
            doc! { "_id": 2, "userEmail": "b@x", "accountId": 1, "_sync": { "id": 1 }, "total": 5 };
        assert_eq!(apart(&ix, a.clone(), b), Some(true));
        let c = doc! { "_id": 3, "userEmail": "a@x", "accountId": 2 };
        assert_eq!(apart(&ix, a.clone(), c), Some(true));
        let d = doc! { "_id": 4, "userEmail": "a@x", "accountId": 1 };
        assert_eq!(apart(&ix, a, d), Some(false));
        // A unique index of the user's own counts like the business key.
        let with_phone = stagesync_and(&[
            doc! { "key": { "contact.phone": -1 }, "name": "phone", "unique": true, "sparse": true },
        ]);
        let p = |id: i32, email: &str| doc! { "_id": id, "userEmail": email, "accountId": 1, "contact": { "phone": "555" } };
        assert_eq!(apart(&with_phone, p(1, "a@x"), p(2, "b@x")), Some(false));
        // A scalar on the way to a path leaves it missing, as null.
        let q = doc! { "_id": 3, "userEmail": "c@x", "accountId": 1, "contact": 5 };
        let r = doc! { "_id": 4, "userEmail": "d@x", "accountId": 1 };
        assert_eq!(apart(&with_phone, q, r), Some(false));
    }

    #[test]
    fn what_cannot_be_told_for_sure_gives_no_keys() {
        let ix = stagesync_and(&[]);
        // An array on an indexed path: each element is a key of its own.
        assert!(ix
            .keys_of([&doc! { "_id": 1, "userEmail": ["a@x", "b@x"], "accountId": 1 }])
            .is_none());
        assert!(ix
            .keys_of([
                &doc! { "_id": 1, "userEmail": "a@x", "accountId": Decimal128::from_bytes([0; 16]) }
            ])
            .is_none());
        for special in [
            doc! { "key": { "name": 1 }, "name": "n", "unique": true, "collation": { "locale": "en", "strength": 2 } },
            doc! { "key": { "name": "hashed" }, "name": "h", "unique": true },
            doc! { "key": { "$**": 1 }, "name": "w", "unique": true },
        ] {
            let ix = stagesync_and(std::slice::from_ref(&special));
            assert!(ix.keys_of([&doc! { "_id": 1 }]).is_none(), "{special}");
        }
        // Other types are equal only to themselves.
        let t = |ts: u32| doc! { "_id": 1, "userEmail": "a@x", "accountId": Timestamp { time: ts, increment: 1 } };
        let ix = stagesync_and(&[]);
        let keys = ix.keys_of([&t(1)]).unwrap();
        assert!(!keys.is_apart_from(&ix.keys_of([&t(1)]).unwrap()));
        let other =
            doc! { "_id": 2, "userEmail": "a@x", "accountId": Timestamp { time: 2, increment: 1 } };
        assert!(keys.is_apart_from(&ix.keys_of([&other]).unwrap()));
    }
}
