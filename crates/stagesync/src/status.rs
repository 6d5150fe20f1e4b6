//! What `stagesync status` and the telemetry endpoint `/status` report, per collection:
//! checkpoint time and age, lag, snapshot progress, dead letters, and who holds the
//! collection's lease.

use mongodb::bson::DateTime;
use serde::Serialize;

use crate::context::Context;
use crate::error::{MongoContext, Result};
use crate::lease::LeaseStore;

#[derive(Debug, Clone, Serialize)]
pub struct CollectionStatus {
    pub collection: String,
    /// When the checkpoint was last written (RFC 3339).
    pub checkpoint_saved_at: Option<String>,
    /// The production time the checkpoint stands for (RFC 3339).
    pub checkpoint_time: Option<String>,
    /// Seconds between the checkpoint's production time and now.
    pub lag_seconds: Option<f64>,
    /// Seconds since the checkpoint was last written.
    pub checkpoint_age_seconds: Option<f64>,
    pub snapshot_in_progress: bool,
    pub dead_letters: u64,
    /// The process holding the collection's lease (`--instance-id`), if any holds it now.
    pub owner: Option<String>,
    /// The lease's epoch (grows on every change of owner).
    pub epoch: Option<i64>,
    /// When the lease expires unless renewed (RFC 3339).
    pub lease_expires_at: Option<String>,
}

/// Reads every configured collection's checkpoint and dead-letter count.
pub async fn collect(ctx: &Context) -> Result<Vec<CollectionStatus>> {
    let now = DateTime::now();
    let sync = &ctx.config.sync;
    let leases = LeaseStore::new(&ctx.meta_db, &sync.name, &ctx.instance_id, sync.lease_ttl)
        .all()
        .await?;
    let mut rows = Vec::new();
    for c in &ctx.config.collections {
        let lease = leases.iter().find(|l| l.collection == c.name);
        let live = lease.filter(|l| !l.is_free(now));
        let cp = ctx.checkpoints.load(&c.name).await?.unwrap_or_default();
        let dead_letters = ctx
            .dead_letters
            .count(Some(&c.name))
            .await
            .context("counting dead letters")?;
        let to_s = |t: Option<DateTime>| t.and_then(|t| t.try_to_rfc3339_string().ok());
        let cluster_time = cp
            .cluster_time
            .map(|t| DateTime::from_millis(i64::from(t.time) * 1000));
        let position = cp.wall_time.or(cluster_time);
        rows.push(CollectionStatus {
            collection: c.name.clone(),
            checkpoint_saved_at: to_s(cp.saved_at),
            checkpoint_time: to_s(position),
            lag_seconds: position
                .map(|w| (now.timestamp_millis() - w.timestamp_millis()) as f64 / 1000.0),
            checkpoint_age_seconds: cp
                .saved_at
                .map(|t| (now.timestamp_millis() - t.timestamp_millis()) as f64 / 1000.0),
            snapshot_in_progress: cp.snapshot.is_some(),
            dead_letters,
            owner: live.and_then(|l| l.owner.clone()),
            epoch: lease.map(|l| l.epoch),
            lease_expires_at: to_s(live.and_then(|l| l.expires_at)),
        });
    }
    Ok(rows)
}
