//! Scale-out and fail-over, against real servers and real `stagesync run` processes: collection
//! leases shared by several processes, take-over after `kill -9`, a paused process that wakes
//! up after losing its leases, and rebalancing when a process joins.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{all_docs, eventually, http, signal, Pair, RunProcess};
use mongodb::bson::{doc, Document};
use mongodb::Database;

const COLLECTIONS: usize = 6;
/// Short leases keep the tests quick: renewal every second, take-over within 3 s.
const LEASE_TTL_SECS: u64 = 3;

fn names() -> Vec<String> {
    (0..COLLECTIONS).map(|i| format!("c{i}")).collect()
}

fn config(pair: &Pair) -> std::path::PathBuf {
    let collections: String = names()
        .iter()
        .map(|n| format!("[[collections]]\nname = \"{n}\"\nbusiness_key = [\"k\"]\n"))
        .collect();
    let (path, _) = pair.config(
        &format!("lease_ttl = \"{LEASE_TTL_SECS}s\"\nstall_after = \"10s\""),
        &collections,
    );
    path
}

struct Instance {
    id: String,
    port: u16,
    run: RunProcess,
}

fn start(pair: &Pair, path: &std::path::Path, id: &str) -> Instance {
    let port = stagesync_testkit::free_port().unwrap();
    let run = RunProcess::start(
        path,
        pair.dir.path(),
        &[
            "--instance-id",
            id,
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ],
    );
    Instance {
        id: id.to_string(),
        port,
        run,
    }
}

/// Which instances say they hold each collection's lease (`stagesync_lease_held … 1`).
async fn holders(instances: &[&Instance]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = names().into_iter().map(|n| (n, vec![])).collect();
    for i in instances {
        let port = i.port;
        let Some((200, page)) = tokio::task::spawn_blocking(move || http(port, "GET", "/metrics"))
            .await
            .unwrap()
        else {
            continue;
        };
        for line in page
            .lines()
            .filter(|l| l.starts_with("stagesync_lease_held{"))
        {
            if !line.ends_with(" 1") {
                continue;
            }
            let collection = line
                .split("collection=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_default();
            if let Some(v) = map.get_mut(collection) {
                v.push(i.id.clone());
            }
        }
    }
    map
}

/// Polls until every collection has exactly one holder and, when `balanced`, every instance
/// holds its fair share; returns when that happened.
async fn wait_owned(instances: &[&Instance], balanced: bool, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let map = holders(instances).await;
        let one_each = map.values().all(|h| h.len() == 1);
        let per_instance = |id: &str| map.values().filter(|h| h.iter().any(|x| x == id)).count();
        let share = COLLECTIONS.div_ceil(instances.len());
        let fair = instances.iter().all(|i| per_instance(&i.id) == share);
        if one_each && (!balanced || fair) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "collections not owned as expected within {within:?}: {map:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Continuous production writes to every collection: inserts of new keys and increments of
/// existing ones, until `stop`.
fn write_load(prod: Database, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for name in names() {
                let coll = prod.collection::<Document>(&name);
                coll.insert_one(doc! { "k": format!("{name}-{n}"), "v": 0 })
                    .await
                    .unwrap();
                if n > 0 {
                    coll.update_one(
                        doc! { "k": format!("{name}-{}", n / 2) },
                        doc! { "$inc": { "v": 1 } },
                    )
                    .await
                    .unwrap();
                }
            }
            n += 1;
        }
        n
    })
}

/// Staging holds exactly production's documents (by key, with equal values): nothing lost,
/// nothing duplicated, nothing older.
async fn assert_in_sync(prod: &Database, staging: &Database) {
    for name in names() {
        let p = prod.collection::<Document>(&name);
        let s = staging.collection::<Document>(&name);
        let expected: HashMap<String, i32> = all_docs(&p)
            .await
            .iter()
            .map(|d| (d.get_str("k").unwrap().to_string(), d.get_i32("v").unwrap()))
            .collect();
        eventually(
            &format!(
                "staging.{name} to equal production ({} documents)",
                expected.len()
            ),
            Duration::from_secs(60),
            || async {
                let docs = all_docs(&s).await;
                let got: HashMap<String, i32> = docs
                    .iter()
                    .map(|d| (d.get_str("k").unwrap().to_string(), d.get_i32("v").unwrap()))
                    .collect();
                docs.len() == expected.len() && got == expected
            },
        )
        .await;
    }
}

async fn stop_all(instances: Vec<Instance>) {
    for mut i in instances {
        let status = i.run.terminate(Duration::from_secs(15));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{} stops with exit 0: {}",
            i.id,
            i.run.log_text()
        );
        assert!(
            !i.run.log_text().contains("panicked"),
            "{}",
            i.run.log_text()
        );
    }
}

#[tokio::test]
async fn three_processes_share_six_collections_each_owned_by_exactly_one() {
    let pair = Pair::start();
    let path = config(&pair);
    let instances: Vec<Instance> = ["p1", "p2", "p3"]
        .iter()
        .map(|id| start(&pair, &path, id))
        .collect();
    let refs: Vec<&Instance> = instances.iter().collect();
    wait_owned(&refs, true, Duration::from_secs(60)).await;

    let (prod, staging) = (pair.prod().await, pair.staging().await);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_load(prod.clone(), stop.clone());
    let mut samples = 0;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let map = holders(&refs).await;
        for (collection, h) in &map {
            assert_eq!(
                h.len(),
                1,
                "{collection} held by {h:?} at sample {samples}: {map:?}"
            );
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    assert!(
        samples >= 10 && rounds > 10,
        "{samples} samples, {rounds} write rounds"
    );
    assert_in_sync(&prod, &staging).await;
    stop_all(instances).await;
}

#[tokio::test]
async fn killed_processes_collections_are_taken_over_within_the_lease_ttl() {
    let pair = Pair::start();
    let path = config(&pair);
    let mut instances: Vec<Instance> = ["k1", "k2", "k3"]
        .iter()
        .map(|id| start(&pair, &path, id))
        .collect();
    wait_owned(
        &instances.iter().collect::<Vec<_>>(),
        true,
        Duration::from_secs(60),
    )
    .await;
    let (prod, staging) = (pair.prod().await, pair.staging().await);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_load(prod.clone(), stop.clone());

    let mut handoffs = Vec::new();
    for round in 0..10 {
        // Kill the first instance holding anything, then time until others own its collections.
        let map = holders(&instances.iter().collect::<Vec<_>>()).await;
        let victim = instances
            .iter()
            .position(|i| map.values().any(|h| h.contains(&i.id)))
            .expect("someone holds a collection");
        let mut killed = instances.remove(victim);
        signal(killed.run.child.id(), "KILL");
        let _ = killed.run.wait(Duration::from_secs(5));
        let killed_at = Instant::now();
        let owned_at = wait_owned(
            &instances.iter().collect::<Vec<_>>(),
            false,
            Duration::from_secs(LEASE_TTL_SECS + 5),
        )
        .await;
        handoffs.push(owned_at - killed_at);
        // A replacement joins, so three processes keep sharing the work.
        instances.push(start(&pair, &path, &format!("k{}", round + 4)));
        wait_owned(
            &instances.iter().collect::<Vec<_>>(),
            true,
            Duration::from_secs(30),
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_in_sync(&prod, &staging).await;
    handoffs.sort();
    let median = handoffs[handoffs.len() / 2];
    let max = *handoffs.last().unwrap();
    eprintln!(
        "hand-off after kill -9 over {} kills: median {median:?}, max {max:?}",
        handoffs.len()
    );
    assert!(
        max <= Duration::from_secs(LEASE_TTL_SECS + 5),
        "{handoffs:?}"
    );
    stop_all(instances).await;
}

#[tokio::test]
async fn a_paused_process_that_lost_its_leases_moves_no_checkpoint_and_writes_nothing_older() {
    let pair = Pair::start();
    let path = config(&pair);
    let instances: Vec<Instance> = ["s1", "s2"]
        .iter()
        .map(|id| start(&pair, &path, id))
        .collect();
    let refs: Vec<&Instance> = instances.iter().collect();
    wait_owned(&refs, true, Duration::from_secs(60)).await;
    let (prod, staging, meta) = (pair.prod().await, pair.staging().await, pair.meta().await);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_load(prod.clone(), stop.clone());

    let paused = &instances[0];
    let map = holders(&refs).await;
    let its: Vec<String> = map
        .iter()
        .filter(|(_, h)| h.contains(&paused.id))
        .map(|(c, _)| c.clone())
        .collect();
    assert!(!its.is_empty());
    signal(paused.run.child.id(), "STOP");
    // Past the lease: the other process takes the collections over (a newer epoch).
    let other = [&instances[1]];
    eventually(
        "the other process to own every collection",
        Duration::from_secs(LEASE_TTL_SECS + 10),
        || async { holders(&other).await.values().all(|h| h.len() == 1) },
    )
    .await;
    let epochs = |docs: Vec<Document>| -> HashMap<String, i64> {
        docs.iter()
            .map(|d| {
                (
                    d.get_str("stream").unwrap_or_default().to_string(),
                    d.get_i64("epoch").unwrap_or(0),
                )
            })
            .collect()
    };
    let checkpoints = meta.collection::<Document>("checkpoints");
    let after_takeover = epochs(all_docs(&checkpoints).await);
    signal(paused.run.child.id(), "CONT");
    // Give the woken process time to try: it must drop the collections, not save or write.
    let woke = Instant::now();
    while woke.elapsed() < Duration::from_secs(4) {
        let now = epochs(all_docs(&checkpoints).await);
        for c in &its {
            assert!(
                now.get(c).copied().unwrap_or(0) >= after_takeover.get(c).copied().unwrap_or(0),
                "the checkpoint of {c} went back to an older epoch: {now:?} after {after_takeover:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_in_sync(&prod, &staging).await;
    let log = instances[0].run.log_text();
    assert!(
        log.contains("lease lost") || log.contains("lease taken by another process"),
        "the paused process says it dropped its collections: {log}"
    );
    stop_all(instances).await;
}

#[tokio::test]
async fn a_joining_process_takes_its_share_without_losing_a_change() {
    let pair = Pair::start();
    let path = config(&pair);
    let first = start(&pair, &path, "j1");
    wait_owned(&[&first], true, Duration::from_secs(60)).await;
    let (prod, staging) = (pair.prod().await, pair.staging().await);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_load(prod.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await; // writes before the join
    let second = start(&pair, &path, "j2");
    wait_owned(&[&first, &second], true, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // writes after the join
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_in_sync(&prod, &staging).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(["status", "--json", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        let owner = row["owner"].as_str().unwrap_or_default();
        assert!(owner == "j1" || owner == "j2", "{row}");
        assert!(row["epoch"].as_i64().unwrap() >= 1, "{row}");
        assert!(row["lease_expires_at"].is_string(), "{row}");
    }
    stop_all(vec![first, second]).await;
}
