//! Hostile inputs, the smaller ones: each is fixed or refused with a clear message — against
//! real servers and the real binary.
//!
//! - `write_concern = 0`, a negative number, an unknown tag or more nodes than staging has;
//! - a view or a time-series collection configured as a collection;
//! - `on_history_lost = "fail"`: the recovery hint first, the server's reason short;
//! - production field names containing a dot;
//! - business keys holding embedded documents, compared alike by the sync and `verify`;
//! - `check` on a staging collection whose duplicate keys would break the unique index;
//! - no panic while closing cursors at SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{all_docs, eventually, stagesync, text, Engine, Pair, RunProcess, ORDERS};
use mongodb::bson::{doc, Bson, Document};

fn write_config(pair: &Pair, name: &str, text: String) -> PathBuf {
    let path = pair.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `run` with `path` exits with `code` within a minute; returns its log.
fn run_exits(pair: &Pair, path: &Path, code: i32) -> String {
    let mut run = RunProcess::start(path, pair.dir.path(), &[]);
    let status = run
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("run did not exit: {}", run.log_text()));
    assert_eq!(status.code(), Some(code), "{}", run.log_text());
    run.log_text()
}

async fn seed(pair: &Pair, n: i32) {
    let prod = pair.prod().await.collection::<Document>("orders");
    for i in 0..n {
        prod.insert_one(doc! { "userEmail": format!("u{i}@x.org"), "accountId": i, "total": i })
            .await
            .unwrap();
    }
}

/// Nothing was written on the staging side: no collection in staging's database, and none
/// but the empty identity-marker collection in the metadata database.
async fn staging_untouched(pair: &Pair) {
    let staging = pair.staging().await.list_collection_names().await.unwrap();
    assert!(staging.is_empty(), "staging got {staging:?}");
    let meta = pair.meta().await;
    for name in meta.list_collection_names().await.unwrap() {
        assert_eq!(name, "instance", "the metadata database got {name}");
        assert!(all_docs(&meta.collection::<Document>(&name))
            .await
            .is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Write concern

#[tokio::test]
async fn write_concern_zero_or_negative_is_refused_when_the_config_is_loaded() {
    let pair = Pair::start();
    for (value, says) in [
        (
            "0",
            "sync.write_concern: 0 (unacknowledged writes) is not allowed: stagesync saves a \
             checkpoint only after staging acknowledged every write before it",
        ),
        (
            "-1",
            "sync.write_concern: expected a number of nodes such as 1, or a tag such as \"majority\", found -1",
        ),
    ] {
        let config_text = pair
            .config_text("", ORDERS)
            .replace("write_concern = 1", &format!("write_concern = {value}"));
        let path = write_config(&pair, &format!("wc{value}.toml"), config_text);
        for command in ["check", "run", "snapshot"] {
            let out = stagesync(&[command], &path);
            assert_eq!(out.status.code(), Some(2), "{command}: {}", text(&out));
            assert!(
                String::from_utf8_lossy(&out.stderr).contains(says),
                "{command}: {}",
                text(&out)
            );
        }
    }
    staging_untouched(&pair).await;
}

#[tokio::test]
async fn a_write_concern_staging_cannot_satisfy_fails_check_and_run_before_anything_is_copied() {
    let pair = Pair::start();
    seed(&pair, 3).await;
    for (value, reason) in [
        ("\"bogus\"", "No write concern mode named 'bogus'"),
        ("50", "UnsatisfiableWriteConcern"),
    ] {
        let config_text = pair
            .config_text("startup_timeout = \"20s\"", ORDERS)
            .replace("write_concern = 1", &format!("write_concern = {value}"));
        let path = write_config(&pair, "wc.toml", config_text);
        let says = format!("`sync.write_concern`: staging cannot satisfy write concern {value}: ");

        let check = stagesync(&["check"], &path);
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(2), "{}", text(&check));
        assert!(
            stdout.contains(&format!("write concern: REFUSED: {says}")),
            "{stdout}"
        );
        assert!(stdout.contains(reason), "{stdout}");

        let log = run_exits(&pair, &path, 2);
        assert!(log.contains(&says) && log.contains(reason), "{log}");
        let snapshot = stagesync(&["snapshot"], &path);
        assert_eq!(snapshot.status.code(), Some(2), "{}", text(&snapshot));
        staging_untouched(&pair).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Views and time-series collections

#[tokio::test]
async fn views_and_time_series_collections_are_refused_before_anything_is_written() {
    let pair = Pair::start();
    seed(&pair, 3).await;
    let prod = pair.prod().await;
    prod.run_command(doc! { "create": "orders_view", "viewOn": "orders", "pipeline": [] })
        .await
        .unwrap();
    prod.run_command(doc! { "create": "metrics", "timeseries": { "timeField": "t" } })
        .await
        .unwrap();
    prod.collection::<Document>("metrics")
        .insert_one(
            doc! { "t": mongodb::bson::DateTime::now(), "userEmail": "m@x.org", "accountId": 1 },
        )
        .await
        .unwrap();
    for (name, says) in [
        (
            "orders_view",
            "`collections[0].name`: production's \"orders_view\" is a view of \"orders\", not a \
             collection: a view has no change stream and no documents of its own, so it cannot be \
             synced. Sync the collection it reads from instead, and remove this entry",
        ),
        (
            "metrics",
            "`collections[0].name`: production's \"metrics\" is a time-series collection: stagesync \
             syncs regular collections only",
        ),
    ] {
        let collections = ORDERS.replace("name = \"orders\"", &format!("name = \"{name}\""));
        let path = write_config(
            &pair,
            &format!("{name}.toml"),
            pair.config_text("startup_timeout = \"20s\"", &collections),
        );
        let check = stagesync(&["check"], &path);
        assert_eq!(check.status.code(), Some(2), "{}", text(&check));
        assert!(
            String::from_utf8_lossy(&check.stdout).contains(&format!("collections: REFUSED: {says}")),
            "{}",
            text(&check)
        );
        let log = run_exits(&pair, &path, 2);
        assert!(log.contains(says), "{log}");
        assert!(!log.contains("panicked"), "{log}");
        for args in [&["snapshot"][..], &["dlq", "replay", "--all"][..]] {
            let out = stagesync(args, &path);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
            assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{}", text(&out));
        }
        staging_untouched(&pair).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Lost history, failing

#[tokio::test]
async fn lost_history_with_fail_says_how_to_recover_first_and_without_a_hex_dump() {
    let pair = Pair::start();
    let (path, config) = pair.config("on_history_lost = \"fail\"", ORDERS);
    Engine::start(config.clone()).await.stop().await.unwrap();
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    let mut cp = ctx.checkpoints.load("orders").await.unwrap().unwrap();
    cp.token = Some(Bson::Document(
        doc! { "_data": "8200000000000000002B0229296E04" },
    ));
    ctx.checkpoints.save("orders", &cp, None).await.unwrap();
    ctx.shutdown().await;

    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    let status = run.wait(Duration::from_secs(60)).expect("run gives up");
    assert_eq!(status.code(), Some(3), "{}", run.log_text());
    let log = run.log_text();
    let error = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {log}"));
    assert!(
        error.starts_with(
            "error: production no longer has the change history to resume `orders` from its \
             checkpoint. To recover: run `stagesync snapshot -c FILE --collection orders`"
        ),
        "the hint comes first: {error}"
    );
    let hint = error.find("To recover").unwrap();
    let detail = error
        .find("(Production said: ")
        .expect("the server's reason follows");
    assert!(hint < detail, "{error}");
    assert!(error.len() < 800, "{} characters: {error}", error.len());
    for dump in ["RawDocumentBuf", "server response", "Kind: "] {
        assert!(!error.contains(dump), "no {dump:?} in {error}");
    }
    // No long run of hex digits anywhere in the line.
    let longest_hex = error
        .split(|c: char| !c.is_ascii_hexdigit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest_hex < 40, "a hex dump in {error}");
}

// ---------------------------------------------------------------------------------------------
// Field names containing a dot

/// Sets the production field literally named `name` with `$setField` (update pipeline).
async fn set_literal_field(
    coll: &mongodb::Collection<Document>,
    filter: Document,
    name: &str,
    value: Bson,
) {
    coll.update_one(
        filter,
        vec![doc! { "$replaceWith": { "$setField": {
            "field": { "$literal": name }, "input": "$$ROOT", "value": { "$literal": value },
        } } }],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_top_level_field_named_with_a_dot_stays_one_field_in_staging() {
    let pair = Pair::start();
    let (path, config) = pair.config("", ORDERS);
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let key = doc! { "userEmail": "dot@x.org", "accountId": 1 };
    prod.insert_one(doc! { "userEmail": "dot@x.org", "accountId": 1, "total": 1 })
        .await
        .unwrap();
    common::staging_doc_where(&staging, key.clone(), "synced", |_| true).await;

    set_literal_field(&prod, key.clone(), "c.d", Bson::Int32(5)).await;
    let synced = common::staging_doc_where(&staging, key.clone(), "given \"c.d\"", |d| {
        d.get_i32("c.d") == Ok(5)
    })
    .await;
    assert!(
        !synced.contains_key("c"),
        "nested instead of literal: {synced}"
    );

    // Changed again, then removed: still the one literal field.
    set_literal_field(&prod, key.clone(), "c.d", Bson::String("six".into())).await;
    common::staging_doc_where(&staging, key.clone(), "updated", |d| {
        d.get_str("c.d") == Ok("six") && !d.contains_key("c")
    })
    .await;
    prod.update_one(
        key.clone(),
        vec![doc! { "$replaceWith": { "$setField": {
            "field": { "$literal": "c.d" }, "input": "$$ROOT", "value": "$$REMOVE",
        } } }],
    )
    .await
    .unwrap();
    common::staging_doc_where(&staging, key.clone(), "without \"c.d\"", |d| {
        !d.contains_key("c.d") && !d.contains_key("c")
    })
    .await;
    engine.stop().await.unwrap();

    let verify = stagesync(&["verify"], &path);
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify));
}

#[tokio::test]
async fn a_field_named_with_a_dot_inside_an_embedded_document_stays_one_field() {
    // A change of `profile["c.d"]` must not become the update path "profile.c.d", which
    // MongoDB reads as profile → c → d: `diff` sets such a sub-document whole (top-level
    // names are disambiguated after planning, see `apply::LiteralNames`).
    let pair = Pair::start();
    let (path, config) = pair.config("", ORDERS);
    let engine = Engine::start(config).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    let key = doc! { "userEmail": "nested@x.org", "accountId": 1 };
    prod.insert_one(doc! { "userEmail": "nested@x.org", "accountId": 1, "profile": { "a": 1 } })
        .await
        .unwrap();
    common::staging_doc_where(&staging, key.clone(), "synced", |_| true).await;
    prod.update_one(
        key.clone(),
        vec![doc! { "$set": { "profile": { "$setField": {
            "field": { "$literal": "c.d" }, "input": "$profile", "value": 5,
        } } } }],
    )
    .await
    .unwrap();
    common::staging_doc_where(&staging, key.clone(), "given profile[\"c.d\"]", |d| {
        d.get_document("profile")
            .is_ok_and(|p| p.get_i32("c.d") == Ok(5) && !p.contains_key("c"))
    })
    .await;
    engine.stop().await.unwrap();
    let verify = stagesync(&["verify"], &path);
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify));
}

// ---------------------------------------------------------------------------------------------
// Business keys holding embedded documents

const KEYED: &str = r#"
[[collections]]
name = "orders"
business_key = ["key"]
"#;

#[tokio::test]
async fn verify_compares_embedded_business_keys_as_the_sync_does() {
    let pair = Pair::start();
    let (path, config) = pair.config("", KEYED);
    let engine = Engine::start(config.clone()).await;
    let prod = pair.prod().await.collection::<Document>("orders");
    // The same fields in another order: two keys for the sync (as for MongoDB's comparison and
    // its unique index), so two staging documents.
    prod.insert_one(doc! { "key": { "a": 1, "b": 2 }, "total": 1 })
        .await
        .unwrap();
    prod.insert_one(doc! { "key": { "b": 2, "a": 1 }, "total": 2 })
        .await
        .unwrap();
    let staging = pair.staging().await.collection::<Document>("orders");
    eventually(
        "both documents in staging",
        Duration::from_secs(30),
        || async {
            staging
                .count_documents(doc! { "_sync": { "$exists": true } })
                .await
                .unwrap()
                == 2
        },
    )
    .await;
    engine.stop().await.unwrap();
    let verify = stagesync(&["verify", "--json"], &path);
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify));
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(report["in_sync"], true, "{report}");
    assert_eq!(
        report["collections"][0]["duplicate_keys"],
        serde_json::json!([])
    );

    // Real duplicates are still found, compared the same way.
    let loose = pair.staging().await.collection::<Document>("loose");
    for k in [
        doc! { "a": 1, "b": 2 },
        doc! { "b": 2, "a": 1 },
        doc! { "a": 1, "b": 2 },
    ] {
        loose.insert_one(doc! { "key": k }).await.unwrap();
    }
    let rules = stagesync::plan::Rules::new(&config.sync, &config.collections[0]);
    let dups =
        stagesync::verify::duplicate_keys(&loose, &rules, stagesync::verify::KeyEquality::Sync)
            .await
            .unwrap();
    assert_eq!(dups.len(), 1, "{dups:?}");
    assert_eq!(dups[0].documents, 2);
}

// ---------------------------------------------------------------------------------------------
// `check` and duplicate business keys already in staging

#[tokio::test]
async fn check_fails_on_duplicate_business_keys_that_would_break_the_unique_index() {
    let pair = Pair::start();
    let (path, _) = pair.config("", ORDERS);
    let staging = pair.staging().await.collection::<Document>("orders");
    for qa in ["first", "second"] {
        staging
            .insert_one(doc! { "userEmail": "twice@x.org", "accountId": 7, "qa": qa })
            .await
            .unwrap();
    }
    // 1 and 1.0 are one key to a unique index.
    staging
        .insert_one(doc! { "userEmail": "num@x.org", "accountId": 1 })
        .await
        .unwrap();
    staging
        .insert_one(doc! { "userEmail": "num@x.org", "accountId": 1.0 })
        .await
        .unwrap();
    staging
        .insert_one(doc! { "userEmail": "once@x.org", "accountId": 8 })
        .await
        .unwrap();
    let check = stagesync(&["check"], &path);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        stdout.contains(
            "staging.orders: FAILED: 2 business key(s) are held by more than one document"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("userEmail=twice@x.org, accountId=7 (2 documents)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cannot create the unique index stagesync_business_key"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stagesync verify -c") && stdout.contains("--collection orders"),
        "{stdout}"
    );
    assert!(stdout.contains("check FAILED"), "{stdout}");
    // And `run` indeed cannot start there.
    let log = run_exits(&pair, &path, 3);
    assert!(log.contains("same business key"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// SIGTERM and cursors

#[tokio::test]
async fn stopping_never_panics_while_the_driver_closes_cursors() {
    let pair = Pair::start();
    let collections: String = (0..4)
        .map(|i| format!("[[collections]]\nname = \"c{i}\"\nbusiness_key = [\"k\"]\n"))
        .collect();
    let (path, _) = pair.config("", &collections);
    let prod = pair.prod().await;
    for i in 0..4 {
        let docs: Vec<Document> = (0..300).map(|k| doc! { "k": k, "v": i }).collect();
        prod.collection::<Document>(&format!("c{i}"))
            .insert_many(docs)
            .await
            .unwrap();
    }
    let panic_log = pair.dir.path().join("panics.log");
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_stagesync"))
            .args(args)
            .arg("-c")
            .arg(&path)
            .env("STAGESYNC_PANIC_LOG", &panic_log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    for round in 0..4 {
        // `run` with four change streams open (and, the first time, four snapshots), stopped.
        let port = stagesync_testkit::free_port().unwrap();
        let child = spawn(&["run", "--metrics-addr", &format!("127.0.0.1:{port}")]);
        eventually(
            "every stream to be ready",
            Duration::from_secs(60),
            || async {
                tokio::task::spawn_blocking(move || common::http(port, "GET", "/readyz"))
                    .await
                    .unwrap()
                    .is_some_and(|(status, _)| status == 200)
            },
        )
        .await;
        // Changes in flight while stopping.
        for i in 0..4 {
            prod.collection::<Document>(&format!("c{i}"))
                .insert_one(doc! { "k": 1000 + round, "v": i })
                .await
                .unwrap();
        }
        common::signal(child.id(), "TERM");
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "round {round}: {stderr}");
        assert!(!stderr.contains("panicked"), "round {round}: {stderr}");
        // `check` opens (and drops) a change stream per collection.
        let out = spawn(&["check"]).wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
    // A snapshot stopped part-way (its reader holds a production cursor).
    let child = spawn(&["snapshot"]);
    common::signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    let panics = std::fs::read_to_string(&panic_log).unwrap_or_default();
    assert!(panics.is_empty(), "panics recorded: {panics}");
}
