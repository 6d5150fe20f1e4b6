//! The continuous-sync rules, one test each, against real servers and the real engine.

mod common;

use std::time::Duration;

use common::{
    all_docs, eventually, find_by, orders_checkpoint, staging_doc_where, wait_until_streaming,
    Engine, Pair, ORDERS,
};
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::Collection;

fn key(email: &str, account: i32) -> Document {
    doc! { "userEmail": email, "accountId": account }
}

/// Changes of new documents written without a look-up that went down the slow path after all
/// (`stagesync_insert_fallbacks_total` of `orders`).
fn insert_fallbacks(engine: &Engine) -> u64 {
    engine
        .ctx
        .metrics
        .insert_fallbacks
        .with_label_values(&["orders"])
        .get()
}

#[tokio::test]
async fn insert_adopts_the_staging_document_with_the_same_business_key() {
    let pair = Pair::start();
    let staging = pair.staging().await.collection::<Document>("orders");
    // Staging already has this key under its own _id, with staging-only fields, soft-deleted.
    staging
        .insert_one(doc! { "_id": "staging-1", "userEmail": "ann@x.org", "accountId": 1, "qaNote": "keep me", "total": 5, "deleted": true, "deletedAt": DateTime::now() })
        .await
        .unwrap();
    let (_, config) = pair.config("", ORDERS);
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    prod.insert_one(doc! { "userEmail": "ann@x.org", "accountId": 1, "total": 42 })
        .await
        .unwrap();
    prod.insert_one(doc! { "userEmail": "bob@x.org", "accountId": 2, "total": 7 })
        .await
        .unwrap();

    let adopted = staging_doc_where(&staging, key("ann@x.org", 1), "adopted", |d| {
        d.get_i32("total") == Ok(42)
    })
    .await;
    assert_eq!(
        adopted.get_str("_id").unwrap(),
        "staging-1",
        "staging keeps its own _id"
    );
    assert_eq!(
        adopted.get_str("qaNote").unwrap(),
        "keep me",
        "staging-only fields are kept"
    );
    assert!(
        !adopted.contains_key("deleted") && !adopted.contains_key("deletedAt"),
        "adoption revives: {adopted}"
    );
    let meta = adopted.get_document("_sync").unwrap();
    let prod_doc = prod.find_one(key("ann@x.org", 1)).await.unwrap().unwrap();
    assert_eq!(
        meta.get("id"),
        prod_doc.get("_id"),
        "metadata records the production _id"
    );
    assert!(meta.get_timestamp("ts").is_ok());
    let fields: Vec<&str> = meta
        .get_array("fields")
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert_eq!(fields, vec!["userEmail", "accountId", "total"]);

    let created = staging_doc_where(&staging, key("bob@x.org", 2), "inserted", |d| {
        d.get_i32("total") == Ok(7)
    })
    .await;
    // A new document carries its production `_id` (`new_document_id = "production"`, the
    // default); only the adopted one keeps a staging `_id`.
    assert_eq!(
        created.get("_id"),
        prod.find_one(key("bob@x.org", 2))
            .await
            .unwrap()
            .unwrap()
            .get("_id")
    );
    assert_eq!(all_docs(&staging).await.len(), 2);
    // Both inserts were written without a look-up; staging's unique key index refused the one
    // whose key it already held, which then went down the slow path and adopted.
    assert_eq!(
        insert_fallbacks(&engine),
        1,
        "one insert fell back to looking staging up"
    );
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn update_takes_production_values_removes_unset_fields_and_keeps_staging_fields() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    prod.insert_one(doc! { "_id": 1, "userEmail": "ann@x.org", "accountId": 1, "total": 1, "coupon": "X", "qa": "prod-qa", "experiments": { "a": 1 } })
        .await
        .unwrap();
    staging_doc_where(&staging, key("ann@x.org", 1), "inserted", |d| {
        d.get_i32("total") == Ok(1)
    })
    .await;
    // Staging-side edits: a staging-only field, a preserved field, a preserved sub-field, and an
    // edit of a production-owned field (production wins).
    staging
        .update_one(key("ann@x.org", 1), doc! { "$set": { "qaNote": "n", "qa": "staging-qa", "experiments.flag": true, "total": 999 } })
        .await
        .unwrap();
    prod.update_one(
        doc! { "_id": 1 },
        doc! { "$set": { "total": 2 }, "$unset": { "coupon": "" } },
    )
    .await
    .unwrap();
    let d = staging_doc_where(&staging, key("ann@x.org", 1), "updated", |d| {
        d.get_i32("total") == Ok(2)
    })
    .await;
    assert!(
        !d.contains_key("coupon"),
        "a field production removed is removed: {d}"
    );
    assert_eq!(d.get_str("qaNote").unwrap(), "n");
    assert_eq!(
        d.get_str("qa").unwrap(),
        "staging-qa",
        "preserved fields stay staging's"
    );
    assert_eq!(
        d.get_document("experiments").unwrap(),
        &doc! { "flag": true },
        "experiments.* is staging-owned"
    );

    // A business-key change moves the same staging document to the new key.
    let id_before = d.get("_id").cloned();
    prod.update_one(
        doc! { "_id": 1 },
        doc! { "$set": { "userEmail": "ann@new.org" } },
    )
    .await
    .unwrap();
    let moved = staging_doc_where(&staging, key("ann@new.org", 1), "re-keyed", |_| true).await;
    assert_eq!(moved.get("_id").cloned(), id_before);
    assert_eq!(moved.get_str("qaNote").unwrap(), "n");
    assert!(find_by(&staging, key("ann@x.org", 1)).await.is_empty());

    // A replace drops every field it does not have, except preserved and staging-only ones.
    prod.replace_one(
        doc! { "_id": 1 },
        doc! { "userEmail": "ann@new.org", "accountId": 1, "status": "shipped" },
    )
    .await
    .unwrap();
    let replaced = staging_doc_where(&staging, key("ann@new.org", 1), "replaced", |d| {
        d.get_str("status") == Ok("shipped")
    })
    .await;
    assert!(!replaced.contains_key("total"), "{replaced}");
    assert_eq!(replaced.get_str("qaNote").unwrap(), "n");
    assert_eq!(replaced.get_str("qa").unwrap(), "staging-qa");
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn delete_soft_deletes_and_a_later_insert_revives() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    prod.insert_one(doc! { "_id": 1, "userEmail": "ann@x.org", "accountId": 1, "total": 1 })
        .await
        .unwrap();
    staging_doc_where(&staging, key("ann@x.org", 1), "inserted", |_| true).await;
    staging
        .update_one(key("ann@x.org", 1), doc! { "$set": { "qaNote": "n" } })
        .await
        .unwrap();
    let before_delete = DateTime::now();
    prod.delete_one(doc! { "_id": 1 }).await.unwrap();
    let d = staging_doc_where(&staging, key("ann@x.org", 1), "soft-deleted", |d| {
        d.get_bool("deleted") == Ok(true)
    })
    .await;
    let deleted_at = d.get_datetime("deletedAt").expect("deletedAt is a date");
    assert!(deleted_at.timestamp_millis() >= before_delete.timestamp_millis() - 5_000);
    assert_eq!(d.get_i32("total").unwrap(), 1, "nothing else is touched");
    assert_eq!(d.get_str("qaNote").unwrap(), "n");

    prod.insert_one(doc! { "_id": 2, "userEmail": "ann@x.org", "accountId": 1, "total": 3 })
        .await
        .unwrap();
    let revived = staging_doc_where(&staging, key("ann@x.org", 1), "revived", |d| {
        d.get_i32("total") == Ok(3)
    })
    .await;
    assert!(!revived.contains_key("deleted") && !revived.contains_key("deletedAt"));
    assert_eq!(revived.get_str("qaNote").unwrap(), "n");
    assert_eq!(
        revived.get_document("_sync").unwrap().get("id"),
        Some(&Bson::Int32(2))
    );
    assert_eq!(all_docs(&staging).await.len(), 1);
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn hard_and_ignored_deletes() {
    let pair = Pair::start();
    let collections = r#"
[[collections]]
name = "hard"
business_key = ["k"]
deletes = "hard"
[[collections]]
name = "kept"
business_key = ["k"]
deletes = "ignore"
"#;
    let (_, config) = pair.config("", collections);
    let engine = Engine::start(config).await;
    let prod = pair.prod().await;
    let staging = pair.staging().await;
    for name in ["hard", "kept"] {
        prod.collection::<Document>(name)
            .insert_one(doc! { "_id": 1, "k": "a" })
            .await
            .unwrap();
        staging_doc_where(
            &staging.collection(name),
            doc! { "k": "a" },
            "inserted",
            |_| true,
        )
        .await;
        prod.collection::<Document>(name)
            .delete_one(doc! { "_id": 1 })
            .await
            .unwrap();
    }
    let hard = staging.collection::<Document>("hard");
    eventually("the hard delete", Duration::from_secs(20), || async {
        all_docs(&hard).await.is_empty()
    })
    .await;
    // The ignored delete went through the stream before this marker insert was applied.
    prod.collection::<Document>("kept")
        .insert_one(doc! { "_id": 2, "k": "marker" })
        .await
        .unwrap();
    let kept = staging.collection::<Document>("kept");
    staging_doc_where(&kept, doc! { "k": "marker" }, "inserted", |_| true).await;
    let a = find_by(&kept, doc! { "k": "a" }).await;
    assert_eq!(a.len(), 1);
    assert!(
        !a[0].contains_key("deleted"),
        "deletes = ignore leaves the document as it was"
    );
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn last_write_wins_keeps_a_newer_staging_edit() {
    let pair = Pair::start();
    let (_, config) = pair.config(
        "conflict = \"last-write-wins\"\nstaging_updated_field = \"updatedAt\"",
        ORDERS,
    );
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    prod.insert_one(doc! { "_id": 1, "userEmail": "ann@x.org", "accountId": 1, "total": 1 })
        .await
        .unwrap();
    staging_doc_where(&staging, key("ann@x.org", 1), "inserted", |_| true).await;
    // A staging edit stamped in the future is newer than the next production change.
    let future = DateTime::from_millis(DateTime::now().timestamp_millis() + 3_600_000);
    staging
        .update_one(
            key("ann@x.org", 1),
            doc! { "$set": { "total": 100, "updatedAt": future } },
        )
        .await
        .unwrap();
    prod.update_one(doc! { "_id": 1 }, doc! { "$set": { "total": 2 } })
        .await
        .unwrap();
    eventually(
        "the conflict to be counted",
        Duration::from_secs(20),
        || async {
            engine
                .ctx
                .metrics
                .conflicts
                .with_label_values(&["orders"])
                .get()
                == 1
        },
    )
    .await;
    let d = find_by(&staging, key("ann@x.org", 1)).await.remove(0);
    assert_eq!(
        d.get_i32("total").unwrap(),
        100,
        "the newer staging edit is kept"
    );
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn key_collisions_and_schema_versions_ahead_fail_without_stopping_the_stream() {
    let pair = Pair::start();
    let orders =
        format!("{ORDERS}schema_version_field = \"schemaVersion\"\nmax_schema_version = 3\n");
    let (_, config) = pair.config("", &orders);
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    prod.insert_one(doc! { "_id": 1, "userEmail": "a@x.org", "accountId": 1 })
        .await
        .unwrap();
    prod.insert_one(doc! { "_id": 2, "userEmail": "b@x.org", "accountId": 1 })
        .await
        .unwrap();
    staging_doc_where(&staging, key("b@x.org", 1), "inserted", |_| true).await;
    // Production document 2 takes document 1's key (production has no unique index on it).
    prod.update_one(
        doc! { "_id": 2 },
        doc! { "$set": { "userEmail": "a@x.org", "v": 1 } },
    )
    .await
    .unwrap();
    prod.insert_one(doc! { "_id": 3, "userEmail": "c@x.org", "accountId": 1, "schemaVersion": 4 })
        .await
        .unwrap();
    prod.insert_one(doc! { "_id": 4, "userEmail": "d@x.org", "accountId": 1 })
        .await
        .unwrap();
    staging_doc_where(
        &staging,
        key("d@x.org", 1),
        "inserted after the poison changes",
        |_| true,
    )
    .await;

    let dead = pair.meta().await.collection::<Document>("dead_letters");
    eventually("two dead letters", Duration::from_secs(20), || async {
        all_docs(&dead).await.len() == 2
    })
    .await;
    let letters = all_docs(&dead).await;
    let reasons: Vec<&str> = letters
        .iter()
        .map(|d| d.get_document("error").unwrap().get_str("code").unwrap())
        .collect();
    assert!(reasons.contains(&"key_collision"), "{letters:?}");
    assert!(reasons.contains(&"schema_ahead"), "{letters:?}");
    let schema = letters
        .iter()
        .find(|d| d.get_document("error").unwrap().get_str("code") == Ok("schema_ahead"))
        .unwrap();
    assert_eq!(
        schema
            .get_document("error")
            .unwrap()
            .get_str("message")
            .unwrap(),
        "schema version 4 is ahead of staging's 3"
    );
    assert!(find_by(&staging, key("c@x.org", 1)).await.is_empty());
    // Staging keeps one document per key; the colliding change did not overwrite document 1.
    let a = find_by(&staging, key("a@x.org", 1)).await;
    assert_eq!(a.len(), 1);
    assert_eq!(
        a[0].get_document("_sync").unwrap().get("id"),
        Some(&Bson::Int32(1))
    );
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn unique_business_key_and_production_id_indexes_are_created() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let engine = Engine::start(config).await;
    let staging = pair.staging().await.collection::<Document>("orders");
    let indexes = staging.list_index_names().await.unwrap();
    assert!(
        indexes.contains(&"stagesync_business_key".to_string()),
        "{indexes:?}"
    );
    assert!(
        indexes.contains(&"stagesync_production_id".to_string()),
        "{indexes:?}"
    );
    let err = staging
        .insert_many(vec![
            doc! { "userEmail": "z@x.org", "accountId": 9 },
            doc! { "userEmail": "z@x.org", "accountId": 9 },
        ])
        .await;
    assert!(err.is_err(), "the business key index is unique");
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn dropping_the_production_collection_never_deletes_staging_data() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    prod.insert_one(doc! { "userEmail": "a@x.org", "accountId": 1 })
        .await
        .unwrap();
    staging_doc_where(&staging, key("a@x.org", 1), "inserted", |_| true).await;
    prod.drop().await.unwrap();
    eventually("the drop to be seen", Duration::from_secs(20), || async {
        engine
            .ctx
            .metrics
            .ddl_events
            .with_label_values(&["orders", "drop"])
            .get()
            >= 1
    })
    .await;
    // The stream goes on after the invalidate: a new collection of that name still syncs.
    prod.insert_one(doc! { "userEmail": "b@x.org", "accountId": 1 })
        .await
        .unwrap();
    staging_doc_where(
        &staging,
        key("b@x.org", 1),
        "inserted after the drop",
        |_| true,
    )
    .await;
    let a = find_by(&staging, key("a@x.org", 1)).await;
    assert_eq!(a.len(), 1, "staging data survives a production drop");
    assert!(!a[0].contains_key("deleted"));
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn replaying_the_stream_from_an_old_checkpoint_changes_nothing() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let engine = Engine::start(config.clone()).await;
    let first = engine
        .ctx
        .checkpoints
        .load("orders")
        .await
        .unwrap()
        .unwrap();
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    for i in 0..20 {
        prod.insert_one(
            doc! { "_id": i, "userEmail": format!("u{i}@x.org"), "accountId": i, "v": 0 },
        )
        .await
        .unwrap();
    }
    for i in 0..20 {
        prod.update_one(doc! { "_id": i }, doc! { "$set": { "v": 1 } })
            .await
            .unwrap();
        if i % 3 == 0 {
            prod.update_one(
                doc! { "_id": i },
                doc! { "$set": { "userEmail": format!("moved{i}@x.org") } },
            )
            .await
            .unwrap();
        }
        if i % 5 == 0 {
            prod.delete_one(doc! { "_id": i }).await.unwrap();
        }
    }
    prod.insert_one(doc! { "_id": "marker", "userEmail": "marker", "accountId": 0 })
        .await
        .unwrap();
    staging_doc_where(&staging, doc! { "userEmail": "marker" }, "synced", |_| true).await;
    engine.stop().await.unwrap();
    let before = all_docs(&staging).await;

    // Rewind the checkpoint to where the stream first opened, and run again.
    engine_ctx_save(&pair, &config, &first).await;
    let again = Engine::start(config).await;
    prod.insert_one(doc! { "_id": "marker2", "userEmail": "marker2", "accountId": 0 })
        .await
        .unwrap();
    staging_doc_where(&staging, doc! { "userEmail": "marker2" }, "synced", |_| {
        true
    })
    .await;
    let replayed_inserts = again
        .ctx
        .metrics
        .changes_skipped
        .with_label_values(&["orders", "insert", "stale"])
        .get();
    assert_eq!(
        replayed_inserts, 21,
        "the first run's inserts were read again and skipped as stale"
    );
    again.stop().await.unwrap();
    let mut after = all_docs(&staging).await;
    after.retain(|d| d.get_str("userEmail") != Ok("marker2"));
    assert_eq!(before, after, "a replayed stretch of the stream is a no-op");
}

async fn engine_ctx_save(
    pair: &Pair,
    config: &std::sync::Arc<stagesync::config::Config>,
    cp: &stagesync::checkpoint::Checkpoint,
) {
    let _ = pair;
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    ctx.checkpoints.save("orders", cp, None).await.unwrap();
}

/// With stagesync stopped after a clean stop: a staging-only document to adopt by key (`b`),
/// and two production inserts (`b`, `c`). Started again, it must write them without looking
/// them up: staging refuses the insert onto the held key, which then adopts through the slow
/// path (one insert fallback), and the other is inserted. Returns the running engine.
async fn started_after_inserts_while_stopped(
    config: &std::sync::Arc<stagesync::config::Config>,
    prod: &Collection<Document>,
    staging: &Collection<Document>,
) -> Engine {
    staging
        .insert_one(
            doc! { "_id": "qa-1", "userEmail": "b@x.org", "accountId": 2, "qaNote": "mine" },
        )
        .await
        .unwrap();
    prod.insert_one(doc! { "_id": 2, "userEmail": "b@x.org", "accountId": 2, "total": 5 })
        .await
        .unwrap();
    prod.insert_one(doc! { "_id": 3, "userEmail": "c@x.org", "accountId": 3 })
        .await
        .unwrap();
    let again = Engine::start(config.clone()).await;
    let adopted = staging_doc_where(staging, key("b@x.org", 2), "adopted", |d| {
        d.get_i32("total") == Ok(5)
    })
    .await;
    assert_eq!(adopted.get_str("_id").unwrap(), "qa-1");
    assert_eq!(adopted.get_str("qaNote").unwrap(), "mine");
    staging_doc_where(staging, key("c@x.org", 3), "inserted", |_| true).await;
    assert_eq!(
        insert_fallbacks(&again),
        1,
        "the inserts were written blind; the one onto a held key fell back and adopted"
    );
    again
}

#[tokio::test]
async fn a_clean_stop_saves_a_horizon_and_the_next_run_writes_new_documents_blind() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let engine = Engine::start(config.clone()).await;
    prod.insert_one(doc! { "_id": 1, "userEmail": "a@x.org", "accountId": 1 })
        .await
        .unwrap();
    staging_doc_where(&staging, key("a@x.org", 1), "synced", |_| true).await;
    engine.stop().await.unwrap();
    assert!(
        orders_checkpoint(&config)
            .await
            .is_some_and(|c| c.horizon.is_some()),
        "a run stopped between batches says where new changes start"
    );

    let again = started_after_inserts_while_stopped(&config, &prod, &staging).await;
    // The running stream's checkpoints carry no horizon (a crash now would leave changes
    // applied past them).
    eventually(
        "the opening checkpoint clears `horizon`",
        Duration::from_secs(30),
        || async {
            orders_checkpoint(&config)
                .await
                .is_some_and(|c| c.horizon.is_none())
        },
    )
    .await;
    assert_eq!(all_docs(&staging).await.len(), 3);
    again.stop().await.unwrap();
}

/// A run stopped right after its stream opened, before it saw any change (a deploy that
/// restarts at once, the bench's backlog set-up), still tells the next run where new changes
/// start: the horizon it started with.
#[tokio::test]
async fn a_run_stopped_before_it_saw_a_change_still_lets_the_next_run_write_new_documents_blind() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let engine = Engine::start(config.clone()).await;
    wait_until_streaming(&config).await;
    engine.stop().await.unwrap();
    assert!(
        orders_checkpoint(&config)
            .await
            .is_some_and(|c| c.horizon.is_some()),
        "a run stopped between batches says where new changes start, even having seen none"
    );

    let again = started_after_inserts_while_stopped(&config, &prod, &staging).await;
    assert_eq!(all_docs(&staging).await.len(), 2);
    again.stop().await.unwrap();
}

#[tokio::test]
async fn a_first_snapshot_writes_new_documents_blind_and_still_adopts_by_key() {
    let pair = Pair::start();
    let (_, config) = pair.config("", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    for i in 0..20 {
        prod.insert_one(
            doc! { "_id": i, "userEmail": format!("u{i}@x.org"), "accountId": i, "total": i },
        )
        .await
        .unwrap();
    }
    // Staging holds nothing from production yet, but a QA copy of order 3 (to adopt by its
    // business key) and a staging-only document under production's `_id` 7.
    staging
        .insert_one(
            doc! { "_id": "qa-3", "userEmail": "u3@x.org", "accountId": 3, "qaNote": "mine" },
        )
        .await
        .unwrap();
    let squatter = doc! { "_id": 7, "userEmail": "tester@x.org", "accountId": 99 };
    staging.insert_one(squatter.clone()).await.unwrap();

    // The first run copies production (initial_sync = "auto").
    let engine = Engine::start(config.clone()).await;
    let adopted = staging_doc_where(&staging, key("u3@x.org", 3), "adopted", |d| {
        d.get_i32("total") == Ok(3)
    })
    .await;
    assert_eq!(adopted.get_str("_id").unwrap(), "qa-3");
    assert_eq!(adopted.get_str("qaNote").unwrap(), "mine");
    let seven = staging_doc_where(&staging, key("u7@x.org", 7), "copied", |_| true).await;
    assert_ne!(seven.get("_id"), Some(&Bson::Int32(7)), "{seven}");
    assert_eq!(
        find_by(&staging, doc! { "_id": 7 }).await,
        vec![squatter],
        "the staging-only document keeps its `_id` and is not touched"
    );
    assert_eq!(
        find_by(&staging, doc! { "_sync.id": { "$exists": true } })
            .await
            .len(),
        20
    );
    assert_eq!(all_docs(&staging).await.len(), 21);
    // Every copy was written without a look-up; staging refused the two whose key or `_id` it
    // held, which then went down the slow path.
    assert_eq!(insert_fallbacks(&engine), 2);
    engine.stop().await.unwrap();
}

/// Stream batches written from a plan made while the batch before them was being written
/// (`stagesync_batches_planned_ahead_total` of `orders`).
fn planned_ahead(engine: &Engine) -> u64 {
    engine
        .ctx
        .metrics
        .planned_ahead
        .with_label_values(&["orders"])
        .get()
}

/// A backlog read in small batches, each updating and deleting documents the batch before it
/// inserted, with a staging-only field on a document updated throughout: batches are planned
/// while the one before them is written, against the state that one plans to leave, and
/// staging still ends where production does, merged.
#[tokio::test]
async fn a_backlog_planned_a_batch_ahead_ends_where_production_does() {
    let pair = Pair::start();
    let (_, config) = pair.config("batch_max_events = 10", ORDERS);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let engine = Engine::start(config.clone()).await;
    prod.insert_one(doc! { "userEmail": "kept@x.org", "accountId": 0, "n": 0 })
        .await
        .unwrap();
    staging_doc_where(&staging, key("kept@x.org", 0), "synced", |_| true).await;
    staging
        .update_one(key("kept@x.org", 0), doc! { "$set": { "qa": "mine" } })
        .await
        .unwrap();
    engine.stop().await.unwrap();

    // While stopped: 30 rounds of 10 inserts, then updates of the round before (one of them
    // moved to a new business key), a delete from it, and an update of the kept document.
    for round in 1..=30 {
        let docs: Vec<Document> = (0..10)
            .map(
                |i| doc! { "userEmail": format!("r{round}-{i}@x.org"), "accountId": round, "n": 0 },
            )
            .collect();
        prod.insert_many(docs).await.unwrap();
        let before = round - 1;
        if before > 0 {
            prod.update_many(doc! { "accountId": before }, doc! { "$inc": { "n": 1 } })
                .await
                .unwrap();
            prod.update_one(
                key(&format!("r{before}-1@x.org"), before),
                doc! { "$set": { "userEmail": format!("moved{before}@x.org") } },
            )
            .await
            .unwrap();
            prod.delete_one(key(&format!("r{before}-2@x.org"), before))
                .await
                .unwrap();
        }
        prod.update_one(key("kept@x.org", 0), doc! { "$set": { "n": round } })
            .await
            .unwrap();
    }

    let engine = Engine::start(config.clone()).await;
    staging_doc_where(&staging, key("kept@x.org", 0), "caught up", |d| {
        d.get_i32("n") == Ok(30)
    })
    .await;
    let expected = normalized_orders(&prod, &[]).await;
    eventually(
        "staging to hold production's documents, 29 soft-deleted",
        Duration::from_secs(60),
        || async {
            normalized_orders(&staging, &["qa", "deleted", "deletedAt"]).await == expected
                && find_by(&staging, doc! { "deleted": true }).await.len() == 29
        },
    )
    .await;
    let kept = find_by(&staging, key("kept@x.org", 0)).await;
    assert_eq!(kept[0].get_str("qa"), Ok("mine"), "{kept:?}");
    assert!(
        planned_ahead(&engine) > 0,
        "no batch of the backlog was planned while the one before it was written"
    );
    engine.stop().await.unwrap();
}

/// A collection's live documents as comparable strings: production's fields only (no `_id`,
/// no `_sync`, none of `staging_only`), soft-deleted staging documents left out.
async fn normalized_orders(coll: &Collection<Document>, staging_only: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = all_docs(coll)
        .await
        .into_iter()
        .filter(|d| !d.get_bool("deleted").unwrap_or(false))
        .map(|d| {
            let mut fields: Vec<String> = d
                .iter()
                .filter(|(k, _)| !["_id", "_sync"].contains(&k.as_str()))
                .filter(|(k, _)| !staging_only.contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            fields.sort();
            fields.join(";")
        })
        .collect();
    out.sort();
    out
}

/// An update whose `_sync.ts` guard holds (staging's copy is as new as the change: a replay, or
/// another writer got there first) or whose document is gone is no error, but staging is then
/// not as the plan said: the applier counts it, so the next batch is not written from a plan
/// made against this one's planned state.
#[tokio::test]
async fn an_update_whose_guard_holds_or_finds_nothing_is_counted_as_missed() {
    use mongodb::bson::Timestamp;
    use stagesync::apply::{Applier, LiteralNames, WriteResult};
    use stagesync::config::WriteConcernSetting;
    use stagesync::plan::{PlannedWrite, WriteOp};

    let pair = Pair::start();
    let db = pair.staging().await;
    let staging = db.collection::<Document>("orders");
    let ts = |time| Timestamp { time, increment: 0 };
    staging
        .insert_many([
            doc! { "_id": 1, "v": 1, "_sync": { "ts": ts(10) } },
            doc! { "_id": 2, "v": 1, "_sync": { "ts": ts(1) } },
        ])
        .await
        .unwrap();
    let applier = Applier::new(
        db.clone(),
        "orders",
        &WriteConcernSetting::Tag("majority".into()),
        4,
        None,
        "_sync",
    );
    // Documents 1 (newer than the change), 2 (older) and 3 (absent), each set to v = 2.
    let writes: Vec<PlannedWrite> = (1..=3)
        .map(|id| PlannedWrite {
            op: WriteOp::Update {
                id: Bson::Int32(id),
                set: doc! { "v": 2, "_sync.ts": ts(5) },
                unset: Document::new(),
            },
            changes: vec![0],
        })
        .collect();
    let encoded = applier
        .encode(&writes, &[Some(ts(5)); 3], &LiteralNames::default())
        .await;
    let sent = applier.send(&writes, encoded).await.unwrap();
    assert_eq!(sent.results, vec![WriteResult::Done; 3]);
    assert_eq!(sent.missed, 2, "the newer document and the absent one");
    let v = |d: Vec<Document>| d[0].get_i32("v").unwrap();
    assert_eq!(v(find_by(&staging, doc! { "_id": 1 }).await), 1);
    assert_eq!(v(find_by(&staging, doc! { "_id": 2 }).await), 2);
}
