//! Masked production `_id`s, mapped back to production.
//!
//! With `"_id" = "hash"` staging, dead letters and checkpoints only ever hold masked ids. The
//! masking is one-way, so the few readers that must query production by `_id` (a snapshot
//! resuming after its last copied id, `prune`, `verify`, `dlq replay`) find the production
//! documents by reading production's `_id`s — only the `_id` index, projected — and masking
//! each one, never by storing a raw id anywhere.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::Hasher;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::FindOptions;
use mongodb::Collection;

use super::Masker;

/// `_id`s per round trip when scanning production's ids.
const ID_BATCH: u32 = 10_000;

fn id_bytes(v: &Bson) -> Vec<u8> {
    mongodb::bson::to_vec(&doc! { "v": v.clone() }).unwrap_or_default()
}

/// Masked `_id` → production `_id`, for the ids asked for that production still has.
#[derive(Debug, Default)]
pub struct RawIds {
    map: HashMap<Vec<u8>, Bson>,
}

impl RawIds {
    /// The production `_id` whose masked form is `masked`, if production has it.
    pub fn raw(&self, masked: &Bson) -> Option<&Bson> {
        self.map.get(&id_bytes(masked))
    }

    pub fn contains(&self, masked: &Bson) -> bool {
        self.map.contains_key(&id_bytes(masked))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Finds the production `_id`s whose masked form is one of `masked`: one pass over
/// production's `_id`s (of the documents `filter` matches, when given), stopping once every
/// one is found. Memory: the ids asked for.
pub async fn find_raw_ids(
    source: &Collection<Document>,
    masker: &Masker,
    masked: &[Bson],
    filter: Option<&crate::filter::Filter>,
) -> mongodb::error::Result<RawIds> {
    let mut wanted: HashSet<Vec<u8>> = masked.iter().map(id_bytes).collect();
    let mut found = RawIds::default();
    if wanted.is_empty() {
        return Ok(found);
    }
    let mut cursor = source
        .find(filter.map(|f| f.query().clone()).unwrap_or_default())
        .with_options(
            FindOptions::builder()
                .projection(doc! { "_id": 1 })
                .batch_size(ID_BATCH)
                .build(),
        )
        .await?;
    while let Some(d) = cursor.try_next().await? {
        let Some(raw) = d.get("_id") else { continue };
        let key = id_bytes(&masker.mask_id(raw.clone()));
        if wanted.remove(&key) {
            found.map.insert(key, raw.clone());
            if wanted.is_empty() {
                break;
            }
        }
    }
    Ok(found)
}

/// Every masked production `_id`, as 64-bit digests (8 bytes per production document), for
/// checking many staging documents against production at once (`verify`). A digest match is
/// "present"; callers confirm the absent ones with [`find_raw_ids`].
#[derive(Debug, Default)]
pub struct MaskedIdSet {
    digests: HashSet<u64>,
}

impl MaskedIdSet {
    pub fn contains(&self, masked: &Bson) -> bool {
        self.digests.contains(&digest(masked))
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

fn digest(masked: &Bson) -> u64 {
    // SipHash with fixed keys: the same in every call of this process, which is all it needs.
    let mut h = DefaultHasher::new();
    h.write(&id_bytes(masked));
    h.finish()
}

/// Reads every production `_id` (projected; of the documents `filter` matches, when given)
/// and keeps the digest of its masked form.
pub async fn masked_id_set(
    source: &Collection<Document>,
    masker: &Masker,
    filter: Option<&crate::filter::Filter>,
) -> mongodb::error::Result<MaskedIdSet> {
    let mut set = MaskedIdSet::default();
    let mut cursor = source
        .find(filter.map(|f| f.query().clone()).unwrap_or_default())
        .with_options(
            FindOptions::builder()
                .projection(doc! { "_id": 1 })
                .batch_size(ID_BATCH)
                .build(),
        )
        .await?;
    while let Some(d) = cursor.try_next().await? {
        if let Some(raw) = d.get("_id") {
            set.digests.insert(digest(&masker.mask_id(raw.clone())));
        }
    }
    Ok(set)
}

/// Resolves a snapshot's resume position: the production `_id` whose masked form is `masked`,
/// reading production's `_id`s in order up to it. `None` when production no longer has it
/// (the snapshot then starts over, which the order rule makes harmless).
pub async fn resume_after_masked(
    source: &Collection<Document>,
    masker: &Masker,
    masked: &Bson,
) -> mongodb::error::Result<Option<Bson>> {
    let want = id_bytes(masked);
    let mut cursor = source
        .find(doc! {})
        .with_options(
            FindOptions::builder()
                .projection(doc! { "_id": 1 })
                .sort(doc! { "_id": 1 })
                .batch_size(ID_BATCH)
                .build(),
        )
        .await?;
    while let Some(d) = cursor.try_next().await? {
        if let Some(raw) = d.get("_id") {
            if id_bytes(&masker.mask_id(raw.clone())) == want {
                return Ok(Some(raw.clone()));
            }
        }
    }
    Ok(None)
}
