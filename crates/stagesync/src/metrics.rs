//! Metrics: Prometheus counters and histograms (all prefixed `stagesync_`), served with
//! `/healthz` by `run --metrics-addr`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `stage` = read | applied | skipped | failed; `reason` for skipped/failed.
    pub changes: IntCounterVec,
    pub batch_size: Histogram,
    pub lag_seconds: HistogramVec,
    pub checkpoint_age_seconds: IntGaugeVec,
    pub dead_letters: IntCounterVec,
    pub ddl_events: IntCounterVec,
    pub conflicts: IntCounterVec,
    pub retries: IntCounterVec,
    /// When each stream's checkpoint was last saved; `checkpoint_age_seconds` is derived from
    /// it at scrape time, so the gauge keeps growing while saves stall.
    checkpoint_saves: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("stagesync".into()), None).expect("valid prefix");
        let changes = IntCounterVec::new(
            Opts::new(
                "changes_total",
                "Production changes by collection, operation and stage",
            ),
            &["collection", "operation", "stage", "reason"],
        )
        .expect("valid metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Changes per applied batch").buckets(vec![
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
            ]),
        )
        .expect("valid metric");
        let lag_seconds = HistogramVec::new(
            HistogramOpts::new(
                "lag_seconds",
                "Time from the production change to its staging write",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["collection"],
        )
        .expect("valid metric");
        let checkpoint_age_seconds = IntGaugeVec::new(
            Opts::new(
                "checkpoint_age_seconds",
                "Seconds since the stream's checkpoint was saved (at scrape time of the last save)",
            ),
            &["collection"],
        )
        .expect("valid metric");
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "dead_letters_total",
                "Changes sent to the dead-letter queue",
            ),
            &["collection", "reason"],
        )
        .expect("valid metric");
        let ddl_events = IntCounterVec::new(
            Opts::new(
                "ddl_events_total",
                "drop / rename / dropDatabase events seen in production (never applied)",
            ),
            &["collection", "operation"],
        )
        .expect("valid metric");
        let conflicts = IntCounterVec::new(
            Opts::new(
                "conflicts_total",
                "Last-write-wins conflicts kept on staging's side",
            ),
            &["collection"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new("retries_total", "Transient failures retried"),
            &["side"],
        )
        .expect("valid metric");
        for m in [
            Box::new(changes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(batch_size.clone()),
            Box::new(lag_seconds.clone()),
            Box::new(checkpoint_age_seconds.clone()),
            Box::new(dead_letters.clone()),
            Box::new(ddl_events.clone()),
            Box::new(conflicts.clone()),
            Box::new(retries.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        Metrics {
            registry,
            changes,
            batch_size,
            lag_seconds,
            checkpoint_age_seconds,
            dead_letters,
            ddl_events,
            conflicts,
            retries,
            checkpoint_saves: Arc::default(),
        }
    }

    /// Records a successful checkpoint save of `collection`.
    pub fn checkpoint_saved(&self, collection: &str) {
        if let Ok(mut saves) = self.checkpoint_saves.lock() {
            saves.insert(collection.to_string(), Instant::now());
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        if let Ok(saves) = self.checkpoint_saves.lock() {
            for (collection, at) in saves.iter() {
                self.checkpoint_age_seconds
                    .with_label_values(&[collection])
                    .set(at.elapsed().as_secs() as i64);
            }
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Serves `/metrics` and `/healthz` until the task is dropped.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = TcpListener::bind(addr).await?;
        // With port 0 the OS picks one; the log says which.
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving /metrics and /healthz");
        Ok(tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    // Read the whole request head: a client may send it in several pieces.
                    let mut buf = Vec::with_capacity(1024);
                    let mut chunk = [0u8; 1024];
                    let read_head = async {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                    };
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_secs(5), read_head).await;
                    let request = String::from_utf8_lossy(&buf);
                    let path = request.split_whitespace().nth(1).unwrap_or("/");
                    let (status, ctype, body) = match path {
                        "/metrics" => ("200 OK", "text/plain; version=0.0.4", me.render()),
                        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                        _ => (
                            "404 Not Found",
                            "text/plain",
                            "not found: try /metrics or /healthz\n".to_string(),
                        ),
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        }))
    }
}
