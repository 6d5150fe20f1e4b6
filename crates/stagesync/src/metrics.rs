//! Metrics: Prometheus counters, histograms and gauges, all prefixed `stagesync_`, served at
//! `/metrics` by [`crate::telemetry`].
//!
//! Counters have one family per stage (no mixed `stage` label), so each family's total means one
//! thing:
//!
//! | family | labels | counted when |
//! | --- | --- | --- |
//! | `stagesync_changes_read_total` | collection, operation | a change event is read from production's stream |
//! | `stagesync_changes_applied_total` | collection, operation | a change is written to staging |
//! | `stagesync_changes_skipped_total` | collection, operation, reason | a change is deliberately not written (stale, staging newer, …) |
//! | `stagesync_changes_dead_lettered_total` | collection, operation, reason | a failed change was stored in the dead-letter queue (after the store succeeded) |
//!
//! `stagesync_dead_letters_total{collection,reason}` of earlier versions is folded into
//! `stagesync_changes_dead_lettered_total` (sum it over `operation` for the old numbers); it was
//! counted before the store and so also counted entries that were never stored.
//!
//! The gauges `stagesync_checkpoint_age_seconds{collection}`, `stagesync_ready` and
//! `stagesync_collection_ready{collection}` are computed at scrape time from [`Health`], so they
//! are true when read (a stalled checkpoint keeps ageing between saves).

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use mongodb::bson::Timestamp;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::health::Health;

/// Which server a retried failure talked to (the `side` label of `stagesync_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Production,
    Staging,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Production => "production",
            Side::Staging => "staging",
        }
    }
}

/// Every metric of the process. Record through the methods (`read`, `applied`, …); the
/// families are public so tests can read them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    health: Health,
    /// `stagesync_changes_read_total{collection,operation}`
    pub changes_read: IntCounterVec,
    /// `stagesync_changes_applied_total{collection,operation}`
    pub changes_applied: IntCounterVec,
    /// `stagesync_changes_skipped_total{collection,operation,reason}`
    pub changes_skipped: IntCounterVec,
    /// `stagesync_changes_dead_lettered_total{collection,operation,reason}`
    pub changes_dead_lettered: IntCounterVec,
    /// `stagesync_batch_size`
    pub batch_size: Histogram,
    /// `stagesync_lag_seconds{collection}`
    pub lag_seconds: HistogramVec,
    /// `stagesync_ddl_events_total{collection,operation}`
    pub ddl_events: IntCounterVec,
    /// `stagesync_conflicts_total{collection}`
    pub conflicts: IntCounterVec,
    /// `stagesync_retries_total{side}`
    pub retries: IntCounterVec,
    /// `stagesync_insert_fallbacks_total{collection}`
    pub insert_fallbacks: IntCounterVec,
    /// `stagesync_batches_planned_ahead_total{collection}`
    pub planned_ahead: IntCounterVec,
    /// `stagesync_lease_held{collection,owner}`: 1 while this process (`owner`, its
    /// `--instance-id`) holds the collection's lease. (Not `instance`: Prometheus sets that
    /// label itself on every scraped series.)
    pub lease_held: prometheus::IntGaugeVec,
    /// `stagesync_new_document_fresh_ids_total{collection}`: new staging documents that got a
    /// fresh `_id` because a staging document already held their production `_id`
    /// (`new_document_id = "production"`).
    pub fresh_ids: IntCounterVec,
    /// `stagesync_references_remapped_total{collection}`: references rewritten to a staging
    /// `_id` different from the production `_id` (when written, or by a pending fix-up).
    pub references_remapped: IntCounterVec,
    /// `stagesync_references_pending{collection}`: references of the collection whose
    /// document is not in staging yet (pending fix-ups), as of the latest sweep.
    pub references_pending: IntGaugeVec,
}

impl Metrics {
    /// Metrics whose scrape-time gauges read `health` (one per process: the engine reports to
    /// the same `Health`).
    pub fn new(health: Health) -> Metrics {
        let registry = Registry::new_custom(Some("stagesync".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let changes_read = counter(
            "changes_read_total",
            "Change events read from production's change streams",
            &["collection", "operation"],
        );
        let changes_applied = counter(
            "changes_applied_total",
            "Changes written to staging",
            &["collection", "operation"],
        );
        let changes_skipped = counter(
            "changes_skipped_total",
            "Changes deliberately not written to staging, by reason",
            &["collection", "operation", "reason"],
        );
        let changes_dead_lettered = counter(
            "changes_dead_lettered_total",
            "Failed changes stored in the dead-letter queue, by reason",
            &["collection", "operation", "reason"],
        );
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Changes per applied batch").buckets(vec![
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
            ]),
        )
        .expect("valid metric");
        let lag_seconds = HistogramVec::new(
            HistogramOpts::new(
                "lag_seconds",
                "Time from the production change (its cluster time) to staging acknowledging its write",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["collection"],
        )
        .expect("valid metric");
        let ddl_events = counter(
            "ddl_events_total",
            "drop / rename / dropDatabase events seen in production (never applied)",
            &["collection", "operation"],
        );
        let conflicts = counter(
            "conflicts_total",
            "Last-write-wins conflicts kept on staging's side",
            &["collection"],
        );
        let retries = counter("retries_total", "Transient failures retried", &["side"]);
        let insert_fallbacks = counter(
            "insert_fallbacks_total",
            "Changes of new production documents written without a staging look-up that staging \
             refused with a duplicate key (a document to adopt or revive, or a collision) or the \
             plan could not apply, then planned again with look-ups",
            &["collection"],
        );
        let planned_ahead = counter(
            "batches_planned_ahead_total",
            "Stream batches planned while the batch before them was being written, against the \
             state that batch planned to leave, and written as planned that way",
            &["collection"],
        );
        let lease_held = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "lease_held",
                "1 while this process holds the collection's lease (syncs it), else 0",
            ),
            &["collection", "owner"],
        )
        .expect("valid metric");
        let fresh_ids = counter(
            "new_document_fresh_ids_total",
            "New staging documents given a fresh _id because a staging document already held their production _id",
            &["collection"],
        );
        let references_remapped = counter(
            "references_remapped_total",
            "References rewritten to the staging _id of the document they refer to",
            &["collection"],
        );
        let references_pending = IntGaugeVec::new(
            Opts::new(
                "references_pending",
                "References whose document is not in staging yet (pending fix-ups), as of the latest sweep",
            ),
            &["collection"],
        )
        .expect("valid metric");
        let scrape_time = ScrapeTimeGauges::new(health.clone());
        for m in [
            Box::new(changes_read.clone()) as Box<dyn Collector>,
            Box::new(changes_applied.clone()),
            Box::new(changes_skipped.clone()),
            Box::new(changes_dead_lettered.clone()),
            Box::new(batch_size.clone()),
            Box::new(lag_seconds.clone()),
            Box::new(ddl_events.clone()),
            Box::new(conflicts.clone()),
            Box::new(insert_fallbacks.clone()),
            Box::new(planned_ahead.clone()),
            Box::new(retries.clone()),
            Box::new(lease_held.clone()),
            Box::new(fresh_ids.clone()),
            Box::new(references_remapped.clone()),
            Box::new(references_pending.clone()),
            Box::new(scrape_time),
        ] {
            registry.register(m).expect("metric registered once");
        }
        Metrics {
            registry,
            health,
            changes_read,
            changes_applied,
            changes_skipped,
            changes_dead_lettered,
            batch_size,
            lag_seconds,
            ddl_events,
            conflicts,
            insert_fallbacks,
            planned_ahead,
            retries,
            lease_held,
            fresh_ids,
            references_remapped,
            references_pending,
        }
    }

    /// A new staging document got a fresh `_id`: its production `_id` was taken in staging.
    pub fn fresh_id(&self, collection: &str) {
        self.fresh_ids.with_label_values(&[collection]).inc();
    }

    /// Whether this process (`instance`) holds `collection`'s lease.
    pub fn lease(&self, collection: &str, instance: &str, held: bool) {
        self.lease_held
            .with_label_values(&[collection, instance])
            .set(i64::from(held));
    }

    /// The health the scrape-time gauges read.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// A change event of `operation` was read from `collection`'s stream.
    pub fn read(&self, collection: &str, operation: &str) {
        self.changes_read
            .with_label_values(&[collection, operation])
            .inc();
    }

    /// A change was written to staging.
    pub fn applied(&self, collection: &str, operation: &str) {
        self.changes_applied
            .with_label_values(&[collection, operation])
            .inc();
    }

    /// A change was deliberately not written (`reason`: stale, staging_newer, …).
    pub fn skipped(&self, collection: &str, operation: &str, reason: &str) {
        self.changes_skipped
            .with_label_values(&[collection, operation, reason])
            .inc();
    }

    /// A failed change was stored in the dead-letter queue. Call only after the store
    /// succeeded: this counts entries written, not failures seen.
    pub fn dead_lettered(&self, collection: &str, operation: &str, reason: &str) {
        self.changes_dead_lettered
            .with_label_values(&[collection, operation, reason])
            .inc();
    }

    /// One batch of `size` changes was applied.
    pub fn batch(&self, size: usize) {
        self.batch_size.observe(size as f64);
    }

    /// A change reached staging `seconds` after production made it (negative clock skew
    /// counts as 0; NaN is dropped).
    pub fn lag(&self, collection: &str, seconds: f64) {
        if seconds.is_nan() {
            return;
        }
        self.lag_seconds
            .with_label_values(&[collection])
            .observe(seconds.max(0.0));
    }

    /// Staging acknowledged, now, a change production made at `cluster_time` (whole seconds:
    /// a cluster time has no finer resolution). Returns the lag observed.
    pub fn lag_since_cluster_time(&self, collection: &str, cluster_time: Timestamp) -> f64 {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let lag = (now - f64::from(cluster_time.time)).max(0.0);
        self.lag(collection, lag);
        lag
    }

    /// A drop / rename / dropDatabase event was seen in production.
    pub fn ddl_event(&self, collection: &str, operation: &str) {
        self.ddl_events
            .with_label_values(&[collection, operation])
            .inc();
    }

    /// A last-write-wins conflict was kept on staging's side.
    pub fn conflict(&self, collection: &str) {
        self.conflicts.with_label_values(&[collection]).inc();
    }

    /// `n` changes of documents written without a look-up went down the slow path.
    pub fn fresh_insert_fallbacks(&self, collection: &str, n: usize) {
        self.insert_fallbacks
            .with_label_values(&[collection])
            .inc_by(n as u64);
    }

    /// A stream batch is written from the plan made while the batch before was written.
    pub fn planned_ahead(&self, collection: &str) {
        self.planned_ahead.with_label_values(&[collection]).inc();
    }

    /// A transient failure talking to `side` is being retried.
    pub fn retry(&self, side: Side) {
        self.retries.with_label_values(&[side.as_str()]).inc();
    }

    /// The checkpoint of `collection` was saved: the same as
    /// `self.health().checkpoint_saved(collection)` (the age gauge reads [`Health`]).
    pub fn checkpoint_saved(&self, collection: &str) {
        self.health.checkpoint_saved(collection);
    }

    /// The Prometheus text exposition of every metric, with the scrape-time gauges computed now.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only on malformed families, which `register` rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The content type of [`Metrics::render`]'s text.
    pub fn content_type() -> &'static str {
        prometheus::TEXT_FORMAT
    }
}

/// `stagesync_checkpoint_age_seconds`, `stagesync_ready` and `stagesync_collection_ready`,
/// set from [`Health`] each time the registry is gathered.
struct ScrapeTimeGauges {
    health: Health,
    checkpoint_age: GaugeVec,
    ready: IntGauge,
    collection_ready: IntGaugeVec,
    /// Two scrapes at once must not interleave their resets and sets.
    collecting: Arc<Mutex<()>>,
}

impl ScrapeTimeGauges {
    fn new(health: Health) -> ScrapeTimeGauges {
        ScrapeTimeGauges {
            health,
            checkpoint_age: GaugeVec::new(
                Opts::new(
                    "checkpoint_age_seconds",
                    "Seconds since the collection's checkpoint was last saved, at scrape time \
                     (before the first save: since the process started)",
                ),
                &["collection"],
            )
            .expect("valid metric"),
            ready: IntGauge::new(
                "ready",
                "1 while every configured collection is ready (as /readyz), else 0",
            )
            .expect("valid metric"),
            collection_ready: IntGaugeVec::new(
                Opts::new(
                    "collection_ready",
                    "1 while the collection is ready (as /readyz), else 0",
                ),
                &["collection"],
            )
            .expect("valid metric"),
            collecting: Arc::default(),
        }
    }
}

impl Collector for ScrapeTimeGauges {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.checkpoint_age.desc();
        descs.extend(self.ready.desc());
        descs.extend(self.collection_ready.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self
            .collecting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = self.health.now();
        self.checkpoint_age.reset();
        for (collection, age) in self.health.checkpoint_ages(now) {
            self.checkpoint_age
                .with_label_values(&[&collection])
                .set(age.as_secs_f64());
        }
        let readiness = self.health.readiness(now);
        self.ready.set(i64::from(readiness.is_ready()));
        self.collection_ready.reset();
        for c in &readiness.collections {
            self.collection_ready
                .with_label_values(&[&c.collection])
                .set(i64::from(c.is_ready()));
        }
        let mut families = self.checkpoint_age.collect();
        families.extend(self.ready.collect());
        families.extend(self.collection_ready.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::health::ManualClock;

    fn setup() -> (Metrics, ManualClock) {
        let clock = ManualClock::new();
        let health =
            Health::with_clock(["orders", "users"], Duration::from_secs(30), clock.clock());
        (Metrics::new(health), clock)
    }

    /// The value of the sample line `series` (name and labels as rendered).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn each_stage_has_its_own_family() {
        let (m, _) = setup();
        m.read("orders", "insert");
        m.read("orders", "insert");
        m.applied("orders", "insert");
        m.skipped("orders", "update", "stale");
        m.dead_lettered("orders", "insert", "key_collision");
        let text = m.render();
        for (series, value) in [
            (
                r#"stagesync_changes_read_total{collection="orders",operation="insert"}"#,
                2.0,
            ),
            (
                r#"stagesync_changes_applied_total{collection="orders",operation="insert"}"#,
                1.0,
            ),
            (
                r#"stagesync_changes_skipped_total{collection="orders",operation="update",reason="stale"}"#,
                1.0,
            ),
            (
                r#"stagesync_changes_dead_lettered_total{collection="orders",operation="insert",reason="key_collision"}"#,
                1.0,
            ),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(!text.contains("stagesync_changes_total"), "{text}");
        assert!(!text.contains("stage=\""), "{text}");
        assert!(!text.contains("stagesync_dead_letters_total"), "{text}");
    }

    #[test]
    fn the_other_families_keep_their_names() {
        let (m, _) = setup();
        m.batch(10);
        m.lag("orders", 0.3);
        m.lag("orders", -5.0);
        m.lag("orders", f64::NAN);
        m.ddl_event("orders", "drop");
        m.conflict("orders");
        m.retry(Side::Staging);
        m.retry(Side::Production);
        let text = m.render();
        assert_eq!(sample(&text, "stagesync_batch_size_count"), Some(1.0));
        assert_eq!(
            sample(&text, r#"stagesync_lag_seconds_count{collection="orders"}"#),
            Some(2.0),
            "NaN dropped, negative clamped"
        );
        assert_eq!(
            sample(
                &text,
                r#"stagesync_lag_seconds_bucket{collection="orders",le="0.01"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"stagesync_ddl_events_total{collection="orders",operation="drop"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"stagesync_conflicts_total{collection="orders"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"stagesync_retries_total{side="staging"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"stagesync_retries_total{side="production"}"#),
            Some(1.0)
        );
        assert!(
            text.contains("# TYPE stagesync_lag_seconds histogram"),
            "{text}"
        );
    }

    #[test]
    fn lag_since_cluster_time_measures_from_the_cluster_time() {
        let (m, _) = setup();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32;
        let lag = m.lag_since_cluster_time(
            "orders",
            Timestamp {
                time: now - 5,
                increment: 1,
            },
        );
        assert!((5.0..7.0).contains(&lag), "{lag}");
        // A cluster time ahead of this clock is lag 0, not negative.
        let lag = m.lag_since_cluster_time(
            "orders",
            Timestamp {
                time: now + 60,
                increment: 1,
            },
        );
        assert_eq!(lag, 0.0);
    }

    #[test]
    fn checkpoint_age_is_computed_at_scrape_time() {
        let (m, clock) = setup();
        let age = r#"stagesync_checkpoint_age_seconds{collection="orders"}"#;
        // Before any save: the age since the process started, and it grows.
        assert_eq!(sample(&m.render(), age), Some(0.0));
        clock.advance(Duration::from_secs(5));
        assert_eq!(sample(&m.render(), age), Some(5.0));
        m.checkpoint_saved("orders");
        assert_eq!(sample(&m.render(), age), Some(0.0));
        // No save since: every scrape shows the time passed, not the value at the last save.
        clock.advance(Duration::from_millis(2500));
        assert_eq!(sample(&m.render(), age), Some(2.5));
        clock.advance(Duration::from_secs(60));
        assert_eq!(sample(&m.render(), age), Some(62.5));
        assert_eq!(
            sample(
                &m.render(),
                r#"stagesync_checkpoint_age_seconds{collection="users"}"#
            ),
            Some(67.5)
        );
    }

    #[test]
    fn ready_gauges_follow_health_at_scrape_time() {
        let (m, clock) = setup();
        let text = m.render();
        assert_eq!(sample(&text, "stagesync_ready"), Some(0.0), "{text}");
        assert_eq!(
            sample(&text, r#"stagesync_collection_ready{collection="orders"}"#),
            Some(0.0)
        );
        for c in ["orders", "users"] {
            m.health().stream_opened(c);
            m.health().progress(c);
            m.checkpoint_saved(c);
        }
        let text = m.render();
        assert_eq!(sample(&text, "stagesync_ready"), Some(1.0), "{text}");
        assert_eq!(
            sample(&text, r#"stagesync_collection_ready{collection="users"}"#),
            Some(1.0)
        );
        // Time passes with no progress: the next scrape sees it, no event needed.
        clock.advance(Duration::from_secs(31));
        m.health().progress("orders");
        m.checkpoint_saved("orders");
        let text = m.render();
        assert_eq!(sample(&text, "stagesync_ready"), Some(0.0), "{text}");
        assert_eq!(
            sample(&text, r#"stagesync_collection_ready{collection="orders"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"stagesync_collection_ready{collection="users"}"#),
            Some(0.0)
        );
        assert!(text.contains("# TYPE stagesync_ready gauge"), "{text}");
    }
}
