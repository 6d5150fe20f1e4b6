//! Transform stage: deterministic masking of personal data, applied to every production document
//! and update description before anything else sees it (matching, merging, logs, dead letters).
//!
//! `mask.rs` holds the rules: by path, then by value (a value that left a masked path through
//! `$rename` or a copy is still masked), and the production `_id` when a rule names it. Its
//! module documentation states the value rule exactly. [`ids`] maps masked `_id`s back to
//! production for the few readers that must query production by `_id` (snapshot resume, prune,
//! verify, `dlq replay`).

pub mod ids;
mod mask;

/// The rule names belong to the configuration's vocabulary; re-exported here for the masker's users.
pub use crate::config::MaskRule;
pub use mask::Masker;

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document};
use mongodb::Collection;

/// Reads up to `limit` production documents and returns each as (raw with every value shortened
/// to its first character, masked) extended JSON — for reviewing rules before a first sync.
pub async fn preview(
    source: &Collection<Document>,
    masker: &Masker,
    limit: i64,
) -> mongodb::error::Result<Vec<(String, String)>> {
    let docs: Vec<Document> = source
        .find(Document::new())
        .limit(limit)
        .await?
        .try_collect()
        .await?;
    Ok(docs
        .into_iter()
        .map(|raw| {
            let mut masked = raw.clone();
            masker.mask_document(&mut masked);
            let shortened = shorten(Bson::Document(raw));
            (
                shortened.into_relaxed_extjson().to_string(),
                Bson::Document(masked).into_relaxed_extjson().to_string(),
            )
        })
        .collect())
}

/// Every scalar becomes the first character of its text followed by `…`.
fn shorten(v: Bson) -> Bson {
    match v {
        Bson::Document(d) => Bson::Document(d.into_iter().map(|(k, v)| (k, shorten(v))).collect()),
        Bson::Array(a) => Bson::Array(a.into_iter().map(shorten).collect()),
        Bson::Null => Bson::Null,
        Bson::String(s) => Bson::String(format!(
            "{}…",
            s.chars().next().map(String::from).unwrap_or_default()
        )),
        other => {
            let text = other.to_string();
            Bson::String(format!(
                "{}…",
                text.chars().next().map(String::from).unwrap_or_default()
            ))
        }
    }
}
