//! Model-based property test of the continuous-sync rules.
//!
//! Random production histories (inserts, updates, replaces, deletes and business-key changes on a
//! few keys) and staging-side edits of staging-only fields run through real servers and the real
//! engine; after every phase, staging is compared with a small in-memory model written from the
//! rules (README, "How documents are matched and merged"; `src/plan/mod.rs`), not from the planner.
//!
//! The generator keeps the expected result exact even though change streams look up the *current*
//! production document for updates (`updateLookup`, `null` once deleted): business keys stay unique
//! among live production documents, key changes only move to fresh keys, inserts only reuse keys of
//! staging documents that production no longer holds (seeded staging-only ones, or ones soft-deleted
//! in an earlier phase), and a document is only deleted if nothing else touched it in that phase.

mod common;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{all_docs, Engine, Pair};
use mongodb::bson::{doc, Bson, Document};
use mongodb::{Client, Collection};
use prometheus::core::Collector;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

// ---------------------------------------------------------------------------------------------
// Generated input: abstract choices, turned into concrete operations against the current state
// (so every shrunk input is still a valid history).
// ---------------------------------------------------------------------------------------------

const OPTS: [&str; 3] = ["a", "b", "c"];
const PROD_QA: [&str; 2] = ["prod-qa-1", "prod-qa-2"];

#[derive(Debug, Clone)]
enum OptEdit {
    Keep,
    Set(&'static str),
    Unset,
}

#[derive(Debug, Clone)]
enum RawOp {
    /// `key` picks a fresh key or one of the keys production may take over.
    Insert {
        key: u8,
        v: i32,
        opt: Option<&'static str>,
        qa: Option<&'static str>,
    },
    Update {
        target: u8,
        v: Option<i32>,
        opt: OptEdit,
        qa: Option<&'static str>,
    },
    Replace {
        target: u8,
        fresh_key: bool,
        v: i32,
        opt: Option<&'static str>,
        qa: Option<&'static str>,
    },
    ChangeKey {
        target: u8,
    },
    Delete {
        target: u8,
    },
}

/// A staging-side `$set` of `qaNote` (staging-only) and/or `qa` (preserved).
#[derive(Debug, Clone)]
struct RawEdit {
    target: u8,
    qa_note: Option<u8>,
    qa: Option<u8>,
}

#[derive(Debug, Clone)]
struct RawPhase {
    /// Staging edits made before this phase's production operations.
    edits: Vec<RawEdit>,
    ops: Vec<RawOp>,
}

#[derive(Debug, Clone)]
struct Seed {
    qa_note: u8,
    qa: Option<u8>,
}

#[derive(Debug, Clone)]
struct RawCase {
    batch_max_events: usize,
    seeds: Vec<Seed>,
    phases: Vec<RawPhase>,
}

fn raw_op() -> impl Strategy<Value = RawOp> {
    let opt_edit = prop_oneof![
        2 => Just(OptEdit::Keep),
        2 => select(&OPTS[..]).prop_map(OptEdit::Set),
        1 => Just(OptEdit::Unset),
    ];
    prop_oneof![
        3 => (any::<u8>(), 0..4i32, proptest::option::of(select(&OPTS[..])), proptest::option::weighted(0.2, select(&PROD_QA[..])))
            .prop_map(|(key, v, opt, qa)| RawOp::Insert { key, v, opt, qa }),
        3 => (any::<u8>(), proptest::option::of(0..4i32), opt_edit, proptest::option::weighted(0.2, select(&PROD_QA[..])))
            .prop_map(|(target, v, opt, qa)| RawOp::Update { target, v, opt, qa }),
        2 => (any::<u8>(), proptest::bool::weighted(0.25), 0..4i32, proptest::option::of(select(&OPTS[..])), proptest::option::weighted(0.2, select(&PROD_QA[..])))
            .prop_map(|(target, fresh_key, v, opt, qa)| RawOp::Replace { target, fresh_key, v, opt, qa }),
        1 => any::<u8>().prop_map(|target| RawOp::ChangeKey { target }),
        2 => any::<u8>().prop_map(|target| RawOp::Delete { target }),
    ]
}

fn raw_edit() -> impl Strategy<Value = RawEdit> {
    (
        any::<u8>(),
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<u8>()),
    )
        .prop_map(|(target, qa_note, qa)| RawEdit {
            target,
            qa_note,
            qa,
        })
}

const OPS_PER_PHASE: std::ops::RangeInclusive<usize> = 1..=20;

fn raw_case() -> impl Strategy<Value = RawCase> {
    let seed = (any::<u8>(), proptest::option::of(any::<u8>()))
        .prop_map(|(qa_note, qa)| Seed { qa_note, qa });
    let first = proptest::collection::vec(raw_op(), OPS_PER_PHASE)
        .prop_map(|ops| RawPhase { edits: vec![], ops });
    let later = (
        proptest::collection::vec(raw_edit(), 0..=3),
        proptest::collection::vec(raw_op(), OPS_PER_PHASE),
    )
        .prop_map(|(edits, ops)| RawPhase { edits, ops });
    (
        select(vec![1usize, 3, 1000]),
        proptest::collection::vec(seed, 1..=2),
        first,
        proptest::collection::vec(later, 1..=2),
    )
        .prop_map(|(batch_max_events, seeds, first, later)| RawCase {
            batch_max_events,
            seeds,
            phases: std::iter::once(first).chain(later).collect(),
        })
}

// ---------------------------------------------------------------------------------------------
// Concrete production operations.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum ProdOp {
    Insert(Document),
    Update(i32, Document),
    Replace(i32, Document),
    Delete(i32),
}

impl fmt::Display for ProdOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProdOp::Insert(d) => write!(f, "insert {d}"),
            ProdOp::Update(id, u) => write!(f, "update _id {id}: {u}"),
            ProdOp::Replace(id, d) => write!(f, "replace _id {id} with {d}"),
            ProdOp::Delete(id) => write!(f, "delete _id {id}"),
        }
    }
}

async fn execute(prod: &Collection<Document>, op: &ProdOp) {
    match op {
        ProdOp::Insert(d) => {
            prod.insert_one(d.clone()).await.unwrap();
        }
        ProdOp::Update(id, u) => {
            let r = prod
                .update_one(doc! { "_id": id }, u.clone())
                .await
                .unwrap();
            assert_eq!(r.matched_count, 1, "{op}");
        }
        ProdOp::Replace(id, d) => {
            let r = prod
                .replace_one(doc! { "_id": id }, d.clone())
                .await
                .unwrap();
            assert_eq!(r.matched_count, 1, "{op}");
        }
        ProdOp::Delete(id) => {
            let r = prod.delete_one(doc! { "_id": id }).await.unwrap();
            assert_eq!(r.deleted_count, 1, "{op}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model: production as it is, and staging as the rules say it must be.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ModelDoc {
    /// Staging `_id`: known for seeded documents, learned after the phase for created ones.
    sid: Option<Bson>,
    /// The production `_id` recorded in `_sync.id`.
    owner: Option<i32>,
    email: String,
    account: i32,
    v: Option<i32>,
    opt: Option<String>,
    qa_note: Option<String>,
    qa: Option<String>,
    deleted: bool,
}

impl ModelDoc {
    fn has_key(&self, (email, account): (&str, i32)) -> bool {
        self.email == email && self.account == account
    }

    /// Rule 2: production's fields win (`qa` is preserved, so never taken from production).
    fn take_production_fields(&mut self, p: &Document) {
        let (email, account) = key_of(p);
        self.email = email.to_string();
        self.account = account;
        self.v = p.get_i32("v").ok();
        self.opt = p.get_str("opt").ok().map(String::from);
    }
}

fn key_of(d: &Document) -> (&str, i32) {
    (
        d.get_str("userEmail").unwrap(),
        d.get_i32("accountId").unwrap(),
    )
}

/// One staging document, normalized for comparison.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    owner: Option<i64>,
    email: String,
    account: i32,
    deleted: bool,
    /// Production-owned fields: only compared for live documents (a soft-deleted document's may
    /// lag by design).
    v: Option<i64>,
    opt: Option<String>,
    qa_note: Option<String>,
    qa: Option<String>,
}

#[derive(Default)]
struct Model {
    next_id: i32,
    next_key: u32,
    /// Live production documents (markers included).
    prod: BTreeMap<i32, Document>,
    markers: BTreeSet<i32>,
    staging: Vec<ModelDoc>,
    /// Inserts made in production so far (markers included).
    inserts: u64,
}

impl Model {
    fn fresh_key(&mut self) -> (String, i32) {
        let n = self.next_key;
        self.next_key += 1;
        (format!("k{n}@x.org"), (n % 3) as i32)
    }

    fn fresh_id(&mut self) -> i32 {
        self.next_id += 1;
        self.next_id
    }

    /// Live, non-marker production `_id`s, in order.
    fn targets(&self) -> Vec<i32> {
        self.prod
            .keys()
            .copied()
            .filter(|id| !self.markers.contains(id))
            .collect()
    }

    /// Turns one phase's choices into concrete production operations, applying each to the model.
    fn plan_phase(&mut self, raw: &[RawOp]) -> Vec<ProdOp> {
        // Keys production may take over in this phase: staging documents no live production
        // document holds (seeded staging-only ones, or soft-deleted in an earlier phase).
        let mut takeable: Vec<(String, i32)> = self
            .staging
            .iter()
            .filter(|d| d.deleted || d.owner.is_none())
            .map(|d| (d.email.clone(), d.account))
            .collect();
        let mut touched = BTreeSet::new();
        let mut out = Vec::new();
        for r in raw {
            let pick = |ids: &[i32], i: u8| (!ids.is_empty()).then(|| ids[i as usize % ids.len()]);
            let op = match r {
                RawOp::Insert { key, v, opt, qa } => {
                    let (email, account) = if !takeable.is_empty() && key % 2 == 0 {
                        takeable.remove((key / 2) as usize % takeable.len())
                    } else {
                        self.fresh_key()
                    };
                    let id = self.fresh_id();
                    touched.insert(id);
                    let mut d =
                        doc! { "_id": id, "userEmail": email, "accountId": account, "v": v };
                    if let Some(o) = opt {
                        d.insert("opt", *o);
                    }
                    if let Some(q) = qa {
                        d.insert("qa", *q);
                    }
                    Some(ProdOp::Insert(d))
                }
                RawOp::Update { target, v, opt, qa } => pick(&self.targets(), *target).map(|id| {
                    touched.insert(id);
                    let mut set = Document::new();
                    let mut unset = Document::new();
                    if let Some(v) = v {
                        set.insert("v", *v);
                    }
                    match opt {
                        OptEdit::Keep => {}
                        OptEdit::Set(o) => {
                            set.insert("opt", *o);
                        }
                        OptEdit::Unset => {
                            unset.insert("opt", "");
                        }
                    }
                    if let Some(q) = qa {
                        set.insert("qa", *q);
                    }
                    if set.is_empty() && unset.is_empty() {
                        set.insert("v", 0);
                    }
                    let mut u = Document::new();
                    if !set.is_empty() {
                        u.insert("$set", set);
                    }
                    if !unset.is_empty() {
                        u.insert("$unset", unset);
                    }
                    ProdOp::Update(id, u)
                }),
                RawOp::Replace {
                    target,
                    fresh_key,
                    v,
                    opt,
                    qa,
                } => match pick(&self.targets(), *target) {
                    None => None,
                    Some(id) => {
                        touched.insert(id);
                        let (email, account) = if *fresh_key {
                            self.fresh_key()
                        } else {
                            let (e, a) = key_of(&self.prod[&id]);
                            (e.to_string(), a)
                        };
                        let mut d = doc! { "userEmail": email, "accountId": account, "v": v };
                        if let Some(o) = opt {
                            d.insert("opt", *o);
                        }
                        if let Some(q) = qa {
                            d.insert("qa", *q);
                        }
                        Some(ProdOp::Replace(id, d))
                    }
                },
                RawOp::ChangeKey { target } => match pick(&self.targets(), *target) {
                    None => None,
                    Some(id) => {
                        touched.insert(id);
                        // Only the email changes; a fresh email makes a fresh key.
                        let (email, _) = self.fresh_key();
                        Some(ProdOp::Update(id, doc! { "$set": { "userEmail": email } }))
                    }
                },
                RawOp::Delete { target } => {
                    let untouched: Vec<i32> = self
                        .targets()
                        .into_iter()
                        .filter(|id| !touched.contains(id))
                        .collect();
                    pick(&untouched, *target).map(ProdOp::Delete)
                }
            };
            if let Some(op) = op {
                self.apply(&op);
                out.push(op);
            }
        }
        out
    }

    /// Applies a production operation to production's model and, by the rules, to staging's.
    fn apply(&mut self, op: &ProdOp) {
        match op {
            ProdOp::Insert(d) => {
                let id = d.get_i32("_id").unwrap();
                self.prod.insert(id, d.clone());
                self.inserts += 1;
                // Rule 1: adopt the staging document with that key (live or soft-deleted), else create.
                match self.staging.iter_mut().find(|s| s.has_key(key_of(d))) {
                    Some(s) => {
                        s.owner = Some(id);
                        s.deleted = false;
                        s.take_production_fields(d);
                    }
                    None => {
                        let mut s = ModelDoc {
                            sid: None,
                            owner: Some(id),
                            email: String::new(),
                            account: 0,
                            v: None,
                            opt: None,
                            qa_note: None,
                            qa: None,
                            deleted: false,
                        };
                        s.take_production_fields(d);
                        self.staging.push(s);
                    }
                }
            }
            ProdOp::Update(id, u) | ProdOp::Replace(id, u) => {
                let after = if let ProdOp::Update(..) = op {
                    let p = self
                        .prod
                        .get_mut(id)
                        .expect("updates target live documents");
                    if let Ok(set) = u.get_document("$set") {
                        for (k, v) in set {
                            p.insert(k.clone(), v.clone());
                        }
                    }
                    if let Ok(unset) = u.get_document("$unset") {
                        for k in unset.keys() {
                            p.remove(k);
                        }
                    }
                    p.clone()
                } else {
                    let mut p = doc! { "_id": *id };
                    p.extend(u.clone());
                    self.prod.insert(*id, p.clone());
                    p
                };
                // Rule 2: the document owned by that production `_id`, else the one with its key.
                let target = match self.staging.iter().position(|s| s.owner == Some(*id)) {
                    Some(i) => Some(i),
                    None => self.staging.iter().position(|s| s.has_key(key_of(&after))),
                };
                if let Some(i) = target {
                    self.staging[i].owner = Some(*id);
                    self.staging[i].take_production_fields(&after);
                }
            }
            ProdOp::Delete(id) => {
                self.prod.remove(id);
                // Rule 3: soft delete; nothing else changes.
                if let Some(s) = self.staging.iter_mut().find(|s| s.owner == Some(*id)) {
                    s.deleted = true;
                }
            }
        }
    }

    /// A staging-side edit: which document (by staging `_id`) and the `$set`, applied to the model.
    fn edit(&mut self, e: &RawEdit) -> Option<(Bson, Document)> {
        if self.staging.is_empty() {
            return None;
        }
        let i = e.target as usize % self.staging.len();
        let s = &mut self.staging[i];
        let sid = s.sid.clone()?;
        let mut set = Document::new();
        let note = match (e.qa_note, e.qa) {
            (None, None) => Some(e.target),
            (n, _) => n,
        };
        if let Some(n) = note {
            let v = format!("note-{n}");
            set.insert("qaNote", v.clone());
            s.qa_note = Some(v);
        }
        if let Some(n) = e.qa {
            let v = format!("staging-qa-{n}");
            set.insert("qa", v.clone());
            s.qa = Some(v);
        }
        Some((sid, set))
    }

    fn expected_rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .staging
            .iter()
            .map(|s| Row {
                owner: s.owner.map(i64::from),
                email: s.email.clone(),
                account: s.account,
                deleted: s.deleted,
                v: if s.deleted { None } else { s.v.map(i64::from) },
                opt: if s.deleted { None } else { s.opt.clone() },
                qa_note: s.qa_note.clone(),
                qa: s.qa.clone(),
            })
            .collect();
        rows.sort();
        rows
    }
}

fn as_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        _ => None,
    }
}

fn owner_of(d: &Document) -> Option<i64> {
    d.get_document("_sync")
        .ok()
        .and_then(|m| m.get("id"))
        .and_then(as_i64)
}

fn row_of(d: &Document) -> Row {
    let deleted = d.get_bool("deleted") == Ok(true);
    let text = |f: &str| d.get_str(f).ok().map(String::from);
    Row {
        owner: owner_of(d),
        email: text("userEmail").unwrap_or_default(),
        account: d.get_i32("accountId").unwrap_or(i32::MIN),
        deleted,
        v: if deleted {
            None
        } else {
            d.get("v").and_then(as_i64)
        },
        opt: if deleted { None } else { text("opt") },
        qa_note: text("qaNote"),
        qa: text("qa"),
    }
}

/// Rows only in `a` (as a multiset difference).
fn minus(a: &[Row], b: &[Row]) -> Vec<Row> {
    let mut rest = b.to_vec();
    a.iter()
        .filter(|r| match rest.iter().position(|x| x == *r) {
            Some(i) => {
                rest.remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
}

/// Changes the engine has finished with (applied, skipped or dead-lettered) for `operation`.
fn outcomes(engine: &Engine, operation: &str) -> u64 {
    let mut n = 0;
    let m = &engine.ctx.metrics;
    let families = [
        m.changes_applied.collect(),
        m.changes_skipped.collect(),
        m.changes_dead_lettered.collect(),
    ];
    for family in families.iter().flatten() {
        for m in family.get_metric() {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            if label("operation") == operation {
                n += m.get_counter().get_value() as u64;
            }
        }
    }
    n
}

// ---------------------------------------------------------------------------------------------
// Running one case against the servers.
// ---------------------------------------------------------------------------------------------

struct Servers<'a> {
    pair: &'a Pair,
    prod: Client,
    staging: Client,
}

const SYNC_WAIT: Duration = Duration::from_secs(20);

/// A client that gives up on an unreachable server after 5 s (not the driver's 30 s), so a
/// server that died fails each remaining case, and the shrinking, quickly.
async fn test_client(uri: &str) -> Client {
    let mut options = mongodb::options::ClientOptions::parse(uri)
        .await
        .expect("valid test URI");
    options.server_selection_timeout = Some(Duration::from_secs(5));
    Client::with_options(options).unwrap()
}

async fn run_case(
    servers: &Servers<'_>,
    case: usize,
    input: &RawCase,
) -> Result<(), TestCaseError> {
    let pair = servers.pair;
    let prod_db_name = format!("prod_{}_{case}", pair.tag);
    let staging_db_name = format!("staging_{}_{case}", pair.tag);
    let meta_db_name = format!("stagesync_{}_{case}", pair.tag);
    let text = format!(
        "[source]\nuri = \"{}\"\ndatabase = \"{prod_db_name}\"\n[target]\nuri = \"{}\"\ndatabase = \"{staging_db_name}\"\n\
         [sync]\nname = \"test\"\nmetadata_database = \"{meta_db_name}\"\nwrite_concern = 1\ncheckpoint_interval = \"200ms\"\n\
         batch_max_events = {}\nbatch_max_wait_ms = 20\n\n\
         [[collections]]\nname = \"orders\"\nbusiness_key = [\"userEmail\", \"accountId\"]\npreserve = [\"qa\"]\n",
        pair.prod_uri, pair.staging_uri, input.batch_max_events
    );
    let path = pair.dir.path().join(format!("model-{case}.toml"));
    std::fs::write(&path, text).unwrap();
    let config = Arc::new(stagesync::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}")));

    let prod = servers
        .prod
        .database(&prod_db_name)
        .collection::<Document>("orders");
    let staging_db = servers.staging.database(&staging_db_name);
    let staging = staging_db.collection::<Document>("orders");
    let meta_db = servers.staging.database(&meta_db_name);

    // Staging-only documents production may insert later (they must be adopted).
    let mut model = Model::default();
    let mut history = vec![format!("batch_max_events = {}", input.batch_max_events)];
    for (i, seed) in input.seeds.iter().enumerate() {
        let mut d = doc! {
            "_id": format!("seed{i}"),
            "userEmail": format!("seed{i}@x.org"),
            "accountId": 7,
            "qaNote": format!("seed-note-{}", seed.qa_note),
        };
        if let Some(q) = seed.qa {
            d.insert("qa", format!("seed-qa-{q}"));
        }
        history.push(format!("seed staging {d}"));
        staging.insert_one(d.clone()).await.unwrap();
        model.staging.push(ModelDoc {
            sid: d.get("_id").cloned(),
            owner: None,
            email: format!("seed{i}@x.org"),
            account: 7,
            v: None,
            opt: None,
            qa_note: d.get_str("qaNote").ok().map(String::from),
            qa: d.get_str("qa").ok().map(String::from),
            deleted: false,
        });
    }

    let engine = Engine::start(config).await;
    let result = drive(
        &engine,
        input,
        &mut model,
        &mut history,
        &prod,
        &staging,
        &meta_db,
    )
    .await;
    let stopped = engine.stop().await;
    result?;
    prop_assert!(
        stopped.is_ok(),
        "the engine stopped with an error: {:?}\n{}",
        stopped.err(),
        history.join("\n")
    );
    // Passed: the databases are not needed any more.
    let _ = servers.prod.database(&prod_db_name).drop().await;
    let _ = staging_db.drop().await;
    let _ = meta_db.drop().await;
    Ok(())
}

/// Polls `condition` every 20 ms until it holds (true) or the engine stopped or `SYNC_WAIT`
/// passed (false).
async fn wait_for<F, Fut>(engine: &Engine, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + SYNC_WAIT;
    loop {
        if condition().await {
            return true;
        }
        let engine_ended = engine.handle.as_ref().is_some_and(|h| h.is_finished());
        if engine_ended || Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn drive(
    engine: &Engine,
    input: &RawCase,
    model: &mut Model,
    history: &mut Vec<String>,
    prod: &Collection<Document>,
    staging: &Collection<Document>,
    meta_db: &mongodb::Database,
) -> Result<(), TestCaseError> {
    for (p, phase) in input.phases.iter().enumerate() {
        for e in &phase.edits {
            if let Some((sid, set)) = model.edit(e) {
                history.push(format!("staging edit _id {sid}: $set {set}"));
                let r = staging
                    .update_one(doc! { "_id": sid }, doc! { "$set": set })
                    .await
                    .unwrap();
                assert_eq!(r.matched_count, 1);
            }
        }
        history.push(format!("-- phase {p}"));
        for op in model.plan_phase(&phase.ops) {
            history.push(op.to_string());
            execute(prod, &op).await;
        }

        // A marker insert: once it and every insert before it are fully processed (the marker's
        // batch may write other documents in parallel chunks), staging reflects the whole phase.
        let marker_id = model.fresh_id();
        let marker_email = format!("marker{p}@x.org");
        let marker = ProdOp::Insert(
            doc! { "_id": marker_id, "userEmail": &marker_email, "accountId": 0, "v": 0 },
        );
        model.markers.insert(marker_id);
        model.apply(&marker);
        execute(prod, &marker).await;
        let expected_inserts = model.inserts;
        let synced = wait_for(engine, || async {
            let docs =
                common::find_by(staging, doc! { "userEmail": &marker_email, "accountId": 0 }).await;
            docs.len() == 1 && outcomes(engine, "insert") >= expected_inserts
        })
        .await;
        prop_assert!(
            synced,
            "phase {p}: the marker (and the {expected_inserts} inserts before it) did not sync within {SYNC_WAIT:?}; \
             engine ended: {}\n{}",
            engine.handle.as_ref().is_some_and(|h| h.is_finished()),
            history.join("\n")
        );

        let docs = all_docs(staging).await;
        let actual: Vec<Row> = {
            let mut rows: Vec<Row> = docs.iter().map(row_of).collect();
            rows.sort();
            rows
        };
        let expected = model.expected_rows();
        let missing = minus(&expected, &actual);
        let unexpected = minus(&actual, &expected);
        prop_assert!(
            missing.is_empty() && unexpected.is_empty(),
            "after phase {p}, staging differs from the model.\nexpected by the model, not in staging:\n  {}\n\
             in staging, not expected:\n  {}\nhistory:\n{}\nstaging:\n  {}",
            fmt_rows(&missing),
            fmt_rows(&unexpected),
            history.join("\n"),
            docs.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n  ")
        );

        let keys: BTreeSet<(String, i32)> = actual
            .iter()
            .map(|r| (r.email.clone(), r.account))
            .collect();
        prop_assert_eq!(
            keys.len(),
            actual.len(),
            "after phase {}: two staging documents share a business key\n{}",
            p,
            history.join("\n")
        );
        for d in &docs {
            let deleted = d.get_bool("deleted") == Ok(true);
            prop_assert!(
                !deleted || d.get_datetime("deletedAt").is_ok(),
                "after phase {p}: soft-deleted without a deletedAt date: {d}\n{}",
                history.join("\n")
            );
            prop_assert!(
                deleted || (!d.contains_key("deleted") && !d.contains_key("deletedAt")),
                "after phase {p}: a live document carries soft-delete marks: {d}\n{}",
                history.join("\n")
            );
        }
        let dead = all_docs(&meta_db.collection::<Document>("dead_letters")).await;
        prop_assert!(
            dead.is_empty(),
            "after phase {p}: valid changes were dead-lettered: {dead:?}\n{}",
            history.join("\n")
        );

        // Learn the staging `_id`s of the documents the engine created.
        for s in model.staging.iter_mut().filter(|s| s.sid.is_none()) {
            let owner = s.owner.map(i64::from);
            let found = docs
                .iter()
                .find(|d| owner.is_some() && owner_of(d) == owner);
            prop_assert!(
                found.is_some(),
                "after phase {p}: no staging document records production _id {owner:?}"
            );
            s.sid = found.and_then(|d| d.get("_id").cloned());
        }
    }
    Ok(())
}

fn fmt_rows(rows: &[Row]) -> String {
    if rows.is_empty() {
        return "(none)".into();
    }
    rows.iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join("\n  ")
}

#[test]
fn staging_matches_the_model_of_the_rules() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pair = Pair::start();
    let servers = rt.block_on(async {
        Servers {
            pair: &pair,
            prod: test_client(&pair.prod_uri).await,
            staging: test_client(&pair.staging_uri).await,
        }
    });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        // Every case runs against real servers: bound the shrinking.
        max_shrink_iters: 400,
        max_shrink_time: 120_000,
        ..RunnerConfig::default()
    });
    let case = Cell::new(0usize);
    let started = Instant::now();
    let result = runner.run(&raw_case(), |input| {
        case.set(case.get() + 1);
        rt.block_on(run_case(&servers, case.get(), &input))
    });
    println!(
        "model test: {} case runs in {:.1?}",
        case.get(),
        started.elapsed()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
