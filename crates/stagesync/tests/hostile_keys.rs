//! Hostile inputs to business-key matching, against real servers: business keys swapped and
//! rotated among documents within one batch are applied — the final staging state equals
//! applying the changes one by one — with no dead letters, and staging-only fields stay with
//! the production document they belong to.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, find_by, Engine, Pair};
use mongodb::bson::{doc, Document};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Documents per case, and seeds per size.
const SIZES: std::ops::RangeInclusive<usize> = 2..=6;
const SEEDS: u64 = 4;

/// Production writes of a burst, in order: (document index, update).
type Writes = Vec<(usize, Document)>;

struct Case {
    name: String,
    n: usize,
    rng: StdRng,
    /// `held[i]`: the index of the key production document `i` holds now.
    held: Vec<usize>,
    /// The value of `v` of each production document now.
    v: Vec<i32>,
    /// Every burst so far: the permutation and the production writes, in order.
    bursts: Vec<(Vec<usize>, Writes)>,
}

fn key(case: &str, i: usize) -> String {
    format!("{case}-k{i}")
}

impl Case {
    fn new(n: usize, seed: u64) -> Case {
        Case {
            name: format!("keys{n}s{seed}"),
            n,
            rng: StdRng::seed_from_u64(0xc0ffee + seed * 31 + n as u64),
            held: (0..n).collect(),
            v: vec![0; n],
            bursts: vec![],
        }
    }

    /// A random permutation of the keys (not the identity) as production makes it under its own
    /// unique index: per cycle, the first document steps aside to a temporary key, each other
    /// takes the key just freed, the first takes the last one freed; updates of another field
    /// are mixed in. Returns the writes, in order.
    fn burst(&mut self) -> Writes {
        let n = self.n;
        let mut perm: Vec<usize> = (0..n).collect();
        while perm.iter().enumerate().all(|(i, &p)| i == p) {
            perm.shuffle(&mut self.rng);
        }
        // Document i takes the key document perm[i] holds now.
        let mut inverse = vec![0; n];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        let round = self.bursts.len();
        let target = |i: usize, held: &[usize]| key(&self.name, held[perm[i]]);
        let mut writes = Vec::new();
        let mut done = vec![false; n];
        for start in 0..n {
            if done[start] || perm[start] == start {
                done[start] = true;
                continue;
            }
            let tmp = format!("{}-tmp{round}-{start}", self.name);
            writes.push((start, doc! { "$set": { "key": tmp } }));
            let mut j = inverse[start];
            while j != start {
                writes.push((j, doc! { "$set": { "key": target(j, &self.held) } }));
                done[j] = true;
                j = inverse[j];
            }
            writes.push((start, doc! { "$set": { "key": target(start, &self.held) } }));
            done[start] = true;
        }
        for _ in 0..self.rng.random_range(1..=n) {
            let i = self.rng.random_range(0..n);
            let at = self.rng.random_range(0..=writes.len());
            self.v[i] += 1;
            writes.insert(at, (i, doc! { "$inc": { "v": 1 } }));
        }
        self.held = perm.iter().map(|&p| self.held[p]).collect();
        self.bursts.push((perm, writes.clone()));
        writes
    }
}

/// The collection every case lives in: one change stream, so every burst lands in the batch
/// the reader is filling (twenty streams on one client would queue for connections and could
/// split a burst across batches — a different situation, see the report).
const COLLECTION: &str = "accounts";

fn prod_id(case: &Case, i: usize) -> String {
    format!("{}-{i}", case.name)
}

fn staging_id(case: &Case, i: usize) -> String {
    format!("stg-{}-{i}", case.name)
}

#[tokio::test]
async fn random_key_permutations_within_one_batch_equal_one_change_at_a_time() {
    let pair = Pair::start();
    let cases: Vec<Case> = SIZES
        .flat_map(|n| (0..SEEDS).map(move |seed| Case::new(n, seed)))
        .collect();
    // Large batches that wait long enough for the whole burst to land in one.
    let (_path, config) = pair.config(
        "batch_max_events = 10000\nbatch_max_wait_ms = 10000",
        &format!("[[collections]]\nname = \"{COLLECTION}\"\nbusiness_key = [\"key\"]\n"),
    );
    let prod = pair.prod().await.collection::<Document>(COLLECTION);
    let staging = pair.staging().await.collection::<Document>(COLLECTION);
    // Production enforces the business key, as the burst respects it.
    prod.create_index(
        IndexModel::builder()
            .keys(doc! { "key": 1 })
            .options(IndexOptions::builder().unique(true).build())
            .build(),
    )
    .await
    .unwrap();
    // Staging already holds every key, with a staging-only field: the snapshot adopts them.
    for c in &cases {
        for i in 0..c.n {
            staging
                .insert_one(doc! { "_id": staging_id(c, i), "key": key(&c.name, i), "qa": format!("qa of {i}") })
                .await
                .unwrap();
            prod.insert_one(doc! { "_id": prod_id(c, i), "key": key(&c.name, i), "v": 0 })
                .await
                .unwrap();
        }
    }
    let total: usize = cases.iter().map(|c| c.n).sum();
    let engine = Engine::start(config.clone()).await;
    eventually("adoption", Duration::from_secs(30), || async {
        find_by(&staging, doc! { "_sync.id": { "$exists": true } })
            .await
            .len()
            == total
    })
    .await;

    // Round 1, live: every case's burst, one after the other, while the engine runs.
    let mut cases = cases;
    let dead_letters = pair.meta().await.collection::<Document>("dead_letters");
    let (writes, burst) = run_bursts(&prod, &mut cases).await;
    converge(&staging, &dead_letters, &cases, "round 1 (live)").await;
    engine.stop().await.unwrap();

    // Round 2, read late: the bursts happen while stagesync is stopped; the restarted stream
    // reads them all at once, every update event carrying the document as it is now
    // (`updateLookup`) — the first event of a swap already shows its final key.
    let (writes2, _) = run_bursts(&prod, &mut cases).await;
    let engine = Engine::start(config.clone()).await;
    converge(&staging, &dead_letters, &cases, "round 2 (read late)").await;
    engine.stop().await.unwrap();

    let moved: usize = cases
        .iter()
        .flat_map(|c| c.bursts.iter())
        .map(|(perm, _)| perm.iter().enumerate().filter(|(i, p)| i != *p).count())
        .sum();
    println!(
        "{} cases (sizes {SIZES:?} × {SEEDS} seeds) × 2 rounds, {} production writes (round 1 in {burst:?}), {moved} key moves among {total} documents",
        cases.len(),
        writes + writes2
    );
    assert!(
        burst < Duration::from_secs(8),
        "the burst fits one batch window: {burst:?}"
    );
}

async fn run_bursts(prod: &Collection<Document>, cases: &mut [Case]) -> (usize, Duration) {
    let started = std::time::Instant::now();
    let mut writes = 0;
    for c in cases.iter_mut() {
        for (i, update) in c.burst() {
            prod.update_one(doc! { "_id": prod_id(c, i) }, update)
                .await
                .unwrap();
            writes += 1;
        }
    }
    (writes, started.elapsed())
}

/// Waits until staging equals the one-by-one model — production document `i` is still the
/// staging document adopted for it before any burst, holding the key production gave it, its
/// staging-only field untouched — and checks that nothing was dead-lettered.
async fn converge(
    staging: &Collection<Document>,
    dead_letters: &Collection<Document>,
    cases: &[Case],
    what: &str,
) {
    let expected: BTreeMap<String, (String, String, String, i32)> = cases
        .iter()
        .flat_map(|c| {
            (0..c.n).map(move |i| {
                (
                    staging_id(c, i),
                    (
                        prod_id(c, i),
                        key(&c.name, c.held[i]),
                        format!("qa of {i}"),
                        c.v[i],
                    ),
                )
            })
        })
        .collect();
    let observed = || async {
        find_by(staging, doc! {})
            .await
            .iter()
            .map(|d| {
                let text = |k: &str| d.get_str(k).unwrap_or_default().to_string();
                let owner = d
                    .get_document("_sync")
                    .ok()
                    .and_then(|m| m.get_str("id").ok())
                    .unwrap_or_default()
                    .to_string();
                (
                    text("_id"),
                    (owner, text("key"), text("qa"), d.get_i32("v").unwrap_or(-1)),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = observed().await;
        if now == expected {
            break;
        }
        if std::time::Instant::now() > deadline {
            let wrong: Vec<_> = expected
                .iter()
                .filter(|(id, want)| now.get(*id) != Some(*want))
                .map(|(id, want)| (id.clone(), want.clone(), now.get(id).cloned()))
                .collect();
            let bursts: Vec<_> = cases.iter().map(|c| (&c.name, &c.bursts)).collect();
            panic!("{what}: staging differs from the model (id, expected, staging): {wrong:#?}\nbursts: {bursts:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = find_by(dead_letters, doc! {}).await;
    assert!(
        dead.is_empty(),
        "{what}: no dead letters: {:#?}",
        dead.iter()
            .map(|d| (
                d.get("productionId"),
                d.get("error"),
                d.get_document("change")
                    .ok()
                    .and_then(|c| c.get("fullDocument"))
            ))
            .collect::<Vec<_>>()
    );
}
