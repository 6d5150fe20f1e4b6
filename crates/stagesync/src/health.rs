//! Health: what each configured collection is doing, and whether the sync is ready.
//!
//! The engine reports events ([`Health::stream_opened`], [`Health::progress`],
//! [`Health::checkpoint_saved`], …); `/readyz`, the `stagesync_ready` and
//! `stagesync_collection_ready` gauges and `stagesync_checkpoint_age_seconds` read them back at
//! request time through [`Health::readiness`] and [`Health::checkpoint_ages`].
//!
//! # The readiness rule
//!
//! The sync is ready when every configured collection is. A collection is ready at `now` when
//! all of these hold (otherwise each failing one is a reason, in this order):
//!
//! | condition | reason when it fails |
//! | --- | --- |
//! | staging answers | `staging unreachable` |
//! | production answers | `production unreachable` |
//! | no snapshot of it is running | `snapshot in progress` |
//! | its change stream has been opened at least once | `starting` |
//! | its change stream is open now | `stream not open` or `stream not open: <reason>` |
//! | it progressed within `stall_after`: changes applied, the stream confirmed idle (an empty getMore), or snapshot documents copied; the stream opening or a snapshot starting counts as the start of the wait | `no progress for 47s` |
//! | its last checkpoint save did not fail | `checkpoint store unreachable: <reason>` |
//! | its checkpoint was saved within `stall_after` (before the first save: the process started within `stall_after`) | `checkpoint not saved for 47s` |
//!
//! `no progress` is only judged while the stream is open or a snapshot runs (a closed stream
//! already says why). Durations in reasons are whole seconds rounded up, so a reason never shows
//! a number within the bound. Time comes from a [`Clock`] (the system's monotonic clock unless
//! one is given), and [`Health::readiness`] takes `now` explicitly, so the rule is tested without
//! sleeping.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// `[sync] stall_after` when the configuration does not set it.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(30);

/// Where [`Health`] reads the time of the events it is told about.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Instant + Send + Sync>);

impl Clock {
    /// The system's monotonic clock ([`Instant::now`]).
    pub fn system() -> Clock {
        Clock(Arc::new(Instant::now))
    }

    /// A clock reading `f`.
    pub fn from_fn(f: impl Fn() -> Instant + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(f))
    }

    pub fn now(&self) -> Instant {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// A clock that moves only when told to (for tests).
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<Instant>>);

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl ManualClock {
    /// Starts at the current [`Instant`].
    pub fn new() -> ManualClock {
        ManualClock(Arc::new(Mutex::new(Instant::now())))
    }

    pub fn now(&self) -> Instant {
        *lock(&self.0)
    }

    pub fn advance(&self, by: Duration) {
        *lock(&self.0) += by;
    }

    /// A [`Clock`] reading this one.
    pub fn clock(&self) -> Clock {
        let me = self.clone();
        Clock::from_fn(move || me.now())
    }
}

/// The health of every configured collection. Cheap to clone: clones share the same state.
#[derive(Clone, Debug)]
pub struct Health {
    shared: Arc<Mutex<State>>,
    clock: Clock,
    stall_after: Duration,
    started_at: Instant,
}

#[derive(Debug)]
struct State {
    staging_unreachable: bool,
    production_unreachable: bool,
    /// In configuration order.
    collections: Vec<(String, CollectionState)>,
}

#[derive(Debug, Clone, Default)]
struct CollectionState {
    stream: Stream,
    snapshot_running: bool,
    /// The latest progress, stream opening or snapshot start: where the stall wait starts.
    progress_at: Option<Instant>,
    checkpoint_saved_at: Option<Instant>,
    /// Why the latest checkpoint save failed, until one succeeds.
    checkpoint_failing: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Stream {
    #[default]
    NeverOpened,
    Open,
    Closed(String),
}

/// The readiness of every configured collection at one instant, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    pub collections: Vec<CollectionReadiness>,
}

/// One collection's readiness: ready when `reasons` is empty.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CollectionReadiness {
    pub collection: String,
    pub reasons: Vec<String>,
}

impl CollectionReadiness {
    pub fn is_ready(&self) -> bool {
        self.reasons.is_empty()
    }

    /// `Ok` when ready, else the reasons it is not.
    pub fn result(&self) -> Result<(), &[String]> {
        if self.reasons.is_empty() {
            Ok(())
        } else {
            Err(&self.reasons)
        }
    }
}

impl Readiness {
    /// Every configured collection is ready (true when none is configured).
    pub fn is_ready(&self) -> bool {
        self.collections.iter().all(CollectionReadiness::is_ready)
    }

    /// The collections that are not ready.
    pub fn unhealthy(&self) -> impl Iterator<Item = &CollectionReadiness> {
        self.collections.iter().filter(|c| !c.is_ready())
    }

    pub fn get(&self, collection: &str) -> Option<&CollectionReadiness> {
        self.collections.iter().find(|c| c.collection == collection)
    }
}

impl Health {
    /// Health for `collections` (the configured names), judged against `stall_after`, on the
    /// system clock.
    pub fn new<I, S>(collections: I, stall_after: Duration) -> Health
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Health::with_clock(collections, stall_after, Clock::system())
    }

    /// Like [`Health::new`], with events timed by `clock` (tests use a [`ManualClock`]). The
    /// process start, from which checkpoint ages count before the first save, is `clock.now()`.
    pub fn with_clock<I, S>(collections: I, stall_after: Duration, clock: Clock) -> Health
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut list: Vec<(String, CollectionState)> = Vec::new();
        for name in collections {
            let name = name.into();
            if !list.iter().any(|(n, _)| *n == name) {
                list.push((name, CollectionState::default()));
            }
        }
        Health {
            shared: Arc::new(Mutex::new(State {
                staging_unreachable: false,
                production_unreachable: false,
                collections: list,
            })),
            started_at: clock.now(),
            clock,
            stall_after,
        }
    }

    /// The current time on this health's clock.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    pub fn stall_after(&self) -> Duration {
        self.stall_after
    }

    /// When this health was created (the process start, for checkpoint ages before any save).
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// The configured collection names, in configuration order.
    pub fn collections(&self) -> Vec<String> {
        lock(&self.shared)
            .collections
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The change stream of `collection` is open (first open or reopen). Starts the stall wait.
    pub fn stream_opened(&self, collection: &str) {
        let now = self.now();
        self.update(collection, |c| {
            c.stream = Stream::Open;
            c.progress_at = Some(now);
        });
    }

    /// The change stream of `collection` closed (an outage, a reopen after an invalidate, the
    /// task stopping); `reason` is shown in `/readyz`, e.g. "production change stream failed".
    pub fn stream_closed(&self, collection: &str, reason: &str) {
        let reason = reason.to_string();
        self.update(collection, |c| c.stream = Stream::Closed(reason));
    }

    /// `collection` made progress: a batch of changes was applied to staging, or the stream
    /// confirmed it is idle (an empty getMore returned).
    pub fn progress(&self, collection: &str) {
        let now = self.now();
        self.update(collection, |c| c.progress_at = Some(now));
    }

    /// A snapshot of `collection` started: it is not ready until the stream takes over, and the
    /// stall wait starts now.
    pub fn snapshot_started(&self, collection: &str) {
        let now = self.now();
        self.update(collection, |c| {
            c.snapshot_running = true;
            c.progress_at = Some(now);
        });
    }

    /// The snapshot of `collection` copied (or pruned) a batch of documents: counts as progress.
    pub fn snapshot_progress(&self, collection: &str) {
        let now = self.now();
        self.update(collection, |c| {
            c.snapshot_running = true;
            c.progress_at = Some(now);
        });
    }

    /// The snapshot of `collection` ended (finished or stopped).
    pub fn snapshot_finished(&self, collection: &str) {
        let now = self.now();
        self.update(collection, |c| {
            c.snapshot_running = false;
            c.progress_at = Some(now);
        });
    }

    /// The checkpoint of `collection` was saved successfully.
    pub fn checkpoint_saved(&self, collection: &str) {
        let now = self.now();
        self.update(collection, |c| {
            c.checkpoint_saved_at = Some(now);
            c.checkpoint_failing = None;
        });
    }

    /// Saving the checkpoint of `collection` failed (it is being retried); `reason` is shown in
    /// `/readyz` until a save succeeds.
    pub fn checkpoint_save_failed(&self, collection: &str, reason: &str) {
        let reason = reason.to_string();
        self.update(collection, |c| c.checkpoint_failing = Some(reason));
    }

    /// Staging stopped answering (every collection is unready until [`Health::staging_reachable`]).
    pub fn staging_unreachable(&self) {
        lock(&self.shared).staging_unreachable = true;
    }

    /// Staging answers again.
    pub fn staging_reachable(&self) {
        lock(&self.shared).staging_unreachable = false;
    }

    /// Production stopped answering (every collection is unready until
    /// [`Health::production_reachable`]).
    pub fn production_unreachable(&self) {
        lock(&self.shared).production_unreachable = true;
    }

    /// Production answers again.
    pub fn production_reachable(&self) {
        lock(&self.shared).production_unreachable = false;
    }

    /// Readiness of every configured collection at `now` (see the module documentation).
    pub fn readiness(&self, now: Instant) -> Readiness {
        let state = lock(&self.shared);
        Readiness {
            collections: state
                .collections
                .iter()
                .map(|(name, c)| CollectionReadiness {
                    collection: name.clone(),
                    reasons: reasons(&state, c, self.stall_after, self.started_at, now),
                })
                .collect(),
        }
    }

    /// Readiness now, on this health's clock.
    pub fn readiness_now(&self) -> Readiness {
        self.readiness(self.now())
    }

    /// Per configured collection, the time since its last successful checkpoint save at `now`
    /// (before the first save: since the process started, so it keeps growing).
    pub fn checkpoint_ages(&self, now: Instant) -> Vec<(String, Duration)> {
        let state = lock(&self.shared);
        state
            .collections
            .iter()
            .map(|(name, c)| {
                let since = c.checkpoint_saved_at.unwrap_or(self.started_at);
                (name.clone(), now.saturating_duration_since(since))
            })
            .collect()
    }

    fn update(&self, collection: &str, f: impl FnOnce(&mut CollectionState)) {
        let mut state = lock(&self.shared);
        match state.collections.iter_mut().find(|(n, _)| n == collection) {
            Some((_, c)) => f(c),
            None => tracing::debug!(
                collection,
                "health event for a collection that is not configured; ignored"
            ),
        }
    }
}

/// Why one collection is not ready at `now` (empty: ready). Pure: the whole readiness rule.
fn reasons(
    state: &State,
    c: &CollectionState,
    stall_after: Duration,
    started_at: Instant,
    now: Instant,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if state.staging_unreachable {
        reasons.push("staging unreachable".to_string());
    }
    if state.production_unreachable {
        reasons.push("production unreachable".to_string());
    }
    let mut judge_progress = c.snapshot_running;
    if c.snapshot_running {
        reasons.push("snapshot in progress".to_string());
    } else {
        match &c.stream {
            Stream::NeverOpened => reasons.push("starting".to_string()),
            Stream::Closed(why) if why.is_empty() => reasons.push("stream not open".to_string()),
            Stream::Closed(why) => reasons.push(format!("stream not open: {why}")),
            Stream::Open => judge_progress = true,
        }
    }
    if judge_progress {
        let since = c.progress_at.unwrap_or(started_at);
        let waited = now.saturating_duration_since(since);
        if waited > stall_after {
            reasons.push(format!("no progress for {}", seconds(waited)));
        }
    }
    if let Some(why) = &c.checkpoint_failing {
        reasons.push(format!("checkpoint store unreachable: {why}"));
    }
    let age = now.saturating_duration_since(c.checkpoint_saved_at.unwrap_or(started_at));
    if age > stall_after {
        reasons.push(format!("checkpoint not saved for {}", seconds(age)));
    }
    reasons
}

/// Whole seconds, rounded up: "47s".
fn seconds(d: Duration) -> String {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    format!("{s}s")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(30);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn setup(names: &[&str]) -> (Health, ManualClock) {
        let clock = ManualClock::new();
        let health = Health::with_clock(names.iter().copied(), STALL, clock.clock());
        (health, clock)
    }

    fn reasons_of(h: &Health, clock: &ManualClock, name: &str) -> Vec<String> {
        h.readiness(clock.now())
            .get(name)
            .expect("configured")
            .reasons
            .clone()
    }

    /// Opened, progressed and saved now.
    fn healthy(h: &Health, name: &str) {
        h.stream_opened(name);
        h.progress(name);
        h.checkpoint_saved(name);
    }

    #[test]
    fn a_collection_that_never_opened_its_stream_is_starting() {
        let (h, clock) = setup(&["orders"]);
        assert_eq!(reasons_of(&h, &clock, "orders"), ["starting"]);
        assert!(!h.readiness(clock.now()).is_ready());
        // A checkpoint saved before the stream opens (a loaded position) does not make it ready.
        h.checkpoint_saved("orders");
        assert_eq!(reasons_of(&h, &clock, "orders"), ["starting"]);
    }

    #[test]
    fn open_stream_with_progress_and_a_recent_save_is_ready() {
        let (h, clock) = setup(&["orders", "users"]);
        healthy(&h, "orders");
        healthy(&h, "users");
        let r = h.readiness(clock.now());
        assert!(r.is_ready(), "{r:?}");
        assert_eq!(r.get("orders").unwrap().result(), Ok(()));
        assert_eq!(r.unhealthy().count(), 0);
    }

    #[test]
    fn ready_only_when_every_collection_is() {
        let (h, clock) = setup(&["orders", "users"]);
        healthy(&h, "orders");
        let r = h.readiness(clock.now());
        assert!(!r.is_ready());
        let bad: Vec<&str> = r.unhealthy().map(|c| c.collection.as_str()).collect();
        assert_eq!(bad, ["users"]);
        assert!(r.get("orders").unwrap().is_ready());
    }

    #[test]
    fn no_collections_is_ready() {
        let (h, clock) = setup(&[]);
        assert!(h.readiness(clock.now()).is_ready());
    }

    #[test]
    fn progress_is_judged_against_stall_after_inclusive() {
        let (h, clock) = setup(&["orders"]);
        h.stream_opened("orders");
        h.checkpoint_saved("orders");
        // Opening starts the wait: ready right away, and still at exactly stall_after.
        assert!(h.readiness(clock.now()).is_ready());
        clock.advance(STALL);
        assert!(h.readiness(clock.now()).is_ready(), "within means <=");
        // One instant later both bounds are passed.
        let later = clock.now() + Duration::from_millis(1);
        assert_eq!(
            h.readiness(later).get("orders").unwrap().reasons,
            ["no progress for 31s", "checkpoint not saved for 31s"]
        );
    }

    #[test]
    fn an_empty_getmore_counts_as_progress() {
        let (h, clock) = setup(&["orders"]);
        healthy(&h, "orders");
        for _ in 0..5 {
            clock.advance(secs(20));
            // The stream keeps confirming it is idle and the idle position is saved.
            h.progress("orders");
            h.checkpoint_saved("orders");
            assert!(h.readiness(clock.now()).is_ready());
        }
    }

    #[test]
    fn a_stalled_stream_reports_how_long() {
        let (h, clock) = setup(&["orders"]);
        healthy(&h, "orders");
        clock.advance(secs(47));
        // Checkpoints still saved (e.g. a stuck apply loop that still saves): only progress.
        h.checkpoint_saved("orders");
        assert_eq!(reasons_of(&h, &clock, "orders"), ["no progress for 47s"]);
        h.progress("orders");
        assert!(h.readiness(clock.now()).is_ready());
    }

    #[test]
    fn a_checkpoint_not_saved_within_stall_after_is_reported() {
        let (h, clock) = setup(&["orders"]);
        healthy(&h, "orders");
        clock.advance(Duration::from_millis(46_200));
        h.progress("orders");
        assert_eq!(
            reasons_of(&h, &clock, "orders"),
            ["checkpoint not saved for 47s"],
            "whole seconds, rounded up"
        );
        h.checkpoint_saved("orders");
        assert!(h.readiness(clock.now()).is_ready());
    }

    #[test]
    fn before_the_first_save_the_checkpoint_age_counts_from_the_start() {
        let (h, clock) = setup(&["orders"]);
        clock.advance(secs(40));
        h.stream_opened("orders");
        h.progress("orders");
        // Opened late and never saved: the age is the process's.
        assert_eq!(
            reasons_of(&h, &clock, "orders"),
            ["checkpoint not saved for 40s"]
        );
        assert_eq!(
            h.checkpoint_ages(clock.now()),
            vec![("orders".to_string(), secs(40))]
        );
        h.checkpoint_saved("orders");
        assert!(h.readiness(clock.now()).is_ready());
        clock.advance(secs(3));
        assert_eq!(
            h.checkpoint_ages(clock.now()),
            vec![("orders".to_string(), secs(3))]
        );
    }

    #[test]
    fn a_closed_stream_is_not_ready_and_says_why() {
        let (h, clock) = setup(&["orders"]);
        healthy(&h, "orders");
        h.stream_closed("orders", "production change stream failed");
        assert_eq!(
            reasons_of(&h, &clock, "orders"),
            ["stream not open: production change stream failed"]
        );
        h.stream_closed("orders", "");
        assert_eq!(reasons_of(&h, &clock, "orders"), ["stream not open"]);
        // A long-closed stream is not also "no progress": the closed stream says it.
        clock.advance(secs(100));
        assert_eq!(
            reasons_of(&h, &clock, "orders"),
            ["stream not open", "checkpoint not saved for 100s"]
        );
        // Reopening starts the wait afresh.
        h.stream_opened("orders");
        h.checkpoint_saved("orders");
        assert!(h.readiness(clock.now()).is_ready());
    }

    #[test]
    fn unreachable_servers_make_every_collection_unready() {
        let (h, clock) = setup(&["orders", "users"]);
        healthy(&h, "orders");
        healthy(&h, "users");
        h.staging_unreachable();
        let r = h.readiness(clock.now());
        assert!(!r.is_ready());
        for c in &r.collections {
            assert_eq!(c.reasons, ["staging unreachable"]);
        }
        h.production_unreachable();
        assert_eq!(
            reasons_of(&h, &clock, "users"),
            ["staging unreachable", "production unreachable"]
        );
        h.staging_reachable();
        assert_eq!(reasons_of(&h, &clock, "users"), ["production unreachable"]);
        h.production_reachable();
        assert!(h.readiness(clock.now()).is_ready());
    }

    #[test]
    fn a_failing_checkpoint_save_is_reported_until_one_succeeds() {
        let (h, clock) = setup(&["orders"]);
        healthy(&h, "orders");
        h.checkpoint_save_failed("orders", "connection refused");
        assert_eq!(
            reasons_of(&h, &clock, "orders"),
            ["checkpoint store unreachable: connection refused"]
        );
        clock.advance(secs(31));
        h.progress("orders");
        assert_eq!(
            reasons_of(&h, &clock, "orders"),
            [
                "checkpoint store unreachable: connection refused",
                "checkpoint not saved for 31s"
            ]
        );
        h.checkpoint_saved("orders");
        assert!(h.readiness(clock.now()).is_ready());
    }

    #[test]
    fn a_snapshot_is_progress_but_not_ready() {
        let (h, clock) = setup(&["orders"]);
        h.snapshot_started("orders");
        h.checkpoint_saved("orders");
        assert_eq!(reasons_of(&h, &clock, "orders"), ["snapshot in progress"]);
        // Copying for longer than stall_after is fine while documents keep coming.
        for _ in 0..4 {
            clock.advance(secs(20));
            h.snapshot_progress("orders");
            h.checkpoint_saved("orders");
            assert_eq!(reasons_of(&h, &clock, "orders"), ["snapshot in progress"]);
        }
        // A stuck copy is reported.
        clock.advance(secs(35));
        h.checkpoint_saved("orders");
        assert_eq!(
            reasons_of(&h, &clock, "orders"),
            ["snapshot in progress", "no progress for 35s"]
        );
        // The stream takes over: ready once it is open, with no stall carried over.
        h.snapshot_progress("orders");
        h.snapshot_finished("orders");
        assert_eq!(reasons_of(&h, &clock, "orders"), ["starting"]);
        h.stream_opened("orders");
        h.checkpoint_saved("orders");
        assert!(h.readiness(clock.now()).is_ready());
    }

    #[test]
    fn a_resync_snapshot_after_the_stream_ran_is_not_ready() {
        let (h, clock) = setup(&["orders"]);
        healthy(&h, "orders");
        h.stream_closed("orders", "history lost; re-copying");
        h.snapshot_started("orders");
        assert_eq!(reasons_of(&h, &clock, "orders"), ["snapshot in progress"]);
    }

    #[test]
    fn readiness_is_a_function_of_now() {
        let (h, clock) = setup(&["orders"]);
        healthy(&h, "orders");
        let t0 = clock.now();
        // Nothing happens; the same state judged at different instants.
        assert!(h.readiness(t0 + secs(30)).is_ready());
        assert_eq!(
            h.readiness(t0 + secs(60)).get("orders").unwrap().reasons,
            ["no progress for 60s", "checkpoint not saved for 60s"]
        );
        // An instant before the events (a stale `now`) does not underflow.
        assert!(h.readiness(t0 - Duration::from_millis(1)).is_ready());
    }

    #[test]
    fn unknown_collections_are_ignored_and_duplicates_kept_once() {
        let (h, clock) = setup(&["orders", "orders", "users"]);
        assert_eq!(h.collections(), ["orders", "users"]);
        h.stream_opened("nope");
        h.checkpoint_saved("nope");
        let r = h.readiness(clock.now());
        assert_eq!(r.collections.len(), 2);
        assert!(r.get("nope").is_none());
    }

    #[test]
    fn clones_share_state() {
        let (h, clock) = setup(&["orders"]);
        let engine_side = h.clone();
        healthy(&engine_side, "orders");
        assert!(h.readiness(clock.now()).is_ready());
    }

    #[test]
    fn reasons_round_seconds_up() {
        assert_eq!(seconds(Duration::from_secs(47)), "47s");
        assert_eq!(seconds(Duration::from_millis(46_001)), "47s");
        assert_eq!(seconds(Duration::from_millis(1)), "1s");
    }
}
