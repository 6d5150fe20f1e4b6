//! Unit and property tests of the pure planning core (no servers: the planner does no I/O).

use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;
use crate::config::DeleteMode;
use crate::source::change::{Change, Op};

fn rules() -> Rules {
    Rules {
        business_key: vec!["email".into(), "acct".into()],
        preserve: PathPatterns::new(&["qa", "exp.*", "profile.notes"]),
        deletes: DeleteMode::Soft,
        soft_delete_field: "deleted".into(),
        deleted_at_field: "deletedAt".into(),
        schema_guard: Some(("sv".into(), 3)),
        meta_field: "_sync".into(),
        staging_updated_field: None,
        new_id: NewDocumentId::Production,
        filter: None,
    }
}

fn ts(n: u32) -> Timestamp {
    Timestamp {
        time: 1000 + n,
        increment: 1,
    }
}

fn change(op: Op, id: i32, doc: Option<Document>, n: u32) -> Change {
    Change {
        op,
        prod_id: Bson::Int32(id),
        doc,
        updated_fields: None,
        removed_fields: vec![],
        cluster_time: ts(n),
        wall_time: Some(DateTime::from_millis(1_000_000 + n as i64)),
        pii: vec![],
    }
}

/// Applies a plan to an in-memory staging collection as the server would, under the unique
/// business-key index (partial: documents having every key field): the temporary moves, then
/// the final writes. The applier runs the writes of one step in unordered, concurrent chunks,
/// so each write must succeed in any order: it may only take a key that no *other* document
/// holds when the step starts, and no two writes of a step may take one key.
fn apply(staging: &mut Vec<Document>, plan: &Plan) {
    apply_step(staging, &plan.vacate);
    apply_step(staging, &plan.writes);
}

fn apply_step(staging: &mut Vec<Document>, writes: &[PlannedWrite]) {
    let r = rules();
    let key = |d: &Document| r.key_of(d).ok().map(|k| k.canonical());
    let holders: Vec<(Option<Bson>, Vec<u8>)> = staging
        .iter()
        .filter_map(|d| Some((d.get("_id").cloned(), key(d)?)))
        .collect();
    let mut taken = std::collections::HashSet::new();
    for w in writes {
        let (id, after) = match &w.op {
            WriteOp::Insert(d) => (d.get("_id").cloned(), Some(d.clone())),
            WriteOp::Delete { id } => (Some(id.clone()), None),
            WriteOp::Update { id, set, unset } => {
                let mut d = staging
                    .iter()
                    .find(|d| d.get("_id") == Some(id))
                    .expect("update of a known document")
                    .clone();
                for (path, v) in set {
                    set_path(&mut d, path, v.clone());
                }
                for (path, _) in unset {
                    unset_path(&mut d, path);
                }
                (Some(id.clone()), Some(d))
            }
        };
        if let Some(k) = after.as_ref().and_then(key) {
            assert!(
                holders
                    .iter()
                    .all(|(holder, held)| *held != k || *holder == id),
                "duplicate key: {w:?} takes a key another document holds when its step starts"
            );
            assert!(
                taken.insert(k),
                "duplicate key: two writes of one step take one key"
            );
        }
        staging.retain(|d| d.get("_id").cloned() != id);
        staging.extend(after);
    }
}

fn set_path(d: &mut Document, path: &str, v: Bson) {
    match path.split_once('.') {
        None => {
            d.insert(path, v);
        }
        Some((head, rest)) => {
            if !matches!(d.get(head), Some(Bson::Document(_))) {
                d.insert(head, Document::new());
            }
            if let Some(Bson::Document(sub)) = d.get_mut(head) {
                set_path(sub, rest, v);
            }
        }
    }
}

fn unset_path(d: &mut Document, path: &str) {
    match path.split_once('.') {
        None => {
            d.remove(path);
        }
        Some((head, rest)) => {
            if let Some(Bson::Document(sub)) = d.get_mut(head) {
                unset_path(sub, rest);
            }
        }
    }
}

fn plan_now(changes: &[Change], staging: &[Document]) -> Plan {
    plan_batch(
        &rules(),
        changes,
        staging.to_vec(),
        DateTime::from_millis(5),
    )
}

#[test]
fn insert_adopts_by_key_and_keeps_staging_fields() {
    let staging = vec![
        doc! { "_id": "s1", "email": "a", "acct": 1, "qa": "note", "total": 0, "deleted": true, "deletedAt": DateTime::from_millis(1) },
    ];
    let c = change(
        Op::Insert,
        7,
        Some(doc! { "_id": 7, "email": "a", "acct": 1, "total": 5, "qa": "prod" }),
        1,
    );
    let plan = plan_now(&[c], &staging);
    assert_eq!(plan.outcomes, vec![Outcome::Applied]);
    let mut after = staging.clone();
    apply(&mut after, &plan);
    let d = &after[0];
    assert_eq!(d.get_str("_id").unwrap(), "s1");
    assert_eq!(d.get_i32("total").unwrap(), 5);
    assert_eq!(
        d.get_str("qa").unwrap(),
        "note",
        "preserved fields are staging's"
    );
    assert!(!d.contains_key("deleted") && !d.contains_key("deletedAt"));
    assert_eq!(
        d.get_document("_sync").unwrap(),
        &doc! { "id": 7, "ts": ts(1), "fields": ["email", "acct", "total", "qa"] }
    );
}

#[test]
fn coalesces_a_batch_into_one_write_per_document() {
    let changes = vec![
        change(
            Op::Insert,
            1,
            Some(doc! { "_id": 1, "email": "a", "acct": 1, "v": 1 }),
            1,
        ),
        change(
            Op::Update,
            1,
            Some(doc! { "_id": 1, "email": "a", "acct": 1, "v": 2 }),
            2,
        ),
        change(
            Op::Update,
            1,
            Some(doc! { "_id": 1, "email": "a", "acct": 1, "v": 3 }),
            3,
        ),
        change(
            Op::Insert,
            2,
            Some(doc! { "_id": 2, "email": "b", "acct": 1 }),
            4,
        ),
        change(Op::Delete, 2, None, 5),
    ];
    let plan = plan_now(&changes, &[]);
    assert_eq!(plan.writes.len(), 2, "{:#?}", plan.writes);
    assert!(plan.outcomes.iter().all(|o| *o == Outcome::Applied));
    let mut after = vec![];
    apply(&mut after, &plan);
    let a = after
        .iter()
        .find(|d| d.get_str("email") == Ok("a"))
        .unwrap();
    assert_eq!(a.get_i32("v").unwrap(), 3);
    let b = after
        .iter()
        .find(|d| d.get_str("email") == Ok("b"))
        .unwrap();
    assert!(
        b.get_bool("deleted").unwrap(),
        "insert + delete = a soft-deleted insert"
    );
    assert_eq!(
        b.get_datetime("deletedAt").unwrap(),
        &DateTime::from_millis(1_000_005)
    );
}

#[test]
fn stale_changes_are_skipped() {
    let staging = vec![
        doc! { "_id": "s", "email": "a", "acct": 1, "v": 9, "_sync": { "id": 1, "ts": ts(5), "fields": ["email", "acct", "v"] } },
    ];
    let plan = plan_now(
        &[change(
            Op::Update,
            1,
            Some(doc! { "_id": 1, "email": "a", "acct": 1, "v": 1 }),
            5,
        )],
        &staging,
    );
    assert_eq!(plan.outcomes, vec![Outcome::Skipped(Skip::Stale)]);
    assert!(plan.writes.is_empty());
    let plan = plan_now(&[change(Op::Delete, 1, None, 4)], &staging);
    assert_eq!(plan.outcomes, vec![Outcome::Skipped(Skip::Stale)]);
}

#[test]
fn removed_fields_go_unless_preserved_and_nested_preserves_survive() {
    let staging = vec![doc! {
        "_id": "s", "email": "a", "acct": 1, "old": 1, "mine": "staging-only",
        "exp": { "f": true }, "profile": { "name": "x", "stale": 1, "notes": "n" },
        "_sync": { "id": 1, "ts": ts(1), "fields": ["email", "acct", "old", "exp", "profile"] }
    }];
    let prod = doc! { "_id": 1, "email": "a", "acct": 1, "exp": { "f": false, "g": 1 }, "profile": { "name": "y" } };
    let plan = plan_now(&[change(Op::Replace, 1, Some(prod), 2)], &staging);
    let mut after = staging.clone();
    apply(&mut after, &plan);
    let d = &after[0];
    assert!(!d.contains_key("old"));
    assert_eq!(d.get_str("mine").unwrap(), "staging-only");
    assert_eq!(
        d.get_document("exp").unwrap(),
        &doc! { "f": true },
        "exp.* stays staging's"
    );
    assert_eq!(
        d.get_document("profile").unwrap(),
        &doc! { "name": "y", "notes": "n" }
    );
}

#[test]
fn key_changes_move_the_document_and_collisions_fail() {
    let staging = vec![
        doc! { "_id": "s1", "email": "a", "acct": 1, "_sync": { "id": 1, "ts": ts(1), "fields": ["email", "acct"] } },
        doc! { "_id": "s2", "email": "b", "acct": 1, "_sync": { "id": 2, "ts": ts(1), "fields": ["email", "acct"] } },
    ];
    let moved = plan_now(
        &[change(
            Op::Update,
            1,
            Some(doc! { "_id": 1, "email": "c", "acct": 1 }),
            2,
        )],
        &staging,
    );
    assert_eq!(moved.outcomes, vec![Outcome::Applied]);
    assert!(
        matches!(&moved.writes[0].op, WriteOp::Update { id, set, .. } if id == &Bson::String("s1".into()) && set.get_str("email") == Ok("c"))
    );
    let collide = plan_now(
        &[change(
            Op::Update,
            1,
            Some(doc! { "_id": 1, "email": "b", "acct": 1 }),
            2,
        )],
        &staging,
    );
    match &collide.outcomes[0] {
        Outcome::Failed(f) => {
            assert_eq!(f.code, "key_collision");
            assert!(
                f.message.contains("email=b, acct=1") && f.message.contains("s2"),
                "{}",
                f.message
            );
        }
        other => panic!("expected a collision, got {other:?}"),
    }
    assert!(collide.writes.is_empty());
    // An insert of a key another live production document owns is a collision too.
    let dup = plan_now(
        &[change(
            Op::Insert,
            3,
            Some(doc! { "_id": 3, "email": "b", "acct": 1 }),
            2,
        )],
        &staging,
    );
    assert!(matches!(&dup.outcomes[0], Outcome::Failed(f) if f.code == "key_collision"));
}

#[test]
fn schema_guard_missing_keys_and_null_documents() {
    let plan = plan_now(
        &[change(
            Op::Insert,
            1,
            Some(doc! { "_id": 1, "email": "a", "acct": 1, "sv": 4 }),
            1,
        )],
        &[],
    );
    assert!(
        matches!(&plan.outcomes[0], Outcome::Failed(f) if f.code == "schema_ahead" && f.message == "schema version 4 is ahead of staging's 3")
    );
    let plan = plan_now(
        &[change(
            Op::Insert,
            1,
            Some(doc! { "_id": 1, "email": "a" }),
            1,
        )],
        &[],
    );
    assert!(
        matches!(&plan.outcomes[0], Outcome::Failed(f) if f.code == "missing_key" && f.message.contains("`acct`"))
    );
    let plan = plan_now(&[change(Op::Update, 1, None, 1)], &[]);
    assert_eq!(plan.outcomes, vec![Outcome::Skipped(Skip::NoFullDocument)]);
    let plan = plan_now(&[change(Op::Delete, 1, None, 1)], &[]);
    assert_eq!(plan.outcomes, vec![Outcome::Skipped(Skip::Unknown)]);
}

#[test]
fn last_write_wins_keeps_newer_staging_edits() {
    let mut r = rules();
    r.staging_updated_field = Some("updatedAt".into());
    let staging = vec![
        doc! { "_id": "s", "email": "a", "acct": 1, "v": 5, "updatedAt": DateTime::from_millis(2_000_000), "_sync": { "id": 1, "ts": ts(1), "fields": ["email", "acct", "v"] } },
    ];
    let plan = plan_batch(
        &r,
        &[change(
            Op::Update,
            1,
            Some(doc! { "_id": 1, "email": "a", "acct": 1, "v": 6 }),
            2,
        )],
        staging,
        DateTime::now(),
    );
    assert_eq!(plan.outcomes, vec![Outcome::Skipped(Skip::StagingNewer)]);
}

#[test]
fn lookups_skip_keys_of_updates_that_keep_them() {
    let r = rules();
    let found = vec![doc! { "_id": "s", "email": "a", "acct": 1, "_sync": { "id": 1 } }];
    let changes = vec![
        change(
            Op::Update,
            1,
            Some(doc! { "_id": 1, "email": "a", "acct": 1 }),
            1,
        ), // same key: no lookup
        change(
            Op::Update,
            2,
            Some(doc! { "_id": 2, "email": "b", "acct": 1 }),
            2,
        ), // unknown _id
        change(
            Op::Insert,
            3,
            Some(doc! { "_id": 3, "email": "c", "acct": 2 }),
            3,
        ), // adoption
    ];
    let keys = r.keys_to_look_up(&changes, &found, &Fresh::new());
    assert_eq!(
        keys,
        vec![
            BusinessKey(vec!["b".into(), 1.into()]),
            BusinessKey(vec!["c".into(), 2.into()])
        ]
    );
    assert_eq!(
        r.key_filter(&keys).unwrap(),
        doc! { "email": { "$in": ["b", "c"] }, "acct": { "$in": [1, 2] } }
    );
    assert_eq!(
        r.owner_filters(&changes, &Fresh::new(), Novelty::Unknown)
            .unwrap(),
        (
            doc! { "_sync.id": { "$in": [1, 2, 3] } },
            Some(doc! { "_sync.prior.id": { "$in": [1, 2, 3] } }),
        )
    );
    // Production `_id` 1's document holds `_id` 1 itself: no other document can.
    let own = doc! { "_id": 1, "email": "a", "acct": 1, "_sync": { "id": 1 } };
    assert_eq!(
        r.id_holder_filter(&changes, &Fresh::new(), &[found[0].clone(), own]),
        Some(doc! { "_id": { "$in": [2, 3] } })
    );
}

#[test]
fn canonical_forms_are_the_bson_of_the_value() {
    let values = [
        Bson::from("ann@x.org"),
        Bson::from(""),
        Bson::from("nul\0inside"),
        Bson::Int32(-7),
        Bson::Int64(1 << 40),
        Bson::ObjectId(mongodb::bson::oid::ObjectId::new()),
        Bson::Double(1.5),
        Bson::Document(doc! { "a": 1 }),
        Bson::Null,
    ];
    for v in &values {
        let mut slow = vec![b'i'];
        slow.extend(mongodb::bson::to_vec(&doc! { "v": v.clone() }).unwrap());
        assert_eq!(canonical(v), slow, "{v:?}");
    }
    for pair in values.windows(2) {
        let key = BusinessKey(pair.to_vec());
        let d: Document = pair
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v.clone()))
            .collect();
        let mut slow = vec![b'k'];
        slow.extend(mongodb::bson::to_vec(&d).unwrap());
        assert_eq!(key.canonical(), slow, "{pair:?}");
    }
}

#[test]
fn a_documents_canonical_key_is_its_business_keys_canonical_form() {
    let r = rules();
    let values = [
        Bson::from("ann@x.org"),
        Bson::Int32(-7),
        Bson::Int64(1 << 40),
        Bson::ObjectId(mongodb::bson::oid::ObjectId::new()),
        Bson::Double(1.5),
        Bson::Document(doc! { "a": 1 }),
    ];
    for email in &values {
        for acct in &values {
            let d = doc! { "_id": 1, "email": email.clone(), "acct": acct.clone() };
            let expected = r.key_of(&d).unwrap().canonical();
            assert_eq!(r.canonical_key(&d), Some(expected), "{d:?}");
        }
    }
    // A missing or null key field: no key, as `key_of` says.
    for d in [
        doc! { "email": "a" },
        doc! { "email": "a", "acct": Bson::Null },
    ] {
        assert!(r.key_of(&d).is_err());
        assert_eq!(r.canonical_key(&d), None, "{d:?}");
    }
}

#[test]
fn only_first_time_inserts_after_the_replay_horizon_skip_their_lookups() {
    let r = rules();
    let d = |id: i32, email: &str| Some(doc! { "_id": id, "email": email, "acct": 1 });
    let changes = vec![
        change(Op::Insert, 1, d(1, "a"), 5), // at the horizon: may be a replay
        change(Op::Insert, 2, d(2, "b"), 6), // after it: new
        change(Op::Update, 2, d(2, "b"), 7), // a later change of a new document, same key
        change(Op::Update, 3, d(3, "c"), 8), // an update first: staging may know it
        change(Op::Insert, 3, d(3, "c"), 9),
        change(Op::Insert, 4, None, 10), // no document: nothing to write blind
        change(Op::Insert, 5, d(5, "e"), 11), // new, but its key moves within the batch
        change(Op::Update, 5, d(5, "e2"), 12),
        change(Op::Insert, 6, d(6, "f"), 13), // new, then deleted: still new
        change(Op::Delete, 6, None, 14),
    ];
    let fresh = fresh_inserts(&r, &changes, Novelty::InsertsAfter(ts(5)));
    let ids = |ids: &[i32]| -> Fresh { ids.iter().map(|&i| canonical(&Bson::Int32(i))).collect() };
    assert_eq!(fresh, ids(&[2, 6]));
    // Without a horizon (snapshot, replay, unknown start) everything is looked up.
    assert!(fresh_inserts(&r, &changes, Novelty::Unknown).is_empty());
    // The new documents are in neither look-up; the others are looked up by owner, and only
    // the one whose change may be a replay (at the horizon) by former owner.
    let novelty = Novelty::InsertsAfter(ts(5));
    assert_eq!(
        r.owner_filters(&changes, &fresh, novelty).unwrap(),
        (
            doc! { "_sync.id": { "$in": [1, 3, 4, 5] } },
            Some(doc! { "_sync.prior.id": { "$in": [1] } }),
        )
    );
    // A batch all after the horizon sends no former-owner look-up at all.
    assert_eq!(
        r.owner_filters(&changes[1..], &fresh, novelty).unwrap(),
        (doc! { "_sync.id": { "$in": [3, 4, 5] } }, None)
    );
    // Staging documents holding the `_id` a new document would take.
    assert_eq!(
        r.id_holder_filter(&changes, &fresh, &[]),
        Some(doc! { "_id": { "$in": [1, 3, 5] } })
    );
    let key = |e: &str| BusinessKey(vec![e.into(), 1.into()]);
    assert_eq!(
        r.keys_to_look_up(&changes, &[], &fresh),
        vec![key("a"), key("c"), key("e"), key("e2")]
    );
    // A batch of nothing but new documents needs no look-up at all.
    let all_new = vec![change(Op::Insert, 9, d(9, "z"), 6)];
    let fresh = fresh_inserts(&r, &all_new, Novelty::InsertsAfter(ts(5)));
    assert!(r
        .owner_filters(&all_new, &fresh, Novelty::InsertsAfter(ts(5)))
        .is_none());
    assert!(r.id_holder_filter(&all_new, &fresh, &[]).is_none());
    assert!(r.keys_to_look_up(&all_new, &[], &fresh).is_empty());
    // A first snapshot: every document it copies (as a replace) is new.
    let copies = vec![
        change(Op::Replace, 7, d(7, "g"), 3),
        change(Op::Replace, 8, d(8, "h"), 3),
    ];
    assert_eq!(
        fresh_inserts(&r, &copies, Novelty::Everything),
        ids(&[7, 8])
    );
}

#[test]
fn an_adopted_document_remembers_its_prior_owner_so_replays_stay_no_ops() {
    // Found by the coalescing property: pid 1 moves to key e1 and is deleted; pid 0 is inserted
    // with e1 and adopts the soft-deleted document. Replaying pid 1's changes must not recreate it.
    let changes = vec![
        change(
            Op::Insert,
            1,
            Some(doc! { "_id": 1, "email": "e2", "acct": 1 }),
            1,
        ),
        change(
            Op::Replace,
            1,
            Some(doc! { "_id": 1, "email": "e1", "acct": 1 }),
            2,
        ),
        change(Op::Delete, 1, None, 3),
        change(
            Op::Insert,
            0,
            Some(doc! { "_id": 0, "email": "e1", "acct": 1 }),
            4,
        ),
    ];
    let mut staging = vec![];
    for c in &changes {
        let plan = plan_now(std::slice::from_ref(c), &staging);
        apply(&mut staging, &plan);
    }
    assert_eq!(staging.len(), 1);
    let meta = staging[0].get_document("_sync").unwrap();
    assert_eq!(meta.get_i32("id").unwrap(), 0);
    assert_eq!(
        meta.get_array("prior").unwrap(),
        &vec![Bson::Document(doc! { "id": 1, "ts": ts(3) })]
    );
    let replay = plan_now(&changes, &staging);
    assert!(replay.writes.is_empty(), "{:?}", replay.writes);
    assert!(
        replay
            .outcomes
            .iter()
            .all(|o| *o == Outcome::Skipped(Skip::Stale)),
        "{:?}",
        replay.outcomes
    );
    // A genuinely new change of the old owner is not swallowed, and does not take the document back.
    let later = plan_now(
        &[change(
            Op::Insert,
            1,
            Some(doc! { "_id": 1, "email": "e7", "acct": 1 }),
            9,
        )],
        &staging,
    );
    assert!(matches!(&later.writes[0].op, WriteOp::Insert(d) if d.get_str("email") == Ok("e7")));
}

#[test]
fn diff_descends_into_documents_and_unsets_removed_paths() {
    let (set, unset) = diff(
        &doc! { "a": 1, "b": { "x": 1, "y": 2 }, "gone": true, "same": [1] },
        &doc! { "a": 2, "b": { "x": 1, "z": 3 }, "same": [1], "new": "n" },
    );
    assert_eq!(set, doc! { "a": 2, "b.z": 3, "new": "n" });
    assert_eq!(unset, doc! { "b.y": "", "gone": "" });
}

fn synced(id: &str, prod: i32, email: &str, qa: &str, n: u32) -> Document {
    doc! {
        "_id": id, "email": email, "acct": 1, "qa": qa,
        "_sync": { "id": prod, "ts": ts(n), "fields": ["email", "acct"] },
    }
}

fn update_key(prod: i32, email: &str, n: u32) -> Change {
    change(
        Op::Update,
        prod,
        Some(doc! { "_id": prod, "email": email, "acct": 1 }),
        n,
    )
}

fn by_id<'a>(staging: &'a [Document], id: &str) -> &'a Document {
    staging
        .iter()
        .find(|d| d.get_str("_id") == Ok(id))
        .unwrap_or_else(|| panic!("no staging document {id}: {staging:?}"))
}

#[test]
fn a_key_swap_within_one_batch_moves_through_placeholder_keys() {
    // The case: _id 0 → k0, _id 1 → k1; production sets 0 → tmp, 1 → k0, 0 → k1.
    let staging = vec![
        synced("s0", 0, "k0", "qa of 0", 1),
        synced("s1", 1, "k1", "qa of 1", 1),
    ];
    let batch = vec![
        update_key(0, "tmp", 2),
        update_key(1, "k0", 3),
        update_key(0, "k1", 4),
    ];
    let plan = plan_now(&batch, &staging);
    assert!(
        plan.outcomes.iter().all(|o| *o == Outcome::Applied),
        "{:?}",
        plan.outcomes
    );
    assert_eq!(
        plan.vacate.len(),
        2,
        "both give their key away: {:?}",
        plan.vacate
    );
    for v in &plan.vacate {
        assert!(v.changes.is_empty());
        let WriteOp::Update { id, set, unset } = &v.op else {
            panic!("a placeholder is an update: {v:?}");
        };
        assert_eq!(set, &doc! { "email": placeholder_key(id) });
        assert!(unset.is_empty());
    }
    let mut after = staging.clone();
    apply(&mut after, &plan); // checks the unique index step by step
    let s0 = by_id(&after, "s0");
    let s1 = by_id(&after, "s1");
    assert_eq!(
        (s0.get_str("email"), s0.get_str("qa")),
        (Ok("k1"), Ok("qa of 0"))
    );
    assert_eq!(
        (s1.get_str("email"), s1.get_str("qa")),
        (Ok("k0"), Ok("qa of 1"))
    );

    // The same as one change at a time.
    let mut stepwise = staging.clone();
    for c in &batch {
        let plan = plan_now(std::slice::from_ref(c), &stepwise);
        assert!(
            plan.vacate.is_empty(),
            "one change never needs a placeholder"
        );
        apply(&mut stepwise, &plan);
    }
    assert_eq!(normalized(after.clone()), normalized(stepwise));

    // A replay changes nothing.
    let replay = plan_now(&batch, &after);
    assert!(
        replay.vacate.is_empty() && replay.writes.is_empty(),
        "{replay:?}"
    );
}

#[test]
fn a_key_swap_read_late_is_applied_and_a_real_collision_still_fails() {
    // The case as the stream delivers it when read after the burst: every update
    // event carries the document as it is now (`updateLookup`), so the first one already shows
    // production 0 at k1 while staging's s1 still holds k1.
    let staging = vec![
        synced("s0", 0, "k0", "qa of 0", 1),
        synced("s1", 1, "k1", "qa of 1", 1),
    ];
    let late = vec![
        update_key(0, "k1", 2),
        update_key(1, "k0", 3),
        update_key(0, "k1", 4),
    ];
    let plan = plan_now(&late, &staging);
    assert!(
        plan.outcomes.iter().all(|o| *o == Outcome::Applied),
        "{:?}",
        plan.outcomes
    );
    let mut after = staging.clone();
    apply(&mut after, &plan);
    assert_eq!(by_id(&after, "s0").get_str("email"), Ok("k1"));
    assert_eq!(by_id(&after, "s1").get_str("email"), Ok("k0"));
    assert_eq!(by_id(&after, "s0").get_str("qa"), Ok("qa of 0"));

    // Production 1 changes too, but stays on k1: production 0 cannot have k1 — refused, and
    // the rest of the batch is planned as if it had been refused right away.
    let clash = vec![
        update_key(0, "k1", 2),
        change(
            Op::Update,
            1,
            Some(doc! { "_id": 1, "email": "k1", "acct": 1, "v": 7 }),
            3,
        ),
    ];
    let plan = plan_now(&clash, &staging);
    assert!(matches!(&plan.outcomes[0], Outcome::Failed(f) if f.code == "key_collision"));
    assert_eq!(plan.outcomes[1], Outcome::Applied);
    let mut after = staging.clone();
    apply(&mut after, &plan);
    assert_eq!(by_id(&after, "s0").get_str("email"), Ok("k0"));
    assert_eq!(by_id(&after, "s1").get_i32("v"), Ok(7));
    // One change alone never takes a key another document holds.
    let alone = plan_now(&late[..1], &staging);
    assert!(matches!(&alone.outcomes[0], Outcome::Failed(f) if f.code == "key_collision"));
}

#[test]
fn a_run_stopped_between_the_two_steps_finishes_on_replay() {
    let staging = vec![
        synced("s0", 0, "k0", "a", 1),
        synced("s1", 1, "k1", "b", 1),
        synced("s2", 2, "k2", "c", 1),
    ];
    // A rotation: 0 → tmp, 1 → k0, 2 → k1, 0 → k2.
    let batch = vec![
        update_key(0, "tmp", 2),
        update_key(1, "k0", 3),
        update_key(2, "k1", 4),
        update_key(0, "k2", 5),
    ];
    let plan = plan_now(&batch, &staging);
    assert_eq!(plan.vacate.len(), 3);
    let mut half = staging.clone();
    apply_step(&mut half, &plan.vacate);
    // Stopped here: the next run reads the same batch again, against the placeholders.
    let again = plan_now(&batch, &half);
    assert!(
        again.outcomes.iter().all(|o| *o == Outcome::Applied),
        "{:?}",
        again.outcomes
    );
    apply(&mut half, &again);
    let mut whole = staging.clone();
    apply(&mut whole, &plan);
    assert_eq!(normalized(half.clone()), normalized(whole));
    assert!(half
        .iter()
        .all(|d| !d.get_str("email").unwrap().starts_with("stagesync:moving:")));
    assert_eq!(by_id(&half, "s0").get_str("email"), Ok("k2"));
}

#[test]
fn a_key_change_to_a_free_key_or_a_handed_on_key_keeps_one_step_where_it_can() {
    let staging = vec![synced("s0", 0, "k0", "a", 1), synced("s1", 1, "k1", "b", 1)];
    // A move to a free key: no placeholder.
    let plan = plan_now(&[update_key(0, "k9", 2)], &staging);
    assert!(plan.vacate.is_empty());
    // A key handed on (0 leaves k0, a new production document takes it): only 0 moves twice.
    let insert = change(
        Op::Insert,
        7,
        Some(doc! { "_id": 7, "email": "k0", "acct": 1 }),
        3,
    );
    let plan = plan_now(&[update_key(0, "k9", 2), insert], &staging);
    assert_eq!(plan.vacate.len(), 1);
    let mut after = staging.clone();
    apply(&mut after, &plan);
    assert_eq!(by_id(&after, "s0").get_str("email"), Ok("k9"));
    assert_eq!(after.len(), 3);
}

#[test]
fn recorded_fingerprints_mask_a_value_renamed_off_its_masked_path() {
    use crate::config::MaskingSettings;
    let settings = MaskingSettings {
        key: "0123456789abcdef-plan-test".into(),
        email_domain: "example.com".into(),
        redact_text: "[redacted]".into(),
    };
    let masker = crate::transform::Masker::new(
        Some(&settings),
        &[("ssn".to_string(), "hash".to_string())]
            .into_iter()
            .collect(),
    );
    // An insert with the SSN where the rule names it, then `$rename: {ssn: legacySsn}`.
    let mut inserted = doc! { "_id": 1, "email": "a", "acct": 1, "ssn": "123-45-6789" };
    let pii = masker.mask_event(Some(&mut inserted), None);
    assert_eq!(pii.len(), 1);
    let hashed = inserted.get_str("ssn").unwrap().to_owned();
    let mut first = change(Op::Insert, 1, Some(inserted), 1);
    first.pii = pii.clone();
    let mut renamed_doc = doc! { "_id": 1, "email": "a", "acct": 1, "legacySsn": "123-45-6789" };
    let mut renamed_upd = doc! { "legacySsn": "123-45-6789" };
    let own = masker.mask_event(Some(&mut renamed_doc), Some(&mut renamed_upd));
    assert!(own.is_empty(), "the event alone shows nothing personal");
    let mut second = change(Op::Update, 1, Some(renamed_doc), 2);
    second.updated_fields = Some(renamed_upd);

    // Within one batch: the insert's fingerprints reach the rename.
    let r = rules();
    let both = [first.clone(), second.clone()];
    let masked = mask_moved_values(&r, &masker, &both, &[]);
    let m = &masked[1];
    assert_eq!(
        m.doc.as_ref().unwrap().get_str("legacySsn"),
        Ok(hashed.as_str())
    );
    assert_eq!(
        m.updated_fields.as_ref().unwrap().get_str("legacySsn"),
        Ok(hashed.as_str())
    );
    assert_eq!(
        m.pii, pii,
        "the value is still the document's: recorded again"
    );
    // Idempotent.
    let twice = mask_moved_values(&r, &masker, &masked, &[]);
    assert!(matches!(twice, std::borrow::Cow::Borrowed(_)));

    // Across batches: staging's `_sync.pii` reaches it.
    let mut staging = vec![];
    let plan = plan_now(&[first], &staging);
    apply(&mut staging, &plan);
    assert_eq!(
        staging[0]
            .get_document("_sync")
            .unwrap()
            .get_array("pii")
            .unwrap(),
        &pii.iter()
            .map(|f| Bson::String(f.clone()))
            .collect::<Vec<_>>()
    );
    let later = [second];
    let masked = mask_moved_values(&r, &masker, &later, &staging);
    assert_eq!(
        masked[0].doc.as_ref().unwrap().get_str("legacySsn"),
        Ok(hashed.as_str())
    );
    // A change that fails (here: a key collision) still leaves its fingerprints with its
    // document, so a later rename of the value is masked too.
    let mut collide_doc = doc! { "_id": 1, "email": "b", "acct": 1, "ssn": "999" };
    let collide_pii = masker.mask_event(Some(&mut collide_doc), None);
    let mut collide = change(Op::Update, 1, Some(collide_doc), 5);
    collide.pii = collide_pii.clone();
    let mut holder = staging.clone();
    holder.push(doc! { "_id": "other", "email": "b", "acct": 1 });
    let plan = plan_now(&[collide], &holder);
    assert!(matches!(&plan.outcomes[0], Outcome::Failed(f) if f.code == "key_collision"));
    assert!(
        matches!(&plan.writes[..], [PlannedWrite { op: WriteOp::Update { set, .. }, .. }]
            if set.keys().all(|k| k.starts_with("_sync.pii")) && !set.is_empty()),
        "{:?}",
        plan.writes
    );
    apply(&mut holder, &plan);
    let mut moved = doc! { "_id": 1, "email": "b", "acct": 1, "f": "999" };
    assert!(masker.mask_event(Some(&mut moved), None).is_empty());
    let later = [change(Op::Update, 1, Some(moved), 6)];
    let masked = mask_moved_values(&r, &masker, &later, &holder);
    assert_ne!(masked[0].doc.as_ref().unwrap().get_str("f"), Ok("999"));
    // A document without the value any more drops the fingerprint.
    let gone = [change(
        Op::Replace,
        1,
        Some(doc! { "_id": 1, "email": "a", "acct": 1 }),
        3,
    )];
    assert!(mask_moved_values(&r, &masker, &gone, &staging)[0]
        .pii
        .is_empty());
}

/// Production operations on a few documents, for the coalescing property.
#[derive(Debug, Clone)]
enum GenOp {
    Upsert {
        id: i32,
        email: u8,
        v: i32,
        with_opt: bool,
    },
    Delete {
        id: i32,
    },
    /// Rotates the business keys of 2–4 live documents as production does it under a unique
    /// index: the first moves to a temporary key, each next one takes its predecessor's key,
    /// the first takes the last one's (two documents: a swap).
    Rotate {
        ids: Vec<i32>,
    },
}

fn gen_op() -> impl Strategy<Value = GenOp> {
    prop_oneof![
        4 => (0..4i32, 0..3u8, 0..100i32, any::<bool>()).prop_map(|(id, email, v, with_opt)| GenOp::Upsert { id, email, v, with_opt }),
        1 => (0..4i32).prop_map(|id| GenOp::Delete { id }),
        2 => prop::sample::subsequence(vec![0, 1, 2, 3], 2..=4)
            .prop_shuffle()
            .prop_map(|ids| GenOp::Rotate { ids }),
    ]
}

/// How production's events look.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Emit {
    /// Production enforces the business key: an upsert onto a key another live document holds
    /// is refused (no event).
    unique_keys: bool,
    /// Update events carry the document as it is at the end of the sequence, as
    /// `updateLookup` returns it when the stream is read after the burst (`None` when deleted
    /// by then); inserts and replaces carry their own document.
    read_late: bool,
}

/// Turns generated operations into the change events production would emit.
fn to_changes(ops: &[GenOp], emit: Emit) -> Vec<Change> {
    let mut live: std::collections::HashMap<i32, Document> = std::collections::HashMap::new();
    let mut out = Vec::new();
    let mut n = 0u32;
    let mut next = || {
        n += 1;
        n
    };
    let held_by_other = |live: &std::collections::HashMap<i32, Document>, id: i32, email: &Bson| {
        live.iter()
            .any(|(other, d)| *other != id && d.get("email") == Some(email))
    };
    for op in ops {
        match op {
            GenOp::Upsert {
                id,
                email,
                v,
                with_opt,
            } => {
                let mut d = doc! { "_id": *id, "email": format!("e{email}"), "acct": 1, "v": *v };
                if *with_opt {
                    d.insert("opt", "o");
                }
                if emit.unique_keys && held_by_other(&live, *id, d.get("email").unwrap()) {
                    continue;
                }
                let kind = if live.insert(*id, d.clone()).is_none() {
                    Op::Insert
                } else {
                    Op::Replace
                };
                out.push(change(kind, *id, Some(d), next()));
            }
            GenOp::Delete { id } => {
                if live.remove(id).is_some() {
                    out.push(change(Op::Delete, *id, None, next()));
                }
            }
            GenOp::Rotate { ids } => {
                let ids: Vec<i32> = ids
                    .iter()
                    .copied()
                    .filter(|i| live.contains_key(i))
                    .collect();
                if ids.len() < 2 {
                    continue;
                }
                let keys: Vec<Bson> = ids
                    .iter()
                    .map(|i| live[i].get("email").cloned().unwrap())
                    .collect();
                let mut moves: Vec<(i32, Bson)> =
                    vec![(ids[0], Bson::String(format!("tmp{}", out.len())))];
                moves.extend((1..ids.len()).map(|j| (ids[j], keys[j - 1].clone())));
                moves.push((ids[0], keys[ids.len() - 1].clone()));
                for (id, key) in moves {
                    let d = live.get_mut(&id).unwrap();
                    d.insert("email", key);
                    let d = d.clone();
                    // A `$set` of the key: an update event, whose document is looked up when
                    // the stream is read; as an event-time document it is a replace.
                    let op = if emit.read_late {
                        Op::Update
                    } else {
                        Op::Replace
                    };
                    out.push(change(op, id, Some(d), next()));
                }
            }
        }
    }
    if emit.read_late {
        for c in out.iter_mut().filter(|c| c.op == Op::Update) {
            let Bson::Int32(id) = c.prod_id else {
                unreachable!()
            };
            c.doc = live.get(&id).cloned();
        }
    }
    out
}

/// Plans and applies one change at a time; also returns the indices of the changes refused.
fn stepwise(changes: &[Change], seed: &[Document]) -> (Vec<Document>, Vec<usize>) {
    let mut staging = seed.to_vec();
    let mut failed = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        let plan = plan_now(std::slice::from_ref(c), &staging);
        if plan
            .outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Failed(_)))
        {
            failed.push(i);
        }
        apply(&mut staging, &plan);
    }
    (staging, failed)
}

fn seed_docs(seeded: bool) -> Vec<Document> {
    if seeded {
        vec![doc! { "_id": "seed", "email": "e0", "acct": 1, "qa": "kept" }]
    } else {
        vec![]
    }
}

/// A staging document without its generated `_id`, for comparing outcomes.
fn normalized(mut docs: Vec<Document>) -> Vec<String> {
    let mut out: Vec<String> = docs
        .iter_mut()
        .map(|d| {
            d.remove("_id");
            let mut keys: Vec<_> = d.iter().map(|(k, v)| format!("{k}={v}")).collect();
            keys.sort();
            keys.join(";")
        })
        .collect();
    out.sort();
    out
}

/// The property of `a_batch_read_late_ends_where_one_change_at_a_time_does`.
fn read_late_ends_where_production_order_does(
    ops: &[GenOp],
    seeded: bool,
) -> Result<(), TestCaseError> {
    let seed = seed_docs(seeded);
    let truth = to_changes(
        ops,
        Emit {
            unique_keys: true,
            read_late: false,
        },
    );
    let late = to_changes(
        ops,
        Emit {
            unique_keys: true,
            read_late: true,
        },
    );
    // Every update is read from the incarnation it changed: a document deleted after an
    // update (the update is then skipped, README rule 2, or reads a re-inserted successor)
    // shows staging states production's order never had.
    prop_assume!(late.iter().enumerate().all(|(i, c)| c.op != Op::Update
        || !late[i..]
            .iter()
            .any(|d| d.op == Op::Delete && d.prod_id == c.prod_id)));
    // Production's own order, one change at a time, with nothing refused (a key held by a
    // staging-only or soft-deleted document is a collision however the batch is read).
    let (expected, refused) = stepwise(&truth, &seed);
    prop_assume!(refused.is_empty());
    let mut batched = seed.clone();
    let plan = plan_now(&late, &batched);
    apply(&mut batched, &plan);
    // `_sync.prior` records the owners a document passed through, which depends on the
    // intermediate states the events showed.
    let without_prior = |docs: Vec<Document>| {
        normalized(
            docs.into_iter()
                .map(|mut d| {
                    if let Ok(meta) = d.get_document_mut("_sync") {
                        meta.remove("prior");
                    }
                    d
                })
                .collect(),
        )
    };
    prop_assert_eq!(
        without_prior(batched),
        without_prior(expected),
        "changes: {:?}",
        late
    );
    Ok(())
}

/// Counterexamples the read-late property found while the rule was being written (each a
/// late read the first versions got wrong), replayed every time.
#[test]
fn read_late_regressions() {
    use GenOp::*;
    let u = |id, email| Upsert {
        id,
        email,
        v: 0,
        with_opt: false,
    };
    let r = |ids: &[i32]| Rotate { ids: ids.to_vec() };
    let cases: Vec<(Vec<GenOp>, bool)> = vec![
        // A staging-only holder adopted by a later insert, then moved on.
        (
            vec![
                u(0, 2),
                u(2, 1),
                r(&[0, 2]),
                r(&[0, 2]),
                r(&[0, 2]),
                u(2, 2),
                u(1, 0),
                r(&[0, 1]),
            ],
            true,
        ),
        // A holder whose excursion to another key and back is invisible when read late.
        (
            vec![
                u(2, 2),
                u(1, 1),
                r(&[1, 2]),
                u(1, 0),
                u(1, 2),
                u(3, 0),
                Delete { id: 3 },
                r(&[1, 2]),
            ],
            false,
        ),
        // A holder soft-deleted, adopted by another production document's insert, moved on.
        (
            vec![
                u(3, 1),
                u(0, 0),
                u(1, 2),
                r(&[1, 3]),
                Delete { id: 0 },
                u(2, 0),
                u(3, 2),
                r(&[1, 2]),
            ],
            false,
        ),
        // A soft-deleted holder re-inserted with its key, then moved on.
        (
            vec![
                u(1, 2),
                u(0, 1),
                Delete { id: 1 },
                u(2, 0),
                r(&[0, 2]),
                r(&[0, 2]),
                r(&[0, 2]),
                u(2, 1),
                u(1, 2),
                r(&[0, 1]),
            ],
            false,
        ),
        // A replace passing through a key a late-read update reached early.
        (
            vec![
                u(0, 1),
                u(2, 0),
                r(&[0, 2]),
                u(0, 0),
                u(0, 2),
                u(3, 0),
                r(&[0, 2]),
            ],
            false,
        ),
    ];
    for (ops, seeded) in cases {
        match read_late_ends_where_production_order_does(&ops, seeded) {
            Ok(()) => {}
            Err(TestCaseError::Reject(why)) => {
                panic!("precondition no longer holds ({why}): {ops:?}")
            }
            Err(e) => panic!("{e}: {ops:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, max_global_rejects: 100_000, ..ProptestConfig::default() })]

    /// Coalescing is invisible: planning a whole sequence as one batch gives the same staging
    /// state as planning and applying it one change at a time — key swaps and rotations
    /// included, through a unique index (`apply` checks it step by step) — and replaying it
    /// changes nothing.
    #[test]
    fn one_batch_equals_one_change_at_a_time(ops in prop::collection::vec(gen_op(), 1..24), seeded in any::<bool>()) {
        let changes = to_changes(&ops, Emit { unique_keys: false, read_late: false });
        let seed = seed_docs(seeded);

        let mut batched = seed.clone();
        let plan = plan_now(&changes, &batched);
        apply(&mut batched, &plan);

        let (stepwise, _) = stepwise(&changes, &seed);
        prop_assert_eq!(normalized(batched.clone()), normalized(stepwise), "changes: {:?}", changes);

        // A replay is a no-op — except for changes that failed (a key collision may be gone by
        // then, which is exactly what `dlq replay` relies on).
        let replay = plan_now(&changes, &batched);
        if plan.outcomes.iter().all(|o| !matches!(o, Outcome::Failed(_))) {
            prop_assert!(replay.writes.is_empty() && replay.vacate.is_empty(), "a replay writes nothing: {:?}", replay);
        }
    }

    /// The same burst read late — every update event carrying the document as it is at the end
    /// (`updateLookup`), so a swap shows both documents at their final keys before either has
    /// let go of its old one — ends in the state production's own order gives.
    #[test]
    fn a_batch_read_late_ends_where_one_change_at_a_time_does(ops in prop::collection::vec(gen_op(), 1..24), seeded in any::<bool>()) {
        read_late_ends_where_production_order_does(&ops, seeded)?;
    }

    /// Whatever production does — two live documents with one key included — a plan never
    /// trips the unique index (`apply` checks every step), and replaying a batch that fully
    /// applied changes nothing.
    #[test]
    fn any_batch_respects_the_unique_index(ops in prop::collection::vec(gen_op(), 1..24), seeded in any::<bool>(), read_late in any::<bool>()) {
        let changes = to_changes(&ops, Emit { unique_keys: false, read_late });
        let mut batched = seed_docs(seeded);
        let plan = plan_now(&changes, &batched);
        apply(&mut batched, &plan);
        if plan.outcomes.iter().all(|o| !matches!(o, Outcome::Failed(_))) {
            let replay = plan_now(&changes, &batched);
            prop_assert!(replay.writes.is_empty() && replay.vacate.is_empty(), "a replay writes nothing: {:?}", replay);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inserts written without a look-up (`fresh_inserts`), as the stream pipeline runs them.

/// The staging documents the pipeline's two look-ups return for a batch
/// (`Pipeline::fetch_existing`): by recorded production `_id` (current or prior), then by the
/// business keys still needed — leaving out the documents known to be new.
fn looked_up(
    staging: &[Document],
    changes: &[Change],
    fresh: &Fresh,
    novelty: Novelty,
) -> Vec<Document> {
    let r = rules();
    let ids: std::collections::HashSet<Vec<u8>> = changes
        .iter()
        .map(|c| canonical(&c.prod_id))
        .filter(|id| !fresh.contains(id))
        .collect();
    // Former owners only of the `_id`s with a change some run may have applied.
    let replayable: std::collections::HashSet<Vec<u8>> = changes
        .iter()
        .filter(|c| novelty.may_have_applied(c))
        .map(|c| canonical(&c.prod_id))
        .filter(|id| !fresh.contains(id))
        .collect();
    let owned_by = |d: &Document| -> bool {
        let Some(meta) = meta_of(d, "_sync") else {
            return false;
        };
        let current = meta
            .get("id")
            .is_some_and(|id| ids.contains(&canonical(id)));
        let prior = meta.get_array("prior").is_ok_and(|p| {
            p.iter()
                .filter_map(|e| e.as_document()?.get("id"))
                .any(|id| replayable.contains(&canonical(id)))
        });
        current || prior
    };
    // With `new_document_id = "production"`: documents holding the `_id` a change carrying a
    // document could create its document under.
    let creating: std::collections::HashSet<Vec<u8>> = changes
        .iter()
        .filter(|c| c.doc.is_some())
        .map(|c| canonical(&c.prod_id))
        .filter(|id| !fresh.contains(id))
        .collect();
    let mut found: Vec<Document> = staging.iter().filter(|d| owned_by(d)).cloned().collect();
    // Except where the document found for a production `_id` holds that `_id` itself.
    let settled: std::collections::HashSet<Vec<u8>> = found
        .iter()
        .filter_map(|d| {
            let id = d.get("_id")?;
            (meta_of(d, "_sync")?.get("id")? == id).then(|| canonical(id))
        })
        .collect();
    let holds_id = |d: &Document| {
        d.get("_id")
            .map(canonical)
            .is_some_and(|id| creating.contains(&id) && !settled.contains(&id))
    };
    found.extend(staging.iter().filter(|d| holds_id(d)).cloned());
    let keys: std::collections::HashSet<Vec<u8>> = r
        .keys_to_look_up(changes, &found, fresh)
        .iter()
        .map(BusinessKey::canonical)
        .collect();
    found.extend(
        staging
            .iter()
            .filter(|d| r.key_of(d).is_ok_and(|k| keys.contains(&k.canonical())))
            .cloned(),
    );
    found
}

/// Writes one step as staging does under the unique business-key index: a write that would
/// give a document a key another document holds when the step starts (or another write of the
/// step takes) is refused with a duplicate key; the indices of those writes are returned.
fn apply_step_refusing(staging: &mut Vec<Document>, writes: &[PlannedWrite]) -> Vec<usize> {
    let r = rules();
    let key = |d: &Document| r.key_of(d).ok().map(|k| k.canonical());
    let holders: HashMap<Vec<u8>, Option<Bson>> = staging
        .iter()
        .filter_map(|d| Some((key(d)?, d.get("_id").cloned())))
        .collect();
    let mut refused = Vec::new();
    let mut accepted = Vec::new();
    let mut taken = std::collections::HashSet::new();
    for (i, w) in writes.iter().enumerate() {
        let (id, after) = match &w.op {
            WriteOp::Insert(d) => (d.get("_id").cloned(), Some(d.clone())),
            WriteOp::Delete { .. } => (None, None),
            WriteOp::Update { id, set, .. } => {
                // The key after the update: from the `$set` when it moves, else unchanged.
                let mut d = staging
                    .iter()
                    .find(|d| d.get("_id") == Some(id))
                    .expect("update of a known document")
                    .clone();
                for (path, v) in set {
                    set_path(&mut d, path, v.clone());
                }
                (Some(id.clone()), Some(d))
            }
        };
        // The `_id` index: an insert under an `_id` staging holds is refused too.
        let id_taken = matches!(w.op, WriteOp::Insert(_))
            && staging
                .iter()
                .any(|d| d.get("_id").is_some() && d.get("_id") == id.as_ref());
        if id_taken {
            refused.push(i);
            continue;
        }
        if let Some(k) = after.as_ref().and_then(key) {
            let held_by_other = holders.get(&k).is_some_and(|holder| *holder != id);
            if held_by_other || !taken.insert(k) {
                refused.push(i);
                continue;
            }
        }
        accepted.push(w.clone());
    }
    apply_step(staging, &accepted);
    refused
}

/// See `a_batch_retried_after_its_reply_was_lost_ends_where_one_attempt_does`.
fn retry_changes_nothing(
    ops: &[GenOp],
    seeded: bool,
    cuts: &[usize],
    failing: usize,
) -> Result<(), TestCaseError> {
    let changes = to_changes(
        ops,
        Emit {
            unique_keys: true,
            read_late: false,
        },
    );
    prop_assume!(!changes.is_empty());
    let seed = seed_docs(seeded);
    // A change staging refuses (dead-lettered) is not applied: a retry may apply it, once
    // whatever refused it has moved. That is not a replay, so such runs are left out.
    prop_assume!(stepwise(&changes, &seed).1.is_empty());
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (changes.len() + 1)).collect();
    bounds.extend([0, changes.len()]);
    bounds.sort_unstable();
    bounds.dedup();
    let batches: Vec<&[Change]> = bounds.windows(2).map(|w| &changes[w[0]..w[1]]).collect();
    // The stream opened before every change: all of them are new to staging.
    let novelty = Novelty::InsertsAfter(Timestamp {
        time: 0,
        increment: 0,
    });
    let failing = failing % batches.len();
    let run = |fail: bool| {
        let mut staging = seed.clone();
        for (i, b) in batches.iter().enumerate() {
            let novelty = if fail && i == failing {
                attempt_with_reply_lost(&mut staging, b, novelty);
                Novelty::Unknown
            } else {
                novelty
            };
            pipeline_batch(&mut staging, b, novelty, None, 0, &mut |_| {});
        }
        normalized(staging)
    };
    prop_assert_eq!(
        run(true),
        run(false),
        "changes: {:?}; cuts: {:?}; batch {} retried",
        changes,
        bounds,
        failing
    );
    Ok(())
}

/// The look-ups and plan of a batch before anything is written (`Pipeline::plan_and_write`):
/// new documents the plan cannot write blind are looked up and the batch planned again.
fn planned(
    staging: &[Document],
    changes: &[Change],
    novelty: Novelty,
    looked_up_ahead: Option<Vec<Document>>,
) -> (Vec<Document>, Plan) {
    let r = rules();
    let mut fresh = fresh_inserts(&r, changes, novelty);
    let mut existing =
        looked_up_ahead.unwrap_or_else(|| looked_up(staging, changes, &fresh, novelty));
    loop {
        let plan = plan_batch(&r, changes, existing.clone(), DateTime::from_millis(5));
        let unsure = unsure_fresh(changes, &plan.outcomes, &fresh);
        if unsure.is_empty() {
            return (existing, plan);
        }
        fresh.retain(|id| !unsure.contains(id));
        let again: Vec<Change> = changes
            .iter()
            .filter(|c| unsure.contains(&canonical(&c.prod_id)))
            .cloned()
            .collect();
        existing.extend(looked_up(staging, &again, &fresh, novelty));
    }
}

/// The first attempt of a batch whose writes all land but whose reply is lost: its look-ups,
/// plan, temporary key moves and final writes, and no second pass for what staging refused
/// (the pipeline never learns of it; the retry plans those changes again).
///
/// An attempt that stops half-way through its final writes is not modelled: the retry then
/// starts from a state no order of production's changes produces, and in some key rotations
/// it refuses (dead-letters) a change one attempt applies.
fn attempt_with_reply_lost(staging: &mut Vec<Document>, changes: &[Change], novelty: Novelty) {
    let (_, plan) = planned(staging, changes, novelty, None);
    apply_step(staging, &plan.vacate);
    apply_step_refusing(staging, &plan.writes);
}

/// One stream batch through the pipeline's path: look-ups (new documents left out, or made
/// ahead and corrected), plan, temporary key moves, final writes; the changes of writes refused
/// with a duplicate key are planned once more with every look-up (`Pipeline::apply_batch`).
///
/// `ahead` is called once while the batch is being written, at the point `pause` picks
/// (before the temporary moves, after some of the final writes, or after the second pass): the
/// stream pipeline looks the next batch up at such a moment. The final writes are sent in two
/// parts split at that point whether or not anything runs there, so runs with and without
/// look-ups ahead send the same writes.
fn pipeline_batch(
    staging: &mut Vec<Document>,
    changes: &[Change],
    novelty: Novelty,
    looked_up_ahead: Option<Vec<Document>>,
    pause: usize,
    ahead: &mut dyn FnMut(&[Document]),
) -> (Touched, Option<Vec<Document>>) {
    let r = rules();
    let (existing, mut plan) = planned(staging, changes, novelty, looked_up_ahead);
    // As the pipeline does: the writes go out as they were encoded, the plan gives its final
    // documents up.
    let encoded = plan.clone();
    let finals = plan.take_final_documents();
    let plan = encoded;
    let mut touched = Touched::default();
    touched.record(&r, changes, &existing, &plan);
    let at = pause % (plan.writes.len() + 3);
    if at == 0 {
        ahead(staging);
    }
    apply_step(staging, &plan.vacate);
    let split = at.saturating_sub(1).min(plan.writes.len());
    let mut refused = apply_step_refusing(staging, &plan.writes[..split]);
    if (1..plan.writes.len() + 2).contains(&at) {
        ahead(staging);
    }
    refused.extend(
        apply_step_refusing(staging, &plan.writes[split..])
            .into_iter()
            .map(|i| i + split),
    );
    let mut again: Vec<usize> = refused
        .iter()
        .flat_map(|&w| plan.writes[w].changes.iter().copied())
        .collect();
    again.sort_unstable();
    if !again.is_empty() {
        let retry: Vec<Change> = again.iter().map(|&i| changes[i].clone()).collect();
        let existing = looked_up(staging, &retry, &Fresh::new(), Novelty::Unknown);
        let plan = plan_batch(&r, &retry, existing.clone(), DateTime::from_millis(5));
        touched.record(&r, &retry, &existing, &plan);
        apply_step(staging, &plan.vacate);
        // Refused again: a real collision, dead-lettered (and refused one at a time too).
        apply_step_refusing(staging, &plan.writes);
    }
    if at == plan.writes.len() + 2 {
        ahead(staging);
    }
    // Landed as planned: no write refused, no second pass. Staging then holds every final.
    if again.is_empty() {
        for f in &finals {
            let held = staging
                .iter()
                .find(|d| d.get("_id") == f.get("_id"))
                .map(|d| normalized(vec![d.clone()]));
            assert_eq!(
                held,
                Some(normalized(vec![f.clone()])),
                "a planned final state"
            );
        }
        (touched, Some(finals))
    } else {
        (touched, None)
    }
}

/// How [`run_stream`] runs the batches after the first.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Ahead {
    /// Each batch looked up after the one before it is written.
    Never,
    /// Each batch looked up while the one before it is written, corrected afterwards, as
    /// `Pipeline::follow` does (`Pipeline::work_ahead`, `Pipeline::refresh_looked_up`).
    LookUp,
    /// Each batch also planned while the one before it is written, against the final states
    /// that batch planned (`Touched::planned_after`); the plan is used when that batch landed
    /// as planned and the plan needs no further look-up, else the batch goes as in `LookUp`.
    Plan,
}

/// A stream cut into `batches` through [`pipeline_batch`], as `ahead` says.
fn run_stream(
    staging: &mut Vec<Document>,
    batches: &[&[Change]],
    novelty: Novelty,
    pauses: &[usize],
    ahead_mode: Ahead,
) {
    let r = rules();
    type Found = (Vec<Document>, Touched, Option<Vec<Document>>);
    let mut ahead: Option<Found> = None;
    for (i, changes) in batches.iter().enumerate() {
        let looked_up_ahead = ahead.take().map(|(mut found, mut touched, finals)| {
            if let (Ahead::Plan, Some(finals)) = (ahead_mode, finals) {
                let mut existing = found.clone();
                touched.planned_after(&r, changes, &mut existing, finals);
                let fresh = fresh_inserts(&r, changes, novelty);
                let plan = plan_batch(&r, changes, existing.clone(), DateTime::from_millis(5));
                if unsure_fresh(changes, &plan.outcomes, &fresh).is_empty() {
                    return existing;
                }
            }
            touched.drop_written(&r, &mut found);
            let again: Vec<Change> = changes
                .iter()
                .filter(|c| touched.meets(&r, c))
                .cloned()
                .collect();
            let fresh = fresh_inserts(&r, changes, novelty);
            found.extend(looked_up(staging, &again, &fresh, novelty));
            found
        });
        let next = batches.get(i + 1).filter(|_| ahead_mode != Ahead::Never);
        let mut found_next = None;
        let mut look_up_next = |now: &[Document]| {
            if let Some(next) = next {
                let fresh = fresh_inserts(&r, next, novelty);
                found_next = Some(looked_up(now, next, &fresh, novelty));
            }
        };
        let pause = pauses.get(i).copied().unwrap_or(0);
        let (touched, finals) = pipeline_batch(
            staging,
            changes,
            novelty,
            looked_up_ahead,
            pause,
            &mut look_up_next,
        );
        ahead = found_next.map(|found| (found, touched, finals));
    }
}

/// Cuts `changes` where `cuts` say (each modulo the length).
fn cut<'c>(changes: &'c [Change], cuts: &[usize]) -> Vec<&'c [Change]> {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (changes.len() + 1)).collect();
    bounds.extend([0, changes.len()]);
    bounds.sort_unstable();
    bounds.dedup();
    bounds.windows(2).map(|w| &changes[w[0]..w[1]]).collect()
}

/// The property of `looking_the_next_batch_up_while_writing_changes_nothing` (`ahead` is
/// `LookUp`) and of `planning_the_next_batch_while_writing_changes_nothing` (`Plan`): the
/// stream through `ahead` ends where looking every batch up after the one before does.
fn overlap_changes_nothing(
    ops: &[GenOp],
    seeded: bool,
    read_late: bool,
    cuts: &[usize],
    pauses: &[usize],
    ahead: Ahead,
) -> Result<(), TestCaseError> {
    let changes = to_changes(
        ops,
        Emit {
            unique_keys: true,
            read_late,
        },
    );
    let batches = cut(&changes, cuts);
    let horizon = Some(Timestamp {
        time: 0,
        increment: 0,
    });
    let mut sequential = seed_docs(seeded);
    run_stream(
        &mut sequential,
        &batches,
        Novelty::inserts_after(horizon),
        pauses,
        Ahead::Never,
    );
    let mut overlapped = seed_docs(seeded);
    run_stream(
        &mut overlapped,
        &batches,
        Novelty::inserts_after(horizon),
        pauses,
        ahead,
    );
    prop_assert_eq!(
        normalized(overlapped),
        normalized(sequential),
        "{:?}: changes: {:?}; batches of {:?}; pauses {:?}",
        ahead,
        changes,
        batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
        pauses
    );
    Ok(())
}

/// Production re-uses an `_id` after deleting its document: staging keeps the soft-deleted twin
/// under that `_id`. A new insert of it that the plan refuses (its key is held by a live document
/// the batch knows) reaches no staging check, so the delete after it must still find the twin —
/// the `_id` is looked up and the batch planned again instead of being written blind.
#[test]
fn a_reused_id_whose_insert_the_plan_refuses_is_looked_up_for_the_changes_after_it() {
    let fields = vec![Bson::from("email"), Bson::from("acct"), Bson::from("v")];
    let twin = doc! { "_id": 2, "email": "e0", "acct": 1, "v": 0,
    "_sync": { "id": 2, "ts": ts(3), "fields": fields.clone() },
    "deleted": true, "deletedAt": DateTime::from_millis(1_000_003) };
    let holder = doc! { "_id": 3, "email": "e2", "acct": 1, "v": 0,
    "_sync": { "id": 3, "ts": ts(6), "fields": fields } };
    let d = |id: i32, email: &str| Some(doc! { "_id": id, "email": email, "acct": 1, "v": 0 });
    let batch = vec![
        change(Op::Insert, 2, d(2, "e2"), 11),
        change(Op::Delete, 2, None, 12),
        change(Op::Replace, 3, d(3, "e1"), 14),
    ];
    let run = |replayed_until: Option<Timestamp>| {
        let mut staging = vec![twin.clone(), holder.clone()];
        pipeline_batch(
            &mut staging,
            &batch,
            Novelty::inserts_after(replayed_until),
            None,
            0,
            &mut |_| {},
        );
        staging
    };
    let blind = run(Some(ts(9)));
    let twin_after = blind
        .iter()
        .find(|d| d.get("_id") == Some(&Bson::Int32(2)))
        .expect("the twin stays");
    assert_eq!(
        twin_after
            .get_document("_sync")
            .unwrap()
            .get_timestamp("ts")
            .unwrap(),
        ts(12),
        "the delete reached the soft-deleted twin: {twin_after}"
    );
    assert_eq!(
        blind.len(),
        2,
        "no document was created for the refused insert"
    );
    assert_eq!(normalized(blind), normalized(run(None)));
}

/// The property of `blind_inserts_end_where_looking_everything_up_does`.
fn blind_inserts_change_nothing(
    ops: &[GenOp],
    seeded: bool,
    read_late: bool,
    applied_before: usize,
    replay_from: usize,
    cuts: &[usize],
) -> Result<(), TestCaseError> {
    let changes = to_changes(
        ops,
        Emit {
            unique_keys: true,
            read_late,
        },
    );
    prop_assume!(!changes.is_empty());
    let seed = seed_docs(seeded);
    // An earlier run applied a prefix and stopped without saving its position that far: this
    // run replays from an earlier checkpoint. Production's time at the stream's opening is at
    // least that of the last change applied.
    let applied = applied_before % (changes.len() + 1);
    let from = replay_from % (applied + 1);
    let (before, _) = stepwise(&changes[..applied], &seed);
    let horizon = match applied {
        0 => Timestamp {
            time: 0,
            increment: 0,
        },
        n => changes[n - 1].cluster_time,
    };
    // The rest of the stream, in batches cut where the generator says.
    let rest = &changes[from..];
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (rest.len() + 1)).collect();
    bounds.extend([0, rest.len()]);
    bounds.sort_unstable();
    bounds.dedup();
    let batches: Vec<&[Change]> = bounds.windows(2).map(|w| &rest[w[0]..w[1]]).collect();
    let run = |horizon: Option<Timestamp>| {
        let mut staging = before.clone();
        run_stream(
            &mut staging,
            &batches,
            Novelty::inserts_after(horizon),
            &[],
            Ahead::Never,
        );
        if read_late {
            // `_sync.prior` records the last change of an earlier owner that was applied, which
            // depends on the intermediate states late reads show (as in the read-late property).
            for d in &mut staging {
                if let Ok(meta) = d.get_document_mut("_sync") {
                    meta.remove("prior");
                }
            }
        }
        normalized(staging)
    };
    let looked_up_everything = run(None);
    prop_assert_eq!(
        run(Some(horizon)),
        looked_up_everything.clone(),
        "changes: {:?}; applied before: {}; replayed from: {}; cuts: {:?}",
        changes,
        applied,
        from,
        bounds
    );
    // Without a replay, both also end where production's order does.
    if applied == 0 && !read_late {
        let (expected, _) = stepwise(&changes, &seed);
        prop_assert_eq!(
            looked_up_everything,
            normalized(expected),
            "changes: {:?}; cuts: {:?}",
            changes,
            bounds
        );
    }
    Ok(())
}

/// The property of `a_first_snapshot_written_blind_ends_where_looking_everything_up_does`:
/// production documents `(email, v)` under `_id`s 0, 1, … (their business keys may repeat: a
/// production without the unique index), copied in batches cut at `cuts` into a staging
/// collection holding nothing from production — but, per `holders`, staging-only documents on
/// key `e0` (to adopt) and under `_id` 1 (a new document must take another `_id`).
fn blind_snapshot_changes_nothing(
    docs: &[(u8, i32)],
    holders: (bool, bool),
    cuts: &[usize],
) -> Result<(), TestCaseError> {
    let copies: Vec<Change> = docs
        .iter()
        .enumerate()
        .map(|(id, (email, v))| {
            let id = id as i32;
            let d = doc! { "_id": id, "email": format!("e{email}"), "acct": 1, "v": *v };
            change(Op::Replace, id, Some(d), 1)
        })
        .collect();
    let mut seed = Vec::new();
    if holders.0 {
        seed.push(doc! { "_id": "qa", "email": "e0", "acct": 1, "qa": "kept" });
    }
    if holders.1 {
        seed.push(doc! { "_id": 1, "email": "staging-only", "acct": 1 });
    }
    let batches = cut(&copies, cuts);
    let run = |novelty: Novelty| {
        let mut staging = seed.clone();
        for batch in &batches {
            pipeline_batch(&mut staging, batch, novelty, None, 0, &mut |_| {});
        }
        normalized(staging)
    };
    prop_assert_eq!(
        run(Novelty::Everything),
        run(Novelty::Unknown),
        "copies: {:?}; batches of {:?}",
        copies,
        batches.iter().map(|b| b.len()).collect::<Vec<_>>()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, max_global_rejects: 100_000, ..ProptestConfig::default() })]

    /// Writing new documents without looking them up changes nothing: a stream (its updates
    /// read late or not) cut into random batches, resumed after a run that applied part of it (so some inserts are replays), with
    /// staging's unique index refusing blind inserts onto held keys (adoptions, revivals,
    /// collisions go down the slow path), ends where looking every document up does — and,
    /// without a replay, where planning one change at a time does.
    #[test]
    fn blind_inserts_end_where_looking_everything_up_does(
        ops in prop::collection::vec(gen_op(), 1..24),
        seeded in any::<bool>(),
        read_late in any::<bool>(),
        applied_before in any::<usize>(),
        replay_from in any::<usize>(),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
    ) {
        blind_inserts_change_nothing(&ops, seeded, read_late, applied_before, replay_from, &cuts)?;
    }

    /// A first snapshot written without look-ups changes nothing: documents whose keys repeat
    /// (collisions), staging-only documents to adopt by key or holding a production `_id`, any
    /// batch cuts — it ends where looking every document up does.
    #[test]
    fn a_first_snapshot_written_blind_ends_where_looking_everything_up_does(
        docs in prop::collection::vec((0u8..5, 0i32..2), 1..24),
        holders in any::<(bool, bool)>(),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
    ) {
        blind_snapshot_changes_nothing(&docs, holders, &cuts)?;
    }

    /// A batch retried after an attempt whose writes all landed but whose reply was lost (a
    /// connection dropped, a write concern not met in time) ends where one attempt does: the
    /// retry looks everything up, former owners included (`Pipeline::apply_with_retry`), so the
    /// changes the first attempt applied — those an adoption recorded in `_sync.prior` too —
    /// are no-ops. Retried with the stream's novelty instead, it fails: a former owner's
    /// change after the horizon would not find the `prior` record saying it was applied.
    /// (Runs where staging refuses a change are left out: a retry may apply what one attempt
    /// refused.)
    #[test]
    fn a_batch_retried_after_its_reply_was_lost_ends_where_one_attempt_does(
        ops in prop::collection::vec(gen_op(), 1..24),
        seeded in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
        failing in any::<usize>(),
    ) {
        retry_changes_nothing(&ops, seeded, &cuts, failing)?;
    }

    /// Looking a batch up while the one before it is being written, then dropping what that
    /// batch wrote and looking the changes that can meet it up again, gives the plan the same
    /// staging documents as looking up after it: whatever the batch cuts, the point of the
    /// writes at which the look-ups run, key rotations, adoptions and blind inserts.
    #[test]
    fn looking_the_next_batch_up_while_writing_changes_nothing(
        ops in prop::collection::vec(gen_op(), 1..24),
        seeded in any::<bool>(),
        read_late in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
        pauses in prop::collection::vec(any::<usize>(), 0..7),
    ) {
        overlap_changes_nothing(&ops, seeded, read_late, &cuts, &pauses, Ahead::LookUp)?;
    }

    /// Planning a batch while the one before it is being written, against the documents that
    /// batch plans to leave (its finals in place of what it wrote among the look-ups made
    /// meanwhile), and using that plan when the batch landed as planned, ends where looking
    /// every batch up after the one before does: whatever the cuts, the point of the writes at
    /// which the look-ups run, key rotations, adoptions, blind inserts and refusals.
    #[test]
    fn planning_the_next_batch_while_writing_changes_nothing(
        ops in prop::collection::vec(gen_op(), 1..24),
        seeded in any::<bool>(),
        read_late in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
        pauses in prop::collection::vec(any::<usize>(), 0..7),
    ) {
        overlap_changes_nothing(&ops, seeded, read_late, &cuts, &pauses, Ahead::Plan)?;
    }
}

#[test]
fn a_new_document_takes_its_production_id_unless_staging_holds_it() {
    let r = rules();
    // A staging-only document that happens to hold production `_id` 2.
    let staging_only = doc! { "_id": 2, "email": "z", "acct": 9, "qa": "mine" };
    let changes = vec![
        change(
            Op::Insert,
            1,
            Some(doc! { "_id": 1, "email": "a", "acct": 1 }),
            1,
        ),
        change(
            Op::Insert,
            2,
            Some(doc! { "_id": 2, "email": "b", "acct": 1 }),
            2,
        ),
    ];
    let plan = plan_batch(&r, &changes, vec![staging_only.clone()], DateTime::now());
    assert_eq!(plan.outcomes, vec![Outcome::Applied, Outcome::Applied]);
    assert_eq!(plan.fresh_ids, vec![1], "only the taken id is counted");
    let inserted: Vec<&Document> = plan
        .writes
        .iter()
        .filter_map(|w| match &w.op {
            WriteOp::Insert(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(inserted.len(), 2, "{plan:?}");
    let of = |email: &str| {
        inserted
            .iter()
            .find(|d| d.get_str("email") == Ok(email))
            .unwrap()
    };
    assert_eq!(of("a").get("_id"), Some(&Bson::Int32(1)));
    assert!(matches!(of("b").get("_id"), Some(Bson::ObjectId(_))));
    // The staging-only document is not written at all.
    assert!(plan
        .writes
        .iter()
        .all(|w| !matches!(&w.op, WriteOp::Update { id, .. } if *id == Bson::Int32(2))));

    // "generate": always fresh, nothing counted.
    let generate = Rules {
        new_id: NewDocumentId::Generate,
        ..rules()
    };
    let plan = plan_batch(&generate, &changes[..1], vec![], DateTime::now());
    assert!(plan.fresh_ids.is_empty());
    assert!(
        matches!(&plan.writes[0].op, WriteOp::Insert(d) if matches!(d.get("_id"), Some(Bson::ObjectId(_))))
    );

    // An adopted document keeps its staging `_id`.
    let adoptable = doc! { "_id": "s1", "email": "a", "acct": 1 };
    let plan = plan_batch(&r, &changes[..1], vec![adoptable], DateTime::now());
    assert!(matches!(&plan.writes[0].op, WriteOp::Update { id, .. } if *id == Bson::from("s1")));
}

#[test]
fn the_id_lookup_includes_staging_ids_only_for_production_ids() {
    let changes = vec![change(
        Op::Insert,
        1,
        Some(doc! { "_id": 1, "email": "a", "acct": 1 }),
        1,
    )];
    assert_eq!(
        rules().id_holder_filter(&changes, &Fresh::new(), &[]),
        Some(doc! { "_id": { "$in": [1] } })
    );
    let generate = Rules {
        new_id: NewDocumentId::Generate,
        ..rules()
    };
    assert_eq!(
        generate.id_holder_filter(&changes, &Fresh::new(), &[]),
        None
    );
}
