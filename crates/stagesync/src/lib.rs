//! stagesync keeps a staging MongoDB in sync with production through change streams.
//!
//! The modules follow the data (docs/ARCHITECTURE.md is the map):
//!
//! - [`config`] — the TOML file, validated once at start-up;
//! - [`source`] (change streams, snapshot scans) → [`transform`] (masking) → [`plan`]
//!   (business-key matching, merge, coalescing — pure, no I/O) → [`apply`] (bulk writes to
//!   staging) → [`checkpoint`] / [`deadletter`]: the stages, wired for one collection by
//!   [`pipeline`];
//! - [`engine`] runs each collection's pipeline (snapshot or stream, history lost), [`snapshot`]
//!   copies a collection and hands off to the stream, [`verify`] and [`replay`] reuse the
//!   pipeline's merge path;
//! - [`preflight`] refuses what must not start (staging that is production, an unusable write
//!   concern, views) before anything is written; [`context`] holds the connections, [`error`] the one error type, [`retry`] the one retry
//!   policy, [`health`], [`metrics`], [`status`] and [`telemetry`] what an operator sees; [`cli`] is the command line on
//!   top (the only module using `anyhow`).

pub mod apply;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod context;
pub mod deadletter;
pub mod engine;
pub mod error;
pub mod filter;
pub mod health;
pub mod lease;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod preflight;
pub mod references;
pub mod replay;
pub mod retry;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod throttle;
pub mod transform;
pub mod verify;
