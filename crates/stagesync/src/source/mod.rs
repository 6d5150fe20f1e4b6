//! Source stage: what production changed. [`change`] is the engine's view of one change,
//! [`stream`] reads change streams into batches; snapshot reads live in [`crate::snapshot`].

pub mod change;
pub mod stream;
