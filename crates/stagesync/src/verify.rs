//! `stagesync verify`: does staging hold what the rules say it should, given production now?
//!
//! Per collection, in bounded memory (chunks of production read in `_id` order, each matched to
//! staging with the engine's own lookups, then chunks of staging read the same way):
//! - production documents missing in staging (or only present soft-deleted);
//! - staging documents whose production-owned fields differ — decided by asking the merge itself
//!   "would syncing this production document change the staging one?", so staging-only and
//!   preserved fields never count as drift;
//! - staging documents from production whose source is gone but that are not (soft-)deleted;
//! - soft-deleted staging documents whose source still exists;
//! - duplicate business keys.
//!
//! Production documents are masked before comparing, and reports carry business keys (masked
//! where configured) and field names — never field values.

use std::collections::{BTreeSet, HashMap, HashSet};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::options::FindOptions;
use serde::Serialize;

use crate::config::DeleteMode;
use crate::error::{MongoContext, Result};
use crate::pipeline::Pipeline;
use crate::plan::{canonical, mask_moved_values, meta_of, plan_batch, Outcome, WriteOp};
use crate::source::change::Change;
use crate::transform::ids;

const CHUNK: usize = 1000;

#[derive(Debug, Default, Serialize)]
pub struct Drift {
    pub business_key: String,
    pub production_id: Option<String>,
    pub staging_id: Option<String>,
    /// Field names only, never values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// Why the sync cannot apply this document (e.g. `key_collision`), when that is the cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The (masked) production `_id` as a value, to check it against production again.
    #[serde(skip)]
    masked_production_id: Option<Bson>,
}

#[derive(Debug, Default, Serialize)]
pub struct CollectionReport {
    pub collection: String,
    pub production_checked: u64,
    pub staging_checked: u64,
    pub sampled: bool,
    pub missing: Vec<Drift>,
    pub differing: Vec<Drift>,
    pub stale_not_deleted: Vec<Drift>,
    pub deleted_but_present: Vec<Drift>,
    pub duplicate_keys: Vec<Drift>,
    /// References (`[collections.references]`) whose document is not in staging: they keep
    /// the production `_id` until it arrives. Listed, not counted as drift (the referenced
    /// document may be outside the other collection's subset, or gone in production too).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unresolved_references: Vec<UnresolvedReference>,
}

/// A reference whose document is not in staging (ids only, never other values).
#[derive(Debug, Default, Serialize)]
pub struct UnresolvedReference {
    pub business_key: String,
    pub production_id: Option<String>,
    pub field: String,
    pub references: String,
    /// The production `_id` referred to (masked where that collection masks `_id`).
    pub referenced_id: Option<String>,
}

impl CollectionReport {
    pub fn drift_count(&self) -> usize {
        self.missing.len()
            + self.differing.len()
            + self.stale_not_deleted.len()
            + self.deleted_but_present.len()
            + self.duplicate_keys.len()
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub in_sync: bool,
    pub collections: Vec<CollectionReport>,
}

fn id_text(v: Option<&Bson>) -> Option<String> {
    v.map(|v| match v {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(o) => o.to_hex(),
        other => other.to_string(),
    })
}

pub async fn verify_collection(cs: &Pipeline, sample: Option<u64>) -> Result<CollectionReport> {
    let rules = &cs.rules;
    let mut report = CollectionReport {
        collection: cs.name.clone(),
        sampled: sample.is_some(),
        ..Default::default()
    };
    // The comparison stamps production documents as "newer than anything", so the merge's order
    // rule never hides a difference.
    let far_future = Timestamp {
        time: u32::MAX,
        increment: u32::MAX,
    };
    let now = DateTime::now();

    // Pass 1: production → staging.
    let reading_prod = || format!("reading production.{}", cs.name);
    let reading_staging = || format!("reading staging.{}", cs.target);
    let mut cursor = match sample {
        Some(n) => cs
            .source
            .aggregate(vec![
                doc! { "$match": rules.in_subset(doc! {}) },
                doc! { "$sample": { "size": n as i64 } },
            ])
            .await
            .with_context(reading_prod)?,
        None => {
            let options = FindOptions::builder()
                .sort(doc! { "_id": 1 })
                .batch_size(CHUNK as u32)
                .build();
            cs.source
                .find(rules.in_subset(doc! {}))
                .with_options(options)
                .await
                .with_context(reading_prod)?
        }
    };
    loop {
        let chunk: Vec<Change> = next_chunk(&mut cursor)
            .await
            .with_context(reading_prod)?
            .into_iter()
            .filter_map(|d| Change::from_production(d, &cs.masker, far_future, now))
            .collect();
        if chunk.is_empty() {
            break;
        }
        report.production_checked += chunk.len() as u64;
        compare_production_chunk(cs, &chunk, &mut report).await?;
    }
    if sample.is_some() {
        return Ok(report);
    }

    // Pass 2: staging documents that came from production → does their source still exist?
    let options = FindOptions::builder()
        .sort(doc! { "_id": 1 })
        .batch_size(CHUNK as u32)
        .build();
    let mut staging = cs
        .staging
        .find(doc! { rules.meta_path("id"): { "$exists": true } })
        .with_options(options)
        .await
        .with_context(reading_staging)?;
    // With a masked `_id`, staging's ids are checked against production's ids read once and
    // masked (8 bytes per production document); those not found are read again at the end.
    let masked_ids = if cs.masker.masks_id() && rules.deletes != DeleteMode::Ignore {
        Some(
            ids::masked_id_set(&cs.source, &cs.masker, rules.filter.as_ref())
                .await
                .with_context(reading_prod)?,
        )
    } else {
        None
    };
    loop {
        let chunk = next_chunk(&mut staging)
            .await
            .with_context(reading_staging)?;
        if chunk.is_empty() {
            break;
        }
        report.staging_checked += chunk.len() as u64;
        compare_staging_chunk(cs, &chunk, masked_ids.as_ref(), &mut report).await?;
    }
    if masked_ids.is_some() && !report.stale_not_deleted.is_empty() {
        // Inserted in production (and synced) while staging was being read: not stale.
        let suspects: Vec<Bson> = report
            .stale_not_deleted
            .iter()
            .filter_map(|d| d.masked_production_id.clone())
            .collect();
        let found = ids::find_raw_ids(&cs.source, &cs.masker, &suspects, rules.filter.as_ref())
            .await
            .with_context(reading_prod)?;
        report.stale_not_deleted.retain(|d| {
            !d.masked_production_id
                .as_ref()
                .is_some_and(|id| found.contains(id))
        });
    }

    // Duplicate business keys, compared as the sync compares them.
    for dup in duplicate_keys(&cs.staging, rules, KeyEquality::Sync).await? {
        report.duplicate_keys.push(Drift {
            business_key: dup.business_key,
            fields: vec![format!("{} documents", dup.documents)],
            ..Default::default()
        });
    }
    Ok(report)
}

/// How two business-key values are compared when looking for duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEquality {
    /// As the sync matches documents: the exact BSON (so `1` and `1.0` differ, and so do
    /// embedded documents with the same fields in another order — as in MongoDB's own
    /// comparison and its unique index).
    Sync,
    /// As a unique index compares keys: numbers by value (`1` equals `1.0`), embedded
    /// documents field by field in order.
    Index,
}

/// A business key more than one staging document holds.
#[derive(Debug, Clone, PartialEq)]
pub struct DuplicateKey {
    /// `field=value, …` (values as staging holds them: masked where configured).
    pub business_key: String,
    pub documents: usize,
}

/// The business keys held by more than one staging document (among documents having every key
/// field, as the unique index's partial filter says), compared as `equality` says.
///
/// The server's `$group` finds the candidates; it may group more than the sync would (some
/// servers group embedded documents regardless of field order), so each candidate group is
/// compared again here, on the documents' own values.
pub async fn duplicate_keys(
    staging: &mongodb::Collection<Document>,
    rules: &crate::plan::Rules,
    equality: KeyEquality,
) -> Result<Vec<DuplicateKey>> {
    let reading = || {
        format!(
            "looking for duplicate business keys in staging.{}",
            staging.name()
        )
    };
    let group_id: Document = rules
        .business_key
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("k{i}"), Bson::String(format!("${f}"))))
        .collect();
    let present = rules.has_key_filter();
    let mut groups = staging
        .aggregate(vec![
            doc! { "$match": present },
            doc! { "$group": { "_id": group_id, "n": { "$sum": 1 }, "ids": { "$push": "$_id" } } },
            doc! { "$match": { "n": { "$gt": 1 } } },
        ])
        .await
        .with_context(reading)?;
    let mut found = Vec::new();
    while let Some(group) = groups.try_next().await.with_context(reading)? {
        let ids = group.get_array("ids").cloned().unwrap_or_default();
        let docs: Vec<Document> = staging
            .find(doc! { "_id": { "$in": ids } })
            .projection(
                rules
                    .business_key
                    .iter()
                    .map(|f| (f.clone(), Bson::Int32(1)))
                    .collect::<Document>(),
            )
            .await
            .with_context(reading)?
            .try_collect()
            .await
            .with_context(reading)?;
        let mut by_key: HashMap<Vec<u8>, (crate::plan::BusinessKey, usize)> = HashMap::new();
        for d in &docs {
            let values: Vec<Bson> = rules
                .business_key
                .iter()
                .map(|f| crate::plan::get_path(d, f).cloned().unwrap_or(Bson::Null))
                .collect();
            let key = crate::plan::BusinessKey(values);
            let canonical = match equality {
                KeyEquality::Sync => key.canonical(),
                KeyEquality::Index => {
                    crate::plan::BusinessKey(key.0.iter().map(index_form).collect()).canonical()
                }
            };
            by_key.entry(canonical).or_insert((key, 0)).1 += 1;
        }
        let mut dups: Vec<DuplicateKey> = by_key
            .into_values()
            .filter(|(_, n)| *n > 1)
            .map(|(key, n)| DuplicateKey {
                business_key: key.describe(&rules.business_key),
                documents: n,
            })
            .collect();
        dups.sort_by(|a, b| a.business_key.cmp(&b.business_key));
        found.extend(dups);
    }
    Ok(found)
}

/// A value as an index key compares it: every number as a double when that is exact.
fn index_form(v: &Bson) -> Bson {
    match v {
        Bson::Int32(i) => Bson::Double(f64::from(*i)),
        Bson::Int64(i) if (*i as f64) as i64 == *i => Bson::Double(*i as f64),
        Bson::Double(d) if *d == 0.0 => Bson::Double(0.0),
        Bson::Array(items) => Bson::Array(items.iter().map(index_form).collect()),
        Bson::Document(d) => {
            Bson::Document(d.iter().map(|(k, v)| (k.clone(), index_form(v))).collect())
        }
        other => other.clone(),
    }
}

/// Up to `CHUNK` documents from a cursor; empty when it is exhausted.
async fn next_chunk(
    cursor: &mut mongodb::Cursor<Document>,
) -> mongodb::error::Result<Vec<Document>> {
    let mut chunk = Vec::with_capacity(CHUNK);
    while chunk.len() < CHUNK {
        match cursor.try_next().await? {
            Some(d) => chunk.push(d),
            None => break,
        }
    }
    Ok(chunk)
}

/// Plans the chunk exactly as the engine would; any write it would make is drift.
async fn compare_production_chunk(
    cs: &Pipeline,
    changes: &[Change],
    report: &mut CollectionReport,
) -> Result<()> {
    let rules = &cs.rules;
    let existing = cs.fetch_existing(changes).await?;
    let changes = mask_moved_values(rules, &cs.masker, changes, &existing);
    // References as the sync writes them (rewritten to staging `_id`s).
    let (changes, unresolved) = cs.references.remap(changes).await?;
    let changes = &*changes;
    for u in unresolved {
        let c = &changes[u.change];
        report.unresolved_references.push(UnresolvedReference {
            business_key: c
                .doc
                .as_ref()
                .and_then(|d| rules.key_of(d).ok())
                .map(|k| k.describe(&rules.business_key))
                .unwrap_or_else(|| "-".into()),
            production_id: id_text(Some(&c.prod_id)),
            field: u.path,
            references: u.referenced,
            referenced_id: id_text(Some(&u.value)),
        });
    }
    let by_id: HashMap<Vec<u8>, Document> = existing
        .iter()
        .filter_map(|d| Some((canonical(d.get("_id")?), d.clone())))
        .collect();
    let plan = plan_batch(rules, changes, existing, DateTime::now());
    for (c, outcome) in changes.iter().zip(&plan.outcomes) {
        if let Outcome::Failed(f) = outcome {
            let key = c
                .doc
                .as_ref()
                .and_then(|d| rules.key_of(d).ok())
                .map(|k| k.describe(&rules.business_key));
            report.missing.push(Drift {
                business_key: key.unwrap_or_else(|| "-".into()),
                production_id: id_text(Some(&c.prod_id)),
                reason: Some(f.code.clone()),
                ..Default::default()
            });
        }
    }
    for w in &plan.writes {
        let c = &changes[w.changes[0]];
        let key = c
            .doc
            .as_ref()
            .and_then(|d| rules.key_of(d).ok())
            .map(|k| k.describe(&rules.business_key))
            .unwrap_or_else(|| "-".into());
        let production_id = id_text(Some(&c.prod_id));
        match &w.op {
            WriteOp::Insert(_) => report.missing.push(Drift {
                business_key: key,
                production_id,
                ..Default::default()
            }),
            WriteOp::Update { id, set, unset } => {
                let before = by_id.get(&canonical(id));
                let was_deleted = before
                    .map(|d| d.get_bool(&rules.soft_delete_field) == Ok(true))
                    .unwrap_or(false);
                let fields: BTreeSet<String> = set
                    .keys()
                    .chain(unset.keys())
                    .map(|p| p.split('.').next().unwrap_or(p).to_string())
                    .filter(|f| *f != rules.meta_field)
                    .collect();
                let drift = Drift {
                    business_key: key,
                    production_id,
                    staging_id: id_text(Some(id)),
                    fields: fields.into_iter().collect(),
                    ..Default::default()
                };
                if was_deleted {
                    report.deleted_but_present.push(drift);
                } else if !drift.fields.is_empty() {
                    report.differing.push(drift);
                }
                // Otherwise only stagesync's metadata would change: not drift in the data.
            }
            WriteOp::Delete { .. } => {}
        }
    }
    Ok(())
}

/// Staging documents from production whose production `_id` is gone must be deleted as configured.
async fn compare_staging_chunk(
    cs: &Pipeline,
    docs: &[Document],
    masked_ids: Option<&ids::MaskedIdSet>,
    report: &mut CollectionReport,
) -> Result<()> {
    let rules = &cs.rules;
    if rules.deletes == DeleteMode::Ignore {
        return Ok(());
    }
    let ids: Vec<Bson> = docs
        .iter()
        .filter_map(|d| {
            meta_of(d, &rules.meta_field)
                .and_then(|m| m.get("id"))
                .cloned()
        })
        .collect();
    let present: HashSet<Vec<u8>> = match masked_ids {
        Some(set) => ids
            .iter()
            .filter(|id| set.contains(id))
            .map(canonical)
            .collect(),
        None => cs
            .source
            .find(rules.in_subset(doc! { "_id": { "$in": ids } }))
            .projection(doc! { "_id": 1 })
            .await
            .with_context(|| format!("reading production.{}", cs.name))?
            .try_collect::<Vec<Document>>()
            .await
            .with_context(|| format!("reading production.{}", cs.name))?
            .iter()
            .filter_map(|d| d.get("_id").map(canonical))
            .collect(),
    };
    for d in docs {
        let Some(id) = meta_of(d, &rules.meta_field).and_then(|m| m.get("id")) else {
            continue;
        };
        let deleted = d.get_bool(&rules.soft_delete_field) == Ok(true);
        if !present.contains(&canonical(id)) && !deleted {
            let key = rules
                .key_of(d)
                .map(|k| k.describe(&rules.business_key))
                .unwrap_or_else(|_| "-".into());
            report.stale_not_deleted.push(Drift {
                business_key: key,
                production_id: id_text(Some(id)),
                staging_id: id_text(d.get("_id")),
                masked_production_id: masked_ids.map(|_| id.clone()),
                ..Default::default()
            });
        }
    }
    Ok(())
}
