//! Deterministic, keyed masking of personal data.
//!
//! A [`Masker`] holds the masking rules of one collection (`[collections.mask]`: field path →
//! rule name) together with the `[masking]` settings, and rewrites production documents and
//! update descriptions before anything else sees them.
//!
//! # Determinism
//!
//! Every keyed rule (`hash`, `email`, `name`, `phone`) is derived from
//! `HMAC-SHA256(key, rule name || 0x00 || canonical bytes of the value)`. The rule name separates
//! the rules from one another (the `hash` and the `email` of one address are unrelated), but
//! neither the field path nor the collection takes part: the same value masks to the same output
//! wherever it appears, in every process using the same key, so joins on masked fields keep
//! working in staging.
//!
//! Canonical bytes: a string is its UTF-8 bytes (lowercased for `email`, reduced to its digits
//! for `phone` when it has any). Any other scalar is `0xFF` (never part of UTF-8, so no string
//! collides with it), a type tag and a fixed encoding; integral `Int32`, `Int64` and `Double`
//! values share one encoding, so `5`, `5i64` and `5.0` mask identically as MongoDB compares them
//! equal.
//!
//! # Paths
//!
//! Rule paths are dotted; `*` matches any one key of a document or element of an array; a plain
//! name descends through arrays implicitly (`items.sku` reaches `items.3.sku`); a numeric segment
//! addresses one array element (or a key spelled that way in a document). A top-level `*` never
//! matches `_id`.
//!
//! When several rules reach a value (through the value itself or one of its ancestors) the most
//! specific one wins: the longer path, then, from the left, a literal segment over `*`. `null` and
//! `remove` replace the whole value where they win, which makes every rule below them moot; `keep`
//! leaves the value as it is but more specific rules below it still apply; `hash`, `email`,
//! `name`, `phone` and `redact` rewrite every scalar leaf below where they win. Null values and
//! missing fields are never touched (nothing is ever created).
//!
//! # Personal values: masking follows values, not only paths
//!
//! Rules name paths, but production operators move values between paths: `$rename` (the event
//! says `removedFields: [ssn]`, `updatedFields: {legacySsn: <raw>}`), pipeline updates copying
//! a field (`$set: {copy: "$ssn"}`), a replace or `$set` writing the same value under another
//! name. Masking applies to the document as staging will hold it, after every operator:
//!
//! - a **personal value** is a raw scalar that a rule other than `keep` masks — by its path, in
//!   the event's document or update description (for `_id` too, when a rule names it);
//! - every scalar that **no rule reaches** (not `_id`, not under `keep`) and whose value equals a
//!   personal value of the same event is masked with that value's rule ([`Masker::mask_event`]);
//! - the document's personal values are recorded in staging as keyed fingerprints
//!   (`_sync.pii: ["<rule>:<hex>"]`, 128 bits of `HMAC(key, "fingerprint" || 0x00 ||
//!   canonical bytes)`: as one-way as `hash`, never the value). A later event of the same
//!   document — whose masked path may be gone, as after a `$rename` — masks every unruled
//!   scalar whose fingerprint is recorded ([`Masker::mask_known_values`], called by the planning
//!   stage with the staging document in hand), and records it again; a fingerprint is dropped
//!   once the document no longer holds its value anywhere.
//!
//! Equality is the canonical one of the keyed rules (type-aware; `5`, `5i64`, `5.0` are equal;
//! strings exactly). Strings (not empty), numbers, dates, ObjectIds, binaries and timestamps can
//! be personal; `null`, booleans and empty strings never are. One value personal under several
//! rules is masked with the one that reveals least (remove, null, redact, hash, email, name,
//! phone). The rule over-approximates: an unrelated field that happens to hold the same value
//! (a quantity equal to a masked age) is masked too — give such a path `keep` to exempt it.
//! What it cannot see: values derived by computation (a substring, `$toUpper`, a concatenation)
//! and a move that happened in production before stagesync ever saw the value at its masked
//! path (add a rule for the new path, then `stagesync snapshot`).
//!
//! # `_id`
//!
//! `"_id" = "hash"` masks the production `_id` wherever staging would see it: the document,
//! the change's id, `_sync.id`, dead letters, logs ([`Masker::mask_id`]; a rule that would
//! remove or null it acts as `hash`). Deterministic, so a production document keeps one staging
//! identity. A top-level `*` never reaches `_id`.
//!
//! Values are never logged: nothing in this module formats a value, and `Debug` shows the rule
//! paths, not the key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use mongodb::bson::{Bson, Document};
use sha2::Sha256;

use crate::config::{MaskRule, MaskingSettings};

type HmacSha256 = Hmac<Sha256>;

/// The masking rules of one collection, ready to apply. Cheap to clone (shared behind an `Arc`).
#[derive(Clone, Default)]
pub struct Masker {
    /// `None` when no rule would change anything.
    inner: Option<Arc<Inner>>,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("Masker { rules: [] }"),
            Some(inner) => inner.fmt(f),
        }
    }
}

impl Masker {
    /// Builds a masker; `rules` maps field paths (dots, `*` wildcards) to rule names already
    /// validated by the config. `settings` is `None` only when `rules` is empty.
    ///
    /// Rule names that do not parse and empty paths are ignored (the config rejects both). Should
    /// rules come without settings anyway, a random per-process key is used: the output is then not
    /// stable across processes, but never an unkeyed (dictionary-reversible) hash of the value.
    pub fn new(settings: Option<&MaskingSettings>, rules: &BTreeMap<String, String>) -> Masker {
        let mut parsed: Vec<Rule> = rules
            .iter()
            .filter(|(path, _)| !path.is_empty())
            .filter_map(|(path, name)| {
                let action = MaskRule::parse(name.trim())?;
                Some(Rule {
                    path: path.clone(),
                    segs: path.split('.').map(Seg::parse).collect(),
                    action,
                })
            })
            .collect();
        if parsed.iter().all(|r| r.action == MaskRule::Keep) {
            return Masker::default();
        }
        // Rule ids are ranks: the higher the id, the more specific the rule.
        parsed.sort_by(|a, b| {
            a.segs
                .len()
                .cmp(&b.segs.len())
                .then_with(|| {
                    let lit = |r: &Rule| r.segs.iter().map(|s| !s.is_any()).collect::<Vec<_>>();
                    lit(a).cmp(&lit(b))
                })
                .then_with(|| a.path.cmp(&b.path))
        });

        let mut by_first: HashMap<String, Vec<u32>> = HashMap::new();
        let mut any_first = Vec::new();
        for (id, rule) in parsed.iter().enumerate() {
            let id = id as u32;
            match &rule.segs[0] {
                Seg::Any => any_first.push(id),
                Seg::Key { name, .. } => by_first.entry(name.clone()).or_default().push(id),
            }
        }

        let (mac, email_domain, redact_text) = match settings {
            Some(s) => (
                keyed_mac(s.key.as_bytes()),
                s.email_domain.clone(),
                s.redact_text.clone(),
            ),
            None => (
                keyed_mac(&rand::random::<[u8; 32]>()),
                "example.com".to_owned(),
                "[redacted]".to_owned(),
            ),
        };
        Masker {
            inner: Some(Arc::new(Inner {
                masks_id: parsed
                    .iter()
                    .any(|r| r.action != MaskRule::Keep && r.path.split('.').next() == Some("_id")),
                rules: parsed,
                by_first,
                any_first,
                mac,
                email_domain,
                redact_text,
            })),
        }
    }

    /// True when no rule would change anything.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// True when a rule reaches the production `_id` (`"_id" = "hash"`, or a rule below it for
    /// compound ids): change ids, recorded `_sync.id`s and dead letters then hold the masked id.
    pub fn masks_id(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.masks_id)
    }

    /// The production `_id` as staging sees it: masked when a rule reaches `_id`, else as it is.
    ///
    /// Deterministic, so the same production document always maps to the same id. A rule that
    /// would remove the id or make it `null` (which would merge every document into one) is
    /// applied as `hash` instead; config validation should only accept `hash` for `_id`.
    pub fn mask_id(&self, id: Bson) -> Bson {
        match &self.inner {
            Some(inner) if inner.masks_id => inner.mask_id(id),
            _ => id,
        }
    }

    /// Masks a whole document in place (paths are relative to its root), then the copies of its
    /// personal values found elsewhere in it (see *Personal values* in the module documentation).
    pub fn mask_document(&self, doc: &mut Document) {
        self.mask_event(Some(doc), None);
    }

    /// Masks one production event in place — the document after the change and the update
    /// description's `updatedFields`, either may be absent — and returns the fingerprints of its
    /// personal values (to record in `_sync.pii`; see *Personal values* in the module documentation).
    ///
    /// 1. Every rule applies by path, to the document and to each updated path.
    /// 2. Every scalar no rule reaches (not `_id`, not under `keep`) whose value equals a value
    ///    step 1 masked anywhere in the event is masked with that value's rule.
    pub fn mask_event(
        &self,
        full: Option<&mut Document>,
        updated: Option<&mut Document>,
    ) -> Vec<String> {
        let Some(inner) = &self.inner else {
            return vec![];
        };
        let mut personal = Personal::new();
        let (mut full, mut updated) = (full, updated);
        // 1. Raw personal values, before anything is masked.
        if let Some(d) = full.as_deref_mut() {
            inner.collect_document(d, &mut personal);
        }
        if let Some(u) = updated.as_deref_mut() {
            inner.collect_updated(u, &mut personal);
        }
        // 2. Path rules.
        if let Some(d) = full.as_deref_mut() {
            inner.mask_paths(d);
        }
        if let Some(u) = updated.as_deref_mut() {
            self.mask_updated_fields(u);
        }
        // 3. Copies of personal values under paths no rule names.
        if !personal.is_empty() {
            let mut mask_copy =
                |v: &mut Bson| match candidate_bytes(v).and_then(|c| personal.get(&c)) {
                    Some(&rule) => inner.apply_rule(v, rule),
                    None => true,
                };
            if let Some(d) = full {
                inner.walk_unruled_document(d, &mut mask_copy);
            }
            if let Some(u) = updated {
                inner.walk_unruled_updated(u, &mut mask_copy);
            }
        }
        let mut out: Vec<String> = personal
            .iter()
            .map(|(bytes, rule)| fingerprint_text(*rule, &inner.fingerprint(bytes)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Masks, in an already masked event, every scalar no rule reaches whose value has one of
    /// `fingerprints` (`"<rule>:<hex>"`, from [`Masker::mask_event`] of an earlier event of the
    /// same document): values that left a masked path — `$rename`, a pipeline copy — and are
    /// not in this event's masked paths any more. Returns the fingerprints found (sorted).
    ///
    /// Idempotent: a masked value never has the fingerprint of a raw one.
    pub fn mask_known_values(
        &self,
        full: Option<&mut Document>,
        updated: Option<&mut Document>,
        fingerprints: &[String],
    ) -> Vec<String> {
        let Some(inner) = &self.inner else {
            return vec![];
        };
        let mut wanted: HashMap<[u8; FINGERPRINT_BYTES], MaskRule> = HashMap::new();
        for text in fingerprints {
            if let Some((rule, fp)) = parse_fingerprint(text) {
                let slot = wanted.entry(fp).or_insert(rule);
                *slot = stronger(*slot, rule);
            }
        }
        if wanted.is_empty() {
            return vec![];
        }
        let mut found: Vec<String> = Vec::new();
        let mut mask_known = |v: &mut Bson| {
            let Some(bytes) = candidate_bytes(v) else {
                return true;
            };
            let fp = inner.fingerprint(&bytes);
            match wanted.get(&fp) {
                Some(&rule) => {
                    found.push(fingerprint_text(rule, &fp));
                    inner.apply_rule(v, rule)
                }
                None => true,
            }
        };
        if let Some(d) = full {
            inner.walk_unruled_document(d, &mut mask_known);
        }
        if let Some(u) = updated {
            inner.walk_unruled_updated(u, &mut mask_known);
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Masks an update description's `updatedFields` in place: keys are dotted paths
    /// (`"shipping.street"`, `"shipping"`, `"payments.0.cardNumber"`), values what they were set to.
    ///
    /// Rules under a key mask inside its value; a rule at or above a key applies to the value as a
    /// whole (numeric segments of the key are array indices, matched by `*` or the same number).
    /// A key is dropped when a `remove` rule wins on it, or when `null`/`remove` wins on one of its
    /// ancestors (the masked document has no such field to set). Path rules only: use
    /// [`Masker::mask_event`] for a whole event.
    pub fn mask_updated_fields(&self, updated: &mut Document) {
        let Some(inner) = &self.inner else { return };
        let mut removed: Vec<String> = Vec::new();
        for (key, value) in updated.iter_mut() {
            if !inner.mask_at_path(key, value) {
                removed.push(key.clone());
            }
        }
        for key in removed {
            updated.remove(key);
        }
    }

    /// Masks one value found at `path` (dotted); returns `None` when the rule removes it.
    pub fn mask_value(&self, path: &str, value: Bson) -> Option<Bson> {
        let Some(inner) = &self.inner else {
            return Some(value);
        };
        let mut value = value;
        inner.mask_at_path(path, &mut value).then_some(value)
    }
}

/// Bytes of a fingerprint: 128 bits of `HMAC-SHA256(key, "fingerprint" || 0x00 || canonical)`.
const FINGERPRINT_BYTES: usize = 16;

/// Raw personal values of one event (canonical bytes) and the rule that masked each.
type Personal = HashMap<Vec<u8>, MaskRule>;

fn fingerprint_text(rule: MaskRule, fp: &[u8; FINGERPRINT_BYTES]) -> String {
    format!("{}:{}", rule.as_str(), hex::encode(fp))
}

fn parse_fingerprint(text: &str) -> Option<(MaskRule, [u8; FINGERPRINT_BYTES])> {
    let (rule, hex_fp) = text.split_once(':')?;
    let rule = MaskRule::parse(rule).filter(|r| *r != MaskRule::Keep)?;
    let bytes = hex::decode(hex_fp).ok()?;
    Some((rule, bytes.try_into().ok()?))
}

/// When one value is personal under two rules, the one that reveals least wins (a fixed order,
/// so the outcome does not depend on field order).
fn stronger(a: MaskRule, b: MaskRule) -> MaskRule {
    let rank = |r: MaskRule| match r {
        MaskRule::Remove => 0,
        MaskRule::Null => 1,
        MaskRule::Redact => 2,
        MaskRule::Hash => 3,
        MaskRule::Email => 4,
        MaskRule::Name => 5,
        MaskRule::Phone => 6,
        MaskRule::Keep => 7,
    };
    if rank(b) < rank(a) {
        b
    } else {
        a
    }
}

/// Records a raw value masked by `action` as personal (keep and no rule: not personal).
fn note_personal(personal: &mut Personal, value: &Bson, action: Option<MaskRule>) {
    let Some(rule) = action.filter(|a| *a != MaskRule::Keep) else {
        return;
    };
    if let Some(bytes) = candidate_bytes(value) {
        let slot = personal.entry(bytes).or_insert(rule);
        *slot = stronger(*slot, rule);
    }
}

/// The canonical bytes of a value that can carry personal data by itself: strings (not empty),
/// numbers, dates, ObjectIds, binaries, timestamps… — not `null`, booleans, min/max keys, or
/// documents and arrays (their leaves count one by one).
fn candidate_bytes(v: &Bson) -> Option<Vec<u8>> {
    match v {
        Bson::Null
        | Bson::Undefined
        | Bson::Boolean(_)
        | Bson::MinKey
        | Bson::MaxKey
        | Bson::Document(_)
        | Bson::Array(_) => None,
        Bson::String(s) if s.is_empty() => None,
        other => {
            let mut out = Vec::new();
            feed_canonical(&mut out, other);
            Some(out)
        }
    }
}

fn keyed_mac(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// One segment of a rule path.
enum Seg {
    /// `*`: any key of a document, any element of an array.
    Any,
    /// A literal key; `index` is set when it also reads as an array index (`0`, `12`).
    Key { name: String, index: Option<usize> },
}

impl Seg {
    fn parse(s: &str) -> Seg {
        if s == "*" {
            Seg::Any
        } else {
            Seg::Key {
                name: s.to_owned(),
                index: parse_index(s),
            }
        }
    }

    fn is_any(&self) -> bool {
        matches!(self, Seg::Any)
    }
}

/// `"0"`, `"17"` → an array index; anything else (including `"+1"`, `"01"`, `""`) → `None`.
fn parse_index(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) || (b.len() > 1 && b[0] == b'0') {
        return None;
    }
    s.parse().ok()
}

struct Rule {
    path: String,
    segs: Vec<Seg>,
    action: MaskRule,
}

/// A rule partly matched: `segs[..pos]` consumed by the path walked so far.
#[derive(Debug, Clone, Copy)]
struct State {
    rule: u32,
    pos: u32,
}

struct Inner {
    /// Sorted by specificity: a rule's index is its rank.
    rules: Vec<Rule>,
    /// Rules by their first segment, when it is literal.
    by_first: HashMap<String, Vec<u32>>,
    /// Rules starting with `*`.
    any_first: Vec<u32>,
    /// Keyed once; cloned for every value.
    mac: HmacSha256,
    email_domain: String,
    redact_text: String,
    /// Some rule other than `keep` reaches `_id`.
    masks_id: bool,
}

/// Where a dotted path of `updatedFields` starts in the rules.
enum PathStart {
    /// `null` or `remove` wins on the path or an ancestor: the masked document has no such field.
    Dropped(MaskRule),
    /// The rules still matching at the path, and the winner among those that ended above it.
    At(Vec<State>, Option<u32>),
}

/// Called on a scalar leaf with the action of the rule that wins on it (`None`: no rule reaches
/// it); returns false to remove the leaf.
type LeafFn<'f> = dyn FnMut(&mut Bson, Option<MaskRule>) -> bool + 'f;

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        let rules: Vec<String> = self
            .rules
            .iter()
            .map(|r| format!("{} = {}", r.path, r.action))
            .collect();
        f.debug_struct("Masker")
            .field("rules", &rules)
            .field("email_domain", &self.email_domain)
            .field("redact_text", &self.redact_text)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn action(&self, rule: Option<u32>) -> Option<MaskRule> {
        rule.map(|r| self.rules[r as usize].action)
    }

    fn is_done(&self, s: State) -> bool {
        s.pos as usize == self.rules[s.rule as usize].segs.len()
    }

    /// Folds the rules that end at this node into the winner inherited from above; also tells
    /// whether some rule continues below.
    fn fold(&self, states: &[State], inherited: Option<u32>) -> (Option<u32>, bool) {
        let mut winner = inherited;
        let mut active = false;
        for &s in states {
            if self.is_done(s) {
                winner = winner.max(Some(s.rule));
            } else {
                active = true;
            }
        }
        (winner, active)
    }

    /// States after the first segment `key` of a path from the document root.
    fn root_step(&self, key: &str, out: &mut Vec<State>) {
        if let Some(ids) = self.by_first.get(key) {
            out.extend(ids.iter().map(|&rule| State { rule, pos: 1 }));
        }
        if key != "_id" {
            out.extend(self.any_first.iter().map(|&rule| State { rule, pos: 1 }));
        }
    }

    /// States after descending into the document key `key`.
    fn step_key(&self, states: &[State], key: &str, out: &mut Vec<State>) {
        for &s in states {
            match self.rules[s.rule as usize].segs.get(s.pos as usize) {
                Some(Seg::Any) => out.push(State {
                    pos: s.pos + 1,
                    ..s
                }),
                Some(Seg::Key { name, .. }) if name == key => out.push(State {
                    pos: s.pos + 1,
                    ..s
                }),
                _ => {}
            }
        }
    }

    /// States after descending into element `index` of an array: `*` and the same number consume
    /// the index, a plain name waits for the element's keys (implicit array traversal).
    fn step_index(&self, states: &[State], index: usize, out: &mut Vec<State>) {
        for &s in states {
            match self.rules[s.rule as usize].segs.get(s.pos as usize) {
                Some(Seg::Any) => out.push(State {
                    pos: s.pos + 1,
                    ..s
                }),
                Some(Seg::Key { index: Some(i), .. }) if *i == index => out.push(State {
                    pos: s.pos + 1,
                    ..s
                }),
                Some(Seg::Key { index: None, .. }) => out.push(s),
                _ => {}
            }
        }
    }

    /// States after a segment of an `updatedFields` key, where the container is unknown: a
    /// numeric segment may be an array index or a key.
    fn step_path_seg(&self, states: &[State], seg: &str, out: &mut Vec<State>) {
        let is_index = parse_index(seg).is_some();
        for &s in states {
            match self.rules[s.rule as usize].segs.get(s.pos as usize) {
                Some(Seg::Any) => out.push(State {
                    pos: s.pos + 1,
                    ..s
                }),
                Some(Seg::Key { name, .. }) if name == seg => out.push(State {
                    pos: s.pos + 1,
                    ..s
                }),
                Some(Seg::Key { index: None, .. }) if is_index => out.push(s),
                _ => {}
            }
        }
    }

    /// Where `path` (dotted, from the document root; numeric segments may be array indices)
    /// stands in the rules.
    fn path_start(&self, path: &str) -> PathStart {
        let mut segs = path.split('.');
        let first = segs.next().unwrap_or_default();
        let mut states = Vec::new();
        self.root_step(first, &mut states);
        let mut inherited = None;
        let mut next = Vec::new();
        for seg in segs {
            if states.is_empty() {
                break;
            }
            let (winner, active) = self.fold(&states, inherited);
            inherited = winner;
            if let Some(a @ (MaskRule::Null | MaskRule::Remove)) = self.action(inherited) {
                // An ancestor is null or gone in the masked document: nothing to set under it.
                return PathStart::Dropped(a);
            }
            next.clear();
            if active {
                self.step_path_seg(&states, seg, &mut next);
            }
            std::mem::swap(&mut states, &mut next);
        }
        PathStart::At(states, inherited)
    }

    /// Masks the value at dotted `path` (from the document root). False when it must be dropped.
    fn mask_at_path(&self, path: &str, value: &mut Bson) -> bool {
        match self.path_start(path) {
            PathStart::Dropped(_) => false,
            PathStart::At(states, inherited) => self.apply_node(value, &states, inherited),
        }
    }

    /// The masked production `_id` (see [`Masker::mask_id`]).
    fn mask_id(&self, id: Bson) -> Bson {
        let mut masked = id.clone();
        if self.mask_at_path("_id", &mut masked) && masked != Bson::Null {
            return masked;
        }
        let mut hashed = id;
        self.mask_all(&mut hashed, MaskRule::Hash);
        hashed
    }

    /// Path rules on a whole document (`_id` through [`Inner::mask_id`]).
    fn mask_paths(&self, doc: &mut Document) {
        let mut states = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        for (key, value) in doc.iter_mut() {
            if key == "_id" {
                if self.masks_id {
                    *value = self.mask_id(std::mem::replace(value, Bson::Null));
                }
                continue;
            }
            states.clear();
            self.root_step(key, &mut states);
            if states.is_empty() {
                continue;
            }
            if !self.apply_node(value, &states, None) {
                removed.push(key.clone());
            }
        }
        for key in removed {
            doc.remove(key);
        }
    }

    /// Adds the raw values a rule masks in a whole (unmasked) document to `personal`.
    fn collect_document(&self, doc: &mut Document, personal: &mut Personal) {
        let mut states = Vec::new();
        for (key, value) in doc.iter_mut() {
            states.clear();
            self.root_step(key, &mut states);
            if states.is_empty() {
                continue;
            }
            let is_id = key == "_id";
            self.walk(value, &states, None, &mut |v, action| {
                let rule = match action {
                    // `_id` is never removed or nulled, it is hashed (see `mask_id`).
                    Some(MaskRule::Null | MaskRule::Remove) if is_id => Some(MaskRule::Hash),
                    other => other,
                };
                note_personal(personal, v, rule);
                true
            });
        }
    }

    /// Adds the raw values a rule masks in (unmasked) `updatedFields` to `personal`.
    fn collect_updated(&self, updated: &mut Document, personal: &mut Personal) {
        for (key, value) in updated.iter_mut() {
            let mut note = |v: &mut Bson, action: Option<MaskRule>| {
                note_personal(personal, v, action);
                true
            };
            match self.path_start(key) {
                PathStart::Dropped(rule) => {
                    Self::walk_all(value, Some(rule), &mut note);
                }
                PathStart::At(states, inherited) => {
                    self.walk(value, &states, inherited, &mut note);
                }
            }
        }
    }

    /// Calls `f` on every scalar of a (masked) document that no rule reaches — never `_id`, never
    /// under `keep`; `f` returns false to remove the value.
    fn walk_unruled_document(&self, doc: &mut Document, f: &mut dyn FnMut(&mut Bson) -> bool) {
        let mut states = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        for (key, value) in doc.iter_mut() {
            if key == "_id" {
                continue;
            }
            states.clear();
            self.root_step(key, &mut states);
            let keep = self.walk(value, &states, None, &mut |v, action| {
                action.is_some() || f(v)
            });
            if !keep {
                removed.push(key.clone());
            }
        }
        for key in removed {
            doc.remove(key);
        }
    }

    /// [`Inner::walk_unruled_document`] for `updatedFields` (dotted keys).
    fn walk_unruled_updated(&self, updated: &mut Document, f: &mut dyn FnMut(&mut Bson) -> bool) {
        let mut removed: Vec<String> = Vec::new();
        for (key, value) in updated.iter_mut() {
            let PathStart::At(states, inherited) = self.path_start(key) else {
                continue;
            };
            let keep = self.walk(value, &states, inherited, &mut |v, action| {
                action.is_some() || f(v)
            });
            if !keep {
                removed.push(key.clone());
            }
        }
        for key in removed {
            updated.remove(key);
        }
    }

    /// Visits every scalar leaf of `value` (reached with `states`, `inherited`) with the action
    /// of the rule that wins on it, as [`Inner::apply_node`] decides it: `null`/`remove` on a
    /// container reach every leaf below. False when `value` itself must be removed.
    fn walk(
        &self,
        value: &mut Bson,
        states: &[State],
        inherited: Option<u32>,
        leaf: &mut LeafFn<'_>,
    ) -> bool {
        if matches!(value, Bson::Null | Bson::Undefined) {
            return true;
        }
        let (winner, active) = self.fold(states, inherited);
        let action = self.action(winner);
        if !active || matches!(action, Some(MaskRule::Null | MaskRule::Remove)) {
            return Self::walk_all(value, action, leaf);
        }
        let mut next = Vec::new();
        match value {
            Bson::Document(doc) => {
                let mut removed: Vec<String> = Vec::new();
                for (key, child) in doc.iter_mut() {
                    next.clear();
                    self.step_key(states, key, &mut next);
                    if !self.walk(child, &next, winner, leaf) {
                        removed.push(key.clone());
                    }
                }
                for key in removed {
                    doc.remove(key);
                }
            }
            Bson::Array(items) => {
                let mut keep = Vec::with_capacity(items.len());
                for (index, child) in items.iter_mut().enumerate() {
                    next.clear();
                    self.step_index(states, index, &mut next);
                    keep.push(self.walk(child, &next, winner, leaf));
                }
                let mut flags = keep.into_iter();
                items.retain(|_| flags.next().unwrap_or(true));
            }
            scalar => return leaf(scalar, action),
        }
        true
    }

    /// Visits every scalar leaf of `value` with one `action`.
    fn walk_all(value: &mut Bson, action: Option<MaskRule>, leaf: &mut LeafFn<'_>) -> bool {
        match value {
            Bson::Null | Bson::Undefined => true,
            Bson::Document(doc) => {
                let mut removed: Vec<String> = Vec::new();
                for (key, child) in doc.iter_mut() {
                    if !Self::walk_all(child, action, leaf) {
                        removed.push(key.clone());
                    }
                }
                for key in removed {
                    doc.remove(key);
                }
                true
            }
            Bson::Array(items) => {
                let keep: Vec<bool> = items
                    .iter_mut()
                    .map(|child| Self::walk_all(child, action, leaf))
                    .collect();
                let mut flags = keep.into_iter();
                items.retain(|_| flags.next().unwrap_or(true));
                true
            }
            scalar => leaf(scalar, action),
        }
    }

    /// Applies `rule` to one scalar found by value; false when it must be removed.
    fn apply_rule(&self, value: &mut Bson, rule: MaskRule) -> bool {
        match rule {
            MaskRule::Remove => false,
            MaskRule::Null => {
                *value = Bson::Null;
                true
            }
            MaskRule::Keep => true,
            per_leaf => {
                *value = self.mask_scalar(per_leaf, value);
                true
            }
        }
    }

    /// `HMAC-SHA256(key, "fingerprint" || 0x00 || canonical)`, first 128 bits: names a personal
    /// value in `_sync.pii` without revealing it (keyed, like the `hash` rule, and
    /// domain-separated from every rule's output).
    fn fingerprint(&self, canonical: &[u8]) -> [u8; FINGERPRINT_BYTES] {
        let mut mac = self.mac.clone();
        mac.update(b"fingerprint");
        mac.update(&[0]);
        mac.update(canonical);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; FINGERPRINT_BYTES];
        out.copy_from_slice(&full[..FINGERPRINT_BYTES]);
        out
    }

    /// Applies the rules to `value`, reached with `states` and `inherited` (the winner among the
    /// rules that ended on an ancestor). False when the value must be removed.
    fn apply_node(&self, value: &mut Bson, states: &[State], inherited: Option<u32>) -> bool {
        if matches!(value, Bson::Null | Bson::Undefined) {
            return true;
        }
        let (winner, active) = self.fold(states, inherited);
        let action = self.action(winner);
        match action {
            Some(MaskRule::Remove) => return false,
            Some(MaskRule::Null) => {
                *value = Bson::Null;
                return true;
            }
            _ => {}
        }
        let per_leaf = action.filter(|a| a.is_per_leaf());
        if !active {
            if let Some(rule) = per_leaf {
                self.mask_all(value, rule);
            }
            return true;
        }
        match value {
            Bson::Document(doc) => {
                let mut next = Vec::new();
                let mut removed: Vec<String> = Vec::new();
                for (key, child) in doc.iter_mut() {
                    next.clear();
                    self.step_key(states, key, &mut next);
                    if next.is_empty() && per_leaf.is_none() {
                        continue;
                    }
                    if !self.apply_node(child, &next, winner) {
                        removed.push(key.clone());
                    }
                }
                for key in removed {
                    doc.remove(key);
                }
            }
            Bson::Array(items) => {
                let mut next = Vec::new();
                let mut removed: Vec<usize> = Vec::new();
                for (index, child) in items.iter_mut().enumerate() {
                    next.clear();
                    self.step_index(states, index, &mut next);
                    if next.is_empty() && per_leaf.is_none() {
                        continue;
                    }
                    if !self.apply_node(child, &next, winner) {
                        removed.push(index);
                    }
                }
                if !removed.is_empty() {
                    let mut index = 0;
                    let mut removed = removed.into_iter().peekable();
                    items.retain(|_| {
                        let gone = removed.next_if_eq(&index).is_some();
                        index += 1;
                        !gone
                    });
                }
            }
            scalar => {
                if let Some(rule) = per_leaf {
                    *scalar = self.mask_scalar(rule, scalar);
                }
            }
        }
        true
    }

    /// Rewrites every scalar leaf of `value` with the per-leaf `rule`; nulls stay null.
    fn mask_all(&self, value: &mut Bson, rule: MaskRule) {
        match value {
            Bson::Null | Bson::Undefined => {}
            Bson::Document(doc) => {
                for (_, child) in doc.iter_mut() {
                    self.mask_all(child, rule);
                }
            }
            Bson::Array(items) => {
                for child in items.iter_mut() {
                    self.mask_all(child, rule);
                }
            }
            scalar => *scalar = self.mask_scalar(rule, scalar),
        }
    }

    /// The masked form of one scalar under a per-leaf rule.
    fn mask_scalar(&self, rule: MaskRule, value: &Bson) -> Bson {
        match rule {
            MaskRule::Hash => Bson::String(hex::encode(self.digest(rule, value))),
            MaskRule::Email => {
                let d = self.digest(rule, value);
                Bson::String(format!("u{}@{}", hex::encode(&d[..8]), self.email_domain))
            }
            MaskRule::Name => {
                let d = self.digest(rule, value);
                let first =
                    FIRST_NAMES[usize::from(u16::from_be_bytes([d[0], d[1]])) % FIRST_NAMES.len()];
                let last =
                    LAST_NAMES[usize::from(u16::from_be_bytes([d[2], d[3]])) % LAST_NAMES.len()];
                Bson::String(format!("{first} {last}"))
            }
            MaskRule::Phone => {
                let d = self.digest(rule, value);
                let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % 1_000_000;
                Bson::String(format!("+1-555-0{:02}-{:04}", n / 10_000, n % 10_000))
            }
            MaskRule::Redact => Bson::String(self.redact_text.clone()),
            // Not per-leaf rules; never called with them.
            MaskRule::Null => Bson::Null,
            MaskRule::Remove | MaskRule::Keep => value.clone(),
        }
    }

    /// `HMAC-SHA256(key, rule || 0x00 || canonical(value))`, from the pre-keyed state.
    fn digest(&self, rule: MaskRule, value: &Bson) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(rule.as_str().as_bytes());
        mac.update(&[0]);
        match (rule, value) {
            (MaskRule::Email, Bson::String(s)) => {
                if s.is_ascii() && !s.bytes().any(|b| b.is_ascii_uppercase()) {
                    mac.update(s.as_bytes());
                } else {
                    mac.update(s.to_lowercase().as_bytes());
                }
            }
            (MaskRule::Phone, Bson::String(s)) if s.bytes().any(|b| b.is_ascii_digit()) => {
                let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_digit).collect();
                mac.update(&digits);
            }
            (_, v) => feed_canonical(&mut mac, v),
        }
        mac.finalize().into_bytes().into()
    }
}

/// Where canonical bytes go: the MAC, or a buffer (to compare values without hashing them).
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for HmacSha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Feeds the canonical, type-aware bytes of a scalar.
fn feed_canonical(mac: &mut impl Sink, value: &Bson) {
    fn int(mac: &mut impl Sink, i: i64) {
        mac.put(&[0xFF, b'i']);
        mac.put(&i.to_be_bytes());
    }
    match value {
        Bson::String(s) => mac.put(s.as_bytes()),
        Bson::Int32(i) => int(mac, i64::from(*i)),
        Bson::Int64(i) => int(mac, *i),
        Bson::Double(f) => {
            // 2^63: every integral double in [-2^63, 2^63) is exactly an i64.
            const LIMIT: f64 = 9_223_372_036_854_775_808.0;
            if f.fract() == 0.0 && *f >= -LIMIT && *f < LIMIT {
                int(mac, *f as i64);
            } else {
                let bits = if f.is_nan() {
                    f64::NAN.to_bits()
                } else {
                    f.to_bits()
                };
                mac.put(&[0xFF, b'd']);
                mac.put(&bits.to_be_bytes());
            }
        }
        Bson::Boolean(b) => mac.put(&[0xFF, b'b', u8::from(*b)]),
        Bson::DateTime(d) => {
            mac.put(&[0xFF, b't']);
            mac.put(&d.timestamp_millis().to_be_bytes());
        }
        Bson::ObjectId(o) => {
            mac.put(&[0xFF, b'o']);
            mac.put(&o.bytes());
        }
        Bson::Timestamp(t) => {
            mac.put(&[0xFF, b'T']);
            mac.put(&t.time.to_be_bytes());
            mac.put(&t.increment.to_be_bytes());
        }
        Bson::Binary(b) => {
            mac.put(&[0xFF, b'B', u8::from(b.subtype)]);
            mac.put(&b.bytes);
        }
        Bson::Decimal128(d) => {
            mac.put(&[0xFF, b'D']);
            mac.put(&d.bytes());
        }
        other => {
            // Rare types (regex, code, symbol, min/max key, …): canonical extended JSON.
            mac.put(&[0xFF, b'x']);
            mac.put(
                other
                    .clone()
                    .into_canonical_extjson()
                    .to_string()
                    .as_bytes(),
            );
        }
    }
}

#[rustfmt::skip]
const FIRST_NAMES: &[&str] = &[
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William",
    "Elizabeth", "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
    "Charles", "Karen", "Daniel", "Nancy", "Matthew", "Lisa", "Anthony", "Betty", "Mark",
    "Margaret", "Paul", "Sandra", "Steven", "Ashley", "Andrew", "Emily", "Joshua", "Donna", "Kevin",
    "Michelle", "Brian", "Carol", "George", "Amanda", "Edward", "Melissa", "Ronald", "Deborah",
    "Timothy", "Stephanie", "Jason", "Rebecca",
];

#[rustfmt::skip]
const LAST_NAMES: &[&str] = &[
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore",
    "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark",
    "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres",
    "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell",
    "Mitchell", "Carter", "Roberts",
];

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId, DateTime};

    const KEY: &str = "0123456789abcdef-test-key";

    fn settings(key: &str) -> MaskingSettings {
        MaskingSettings {
            key: key.to_owned(),
            email_domain: "example.com".to_owned(),
            redact_text: "[redacted]".to_owned(),
        }
    }

    fn rules(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(p, r)| ((*p).to_owned(), (*r).to_owned()))
            .collect()
    }

    fn masker_keyed(key: &str, pairs: &[(&str, &str)]) -> Masker {
        Masker::new(Some(&settings(key)), &rules(pairs))
    }

    fn masker(pairs: &[(&str, &str)]) -> Masker {
        masker_keyed(KEY, pairs)
    }

    fn masked(m: &Masker, mut d: Document) -> Document {
        m.mask_document(&mut d);
        d
    }

    fn string(b: &Bson) -> &str {
        b.as_str()
            .unwrap_or_else(|| panic!("expected a string, got {b:?}"))
    }

    /// The masked form of `value` under `rule` (through a one-field document).
    fn mask_one(m: &Masker, rule_path: &str, value: Bson) -> Bson {
        let mut d = Document::new();
        d.insert(rule_path, value);
        m.mask_document(&mut d);
        d.get(rule_path).cloned().expect("field kept")
    }

    fn is_hex64(s: &str) -> bool {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    fn is_masked_email(s: &str, domain: &str) -> bool {
        let Some((local, dom)) = s.split_once('@') else {
            return false;
        };
        dom == domain
            && !dom.contains('@')
            && local.len() == 17
            && local.starts_with('u')
            && local[1..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    fn is_fake_phone(s: &str) -> bool {
        let b = s.as_bytes();
        s.len() == 15
            && s.starts_with("+1-555-0")
            && b[10] == b'-'
            && [8, 9, 11, 12, 13, 14]
                .iter()
                .all(|&i| b[i].is_ascii_digit())
    }

    fn is_fake_name(s: &str) -> bool {
        match s.split_once(' ') {
            Some((first, last)) => FIRST_NAMES.contains(&first) && LAST_NAMES.contains(&last),
            None => false,
        }
    }

    #[test]
    fn name_lists_have_about_fifty_distinct_entries() {
        for list in [FIRST_NAMES, LAST_NAMES] {
            assert_eq!(list.len(), 50);
            let distinct: std::collections::BTreeSet<_> = list.iter().collect();
            assert_eq!(distinct.len(), list.len());
        }
    }

    // ---- is_empty -----------------------------------------------------------------------------

    #[test]
    fn is_empty_only_without_effective_rules() {
        assert!(Masker::default().is_empty());
        assert!(Masker::new(None, &BTreeMap::new()).is_empty());
        assert!(masker(&[]).is_empty());
        assert!(masker(&[("a", "keep"), ("b.*", "keep")]).is_empty());
        assert!(!masker(&[("a", "keep"), ("b", "null")]).is_empty());
        assert!(!masker(&[("email", "email")]).is_empty());
    }

    #[test]
    fn empty_masker_changes_nothing() {
        let m = Masker::default();
        let original = doc! { "email": "ann@x.com", "n": 5, "sub": { "a": [1, "x"] } };
        assert_eq!(masked(&m, original.clone()), original);
        let mut upd = doc! { "email": "ann@x.com" };
        m.mask_updated_fields(&mut upd);
        assert_eq!(upd, doc! { "email": "ann@x.com" });
        assert_eq!(
            m.mask_value("email", Bson::from("a")),
            Some(Bson::from("a"))
        );
    }

    // ---- one test per rule ----------------------------------------------------------------

    #[test]
    fn hash_is_keyed_hmac_sha256_in_lowercase_hex() {
        let m = masker(&[("ssn", "hash")]);
        let d = masked(
            &m,
            doc! { "ssn": "123-45-6789", "other": "987-65-4321", "copy": "123-45-6789" },
        );
        let got = string(d.get("ssn").unwrap());
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(KEY.as_bytes()).unwrap();
        mac.update(b"hash\x00123-45-6789");
        assert_eq!(got, hex::encode(mac.finalize().into_bytes()));
        assert!(is_hex64(got));
        assert_eq!(
            d.get_str("other").unwrap(),
            "987-65-4321",
            "unruled field kept"
        );
        // ...unless it holds the masked field's value (see the personal-value tests).
        assert_eq!(d.get_str("copy").unwrap(), got);
    }

    #[test]
    fn email_is_a_valid_address_in_the_configured_domain() {
        let s = MaskingSettings {
            key: KEY.to_owned(),
            email_domain: "staging.test".to_owned(),
            redact_text: "[redacted]".to_owned(),
        };
        let m = Masker::new(Some(&s), &rules(&[("email", "email")]));
        let d = masked(&m, doc! { "email": "Ann.Lee+promo@Example.ORG" });
        let got = string(d.get("email").unwrap());
        assert!(is_masked_email(got, "staging.test"), "{got}");
        assert!(!got.contains("ann"));

        // Token = "u" + the first 16 hex chars of HMAC("email\0" + lowercased address).
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(KEY.as_bytes()).unwrap();
        mac.update(b"email\0ann.lee+promo@example.org");
        let token = &hex::encode(mac.finalize().into_bytes())[..16];
        assert_eq!(got, format!("u{token}@staging.test"));

        // Default domain.
        let got = mask_one(&masker(&[("e", "email")]), "e", Bson::from("bob@corp.io"));
        assert!(is_masked_email(string(&got), "example.com"), "{got}");
    }

    #[test]
    fn email_is_case_insensitive_and_distinguishes_addresses() {
        let m = masker(&[("e", "email")]);
        let a = mask_one(&m, "e", Bson::from("Ann@X.com"));
        let b = mask_one(&m, "e", Bson::from("ann@x.com"));
        let c = mask_one(&m, "e", Bson::from("ANN@X.COM"));
        let other = mask_one(&m, "e", Bson::from("ann@y.com"));
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_ne!(a, other);
        // Non-ASCII lowercasing too.
        assert_eq!(
            mask_one(&m, "e", Bson::from("ÉLODIE@X.FR")),
            mask_one(&m, "e", Bson::from("élodie@x.fr"))
        );
    }

    #[test]
    fn name_is_a_deterministic_realistic_fake() {
        let m = masker(&[("fullName", "name")]);
        let a = mask_one(&m, "fullName", Bson::from("Grace Hopper"));
        assert!(is_fake_name(string(&a)), "{a}");
        assert_eq!(a, mask_one(&m, "fullName", Bson::from("Grace Hopper")));
        // Different people spread over the lists.
        let outs: std::collections::BTreeSet<String> = (0..40)
            .map(|i| {
                string(&mask_one(&m, "fullName", Bson::from(format!("person {i}")))).to_owned()
            })
            .collect();
        assert!(outs.len() > 30, "only {} distinct names", outs.len());
        assert!(outs.iter().all(|n| is_fake_name(n)));
    }

    #[test]
    fn phone_is_a_deterministic_fictional_number() {
        let m = masker(&[("phone", "phone")]);
        let a = mask_one(&m, "phone", Bson::from("+1 (212) 555-7788"));
        assert!(is_fake_phone(string(&a)), "{a}");
        // Only the digits count: formatting does not change the fake.
        assert_eq!(a, mask_one(&m, "phone", Bson::from("1-212-555-7788")));
        assert_eq!(a, mask_one(&m, "phone", Bson::from("12125557788")));
        assert_ne!(a, mask_one(&m, "phone", Bson::from("12125557789")));
        // A number without digits still becomes a fake.
        let n = mask_one(&m, "phone", Bson::from("unknown"));
        assert!(is_fake_phone(string(&n)), "{n}");
    }

    #[test]
    fn redact_replaces_with_the_configured_text() {
        let m = masker(&[("notes", "redact")]);
        let d = masked(&m, doc! { "notes": "called about divorce", "n": 1 });
        assert_eq!(d, doc! { "notes": "[redacted]", "n": 1 });

        let s = MaskingSettings {
            key: KEY.to_owned(),
            email_domain: "example.com".to_owned(),
            redact_text: "XXX".to_owned(),
        };
        let m = Masker::new(Some(&s), &rules(&[("notes", "redact")]));
        assert_eq!(
            masked(&m, doc! { "notes": "secret" }),
            doc! { "notes": "XXX" }
        );
    }

    #[test]
    fn null_sets_null_and_never_creates() {
        let m = masker(&[("dob", "null"), ("absent", "null")]);
        let d = masked(&m, doc! { "dob": DateTime::from_millis(0), "x": 1 });
        assert_eq!(d, doc! { "dob": Bson::Null, "x": 1 });
        assert!(!d.contains_key("absent"));
        // Whole documents and arrays too.
        let d = masked(&m, doc! { "dob": { "y": 1990, "m": [1, 2] } });
        assert_eq!(d, doc! { "dob": Bson::Null });
    }

    #[test]
    fn remove_deletes_fields_and_keeps_order() {
        let m = masker(&[("ssn", "remove"), ("profile.passport", "remove")]);
        let d = masked(
            &m,
            doc! { "a": 1, "ssn": "123", "b": 2, "profile": { "passport": "P1", "city": "Oslo" } },
        );
        assert_eq!(d, doc! { "a": 1, "b": 2, "profile": { "city": "Oslo" } });
        let keys: Vec<&String> = d.keys().collect();
        assert_eq!(keys, ["a", "b", "profile"]);
    }

    #[test]
    fn remove_with_wildcard_drops_array_elements() {
        let m = masker(&[("tags.*", "remove"), ("list.1", "remove")]);
        let d = masked(&m, doc! { "tags": ["a", "b"], "list": [10, 11, 12] });
        assert_eq!(d, doc! { "tags": [], "list": [10, 12] });
    }

    #[test]
    fn keep_alone_leaves_value_unchanged() {
        let m = masker(&[("a", "keep"), ("b", "hash")]);
        let d = masked(&m, doc! { "a": "visible", "b": "hidden" });
        assert_eq!(d.get_str("a").unwrap(), "visible");
        assert_ne!(d.get_str("b").unwrap(), "hidden");
    }

    // ---- paths ----------------------------------------------------------------------------

    #[test]
    fn nested_paths() {
        let m = masker(&[
            ("customer.contact.email", "email"),
            ("customer.tier", "redact"),
        ]);
        let d = masked(
            &m,
            doc! {
                "customer": { "contact": { "email": "a@b.c", "fax": "1" }, "tier": "gold", "id": 7 },
                "email": "top@level.com",
            },
        );
        let c = d.get_document("customer").unwrap();
        let contact = c.get_document("contact").unwrap();
        assert!(is_masked_email(
            contact.get_str("email").unwrap(),
            "example.com"
        ));
        assert_eq!(contact.get_str("fax").unwrap(), "1");
        assert_eq!(c.get_str("tier").unwrap(), "[redacted]");
        assert_eq!(c.get_i32("id").unwrap(), 7);
        assert_eq!(
            d.get_str("email").unwrap(),
            "top@level.com",
            "path is anchored at the root"
        );
    }

    #[test]
    fn wildcard_over_array_of_subdocuments() {
        let m = masker(&[("payments.*.cardNumber", "hash")]);
        let d = masked(
            &m,
            doc! { "payments": [
                { "cardNumber": "4111", "amount": 5 },
                { "cardNumber": "5500", "amount": 6 },
                { "amount": 7 },
            ] },
        );
        let p = d.get_array("payments").unwrap();
        let c0 = p[0].as_document().unwrap();
        let c1 = p[1].as_document().unwrap();
        assert!(is_hex64(c0.get_str("cardNumber").unwrap()));
        assert!(is_hex64(c1.get_str("cardNumber").unwrap()));
        assert_ne!(c0.get_str("cardNumber"), c1.get_str("cardNumber"));
        assert_eq!(c0.get_i32("amount").unwrap(), 5);
        assert_eq!(
            p[2],
            Bson::Document(doc! { "amount": 7 }),
            "missing field not created"
        );
    }

    #[test]
    fn wildcard_over_object_keys() {
        let m = masker(&[("contacts.*.phone", "phone")]);
        let d = masked(
            &m,
            doc! { "contacts": { "home": { "phone": "111" }, "work": { "phone": "222", "ext": "9" } } },
        );
        let c = d.get_document("contacts").unwrap();
        assert!(is_fake_phone(
            c.get_document("home").unwrap().get_str("phone").unwrap()
        ));
        let work = c.get_document("work").unwrap();
        assert!(is_fake_phone(work.get_str("phone").unwrap()));
        assert_eq!(work.get_str("ext").unwrap(), "9");
    }

    #[test]
    fn plain_segments_traverse_arrays_implicitly() {
        let m = masker(&[("items.sku", "redact"), ("orders.lines.name", "name")]);
        let d = masked(
            &m,
            doc! {
                "items": [{ "sku": 1, "qty": 2 }, { "sku": "B", "qty": 3 }, "loose"],
                "orders": [{ "lines": [{ "name": "Ann" }, { "name": "Bob" }] }],
            },
        );
        let items = d.get_array("items").unwrap();
        assert_eq!(
            items[0],
            Bson::Document(doc! { "sku": "[redacted]", "qty": 2 })
        );
        assert_eq!(
            items[1],
            Bson::Document(doc! { "sku": "[redacted]", "qty": 3 })
        );
        assert_eq!(
            items[2],
            Bson::from("loose"),
            "non-document element has no sku"
        );
        let lines = d.get_array("orders").unwrap()[0]
            .as_document()
            .unwrap()
            .get_array("lines")
            .unwrap()
            .clone();
        for l in &lines {
            assert!(is_fake_name(
                l.as_document().unwrap().get_str("name").unwrap()
            ));
        }
    }

    #[test]
    fn numeric_segment_addresses_one_element() {
        let m = masker(&[("payments.0.cardNumber", "redact")]);
        let d = masked(
            &m,
            doc! { "payments": [{ "cardNumber": "4111" }, { "cardNumber": "5500" }] },
        );
        let p = d.get_array("payments").unwrap();
        assert_eq!(p[0], Bson::Document(doc! { "cardNumber": "[redacted]" }));
        assert_eq!(p[1], Bson::Document(doc! { "cardNumber": "5500" }));
        // On a document, a numeric segment is just a key.
        let d = masked(
            &m,
            doc! { "payments": { "0": { "cardNumber": "1" }, "1": { "cardNumber": "2" } } },
        );
        assert_eq!(
            d,
            doc! { "payments": { "0": { "cardNumber": "[redacted]" }, "1": { "cardNumber": "2" } } }
        );
    }

    #[test]
    fn missing_fields_are_untouched() {
        let m = masker(&[
            ("email", "email"),
            ("ssn", "remove"),
            ("dob", "null"),
            ("a.b.c", "hash"),
            ("items.*.sku", "redact"),
        ]);
        let original =
            doc! { "name": "x", "a": { "b": { "d": 1 } }, "items": [{ "qty": 1 }], "z": [] };
        assert_eq!(masked(&m, original.clone()), original);
        // A path running into a scalar is not created either.
        let original = doc! { "a": { "b": 5 } };
        assert_eq!(masked(&m, original.clone()), original);
    }

    #[test]
    fn top_level_wildcard_never_touches_id() {
        let m = masker(&[("*", "hash")]);
        let id = ObjectId::new();
        let d = masked(&m, doc! { "_id": id, "email": "a@b.c" });
        assert_eq!(d.get_object_id("_id").unwrap(), id);
        assert!(is_hex64(d.get_str("email").unwrap()));
    }

    // ---- documents and arrays under per-leaf rules ---------------------------------------

    #[test]
    fn per_leaf_rules_recurse_into_documents_and_arrays() {
        let m = masker(&[("shipping", "redact"), ("aliases", "email")]);
        let d = masked(
            &m,
            doc! {
                "shipping": { "street": "1 Main", "zip": 12345, "geo": [1.5, 2.5], "c": Bson::Null },
                "aliases": ["A@x.com", "a@x.com"],
            },
        );
        assert_eq!(
            d.get_document("shipping").unwrap(),
            &doc! {
                "street": "[redacted]", "zip": "[redacted]",
                "geo": ["[redacted]", "[redacted]"], "c": Bson::Null,
            }
        );
        let aliases = d.get_array("aliases").unwrap();
        assert!(is_masked_email(string(&aliases[0]), "example.com"));
        assert_eq!(aliases[0], aliases[1]);
    }

    // ---- non-string values ---------------------------------------------------------------

    #[test]
    fn integral_numbers_mask_identically_across_types() {
        for rule in ["hash", "email", "name", "phone"] {
            let m = masker(&[("v", rule)]);
            let i32v = mask_one(&m, "v", Bson::Int32(5));
            let i64v = mask_one(&m, "v", Bson::Int64(5));
            let f64v = mask_one(&m, "v", Bson::Double(5.0));
            assert!(i32v.as_str().is_some(), "{rule}: a string");
            assert_eq!(i32v, i64v, "{rule}");
            assert_eq!(i32v, f64v, "{rule}");
            assert_ne!(i32v, mask_one(&m, "v", Bson::Double(5.5)), "{rule}");
            assert_ne!(i32v, mask_one(&m, "v", Bson::Int32(6)), "{rule}");
            assert_eq!(
                mask_one(&m, "v", Bson::Double(-0.0)),
                mask_one(&m, "v", Bson::Int64(0)),
                "{rule}"
            );
        }
    }

    #[test]
    fn number_is_not_confused_with_its_string() {
        let m = masker(&[("v", "hash")]);
        assert_ne!(
            mask_one(&m, "v", Bson::Int32(5)),
            mask_one(&m, "v", Bson::from("5"))
        );
        assert_ne!(
            mask_one(&m, "v", Bson::Boolean(true)),
            mask_one(&m, "v", Bson::from("true"))
        );
        assert_ne!(
            mask_one(&m, "v", Bson::Boolean(true)),
            mask_one(&m, "v", Bson::Int32(1))
        );
    }

    #[test]
    fn dates_object_ids_and_booleans_become_strings() {
        let m = masker(&[("v", "hash"), ("e", "email"), ("n", "name"), ("p", "phone")]);
        let when = DateTime::from_millis(1_700_000_000_000);
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let h1 = mask_one(&m, "v", Bson::DateTime(when));
        assert!(is_hex64(string(&h1)));
        assert_eq!(
            h1,
            mask_one(
                &m,
                "v",
                Bson::DateTime(DateTime::from_millis(1_700_000_000_000))
            )
        );
        assert_ne!(
            h1,
            mask_one(
                &m,
                "v",
                Bson::DateTime(DateTime::from_millis(1_700_000_000_001))
            )
        );
        assert_ne!(
            h1,
            mask_one(&m, "v", Bson::Int64(1_700_000_000_000)),
            "typed encoding"
        );
        assert!(is_hex64(string(&mask_one(&m, "v", Bson::ObjectId(oid)))));
        assert!(is_hex64(string(&mask_one(&m, "v", Bson::Boolean(false)))));
        assert!(is_masked_email(
            string(&mask_one(&m, "e", Bson::DateTime(when))),
            "example.com"
        ));
        assert!(is_fake_name(string(&mask_one(
            &m,
            "n",
            Bson::ObjectId(oid)
        ))));
        assert!(is_fake_phone(string(&mask_one(
            &m,
            "p",
            Bson::Int64(2_125_557_788)
        ))));
        let d = masked(
            &m,
            doc! { "v": Bson::Decimal128(mongodb::bson::Decimal128::from_bytes([1; 16])) },
        );
        assert!(is_hex64(d.get_str("v").unwrap()));
    }

    #[test]
    fn null_values_are_untouched_by_every_rule() {
        for rule in MaskRule::NAMES {
            let m = masker(&[("v", rule), ("w.*", rule)]);
            let d = masked(&m, doc! { "v": Bson::Null, "w": [Bson::Null] });
            assert_eq!(d, doc! { "v": Bson::Null, "w": [Bson::Null] }, "{rule}");
            assert_eq!(m.mask_value("v", Bson::Null), Some(Bson::Null), "{rule}");
        }
    }

    // ---- precedence -----------------------------------------------------------------------

    #[test]
    fn keep_exempts_a_sub_path_of_a_wildcard_rule() {
        let m = masker(&[("payments.*.*", "redact"), ("payments.*.amount", "keep")]);
        let d = masked(
            &m,
            doc! { "payments": [{ "cardNumber": "4111", "amount": 12.5, "holder": "Ann" }] },
        );
        assert_eq!(
            d.get_array("payments").unwrap()[0],
            Bson::Document(
                doc! { "cardNumber": "[redacted]", "amount": 12.5, "holder": "[redacted]" }
            )
        );
    }

    #[test]
    fn keep_under_a_per_leaf_parent_rule() {
        let m = masker(&[("shipping", "redact"), ("shipping.country", "keep")]);
        let d = masked(
            &m,
            doc! { "shipping": { "street": "1 Main", "country": "NO" } },
        );
        assert_eq!(
            d,
            doc! { "shipping": { "street": "[redacted]", "country": "NO" } }
        );
        // ...and a more specific rule under `keep` still applies.
        let m = masker(&[("shipping", "keep"), ("shipping.street", "hash")]);
        let d = masked(
            &m,
            doc! { "shipping": { "street": "1 Main", "country": "NO" } },
        );
        let s = d.get_document("shipping").unwrap();
        assert!(is_hex64(s.get_str("street").unwrap()));
        assert_eq!(s.get_str("country").unwrap(), "NO");
    }

    #[test]
    fn literal_segment_beats_wildcard_at_equal_length() {
        let m = masker(&[
            ("*.email", "hash"),
            ("contact.email", "email"),
            ("billing.*", "keep"),
        ]);
        let d = masked(
            &m,
            doc! {
                "contact": { "email": "a@b.c" },
                "sales": { "email": "a@b.c" },
                "billing": { "email": "a@b.c" },
            },
        );
        assert!(is_masked_email(
            d.get_document("contact").unwrap().get_str("email").unwrap(),
            "example.com"
        ));
        assert!(is_hex64(
            d.get_document("sales").unwrap().get_str("email").unwrap()
        ));
        // `billing.*` and `*.email` are as long; the leftmost literal wins.
        assert_eq!(
            d.get_document("billing").unwrap().get_str("email").unwrap(),
            "a@b.c"
        );
    }

    #[test]
    fn longer_path_wins() {
        let m = masker(&[("a.b", "hash"), ("a.*.c", "keep"), ("a.b.d", "remove")]);
        let d = masked(
            &m,
            doc! { "a": { "b": { "c": "kept", "d": "gone", "e": "hashed" } } },
        );
        let b = d.get_document("a").unwrap().get_document("b").unwrap();
        assert_eq!(b.get_str("c").unwrap(), "kept");
        assert!(!b.contains_key("d"));
        assert!(is_hex64(b.get_str("e").unwrap()));
    }

    #[test]
    fn null_on_a_parent_replaces_the_whole_value() {
        let m = masker(&[("card", "null"), ("card.last4", "keep")]);
        let d = masked(&m, doc! { "card": { "number": "4111", "last4": "1111" } });
        assert_eq!(d, doc! { "card": Bson::Null });
    }

    // ---- updatedFields / mask_value -----------------------------------------------------

    #[test]
    fn updated_fields_parent_object_gets_child_rules() {
        let m = masker(&[
            ("shipping.street", "redact"),
            ("payments.*.cardNumber", "hash"),
        ]);
        let mut upd = doc! {
            "shipping": { "street": "1 Main", "city": "Oslo" },
            "payments": [{ "cardNumber": "4111", "amount": 1 }, { "amount": 2 }],
            "status": "paid",
        };
        m.mask_updated_fields(&mut upd);
        assert_eq!(
            upd.get_document("shipping").unwrap(),
            &doc! { "street": "[redacted]", "city": "Oslo" }
        );
        let p = upd.get_array("payments").unwrap();
        assert!(is_hex64(
            p[0].as_document().unwrap().get_str("cardNumber").unwrap()
        ));
        assert_eq!(p[1], Bson::Document(doc! { "amount": 2 }));
        assert_eq!(upd.get_str("status").unwrap(), "paid");
    }

    #[test]
    fn updated_fields_child_gets_parent_rule() {
        let m = masker(&[("shipping", "redact"), ("profile.name", "name")]);
        let mut upd = doc! {
            "shipping.street": "1 Main",
            "shipping.geo": { "lat": 1.0 },
            "profile.name": "Ann Lee",
            "profile.age": 40,
        };
        m.mask_updated_fields(&mut upd);
        assert_eq!(upd.get_str("shipping.street").unwrap(), "[redacted]");
        assert_eq!(
            upd.get_document("shipping.geo").unwrap(),
            &doc! { "lat": "[redacted]" }
        );
        assert!(is_fake_name(upd.get_str("profile.name").unwrap()));
        assert_eq!(upd.get_i32("profile.age").unwrap(), 40);
    }

    #[test]
    fn updated_fields_with_array_indices() {
        let m = masker(&[
            ("payments.*.cardNumber", "hash"),
            ("items.sku", "redact"),
            ("first.0.x", "redact"),
        ]);
        let mut upd = doc! {
            "payments.0.cardNumber": "4111",
            "payments.1": { "cardNumber": "5500", "amount": 3 },
            "payments.2.amount": 9,
            "items.3.sku": "A-1",
            "first.0.x": "a",
            "first.1.x": "b",
        };
        m.mask_updated_fields(&mut upd);
        let direct = upd.get_str("payments.0.cardNumber").unwrap().to_owned();
        assert!(is_hex64(&direct));
        let whole = upd.get_document("payments.1").unwrap();
        assert!(is_hex64(whole.get_str("cardNumber").unwrap()));
        assert_eq!(whole.get_i32("amount").unwrap(), 3);
        assert_eq!(upd.get_i32("payments.2.amount").unwrap(), 9);
        assert_eq!(upd.get_str("items.3.sku").unwrap(), "[redacted]");
        assert_eq!(upd.get_str("first.0.x").unwrap(), "[redacted]");
        assert_eq!(upd.get_str("first.1.x").unwrap(), "b");
        // Same value set through different keys → same masked output as in a full document.
        let full = masked(&m, doc! { "payments": [{ "cardNumber": "4111" }] });
        assert_eq!(
            full.get_array("payments").unwrap()[0]
                .as_document()
                .unwrap()
                .get_str("cardNumber")
                .unwrap(),
            direct
        );
    }

    #[test]
    fn updated_fields_remove_deletes_the_key() {
        let m = masker(&[
            ("ssn", "remove"),
            ("profile.passport", "remove"),
            ("card", "null"),
        ]);
        let mut upd = doc! {
            "ssn": "123",
            "profile.passport": "P1",
            "profile": { "passport": "P2", "city": "Oslo" },
            "profile.city": "Bergen",
            "card": { "n": "4111" },
            "card.n": "4111",
            "x": 1,
        };
        m.mask_updated_fields(&mut upd);
        assert_eq!(
            upd,
            doc! {
                "profile": { "city": "Oslo" },
                "profile.city": "Bergen",
                "card": Bson::Null,
                "x": 1,
            }
        );
    }

    #[test]
    fn updated_fields_under_removed_parent_are_dropped() {
        let m = masker(&[("secret", "remove")]);
        let mut upd = doc! { "secret.a": 1, "secret.b.c": "x", "secrets": 2 };
        m.mask_updated_fields(&mut upd);
        assert_eq!(upd, doc! { "secrets": 2 });
    }

    #[test]
    fn mask_value_matches_updated_fields_semantics() {
        let m = masker(&[
            ("ssn", "remove"),
            ("shipping", "redact"),
            ("shipping.zip", "keep"),
        ]);
        assert_eq!(m.mask_value("ssn", Bson::from("1")), None);
        assert_eq!(m.mask_value("ssn.part", Bson::from("1")), None);
        assert_eq!(
            m.mask_value("shipping.street", Bson::from("x")),
            Some(Bson::from("[redacted]"))
        );
        assert_eq!(
            m.mask_value("shipping.zip", Bson::from("0150")),
            Some(Bson::from("0150"))
        );
        assert_eq!(
            m.mask_value(
                "shipping",
                Bson::Document(doc! { "street": "x", "zip": "0150" })
            ),
            Some(Bson::Document(
                doc! { "street": "[redacted]", "zip": "0150" }
            ))
        );
        assert_eq!(
            m.mask_value("other", Bson::from("x")),
            Some(Bson::from("x"))
        );
    }

    #[test]
    fn full_document_and_update_paths_agree() {
        let m = masker(&[
            ("a.*.b", "hash"),
            ("a.c", "email"),
            ("d", "phone"),
            ("d.keep", "keep"),
            ("e.0", "name"),
        ]);
        let full = masked(
            &m,
            doc! {
                "a": [{ "b": "x", "c": "Q@R.s" }, { "b": 5 }],
                "d": { "keep": "k", "m": "555" },
                "e": ["Ann", "Bob"],
            },
        );
        let cases: Vec<(&str, Bson, Bson)> = vec![
            (
                "a.0.b",
                Bson::from("x"),
                full.get_array("a").unwrap()[0]
                    .as_document()
                    .unwrap()
                    .get("b")
                    .unwrap()
                    .clone(),
            ),
            (
                "a.0.c",
                Bson::from("Q@R.s"),
                full.get_array("a").unwrap()[0]
                    .as_document()
                    .unwrap()
                    .get("c")
                    .unwrap()
                    .clone(),
            ),
            (
                "a.1.b",
                Bson::Int64(5),
                full.get_array("a").unwrap()[1]
                    .as_document()
                    .unwrap()
                    .get("b")
                    .unwrap()
                    .clone(),
            ),
            ("d.keep", Bson::from("k"), Bson::from("k")),
            (
                "d.m",
                Bson::from("555"),
                full.get_document("d").unwrap().get("m").unwrap().clone(),
            ),
            (
                "e.0",
                Bson::from("Ann"),
                full.get_array("e").unwrap()[0].clone(),
            ),
            ("e.1", Bson::from("Bob"), Bson::from("Bob")),
        ];
        for (path, raw, expected) in cases {
            assert_eq!(m.mask_value(path, raw), Some(expected), "{path}");
        }
    }

    // ---- personal values: masking follows values ------------------------------------------

    /// Every string of a BSON value, depth first.
    fn strings(v: &Bson, out: &mut Vec<String>) {
        match v {
            Bson::String(s) => out.push(s.clone()),
            Bson::Document(d) => d.values().for_each(|v| strings(v, out)),
            Bson::Array(a) => a.iter().for_each(|v| strings(v, out)),
            _ => {}
        }
    }

    fn contains_raw(d: &Document, raw: &str) -> bool {
        let mut all = Vec::new();
        strings(&Bson::Document(d.clone()), &mut all);
        all.iter().any(|s| s == raw)
    }

    #[test]
    fn a_copy_of_a_masked_value_is_masked_with_its_rule() {
        let m = masker(&[("ssn", "hash"), ("email", "email"), ("notes", "remove")]);
        let mut d = doc! {
            "ssn": "123-45-6789",
            "copy": "123-45-6789",
            "nested": { "list": ["x", "123-45-6789"], "contact": "Ann@X.com" },
            "email": "Ann@X.com",
            "notes": "secret",
            "quote": "secret",
            "other": "123-45-67890",
        };
        let pii = m.mask_event(Some(&mut d), None);
        let hashed = d.get_str("ssn").unwrap().to_owned();
        assert!(is_hex64(&hashed));
        assert_eq!(d.get_str("copy").unwrap(), hashed, "same value, same mask");
        let nested = d.get_document("nested").unwrap();
        assert_eq!(
            nested.get_array("list").unwrap()[1],
            Bson::String(hashed.clone())
        );
        assert_eq!(nested.get_array("list").unwrap()[0], Bson::from("x"));
        assert_eq!(nested.get("contact"), d.get("email"));
        assert!(
            !d.contains_key("quote"),
            "a copy of a removed value is removed"
        );
        assert_eq!(
            d.get_str("other").unwrap(),
            "123-45-67890",
            "other values stay"
        );
        assert_eq!(pii.len(), 3, "{pii:?}");
        assert!(pii.iter().any(|f| f.starts_with("hash:")));
        assert!(pii.iter().any(|f| f.starts_with("remove:")));
        // `mask_document` applies the same rule.
        let mut again = doc! { "ssn": "123-45-6789", "copy": "123-45-6789" };
        m.mask_document(&mut again);
        assert_eq!(again.get_str("copy").unwrap(), hashed);
    }

    #[test]
    fn a_rename_in_the_update_description_is_masked_by_its_new_path_or_its_value() {
        let m = masker(&[("ssn", "hash"), ("legacy", "redact")]);
        // `$rename: {ssn: legacy}` → removedFields [ssn], updatedFields {legacy: raw}.
        let mut full = doc! { "_id": 1, "legacy": "123", "copy": "123" };
        let mut upd = doc! { "legacy": "123", "copy": "123" };
        m.mask_event(Some(&mut full), Some(&mut upd));
        assert_eq!(
            full,
            doc! { "_id": 1, "legacy": "[redacted]", "copy": "[redacted]" }
        );
        assert_eq!(upd, doc! { "legacy": "[redacted]", "copy": "[redacted]" });
        // A value set in the same event as the masked path it came from: `$set: {p: "$ssn"}`
        // with the masked path only in the document, or only in the update description.
        let mut full = doc! { "_id": 1, "ssn": "9", "p": { "q": "9" } };
        let mut upd = doc! { "p.q": "9" };
        m.mask_event(Some(&mut full), Some(&mut upd));
        let hashed = full.get_str("ssn").unwrap().to_owned();
        assert_eq!(upd.get_str("p.q").unwrap(), hashed);
        assert_eq!(
            full.get_document("p").unwrap().get_str("q").unwrap(),
            hashed
        );
        let mut upd = doc! { "ssn": 9, "tag": 9.0 };
        m.mask_event(None, Some(&mut upd));
        assert_eq!(upd.get("tag"), upd.get("ssn"), "9 and 9.0 are one value");
        assert!(is_hex64(upd.get_str("tag").unwrap()));
    }

    #[test]
    fn keep_booleans_nulls_and_id_are_never_masked_by_value() {
        let m = masker(&[("ssn", "hash"), ("flag", "redact"), ("country", "keep")]);
        let mut d = doc! {
            "_id": "123", "ssn": "123", "country": "123",
            "flag": true, "other": true, "empty": "", "n": Bson::Null,
        };
        m.mask_event(Some(&mut d), None);
        assert_eq!(d.get_str("_id").unwrap(), "123", "no rule names _id");
        assert_eq!(d.get_str("country").unwrap(), "123", "keep exempts a path");
        assert_eq!(d.get_str("flag").unwrap(), "[redacted]");
        assert!(d.get_bool("other").unwrap());
        assert_eq!(d.get_str("empty").unwrap(), "");
    }

    #[test]
    fn known_fingerprints_mask_values_whose_masked_path_is_gone() {
        let m = masker(&[("ssn", "hash"), ("card", "null")]);
        let mut first = doc! { "ssn": "123", "card": { "n": "4111" } };
        let pii = m.mask_event(Some(&mut first), None);
        assert_eq!(pii.len(), 2);
        assert!(pii
            .iter()
            .all(|f| !f.contains("123") && !f.contains("4111")));
        // Later: the values live under new names; the event alone knows nothing.
        let mut full = doc! { "_id": 1, "old": "123", "cards": ["4111", "5500"], "x": "1234" };
        let mut upd = doc! { "old": "123" };
        assert!(m.mask_event(Some(&mut full), Some(&mut upd)).is_empty());
        let found = m.mask_known_values(Some(&mut full), Some(&mut upd), &pii);
        assert_eq!(found, pii);
        assert_eq!(full.get("old"), first.get("ssn"));
        assert_eq!(
            full.get_array("cards").unwrap(),
            &vec![Bson::Null, Bson::from("5500")]
        );
        assert_eq!(full.get_str("x").unwrap(), "1234");
        assert_eq!(upd.get("old"), first.get("ssn"));
        // Idempotent: masked values have no raw fingerprint.
        let before = full.clone();
        assert!(m.mask_known_values(Some(&mut full), None, &pii).is_empty());
        assert_eq!(full, before);
        // Other keys, other fingerprints.
        let other = masker_keyed("another-key-0123456789", &[("ssn", "hash")]);
        assert_ne!(
            other.mask_event(Some(&mut doc! { "ssn": "123" }), None)[0],
            pii[1]
        );
    }

    #[test]
    fn id_masking_is_deterministic_and_never_removes_the_id() {
        let m = masker(&[("_id", "hash"), ("email", "email")]);
        assert!(m.masks_id());
        assert!(!masker(&[("email", "email")]).masks_id());
        assert!(!masker(&[("_id", "keep"), ("email", "email")]).masks_id());
        let id = m.mask_id(Bson::from("ann@x.com"));
        assert!(is_hex64(string(&id)));
        assert_eq!(id, m.mask_id(Bson::from("ann@x.com")));
        assert_ne!(id, m.mask_id(Bson::from("bob@x.com")));
        let mut d = doc! { "_id": "ann@x.com", "contact": "ann@x.com", "email": "ann@x.com" };
        m.mask_event(Some(&mut d), None);
        assert_eq!(d.get("_id"), Some(&id));
        assert!(!contains_raw(&d, "ann@x.com"), "{d:?}");
        // `remove` / `null` on `_id` act as `hash`.
        for rule in ["remove", "null"] {
            let m = masker(&[("_id", rule)]);
            assert_eq!(m.mask_id(Bson::from("ann@x.com")), id, "{rule}");
            let mut d = doc! { "_id": "ann@x.com" };
            m.mask_document(&mut d);
            assert_eq!(d.get("_id"), Some(&id), "{rule}");
        }
        // Compound ids: every leaf.
        let compound = m.mask_id(Bson::Document(doc! { "e": "ann@x.com", "n": 1 }));
        let compound = compound.as_document().unwrap();
        assert_eq!(compound.get("e"), Some(&id));
        assert!(is_hex64(compound.get_str("n").unwrap()));
        // No rule: as it is.
        assert_eq!(
            masker(&[("e", "hash")]).mask_id(Bson::from("x")),
            Bson::from("x")
        );
    }

    // ---- determinism and keys -----------------------------------------------------------

    #[test]
    fn same_key_same_output_across_instances_paths_and_collections() {
        let users = masker(&[
            ("email", "email"),
            ("ssn", "hash"),
            ("name", "name"),
            ("tel", "phone"),
        ]);
        let orders = masker(&[
            ("customer.email", "email"),
            ("lines.*.taxId", "hash"),
            ("recipient", "name"),
            ("contact.phone", "phone"),
        ]);
        let u = masked(
            &users,
            doc! { "email": "ann@x.com", "ssn": "123", "name": "Ann", "tel": "555" },
        );
        let o = masked(
            &orders,
            doc! {
                "customer": { "email": "ANN@x.com" },
                "lines": [{ "taxId": "123" }],
                "recipient": "Ann",
                "contact": { "phone": "555" },
            },
        );
        assert_eq!(
            u.get("email"),
            o.get_document("customer").unwrap().get("email")
        );
        assert_eq!(
            u.get("ssn"),
            o.get_array("lines").unwrap()[0]
                .as_document()
                .unwrap()
                .get("taxId")
        );
        assert_eq!(u.get("name"), o.get("recipient"));
        assert_eq!(
            u.get("tel"),
            o.get_document("contact").unwrap().get("phone")
        );
        // A clone and a second instance built from the same settings agree too.
        let again = masker(&[
            ("email", "email"),
            ("ssn", "hash"),
            ("name", "name"),
            ("tel", "phone"),
        ]);
        let doc = doc! { "email": "ann@x.com", "ssn": "123", "name": "Ann", "tel": "555" };
        assert_eq!(masked(&again, doc.clone()), u);
        assert_eq!(masked(&users.clone(), doc), u);
    }

    #[test]
    fn different_key_gives_different_output() {
        let pairs = [("e", "email"), ("h", "hash"), ("n", "name"), ("p", "phone")];
        let a = masker_keyed("first-key-0123456789", &pairs);
        let b = masker_keyed("second-key-0123456789", &pairs);
        let doc = doc! { "e": "ann@x.com", "h": "123", "n": "Ann Lee", "p": "+1 212 555 7788" };
        let (ma, mb) = (masked(&a, doc.clone()), masked(&b, doc));
        assert_ne!(ma.get("e"), mb.get("e"));
        assert_ne!(ma.get("h"), mb.get("h"));
        // Names and phones have a small output space; at least one of a few differs.
        let differ = (0..8).any(|i| {
            let d = doc! { "n": format!("Person {i}"), "p": format!("+1 212 555 000{i}") };
            let (x, y) = (masked(&a, d.clone()), masked(&b, d));
            x.get("n") != y.get("n") && x.get("p") != y.get("p")
        });
        assert!(differ);
    }

    #[test]
    fn rules_are_domain_separated() {
        let m = masker(&[("h", "hash"), ("e", "email")]);
        let d = masked(&m, doc! { "h": "ann@x.com", "e": "ann@x.com" });
        let hash = d.get_str("h").unwrap();
        let email = d.get_str("e").unwrap();
        assert_ne!(&hash[..16], &email[1..17]);
    }

    // ---- plumbing ---------------------------------------------------------------------------

    #[test]
    fn masker_is_send_sync_and_clone_shares_rules() {
        fn assert_send_sync<T: Send + Sync + Clone + Default + fmt::Debug>() {}
        assert_send_sync::<Masker>();
        let m = masker(&[("a", "hash")]);
        let c = m.clone();
        assert!(Arc::ptr_eq(
            m.inner.as_ref().unwrap(),
            c.inner.as_ref().unwrap()
        ));
    }

    #[test]
    fn debug_shows_rules_but_not_the_key() {
        let m = masker(&[("email", "email")]);
        let s = format!("{m:?}");
        assert!(s.contains("email = email"), "{s}");
        assert!(!s.contains(KEY), "{s}");
        assert_eq!(format!("{:?}", Masker::default()), "Masker { rules: [] }");
    }

    #[test]
    fn missing_settings_still_use_a_key() {
        // Config forbids rules without `[masking]`; if it happens anyway, values are still keyed.
        let m = Masker::new(None, &rules(&[("h", "hash")]));
        let got = mask_one(&m, "h", Bson::from("123"));
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(b"").unwrap();
        mac.update(b"hash\x00123");
        assert!(is_hex64(string(&got)));
        assert_ne!(string(&got), hex::encode(mac.finalize().into_bytes()));
    }

    #[test]
    fn unknown_rule_names_are_ignored() {
        let m = masker(&[("a", "scramble"), ("b", "redact")]);
        let d = masked(&m, doc! { "a": "x", "b": "y" });
        assert_eq!(d, doc! { "a": "x", "b": "[redacted]" });
    }
}
