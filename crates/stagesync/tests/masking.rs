//! PII masking end to end: no raw value reaches staging, the metadata database or the logs;
//! masked business keys still match; the same key gives the same data in every run.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{client, eventually, find_by, staging_doc_where, Pair, RunProcess};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use stagesync::config::MaskingSettings;
use stagesync::transform::Masker;

const KEY: &str = "test-mask-key-0123456789abcdef";

const RAW_EMAIL: &str = "ann.rawlings@corp.example";
const RAW_STREET: &str = "221B Baker Street";
const RAW_STREET_2: &str = "742 Evergreen Terrace";
const RAW_CARD: &str = "4111111111111111";
const RAW_CARD_2: &str = "5500005555555559";
const RAW_PHONE: &str = "+44 20 7946 0958";
const RAW_NAME: &str = "Ann Rawlings";
const RAW_NOTE: &str = "secret note about ann";
const RAW_POISON: &str = "poison.person@corp.example";

fn raw_values() -> Vec<&'static str> {
    vec![
        RAW_EMAIL,
        RAW_STREET,
        RAW_STREET_2,
        RAW_CARD,
        RAW_CARD_2,
        RAW_PHONE,
        RAW_NAME,
        RAW_NOTE,
        RAW_POISON,
        "ann.rawlings",
        "Rawlings",
    ]
}

fn collections() -> String {
    r#"
[[collections]]
name = "users"
business_key = ["userEmail"]
schema_version_field = "schemaVersion"
max_schema_version = 1
[collections.mask]
userEmail = "email"
"shipping.street" = "redact"
"payments.*.cardNumber" = "hash"
phone = "phone"
fullName = "name"
notes = "remove"

[[collections]]
name = "orders"
business_key = ["userEmail", "orderNo"]
[collections.mask]
userEmail = "email"
"#
    .to_string()
}

fn masking(key: &str) -> String {
    format!("[masking]\nkey = \"{key}\"\n")
}

fn masked_email(raw: &str) -> Bson {
    let settings = MaskingSettings {
        key: KEY.into(),
        email_domain: "example.com".into(),
        redact_text: "[redacted]".into(),
    };
    let rules = BTreeMap::from([("userEmail".to_string(), "email".to_string())]);
    Masker::new(Some(&settings), &rules)
        .mask_value("userEmail", Bson::String(raw.into()))
        .unwrap()
}

/// Every document of every database on the staging server, as extended JSON text.
async fn dump_server(uri: &str) -> String {
    let c = client(uri).await;
    let mut out = String::new();
    for db in c.list_database_names().await.unwrap() {
        let d = c.database(&db);
        for coll in d.list_collection_names().await.unwrap() {
            let docs: Vec<Document> = d
                .collection(&coll)
                .find(doc! {})
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            for doc in docs {
                out.push_str(&Bson::Document(doc).into_relaxed_extjson().to_string());
                out.push('\n');
            }
        }
    }
    out
}

#[tokio::test]
async fn no_raw_value_reaches_staging_metadata_or_logs_and_masked_keys_match() {
    let pair = Pair::start();
    let (path, _config) = pair.config("", &format!("{}{}", masking(KEY), collections()));
    let prod = pair.prod().await;
    let users = prod.collection::<Document>("users");
    let orders = prod.collection::<Document>("orders");
    let staging = pair.staging().await;
    // Staging already has Ann under her masked email, with a QA note: a masked key must adopt it.
    staging
        .collection::<Document>("users")
        .insert_one(
            doc! { "_id": "stg-ann", "userEmail": masked_email(RAW_EMAIL), "qaNote": "keep" },
        )
        .await
        .unwrap();
    // Present before the sync starts: goes through the snapshot.
    users
        .insert_one(doc! {
            "_id": 1, "userEmail": RAW_EMAIL, "fullName": RAW_NAME, "phone": RAW_PHONE, "notes": RAW_NOTE,
            "shipping": { "street": RAW_STREET, "city": "London" },
            "payments": [{ "cardNumber": RAW_CARD, "exp": "12/30" }],
        })
        .await
        .unwrap();
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--log-level", "debug"]);
    let s_users = staging.collection::<Document>("users");
    let adopted = staging_doc_where(
        &s_users,
        doc! { "_id": "stg-ann" },
        "adopted by its masked key",
        |d| d.contains_key("_sync"),
    )
    .await;
    assert_eq!(adopted.get_str("qaNote").unwrap(), "keep");
    assert_eq!(adopted.get("userEmail"), Some(&masked_email(RAW_EMAIL)));
    assert_eq!(
        adopted
            .get_document("shipping")
            .unwrap()
            .get_str("street")
            .unwrap(),
        "[redacted]"
    );
    assert_eq!(
        adopted
            .get_document("shipping")
            .unwrap()
            .get_str("city")
            .unwrap(),
        "London"
    );
    assert!(!adopted.contains_key("notes"));

    // Live changes: updates of masked fields, a parent object set whole, an array element, and
    // an order for the same person in another collection.
    users
        .update_one(
            doc! { "_id": 1 },
            doc! { "$set": { "shipping.street": RAW_STREET_2, "phone": RAW_PHONE } },
        )
        .await
        .unwrap();
    users
        .update_one(
            doc! { "_id": 1 },
            doc! { "$set": { "shipping": { "street": RAW_STREET, "city": "Paris" } } },
        )
        .await
        .unwrap();
    users
        .update_one(
            doc! { "_id": 1 },
            doc! { "$set": { "payments.0.cardNumber": RAW_CARD_2, "notes": RAW_NOTE } },
        )
        .await
        .unwrap();
    orders
        .insert_one(doc! { "_id": 10, "userEmail": RAW_EMAIL, "orderNo": 1, "total": 5 })
        .await
        .unwrap();
    // A change that dead-letters (schema version ahead), carrying raw values.
    users.insert_one(doc! { "_id": 2, "userEmail": RAW_POISON, "fullName": RAW_NAME, "schemaVersion": 2, "notes": RAW_NOTE }).await.unwrap();
    users
        .insert_one(doc! { "_id": "marker", "userEmail": "marker@corp.example" })
        .await
        .unwrap();
    let meta = pair.meta().await.collection::<Document>("dead_letters");
    eventually(
        "the poison change in the dead-letter queue",
        Duration::from_secs(20),
        || async { meta.count_documents(doc! {}).await.unwrap() == 1 },
    )
    .await;
    staging_doc_where(&s_users, doc! { "_id": "stg-ann" }, "updated", |d| {
        d.get_document("shipping")
            .map(|s| s.get_str("city") == Ok("Paris"))
            .unwrap_or(false)
    })
    .await;
    staging_doc_where(
        &s_users,
        doc! { "userEmail": masked_email("marker@corp.example") },
        "synced",
        |_| true,
    )
    .await;
    let s_orders = staging.collection::<Document>("orders");
    let order = staging_doc_where(&s_orders, doc! { "orderNo": 1 }, "synced", |_| true).await;
    assert_eq!(
        order.get("userEmail"),
        Some(&masked_email(RAW_EMAIL)),
        "the same person masks the same in every collection"
    );

    let ann = find_by(&s_users, doc! { "_id": "stg-ann" }).await.remove(0);
    let card = ann.get_array("payments").unwrap()[0]
        .as_document()
        .unwrap()
        .get_str("cardNumber")
        .unwrap()
        .to_string();
    assert_eq!(card.len(), 64, "a keyed HMAC-SHA256 in hex");
    assert_eq!(
        count_docs(&s_users).await,
        2,
        "Ann (adopted) and the marker; the poison change was not applied"
    );

    let status = run.terminate(Duration::from_secs(10)).expect("stops");
    assert!(status.success());
    let dump = dump_server(&pair.staging_uri).await;
    let log = run.log_text();
    // `dlq show` and `verify` output too.
    let id = meta
        .find_one(doc! {})
        .await
        .unwrap()
        .unwrap()
        .get_object_id("_id")
        .unwrap()
        .to_hex();
    let shown = Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(["dlq", "show", &id, "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let verified = Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(["verify", "--json", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let outputs = format!(
        "{}{}",
        String::from_utf8_lossy(&shown.stdout),
        String::from_utf8_lossy(&verified.stdout)
    );
    assert!(
        dump.contains("[redacted]")
            && log.contains("schema_ahead")
            && outputs.contains("schema_ahead")
    );
    for raw in raw_values() {
        assert!(
            !dump.contains(raw),
            "raw value {raw:?} found on the staging server"
        );
        assert!(!log.contains(raw), "raw value {raw:?} found in the logs");
        assert!(
            !outputs.contains(raw),
            "raw value {raw:?} found in dlq show / verify output"
        );
    }
}

async fn count_docs(c: &mongodb::Collection<Document>) -> usize {
    c.count_documents(doc! {}).await.unwrap() as usize
}

#[tokio::test]
async fn the_same_key_gives_identical_staging_data_and_another_key_different_data() {
    let pair = Pair::start();
    let users = pair.prod().await.collection::<Document>("users");
    for i in 0..50 {
        users
            .insert_one(doc! { "_id": i, "userEmail": format!("person{i}@corp.example"), "fullName": format!("Person {i}"), "phone": format!("+1 555 01{i:02}"), "payments": [{ "cardNumber": format!("41111111111111{i:02}") }] })
            .await
            .unwrap();
    }
    // Three independent snapshot runs into three staging databases of the same server.
    let snapshot_into = |target: &str, key: &str| {
        let text = pair
            .config_text("", &format!("{}{}", masking(key), collections()))
            .replace(
                &format!("database = \"{}\"", pair.staging_db_name()),
                &format!("database = \"{target}\""),
            )
            .replace(
                &format!("metadata_database = \"{}\"", pair.meta_db_name()),
                &format!("metadata_database = \"{target}_meta\""),
            );
        let path = pair.dir.path().join(format!("{target}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_stagesync"))
            .args(["snapshot", "--collection", "users", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let tag = &pair.tag;
    snapshot_into(&format!("a_{tag}"), KEY);
    snapshot_into(&format!("b_{tag}"), KEY);
    snapshot_into(&format!("c_{tag}"), "a-completely-different-key-42");
    let staging = client(&pair.staging_uri).await;
    let read = |db: String| {
        let staging = staging.clone();
        async move {
            let docs: Vec<Document> = staging
                .database(&db)
                .collection::<Document>("users")
                .find(doc! {})
                .sort(doc! { "_sync.id": 1 })
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            docs.into_iter()
                .map(|mut d| {
                    d.remove("_id");
                    d.get_document_mut("_sync").unwrap().remove("ts");
                    d
                })
                .collect::<Vec<_>>()
        }
    };
    let a = read(format!("a_{tag}")).await;
    let b = read(format!("b_{tag}")).await;
    let c = read(format!("c_{tag}")).await;
    assert_eq!(a.len(), 50);
    assert_eq!(
        a, b,
        "two runs with the same key give identical masked data"
    );
    for (x, y) in a.iter().zip(&c) {
        for field in ["userEmail", "fullName", "phone"] {
            assert_ne!(
                x.get(field),
                y.get(field),
                "another key masks {field} differently"
            );
        }
    }
}

#[tokio::test]
async fn bad_masking_config_is_refused_with_exit_code_2() {
    let pair = Pair::start();
    let dir = pair.dir.path();
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let no_key = write("nokey.toml", pair.config_text("", &collections()));
    let out = Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(["check", "-c"])
        .arg(&no_key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("STAGESYNC_MASK_KEY"));
    let bad_rule = write(
        "badrule.toml",
        pair.config_text(
            "",
            &format!(
                "{}{}",
                masking(KEY),
                collections().replace("\"redact\"", "\"scramble\"")
            ),
        ),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(["run", "-c"])
        .arg(&bad_rule)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("scramble") && err.contains("shipping.street") && err.contains("badrule.toml"),
        "{err}"
    );
}

#[tokio::test]
async fn mask_preview_shows_shortened_raw_values_next_to_masked_ones() {
    let pair = Pair::start();
    let (path, _) = pair.config("", &format!("{}{}", masking(KEY), collections()));
    let users = pair.prod().await.collection::<Document>("users");
    users.insert_one(doc! { "userEmail": RAW_EMAIL, "fullName": RAW_NAME, "shipping": { "street": RAW_STREET } }).await.unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(["mask-preview", "--collection", "users", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"a…\"") && text.contains("[redacted]") && text.contains("@example.com"),
        "{text}"
    );
    for raw in raw_values() {
        assert!(
            !text.contains(raw),
            "raw value {raw:?} in mask-preview output"
        );
    }
}

#[tokio::test]
async fn a_new_masking_key_re_keys_staging_in_place_on_the_next_snapshot() {
    let pair = Pair::start();
    let users = pair.prod().await.collection::<Document>("users");
    for i in 0..20 {
        users
            .insert_one(doc! { "_id": i, "userEmail": format!("p{i}@corp.example") })
            .await
            .unwrap();
    }
    let snapshot_with = |key: &str| {
        let path = pair.dir.path().join("rekey.toml");
        std::fs::write(
            &path,
            pair.config_text("", &format!("{}{}", masking(key), collections())),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_stagesync"))
            .args(["snapshot", "--collection", "users", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    snapshot_with(KEY);
    let staging = pair.staging().await.collection::<Document>("users");
    staging
        .update_many(doc! {}, doc! { "$set": { "qaNote": "kept" } })
        .await
        .unwrap();
    let before: Vec<Document> = staging
        .find(doc! {})
        .sort(doc! { "_sync.id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    snapshot_with("a-brand-new-masking-key-0987654321");
    let after: Vec<Document> = staging
        .find(doc! {})
        .sort(doc! { "_sync.id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(after.len(), 20, "re-keyed in place: no new documents");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.get("_id"), b.get("_id"), "the same staging document");
        assert_ne!(
            a.get("userEmail"),
            b.get("userEmail"),
            "masked with the new key"
        );
        assert_eq!(a.get_str("qaNote").unwrap(), "kept");
        assert!(!a.contains_key("deleted"));
    }
}
