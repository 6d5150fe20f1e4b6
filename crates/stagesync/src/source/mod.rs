//! Source stage: what production holds and changes. [`change`] is the pipeline's view of one
//! change; [`stream`] reads change streams into batches; [`scan`] reads current documents for
//! a snapshot.

pub mod change;
pub mod scan;
pub mod stream;
