//! Connections and stores shared by every collection of one sync.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, Timestamp};
use mongodb::options::{ClientOptions, DatabaseOptions};
use mongodb::{Client, Database};
use tokio_util::sync::CancellationToken;

use crate::apply::WriteLimiter;
use crate::checkpoint::CheckpointStore;
use crate::config::{CollectionConfig, Config};
use crate::deadletter::DeadLetters;
use crate::error::{MongoContext, Result, SyncError};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::retry::{retry, Gave, RetryPolicy};

/// How long closing a client waits for the cursors dropped just before to be killed.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub prod: Client,
    pub staging: Client,
    pub prod_db: Database,
    pub staging_db: Database,
    pub meta_db: Database,
    pub checkpoints: CheckpointStore,
    pub dead_letters: DeadLetters,
    pub metrics: Arc<Metrics>,
    pub limiter: Option<Arc<WriteLimiter>>,
    /// Bounds how many collections are snapshotted at once.
    pub snapshot_slots: Arc<tokio::sync::Semaphore>,
    /// Who this process is to the other processes of the sync (`--instance-id`; lease owner).
    pub instance_id: String,
}

/// A client for `uri`. The driver connects lazily, so this only validates the URI (a bad one
/// is the user's input: [`SyncError::InvalidSetting`]).
pub async fn client(uri: &str, key: &str) -> Result<Client> {
    let invalid = |detail: String| SyncError::InvalidSetting {
        key: key.to_string(),
        detail,
    };
    let mut options = ClientOptions::parse(uri)
        .await
        .map_err(|e| invalid(format!("not a usable MongoDB URI: {e}")))?;
    options.app_name = Some("stagesync".into());
    // Short server selection: outages surface quickly and are retried by our own policy, which
    // logs them once, instead of stalling each operation for the driver's default 30 s.
    options.server_selection_timeout = Some(Duration::from_secs(5));
    options.connect_timeout = Some(Duration::from_secs(5));
    Client::with_options(options).map_err(|e| invalid(e.to_string()))
}

/// `hostname-pid` for the first context of the process; later ones (several engines in one
/// process, as in tests) get a suffix so they never share a lease identity.
fn next_instance_id() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CONTEXTS: AtomicUsize = AtomicUsize::new(0);
    match CONTEXTS.fetch_add(1, Ordering::Relaxed) {
        0 => crate::lease::default_instance_id(),
        n => format!("{}-{}", crate::lease::default_instance_id(), n + 1),
    }
}

impl Context {
    /// Builds the clients and stores. Nothing is contacted yet: see [`Context::wait_reachable`].
    pub async fn connect(config: Arc<Config>) -> Result<Context> {
        let prod = client(&config.source.uri, "source.uri").await?;
        let staging = client(&config.target.uri, "target.uri").await?;
        let prod_db = prod.database(&config.source.database);
        let staging_db = staging.database(&config.target.database);
        // Checkpoints and dead letters are written with the configured write concern too.
        let meta_db = staging.database_with_options(
            &config.sync.metadata_database,
            DatabaseOptions::builder()
                .write_concern(crate::apply::write_concern(&config.sync.write_concern))
                .build(),
        );
        let checkpoints = CheckpointStore::open(&config, &meta_db)?;
        let dead_letters = DeadLetters::new(&meta_db, &config.sync.name);
        let limiter = config
            .sync
            .max_writes_per_second
            .and_then(WriteLimiter::new);
        let snapshot_concurrency = config.sync.snapshot_concurrency;
        let metrics = Arc::new(Metrics::new(Health::new(
            config.collections.iter().map(|c| c.name.clone()),
            config.sync.stall_after,
        )));
        Ok(Context {
            config,
            prod,
            staging,
            prod_db,
            staging_db,
            meta_db,
            checkpoints,
            dead_letters,
            metrics,
            limiter,
            snapshot_slots: Arc::new(tokio::sync::Semaphore::new(snapshot_concurrency)),
            instance_id: next_instance_id(),
        })
    }

    /// This context under another instance id (`run --instance-id`).
    pub fn with_instance_id(mut self, id: &str) -> Context {
        self.instance_id = id.to_string();
        self
    }

    pub fn pipeline(&self, c: &CollectionConfig) -> Pipeline {
        Pipeline::new(self, c)
    }

    /// Waits until production, staging and the checkpoint store answer, retrying with the one
    /// policy (saying so once per side) for at most `deadline`. `Ok(false)` when stopped.
    pub async fn wait_reachable(
        &self,
        deadline: Duration,
        shutdown: &CancellationToken,
    ) -> Result<bool> {
        let policy = RetryPolicy::until(deadline);
        for (label, client) in [("production", &self.prod), ("staging", &self.staging)] {
            let ping = || async {
                client
                    .database("admin")
                    .run_command(doc! { "ping": 1 })
                    .await
                    .context(format!("pinging {label}"))
            };
            let said = |e: &SyncError, b: &crate::retry::Backoff| {
                if b.attempts() == 0 {
                    tracing::warn!(error = %e, "{label} is not reachable; retrying for up to {deadline:?}");
                }
            };
            let health = self.metrics.health();
            let said = |e: &SyncError, b: &crate::retry::Backoff| {
                match label {
                    "production" => health.production_unreachable(),
                    _ => health.staging_unreachable(),
                }
                said(e, b)
            };
            match retry(&policy, shutdown, ping, SyncError::is_transient, said).await {
                Ok((_, failures)) => {
                    match label {
                        "production" => health.production_reachable(),
                        _ => health.staging_reachable(),
                    }
                    if failures > 0 {
                        tracing::info!("{label} is reachable again");
                    }
                }
                Err(Gave::Stopped) => return Ok(false),
                Err(Gave::Up(e)) if e.is_transient() => {
                    return Err(SyncError::Unreachable {
                        what: label.to_string(),
                        waited: deadline,
                        last_error: e.to_string(),
                    })
                }
                Err(Gave::Up(e)) => return Err(e),
            }
        }
        let store = || self.checkpoints.ping();
        let said = |e: &SyncError, b: &crate::retry::Backoff| {
            if b.attempts() == 0 {
                tracing::warn!(error = %e, "the checkpoint store is not reachable; retrying for up to {deadline:?}");
            }
        };
        match retry(&policy, shutdown, store, SyncError::is_transient, said).await {
            Ok(_) => Ok(true),
            Err(Gave::Stopped) => Ok(false),
            Err(Gave::Up(e)) if e.is_transient() => Err(SyncError::Unreachable {
                what: "the checkpoint store".into(),
                waited: deadline,
                last_error: e.to_string(),
            }),
            Err(Gave::Up(e)) => Err(e),
        }
    }

    /// Production's current operation time: where a snapshot reads from.
    pub async fn production_time(&self) -> Result<Timestamp> {
        let reply = self
            .prod_db
            .run_command(doc! { "ping": 1 })
            .await
            .context("reading production's operation time")?;
        let from_reply = reply.get_timestamp("operationTime").ok().or_else(|| {
            reply
                .get_document("$clusterTime")
                .ok()
                .and_then(|c| c.get_timestamp("clusterTime").ok())
        });
        if let Some(t) = from_reply {
            return Ok(t);
        }
        let hello = self
            .prod
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
            .context("reading production's operation time")?;
        hello
            .get_document("lastWrite")
            .ok()
            .and_then(|w| w.get_document("opTime").ok())
            .and_then(|o| o.get_timestamp("ts").ok())
            .or_else(|| hello.get_timestamp("operationTime").ok())
            .ok_or_else(|| {
                SyncError::Production(
                    "production did not report an operation time; is it a replica set? \
                     (change streams need a replica set or a sharded cluster)"
                        .into(),
                )
            })
    }

    /// Closes both clients; the checkpoint store's Redis connection closes as `self` drops.
    /// Every command calls this before the runtime ends: a driver dropped at runtime teardown
    /// can panic in its background tasks.
    ///
    /// A cursor or change stream dropped moments ago is killed on the server by a task the
    /// driver spawned; were the runtime to end under it, that task panics
    /// (`JoinError::Cancelled` in `kill_cursor`). So each client first waits for those tasks —
    /// for [`CLOSE_GRACE`] at most, in case a server does not answer — and only then closes
    /// immediately.
    pub async fn shutdown(self) {
        let close = |client: Client| async move {
            if tokio::time::timeout(CLOSE_GRACE, client.clone().shutdown())
                .await
                .is_err()
            {
                client.shutdown().immediate(true).await;
            }
        };
        tokio::join!(close(self.prod), close(self.staging));
    }
}
