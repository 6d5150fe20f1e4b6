//! Hostile inputs, operational side: nothing stalls, nothing leaks, production is never
//! written — against real servers and the real binary.
//!
//! - a target that is the source (same URI, another URI reaching the same server, a metadata
//!   database that is production's) is refused by every command that writes, and production
//!   receives no write;
//! - a change too large for staging is dead-lettered as a small entry and the stream moves on
//!   (inserts, updates that make a staging document too large, batches mixing both);
//! - the checkpoint keeps its cluster time across clean stops and restarts;
//! - the Redis and MongoDB checkpoint stores reconnect after their server restarts.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    all_docs, eventually, http, scrape, stagesync, text, Pair, RedisServer, RunProcess, ORDERS,
};
use futures::StreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::Database;
use stagesync::config::Config;

/// Polls `/readyz` until its status is `want` and its body satisfies `body_ok`; returns it.
async fn readyz_becomes(
    port: u16,
    want: u16,
    within: Duration,
    body_ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let got = tokio::task::spawn_blocking(move || http(port, "GET", "/readyz"))
            .await
            .unwrap();
        if let Some((status, body)) = &got {
            if *status == want && body_ok(body) {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not answer {want} within {within:?}; last answer: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts `/readyz` answers 503 naming `reason` at every poll for `period` (an outage that
/// lasts: long enough for any reconnect attempts of the store's driver to give up).
async fn readyz_stays_unready(port: u16, reason: &str, period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        let got = tokio::task::spawn_blocking(move || http(port, "GET", "/readyz"))
            .await
            .unwrap();
        assert!(
            matches!(&got, Some((503, body)) if body.contains(reason)),
            "/readyz during the outage: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The sum of every `stagesync_changes_dead_lettered_total{…}` sample.
fn dead_lettered_total(page: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with("stagesync_changes_dead_lettered_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metrics_port() -> (u16, String) {
    let port = stagesync_testkit::free_port().unwrap();
    (port, format!("127.0.0.1:{port}"))
}

/// A config file with the given target URI and databases (the rest as `Pair::config_text`).
fn config_file(
    pair: &Pair,
    target_uri: &str,
    target_db: &str,
    meta_db: &str,
    name: &str,
) -> PathBuf {
    let text = format!(
        "[source]\nuri = \"{}\"\ndatabase = \"{}\"\n[target]\nuri = \"{target_uri}\"\ndatabase = \"{target_db}\"\n\
         [sync]\nname = \"test\"\nmetadata_database = \"{meta_db}\"\nwrite_concern = 1\ncheckpoint_interval = \"200ms\"\n\
         startup_timeout = \"20s\"\n{ORDERS}\n",
        pair.prod_uri,
        pair.prod_db_name(),
    );
    let path = pair.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// 1. A target that is the source

/// Every collection of a database with its documents, by collection name.
async fn database_state(db: &Database) -> Vec<(String, Vec<Document>)> {
    let mut names = db.list_collection_names().await.unwrap();
    names.sort();
    let mut state = Vec::new();
    for n in names {
        let docs = all_docs(&db.collection::<Document>(&n)).await;
        state.push((n, docs));
    }
    state
}

/// Runs every command that writes with `path` and checks each refuses with exit 2 and the
/// message (`expect`), then that production received no write: its database is as before, a
/// change stream on it saw nothing, no database on its server holds stagesync's checkpoints
/// or dead letters, and no document there carries `_sync`.
async fn refused_and_production_untouched(pair: &Pair, path: &std::path::Path, expect: &[&str]) {
    let prod_client = common::client(&pair.prod_uri).await;
    let prod = prod_client.database(&pair.prod_db_name());
    let before = database_state(&prod).await;
    let mut events = prod.watch().await.unwrap();

    let check = stagesync(&["check"], path);
    let out = String::from_utf8_lossy(&check.stdout).to_string();
    assert_eq!(check.status.code(), Some(2), "check: {}", text(&check));
    assert!(
        out.contains("target: REFUSED: staging is production"),
        "{out}"
    );
    assert!(out.contains("check FAILED"), "{out}");
    for e in expect {
        assert!(out.contains(e), "check names {e:?}: {out}");
    }
    let mut run = RunProcess::start(path, pair.dir.path(), &[]);
    let status = run
        .wait(Duration::from_secs(60))
        .expect("run refuses promptly");
    assert_eq!(status.code(), Some(2), "run: {}", run.log_text());
    for e in expect {
        assert!(
            run.log_text().contains(e),
            "run says {e:?}: {}",
            run.log_text()
        );
    }
    for args in [
        &["snapshot"][..],
        &["dlq", "replay", "--all"][..],
        &["dlq", "purge", "--all"][..],
    ] {
        let out = stagesync(args, path);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("staging is production"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    // Production's database is exactly as it was…
    assert_eq!(
        database_state(&prod).await,
        before,
        "production's data changed"
    );
    // …its change stream saw no write before the test's own sentinel…
    prod.collection::<Document>("sentinel")
        .insert_one(doc! { "sentinel": true })
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("the sentinel arrives")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.ns.and_then(|n| n.coll).as_deref(),
        Some("sentinel"),
        "a write reached production before the sentinel: {:?}",
        first.full_document
    );
    drop(events);
    // …and nothing of stagesync's is anywhere on its server.
    for db_name in prod_client.list_database_names().await.unwrap() {
        if ["admin", "local", "config"].contains(&db_name.as_str()) {
            continue;
        }
        let db = prod_client.database(&db_name);
        for (coll, docs) in database_state(&db).await {
            assert!(
                coll != "checkpoints" && coll != "dead_letters",
                "{db_name}.{coll} was created on the production server"
            );
            assert!(
                docs.iter().all(|d| !d.contains_key("_sync")),
                "{db_name}.{coll} holds documents with _sync"
            );
            if coll == "instance" || coll == "stagesync_instance" {
                assert!(
                    docs.is_empty(),
                    "the identity marker was left behind: {docs:?}"
                );
            }
        }
    }
}

async fn seed_production(pair: &Pair) {
    let prod = pair.prod().await.collection::<Document>("orders");
    for i in 0..3 {
        prod.insert_one(doc! { "userEmail": format!("p{i}@x.org"), "accountId": i, "total": i })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_target_with_the_same_uri_and_database_is_refused() {
    let pair = Pair::start_local(&[]);
    seed_production(&pair).await;
    let path = config_file(
        &pair,
        &pair.prod_uri,
        &pair.prod_db_name(),
        &pair.meta_db_name(),
        "same-uri.toml",
    );
    refused_and_production_untouched(
        &pair,
        &path,
        &[
            "`target.uri` reaches the same server as `source.uri`",
            &format!(
                "`target.database` is production's database \"{}\"",
                pair.prod_db_name()
            ),
            "Point `[target]` at the staging server",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_target_uri_spelled_differently_but_reaching_the_same_server_is_refused() {
    let pair = Pair::start_local(&[]);
    seed_production(&pair).await;
    let port = pair.prod_server.as_ref().unwrap().port;
    // Another host name, other options: no string comparison can tell.
    let other = format!("mongodb://localhost:{port}/?directConnection=true&appName=qa-staging&connectTimeoutMS=4000");
    assert_ne!(other, pair.prod_uri);
    let path = config_file(
        &pair,
        &other,
        &pair.prod_db_name(),
        &pair.meta_db_name(),
        "other-uri.toml",
    );
    refused_and_production_untouched(
        &pair,
        &path,
        &["a marker stagesync wrote through `target.uri` was read back through `source.uri`"],
    )
    .await;
}

#[tokio::test]
async fn a_metadata_database_that_is_production_s_is_refused() {
    let pair = Pair::start_local(&[]);
    seed_production(&pair).await;
    let port = pair.prod_server.as_ref().unwrap().port;
    let other = format!("mongodb://localhost:{port}/?directConnection=true");
    let path = config_file(
        &pair,
        &other,
        &format!("staging_on_prod_{}", pair.tag),
        &pair.prod_db_name(),
        "meta-is-prod.toml",
    );
    refused_and_production_untouched(
        &pair,
        &path,
        &[
            &format!(
                "`sync.metadata_database` is production's database \"{}\"",
                pair.prod_db_name()
            ),
            "Choose another `sync.metadata_database`",
        ],
    )
    .await;
}

#[tokio::test]
async fn the_same_database_name_on_another_server_is_accepted() {
    let pair = Pair::start_local(&[]);
    seed_production(&pair).await;
    // Staging's database named like production's, on the staging server: a normal setup.
    let path = config_file(
        &pair,
        &pair.staging_uri,
        &pair.prod_db_name(),
        &pair.meta_db_name(),
        "same-name.toml",
    );
    let check = stagesync(&["check"], &path);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    assert!(String::from_utf8_lossy(&check.stdout).contains("target: not production's database"));
    let snapshot = stagesync(&["snapshot"], &path);
    assert_eq!(snapshot.status.code(), Some(0), "{}", text(&snapshot));
    let staging = common::client(&pair.staging_uri)
        .await
        .database(&pair.prod_db_name())
        .collection::<Document>("orders");
    assert_eq!(all_docs(&staging).await.len(), 3);
    // The marker was removed from the staging metadata database.
    let markers = all_docs(&pair.meta().await.collection::<Document>("instance")).await;
    assert!(markers.is_empty(), "{markers:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Changes too large for staging

const MAX_BSON: usize = 16 * 1024 * 1024;

/// A production document of exactly `bytes` bytes (BSON), with its own `_id`.
fn sized_doc(email: &str, account: i32, bytes: usize) -> Document {
    let mut d =
        doc! { "_id": ObjectId::new(), "userEmail": email, "accountId": account, "pad": "" };
    let base = mongodb::bson::to_vec(&d).unwrap().len();
    d.insert("pad", "x".repeat(bytes - base));
    assert_eq!(mongodb::bson::to_vec(&d).unwrap().len(), bytes);
    d
}

async fn dead_letters(pair: &Pair) -> Vec<Document> {
    all_docs(&pair.meta().await.collection::<Document>("dead_letters")).await
}

/// Waits until the queue holds `n` entries (a batch's dead letters are stored right after its
/// writes, so they may trail the changes applied with them); returns them.
async fn dead_letters_become(pair: &Pair, n: usize) -> Vec<Document> {
    eventually(
        &format!("{n} dead letter(s)"),
        Duration::from_secs(20),
        || async { dead_letters(pair).await.len() >= n },
    )
    .await;
    dead_letters(pair).await
}

fn bson_len(d: &Document) -> usize {
    mongodb::bson::to_vec(d).unwrap().len()
}

async fn checkpoint(config: &Arc<Config>) -> stagesync::checkpoint::Checkpoint {
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    let cp = ctx.checkpoints.load("orders").await.unwrap();
    ctx.shutdown().await;
    cp.expect("a checkpoint")
}

async fn count_synced(pair: &Pair, filter: Document) -> u64 {
    pair.staging()
        .await
        .collection::<Document>("orders")
        .count_documents(filter)
        .await
        .unwrap()
}

/// Inserts `n` normal documents `{tag}{i}@x.org` and waits until staging has them all;
/// returns how long that took.
async fn normal_changes_arrive(pair: &Pair, tag: &str, n: i32) -> Duration {
    let prod = pair.prod().await.collection::<Document>("orders");
    let started = Instant::now();
    for i in 0..n {
        prod.insert_one(
            doc! { "userEmail": format!("{tag}{i}@x.org"), "accountId": i, "total": i },
        )
        .await
        .unwrap();
    }
    let filter = doc! { "userEmail": { "$regex": format!("^{tag}") } };
    eventually(
        &format!("the {n} `{tag}` changes to reach staging"),
        Duration::from_secs(30),
        || {
            let filter = filter.clone();
            async move { count_synced(pair, filter).await == n as u64 }
        },
    )
    .await;
    started.elapsed()
}

#[tokio::test]
async fn an_oversized_document_is_dead_lettered_small_and_the_stream_moves_on() {
    let pair = Pair::start();
    let (path, config) = pair.config("", ORDERS);
    let (port, addr) = metrics_port();
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--metrics-addr", &addr]);
    readyz_becomes(port, 200, Duration::from_secs(60), |_| true).await;

    let prod = pair.prod().await.collection::<Document>("orders");
    let big = sized_doc("big@x.org", 1, MAX_BSON - 50);
    prod.insert_one(big.clone()).await.unwrap();
    let took = normal_changes_arrive(&pair, "after", 5).await;
    assert!(
        took < Duration::from_secs(15),
        "later changes took {took:?}"
    );

    // Exactly one dead letter, small, naming the reason; the metric counts what is stored.
    let letters = dead_letters_become(&pair, 1).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0];
    assert_eq!(
        letter.get_document("error").unwrap().get_str("code"),
        Ok("document_too_large")
    );
    assert_eq!(letter.get("productionId"), big.get("_id"));
    assert_eq!(letter.get_str("operation"), Ok("insert"));
    assert!(bson_len(letter) < 16 * 1024, "{} bytes", bson_len(letter));
    let excerpt = letter
        .get_document("change")
        .unwrap()
        .get_document("excerpt")
        .unwrap();
    assert_eq!(excerpt.get_i64("documentBytes"), Ok((MAX_BSON - 50) as i64));
    eventually(
        "the metric to count the stored entry",
        Duration::from_secs(10),
        || async { dead_lettered_total(&scrape(port).await) == 1.0 },
    )
    .await;
    assert_eq!(
        count_synced(&pair, doc! { "userEmail": "big@x.org" }).await,
        0
    );
    let page = scrape(port).await;
    assert!(
        page.contains(r#"reason="document_too_large""#),
        "{}",
        page.lines()
            .filter(|l| l.contains("dead_lettered"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A clean stop keeps the position, cluster time included, past the oversized change.
    assert!(run.terminate(Duration::from_secs(10)).unwrap().success());
    let first = checkpoint(&config).await;
    let dead_at = letter.get_timestamp("clusterTime").unwrap();
    assert!(first.token.is_some());
    assert!(
        first.cluster_time.is_some_and(|t| t > dead_at),
        "checkpoint {first:?} is not past the dead letter at {dead_at:?}"
    );

    // A restart keeps going, the oversized change is not replayed, and an idle stop keeps the
    // cluster time too.
    let (port, addr) = metrics_port();
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--metrics-addr", &addr]);
    readyz_becomes(port, 200, Duration::from_secs(60), |_| true).await;
    let took = normal_changes_arrive(&pair, "restarted", 3).await;
    assert!(
        took < Duration::from_secs(15),
        "later changes took {took:?}"
    );
    assert_eq!(dead_letters(&pair).await.len(), 1);
    assert_eq!(dead_lettered_total(&scrape(port).await), 0.0);
    assert!(run.terminate(Duration::from_secs(10)).unwrap().success());
    let second = checkpoint(&config).await;
    assert!(second.cluster_time >= first.cluster_time, "{second:?}");

    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    eventually(
        "the idle run to save a checkpoint",
        Duration::from_secs(30),
        || async { checkpoint(&config).await.saved_at > second.saved_at },
    )
    .await;
    assert!(run.terminate(Duration::from_secs(10)).unwrap().success());
    let idle = checkpoint(&config).await;
    assert!(
        idle.cluster_time.is_some() && idle.cluster_time >= second.cluster_time,
        "an idle run lost the cluster time: {idle:?}"
    );
}

#[tokio::test]
async fn an_update_that_makes_a_staging_document_too_large_is_dead_lettered() {
    let pair = Pair::start();
    let (path, _) = pair.config("", ORDERS);
    let (port, addr) = metrics_port();
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--metrics-addr", &addr]);
    readyz_becomes(port, 200, Duration::from_secs(60), |_| true).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let id = prod
        .insert_one(doc! { "userEmail": "grow@x.org", "accountId": 1, "total": 1 })
        .await
        .unwrap()
        .inserted_id;
    eventually("the document to sync", Duration::from_secs(30), || async {
        count_synced(&pair, doc! { "userEmail": "grow@x.org" }).await == 1
    })
    .await;
    // Staging owns 9 MiB of notes; production adds 8 MiB: together over 16 MiB.
    let notes = "n".repeat(9 * 1024 * 1024);
    staging
        .update_one(
            doc! { "userEmail": "grow@x.org" },
            doc! { "$set": { "notes": &notes } },
        )
        .await
        .unwrap();
    prod.update_one(
        doc! { "_id": &id },
        doc! { "$set": { "payload": "p".repeat(8 * 1024 * 1024), "total": 2 } },
    )
    .await
    .unwrap();
    let took = normal_changes_arrive(&pair, "next", 5).await;
    assert!(
        took < Duration::from_secs(15),
        "later changes took {took:?}"
    );

    let letters = dead_letters_become(&pair, 1).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0];
    assert_eq!(
        letter.get_document("error").unwrap().get_str("code"),
        Ok("document_too_large"),
        "{letter}"
    );
    assert_eq!(letter.get_str("operation"), Ok("update"));
    assert_eq!(letter.get("productionId"), Some(&id));
    assert!(bson_len(letter) < 16 * 1024, "{} bytes", bson_len(letter));
    eventually(
        "the metric to count the stored entry",
        Duration::from_secs(10),
        || async { dead_lettered_total(&scrape(port).await) == 1.0 },
    )
    .await;
    // Staging's document is as it was: its notes kept, production's update not half-applied.
    let kept = staging
        .find_one(doc! { "userEmail": "grow@x.org" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.get_str("notes").map(str::len), Ok(notes.len()));
    assert!(!kept.contains_key("payload"));
    assert_eq!(kept.get_i32("total"), Ok(1));
    assert!(run.terminate(Duration::from_secs(10)).unwrap().success());
}

#[tokio::test]
async fn a_batch_mixing_oversized_and_normal_changes_applies_the_normal_ones() {
    let pair = Pair::start();
    // A long batch window, so the burst below is applied as one batch.
    let (path, _) = pair.config("batch_max_wait_ms = 3000", ORDERS);
    let (port, addr) = metrics_port();
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--metrics-addr", &addr]);
    readyz_becomes(port, 200, Duration::from_secs(60), |_| true).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let mut big_ids = Vec::new();
    for i in 0..3 {
        prod.insert_one(doc! { "userEmail": format!("mixed{i}@x.org"), "accountId": i })
            .await
            .unwrap();
        let big = sized_doc(&format!("huge{i}@x.org"), i, MAX_BSON - 50 - i as usize);
        big_ids.push(big.get("_id").unwrap().clone());
        prod.insert_one(big).await.unwrap();
    }
    let grown = prod
        .insert_one(doc! { "userEmail": "mixed-grow@x.org", "accountId": 9 })
        .await
        .unwrap()
        .inserted_id;
    // Replaced by a document that fits production but not staging once `_sync` is added.
    let mut grown_doc = sized_doc("mixed-grow@x.org", 9, MAX_BSON - 50);
    grown_doc.insert("_id", grown.clone());
    prod.replace_one(doc! { "_id": &grown }, grown_doc)
        .await
        .unwrap();
    let took = normal_changes_arrive(&pair, "mixed-after", 3).await;
    assert!(
        took < Duration::from_secs(20),
        "later changes took {took:?}"
    );
    assert_eq!(
        count_synced(&pair, doc! { "userEmail": { "$regex": "^mixed[0-9]@" } }).await,
        3
    );
    assert_eq!(
        count_synced(&pair, doc! { "userEmail": { "$regex": "^huge" } }).await,
        0
    );

    let letters = dead_letters_become(&pair, 4).await;
    let mut ids: Vec<Bson> = letters
        .iter()
        .map(|l| l.get("productionId").unwrap().clone())
        .collect();
    for l in &letters {
        assert_eq!(
            l.get_document("error").unwrap().get_str("code"),
            Ok("document_too_large"),
            "{l}"
        );
        assert!(bson_len(l) < 16 * 1024, "{} bytes", bson_len(l));
    }
    // The three oversized inserts, and the insert + replace of the grown one (coalesced into
    // one write, both changes dead-lettered) — or just its replace, when the insert was
    // applied in an earlier batch.
    assert!(
        ids.contains(&grown),
        "no dead letter for the grown document: {letters:#?}"
    );
    ids.retain(|i| *i != grown);
    assert_eq!(ids.len(), 3, "{letters:#?}");
    for id in &big_ids {
        assert!(ids.contains(id), "no dead letter for {id}: {letters:#?}");
    }
    eventually(
        "the metric to match the stored entries",
        Duration::from_secs(10),
        || async {
            dead_lettered_total(&scrape(port).await) == dead_letters(&pair).await.len() as f64
        },
    )
    .await;
    assert!(run.terminate(Duration::from_secs(10)).unwrap().success());
}

// ---------------------------------------------------------------------------------------------
// 3. Checkpoint stores reconnect

#[tokio::test]
async fn the_redis_checkpoint_store_reconnects_after_redis_restarts() {
    let pair = Pair::start();
    let mut redis = RedisServer::start();
    let (path, config) = pair.config(
        "stall_after = \"30s\"",
        &format!(
            "{ORDERS}[checkpoint]\nstore = \"redis\"\nurl = \"{}\"\n",
            redis.url()
        ),
    );
    let (port, addr) = metrics_port();
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--metrics-addr", &addr]);
    readyz_becomes(port, 200, Duration::from_secs(60), |_| true).await;
    normal_changes_arrive(&pair, "before", 5).await;

    redis.stop();
    let down_at = mongodb::bson::DateTime::now();
    let body = readyz_becomes(port, 503, Duration::from_secs(20), |b| {
        b.contains("checkpoint store")
    })
    .await;
    assert!(body.contains("\"orders\""), "{body}");
    // Production keeps changing while the store is down.
    let prod = pair.prod().await.collection::<Document>("orders");
    for i in 0..5 {
        prod.insert_one(doc! { "userEmail": format!("during{i}@x.org"), "accountId": i })
            .await
            .unwrap();
    }
    // A long outage: readiness stays false all along.
    readyz_stays_unready(port, "checkpoint store", Duration::from_secs(12)).await;

    redis.restart();
    readyz_becomes(port, 200, Duration::from_secs(30), |_| true).await;
    eventually(
        "a checkpoint saved after the restart",
        Duration::from_secs(30),
        || async {
            let ctx = stagesync::context::Context::connect(config.clone())
                .await
                .unwrap();
            let saved = ctx.checkpoints.load("orders").await.ok().flatten();
            ctx.shutdown().await;
            saved.and_then(|c| c.saved_at).is_some_and(|t| t > down_at)
        },
    )
    .await;
    eventually(
        "the changes made during the outage",
        Duration::from_secs(30),
        || async { count_synced(&pair, doc! { "userEmail": { "$regex": "^during" } }).await == 5 },
    )
    .await;
    normal_changes_arrive(&pair, "after", 5).await;
    let cp = checkpoint(&config).await;
    assert!(cp.token.is_some() && cp.cluster_time.is_some(), "{cp:?}");
    let status = run.terminate(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", run.log_text());
    assert!(!run.log_text().contains("panicked"), "{}", run.log_text());
}

#[tokio::test]
async fn the_mongodb_checkpoint_store_reconnects_after_staging_restarts() {
    let mut pair = Pair::start_local(&[]);
    let (path, config) = pair.config("stall_after = \"30s\"", ORDERS);
    let (port, addr) = metrics_port();
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--metrics-addr", &addr]);
    readyz_becomes(port, 200, Duration::from_secs(60), |_| true).await;
    normal_changes_arrive(&pair, "before", 5).await;

    pair.staging_server.as_mut().unwrap().stop();
    let down_at = mongodb::bson::DateTime::now();
    let body = readyz_becomes(port, 503, Duration::from_secs(30), |b| {
        b.contains("checkpoint store")
    })
    .await;
    assert!(body.contains("\"orders\""), "{body}");
    let prod = pair.prod().await.collection::<Document>("orders");
    for i in 0..5 {
        prod.insert_one(doc! { "userEmail": format!("during{i}@x.org"), "accountId": i })
            .await
            .unwrap();
    }
    readyz_stays_unready(port, "\"orders\"", Duration::from_secs(12)).await;

    pair.staging_server.as_mut().unwrap().restart().unwrap();
    readyz_becomes(port, 200, Duration::from_secs(60), |_| true).await;
    eventually(
        "a checkpoint saved after the restart",
        Duration::from_secs(30),
        || async {
            checkpoint(&config)
                .await
                .saved_at
                .is_some_and(|t| t > down_at)
        },
    )
    .await;
    eventually(
        "the changes made during the outage",
        Duration::from_secs(30),
        || async { count_synced(&pair, doc! { "userEmail": { "$regex": "^during" } }).await == 5 },
    )
    .await;
    normal_changes_arrive(&pair, "after", 5).await;
    let status = run.terminate(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", run.log_text());
    assert!(!run.log_text().contains("panicked"), "{}", run.log_text());
}
