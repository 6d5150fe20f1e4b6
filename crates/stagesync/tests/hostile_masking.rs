//! Hostile inputs to masking, against real servers: personal values moved by update operators
//! (`$rename`, pipeline copies, replaces) never reach staging raw, and a production `_id` that
//! is personal data (an email) can be masked without breaking matching, deletes, dead-letter
//! replay, prune, verify or a resumed snapshot.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{all_docs, client, eventually, find_by, staging_doc_where, Engine, Pair, RunProcess};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Collection;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use stagesync::config::MaskingSettings;
use stagesync::transform::Masker;
use tokio_util::sync::CancellationToken;

const KEY: &str = "hostile-mask-key-0123456789abcdef";

fn masker(rules: &[(&str, &str)]) -> Masker {
    let settings = MaskingSettings {
        key: KEY.into(),
        email_domain: "example.com".into(),
        redact_text: "[redacted]".into(),
    };
    let rules: BTreeMap<String, String> = rules
        .iter()
        .map(|(p, r)| (p.to_string(), r.to_string()))
        .collect();
    Masker::new(Some(&settings), &rules)
}

fn masked(m: &Masker, path: &str, raw: &str) -> Bson {
    m.mask_value(path, Bson::String(raw.into())).unwrap()
}

/// Every document of every database on the staging server (staging data, checkpoints, dead
/// letters), as extended JSON text.
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
                out.push_str(&format!("{db}.{coll} "));
                out.push_str(&Bson::Document(doc).into_relaxed_extjson().to_string());
                out.push('\n');
            }
        }
    }
    out
}

/// The lines of `text` holding any of `raws`.
fn leaks<'a>(text: &'a str, raws: &[String]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| raws.iter().any(|r| l.contains(r.as_str())))
        .collect()
}

// -------------------------------------------------------------------------------------------
// `$rename` and friends

const RAW_SSN: &str = "123-45-6789";
const RAW_SSN_2: &str = "987-65-4321";
const RAW_EMAIL: &str = "ann.rawlings@corp.example";
const RAW_EMAIL_2: &str = "bob.rawlings@corp.example";

const PEOPLE: &str = r#"
[[collections]]
name = "people"
business_key = ["email"]
schema_version_field = "schemaVersion"
max_schema_version = 1
[collections.mask]
ssn = "hash"
email = "email"
"#;

#[tokio::test]
async fn renamed_copied_and_moved_personal_values_never_reach_staging_raw() {
    let pair = Pair::start();
    let (_path, config) = pair.config("", &format!("[masking]\nkey = \"{KEY}\"\n{PEOPLE}"));
    let m = masker(&[("ssn", "hash"), ("email", "email")]);
    let ssn = masked(&m, "ssn", RAW_SSN);
    let prod = pair.prod().await.collection::<Document>("people");
    let staging = pair.staging().await.collection::<Document>("people");
    // Present before the sync starts: a copy of the SSN under another name goes through the
    // snapshot.
    prod.insert_one(
        doc! { "_id": 1, "email": RAW_EMAIL, "ssn": RAW_SSN, "copy0": RAW_SSN, "n": 0 },
    )
    .await
    .unwrap();
    let engine = Engine::start(config.clone()).await;
    let ann = doc! { "email": masked(&m, "email", RAW_EMAIL) };
    let synced = staging_doc_where(&staging, ann.clone(), "copied", |d| {
        d.get("ssn") == Some(&ssn)
    })
    .await;
    assert_eq!(synced.get("copy0"), Some(&ssn));

    // The issue's case: `$rename: {ssn: legacySsn}`.
    prod.update_one(
        doc! { "_id": 1 },
        doc! { "$rename": { "ssn": "legacySsn" } },
    )
    .await
    .unwrap();
    let d = staging_doc_where(&staging, ann.clone(), "renamed", |d| {
        d.contains_key("legacySsn")
    })
    .await;
    assert_eq!(d.get("legacySsn"), Some(&ssn), "masked like the ssn it was");
    assert!(!d.contains_key("ssn"));
    // A later, unrelated update: its full document carries `legacySsn` raw again.
    prod.update_one(doc! { "_id": 1 }, doc! { "$set": { "n": 1 } })
        .await
        .unwrap();
    let d = staging_doc_where(&staging, ann.clone(), "updated", |d| {
        d.get_i32("n") == Ok(1)
    })
    .await;
    assert_eq!(d.get("legacySsn"), Some(&ssn));
    // A pipeline copy, into a new field and into an array; then the renamed value moves on.
    prod.update_one(
        doc! { "_id": 1 },
        vec![doc! { "$set": { "copy": "$legacySsn", "list": ["$legacySsn", "plain"] } }],
    )
    .await
    .unwrap();
    prod.update_one(
        doc! { "_id": 1 },
        doc! { "$rename": { "legacySsn": "archive.ssn" } },
    )
    .await
    .unwrap();
    let d = staging_doc_where(&staging, ann.clone(), "copied and moved", |d| {
        d.contains_key("archive") && d.contains_key("list")
    })
    .await;
    assert_eq!(d.get("copy"), Some(&ssn));
    assert_eq!(
        d.get_array("list").unwrap(),
        &vec![ssn.clone(), Bson::from("plain")]
    );
    assert_eq!(d.get_document("archive").unwrap().get("ssn"), Some(&ssn));
    let pii = d
        .get_document("_sync")
        .unwrap()
        .get_array("pii")
        .unwrap()
        .clone();
    assert_eq!(pii.len(), 2, "the email and the ssn: {pii:?}");

    // A change that dead-letters (schema version ahead) carries the moved value: masked there too.
    prod.update_one(doc! { "_id": 1 }, doc! { "$set": { "schemaVersion": 2 } })
        .await
        .unwrap();
    // Within one burst (most likely one batch): insert, rename, update.
    prod.insert_one(doc! { "_id": 2, "email": RAW_EMAIL_2, "ssn": RAW_SSN_2 })
        .await
        .unwrap();
    prod.update_one(doc! { "_id": 2 }, doc! { "$rename": { "ssn": "old" } })
        .await
        .unwrap();
    prod.update_one(doc! { "_id": 2 }, doc! { "$set": { "n": 5 } })
        .await
        .unwrap();
    let bob = doc! { "email": masked(&m, "email", RAW_EMAIL_2) };
    let d = staging_doc_where(&staging, bob, "synced", |d| d.get_i32("n") == Ok(5)).await;
    assert_eq!(d.get("old"), Some(&masked(&m, "ssn", RAW_SSN_2)));
    let meta = pair.meta().await.collection::<Document>("dead_letters");
    eventually("the dead letter", Duration::from_secs(20), || async {
        meta.count_documents(doc! {}).await.unwrap() == 1
    })
    .await;
    let dead = meta.find_one(doc! {}).await.unwrap().unwrap();
    let full = dead
        .get_document("change")
        .unwrap()
        .get_document("fullDocument")
        .unwrap();
    assert_eq!(full.get_document("archive").unwrap().get("ssn"), Some(&ssn));
    engine.stop().await.unwrap();

    // A resync reads production's raw documents again: staging's fingerprints still apply.
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    let pipeline = ctx.pipeline(config.collection("people").unwrap());
    stagesync::snapshot::snapshot_collection(&pipeline, &CancellationToken::new(), true)
        .await
        .unwrap();
    let d = find_by(&staging, ann).await.remove(0);
    assert_eq!(d.get("copy"), Some(&ssn));

    let raws: Vec<String> = [RAW_SSN, RAW_SSN_2, RAW_EMAIL, RAW_EMAIL_2, "rawlings"]
        .map(String::from)
        .to_vec();
    let dump = dump_server(&pair.staging_uri).await;
    assert!(
        dump.contains("dead_letters"),
        "the dump covers the metadata"
    );
    assert_eq!(leaks(&dump, &raws), Vec::<&str>::new());
    ctx.shutdown().await;
}

// -------------------------------------------------------------------------------------------
// Randomized operator sequences

/// Collections (one seed each); `STAGESYNC_HOSTILE_SEEDS=N` runs more, and
/// `STAGESYNC_HOSTILE_SEED_BASE=B` other ones.
fn seeds() -> std::ops::Range<u64> {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let base = env("STAGESYNC_HOSTILE_SEED_BASE", 0);
    base..base + env("STAGESYNC_HOSTILE_SEEDS", 6)
}
const OPS_PER_SEED: usize = 120;
const DOCS_PER_SEED: i32 = 4;

const MASK_RULES: &[(&str, &str)] = &[
    ("ssn", "hash"),
    ("email", "email"),
    ("profile.phone", "phone"),
    ("notes", "remove"),
    ("secret", "redact"),
    ("card", "null"),
    ("pin", "hash"),
];

/// Paths no rule names.
const PLAIN_PATHS: &[&str] = &["f1", "f2", "f3", "nested.f4", "profile.other", "archive.x"];
/// Top-level names a replace spreads the values over.
const TOP_NAMES: &[&str] = &[
    "ssn", "email", "notes", "secret", "card", "pin", "f1", "f2", "f3", "profile", "nested",
    "archive", "list",
];

fn random_collections() -> String {
    let rules: String = MASK_RULES
        .iter()
        .map(|(p, r)| format!("\"{p}\" = \"{r}\"\n"))
        .collect();
    seeds()
        .map(|seed| {
            format!(
                "[[collections]]\nname = \"people{seed}\"\nbusiness_key = [\"key\"]\n[collections.mask]\n{rules}"
            )
        })
        .collect()
}

/// Generates production operations whose personal values only ever enter production at a
/// masked path (an insert, a `$set` of a masked path — possibly with a copy in the same
/// statement) and then get moved around by every operator: `$rename`, `$unset`, pipeline
/// copies (into fields and arrays), replaces that spread the values over other names, key
/// changes, deletes and re-inserts.
struct Generator {
    rng: StdRng,
    seed: u64,
    counter: u64,
    /// Every raw personal value generated (strings; pins as their decimal text).
    raws: Vec<String>,
    live: Vec<i32>,
    dead: Vec<i32>,
    next_id: i32,
    cases: BTreeMap<&'static str, usize>,
}

impl Generator {
    fn new(seed: u64) -> Generator {
        Generator {
            rng: StdRng::seed_from_u64(0x5eed_0000 + seed),
            seed,
            counter: 0,
            raws: vec![],
            live: vec![],
            dead: vec![],
            next_id: 1,
            cases: BTreeMap::new(),
        }
    }

    fn raw(&mut self, label: &str) -> Bson {
        self.counter += 1;
        if label == "pin" {
            let pin = 990_000_000_000i64 + (self.seed as i64) * 1_000_000 + self.counter as i64;
            self.raws.push(pin.to_string());
            return Bson::Int64(pin);
        }
        let s = format!("RAW-{}-{}-{label}", self.seed, self.counter);
        self.raws.push(s.clone());
        if label == "card" && self.rng.random_bool(0.5) {
            return Bson::Document(doc! { "n": s });
        }
        Bson::String(s)
    }

    fn plain(&mut self) -> Bson {
        self.counter += 1;
        Bson::String(format!("plain-{}", self.counter))
    }

    fn key(&mut self) -> String {
        self.counter += 1;
        format!("k{}-{}", self.seed, self.counter)
    }

    fn new_doc(&mut self, id: i32) -> Document {
        let key = self.key();
        doc! {
            "_id": id, "key": key,
            "ssn": self.raw("ssn"), "email": self.raw("email"),
            "profile": { "phone": self.raw("phone"), "other": self.plain() },
            "notes": self.raw("notes"), "secret": self.raw("secret"),
            "card": self.raw("card"), "pin": self.raw("pin"), "f1": self.plain(),
        }
    }

    fn count(&mut self, case: &'static str) {
        *self.cases.entry(case).or_default() += 1;
    }

    async fn insert(&mut self, prod: &Collection<Document>) {
        let id = if !self.dead.is_empty() && self.rng.random_bool(0.5) {
            self.dead.swap_remove(0)
        } else {
            self.next_id += 1;
            self.next_id - 1
        };
        let d = self.new_doc(id);
        prod.insert_one(d).await.unwrap();
        self.live.push(id);
        self.count("insert");
    }

    /// One random operation on a random live document. Operations production refuses (a
    /// rename onto a scalar's child, …) are part of the game: they change nothing.
    async fn step(&mut self, prod: &Collection<Document>) {
        if self.live.len() < 2 || self.rng.random_bool(0.04) {
            return self.insert(prod).await;
        }
        let id = *self.live.choose(&mut self.rng).unwrap();
        let current = prod
            .find_one(doc! { "_id": id })
            .await
            .unwrap()
            .expect("live");
        let paths = field_paths(&current);
        let masked_paths: Vec<&str> = MASK_RULES.iter().map(|(p, _)| *p).collect();
        let filter = doc! { "_id": id };
        let result = match self.rng.random_range(0..100) {
            0..=14 => {
                self.count("$set masked");
                let path = *masked_paths.choose(&mut self.rng).unwrap();
                let label = path.rsplit('.').next().unwrap().to_string();
                let v = self.raw(&label);
                let mut set = doc! { path: v.clone() };
                if self.rng.random_bool(0.4) {
                    self.count("$set masked + same value elsewhere");
                    set.insert(*PLAIN_PATHS.choose(&mut self.rng).unwrap(), v);
                }
                prod.update_one(filter, doc! { "$set": set })
                    .await
                    .map(drop)
            }
            15..=24 => {
                self.count("$set plain");
                let path = *PLAIN_PATHS.choose(&mut self.rng).unwrap();
                let v = self.plain();
                prod.update_one(filter, doc! { "$set": { path: v } })
                    .await
                    .map(drop)
            }
            25..=44 => {
                let Some(from) = paths.choose(&mut self.rng).cloned() else {
                    return;
                };
                let pool: Vec<&str> = PLAIN_PATHS
                    .iter()
                    .chain(masked_paths.iter())
                    .copied()
                    .collect();
                let to = *pool.choose(&mut self.rng).unwrap();
                if to == from
                    || to.starts_with(&format!("{from}."))
                    || from.starts_with(&format!("{to}."))
                {
                    return;
                }
                self.count("$rename");
                prod.update_one(filter, doc! { "$rename": { from: to } })
                    .await
                    .map(drop)
            }
            45..=52 => {
                let Some(path) = paths.choose(&mut self.rng).cloned() else {
                    return;
                };
                self.count("$unset");
                prod.update_one(filter, doc! { "$unset": { path: "" } })
                    .await
                    .map(drop)
            }
            53..=67 => {
                let Some(from) = paths.choose(&mut self.rng).cloned() else {
                    return;
                };
                let source = format!("${from}");
                let stage = if self.rng.random_bool(0.3) {
                    self.count("pipeline copy into an array");
                    doc! { "$set": { "list": [source, "plain"] } }
                } else {
                    self.count("pipeline copy");
                    let to = *PLAIN_PATHS.choose(&mut self.rng).unwrap();
                    doc! { "$set": { to: source } }
                };
                prod.update_one(filter, vec![stage]).await.map(drop)
            }
            68..=79 => {
                self.count("replace spreading values over other names");
                let mut values: Vec<Bson> = current
                    .iter()
                    .filter(|(k, _)| *k != "_id" && *k != "key")
                    .map(|(_, v)| v.clone())
                    .collect();
                values.shuffle(&mut self.rng);
                let mut names = TOP_NAMES.to_vec();
                names.shuffle(&mut self.rng);
                let mut replacement =
                    doc! { "_id": id, "key": current.get("key").unwrap().clone() };
                for (name, v) in names.into_iter().zip(values) {
                    if self.rng.random_bool(0.85) {
                        replacement.insert(name, v);
                    }
                }
                prod.replace_one(filter, replacement).await.map(drop)
            }
            80..=86 => {
                self.count("key change");
                let key = self.key();
                prod.update_one(filter, doc! { "$set": { "key": key } })
                    .await
                    .map(drop)
            }
            87..=91 => {
                self.count("delete");
                self.live.retain(|&l| l != id);
                self.dead.push(id);
                prod.delete_one(filter).await.map(drop)
            }
            _ => return self.insert(prod).await,
        };
        if result.is_err() {
            self.count("refused by production (no event)");
        }
    }
}

/// Top-level fields and their direct sub-fields (not `_id`, not the business key).
fn field_paths(d: &Document) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in d {
        if k == "_id" || k == "key" {
            continue;
        }
        out.push(k.clone());
        if let Bson::Document(sub) = v {
            out.extend(sub.keys().map(|s| format!("{k}.{s}")));
        }
    }
    out
}

#[tokio::test]
async fn randomized_operator_sequences_never_leak_a_masked_value() {
    let pair = Pair::start();
    let (_path, config) = pair.config(
        "batch_max_wait_ms = 30",
        &format!("[masking]\nkey = \"{KEY}\"\n{}", random_collections()),
    );
    let prod_db = pair.prod().await;
    let mut generators: Vec<Generator> = seeds().map(Generator::new).collect();
    // Before the sync: inserts only (a value moved before stagesync ever saw it at its masked
    // path cannot be recognised; that is documented).
    for g in &mut generators {
        let prod = prod_db.collection::<Document>(&format!("people{}", g.seed));
        for _ in 0..DOCS_PER_SEED / 2 {
            g.insert(&prod).await;
        }
    }
    let engine = Engine::start(config.clone()).await;
    for round in 0..OPS_PER_SEED {
        for g in &mut generators {
            let prod = prod_db.collection::<Document>(&format!("people{}", g.seed));
            if round < (DOCS_PER_SEED / 2) as usize {
                g.insert(&prod).await;
            }
            g.step(&prod).await;
        }
    }
    // A marker per collection, synced last: everything before it is applied.
    let staging = pair.staging().await;
    for g in &generators {
        let name = format!("people{}", g.seed);
        prod_db
            .collection::<Document>(&name)
            .insert_one(doc! { "_id": "marker", "key": "marker" })
            .await
            .unwrap();
        staging_doc_where(
            &staging.collection(&name),
            doc! { "key": "marker" },
            "synced",
            |_| true,
        )
        .await;
    }
    engine.stop().await.unwrap();
    let raws: Vec<String> = generators
        .iter()
        .flat_map(|g| g.raws.iter().cloned())
        .chain(["RAW-".to_string()])
        .collect();
    let dump = dump_server(&pair.staging_uri).await;
    assert!(dump.contains("checkpoints"), "the dump covers the metadata");
    assert_eq!(
        leaks(&dump, &raws),
        Vec::<&str>::new(),
        "raw personal values on the staging server"
    );
    let dead = pair
        .meta()
        .await
        .collection::<Document>("dead_letters")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(dead, 0, "nothing in these sequences should fail");

    // Staging equals production as the rules say (verify masks production the same way), then
    // a resync (snapshot of the raw production documents, prune) leaks nothing either.
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    for g in &generators {
        let c = config.collection(&format!("people{}", g.seed)).unwrap();
        let pipeline = ctx.pipeline(c);
        let report = stagesync::verify::verify_collection(&pipeline, None)
            .await
            .unwrap();
        assert_eq!(report.drift_count(), 0, "seed {}: {report:#?}", g.seed);
        stagesync::snapshot::snapshot_collection(&pipeline, &CancellationToken::new(), true)
            .await
            .unwrap();
    }
    let dump = dump_server(&pair.staging_uri).await;
    assert_eq!(
        leaks(&dump, &raws),
        Vec::<&str>::new(),
        "raw values after a resync"
    );
    ctx.shutdown().await;

    let mut cases: BTreeMap<&str, usize> = BTreeMap::new();
    for g in &generators {
        for (k, n) in &g.cases {
            *cases.entry(k).or_default() += n;
        }
    }
    let personal: usize = generators.iter().map(|g| g.raws.len()).sum();
    println!(
        "seeds {:?}, {personal} personal values, operations: {cases:?}",
        seeds()
    );
    for must in [
        "$rename",
        "pipeline copy",
        "replace spreading values over other names",
    ] {
        assert!(
            cases.get(must).copied().unwrap_or(0) > 10,
            "{must}: {cases:?}"
        );
    }
}

// -------------------------------------------------------------------------------------------
// `_id` that is personal data

const ANN: &str = "ann.idperson@corp.example";
const BOB: &str = "bob.idperson@corp.example";
const CARL: &str = "carl.idperson@corp.example";
const DAVE: &str = "dave.idperson@corp.example";

const ACCOUNTS: &str = r#"
[[collections]]
name = "accounts"
business_key = ["email"]
schema_version_field = "schemaVersion"
max_schema_version = 1
[collections.mask]
"_id" = "hash"
email = "email"
"#;

fn stagesync_command(args: &[&str], config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(args)
        .arg("-c")
        .arg(config)
        .args(["--log-format", "json", "--log-level", "debug"])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn an_email_id_is_masked_everywhere_and_still_finds_its_staging_document() {
    let pair = Pair::start();
    let (path, _config) = pair.config("", &format!("[masking]\nkey = \"{KEY}\"\n{ACCOUNTS}"));
    let m = masker(&[("_id", "hash"), ("email", "email")]);
    let id = |raw: &str| m.mask_id(Bson::String(raw.into()));
    let email = |raw: &str| masked(&m, "email", raw);
    let prod = pair.prod().await.collection::<Document>("accounts");
    let staging = pair.staging().await.collection::<Document>("accounts");
    // Staging already holds Ann under her masked email, with a QA note: adopted by business key.
    staging
        .insert_one(doc! { "_id": "stg-ann", "email": email(ANN), "qa": "keep me" })
        .await
        .unwrap();
    prod.insert_many(vec![
        doc! { "_id": ANN, "email": ANN, "n": 1 },
        doc! { "_id": BOB, "email": BOB, "n": 1 },
    ])
    .await
    .unwrap();
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--log-level", "debug"]);
    let by_prod = |raw: &str| doc! { "_sync.id": id(raw) };
    let adopted = staging_doc_where(&staging, doc! { "_id": "stg-ann" }, "adopted", |d| {
        d.contains_key("_sync")
    })
    .await;
    assert_eq!(adopted.get_str("qa"), Ok("keep me"));
    assert_eq!(
        adopted.get_document("_sync").unwrap().get("id"),
        Some(&id(ANN))
    );
    staging_doc_where(&staging, by_prod(BOB), "copied", |_| true).await;

    // Live: an update and a delete find the right documents by the masked id.
    prod.update_one(doc! { "_id": ANN }, doc! { "$set": { "n": 2 } })
        .await
        .unwrap();
    staging_doc_where(&staging, doc! { "_id": "stg-ann" }, "updated", |d| {
        d.get_i32("n") == Ok(2)
    })
    .await;
    prod.insert_one(doc! { "_id": DAVE, "email": DAVE })
        .await
        .unwrap();
    prod.delete_one(doc! { "_id": BOB }).await.unwrap();
    staging_doc_where(&staging, by_prod(BOB), "soft-deleted", |d| {
        d.get_bool("deleted") == Ok(true)
    })
    .await;
    // A key collision: Carl claims Ann's email. Dead-lettered under Carl's masked id.
    prod.insert_one(doc! { "_id": CARL, "email": ANN })
        .await
        .unwrap();
    let dead_letters = pair.meta().await.collection::<Document>("dead_letters");
    eventually("Carl's dead letter", Duration::from_secs(20), || async {
        dead_letters.count_documents(doc! {}).await.unwrap() == 1
    })
    .await;
    let dead = dead_letters.find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!(dead.get("productionId"), Some(&id(CARL)));
    staging_doc_where(&staging, by_prod(DAVE), "copied", |_| true).await;
    let stopped = run.terminate(Duration::from_secs(10)).expect("stops");
    assert!(stopped.success());
    let mut logs = run.log_text();

    // While stopped: Carl gets his own email; `dlq replay` must find Carl in production by the
    // masked id alone (a miss would replay as a delete and leave staging without Carl).
    prod.update_one(doc! { "_id": CARL }, doc! { "$set": { "email": CARL } })
        .await
        .unwrap();
    let (ok, out) = stagesync_command(&["dlq", "replay", "--all"], &path);
    logs.push_str(&out);
    assert!(ok, "{out}");
    let carl = staging_doc_where(&staging, by_prod(CARL), "replayed", |_| true).await;
    assert_eq!(carl.get("email"), Some(&email(CARL)));
    assert_eq!(dead_letters.count_documents(doc! {}).await.unwrap(), 0);

    // `verify` checks production existence of staging's masked ids: in sync.
    let (ok, out) = stagesync_command(&["verify", "--json"], &path);
    logs.push_str(&out);
    assert!(ok, "verify finds drift: {out}");

    // Prune: Dave is gone from production; Ann's copy fails (schema ahead), so her staging
    // document is a prune candidate — but her source exists and she must stay.
    prod.delete_one(doc! { "_id": DAVE }).await.unwrap();
    prod.update_one(doc! { "_id": ANN }, doc! { "$set": { "schemaVersion": 2 } })
        .await
        .unwrap();
    let (ok, out) = stagesync_command(&["snapshot"], &path);
    logs.push_str(&out);
    assert!(ok, "{out}");
    let ann = find_by(&staging, doc! { "_id": "stg-ann" }).await.remove(0);
    assert_ne!(
        ann.get_bool("deleted"),
        Ok(true),
        "Ann's source exists: {ann}"
    );
    assert_eq!(ann.get_str("qa"), Ok("keep me"));
    let dave = find_by(&staging, by_prod(DAVE)).await.remove(0);
    assert_eq!(dave.get_bool("deleted"), Ok(true), "Dave's source is gone");
    assert_eq!(find_by(&staging, by_prod(CARL)).await.len(), 1);

    let dump = dump_server(&pair.staging_uri).await;
    let raws: Vec<String> = [ANN, BOB, CARL, DAVE, "idperson"]
        .map(String::from)
        .to_vec();
    assert_eq!(
        leaks(&dump, &raws),
        Vec::<&str>::new(),
        "raw ids on the staging server"
    );
    assert_eq!(
        leaks(&logs, &raws),
        Vec::<&str>::new(),
        "raw ids in the logs"
    );
    assert!(logs.contains(&id(CARL).as_str().unwrap()[..16]) || logs.contains("key_collision"));
    assert_eq!(all_docs(&staging).await.len(), 4, "Ann, Bob, Carl, Dave");
}

#[tokio::test]
async fn a_resumed_snapshot_finds_its_place_by_the_masked_id() {
    let pair = Pair::start();
    let (_path, config) = pair.config("", &format!("[masking]\nkey = \"{KEY}\"\n{ACCOUNTS}"));
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    let pipeline = ctx.pipeline(config.collection("accounts").unwrap());
    let raw_ids: Vec<String> = (0..6)
        .map(|i| format!("p{i}.idperson@corp.example"))
        .collect();
    pipeline
        .source
        .insert_many(
            raw_ids
                .iter()
                .map(|r| doc! { "_id": r.as_str(), "email": r.as_str() })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let read = |last: Option<Bson>| {
        let pipeline = pipeline.clone();
        async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel(8);
            let time = mongodb::bson::Timestamp {
                time: 1,
                increment: 1,
            };
            stagesync::source::scan::read_documents(
                pipeline.source.clone(),
                pipeline.masker.clone(),
                None,
                time,
                last,
                100,
                tx,
                CancellationToken::new(),
            )
            .await;
            let mut ids = Vec::new();
            while let Some(batch) = rx.recv().await {
                ids.extend(batch.unwrap().into_iter().map(|c| c.prod_id));
            }
            ids
        }
    };
    let masked: Vec<Bson> = raw_ids
        .iter()
        .map(|r| pipeline.masker.mask_id(Bson::String(r.clone())))
        .collect();
    assert_eq!(
        read(None).await,
        masked,
        "masked ids, in production `_id` order"
    );
    // Progress is checkpointed as the masked id of the last copied document.
    assert_eq!(read(Some(masked[2].clone())).await, masked[3..].to_vec());
    // Gone from production since: start over (replays are no-ops).
    assert_eq!(read(Some(Bson::from("unknown"))).await, masked);
    ctx.shutdown().await;
}
