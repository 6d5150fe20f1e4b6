//! Issue 16 — staging that behaves like production: new documents under their production `_id`
//! (`new_document_id`), subsets (`filter`) and references remapped to staging `_id`s
//! (`[collections.references]`) — against real servers.

mod common;

use std::process::Command;

use common::{all_docs, find_by, staging_doc_where, Engine, Pair};
use mongodb::bson::{doc, oid::ObjectId, Document};

/// `stagesync verify -c FILE [--json]`: (exit code, stdout).
fn verify(path: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(["verify", "--json", "-c"])
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "verify panicked: {stderr}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

const CUSTOMERS: &str = r#"
[[collections]]
name = "customers"
business_key = ["email"]
"#;

#[tokio::test]
async fn new_documents_carry_their_production_id_unless_a_staging_only_document_holds_it() {
    let pair = Pair::start();
    let (path, config) = pair.config("", CUSTOMERS);
    let prod = pair.prod().await.collection::<Document>("customers");
    let staging = pair.staging().await.collection::<Document>("customers");
    let (ann, bob, cat, dan) = (
        ObjectId::new(),
        ObjectId::new(),
        ObjectId::new(),
        ObjectId::new(),
    );
    prod.insert_many(vec![
        doc! { "_id": ann, "email": "ann@x.org", "name": "Ann" },
        doc! { "_id": bob, "email": "bob@x.org", "name": "Bob" },
        doc! { "_id": cat, "email": "cat@x.org", "name": "Cat" },
    ])
    .await
    .unwrap();
    // Staging: Ann exists under a staging `_id` (adopted by key); a staging-only document
    // happens to hold Bob's production `_id`, another one Dan's (who arrives later, live).
    let staging_ann = ObjectId::new();
    let squatters = vec![
        doc! { "_id": bob, "email": "qa-1@staging", "note": "staging only" },
        doc! { "_id": dan, "email": "qa-2@staging", "note": "staging only too" },
    ];
    staging
        .insert_one(doc! { "_id": staging_ann, "email": "ann@x.org", "qa": "keep" })
        .await
        .unwrap();
    staging.insert_many(squatters.clone()).await.unwrap();

    let engine = Engine::start(config).await; // snapshot, then the stream
    prod.insert_one(doc! { "_id": dan, "email": "dan@x.org", "name": "Dan" })
        .await
        .unwrap();
    let eli = ObjectId::new();
    prod.insert_one(doc! { "_id": eli, "email": "eli@x.org", "name": "Eli" })
        .await
        .unwrap();
    staging_doc_where(&staging, doc! { "email": "eli@x.org" }, "synced", |_| true).await;
    staging_doc_where(&staging, doc! { "email": "dan@x.org" }, "synced", |_| true).await;

    let by_email = |email: &'static str| {
        let staging = staging.clone();
        async move {
            find_by(&staging, doc! { "email": email })
                .await
                .pop()
                .unwrap()
        }
    };
    assert_eq!(
        by_email("ann@x.org").await.get_object_id("_id").unwrap(),
        staging_ann,
        "an adopted document keeps its staging _id"
    );
    assert_eq!(
        by_email("cat@x.org").await.get_object_id("_id").unwrap(),
        cat,
        "snapshot: production _id"
    );
    assert_eq!(
        by_email("eli@x.org").await.get_object_id("_id").unwrap(),
        eli,
        "stream: production _id"
    );
    for (email, taken) in [("bob@x.org", bob), ("dan@x.org", dan)] {
        let d = by_email(email).await;
        let id = d.get_object_id("_id").unwrap();
        assert_ne!(id, taken, "{email}: its production _id is taken in staging");
        assert_eq!(
            d.get_document("_sync")
                .unwrap()
                .get_object_id("id")
                .unwrap(),
            taken,
            "{email}: still recorded as coming from its production _id"
        );
    }
    for s in &squatters {
        let now = find_by(&staging, doc! { "_id": s.get("_id").unwrap() }).await;
        assert_eq!(now, vec![s.clone()], "staging-only documents are untouched");
    }
    let fresh = engine
        .ctx
        .metrics
        .fresh_ids
        .with_label_values(&["customers"])
        .get();
    assert_eq!(fresh, 2, "both fresh ids are counted");
    // An update of Bob finds his document by `_sync.id`, not the squatter.
    prod.update_one(doc! { "_id": bob }, doc! { "$set": { "name": "Robert" } })
        .await
        .unwrap();
    staging_doc_where(&staging, doc! { "email": "bob@x.org" }, "updated", |d| {
        d.get_str("name") == Ok("Robert")
    })
    .await;
    engine.stop().await.unwrap();
    for s in &squatters {
        let now = find_by(&staging, doc! { "_id": s.get("_id").unwrap() }).await;
        assert_eq!(now, vec![s.clone()], "staging-only documents are untouched");
    }
    let (code, out) = verify(&path);
    assert_eq!(code, 0, "verify: {out}");
}

const SUBSET: &str = r#"
[[collections]]
name = "orders"
business_key = ["code"]
filter = { region = "eu", amount = { "$gte" = 100 } }
"#;

fn in_subset(d: &Document) -> bool {
    d.get_str("region") == Ok("eu") && d.get_i32("amount").is_ok_and(|a| a >= 100)
}

#[tokio::test]
async fn a_filter_syncs_only_its_subset_and_follows_documents_in_and_out_of_it() {
    let pair = Pair::start();
    let (path, config) = pair.config("", SUBSET);
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let seed: Vec<Document> = (0..60)
        .map(|i| {
            let region = if i % 3 == 0 { "us" } else { "eu" };
            doc! { "_id": i, "code": format!("o{i}"), "region": region, "amount": (i % 4) * 50 }
        })
        .collect();
    let expected: Vec<i32> = seed
        .iter()
        .filter(|d| in_subset(d))
        .map(|d| d.get_i32("_id").unwrap())
        .collect();
    assert!(!expected.is_empty() && expected.len() < seed.len());
    prod.insert_many(seed).await.unwrap();

    let engine = Engine::start(config).await;
    let copied: Vec<i32> = all_docs(&staging)
        .await
        .iter()
        .map(|d| d.get_i32("_id").unwrap())
        .collect();
    assert_eq!(copied, expected, "the snapshot copies exactly the subset");

    // Live: an insert outside the subset, one inside; a document leaving the subset by an
    // update, one entering it, one leaving by a replace, one deleted.
    let leaving = expected[0];
    let leaving_by_replace = expected[1];
    let deleted = expected[2];
    let entering = 3; // "us"
    prod.insert_one(doc! { "_id": 1000, "code": "out", "region": "us", "amount": 500 })
        .await
        .unwrap();
    prod.insert_one(doc! { "_id": 1001, "code": "in", "region": "eu", "amount": 500 })
        .await
        .unwrap();
    prod.update_one(doc! { "_id": leaving }, doc! { "$set": { "region": "us" } })
        .await
        .unwrap();
    prod.update_one(
        doc! { "_id": entering },
        doc! { "$set": { "region": "eu", "amount": 150 } },
    )
    .await
    .unwrap();
    prod.replace_one(
        doc! { "_id": leaving_by_replace },
        doc! { "code": format!("o{leaving_by_replace}"), "region": "eu", "amount": 1 },
    )
    .await
    .unwrap();
    prod.delete_one(doc! { "_id": deleted }).await.unwrap();
    // Changes outside the subset: an update of a document that never was in it.
    prod.update_one(doc! { "_id": 1000 }, doc! { "$set": { "amount": 600 } })
        .await
        .unwrap();

    staging_doc_where(&staging, doc! { "code": "in" }, "inserted", |_| true).await;
    staging_doc_where(&staging, doc! { "_id": entering }, "inserted", |d| {
        d.get_i32("amount") == Ok(150)
    })
    .await;
    for id in [leaving, leaving_by_replace, deleted] {
        staging_doc_where(&staging, doc! { "_id": id }, "soft-deleted", |d| {
            d.get_bool("deleted") == Ok(true)
        })
        .await;
    }
    // Back into the subset: revived.
    prod.update_one(doc! { "_id": leaving }, doc! { "$set": { "region": "eu" } })
        .await
        .unwrap();
    staging_doc_where(&staging, doc! { "_id": leaving }, "revived", |d| {
        !d.contains_key("deleted") && d.get_str("region") == Ok("eu")
    })
    .await;
    // A marker after everything: once it is there, every change before it was applied.
    prod.insert_one(doc! { "_id": 2000, "code": "marker", "region": "eu", "amount": 100 })
        .await
        .unwrap();
    staging_doc_where(&staging, doc! { "code": "marker" }, "synced", |_| true).await;

    // Checked on the staging server: nothing that never was in the subset is there, and every
    // live document is in the subset.
    let staged = all_docs(&staging).await;
    assert!(
        find_by(&staging, doc! { "code": "out" }).await.is_empty(),
        "an insert outside the subset never reaches staging"
    );
    for d in &staged {
        let live = d.get_bool("deleted") != Ok(true);
        if live {
            assert!(
                in_subset(d),
                "a live staging document outside the subset: {d}"
            );
        }
    }
    let never_in: Vec<i32> = (0..60)
        .filter(|i| !expected.contains(i) && *i != entering)
        .collect();
    let strays = find_by(&staging, doc! { "_id": { "$in": never_in } }).await;
    assert!(
        strays.is_empty(),
        "documents outside the subset in staging: {strays:?}"
    );
    engine.stop().await.unwrap();

    let (code, out) = verify(&path);
    assert_eq!(code, 0, "verify reports the subset in sync: {out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let checked = report["collections"][0]["production_checked"]
        .as_u64()
        .unwrap();
    let subset_now = prod.find(doc! {}).await.unwrap();
    let subset_now: Vec<Document> = futures::TryStreamExt::try_collect(subset_now)
        .await
        .unwrap();
    let subset_now = subset_now.iter().filter(|d| in_subset(d)).count() as u64;
    assert_eq!(checked, subset_now, "verify compares only the subset");
}
