//! What the commands print on stdout: tables and reports for people (`--json` prints the
//! serialised structs instead).

use mongodb::bson::doc;

use crate::context::Context;
use crate::deadletter::DeadLetter;
use crate::status::CollectionStatus;
use crate::verify::{Drift, Report};

/// Examples per kind of drift in human output (JSON keeps all).
const EXAMPLES: usize = 5;

/// What `check` found.
#[derive(Debug, Default, Clone, Copy)]
pub struct CheckOutcome {
    /// A check failed (exit 1)…
    pub failed: bool,
    /// …or the configuration cannot work against these servers (exit 2): staging is
    /// production, an unusable write concern, a view.
    pub refused: bool,
}

/// `check`: what was verified, line by line. Writes nothing but what the refusals need (an
/// identity marker, deleted right away, only when a database name on the target side is
/// production's; a write-concern probe that deletes nothing).
pub async fn check(ctx: &Context) -> CheckOutcome {
    let config = &ctx.config;
    let mut outcome = CheckOutcome::default();
    let mut reachable = true;
    for (label, client) in [("production", &ctx.prod), ("staging", &ctx.staging)] {
        match client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
        {
            Ok(hello) => {
                let set = hello.get_str("setName").ok();
                let mongos = hello.get_str("msg").ok() == Some("isdbgrid");
                match (label, set, mongos) {
                    ("production", None, false) => {
                        outcome.failed = true;
                        println!("{label}: reachable, but NOT a replica set: change streams need a replica set or sharded cluster");
                    }
                    (_, Some(s), _) => println!("{label}: reachable (replica set `{s}`)"),
                    (_, None, true) => println!("{label}: reachable (sharded cluster)"),
                    _ => println!("{label}: reachable"),
                }
            }
            Err(e) => {
                outcome.failed = true;
                reachable = false;
                println!("{label}: NOT reachable: {}", crate::retry::describe(&e));
            }
        }
    }
    let mut staging_is_production = false;
    if reachable {
        match crate::preflight::target_is_not_source(ctx).await {
            Ok(()) => println!("target: not production's database"),
            Err(e) => {
                if e.is_usage() {
                    outcome.refused = true;
                    staging_is_production = true;
                    println!("target: REFUSED: {e}");
                } else {
                    outcome.failed = true;
                    println!("target: could NOT be compared with production: {e}");
                }
            }
        }
        match crate::preflight::collections_are_syncable(ctx).await {
            Ok(()) => {}
            Err(e) if e.is_usage() => {
                outcome.refused = true;
                println!("collections: REFUSED: {e}");
            }
            Err(e) => {
                outcome.failed = true;
                println!("collections: could NOT be listed: {e}");
            }
        }
        for c in &config.collections {
            let pipeline = ctx.pipeline(c);
            match crate::source::stream::open(
                &pipeline.source,
                &crate::source::stream::StartAt::Now,
                std::time::Duration::from_millis(100),
                1,
                pipeline.rules.filter.as_ref(),
            )
            .await
            {
                Ok(stream) => {
                    drop(stream);
                    println!("production.{}: change stream opens", c.name)
                }
                Err(e) => {
                    outcome.failed = true;
                    println!(
                        "production.{}: change stream FAILED: {}",
                        c.name,
                        crate::retry::describe(&e)
                    );
                }
            }
        }
        // Not even a write that deletes nothing goes to a staging that is production.
        if !staging_is_production {
            let w = crate::apply::describe_write_concern(&config.sync.write_concern);
            match crate::preflight::write_concern_is_usable(ctx).await {
                Ok(()) => println!("write concern {w}: accepted by staging"),
                Err(e) if e.is_usage() => {
                    outcome.refused = true;
                    println!("write concern: REFUSED: {e}");
                }
                Err(e) => {
                    outcome.failed = true;
                    println!("write concern {w}: NOT confirmed: {e}");
                }
            }
        }
    }
    match ctx.checkpoints.ping().await {
        Ok(()) => println!("checkpoint store: reachable"),
        Err(e) => {
            outcome.failed = true;
            println!("checkpoint store: NOT reachable: {e}");
        }
    }
    println!("`run` creates these indexes on staging when missing (check creates nothing; nothing is ever dropped):");
    for c in &config.collections {
        let rules = crate::plan::Rules::new(&config.sync, c);
        let existing = crate::apply::existing_index_keys(&ctx.staging_db, c.target_name()).await;
        let mut unique_index_missing = false;
        for spec in crate::apply::index_specs(&rules) {
            let key = spec.get_document("key").cloned().unwrap_or_default();
            let unique = spec.get_bool("unique").unwrap_or(false);
            let state = match &existing {
                Some(keys) if keys.contains(&key) => "exists",
                Some(_) => {
                    unique_index_missing |= unique;
                    "will be created"
                }
                None => "collection does not exist yet; will be created",
            };
            println!(
                "  {}.{} {}: {}",
                config.target.database,
                c.target_name(),
                spec.get_str("name").unwrap_or(""),
                state
            );
        }
        // Documents already sharing a business key make that index impossible.
        if unique_index_missing && reachable && !staging_is_production {
            let staging = ctx.staging_db.collection(c.target_name());
            match crate::verify::duplicate_keys(&staging, &rules, crate::verify::KeyEquality::Index)
                .await
            {
                Ok(dups) if dups.is_empty() => {}
                Ok(dups) => {
                    outcome.failed = true;
                    let examples: Vec<String> = dups
                        .iter()
                        .take(3)
                        .map(|d| format!("{} ({} documents)", d.business_key, d.documents))
                        .collect();
                    println!(
                        "  staging.{}: FAILED: {} business key(s) are held by more than one document \
                         (e.g. {}), so `run` cannot create the unique index stagesync_business_key. \
                         Find them with `stagesync verify -c {} --collection {}` (\"duplicate business \
                         key\"), merge or remove the duplicates, then check again",
                        c.target_name(),
                        dups.len(),
                        examples.join("; "),
                        config.path.display(),
                        c.name
                    );
                }
                Err(e) => {
                    outcome.failed = true;
                    println!(
                        "  staging.{}: could NOT look for duplicate business keys: {e}",
                        c.target_name()
                    );
                }
            }
        }
    }
    println!(
        "  {}.dead_letters: {{sync, collection, productionId, clusterTime}}",
        config.sync.metadata_database
    );
    outcome
}

pub fn verify(report: &Report) {
    println!(
        "{:<18} {:>10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>10}",
        "collection", "production", "staging", "missing", "differ", "stale", "deleted*", "dup keys"
    );
    for c in &report.collections {
        println!(
            "{:<18} {:>10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>10}",
            c.collection,
            c.production_checked,
            if c.sampled {
                "-".to_string()
            } else {
                c.staging_checked.to_string()
            },
            c.missing.len(),
            c.differing.len(),
            c.stale_not_deleted.len(),
            c.deleted_but_present.len(),
            c.duplicate_keys.len()
        );
    }
    println!("(deleted* = soft-deleted in staging although production still has the document)");
    for c in &report.collections {
        for u in c.unresolved_references.iter().take(EXAMPLES) {
            println!(
                "  {}: reference not in staging (kept as it is, not drift): {} field {} → {} _id {}",
                c.collection,
                u.business_key,
                u.field,
                u.references,
                u.referenced_id.as_deref().unwrap_or("-")
            );
        }
        if c.unresolved_references.len() > EXAMPLES {
            println!(
                "  {}: references not in staging: … and {} more (use --json for all)",
                c.collection,
                c.unresolved_references.len() - EXAMPLES
            );
        }
        let kinds: [(&str, &Vec<Drift>); 5] = [
            ("missing in staging", &c.missing),
            ("production-owned fields differ", &c.differing),
            ("source gone, not deleted", &c.stale_not_deleted),
            ("soft-deleted, source exists", &c.deleted_but_present),
            ("duplicate business key", &c.duplicate_keys),
        ];
        for (label, items) in kinds {
            for d in items.iter().take(EXAMPLES) {
                let mut fields = if d.fields.is_empty() {
                    String::new()
                } else {
                    format!(" fields: {}", d.fields.join(", "))
                };
                if let Some(r) = &d.reason {
                    fields.push_str(&format!(" (cannot be applied: {r})"));
                }
                println!(
                    "  {}: {label}: {}{}{}",
                    c.collection,
                    d.business_key,
                    d.production_id
                        .as_ref()
                        .map(|p| format!(" (production _id {p})"))
                        .unwrap_or_default(),
                    fields
                );
            }
            if items.len() > EXAMPLES {
                println!(
                    "  {}: {label}: … and {} more (use --json for all)",
                    c.collection,
                    items.len() - EXAMPLES
                );
            }
        }
    }
    println!(
        "{}",
        if report.in_sync {
            "in sync"
        } else {
            "DRIFT found"
        }
    );
}

pub fn dead_letters(entries: &[DeadLetter]) {
    if entries.is_empty() {
        println!("no dead letters");
        return;
    }
    println!(
        "{:<24}  {:<14} {:<8} {:<16} {:>3}  business key / production _id",
        "id", "collection", "op", "reason", "n"
    );
    for e in entries {
        println!(
            "{:<24}  {:<14} {:<8} {:<16} {:>3}  {} / {}",
            e.id,
            e.collection,
            e.operation,
            e.error_code,
            e.attempts,
            e.business_key.as_deref().unwrap_or("-"),
            e.production_id
        );
    }
    println!("{} dead letter(s)", entries.len());
}

pub fn dead_letter(e: &DeadLetter) {
    println!("id:            {}", e.id);
    println!("collection:    {}", e.collection);
    println!("operation:     {}", e.operation);
    println!(
        "business key:  {}",
        e.business_key.as_deref().unwrap_or("-")
    );
    println!("production _id:{}", e.production_id);
    println!("error:         {} — {}", e.error_code, e.error_message);
    println!("first seen:    {}", e.first_seen);
    println!("last seen:     {}", e.last_seen);
    println!("attempts:      {}", e.attempts);
    println!(
        "change:        {}",
        serde_json::to_string_pretty(&e.change).unwrap_or_default()
    );
}

pub fn status(rows: &[CollectionStatus]) {
    println!(
        "{:<20} {:<26} {:>10} {:>10} {:>12}  {:<24} {:>5}",
        "collection", "checkpoint time", "lag (s)", "ckpt age", "dead letters", "owner", "epoch"
    );
    let secs = |v: Option<f64>| v.map(|l| format!("{l:.1}")).unwrap_or_else(|| "-".into());
    for r in rows {
        println!(
            "{:<20} {:<26} {:>10} {:>10} {:>12}  {:<24} {:>5}{}",
            r.collection,
            r.checkpoint_time.as_deref().unwrap_or("none yet"),
            secs(r.lag_seconds),
            secs(r.checkpoint_age_seconds),
            r.dead_letters,
            r.owner.as_deref().unwrap_or("-"),
            r.epoch.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            if r.snapshot_in_progress {
                "  (snapshot in progress)"
            } else {
                ""
            }
        );
    }
}
