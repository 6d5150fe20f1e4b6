//! stagesync keeps a staging MongoDB in sync with production through change streams.
//!
//! The modules follow the data: [`config`] → [`source`] (change streams, snapshot reads) →
//! [`transform`] (masking) → [`plan`] (business-key matching, merge, coalescing — pure, no I/O)
//! → [`apply`] (bulk writes to staging) → [`checkpoint`] / [`deadletter`] stores → [`metrics`]
//! and [`health`], served by [`telemetry`].
//! [`engine`] wires them per collection, [`snapshot`] copies a collection and hands off to the
//! stream, [`verify`] compares both sides, and [`cli`] is the command line on top.

pub mod apply;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod deadletter;
pub mod engine;
pub mod health;
pub mod metrics;
pub mod plan;
pub mod replay;
pub mod retry;
pub mod snapshot;
pub mod source;
pub mod telemetry;
pub mod transform;
pub mod verify;
