//! Collection leases: any number of `stagesync run` processes with the same `[sync] name` share
//! the configured collections, each collection owned by at most one process at a time.
//!
//! A lease is a document in `<metadata_database>.leases`:
//! `{_id: "<sync>/<collection>", owner, epoch, expiresAt, renewedAt}`. It is taken when it is
//! free or expired, and renewed every `lease_ttl / 3`, always by compare-and-set on
//! `(owner, epoch)` with majority write concern, so two processes can never both believe they
//! took it. The epoch grows on every change of owner and fences what a stale owner could still
//! do: its checkpoint saves are refused ([`crate::checkpoint`]), and its staging writes are
//! conditional on `_sync.ts` ([`crate::apply`]), so it can never put older state back.
//!
//! Clocks: expiry is written and read with each process's own clock. An owner stops acting on a
//! lease [`SKEW_MARGIN`] before it expires by its own clock (and as soon as a renewal fails), so
//! clocks that disagree by less than that margin never let two processes act at once; keep the
//! hosts' clocks synchronised (NTP) well within it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::{ReturnDocument, WriteConcern};
use mongodb::{Collection, Database};

use crate::error::{MongoContext, Result};
use crate::retry::DUPLICATE_KEY;

/// How long before its expiry (by its own clock) an owner stops acting on a lease: the
/// tolerated clock skew between processes, capped at a third of the lease.
pub const SKEW_MARGIN: Duration = Duration::from_secs(2);

/// The default `--instance-id`: `hostname-pid`.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "stagesync".into());
    format!("{host}-{}", std::process::id())
}

/// One lease as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub collection: String,
    pub owner: Option<String>,
    pub epoch: i64,
    pub expires_at: Option<DateTime>,
}

impl Lease {
    fn from_document(d: &Document) -> Lease {
        Lease {
            collection: d.get_str("collection").unwrap_or_default().to_string(),
            owner: d.get_str("owner").ok().map(String::from),
            epoch: d
                .get_i64("epoch")
                .or_else(|_| d.get_i32("epoch").map(i64::from))
                .unwrap_or(0),
            expires_at: d.get_datetime("expiresAt").ok().copied(),
        }
    }

    /// True when nobody may act on it any more (no owner, or past its expiry by our clock).
    pub fn is_free(&self, now: DateTime) -> bool {
        self.owner.is_none() || self.expires_at.is_none_or(|e| e <= now)
    }
}

/// What a process holding a lease may do: act while [`Fence::is_valid`], with its `epoch`
/// carried by every checkpoint save.
#[derive(Debug, Clone)]
pub struct Fence {
    pub collection: String,
    pub epoch: i64,
    valid_until: Arc<Mutex<Instant>>,
}

impl Fence {
    fn new(collection: &str, epoch: i64, valid_until: Instant) -> Fence {
        Fence {
            collection: collection.to_string(),
            epoch,
            valid_until: Arc::new(Mutex::new(valid_until)),
        }
    }

    /// True while the lease was renewed recently enough that no other process can have taken
    /// it. A process that was paused (SIGSTOP, a VM migration) finds this false on waking:
    /// the monotonic clock kept running.
    pub fn is_valid(&self) -> bool {
        Instant::now() < *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn extend(&self, until: Instant) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }

    fn revoke(&self) {
        self.extend(Instant::now());
    }
}

/// The leases of one sync, seen from one process.
#[derive(Clone)]
pub struct LeaseStore {
    leases: Collection<Document>,
    instances: Collection<Document>,
    sync: String,
    pub instance: String,
    pub ttl: Duration,
}

impl LeaseStore {
    pub fn new(meta: &Database, sync: &str, instance: &str, ttl: Duration) -> LeaseStore {
        // Leases are taken and renewed with majority write concern whatever `write_concern`
        // says: an acknowledged lease must survive a failover of the metadata server.
        let majority = mongodb::options::CollectionOptions::builder()
            .write_concern(WriteConcern::majority())
            .build();
        LeaseStore {
            leases: meta.collection_with_options("leases", majority.clone()),
            instances: meta.collection_with_options("instances", majority),
            sync: sync.to_string(),
            instance: instance.to_string(),
            ttl,
        }
    }

    fn id(&self, collection: &str) -> String {
        format!("{}/{collection}", self.sync)
    }

    /// How long after a successful write of `expiresAt = now + ttl` we may still act.
    fn acting_window(&self) -> Duration {
        let margin = SKEW_MARGIN.min(self.ttl / 3);
        self.ttl.saturating_sub(margin)
    }

    fn expiry(&self) -> DateTime {
        DateTime::from_millis(DateTime::now().timestamp_millis() + self.ttl.as_millis() as i64)
    }

    /// Every lease of this sync.
    pub async fn all(&self) -> Result<Vec<Lease>> {
        let docs: Vec<Document> = self
            .leases
            .find(doc! { "sync": &self.sync })
            .await
            .context("reading the leases")?
            .try_collect()
            .await
            .context("reading the leases")?;
        Ok(docs.iter().map(Lease::from_document).collect())
    }

    /// Takes `collection` when it is free, expired or already ours. `None` when another
    /// process holds it.
    pub async fn acquire(&self, collection: &str) -> Result<Option<Fence>> {
        let id = self.id(collection);
        let started = Instant::now();
        let now = DateTime::now();
        let current = self
            .leases
            .find_one(doc! { "_id": &id })
            .await
            .context("reading a lease")?;
        let taken = match current.as_ref().map(Lease::from_document) {
            None => {
                let d = doc! {
                    "_id": &id, "sync": &self.sync, "collection": collection,
                    "owner": &self.instance, "epoch": 1_i64,
                    "expiresAt": self.expiry(), "renewedAt": now,
                };
                match self.leases.insert_one(d).await {
                    Ok(_) => Some(1),
                    Err(e) if crate::retry::command_code(&e) == Some(DUPLICATE_KEY) => None,
                    Err(e) => return Err(e).context("taking a lease"),
                }
            }
            Some(l) if l.owner.as_deref() == Some(&self.instance) || l.is_free(now) => {
                // Compare-and-set on what we read: a concurrent taker makes this match nothing.
                let epoch = if l.owner.as_deref() == Some(&self.instance) && !l.is_free(now) {
                    l.epoch
                } else {
                    l.epoch + 1
                };
                let mut filter = doc! { "_id": &id, "epoch": l.epoch };
                match &l.owner {
                    Some(o) => filter.insert("owner", o),
                    None => filter.insert("owner", mongodb::bson::Bson::Null),
                };
                let updated = self
                    .leases
                    .find_one_and_update(
                        filter,
                        doc! { "$set": {
                            "owner": &self.instance, "epoch": epoch,
                            "expiresAt": self.expiry(), "renewedAt": now,
                        } },
                    )
                    .return_document(ReturnDocument::After)
                    .await
                    .context("taking a lease")?;
                updated.map(|_| epoch)
            }
            Some(_) => None,
        };
        Ok(taken.map(|epoch| Fence::new(collection, epoch, started + self.acting_window())))
    }

    /// Extends a held lease. False when it was lost (another owner, a newer epoch): the fence
    /// is revoked and the caller must drop the collection.
    pub async fn renew(&self, fence: &Fence) -> Result<bool> {
        let started = Instant::now();
        let result = self
            .leases
            .update_one(
                doc! { "_id": self.id(&fence.collection), "owner": &self.instance, "epoch": fence.epoch },
                doc! { "$set": { "expiresAt": self.expiry(), "renewedAt": DateTime::now() } },
            )
            .await;
        match result {
            Ok(r) if r.matched_count == 1 => {
                fence.extend(started + self.acting_window());
                Ok(true)
            }
            Ok(_) => {
                fence.revoke();
                Ok(false)
            }
            Err(e) => Err(e).context("renewing a lease"),
        }
    }

    /// Gives a lease up (on shutdown, or to rebalance) so another process takes it at once.
    pub async fn release(&self, fence: &Fence) -> Result<()> {
        fence.revoke();
        self.leases
            .update_one(
                doc! { "_id": self.id(&fence.collection), "owner": &self.instance, "epoch": fence.epoch },
                doc! { "$set": { "owner": mongodb::bson::Bson::Null, "expiresAt": DateTime::now() } },
            )
            .await
            .context("releasing a lease")?;
        Ok(())
    }

    /// Says this process is alive (for balancing), until `ttl` from now.
    pub async fn heartbeat(&self) -> Result<()> {
        self.instances
            .update_one(
                doc! { "_id": format!("{}/{}", self.sync, self.instance) },
                doc! { "$set": { "sync": &self.sync, "instance": &self.instance, "expiresAt": self.expiry() } },
            )
            .upsert(true)
            .await
            .context("announcing this instance")?;
        Ok(())
    }

    /// Removes this process from the live set (clean shutdown).
    pub async fn leave(&self) -> Result<()> {
        self.instances
            .delete_one(doc! { "_id": format!("{}/{}", self.sync, self.instance) })
            .await
            .context("leaving the instance set")?;
        Ok(())
    }

    /// How many processes of this sync are alive (at least this one).
    pub async fn live_instances(&self) -> Result<usize> {
        let n = self
            .instances
            .count_documents(doc! { "sync": &self.sync, "expiresAt": { "$gt": DateTime::now() } })
            .await
            .context("counting live instances")?;
        Ok((n as usize).max(1))
    }
}

/// The most collections one of `instances` processes should hold.
pub fn fair_share(collections: usize, instances: usize) -> usize {
    collections.div_ceil(instances.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_share_rounds_up_so_every_collection_has_room() {
        assert_eq!(fair_share(6, 3), 2);
        assert_eq!(fair_share(6, 4), 2);
        assert_eq!(fair_share(1, 3), 1);
        assert_eq!(fair_share(5, 1), 5);
        assert_eq!(fair_share(5, 0), 5);
    }

    #[test]
    fn a_lease_is_free_without_owner_or_past_expiry() {
        let now = DateTime::now();
        let later = DateTime::from_millis(now.timestamp_millis() + 1000);
        let mut l = Lease {
            collection: "c".into(),
            owner: Some("a".into()),
            epoch: 3,
            expires_at: Some(later),
        };
        assert!(!l.is_free(now));
        assert!(l.is_free(later));
        l.owner = None;
        assert!(l.is_free(now));
    }

    #[test]
    fn a_fence_stops_being_valid_when_revoked_or_past_its_window() {
        let f = Fence::new("c", 1, Instant::now() + Duration::from_secs(60));
        assert!(f.is_valid());
        f.revoke();
        assert!(!f.is_valid());
        f.extend(Instant::now() + Duration::from_secs(60));
        assert!(f.is_valid());
        f.extend(Instant::now() - Duration::from_millis(1));
        assert!(!f.is_valid());
    }
}
