//! The telemetry server of `run --metrics-addr` (axum):
//!
//! | endpoint | answer |
//! | --- | --- |
//! | `GET /livez` (alias `GET /healthz`) | `200 ok` while the process and its async runtime respond |
//! | `GET /readyz` | `200 {"ready":true,"collections":[]}` while every configured collection is ready, else `503 {"ready":false,"collections":[{"collection":…,"reasons":[…]}]}` listing the unready ones (see [`crate::health`]) |
//! | `GET /metrics` | Prometheus text (`text/plain; version=0.0.4`) |
//! | `GET /status` | the JSON of `stagesync status --json`, from a [`StatusProvider`] |
//!
//! Query strings are ignored; another method on these paths is `405 Method Not Allowed` (with an
//! `Allow` header); any other path is `404` with a line naming the endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Produces the JSON of `stagesync status --json` (read fresh for each `/status` request).
/// `Err` is answered with `503 {"error": …}`.
pub type StatusProvider =
    Arc<dyn Fn() -> BoxFuture<'static, Result<serde_json::Value, String>> + Send + Sync>;

/// How long `/status` waits for its provider before answering 503.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

const ENDPOINTS: &str = "not found; endpoints: /livez /healthz /readyz /metrics /status\n";

/// What the endpoints read.
#[derive(Clone)]
pub struct TelemetryState {
    /// `/metrics`; its [`Metrics::health`] answers `/readyz`.
    pub metrics: Arc<Metrics>,
    /// `/status`.
    pub status: StatusProvider,
}

impl TelemetryState {
    pub fn new(metrics: Arc<Metrics>, status: StatusProvider) -> TelemetryState {
        TelemetryState { metrics, status }
    }
}

/// The routes, without a listener (for embedding or in-process tests).
pub fn router(state: TelemetryState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/healthz", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .fallback(not_found)
        .with_state(state)
}

/// Binds `addr` (port 0: the OS picks one), logs the bound address and serves until `shutdown`
/// is cancelled, then finishes the requests in flight. A bind error is returned, not logged;
/// the task ends when the server has stopped.
pub async fn serve(
    addr: SocketAddr,
    state: TelemetryState,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "telemetry: serving /livez /healthz /readyz /metrics /status on {bound}");
    let app = router(state);
    let task = tokio::spawn(async move {
        let stopped = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = stopped {
            tracing::error!(addr = %bound, error = %e, "telemetry server stopped");
        }
    });
    Ok((bound, task))
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<TelemetryState>) -> Response {
    let readiness = state.metrics.health().readiness_now();
    let ready = readiness.is_ready();
    let body = serde_json::json!({
        "ready": ready,
        "collections": readiness.unhealthy().collect::<Vec<_>>(),
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(state): State<TelemetryState>) -> Response {
    (
        [(header::CONTENT_TYPE, Metrics::content_type())],
        state.metrics.render(),
    )
        .into_response()
}

async fn status(State(state): State<TelemetryState>) -> Response {
    let error = match tokio::time::timeout(STATUS_TIMEOUT, (state.status)()).await {
        Ok(Ok(json)) => return Json(json).into_response(),
        Ok(Err(e)) => e,
        Err(_) => format!("status not available within {}s", STATUS_TIMEOUT.as_secs()),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": error })),
    )
        .into_response()
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, ENDPOINTS)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper::{Method, Request};
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::health::{Health, ManualClock};

    struct Server {
        addr: SocketAddr,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        health: Health,
        clock: ManualClock,
    }

    async fn start(status: StatusProvider) -> Server {
        let clock = ManualClock::new();
        let health =
            Health::with_clock(["orders", "users"], Duration::from_secs(30), clock.clock());
        let metrics = Arc::new(Metrics::new(health.clone()));
        let stop = CancellationToken::new();
        let (addr, task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            TelemetryState::new(metrics, status),
            stop.clone(),
        )
        .await
        .unwrap();
        assert_ne!(addr.port(), 0, "the bound port is returned");
        Server {
            addr,
            stop,
            task,
            health,
            clock,
        }
    }

    fn fixed_status() -> StatusProvider {
        Arc::new(|| {
            Box::pin(async {
                Ok(serde_json::json!([{ "collection": "orders", "dead_letters": 0 }]))
            })
        })
    }

    struct Reply {
        status: u16,
        content_type: String,
        allow: String,
        body: String,
    }

    /// One request over a fresh HTTP/1.1 connection (hyper's client: no hand-made HTTP).
    async fn request(addr: SocketAddr, method: Method, path: &str) -> Reply {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .expect("answered within 10 s")
            .unwrap();
        let header_of = |name| {
            res.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        let (status, content_type, allow) = (
            res.status().as_u16(),
            header_of(header::CONTENT_TYPE),
            header_of(header::ALLOW),
        );
        let body = res.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            content_type,
            allow,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        request(addr, Method::GET, path).await
    }

    fn json(r: &Reply) -> serde_json::Value {
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
    }

    fn make_healthy(h: &Health) {
        for c in ["orders", "users"] {
            h.stream_opened(c);
            h.progress(c);
            h.checkpoint_saved(c);
        }
    }

    #[tokio::test]
    async fn livez_and_healthz_answer_ok() {
        let s = start(fixed_status()).await;
        for path in ["/livez", "/healthz", "/livez?probe=1"] {
            let r = get(s.addr, path).await;
            assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{path}");
        }
    }

    #[tokio::test]
    async fn metrics_ignores_the_query_string_and_refuses_other_methods() {
        let s = start(fixed_status()).await;
        let r = get(s.addr, "/metrics?x=1").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "text/plain; version=0.0.4");
        assert!(
            r.body.contains("# TYPE stagesync_ready gauge"),
            "{}",
            r.body
        );
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            let r = request(s.addr, method.clone(), "/metrics").await;
            assert_eq!(r.status, 405, "{method} /metrics");
            assert!(r.allow.contains("GET"), "Allow: {}", r.allow);
        }
        for path in ["/readyz", "/livez", "/healthz", "/status"] {
            assert_eq!(
                request(s.addr, Method::POST, path).await.status,
                405,
                "POST {path}"
            );
        }
    }

    #[tokio::test]
    async fn unknown_paths_are_404_naming_the_endpoints() {
        let s = start(fixed_status()).await;
        for path in ["/", "/nope", "/metrics/extra", "/nope?x=1"] {
            let r = get(s.addr, path).await;
            assert_eq!(r.status, 404, "{path}");
            assert!(
                r.body.contains("/metrics") && r.body.contains("/readyz"),
                "{}",
                r.body
            );
        }
        assert_eq!(request(s.addr, Method::POST, "/nope").await.status, 404);
    }

    #[tokio::test]
    async fn readyz_flips_with_health() {
        let s = start(fixed_status()).await;
        let r = get(s.addr, "/readyz").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            json(&r),
            serde_json::json!({"ready": false, "collections": [
                {"collection": "orders", "reasons": ["starting"]},
                {"collection": "users", "reasons": ["starting"]},
            ]})
        );

        make_healthy(&s.health);
        let r = get(s.addr, "/readyz?verbose").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            json(&r),
            serde_json::json!({"ready": true, "collections": []})
        );

        // 47 s pass; only `users` keeps going, and `orders` cannot save its checkpoint.
        s.clock.advance(Duration::from_secs(47));
        s.health.progress("users");
        s.health.checkpoint_saved("users");
        s.health.progress("orders");
        let r = get(s.addr, "/readyz").await;
        assert_eq!(r.status, 503);
        assert_eq!(
            json(&r),
            serde_json::json!({"ready": false, "collections": [
                {"collection": "orders", "reasons": ["checkpoint not saved for 47s"]},
            ]})
        );
        let metrics = get(s.addr, "/metrics").await.body;
        assert!(metrics.contains("stagesync_ready 0\n"), "{metrics}");
        assert!(
            metrics.contains("stagesync_collection_ready{collection=\"users\"} 1\n"),
            "{metrics}"
        );

        s.health.checkpoint_saved("orders");
        assert_eq!(get(s.addr, "/readyz").await.status, 200);
        assert!(get(s.addr, "/metrics")
            .await
            .body
            .contains("stagesync_ready 1\n"));

        s.health.staging_unreachable();
        let r = get(s.addr, "/readyz").await;
        assert_eq!(r.status, 503);
        assert_eq!(
            json(&r)["collections"][1]["reasons"][0],
            "staging unreachable"
        );
    }

    #[tokio::test]
    async fn checkpoint_age_grows_between_scrapes() {
        let s = start(fixed_status()).await;
        let age = |text: &str| -> f64 {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("stagesync_checkpoint_age_seconds{collection=\"orders\"} ")
                })
                .unwrap_or_else(|| panic!("no age in {text}"))
                .parse()
                .unwrap()
        };
        s.health.checkpoint_saved("orders");
        let first = age(&get(s.addr, "/metrics").await.body);
        s.clock.advance(Duration::from_secs(12));
        let second = age(&get(s.addr, "/metrics").await.body);
        assert_eq!((first, second), (0.0, 12.0));
        s.health.checkpoint_saved("orders");
        assert_eq!(age(&get(s.addr, "/metrics").await.body), 0.0);
    }

    #[tokio::test]
    async fn checkpoint_age_grows_on_the_system_clock_too() {
        // The real clock: poll with a deadline until a later scrape shows a larger age.
        let health = Health::new(["orders"], Duration::from_secs(30));
        health.checkpoint_saved("orders");
        let metrics = Arc::new(Metrics::new(health));
        let stop = CancellationToken::new();
        let (addr, _task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            TelemetryState::new(metrics, fixed_status()),
            stop.clone(),
        )
        .await
        .unwrap();
        let age = |text: String| -> f64 {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("stagesync_checkpoint_age_seconds{collection=\"orders\"} ")
                })
                .unwrap()
                .parse()
                .unwrap()
        };
        let first = age(get(addr, "/metrics").await.body);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = age(get(addr, "/metrics").await.body);
            if now > first {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "age stayed at {now}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn status_returns_the_providers_json() {
        let s = start(fixed_status()).await;
        let r = get(s.addr, "/status?pretty=1").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            json(&r),
            serde_json::json!([{ "collection": "orders", "dead_letters": 0 }])
        );
    }

    #[tokio::test]
    async fn a_failing_status_provider_is_503_with_the_error() {
        let failing: StatusProvider =
            Arc::new(|| Box::pin(async { Err("staging unreachable".to_string()) }));
        let s = start(failing).await;
        let r = get(s.addr, "/status").await;
        assert_eq!(r.status, 503);
        assert_eq!(
            json(&r),
            serde_json::json!({ "error": "staging unreachable" })
        );
    }

    #[tokio::test]
    async fn a_bind_error_is_returned() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let health = Health::new(["orders"], Duration::from_secs(30));
        let result = serve(
            addr,
            TelemetryState::new(Arc::new(Metrics::new(health)), fixed_status()),
            CancellationToken::new(),
        )
        .await;
        assert!(result.is_err(), "binding a taken port fails");
    }

    #[tokio::test]
    async fn cancelling_the_token_stops_the_server() {
        let s = start(fixed_status()).await;
        assert_eq!(get(s.addr, "/livez").await.status, 200);
        s.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), s.task)
            .await
            .expect("stopped within 10 s")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(s.addr).await.is_err(),
            "no longer listening"
        );
    }
}
