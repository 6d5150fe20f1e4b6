//! `stagesync verify`: compares production (after masking) with staging by business key.

use std::sync::Arc;

use crate::cli::Exit;
use crate::config::Config;

pub async fn command(_config: Arc<Config>, _collections: &[String], _sample: Option<u64>, _json: bool) -> Result<i32, Exit> {
    Err(Exit::usage("verify is not implemented yet"))
}
