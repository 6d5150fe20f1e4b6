//! The library's one error type, and the classification that decides what happens next.
//!
//! Every failure is one of four [`ErrorKind`]s, and the kind alone decides the policy:
//! a *transient* failure is retried with the one [`RetryPolicy`](crate::retry::RetryPolicy);
//! a *poison* change goes to the dead-letter queue and the stream moves on; *history lost*
//! follows `on_history_lost`; a *fatal* error stops `run` (exit code 3 at the binary's edge).

use std::time::Duration;

use crate::config::ConfigError;

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Try again later: the same request may well succeed (network, elections, timeouts).
    Transient,
    /// A retry cannot fix this change (bad document, key collision, validation): dead-letter it.
    Poison,
    /// Production no longer has the change history to resume from (or refused the token).
    HistoryLost,
    /// Another process owns this collection now (its lease moved on): drop the collection,
    /// keep the others.
    LeaseLost,
    /// Nothing sensible can go on: stop and tell the operator.
    Fatal,
}

/// Everything the library can fail with. Messages say what failed and, where there is one,
/// what to do about it; they never contain documents or masked values.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A MongoDB operation failed; `what` says which one ("reading the checkpoint of `orders`").
    /// Shown with a short description of the driver error (code, name and the server's message),
    /// never the driver's dump of the whole server reply.
    #[error("{what}: {}", crate::retry::describe(error))]
    Mongo {
        what: String,
        error: mongodb::error::Error,
    },

    /// A Redis operation of the checkpoint store failed.
    #[cfg(feature = "redis")]
    #[error("{what}: {source}")]
    Redis {
        what: String,
        #[source]
        source: redis::RedisError,
    },

    /// Staging applied the writes but could not make them as durable as `write_concern` asks.
    #[error("staging did not satisfy the write concern: {0}")]
    WriteConcern(String),

    /// The recovery hint comes first; the server's reason follows, cut to a short excerpt.
    #[error(
        "production no longer has the change history to resume `{collection}` from its checkpoint. \
         To recover: run `stagesync snapshot -c FILE --collection {collection}` (re-copies it and resets the \
         checkpoint), then `stagesync run` again; or set `[sync] on_history_lost = \"resync\"` to do this \
         automatically. (Production said: {})", crate::retry::excerpt(detail, crate::retry::DETAIL_CHARS)
    )]
    HistoryLost { collection: String, detail: String },

    /// Staging is production: the same server (as the servers themselves show) and the same
    /// database, or a metadata database that is production's. Nothing was written.
    #[error("{0}")]
    TargetIsSource(String),

    /// A setting's value is unusable although the file parsed (e.g. a malformed URI).
    #[error("`{key}`: {detail}")]
    InvalidSetting { key: String, detail: String },

    /// This process no longer holds the collection's lease (it expired while the process was
    /// paused, or another process took it): its checkpoint save was refused.
    #[error("`{collection}` is owned by another process now ({detail}); this process drops it")]
    LeaseLost { collection: String, detail: String },

    /// A server or store stayed unreachable past its deadline.
    #[error("{what} stayed unreachable for {waited:?} (`sync.startup_timeout`): {last_error}")]
    Unreachable {
        what: String,
        waited: Duration,
        last_error: String,
    },

    /// A stored value stagesync cannot use (a corrupt checkpoint, a malformed dead letter).
    #[error("{what}: {detail}")]
    Corrupt { what: String, detail: String },

    /// A staging collection already breaks a rule stagesync must enforce.
    #[error("{0}")]
    Staging(String),

    /// Production cannot be synced as configured (not a replica set, a view, …).
    #[error("{0}")]
    Production(String),

    /// A collection's task crashed (a bug): the message of the panic.
    #[error("a collection task crashed: {0}")]
    TaskFailed(String),
}

impl SyncError {
    /// Wraps a MongoDB error with what was being done.
    pub fn mongo(what: impl Into<String>, source: mongodb::error::Error) -> SyncError {
        SyncError::Mongo {
            what: what.into(),
            error: source,
        }
    }

    /// What to do about this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SyncError::Mongo { error, .. } => crate::retry::classify(error),
            #[cfg(feature = "redis")]
            SyncError::Redis { source, .. } => {
                if source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || source.is_timeout()
                {
                    ErrorKind::Transient
                } else {
                    ErrorKind::Fatal
                }
            }
            SyncError::WriteConcern(_) => ErrorKind::Transient,
            SyncError::HistoryLost { .. } => ErrorKind::HistoryLost,
            SyncError::LeaseLost { .. } => ErrorKind::LeaseLost,
            SyncError::Config(_)
            | SyncError::InvalidSetting { .. }
            | SyncError::TargetIsSource(_)
            | SyncError::Unreachable { .. }
            | SyncError::Corrupt { .. }
            | SyncError::Staging(_)
            | SyncError::Production(_)
            | SyncError::TaskFailed(_) => ErrorKind::Fatal,
        }
    }

    /// True for errors in the user's input (config file, settings): exit code 2.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            SyncError::Config(_) | SyncError::InvalidSetting { .. } | SyncError::TargetIsSource(_)
        )
    }

    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }
}

/// `.context("what was being done")` for driver results.
pub trait MongoContext<T> {
    fn context(self, what: impl Into<String>) -> Result<T, SyncError>;
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, SyncError>;
}

impl<T> MongoContext<T> for mongodb::error::Result<T> {
    fn context(self, what: impl Into<String>) -> Result<T, SyncError> {
        self.map_err(|e| SyncError::mongo(what, e))
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, SyncError> {
        self.map_err(|e| SyncError::mongo(what(), e))
    }
}

pub type Result<T, E = SyncError> = std::result::Result<T, E>;
