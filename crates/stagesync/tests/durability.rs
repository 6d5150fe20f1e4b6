//! Never lose, never duplicate: checkpoints, resume, lost history, dead letters, signals,
//! outages and `kill -9` — against real server processes and the real binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    all_docs, change_times, eventually, find_by, staging_doc_where, wait_until_stream_passes,
    wait_until_streaming, Engine, Pair, RedisServer, RunProcess, ORDERS,
};
use mongodb::bson::{doc, Bson, Document};

fn key(email: &str, account: i32) -> Document {
    doc! { "userEmail": email, "accountId": account }
}

async fn corrupt_checkpoint(config: &std::sync::Arc<stagesync::config::Config>) {
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    let mut cp = ctx
        .checkpoints
        .load("orders")
        .await
        .unwrap()
        .expect("a checkpoint exists");
    cp.token = Some(Bson::Document(
        doc! { "_data": "8200000000000000002B0229296E04" },
    ));
    ctx.checkpoints.save("orders", &cp, None).await.unwrap();
}

#[tokio::test]
async fn a_checkpoint_is_saved_as_bson_as_soon_as_the_stream_opens() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let engine = Engine::start(config.clone()).await; // waits for a checkpoint with a token
    let stored = pair
        .meta()
        .await
        .collection::<Document>("checkpoints")
        .find_one(doc! { "_id": "test/orders" })
        .await
        .unwrap();
    let stored = stored.expect("the checkpoint is in the metadata database");
    assert!(
        matches!(stored.get("token"), Some(Bson::Document(_))),
        "the token is stored as a BSON document: {stored}"
    );
    assert!(stored.get_datetime("savedAt").is_ok());
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn redis_checkpoints_resume_where_the_last_run_stopped() {
    let redis = RedisServer::start();
    let pair = Pair::start();
    let (_, config) = pair.config(
        "",
        &format!(
            "[checkpoint]\nstore = \"redis\"\nurl = \"{}\"\n{ORDERS}",
            redis.url()
        ),
    );
    let engine = Engine::start(config.clone()).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    prod.insert_one(doc! { "userEmail": "a@x.org", "accountId": 1 })
        .await
        .unwrap();
    staging_doc_where(&staging, key("a@x.org", 1), "synced", |_| true).await;
    engine.stop().await.unwrap();
    // Nothing in MongoDB's metadata database: the position lives in Redis.
    assert!(all_docs(&pair.meta().await.collection("checkpoints"))
        .await
        .is_empty());
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let raw: Vec<u8> = redis::AsyncCommands::get(&mut conn, "stagesync:checkpoint:test/orders")
        .await
        .unwrap();
    let stored =
        Document::from_reader(&mut raw.as_slice()).expect("the Redis value is a BSON document");
    assert!(matches!(stored.get("token"), Some(Bson::Document(_))));

    // Changes made while stopped are picked up from the checkpoint (not by a new snapshot).
    prod.insert_one(doc! { "userEmail": "b@x.org", "accountId": 2 })
        .await
        .unwrap();
    prod.update_one(key("a@x.org", 1), doc! { "$set": { "v": 2 } })
        .await
        .unwrap();
    let engine = Engine::start(config).await;
    staging_doc_where(&staging, key("b@x.org", 2), "synced after restart", |_| {
        true
    })
    .await;
    staging_doc_where(&staging, key("a@x.org", 1), "updated after restart", |d| {
        d.get_i32("v") == Ok(2)
    })
    .await;
    let applied_inserts = engine
        .ctx
        .metrics
        .changes_applied
        .with_label_values(&["orders", "insert"])
        .get();
    assert_eq!(
        applied_inserts, 1,
        "the second run resumed from the stream, not a snapshot"
    );
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn lost_history_with_fail_exits_3_and_says_how_to_recover() {
    let pair = Pair::start();
    let (path, config) = pair.config("on_history_lost = \"fail\"", ORDERS);
    Engine::start(config.clone()).await.stop().await.unwrap();
    corrupt_checkpoint(&config).await;
    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    let status = run
        .wait(Duration::from_secs(30))
        .expect("run gives up on lost history");
    assert_eq!(
        status.code(),
        Some(3),
        "a fatal sync error: {}",
        run.log_text()
    );
    let log = run.log_text();
    assert!(
        log.contains("stagesync snapshot") && log.contains("on_history_lost"),
        "the error says how to recover: {log}"
    );
}

#[tokio::test]
async fn lost_history_with_resync_copies_again_and_continues() {
    let pair = Pair::start();
    let (_, config) = pair.config("on_history_lost = \"resync\"", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let engine = Engine::start(config.clone()).await;
    prod.insert_one(doc! { "_id": 1, "userEmail": "gone@x.org", "accountId": 1 })
        .await
        .unwrap();
    staging_doc_where(&staging, key("gone@x.org", 1), "synced", |_| true).await;
    engine.stop().await.unwrap();
    corrupt_checkpoint(&config).await;
    // While stopped: one new document, one deleted. The resync must bring both.
    prod.insert_one(doc! { "_id": 2, "userEmail": "new@x.org", "accountId": 2 })
        .await
        .unwrap();
    prod.delete_one(doc! { "_id": 1 }).await.unwrap();
    let engine = Engine::start(config.clone()).await;
    staging_doc_where(
        &staging,
        key("new@x.org", 2),
        "copied by the resync",
        |_| true,
    )
    .await;
    staging_doc_where(
        &staging,
        key("gone@x.org", 1),
        "soft-deleted by the resync",
        |d| d.get_bool("deleted") == Ok(true),
    )
    .await;
    // And the stream continues after it.
    prod.insert_one(doc! { "_id": 3, "userEmail": "after@x.org", "accountId": 3 })
        .await
        .unwrap();
    staging_doc_where(
        &staging,
        key("after@x.org", 3),
        "streamed after the resync",
        |_| true,
    )
    .await;
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn sigterm_stops_run_with_exit_code_zero_within_ten_seconds() {
    let pair = Pair::start();
    let (path, config) = pair.config("", ORDERS);
    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    wait_until_streaming(&config).await;
    let started = Instant::now();
    let status = run
        .terminate(Duration::from_secs(10))
        .expect("exits within 10 s of SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}; log: {}",
        run.log_text()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn sigterm_stops_run_promptly_even_when_staging_is_far_behind() {
    let pair = Pair::start();
    // A tiny write budget keeps staging behind, so the reader is blocked on a full queue.
    let (path, config) = pair.config("max_writes_per_second = 50", ORDERS);
    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    wait_until_streaming(&config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    insert_range(&prod, 0, 5000, "burst").await;
    let staging = pair.staging().await.collection::<Document>("orders");
    eventually(
        "staging to start receiving the burst",
        Duration::from_secs(30),
        || async { staging.count_documents(doc! {}).await.unwrap_or(0) > 0 },
    )
    .await;
    let started = Instant::now();
    let status = run
        .terminate(Duration::from_secs(10))
        .expect("exits within 10 s of SIGTERM although staging is behind");
    assert!(status.success(), "{status:?}; log: {}", run.log_text());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        staging.count_documents(doc! {}).await.unwrap() < 5000,
        "staging was still behind"
    );
}

#[tokio::test]
async fn a_poison_change_is_dead_lettered_and_replayed_after_the_fix() {
    let pair = Pair::start();
    let guarded = |max: i32| {
        format!("{ORDERS}schema_version_field = \"schemaVersion\"\nmax_schema_version = {max}\n")
    };
    let (path, config) = pair.config("", &guarded(3));
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    prod.insert_one(
        doc! { "_id": 1, "userEmail": "p@x.org", "accountId": 1, "schemaVersion": 4, "total": 9 },
    )
    .await
    .unwrap();
    prod.insert_one(doc! { "_id": 2, "userEmail": "ok@x.org", "accountId": 2, "schemaVersion": 3 })
        .await
        .unwrap();
    staging_doc_where(
        &staging,
        key("ok@x.org", 2),
        "applied after the poison change",
        |_| true,
    )
    .await;
    let dlq = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_stagesync"))
            .arg("dlq")
            .args(args)
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap()
    };
    eventually("the dead letter", Duration::from_secs(20), || async {
        all_docs(&pair.meta().await.collection("dead_letters"))
            .await
            .len()
            == 1
    })
    .await;
    engine.stop().await.unwrap();
    let listed = dlq(&["list", "--json"]);
    assert!(listed.status.success());
    let entries: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 1);
    assert_eq!(entries[0]["error_code"], "schema_ahead");
    assert_eq!(entries[0]["collection"], "orders");
    assert_eq!(entries[0]["attempts"], 1);
    let id = entries[0]["id"].as_str().unwrap().to_string();
    let shown = dlq(&["show", &id, "--json"]);
    assert!(shown.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["change"]["fullDocument"]["total"], 9);

    // Replaying before the fix fails again and keeps the entry.
    let still = dlq(&["replay", "--all"]);
    assert_eq!(still.status.code(), Some(1));
    assert_eq!(
        all_docs(&pair.meta().await.collection("dead_letters"))
            .await
            .len(),
        1
    );

    // Raise the limit, replay: applied, queue empty.
    std::fs::write(&path, pair.config_text("", &guarded(4))).unwrap();
    let replayed = dlq(&["replay", "--all"]);
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    staging_doc_where(&staging, key("p@x.org", 1), "replayed", |d| {
        d.get_i32("total") == Ok(9)
    })
    .await;
    assert!(all_docs(&pair.meta().await.collection("dead_letters"))
        .await
        .is_empty());
}

#[tokio::test]
async fn dlq_purge_removes_entries() {
    let pair = Pair::start();
    let orders =
        format!("{ORDERS}schema_version_field = \"schemaVersion\"\nmax_schema_version = 1\n");
    let (path, config) = pair.config("", &orders);
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    for i in 0..3 {
        prod.insert_one(
            doc! { "userEmail": format!("p{i}@x.org"), "accountId": i, "schemaVersion": 2 },
        )
        .await
        .unwrap();
    }
    let dead = pair.meta().await.collection::<Document>("dead_letters");
    eventually("three dead letters", Duration::from_secs(20), || async {
        all_docs(&dead).await.len() == 3
    })
    .await;
    engine.stop().await.unwrap();
    let id = all_docs(&dead).await[0]
        .get_object_id("_id")
        .unwrap()
        .to_hex();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_stagesync"))
            .arg("dlq")
            .args(args)
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap()
    };
    assert!(run(&["purge", &id]).status.success());
    assert_eq!(all_docs(&dead).await.len(), 2);
    assert!(run(&["purge", "--all"]).status.success());
    assert!(all_docs(&dead).await.is_empty());
    let bad = run(&["show", "not-an-id"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a dead-letter id"));
}

/// Writes `n` documents `[from, from+n)` in one insert_many.
async fn insert_range(prod: &mongodb::Collection<Document>, from: i32, n: i32, tag: &str) {
    let docs: Vec<Document> = (from..from + n)
        .map(|i| doc! { "_id": i, "userEmail": format!("u{i}@x.org"), "accountId": i % 7, "v": 0, "tag": tag })
        .collect();
    prod.insert_many(docs).await.unwrap();
}

async fn outage_test(stop_production: bool) {
    // The servers are killed (SIGKILL), not shut down. A server only keeps what it acknowledged
    // across a kill when it syncs its log on commit, and stagesync only relies on what staging
    // acknowledged as durable: so `--sync-on-commit` on the servers and `write_concern =
    // "majority"` (j: true on MongoDB) — as recommended for real clusters in the README.
    let mut pair = Pair::start_local(&["--sync-on-commit"]);
    let text = pair
        .config_text("", ORDERS)
        .replace("write_concern = 1", "write_concern = \"majority\"");
    let path = pair.dir.path().join("outage.toml");
    std::fs::write(&path, text).unwrap();
    let config = std::sync::Arc::new(stagesync::config::Config::load(&path).unwrap());
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    wait_until_streaming(&config).await;
    insert_range(&prod, 0, 200, "before").await;
    eventually("the first 200", Duration::from_secs(30), || async {
        staging.count_documents(doc! {}).await.unwrap_or(0) == 200
    })
    .await;
    let started = Instant::now();
    if stop_production {
        pair.prod_server.as_mut().unwrap().stop();
        tokio::time::sleep(Duration::from_secs(5)).await; // the outage itself, not a synchronisation
        pair.prod_server.as_mut().unwrap().restart().unwrap();
        insert_range(&prod, 200, 200, "after").await;
    } else {
        pair.staging_server.as_mut().unwrap().stop();
        // Production keeps changing while staging is away.
        insert_range(&prod, 200, 100, "during").await;
        prod.update_many(doc! { "_id": { "$lt": 50 } }, doc! { "$set": { "v": 1 } })
            .await
            .unwrap();
        prod.delete_many(doc! { "_id": { "$gte": 150, "$lt": 160 } })
            .await
            .unwrap();
        let remaining = Duration::from_secs(5).saturating_sub(started.elapsed());
        tokio::time::sleep(remaining).await; // the outage itself
        pair.staging_server.as_mut().unwrap().restart().unwrap();
        insert_range(&prod, 300, 100, "after").await;
    }
    let staging = pair.staging().await.collection::<Document>("orders");
    let expected_live = if stop_production { 400 } else { 390 };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let live = staging
            .count_documents(doc! { "deleted": { "$ne": true } })
            .await
            .unwrap_or(0);
        let all = staging.count_documents(doc! {}).await.unwrap_or(0);
        if live == expected_live && all == 400 {
            break;
        }
        if Instant::now() > deadline {
            let log = run.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!("staging did not catch up after the outage: {live} live of {expected_live}, {all} of 400; run log (newest first):\n{}", tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !stop_production {
        assert_eq!(
            staging.count_documents(doc! { "v": 1 }).await.unwrap(),
            50,
            "updates made during the outage arrived"
        );
        assert_eq!(
            staging
                .count_documents(doc! { "deleted": true })
                .await
                .unwrap(),
            10
        );
    }
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "run kept going through the outage"
    );
    let status = run
        .terminate(Duration::from_secs(10))
        .expect("stops on SIGTERM");
    assert!(status.success());
    let log = run.log_text();
    let side = if stop_production {
        "production"
    } else {
        "staging"
    };
    // The outage shows as a warning naming the server, from whichever step met it first
    // (the writes, the checkpoint save, the change stream or the snapshot).
    let named = log
        .lines()
        .any(|l| l.contains("\"WARN\"") && l.contains("unavailable") && l.contains(side));
    assert!(named, "the {side} outage was logged as a warning: {log}");
}

#[tokio::test]
async fn a_staging_outage_loses_nothing() {
    outage_test(false).await;
}

#[tokio::test]
async fn a_production_outage_loses_nothing() {
    outage_test(true).await;
}

#[tokio::test]
async fn kill_9_part_way_through_50000_changes_loses_and_duplicates_nothing() {
    let pair = Pair::start_local(&["--oplog-max-entries", "1000000"]);
    let (path, _config) = pair.config("", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    // Staging-only fields on documents staging already has, to check they survive everything.
    let seeded: Vec<Document> = (0..500)
        .map(|i| doc! { "userEmail": format!("u{i}@x.org"), "accountId": i % 7, "qaNote": format!("qa{i}") })
        .collect();
    staging.insert_many(seeded).await.unwrap();

    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    // The burst starts once the run has fixed where it starts reading (its snapshot's time, the
    // first thing it checkpoints), so that every change of the burst reaches it as a change.
    // Started earlier, a snapshot would copy part of the burst as it is then: documents deleted
    // before they are copied never reach staging (no soft-deleted twin), and a seeded document
    // is not adopted by a production document whose key already moved on — right for a
    // snapshot, but not what this test counts.
    eventually(
        "the run to fix its start",
        Duration::from_secs(120),
        || async {
            pair.meta()
                .await
                .collection::<Document>("checkpoints")
                .find_one(doc! {})
                .await
                .unwrap()
                .is_some_and(|cp| cp.contains_key("snapshot") || cp.contains_key("clusterTime"))
        },
    )
    .await;
    let writer = {
        let prod = prod.clone();
        tokio::spawn(async move {
            let mut changes = 0u64;
            // Bursts: inserts, updates, business-key changes, deletes, re-inserts.
            for round in 0..5 {
                let base = round * 5000;
                insert_range(&prod, base, 5000, "burst").await; // 5000 inserts
                prod.update_many(
                    doc! { "_id": { "$gte": base, "$lt": base + 3000 } },
                    doc! { "$set": { "v": round + 1 } },
                )
                .await
                .unwrap(); // 3000 updates
                for i in (base..base + 500).step_by(1) {
                    prod.update_one(
                        doc! { "_id": i },
                        doc! { "$set": { "userEmail": format!("moved{i}@x.org") } },
                    )
                    .await
                    .unwrap();
                } // 500 key changes
                prod.delete_many(doc! { "_id": { "$gte": base + 4000, "$lt": base + 5000 } })
                    .await
                    .unwrap(); // 1000 deletes
                let reinserted: Vec<Document> = (base + 4000..base + 4500)
                    .map(|i| doc! { "_id": i + 1_000_000, "userEmail": format!("u{i}@x.org"), "accountId": i % 7, "v": 9 })
                    .collect();
                prod.insert_many(reinserted).await.unwrap(); // 500 re-inserts of deleted keys
                changes += 10_000;
            }
            changes
        })
    };
    // Kill -9 part-way: once staging has received some, but not all, of the burst.
    eventually(
        "part of the burst to be applied",
        Duration::from_secs(120),
        || async {
            staging
                .count_documents(doc! { "_sync": { "$exists": true } })
                .await
                .unwrap_or(0)
                >= 3000
        },
    )
    .await;
    run.child.kill().unwrap(); // SIGKILL
    run.child.wait().unwrap();
    let total = writer.await.unwrap();
    assert_eq!(total, 50_000);
    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    let marker = change_times(&prod, 1, || async {
        prod.insert_one(doc! { "_id": "marker", "userEmail": "marker", "accountId": 0 })
            .await
            .unwrap();
    })
    .await[0];
    // Caught up once the stream has applied the marker's change — not once the marker shows in
    // staging: killed during its snapshot, the run continues that snapshot first, which copies
    // the marker before the stream has replayed the burst.
    wait_until_stream_passes(&pair.meta().await, "orders", marker).await;
    assert_eq!(
        find_by(&staging, doc! { "userEmail": "marker" })
            .await
            .len(),
        1
    );
    let status = run
        .terminate(Duration::from_secs(10))
        .expect("stops on SIGTERM");
    assert!(status.success());

    // Staging must be exactly what the rules say.
    let prod_docs = all_docs(&prod).await;
    let staging_docs = all_docs(&staging).await;
    // Nothing may have been dead-lettered: every change of the burst can be applied.
    let dead: Vec<String> = all_docs(&pair.meta().await.collection::<Document>("dead_letters"))
        .await
        .iter()
        .map(|d| {
            format!(
                "{} {}: {}",
                d.get("productionId")
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                d.get_str("operation").unwrap_or(""),
                d.get_document("error")
                    .map(|e| e.to_string())
                    .unwrap_or_default()
            )
        })
        .collect();
    assert!(dead.is_empty(), "dead letters after the burst: {dead:?}");
    let mut by_key: HashMap<(String, i32), Vec<&Document>> = HashMap::new();
    for d in &staging_docs {
        let k = (
            d.get_str("userEmail").unwrap().to_string(),
            d.get_i32("accountId").unwrap(),
        );
        by_key.entry(k).or_default().push(d);
    }
    assert!(
        by_key.values().all(|v| v.len() == 1),
        "no duplicate business keys"
    );
    let mut live_owners = HashSet::new();
    for p in &prod_docs {
        let k = (
            p.get_str("userEmail").unwrap().to_string(),
            p.get_i32("accountId").unwrap(),
        );
        let s = by_key
            .get(&k)
            .unwrap_or_else(|| panic!("production document {k:?} is missing in staging"))[0];
        for (f, v) in p.iter().filter(|(f, _)| *f != "_id") {
            assert_eq!(s.get(f), Some(v), "field {f} of {k:?}");
        }
        assert!(!s.contains_key("deleted"), "{k:?} is live in production");
        live_owners.insert(format!("{}", p.get("_id").unwrap()));
    }
    let soft_deleted: Vec<&Document> = staging_docs
        .iter()
        .filter(|d| d.get_bool("deleted") == Ok(true))
        .collect();
    // 5 rounds × 1000 deleted, minus 500 per round revived by re-inserting their keys.
    assert_eq!(soft_deleted.len(), 5 * 500);
    for d in &soft_deleted {
        assert!(d.get_datetime("deletedAt").is_ok());
        let owner = format!("{}", d.get_document("_sync").unwrap().get("id").unwrap());
        assert!(!live_owners.contains(&owner));
    }
    // Seeded staging-only fields survived updates, key changes, deletes and revivals.
    let qa = staging_docs
        .iter()
        .filter(|d| d.contains_key("qaNote"))
        .count();
    assert_eq!(qa, 500);
    assert_eq!(staging_docs.len(), prod_docs.len() + soft_deleted.len());
}
