//! `dlq replay`: re-reads the current production document of each dead letter and applies it
//! through the normal merge path (order rule and all); an entry is removed once it applies.

use mongodb::bson::{doc, oid::ObjectId, DateTime};

use crate::context::Context;
use crate::error::{MongoContext, Result, SyncError};
use crate::pipeline::Origin;
use crate::plan::Outcome;
use crate::source::change::{Change, Op};

/// What a replay did: how many entries applied, and why each of the others still fails.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub applied: usize,
    /// (dead-letter id, why it is still failing)
    pub failing: Vec<(ObjectId, String)>,
}

/// Replays the given dead letters. An id with no dead letter is an error (nothing replayed
/// after it).
pub async fn replay(ctx: &Context, ids: &[ObjectId]) -> Result<ReplayReport> {
    let mut report = ReplayReport::default();
    for &id in ids {
        let entry = ctx
            .dead_letters
            .get(id)
            .await
            .context("reading the dead-letter queue")?
            .ok_or_else(|| SyncError::Corrupt {
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
        let read_time = ctx.production_time().await?;
        let current = pipeline
            .source
            .find_one(doc! { "_id": prod_id.clone() })
            .await
            .with_context(|| format!("reading production.{collection}"))?;
        let change = match current.and_then(|mut d| {
            pipeline.masker.mask_document(&mut d);
            Change::from_snapshot(d, read_time, DateTime::now())
        }) {
            Some(c) => c,
            None => Change {
                op: Op::Delete,
                prod_id: prod_id.clone(),
                doc: None,
                updated_fields: None,
                removed_fields: vec![],
                cluster_time: read_time,
                wall_time: Some(DateTime::now()),
            },
        };
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
