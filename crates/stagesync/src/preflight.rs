//! Refusals before anything is written: what `run`, `snapshot` and `dlq replay` check right
//! after the servers answer, and what `check` reports.
//!
//! - **Staging is production** ([`target_is_not_source`]): the target reaches the same server
//!   as the source — asked of the servers, never decided by comparing URI strings — and
//!   `target.database` or `sync.metadata_database` is production's database. Refused with
//!   [`SyncError::TargetIsSource`] (exit 2) before any write reaches production's database.
//! - **A write concern staging cannot satisfy** ([`write_concern_is_usable`]): an unknown tag
//!   or more nodes than staging has. Probed with a delete that matches nothing (a write that
//!   creates nothing) in the metadata database; refused naming `sync.write_concern` (exit 2).
//! - **Collections that cannot be synced** ([`collections_are_syncable`]): a view or a
//!   time-series collection in production. Refused naming the entry (exit 2).

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::Client;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::error::{MongoContext, Result, SyncError};
use crate::retry::{command_code, retry, Gave, RetryPolicy, WRITE_CONCERN_UNSATISFIABLE};

/// Where the identity marker goes when the metadata database is a safe place for it.
const MARKER_COLLECTION: &str = "instance";
/// …and its name in the target database (only when the metadata database is named like
/// production's): a name no application collection is likely to have.
const MARKER_COLLECTION_IN_TARGET: &str = "stagesync_instance";
/// `_id` of the write-concern probe; never written (the probe deletes it, matching nothing).
const WRITE_CONCERN_PROBE_ID: &str = "stagesync/write-concern-probe";
/// Unauthorized: the production user may not read stagesync's metadata database.
const UNAUTHORIZED: i32 = 13;

/// Every refusal, in order, retrying transient failures (servers still coming up) for at most
/// `deadline`. `Ok(false)` when stopped meanwhile.
pub async fn check_all(
    ctx: &Context,
    deadline: Duration,
    shutdown: &CancellationToken,
) -> Result<bool> {
    let attempt = || async {
        target_is_not_source(ctx).await?;
        collections_are_syncable(ctx).await?;
        write_concern_is_usable(ctx).await
    };
    let said = |e: &SyncError, b: &crate::retry::Backoff| {
        if b.attempts() == 0 {
            tracing::warn!(error = %e, "cannot check the configuration against the servers yet; retrying");
        }
    };
    match retry(
        &RetryPolicy::until(deadline),
        shutdown,
        attempt,
        SyncError::is_transient,
        said,
    )
    .await
    {
        Ok(_) => Ok(true),
        Err(Gave::Stopped) => Ok(false),
        Err(Gave::Up(e)) => Err(e),
    }
}

/// Refuses a target that is the source: the same server and the same database, or a metadata
/// database that is production's database on the same server.
///
/// Only a configuration that names production's database on the target side can write into
/// it, so other configurations are accepted without contacting anything. For the others the
/// servers are asked, whatever the URIs say: a marker with a random nonce is written through
/// the *target* connection — into a database that is not production's (the metadata database,
/// or the target database when the metadata database is named like production's) — and
/// looked for through the *source* connection; found means the same server or cluster. The
/// marker is deleted right away. When the production user may not read that database, the
/// servers' `hello` process ids decide.
pub async fn target_is_not_source(ctx: &Context) -> Result<()> {
    let config = &ctx.config;
    let source_db = &config.source.database;
    let target_db_is_source = config.target.database == *source_db;
    let meta_is_source = config.sync.metadata_database == *source_db;
    if !target_db_is_source && !meta_is_source {
        return Ok(());
    }
    let Some(how) = same_server(ctx).await? else {
        return Ok(());
    };
    Err(SyncError::TargetIsSource(if target_db_is_source {
        format!(
            "staging is production: `target.uri` reaches the same server as `source.uri` ({how}) and \
             `target.database` is production's database \"{source_db}\"; stagesync would write into \
             production, so it refuses to start (nothing was written to production). Point `[target]` \
             at the staging server, or at another database"
        )
    } else {
        format!(
            "staging is production: `target.uri` reaches the same server as `source.uri` ({how}) and \
             `sync.metadata_database` is production's database \"{source_db}\"; stagesync would keep its \
             checkpoints and dead letters in production, so it refuses to start (nothing was written \
             to production). Choose another `sync.metadata_database`"
        )
    }))
}

async fn hello(client: &Client, side: &str) -> Result<Document> {
    client
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
        .with_context(|| format!("asking {side} who it is (`hello`)"))
}

fn process_id(hello: &Document) -> Option<mongodb::bson::oid::ObjectId> {
    hello
        .get_document("topologyVersion")
        .ok()?
        .get_object_id("processId")
        .ok()
}

/// How the servers showed they are one, or `None` when they are not.
async fn same_server(ctx: &Context) -> Result<Option<&'static str>> {
    let prod_hello = hello(&ctx.prod, "production").await?;
    let staging_hello = hello(&ctx.staging, "staging").await?;
    let config = &ctx.config;
    // Never production's database: the metadata database unless it is named like it, else the
    // target database (which then differs from it: the two may not be equal).
    let (db, collection) = if config.sync.metadata_database != config.source.database {
        (config.sync.metadata_database.as_str(), MARKER_COLLECTION)
    } else {
        (config.target.database.as_str(), MARKER_COLLECTION_IN_TARGET)
    };
    let id = format!("{}/{:032x}", config.sync.name, rand::random::<u128>());
    let staging = ctx.staging.database(db).collection::<Document>(collection);
    staging
        .insert_one(doc! {
            "_id": &id,
            "sync": &config.sync.name,
            "purpose": "stagesync start-up: is the target the source? (deleted right away)",
            "at": DateTime::now(),
        })
        .await
        .with_context(|| format!("writing an identity marker to staging ({db}.{collection})"))?;
    let found = look_for_marker(ctx, db, collection, &id, &prod_hello).await;
    // The marker served its purpose either way.
    if let Err(e) = staging.delete_one(doc! { "_id": &id }).await {
        tracing::warn!(error = %crate::retry::describe(&e), "could not delete the identity marker {id} from {db}.{collection}");
    }
    match found {
        Ok(true) => Ok(Some(
            "a marker stagesync wrote through `target.uri` was read back through `source.uri`",
        )),
        Ok(false) => Ok(None),
        Err(e) if command_code(&e) == Some(UNAUTHORIZED) => {
            // A least-privilege production user may not read stagesync's database (on either
            // server): fall back on the process ids the servers report (MongoDB 4.4+), which
            // are equal for one server process.
            let same = matches!(
                (process_id(&prod_hello), process_id(&staging_hello)),
                (Some(a), Some(b)) if a == b
            );
            tracing::info!(
                "the production user may not read `{db}`; the identity check relied on the servers' process ids"
            );
            Ok(same.then_some("both servers report the same process id"))
        }
        Err(e) => Err(SyncError::mongo(
            format!("reading the identity marker back through production ({db}.{collection})"),
            e,
        )),
    }
}

/// Reads the marker through production. A production connection that reads from a secondary
/// may see it a moment late, so that case is given a second.
async fn look_for_marker(
    ctx: &Context,
    db: &str,
    collection: &str,
    id: &str,
    prod_hello: &Document,
) -> mongodb::error::Result<bool> {
    let reads_a_primary = prod_hello.get_bool("isWritablePrimary").unwrap_or(false)
        || prod_hello.get_str("msg").ok() == Some("isdbgrid");
    let patience = if reads_a_primary {
        Duration::ZERO
    } else {
        Duration::from_secs(1)
    };
    let coll = ctx.prod.database(db).collection::<Document>(collection);
    // Polled with the one retry policy: every 100 ms until found or `patience` has passed.
    let policy = crate::retry::RetryPolicy {
        initial: Duration::from_millis(100),
        max_delay: Duration::from_millis(100),
        jitter: false,
        give_up_after: Some(patience),
    };
    let look = || async {
        match coll.find_one(doc! { "_id": id }).await {
            Ok(Some(_)) => Ok(true),
            Ok(None) => Err(None),
            Err(e) => Err(Some(e)),
        }
    };
    let never = tokio_util::sync::CancellationToken::new();
    match crate::retry::retry(&policy, &never, look, |e| e.is_none(), |_, _| {}).await {
        Ok((found, _)) => Ok(found),
        Err(crate::retry::Gave::Up(Some(e))) => Err(e),
        Err(_) => Ok(false),
    }
}

/// Asks staging to acknowledge a harmless write — a delete matching nothing in the metadata
/// database — with the configured write concern. Unknown tags and unsatisfiable node counts
/// come back as [`SyncError::InvalidSetting`] naming `sync.write_concern`; a write concern that
/// merely timed out is transient.
pub async fn write_concern_is_usable(ctx: &Context) -> Result<()> {
    let config = &ctx.config;
    let command = doc! {
        "delete": MARKER_COLLECTION,
        "deletes": [{ "q": { "_id": WRITE_CONCERN_PROBE_ID }, "limit": 1 }],
        "writeConcern": crate::apply::write_concern_doc(&config.sync.write_concern),
    };
    let reply = match ctx.meta_db.run_command(command).await {
        Ok(reply) => reply,
        Err(e) => {
            if command_code(&e).is_some_and(|c| WRITE_CONCERN_UNSATISFIABLE.contains(&c)) {
                return Err(crate::apply::write_concern_refused(
                    &config.sync.write_concern,
                    &crate::retry::describe(&e),
                ));
            }
            return Err(SyncError::mongo(
                "checking `sync.write_concern` on staging",
                e,
            ));
        }
    };
    if let Ok(wce) = reply.get_document("writeConcernError") {
        let message = wce.get_str("errmsg").unwrap_or("").to_string();
        let code = wce.get_i32("code").unwrap_or(0);
        if WRITE_CONCERN_UNSATISFIABLE.contains(&code) {
            let name = wce.get_str("codeName").unwrap_or("");
            return Err(crate::apply::write_concern_refused(
                &config.sync.write_concern,
                &format!("{message} ({name}, code {code})"),
            ));
        }
        return Err(SyncError::WriteConcern(message));
    }
    Ok(())
}

/// Refuses configured collections that production has as a view or a time-series collection.
pub async fn collections_are_syncable(ctx: &Context) -> Result<()> {
    let config = &ctx.config;
    let names: Vec<Bson> = config
        .collections
        .iter()
        .map(|c| Bson::String(c.name.clone()))
        .collect();
    let what = "listing production's collections";
    let specs: Vec<Document> = ctx
        .prod_db
        .run_cursor_command(doc! { "listCollections": 1, "filter": { "name": { "$in": names } } })
        .await
        .context(what)?
        .try_collect()
        .await
        .context(what)?;
    for spec in specs {
        let name = spec.get_str("name").unwrap_or_default();
        let Some(index) = config.collections.iter().position(|c| c.name == name) else {
            continue;
        };
        let detail = match spec.get_str("type").unwrap_or("collection") {
            "view" => {
                let of = spec
                    .get_document("options")
                    .ok()
                    .and_then(|o| o.get_str("viewOn").ok())
                    .map(|v| format!(" of \"{v}\""))
                    .unwrap_or_default();
                format!(
                    "production's \"{name}\" is a view{of}, not a collection: a view has no change \
                     stream and no documents of its own, so it cannot be synced. Sync the collection \
                     it reads from instead, and remove this entry"
                )
            }
            "timeseries" => format!(
                "production's \"{name}\" is a time-series collection: stagesync syncs regular \
                 collections only (a time-series collection's documents cannot be matched and \
                 merged one by one). Remove this entry"
            ),
            _ => continue,
        };
        return Err(SyncError::InvalidSetting {
            key: format!("collections[{index}].name"),
            detail,
        });
    }
    Ok(())
}
