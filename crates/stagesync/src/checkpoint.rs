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
use redis::AsyncCommands;

use crate::config::{CheckpointStoreKind, Config};

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
        d
    }

    fn from_document(d: &Document) -> Checkpoint {
        Checkpoint {
            token: d.get("token").cloned(),
            cluster_time: d.get_timestamp("clusterTime").ok(),
            wall_time: d.get_datetime("wallTime").ok().copied(),
            saved_at: d.get_datetime("savedAt").ok().copied(),
            snapshot: d.get_document("snapshot").ok().cloned(),
        }
    }
}

fn stream_id(sync: &str, stream: &str) -> String {
    format!("{sync}/{stream}")
}

#[derive(Clone)]
enum Backend {
    Mongo(Collection<Document>),
    Redis {
        conn: redis::aio::MultiplexedConnection,
        prefix: String,
    },
}

/// Checkpoints of one sync, in MongoDB (the target's metadata database) or Redis.
#[derive(Clone)]
pub struct CheckpointStore {
    sync: String,
    backend: Backend,
}

impl CheckpointStore {
    pub async fn open(config: &Config, metadata: &Database) -> anyhow::Result<CheckpointStore> {
        let sync = config.sync.name.clone();
        let backend = match config.checkpoint.store {
            CheckpointStoreKind::Mongodb => Backend::Mongo(metadata.collection("checkpoints")),
            CheckpointStoreKind::Redis => {
                let url = config.checkpoint.url.as_deref().unwrap_or_default();
                let client = redis::Client::open(url).map_err(|e| {
                    anyhow::anyhow!("`checkpoint.url` is not a usable Redis URL: {e}")
                })?;
                let conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot reach the Redis checkpoint store: {e}"))?;
                Backend::Redis {
                    conn,
                    prefix: "stagesync:checkpoint:".into(),
                }
            }
        };
        Ok(CheckpointStore { sync, backend })
    }

    pub async fn load(&self, stream: &str) -> anyhow::Result<Option<Checkpoint>> {
        let id = stream_id(&self.sync, stream);
        match &self.backend {
            Backend::Mongo(c) => Ok(c
                .find_one(doc! { "_id": &id })
                .await?
                .map(|d| Checkpoint::from_document(&d))),
            Backend::Redis { conn, prefix } => {
                let bytes: Option<Vec<u8>> = conn.clone().get(format!("{prefix}{id}")).await?;
                match bytes {
                    None => Ok(None),
                    Some(b) => {
                        let d = Document::from_reader(&mut b.as_slice()).map_err(|e| {
                            anyhow::anyhow!("the checkpoint of `{stream}` in Redis is not BSON ({e}); delete key {prefix}{id} to start over")
                        })?;
                        Ok(Some(Checkpoint::from_document(&d)))
                    }
                }
            }
        }
    }

    pub async fn save(&self, stream: &str, cp: &Checkpoint) -> anyhow::Result<()> {
        let d = cp.to_document(&self.sync, stream);
        match &self.backend {
            Backend::Mongo(c) => {
                c.replace_one(doc! { "_id": d.get_str("_id")? }, &d)
                    .with_options(ReplaceOptions::builder().upsert(true).build())
                    .await?;
            }
            Backend::Redis { conn, prefix } => {
                let mut bytes = Vec::new();
                d.to_writer(&mut bytes)?;
                let _: () = conn
                    .clone()
                    .set(format!("{prefix}{}", stream_id(&self.sync, stream)), bytes)
                    .await?;
            }
        }
        Ok(())
    }
}
