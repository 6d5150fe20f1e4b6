//! `dlq replay`: re-reads the current production document of each dead letter and applies it
//! through the normal merge path (order rule and all); an entry is removed once it applies.

use mongodb::bson::{doc, oid::ObjectId, DateTime};

use crate::cli::Exit;
use crate::engine::{Context, Origin};
use crate::plan::Outcome;
use crate::source::change::{Change, Op};

/// Returns (applied, still failing).
pub async fn replay(ctx: &Context, ids: &[ObjectId]) -> Result<(usize, usize), Exit> {
    let (mut applied, mut failing) = (0, 0);
    for &id in ids {
        let Some(entry) = ctx
            .dead_letters
            .get(id)
            .await
            .map_err(|e| Exit::failed(e.to_string()))?
        else {
            return Err(Exit::failed(format!(
                "no dead letter with id {}",
                id.to_hex()
            )));
        };
        let collection = entry.get_str("collection").unwrap_or_default().to_string();
        let Some(config) = ctx.config.collection(&collection) else {
            eprintln!(
                "dead letter {}: collection `{collection}` is no longer configured; left as it is",
                id.to_hex()
            );
            failing += 1;
            continue;
        };
        let Some(prod_id) = entry.get("productionId").cloned() else {
            failing += 1;
            continue;
        };
        let cs = ctx.collection_sync(config);
        // The read time is taken before the read, so the document is at least as new as it and
        // later stream changes (newer than it) still apply on top.
        let read_time = ctx.production_time().await?;
        let current = cs
            .source
            .find_one(doc! { "_id": prod_id.clone() })
            .await
            .map_err(|e| Exit::failed(format!("reading production.{collection}: {e}")))?;
        let change = match current {
            Some(mut d) => {
                cs.masker.mask_document(&mut d);
                Change::from_snapshot(d, read_time, DateTime::now()).expect("has _id")
            }
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
        let report = cs
            .apply_changes(std::slice::from_ref(&change), Origin::Replay)
            .await
            .map_err(|e| Exit::failed(format!("applying to staging.{}: {e}", cs.target)))?;
        match &report.outcomes[0] {
            Outcome::Failed(f) => {
                eprintln!(
                    "dead letter {}: still failing: {} ({})",
                    id.to_hex(),
                    f.message,
                    f.code
                );
                ctx.dead_letters
                    .touch(id, f)
                    .await
                    .map_err(|e| Exit::failed(e.to_string()))?;
                failing += 1;
            }
            _ => {
                ctx.dead_letters
                    .remove(id)
                    .await
                    .map_err(|e| Exit::failed(e.to_string()))?;
                applied += 1;
            }
        }
    }
    Ok((applied, failing))
}
