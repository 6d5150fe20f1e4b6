//! Operational truth, against real servers and the real binary: readiness that follows the
//! sync (a frozen staging or production makes `/readyz` fail and the checkpoint age grow),
//! metrics that grow between saves, no panic on any exit path, servers unreachable at start.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::{
    all_docs, eventually, http, metric_value, scrape, signal, stagesync, staging_doc_where, Pair,
    RedisServer, RunProcess, ORDERS,
};
use mongodb::bson::{doc, Document};

fn assert_no_panic(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{what} panicked: {stderr}");
}

/// Polls `/readyz` until its status is `want`; returns the body.
async fn readyz_becomes(port: u16, want: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let got = tokio::task::spawn_blocking(move || http(port, "GET", "/readyz"))
            .await
            .unwrap();
        if let Some((status, body)) = &got {
            if *status == want {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not answer {want} within {within:?}; last answer: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Freezes one server (SIGSTOP) while production takes writes, checks that readiness and the
/// checkpoint age say so, thaws it and checks that staging catches up with nothing lost.
async fn freeze_and_thaw(freeze_staging: bool) {
    let pair = Pair::start_local(&[]);
    let stall_after = 3;
    let (path, _) = pair.config(&format!("stall_after = \"{stall_after}s\""), ORDERS);
    let port = stagesync_testkit::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--metrics-addr", &addr]);
    readyz_becomes(port, 200, Duration::from_secs(60)).await;

    let prod = pair.prod().await.collection::<Document>("orders");
    let staging = pair.staging().await.collection::<Document>("orders");
    // Writes before and during the freeze (production frozen: only before).
    for i in 0..50 {
        prod.insert_one(doc! { "userEmail": format!("u{i}@x.org"), "accountId": i, "total": i })
            .await
            .unwrap();
    }
    let frozen = if freeze_staging {
        pair.staging_server.as_ref().unwrap().pid().unwrap()
    } else {
        pair.prod_server.as_ref().unwrap().pid().unwrap()
    };
    let writer = if freeze_staging {
        let prod = prod.clone();
        Some(tokio::spawn(async move {
            for i in 50..300 {
                prod.insert_one(
                    doc! { "userEmail": format!("u{i}@x.org"), "accountId": i, "total": i },
                )
                .await
                .unwrap();
            }
        }))
    } else {
        None
    };
    signal(frozen, "STOP");
    let frozen_at = Instant::now();
    let body = readyz_becomes(port, 503, Duration::from_secs(stall_after + 5)).await;
    let waited = frozen_at.elapsed();
    assert!(
        body.contains("\"orders\"") && body.contains("\"ready\":false"),
        "/readyz names the collection: {body}"
    );
    assert!(
        body.contains("no progress for") || body.contains("checkpoint not saved for"),
        "/readyz says why: {body}"
    );
    // The process itself is alive.
    assert_eq!(
        tokio::task::spawn_blocking(move || http(port, "GET", "/livez"))
            .await
            .unwrap()
            .map(|r| r.0),
        Some(200)
    );
    // The checkpoint age keeps growing past stall_after.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = scrape(port).await;
        let age = metric_value(
            &page,
            r#"stagesync_checkpoint_age_seconds{collection="orders"}"#,
        )
        .expect("the checkpoint age is exported");
        if age > stall_after as f64 {
            assert_eq!(metric_value(&page, "stagesync_ready"), Some(0.0), "{page}");
            break;
        }
        assert!(Instant::now() < deadline, "checkpoint age stayed at {age}s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal(frozen, "CONT");
    let thawed_at = Instant::now();
    readyz_becomes(port, 200, Duration::from_secs(10)).await;
    let recovered = thawed_at.elapsed();
    if let Some(w) = writer {
        w.await.unwrap();
    }
    let expected = if freeze_staging { 300 } else { 50 };
    eventually(
        "staging to hold every production document",
        Duration::from_secs(30),
        || async {
            staging
                .count_documents(doc! { "_sync": { "$exists": true } })
                .await
                .unwrap()
                == expected
        },
    )
    .await;
    let prod_docs = all_docs(&prod).await;
    for p in &prod_docs {
        let s = staging_doc_where(
            &staging,
            doc! { "userEmail": p.get_str("userEmail").unwrap() },
            "synced",
            |_| true,
        )
        .await;
        assert_eq!(s.get("total"), p.get("total"));
    }
    eprintln!(
        "freeze of {}: /readyz 503 after {waited:?}, 200 again {recovered:?} after SIGCONT",
        if freeze_staging {
            "staging"
        } else {
            "production"
        }
    );
    assert!(run.terminate(Duration::from_secs(10)).unwrap().success());
}

#[tokio::test]
async fn a_frozen_staging_makes_readyz_fail_and_recovers_with_nothing_lost() {
    freeze_and_thaw(true).await;
}

#[tokio::test]
async fn a_frozen_production_makes_readyz_fail_and_recovers_with_nothing_lost() {
    freeze_and_thaw(false).await;
}

#[tokio::test]
async fn checkpoint_age_grows_between_two_saves() {
    let pair = Pair::start();
    // Saves of an idle stream happen every checkpoint_interval: 4 s leaves room to scrape.
    let (path, config) = pair.config("", ORDERS);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "checkpoint_interval = \"200ms\"",
        "checkpoint_interval = \"4s\"",
    );
    std::fs::write(&path, text).unwrap();
    let port = stagesync_testkit::free_port().unwrap();
    let mut run = RunProcess::start(
        &path,
        pair.dir.path(),
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    readyz_becomes(port, 200, Duration::from_secs(60)).await;
    let ctx = stagesync::context::Context::connect(config).await.unwrap();
    let saved_at = || async {
        ctx.checkpoints
            .load("orders")
            .await
            .unwrap()
            .and_then(|c| c.saved_at)
    };
    let sample = r#"stagesync_checkpoint_age_seconds{collection="orders"}"#;
    // Two scrapes with no save in between (the stored checkpoint is the same before the
    // first and after the second): the age must have grown by the time that passed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "never saw two scrapes between saves"
        );
        let saved_before = saved_at().await;
        let first = metric_value(&scrape(port).await, sample).unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await; // the interval being measured
        let second = metric_value(&scrape(port).await, sample).unwrap();
        if saved_at().await != saved_before {
            continue; // a save happened in between: measure again
        }
        assert!(
            second >= first + 1.0,
            "the checkpoint age grew from {first}s to only {second}s over 1.2 s without a save"
        );
        break;
    }
    ctx.shutdown().await;
    assert!(run.terminate(Duration::from_secs(10)).unwrap().success());
}

#[tokio::test]
async fn every_subcommand_exits_without_a_panic() {
    let pair = Pair::start();
    let (path, _) = pair.config(
        "",
        &format!("{ORDERS}[collections.mask]\ntotal = \"hash\"\n[masking]\nkey = \"0123456789abcdef0123\"\n"),
    );
    let prod = pair.prod().await.collection::<Document>("orders");
    prod.insert_one(doc! { "userEmail": "a@x.org", "accountId": 1, "total": 5 })
        .await
        .unwrap();
    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    let staging = pair.staging().await.collection::<Document>("orders");
    staging_doc_where(&staging, doc! { "userEmail": "a@x.org" }, "synced", |_| {
        true
    })
    .await;
    let status = run.terminate(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!run.log_text().contains("panicked"), "{}", run.log_text());

    let cases: &[(&[&str], i32)] = &[
        (&["check"], 0),
        (&["snapshot"], 0),
        (&["verify"], 0),
        (&["verify", "--json"], 0),
        (&["status"], 0),
        (&["status", "--json"], 0),
        (&["dlq", "list"], 0),
        (&["dlq", "list", "--json"], 0),
        (&["dlq", "show", "0123456789abcdef01234567"], 1),
        (&["dlq", "replay", "--all"], 0),
        (&["dlq", "purge", "--all"], 0),
        (&["mask-preview", "--collection", "orders"], 0),
        (&["verify", "--collection", "nope"], 2),
    ];
    for (args, code) in cases {
        let out = stagesync(args, &path);
        assert_no_panic(&args.join(" "), &out);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // JSON output is clean JSON on stdout.
    let out = stagesync(&["verify", "--json"], &path);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["in_sync"], true);
}

#[tokio::test]
async fn servers_unreachable_at_start_are_retried_then_exit_3() {
    let pair = Pair::start();
    let closed = stagesync_testkit::free_port().unwrap();
    let dead_uri = format!("mongodb://127.0.0.1:{closed}/?directConnection=true");

    // MongoDB (staging) unreachable: not ready meanwhile, then exit 3 past startup_timeout.
    let text = pair
        .config_text("startup_timeout = \"4s\"", ORDERS)
        .replace(&pair.staging_uri, &dead_uri);
    let path = pair.dir.path().join("dead-staging.toml");
    std::fs::write(&path, text).unwrap();
    let port = stagesync_testkit::free_port().unwrap();
    let started = Instant::now();
    let mut run = RunProcess::start(
        &path,
        pair.dir.path(),
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let body = readyz_becomes(port, 503, Duration::from_secs(10)).await;
    assert!(body.contains("orders"), "{body}");
    let status = run.wait(Duration::from_secs(60)).expect("run gives up");
    assert_eq!(status.code(), Some(3), "{}", run.log_text());
    assert!(started.elapsed() >= Duration::from_secs(4));
    let log = run.log_text();
    assert!(
        log.contains("staging is not reachable") && log.contains("unreachable"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    // Redis unreachable: the same rule (it used to exit 2, as if the config were wrong).
    let text = pair.config_text(
        "startup_timeout = \"3s\"",
        &format!(
            "{ORDERS}[checkpoint]\nstore = \"redis\"\nurl = \"redis://127.0.0.1:{closed}/0\"\n"
        ),
    );
    let path = pair.dir.path().join("dead-redis.toml");
    std::fs::write(&path, text).unwrap();
    let mut run = RunProcess::start(&path, pair.dir.path(), &[]);
    let status = run.wait(Duration::from_secs(60)).expect("run gives up");
    assert_eq!(status.code(), Some(3), "{}", run.log_text());
    assert!(
        run.log_text().contains("checkpoint store"),
        "{}",
        run.log_text()
    );

    // And a Redis that comes up within the deadline is used.
    let redis = RedisServer::start();
    let text = pair.config_text(
        "startup_timeout = \"30s\"",
        &format!(
            "{ORDERS}[checkpoint]\nstore = \"redis\"\nurl = \"{}\"\n",
            redis.url()
        ),
    );
    let path = pair.dir.path().join("redis.toml");
    std::fs::write(&path, text).unwrap();
    let port = stagesync_testkit::free_port().unwrap();
    let mut run = RunProcess::start(
        &path,
        pair.dir.path(),
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    readyz_becomes(port, 200, Duration::from_secs(60)).await;
    assert!(run.terminate(Duration::from_secs(10)).unwrap().success());
}

#[tokio::test]
async fn check_reports_what_run_will_create_and_creates_nothing() {
    let pair = Pair::start();
    let (path, _) = pair.config("", ORDERS);
    let out = stagesync(&["check"], &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("creates nothing"), "{stdout}");
    assert!(
        stdout.contains("stagesync_business_key: collection does not exist yet; will be created"),
        "{stdout}"
    );
    let staging_collections = pair.staging().await.list_collection_names().await.unwrap();
    assert!(
        staging_collections.is_empty(),
        "check created {staging_collections:?}"
    );
    let meta_collections = pair.meta().await.list_collection_names().await.unwrap();
    assert!(
        meta_collections.is_empty(),
        "check created {meta_collections:?}"
    );
}
