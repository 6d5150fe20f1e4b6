//! Checkpoint store: where each change stream's resume position is kept between runs.
//!
//! One checkpoint per stream (per configured collection), keyed by sync name. The resume token
//! is kept as BSON end to end — in MongoDB as a sub-document, in Redis as the bytes of a BSON
//! document — because a JSON round trip loses type information and the server then refuses the
//! token. The engine saves a token only after every change before it was acknowledged by staging.

use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::ReplaceOptions;
use mongodb::{Collection, Database};
#[cfg(feature = "redis")]
use redis::AsyncCommands;
#[cfg(feature = "redis")]
use std::sync::Arc;

use crate::config::{CheckpointStoreKind, Config};
use crate::error::{MongoContext, Result, SyncError};

/// The saved position of one stream.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Checkpoint {
    /// The resume token, as the server sent it.
    pub token: Option<Bson>,
    /// The production cluster time the position stands for.
    pub cluster_time: Option<Timestamp>,
    /// Production's wall time of the last applied change.
    pub wall_time: Option<DateTime>,
    /// When this checkpoint was written.
    pub saved_at: Option<DateTime>,
    /// Progress of an unfinished snapshot of the collection (see `snapshot`).
    pub snapshot: Option<Document>,
    /// Saved by a run that stopped cleanly: no run applied any change after this production
    /// time, so the next run knows the changes after it are new to staging (see
    /// `plan::fresh_inserts`). It is the later of the position (what the stopping run applied)
    /// and the horizon that run started with (what earlier runs may have applied), so it is
    /// known even for a run that saw no change at all. Any later save clears it.
    pub horizon: Option<Timestamp>,
}

impl Checkpoint {
    pub fn resume_token(&self) -> Option<ResumeToken> {
        self.token
            .clone()
            .and_then(|t| mongodb::bson::from_bson(t).ok())
    }

    pub fn with_token(mut self, token: &ResumeToken) -> Checkpoint {
        self.token = mongodb::bson::to_bson(token).ok();
        self
    }

    fn to_document(&self, sync: &str, stream: &str) -> Document {
        let mut d = doc! { "_id": stream_id(sync, stream), "sync": sync, "stream": stream };
        let opt = |d: &mut Document, k: &str, v: Option<Bson>| {
            if let Some(v) = v {
                d.insert(k, v);
            }
        };
        opt(&mut d, "token", self.token.clone());
        opt(
            &mut d,
            "clusterTime",
            self.cluster_time.map(Bson::Timestamp),
        );
        opt(&mut d, "wallTime", self.wall_time.map(Bson::DateTime));
        opt(&mut d, "savedAt", Some(Bson::DateTime(DateTime::now())));
        opt(
            &mut d,
            "snapshot",
            self.snapshot.clone().map(Bson::Document),
        );
        opt(&mut d, "horizon", self.horizon.map(Bson::Timestamp));
        d
    }

    fn from_document(d: &Document) -> Checkpoint {
        Checkpoint {
            token: d.get("token").cloned(),
            cluster_time: d.get_timestamp("clusterTime").ok(),
            wall_time: d.get_datetime("wallTime").ok().copied(),
            saved_at: d.get_datetime("savedAt").ok().copied(),
            snapshot: d.get_document("snapshot").ok().cloned(),
            // `exact: true` is how a clean stop said it before `horizon`: its position.
            horizon: d.get_timestamp("horizon").ok().or_else(|| {
                d.get_bool("exact")
                    .unwrap_or(false)
                    .then(|| d.get_timestamp("clusterTime").ok())
                    .flatten()
            }),
        }
    }
}

fn stream_id(sync: &str, stream: &str) -> String {
    format!("{sync}/{stream}")
}

#[derive(Clone)]
enum Backend {
    Mongo(Collection<Document>),
    #[cfg(feature = "redis")]
    Redis(RedisBackend),
}

/// Redis, connected on first use and reconnected by the driver's `ConnectionManager` after the
/// server restarts; callers retry failed operations with the one retry policy.
///
/// The manager itself does not retry: left to its defaults it backs off *inside* a reconnect —
/// over a hundred seconds after a short outage, during which every operation waits on it —
/// so a Redis that came back stayed unused for minutes. Here each operation makes at most one
/// connection attempt (bounded by the connection timeout), fails fast while Redis is down, and
/// the next attempt, paced by the caller's backoff, connects again.
#[cfg(feature = "redis")]
#[derive(Clone)]
struct RedisBackend {
    client: redis::Client,
    conn: Arc<tokio::sync::OnceCell<redis::aio::ConnectionManager>>,
    prefix: String,
}

#[cfg(feature = "redis")]
impl RedisBackend {
    async fn connection(&self) -> Result<redis::aio::ConnectionManager> {
        // The manager reconnects by itself after the server restarts; its own retries are kept
        // short (our retry policy decides how long to keep trying), and the first connection
        // is bounded so a dead server fails fast instead of hanging the caller.
        const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(CONNECT_TIMEOUT)
            // One attempt per operation: its own backoff inside a reconnect once held every
            // save for about two minutes after an outage; our retry policy paces the next try.
            .set_number_of_retries(0)
            .set_max_delay(100);
        self.conn
            .get_or_try_init(|| async {
                let connect =
                    redis::aio::ConnectionManager::new_with_config(self.client.clone(), config);
                match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                    Ok(r) => r,
                    Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer within 5 s",
                    ))),
                }
            })
            .await
            .cloned()
            .map_err(|e| redis_error("connecting to the Redis checkpoint store", e))
    }
}

#[cfg(feature = "redis")]
fn redis_error(what: &str, source: redis::RedisError) -> SyncError {
    SyncError::Redis {
        what: what.to_string(),
        source,
    }
}

/// Checkpoints of one sync, in MongoDB (the target's metadata database) or Redis.
#[derive(Clone)]
pub struct CheckpointStore {
    sync: String,
    backend: Backend,
}

impl CheckpointStore {
    /// The configured store. Nothing is contacted yet; a malformed Redis URL is refused here.
    pub fn open(config: &Config, metadata: &Database) -> Result<CheckpointStore> {
        let sync = config.sync.name.clone();
        let backend = match config.checkpoint.store {
            CheckpointStoreKind::Mongodb => Backend::Mongo(metadata.collection("checkpoints")),
            #[cfg(feature = "redis")]
            CheckpointStoreKind::Redis => {
                let url = config.checkpoint.url.as_deref().unwrap_or_default();
                let client = redis::Client::open(url).map_err(|e| SyncError::InvalidSetting {
                    key: "checkpoint.url".into(),
                    detail: format!("not a usable Redis URL: {e}"),
                })?;
                Backend::Redis(RedisBackend {
                    client,
                    conn: Arc::default(),
                    prefix: "stagesync:checkpoint:".into(),
                })
            }
            #[cfg(not(feature = "redis"))]
            CheckpointStoreKind::Redis => {
                return Err(SyncError::InvalidSetting {
                    key: "checkpoint.store".into(),
                    detail:
                        "this stagesync was built without Redis support (cargo feature `redis`); \
                             use store = \"mongodb\" or a build with the feature"
                            .into(),
                })
            }
        };
        Ok(CheckpointStore { sync, backend })
    }

    /// Where the checkpoints live, for log lines: "staging" or "Redis".
    pub fn location(&self) -> &'static str {
        match &self.backend {
            Backend::Mongo(_) => "staging",
            #[cfg(feature = "redis")]
            Backend::Redis(_) => "Redis",
        }
    }

    /// Answers when the store can be reached.
    pub async fn ping(&self) -> Result<()> {
        match &self.backend {
            Backend::Mongo(c) => c
                .find_one(doc! { "_id": "" })
                .await
                .map(|_| ())
                .context("reading the checkpoint store"),
            #[cfg(feature = "redis")]
            Backend::Redis(r) => {
                let mut conn = r.connection().await?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| redis_error("pinging the Redis checkpoint store", e))
            }
        }
    }

    pub async fn load(&self, stream: &str) -> Result<Option<Checkpoint>> {
        let id = stream_id(&self.sync, stream);
        match &self.backend {
            Backend::Mongo(c) => Ok(c
                .find_one(doc! { "_id": &id })
                .await
                .with_context(|| format!("reading the checkpoint of `{stream}`"))?
                .map(|d| Checkpoint::from_document(&d))),
            #[cfg(feature = "redis")]
            Backend::Redis(r) => {
                let key = format!("{}{id}", r.prefix);
                let bytes: Option<Vec<u8>> =
                    r.connection().await?.get(&key).await.map_err(|e| {
                        redis_error(
                            &format!("reading the checkpoint of `{stream}` from Redis"),
                            e,
                        )
                    })?;
                match bytes {
                    None => Ok(None),
                    Some(b) => {
                        let d = Document::from_reader(&mut b.as_slice()).map_err(|e| {
                            SyncError::Corrupt {
                                what: format!("the checkpoint of `{stream}` in Redis"),
                                detail: format!("not BSON ({e}); delete key {key} to start over"),
                            }
                        })?;
                        Ok(Some(Checkpoint::from_document(&d)))
                    }
                }
            }
        }
    }

    /// Saves `cp`. With an `epoch` (the lease's, see [`crate::lease`]) the save is fenced: it
    /// succeeds only while no newer epoch has claimed this checkpoint, and is refused with
    /// [`SyncError::LeaseLost`] otherwise — a stale owner can never move a checkpoint.
    pub async fn save(&self, stream: &str, cp: &Checkpoint, epoch: Option<i64>) -> Result<()> {
        let mut d = cp.to_document(&self.sync, stream);
        let id = stream_id(&self.sync, stream);
        let refused = || SyncError::LeaseLost {
            collection: stream.to_string(),
            detail: format!(
                "its checkpoint was claimed by a newer lease than epoch {}",
                epoch.unwrap_or_default()
            ),
        };
        match &self.backend {
            Backend::Mongo(c) => {
                let filter = match epoch {
                    Some(e) => {
                        d.insert("epoch", e);
                        doc! { "_id": &id, "$or": [ { "epoch": { "$lte": e } }, { "epoch": { "$exists": false } } ] }
                    }
                    None => doc! { "_id": &id },
                };
                match c
                    .replace_one(filter, &d)
                    .with_options(ReplaceOptions::builder().upsert(true).build())
                    .await
                {
                    Ok(_) => {}
                    // The filter missed a newer epoch's document, so the upsert collided with it.
                    Err(e)
                        if epoch.is_some()
                            && crate::retry::command_code(&e)
                                == Some(crate::retry::DUPLICATE_KEY) =>
                    {
                        return Err(refused())
                    }
                    Err(e) => {
                        return Err(SyncError::mongo(
                            format!("saving the checkpoint of `{stream}`"),
                            e,
                        ))
                    }
                }
            }
            #[cfg(feature = "redis")]
            Backend::Redis(r) => {
                let mut bytes = Vec::new();
                d.to_writer(&mut bytes).map_err(|e| SyncError::Corrupt {
                    what: format!("the checkpoint of `{stream}`"),
                    detail: e.to_string(),
                })?;
                let key = format!("{}{id}", r.prefix);
                // One script, so the epoch check and the write cannot interleave with another
                // process's.
                let script = redis::Script::new(
                    "local cur = tonumber(redis.call('GET', KEYS[2]) or '-1') \
                     local mine = tonumber(ARGV[2]) \
                     if mine >= 0 and cur > mine then return 0 end \
                     redis.call('SET', KEYS[1], ARGV[1]) \
                     if mine >= 0 then redis.call('SET', KEYS[2], ARGV[2]) end \
                     return 1",
                );
                let ok: i32 = script
                    .key(&key)
                    .key(format!("{key}:epoch"))
                    .arg(bytes)
                    .arg(epoch.unwrap_or(-1))
                    .invoke_async(&mut r.connection().await?)
                    .await
                    .map_err(|e| {
                        redis_error(&format!("saving the checkpoint of `{stream}` to Redis"), e)
                    })?;
                if ok == 0 {
                    return Err(refused());
                }
            }
        }
        Ok(())
    }

    /// Marks the checkpoint as claimed by lease `epoch`: from now on saves of older epochs are
    /// refused. Called by a new owner before it reads the checkpoint.
    pub async fn claim(&self, stream: &str, epoch: i64) -> Result<()> {
        let id = stream_id(&self.sync, stream);
        match &self.backend {
            Backend::Mongo(c) => {
                c.update_one(
                    doc! { "_id": &id, "$or": [ { "epoch": { "$lt": epoch } }, { "epoch": { "$exists": false } } ] },
                    doc! { "$set": { "epoch": epoch } },
                )
                .await
                .with_context(|| format!("claiming the checkpoint of `{stream}`"))?;
            }
            #[cfg(feature = "redis")]
            Backend::Redis(r) => {
                let key = format!("{}{id}:epoch", r.prefix);
                let script = redis::Script::new(
                    "local cur = tonumber(redis.call('GET', KEYS[1]) or '-1') \
                     if cur < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end \
                     return 1",
                );
                let _: i32 = script
                    .key(key)
                    .arg(epoch)
                    .invoke_async(&mut r.connection().await?)
                    .await
                    .map_err(|e| {
                        redis_error(
                            &format!("claiming the checkpoint of `{stream}` in Redis"),
                            e,
                        )
                    })?;
            }
        }
        Ok(())
    }
}
