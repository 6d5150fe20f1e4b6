//! Initial snapshot with a gap-free hand-off to the change stream, resumable snapshots, and
//! `stagesync verify` — against real servers and the real binary.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    all_docs, change_times, eventually, find_by, staging_doc_where, wait_until_stream_passes,
    Engine, Pair, RunProcess, ORDERS,
};
use mongodb::bson::{doc, Bson, Document, Timestamp};
use stagesync::source::change::Change;

/// `stagesync verify`: exit code and stdout (the data; diagnostics go to stderr, which must
/// never hold a panic).
fn verify(path: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let (code, stdout, stderr) = verify_full(path, extra);
    assert!(!stderr.contains("panicked"), "verify panicked: {stderr}");
    (code, stdout)
}

fn verify_full(path: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .arg("verify")
        .arg("-c")
        .arg(path)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn seed_production(prod: &mongodb::Collection<Document>, n: i32) {
    for start in (0..n).step_by(5000) {
        let docs: Vec<Document> = (start..(start + 5000).min(n))
            .map(|i| doc! { "_id": i, "userEmail": format!("u{i}@x.org"), "accountId": i % 10, "total": i, "status": "paid" })
            .collect();
        prod.insert_many(docs).await.unwrap();
    }
}

/// One production document per `_id` in `ids`, each with a business key of its own.
async fn insert_with_ids(prod: &mongodb::Collection<Document>, ids: &[Bson]) {
    prod.insert_many(
        ids.iter()
            .enumerate()
            .map(|(i, id)| doc! { "_id": id.clone(), "userEmail": format!("e{i}"), "accountId": 1 })
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn snapshot_under_live_writes_then_verify_finds_exactly_the_tampering() {
    let pair = Pair::start();
    let (path, config) = pair.config("initial_sync = \"auto\"", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    seed_production(&prod, 20_000).await;
    // Staging already has some of the keys under its own _ids, with staging-only fields…
    let known: Vec<Document> = (0..100)
        .map(|i| doc! { "_id": format!("stg-{i}"), "userEmail": format!("u{i}@x.org"), "accountId": i % 10, "qaNote": format!("qa{i}"), "total": -1 })
        .collect();
    staging.insert_many(known).await.unwrap();
    // …and stale documents from an earlier sync whose production documents are long gone.
    let old = Timestamp {
        time: 1,
        increment: 1,
    };
    let stale: Vec<Document> = (0..10)
        .map(|i| doc! { "userEmail": format!("gone{i}@x.org"), "accountId": 0, "_sync": { "id": format!("gone{i}"), "ts": old, "fields": ["userEmail", "accountId"] } })
        .collect();
    staging.insert_many(stale).await.unwrap();
    // And one staging-only document, which nothing may touch.
    staging
        .insert_one(
            doc! { "_id": "qa-only", "userEmail": "qa@x.org", "accountId": 0, "note": "mine" },
        )
        .await
        .unwrap();

    // A writer keeps changing production while the snapshot runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (prod, stop) = (prod.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = (i * 7919) % 20_000;
                prod.update_one(
                    doc! { "_id": id },
                    doc! { "$set": { "total": -i, "status": "changed" } },
                )
                .await
                .unwrap();
                prod.insert_one(doc! { "_id": 100_000 + i, "userEmail": format!("live{i}@x.org"), "accountId": 1, "total": i }).await.unwrap();
                if i % 5 == 0 {
                    prod.delete_one(doc! { "_id": 10_000 + i }).await.unwrap();
                }
                i += 1;
            }
            i
        })
    };
    let engine = Engine::start(config).await; // returns once the snapshot handed off to the stream
                                              // Let the writer overlap the stream a little too (the stream has just opened).
    eventually(
        "the writer to keep going after the hand-off",
        Duration::from_secs(20),
        || async {
            prod.count_documents(doc! { "_id": { "$gte": 100_000 } })
                .await
                .unwrap()
                >= 50
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    assert!(writes > 0);
    prod.insert_one(doc! { "_id": "marker", "userEmail": "marker", "accountId": 0 })
        .await
        .unwrap();
    staging_doc_where(&staging, doc! { "userEmail": "marker" }, "synced", |_| true).await;
    engine.stop().await.unwrap();

    let adopted = find_by(&staging, doc! { "_id": "stg-5" }).await.remove(0);
    assert_eq!(
        adopted.get_str("qaNote").unwrap(),
        "qa5",
        "adopted documents keep staging-only fields"
    );
    assert_eq!(
        find_by(
            &staging,
            doc! { "deleted": true, "userEmail": { "$regex": "^gone" } }
        )
        .await
        .len(),
        10,
        "stale documents are soft-deleted"
    );
    assert_eq!(
        find_by(&staging, doc! { "_id": "qa-only" }).await.remove(0),
        doc! { "_id": "qa-only", "userEmail": "qa@x.org", "accountId": 0, "note": "mine" }
    );

    let (code, out) = verify(&path, &[]);
    assert_eq!(code, 0, "verify after a quiet sync: {out}");
    assert!(out.contains("in sync"));

    // Tamper with two staging documents: a production-owned field edited, one removed.
    staging
        .update_one(
            doc! { "userEmail": "u42@x.org", "accountId": 2 },
            doc! { "$set": { "total": 123_456 } },
        )
        .await
        .unwrap();
    staging
        .update_one(
            doc! { "userEmail": "u77@x.org", "accountId": 7 },
            doc! { "$unset": { "status": "" } },
        )
        .await
        .unwrap();
    // Staging-only edits are not drift.
    staging
        .update_one(
            doc! { "userEmail": "u43@x.org", "accountId": 3 },
            doc! { "$set": { "qaNote": "fine", "qa": "also fine" } },
        )
        .await
        .unwrap();
    let (code, out) = verify(&path, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("userEmail=u42@x.org, accountId=2") && out.contains("fields: total"),
        "{out}"
    );
    assert!(
        out.contains("userEmail=u77@x.org, accountId=7") && out.contains("fields: status"),
        "{out}"
    );
    assert!(!out.contains("u43@x.org"), "{out}");
    assert!(
        !out.contains("123456"),
        "no field values in the report: {out}"
    );
    let (code, json) = verify(&path, &["--json"]);
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(report["in_sync"], false);
    assert_eq!(
        report["collections"][0]["differing"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        report["collections"][0]["missing"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test]
async fn verify_reports_missing_stale_and_wrongly_deleted_documents() {
    let pair = Pair::start();
    let (path, config) = pair.config("", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let engine = Engine::start(config).await;
    for i in 0..5 {
        prod.insert_one(doc! { "_id": i, "userEmail": format!("u{i}@x.org"), "accountId": 1 })
            .await
            .unwrap();
    }
    staging_doc_where(&staging, doc! { "userEmail": "u4@x.org" }, "synced", |_| {
        true
    })
    .await;
    engine.stop().await.unwrap();
    // While no sync runs: staging loses one, production loses one, staging wrongly deletes one.
    staging
        .delete_one(doc! { "userEmail": "u0@x.org" })
        .await
        .unwrap();
    prod.delete_one(doc! { "_id": 1 }).await.unwrap();
    staging
        .update_one(
            doc! { "userEmail": "u2@x.org" },
            doc! { "$set": { "deleted": true } },
        )
        .await
        .unwrap();
    let (code, json) = verify(&path, &["--json"]);
    assert_eq!(code, 1, "{json}");
    let report: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let c = &report["collections"][0];
    assert_eq!(
        c["missing"][0]["business_key"],
        "userEmail=u0@x.org, accountId=1"
    );
    assert_eq!(
        c["stale_not_deleted"][0]["business_key"],
        "userEmail=u1@x.org, accountId=1"
    );
    assert_eq!(
        c["deleted_but_present"][0]["business_key"],
        "userEmail=u2@x.org, accountId=1"
    );
    let (code, out) = verify(&path, &["--sample", "3"]);
    assert!(code == 0 || code == 1, "{out}");
    assert!(out.contains("orders"));
    let (code, _, out) = verify_full(&path, &["--collection", "nope"]);
    assert_eq!(code, 2, "{out}");
}

#[tokio::test]
async fn a_killed_snapshot_continues_where_it_stopped() {
    let pair = Pair::start();
    let (path, config) = pair.config("snapshot_batch_size = 100", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    seed_production(&prod, 30_000).await;
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    let mut first = RunProcess::start_command("snapshot", &path, pair.dir.path());
    eventually(
        "the snapshot to be part-way",
        Duration::from_secs(60),
        || async {
            let cp = ctx.checkpoints.load("orders").await.unwrap();
            cp.and_then(|c| c.snapshot)
                .and_then(|s| s.get_i64("copied").ok())
                .unwrap_or(0)
                >= 1000
        },
    )
    .await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let cp = ctx.checkpoints.load("orders").await.unwrap().unwrap();
    let progress = cp
        .snapshot
        .expect("an unfinished snapshot leaves its progress");
    let copied = progress.get_i64("copied").unwrap();
    assert!(copied < 30_000, "killed part-way ({copied} copied)");
    assert!(matches!(progress.get("lastId"), Some(Bson::Int32(_))));

    let mut second = RunProcess::start_command("snapshot", &path, pair.dir.path());
    let status = second
        .wait(Duration::from_secs(120))
        .expect("the second snapshot finishes");
    assert!(status.success(), "{}", second.log_text());
    assert!(
        second
            .log_text()
            .contains("continuing an interrupted snapshot"),
        "{}",
        second.log_text()
    );
    assert_eq!(staging.count_documents(doc! {}).await.unwrap(), 30_000);
    let cp = ctx.checkpoints.load("orders").await.unwrap().unwrap();
    assert!(
        cp.snapshot.is_none() && cp.cluster_time.is_some(),
        "the hand-off position is saved"
    );
    let (code, out) = verify(&path, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        all_docs(&staging)
            .await
            .iter()
            .filter(|d| d.get_document("_sync").is_err())
            .count(),
        0
    );
}

/// The checkpoint a snapshot killed part-way leaves: its read time and the last `_id` copied.
async fn interrupted_snapshot(
    config: &Arc<stagesync::config::Config>,
    read_time: Timestamp,
    last_id: Bson,
    copied: i64,
) {
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    let cp = stagesync::checkpoint::Checkpoint {
        snapshot: Some(doc! { "readTime": read_time, "lastId": last_id, "copied": copied }),
        ..Default::default()
    };
    ctx.checkpoints.save("orders", &cp, None).await.unwrap();
    ctx.shutdown().await;
}

#[tokio::test]
async fn a_continued_snapshot_reads_on_after_its_last_copied_id_across_id_types() {
    let pair = Pair::start();
    let (_, config) = pair.config("snapshot_batch_size = 2", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let oid = mongodb::bson::oid::ObjectId::new();
    let ids: Vec<Bson> = (0..8)
        .map(Bson::Int32)
        .chain([
            Bson::Double(8.5),
            Bson::from("a"),
            Bson::from("b"),
            Bson::ObjectId(oid),
        ])
        .collect();
    insert_with_ids(&prod, &ids).await;
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    // Killed after copying 0..=4 (which staging, here, never got: whatever the continued
    // snapshot copies shows where it started).
    interrupted_snapshot(
        &config,
        ctx.production_time().await.unwrap(),
        Bson::Int32(4),
        5,
    )
    .await;
    let pipeline = ctx.pipeline(config.collection("orders").unwrap());
    let done = stagesync::snapshot::snapshot_collection(
        &pipeline,
        &tokio_util::sync::CancellationToken::new(),
        false,
    )
    .await
    .unwrap();
    assert!(done.is_some(), "the snapshot finished");
    let copied: Vec<Bson> = all_docs(&staging)
        .await
        .iter()
        .map(|d| d.get_document("_sync").unwrap().get("id").unwrap().clone())
        .collect();
    let mut copied_sorted = copied.clone();
    copied_sorted.sort_by_key(|b| format!("{b:?}"));
    let mut expected = ids[5..].to_vec();
    expected.sort_by_key(|b| format!("{b:?}"));
    assert_eq!(
        copied_sorted, expected,
        "after _id 4 — numbers, strings and ObjectIds alike — and nothing before it"
    );
    ctx.shutdown().await;
}

/// The snapshot's reader takes its batch bounds from a pass over the `_id`s as it goes — a head
/// of 128 batches' worth read first with a limit, then the rest — starts its first range at the
/// first `_id` the pass saw and ends with its last one. Whatever the batch size (so wherever the
/// head ends: inside a kind, exactly at the last document, beyond it), and with `_id`s of
/// several kinds (which sort by kind first), it must read every document exactly once, in `_id`
/// order.
#[tokio::test]
async fn a_snapshot_reads_every_document_once_in_id_order_whatever_its_batch_size() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let oid = mongodb::bson::oid::ObjectId::new();
    let ids: Vec<Bson> = [Bson::Null]
        .into_iter()
        .chain((0..250).map(Bson::Int32))
        .chain([
            Bson::Double(250.5),
            Bson::from("a"),
            Bson::from("b"),
            Bson::ObjectId(oid),
            Bson::Boolean(true),
        ])
        .collect();
    insert_with_ids(&prod, &ids).await;
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    let pipeline = ctx.pipeline(config.collection("orders").unwrap());
    assert_eq!(ids.len(), 256, "the head of batches of 2 is every document");
    for batch_size in [1, 2, 3, 4, 100, ids.len() - 1, ids.len(), 300] {
        let (tx, mut rx) = tokio::sync::mpsc::channel(ids.len() + 1);
        stagesync::source::scan::read_documents(
            pipeline.source.clone(),
            pipeline.masker.clone(),
            None,
            Timestamp {
                time: 1,
                increment: 1,
            },
            None,
            batch_size,
            tx,
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        let mut read = Vec::new();
        while let Some(batch) = rx.recv().await {
            let batch = batch.unwrap();
            assert!(
                batch.len() <= batch_size,
                "batches of at most {batch_size}: {}",
                batch.len()
            );
            read.extend(batch.into_iter().map(|c| c.prod_id));
        }
        assert_eq!(read, ids, "batches of {batch_size}");
    }
    ctx.shutdown().await;
}

/// A snapshot continued after a restart reads documents long after its start `T`, in the state
/// production's later changes left them in; the stream then replays every change since `T`.
/// Those changes must not be applied again on top of copies that already reflect them: an
/// insert matched by its old business key made a second staging document for the same
/// production document, and the insert of a document deleted since collided with the copy of
/// the document that took its key — dead letters for changes that were in fact applied.
#[tokio::test]
async fn changes_a_continued_snapshot_already_copied_are_not_replayed_onto_it() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    // The snapshot started at `T` and was killed before copying anything…
    interrupted_snapshot(&config, ctx.production_time().await.unwrap(), Bson::Null, 0).await;
    ctx.shutdown().await;
    // …and production changed before it was continued.
    let times = change_times(&prod, 5, || async {
        prod.insert_one(doc! { "_id": 1, "userEmail": "shared@x.org", "accountId": 1 })
            .await
            .unwrap();
        prod.delete_one(doc! { "_id": 1 }).await.unwrap();
        // Another document takes the deleted one's business key.
        prod.insert_one(doc! { "_id": 2, "userEmail": "shared@x.org", "accountId": 1, "v": 1 })
            .await
            .unwrap();
        // A document changes its business key.
        prod.insert_one(doc! { "_id": 3, "userEmail": "old@x.org", "accountId": 1, "v": 0 })
            .await
            .unwrap();
        prod.update_one(
            doc! { "_id": 3 },
            doc! { "$set": { "userEmail": "new@x.org", "v": 1 } },
        )
        .await
        .unwrap();
    })
    .await;
    let engine = Engine::start(config.clone()).await;
    wait_until_stream_passes(&pair.meta().await, "orders", times[4]).await;
    engine.stop().await.unwrap();

    let dead = all_docs(&pair.meta().await.collection::<Document>("dead_letters")).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    let docs = all_docs(&staging).await;
    let summary: Vec<(Bson, String, Option<i32>)> = docs
        .iter()
        .map(|d| {
            (
                d.get_document("_sync").unwrap().get("id").unwrap().clone(),
                d.get_str("userEmail").unwrap().to_string(),
                d.get_i32("v").ok(),
            )
        })
        .collect();
    let mut summary = summary;
    summary.sort_by_key(|(id, _, _)| id.as_i32());
    assert_eq!(
        summary,
        vec![
            (Bson::Int32(2), "shared@x.org".to_string(), Some(1)),
            (Bson::Int32(3), "new@x.org".to_string(), Some(1)),
        ],
        "one staging document per production document, as production has it: {docs:?}"
    );
}

/// A first snapshot writes its copies without look-ups and plans each batch while the one before
/// it is written. In many small batches — business keys repeated in production (collisions),
/// staging-only documents to adopt, one holding a production `_id` — it must end where the same
/// copy ends when every document is looked up one batch after the other: into a staging
/// collection that already holds a synced document (which turns the blind path off).
#[tokio::test]
async fn a_first_snapshot_in_overlapping_blind_batches_ends_where_looking_everything_up_does() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let pair = Pair::start();
    let prod = pair.prod().await.collection::<Document>("orders");
    let mut rng = StdRng::seed_from_u64(14);
    let docs: Vec<Document> = (0..600)
        .map(|i| doc! { "_id": i, "userEmail": format!("u{}@x.org", rng.random_range(0..200)), "accountId": 1, "total": i })
        .collect();
    prod.insert_many(docs).await.unwrap();

    let copy = |name: &'static str, with_synced_document: bool| {
        let pair = &pair;
        async move {
            let (path, staging_db, meta_db) =
                pair.config_into(name, "snapshot_batch_size = 3", ORDERS);
            let staging = common::client(&pair.staging_uri)
                .await
                .database(&staging_db)
                .collection::<Document>("orders");
            let mut seed: Vec<Document> = (0..20)
                .map(|i| doc! { "_id": format!("qa-{i}"), "userEmail": format!("u{i}@x.org"), "accountId": 1, "qa": i })
                .collect();
            seed.push(doc! { "_id": 5, "userEmail": "tester@x.org", "accountId": 99 });
            if with_synced_document {
                seed.push(doc! { "_id": "marker", "userEmail": "marker@x.org", "accountId": 0,
                    "_sync": { "id": "marker", "ts": Timestamp { time: 1, increment: 1 }, "fields": ["userEmail", "accountId"] } });
            }
            staging.insert_many(seed).await.unwrap();
            let out = common::stagesync(&["snapshot"], &path);
            assert!(out.status.success(), "{}", common::text(&out));
            // Read times and new `_id`s differ between the runs; the rest must not.
            let mut rows: Vec<String> = all_docs(&staging)
                .await
                .into_iter()
                .filter(|d| d.get_str("_id") != Ok("marker"))
                .map(|mut d| {
                    if let Ok(meta) = d.get_document_mut("_sync") {
                        meta.remove("ts");
                    }
                    if matches!(d.get("_id"), Some(Bson::ObjectId(_))) {
                        d.insert("_id", "new");
                    }
                    d.remove("deletedAt");
                    d.to_string()
                })
                .collect();
            rows.sort();
            let dead_letters = common::client(&pair.staging_uri)
                .await
                .database(&meta_db)
                .collection::<Document>("dead_letters")
                .count_documents(doc! {})
                .await
                .unwrap();
            (rows, dead_letters)
        }
    };
    let (blind, blind_dead) = copy("blind", false).await;
    let (looked_up, looked_up_dead) = copy("looked_up", true).await;
    assert!(blind_dead > 0, "the keys repeat: some copies collide");
    assert_eq!(
        blind_dead, looked_up_dead,
        "the same copies are dead-lettered"
    );
    assert_eq!(blind.len(), looked_up.len());
    for (b, l) in blind.iter().zip(&looked_up) {
        assert_eq!(b, l);
    }
}

/// A batch planned while the one before it is written waits for its turn before it touches
/// staging: a one-copy batch started next to a thousand-copy one whose last copy has the same
/// business key finishes planning long before, yet is written second — the first copy keeps
/// the key, the second is dead-lettered as a collision. Its blind insert would be allowed to
/// go beside the batch before (`Turn::beside`), but not with a key that batch inserts too.
#[tokio::test]
async fn a_batch_planned_ahead_is_written_after_the_batch_before_it() {
    let pair = Pair::start();
    let two = TwoBlindBatches::start(&pair).await;
    let first: Vec<Change> = (0..1000)
        .map(|i| copy(i, &format!("u{i}@x.org"), 100))
        .collect();
    let second = vec![copy(5000, "u999@x.org", 101)];
    let a = async {
        let report = two.write(&first, &two.first).await;
        two.first_done.send(true).unwrap();
        report
    };
    let b = two.write(&second, &two.second);
    // The later batch is polled first: without its turn it would be written first.
    let (b, a) = tokio::join!(b, a);
    assert_eq!(a.unwrap().unwrap().applied, 1000);
    assert_eq!(b.unwrap().unwrap().failed, 1, "the later copy collides");
    let holder = find_by(&two.staging, doc! { "userEmail": "u999@x.org" }).await;
    assert_eq!(holder.len(), 1);
    assert_eq!(
        holder[0].get_document("_sync").unwrap().get_i32("id"),
        Ok(999)
    );
    two.ctx.shutdown().await;
}

/// The other side of `Turn::beside`: a blind batch whose keys no unique index of staging sees in
/// the batch before it is written without waiting for that batch — here the batch before is
/// only said to be written once this one is, so waiting would never end.
#[tokio::test]
async fn a_blind_batch_with_keys_apart_is_written_beside_the_batch_before_it() {
    let pair = Pair::start();
    let two = TwoBlindBatches::start(&pair).await;
    let first: Vec<Change> = (0..1000)
        .map(|i| copy(i, &format!("u{i}@x.org"), 100))
        .collect();
    let second = vec![copy(5000, "u5000@x.org", 101)];
    let a = two.write(&first, &two.first);
    let b = async {
        let report = tokio::time::timeout(Duration::from_secs(60), two.write(&second, &two.second))
            .await
            .expect("the later batch waited for the one before it");
        two.first_done.send(true).unwrap();
        report
    };
    let (a, b) = tokio::join!(a, b);
    assert_eq!(a.unwrap().unwrap().applied, 1000);
    assert_eq!(b.unwrap().unwrap().applied, 1);
    assert_eq!(
        two.staging
            .count_documents(doc! { "_sync.id": { "$exists": true } })
            .await
            .unwrap(),
        1001
    );
    two.ctx.shutdown().await;
}

/// Two batches of a first snapshot into `orders` (stagesync's indexes on staging): the second
/// after the first (`first_done`) or beside it (`Turn::beside`).
struct TwoBlindBatches {
    ctx: stagesync::context::Context,
    pipeline: stagesync::pipeline::Pipeline,
    staging: mongodb::Collection<Document>,
    first: stagesync::pipeline::Turn,
    second: stagesync::pipeline::Turn,
    first_done: tokio::sync::watch::Sender<bool>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl TwoBlindBatches {
    async fn start(pair: &Pair) -> TwoBlindBatches {
        use stagesync::pipeline::Turn;
        let (_, config) = pair.config("", ORDERS);
        let ctx = stagesync::context::Context::connect(config.clone())
            .await
            .unwrap();
        let pipeline = stagesync::pipeline::Pipeline::new(&ctx, &config.collections[0]);
        let db = pair.staging().await;
        stagesync::apply::ensure_indexes(&db, "orders", &pipeline.rules)
            .await
            .unwrap();
        let staging = db.collection::<Document>("orders");
        let indexes = Arc::new(stagesync::apply::unique_indexes(&staging).await);
        let (first_done, done) = tokio::sync::watch::channel(false);
        let (first, says) = Turn::now().beside(indexes.clone(), None);
        let (second, _) = Turn::after(done).beside(indexes, Some(says));
        TwoBlindBatches {
            ctx,
            pipeline,
            staging,
            first,
            second,
            first_done,
            shutdown: tokio_util::sync::CancellationToken::new(),
        }
    }

    async fn write(
        &self,
        batch: &[Change],
        turn: &stagesync::pipeline::Turn,
    ) -> stagesync::error::Result<Option<stagesync::pipeline::BatchReport>> {
        copy_blind(&self.pipeline, batch, turn, &self.shutdown).await
    }
}

/// Writes a batch of a first snapshot's copies (nothing looked up first).
async fn copy_blind(
    pipeline: &stagesync::pipeline::Pipeline,
    batch: &[Change],
    turn: &stagesync::pipeline::Turn,
    shutdown: &tokio_util::sync::CancellationToken,
) -> stagesync::error::Result<Option<stagesync::pipeline::BatchReport>> {
    use stagesync::pipeline::{Origin, Overlap};
    pipeline
        .apply_with_retry(
            batch,
            Origin::Snapshot,
            stagesync::plan::Novelty::Everything,
            Overlap::none(),
            turn,
            shutdown,
        )
        .await
}

/// A snapshot's copy of one document; each batch is stamped with the production time it was
/// read at.
fn copy(id: i32, email: &str, read_at: u32) -> Change {
    let d = doc! { "_id": id, "userEmail": email, "accountId": 1 };
    let read_time = Timestamp {
        time: read_at,
        increment: 1,
    };
    Change::from_snapshot(d, read_time, mongodb::bson::DateTime::now()).unwrap()
}

/// Blind batches written two at a time, as a first snapshot writes them (`Turn::beside`), after
/// random delays that let either overtake the other, end where the same batches written one
/// after the other end: production's business keys repeat across neighbouring batches (the
/// later copy of a key must collide, whichever staging takes first), and staging-only documents
/// hold keys and a production `_id` to be adopted or avoided.
#[tokio::test]
async fn blind_batches_written_beside_each_other_end_where_writing_them_in_turn_does() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use stagesync::pipeline::{Pipeline, Turn};
    let pair = Pair::start();
    for round in 0..5u64 {
        let mut rng = StdRng::seed_from_u64(round);
        let mut batches: Vec<Vec<Change>> = Vec::new();
        let mut next_id = 0;
        while next_id < 500 {
            // Large batches next to tiny ones: a tiny one is the likeliest to overtake.
            let size = if rng.random_bool(0.5) {
                rng.random_range(1..4)
            } else {
                rng.random_range(60..200)
            }
            .min(500 - next_id);
            let read_at = 100 + batches.len() as u32;
            // Often a key the batch before ends with: where the race is closest.
            let last_key = batches
                .last()
                .and_then(|b| b.last())
                .and_then(|c| c.doc.as_ref())
                .map(|d| d.get_str("userEmail").unwrap().to_string());
            let key = |rng: &mut StdRng| match &last_key {
                Some(k) if rng.random_bool(0.3) => k.clone(),
                _ => format!("u{}@x.org", rng.random_range(0..160)),
            };
            batches.push(
                (next_id..next_id + size)
                    .map(|i| copy(i, &key(&mut rng), read_at))
                    .collect(),
            );
            next_id += size;
        }
        let delays: Vec<u64> = batches.iter().map(|_| rng.random_range(0..6)).collect();
        // Each way into a staging database of its own.
        let copy_into = |way: &'static str| {
            let (pair, batches, delays) = (&pair, &batches, &delays);
            async move {
                let (path, staging_db, meta_db) =
                    pair.config_into(&format!("{way}{round}"), "", ORDERS);
                let config = Arc::new(stagesync::config::Config::load(&path).unwrap());
                let ctx = stagesync::context::Context::connect(config.clone())
                    .await
                    .unwrap();
                let pipeline = Pipeline::new(&ctx, &config.collections[0]);
                let client = common::client(&pair.staging_uri).await;
                let db = client.database(&staging_db);
                stagesync::apply::ensure_indexes(&db, "orders", &pipeline.rules)
                    .await
                    .unwrap();
                let staging = db.collection::<Document>("orders");
                let mut seed: Vec<Document> = (0..12)
                    .map(|i| doc! { "_id": format!("qa-{i}"), "userEmail": format!("u{}@x.org", i * 13), "accountId": 1, "qa": i })
                    .collect();
                seed.push(doc! { "_id": 7, "userEmail": "tester@x.org", "accountId": 99 });
                staging.insert_many(seed).await.unwrap();
                let shutdown = tokio_util::sync::CancellationToken::new();
                if way == "in_turn" {
                    for batch in batches {
                        let report = copy_blind(&pipeline, batch, &Turn::now(), &shutdown).await;
                        assert!(matches!(report, Ok(Some(_))));
                    }
                } else {
                    // As `snapshot_collection` does: at most two batches at once, the later one
                    // after the earlier, or beside it.
                    let indexes = Arc::new(stagesync::apply::unique_indexes(&staging).await);
                    let mut before: Option<(
                        tokio::sync::watch::Receiver<bool>,
                        _,
                        tokio::task::JoinHandle<()>,
                    )> = None;
                    for (batch, &delay) in batches.iter().zip(delays) {
                        let (done_tx, done) = tokio::sync::watch::channel(false);
                        let (turn, says) = match &before {
                            Some((done, says, _)) => Turn::after(done.clone())
                                .beside(indexes.clone(), Some(Clone::clone(says))),
                            None => Turn::now().beside(indexes.clone(), None),
                        };
                        let (pipeline, batch, shutdown) =
                            (pipeline.clone(), batch.clone(), shutdown.clone());
                        let task = tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            let report = copy_blind(&pipeline, &batch, &turn, &shutdown).await;
                            assert!(matches!(report, Ok(Some(_))));
                            done_tx.send(true).unwrap();
                        });
                        if let Some((_, _, earlier)) = before.take() {
                            earlier.await.unwrap();
                        }
                        before = Some((done, says, task));
                    }
                    if let Some((_, _, last)) = before {
                        last.await.unwrap();
                    }
                }
                let mut rows: Vec<String> = all_docs(&staging)
                    .await
                    .into_iter()
                    .map(|mut d| {
                        if matches!(d.get("_id"), Some(Bson::ObjectId(_))) {
                            d.insert("_id", "new");
                        }
                        d.to_string()
                    })
                    .collect();
                rows.sort();
                let dead_letters = client
                    .database(&meta_db)
                    .collection::<Document>("dead_letters")
                    .count_documents(doc! {})
                    .await
                    .unwrap();
                ctx.shutdown().await;
                client.shutdown().await;
                (rows, dead_letters)
            }
        };
        let (beside, beside_dead) = copy_into("beside").await;
        let (in_turn, in_turn_dead) = copy_into("in_turn").await;
        assert!(
            in_turn_dead > 0,
            "round {round}: the keys repeat, some copies collide"
        );
        assert_eq!(
            beside_dead, in_turn_dead,
            "round {round}: the same copies are dead-lettered"
        );
        assert_eq!(beside.len(), in_turn.len(), "round {round}");
        for (b, t) in beside.iter().zip(&in_turn) {
            assert_eq!(b, t, "round {round}");
        }
    }
}
