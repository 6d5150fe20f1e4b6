//! `dlq replay`: re-reads the current production document of each dead letter and applies it
//! through the normal merge path (order rule and all); an entry is removed once it applies.

use std::collections::HashMap;

use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Timestamp};

use crate::context::Context;
use crate::error::{MongoContext, Result, SyncError};
use crate::pipeline::Origin;
use crate::plan::Outcome;
use crate::source::change::Change;
use crate::transform::ids::{find_raw_ids, RawIds};

/// What a replay did: how many entries applied, and why each of the others still fails.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub applied: usize,
    /// (dead-letter id, why it is still failing)
    pub failing: Vec<(ObjectId, String)>,
}

/// Replays the given dead letters. An id with no dead letter is an error (nothing replayed
/// after it).
///
/// With a masked `_id` (`"_id" = "hash"`) a dead letter holds only the masked production id;
/// the production documents are found by reading production's `_id`s once per collection and
/// masking each (`transform::ids`) — no raw id is ever stored to make this possible.
pub async fn replay(ctx: &Context, ids: &[ObjectId]) -> Result<ReplayReport> {
    let mut report = ReplayReport::default();
    let mut entries = Vec::with_capacity(ids.len());
    for &id in ids {
        let entry = ctx
            .dead_letters
            .get(id)
            .await
            .context("reading the dead-letter queue")?;
        entries.push((id, entry));
    }
    // Masked ids → production ids, one pass per collection, at a read time taken before it.
    let mut resolved: HashMap<String, (Timestamp, RawIds)> = HashMap::new();
    for (_, entry) in entries.iter().take_while(|(_, e)| e.is_some()) {
        let Some(entry) = entry else { continue };
        let collection = entry.get_str("collection").unwrap_or_default();
        let Some(config) = ctx.config.collection(collection) else {
            continue;
        };
        let pipeline = ctx.pipeline(config);
        if !pipeline.masker.masks_id() || resolved.contains_key(collection) {
            continue;
        }
        let wanted: Vec<Bson> = entries
            .iter()
            .filter_map(|(_, e)| e.as_ref())
            .filter(|e| e.get_str("collection").ok() == Some(collection))
            .filter_map(|e| e.get("productionId").cloned())
            .collect();
        let read_time = ctx.production_time().await?;
        let raw = find_raw_ids(
            &pipeline.source,
            &pipeline.masker,
            &wanted,
            pipeline.rules.filter.as_ref(),
        )
        .await
        .with_context(|| format!("reading production.{collection}"))?;
        resolved.insert(collection.to_string(), (read_time, raw));
    }
    for (id, entry) in entries {
        let entry = entry.ok_or_else(|| SyncError::Corrupt {
            what: format!("dead letter {}", id.to_hex()),
            detail: "no such entry (list them with `stagesync dlq list`)".into(),
        })?;
        let collection = entry.get_str("collection").unwrap_or_default().to_string();
        let Some(config) = ctx.config.collection(&collection) else {
            report.failing.push((
                id,
                format!("collection `{collection}` is no longer configured; left as it is"),
            ));
            continue;
        };
        if entry.get_bool("productionIdTruncated").unwrap_or(false) {
            report.failing.push((
                id,
                "the production _id was too large to keep in the dead letter, so it cannot be \
                 re-read; fix the document in production (a later change to it syncs again)"
                    .into(),
            ));
            continue;
        }
        let Some(prod_id) = entry.get("productionId").cloned() else {
            report
                .failing
                .push((id, "the entry has no production _id".into()));
            continue;
        };
        let pipeline = ctx.pipeline(config);
        // The read time is taken before the read, so the document is at least as new as it and
        // later stream changes (newer than it) still apply on top.
        let (read_time, raw_id) = match resolved.get(&collection) {
            Some((read_time, raw)) => (*read_time, raw.raw(&prod_id).cloned()),
            None => (ctx.production_time().await?, Some(prod_id.clone())),
        };
        let current = match raw_id {
            Some(raw_id) => pipeline
                .source
                .find_one(pipeline.rules.in_subset(doc! { "_id": raw_id }))
                .await
                .with_context(|| format!("reading production.{collection}"))?,
            None => None,
        };
        let change = current
            .and_then(|d| Change::from_production(d, &pipeline.masker, read_time, DateTime::now()))
            .unwrap_or_else(|| Change::delete(prod_id.clone(), read_time, Some(DateTime::now())));
        let applied = pipeline
            .apply_changes(std::slice::from_ref(&change), Origin::Replay)
            .await?;
        match &applied.outcomes[0] {
            Outcome::Failed(f) => {
                ctx.dead_letters
                    .touch(id, f)
                    .await
                    .context("updating the dead-letter queue")?;
                report
                    .failing
                    .push((id, format!("{} ({})", f.message, f.code)));
            }
            _ => {
                ctx.dead_letters
                    .remove(id)
                    .await
                    .context("updating the dead-letter queue")?;
                report.applied += 1;
            }
        }
    }
    Ok(report)
}
