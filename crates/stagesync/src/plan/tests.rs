//! Unit and property tests of the pure planning core (no servers: the planner does no I/O).

use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use proptest::prelude::*;

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

/// Applies planned writes to an in-memory staging collection, as the server would.
fn apply(staging: &mut Vec<Document>, plan: &Plan) {
    for w in &plan.writes {
        match &w.op {
            WriteOp::Insert(d) => staging.push(d.clone()),
            WriteOp::Delete { id } => staging.retain(|d| d.get("_id") != Some(id)),
            WriteOp::Update { id, set, unset } => {
                let d = staging
                    .iter_mut()
                    .find(|d| d.get("_id") == Some(id))
                    .expect("update of a known document");
                for (path, v) in set {
                    set_path(d, path, v.clone());
                }
                for (path, _) in unset {
                    unset_path(d, path);
                }
            }
        }
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
    let keys = r.keys_to_look_up(&changes, &found);
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
        r.id_filter(&changes).unwrap(),
        doc! { "$or": [{ "_sync.id": { "$in": [1, 2, 3] } }, { "_sync.prior.id": { "$in": [1, 2, 3] } }] }
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
}

fn gen_op() -> impl Strategy<Value = GenOp> {
    prop_oneof![
        4 => (0..4i32, 0..3u8, 0..100i32, any::<bool>()).prop_map(|(id, email, v, with_opt)| GenOp::Upsert { id, email, v, with_opt }),
        1 => (0..4i32).prop_map(|id| GenOp::Delete { id }),
    ]
}

/// Turns generated operations into the change events production would emit.
fn to_changes(ops: &[GenOp]) -> Vec<Change> {
    let mut live = std::collections::HashSet::new();
    ops.iter()
        .enumerate()
        .filter_map(|(n, op)| match op {
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
                let kind = if live.insert(*id) {
                    Op::Insert
                } else {
                    Op::Replace
                };
                Some(change(kind, *id, Some(d), n as u32 + 1))
            }
            GenOp::Delete { id } => live
                .remove(id)
                .then(|| change(Op::Delete, *id, None, n as u32 + 1)),
        })
        .collect()
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Coalescing is invisible: planning a whole sequence as one batch gives the same staging
    /// state as planning and applying it one change at a time — and replaying it changes nothing.
    #[test]
    fn one_batch_equals_one_change_at_a_time(ops in prop::collection::vec(gen_op(), 1..24), seeded in any::<bool>()) {
        let changes = to_changes(&ops);
        let seed = if seeded { vec![doc! { "_id": "seed", "email": "e0", "acct": 1, "qa": "kept" }] } else { vec![] };

        let mut batched = seed.clone();
        let plan = plan_now(&changes, &batched);
        apply(&mut batched, &plan);

        let mut stepwise = seed.clone();
        for c in &changes {
            let plan = plan_now(std::slice::from_ref(c), &stepwise);
            apply(&mut stepwise, &plan);
        }
        prop_assert_eq!(normalized(batched.clone()), normalized(stepwise), "changes: {:?}", changes);

        // A replay is a no-op — except for changes that failed (a key collision may be gone by
        // then, which is exactly what `dlq replay` relies on).
        let replay = plan_now(&changes, &batched);
        if plan.outcomes.iter().all(|o| !matches!(o, Outcome::Failed(_))) {
            prop_assert!(replay.writes.is_empty(), "a replay writes nothing: {:?}", replay.writes);
        }
    }
}
