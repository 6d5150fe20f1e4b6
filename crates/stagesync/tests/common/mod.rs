//! Test fixture: a fresh pair of real servers (production and staging) per test.
//!
//! By default each pair is two SecantusDB processes on free ports with temporary storage
//! (killed on drop, also when the test panics). With `STAGESYNC_TEST_PROD_URI` and
//! `STAGESYNC_TEST_STAGING_URI` set, the suite runs against those servers instead (a real
//! MongoDB replica set), each test in databases of its own.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Document, Timestamp};
use mongodb::{Client, Collection, Database};
use stagesync::config::Config;
use stagesync_testkit::{server_binary, LocalServer};
use tokio_util::sync::CancellationToken;

pub struct Pair {
    pub prod_uri: String,
    pub staging_uri: String,
    pub prod_server: Option<LocalServer>,
    pub staging_server: Option<LocalServer>,
    /// Unique per test, so tests can share external servers.
    pub tag: String,
    pub dir: tempfile::TempDir,
}

fn unique_tag() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

impl Pair {
    /// A pair for this test: external servers when the URI variables are set, else local ones.
    pub fn start() -> Pair {
        match (
            std::env::var("STAGESYNC_TEST_PROD_URI"),
            std::env::var("STAGESYNC_TEST_STAGING_URI"),
        ) {
            (Ok(p), Ok(s)) => Pair {
                prod_uri: p,
                staging_uri: s,
                prod_server: None,
                staging_server: None,
                tag: unique_tag(),
                dir: tempfile::tempdir().unwrap(),
            },
            _ => Pair::start_local(&[]),
        }
    }

    /// Always local processes (for tests that stop and restart servers).
    pub fn start_local(extra_args: &[&str]) -> Pair {
        let binary = server_binary(true).unwrap_or_else(|e| panic!("{e}"));
        let prod = LocalServer::start(&binary, extra_args)
            .unwrap_or_else(|e| panic!("starting production server: {e:#}"));
        let staging = LocalServer::start(&binary, extra_args)
            .unwrap_or_else(|e| panic!("starting staging server: {e:#}"));
        Pair {
            prod_uri: prod.uri(),
            staging_uri: staging.uri(),
            prod_server: Some(prod),
            staging_server: Some(staging),
            tag: unique_tag(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn prod_db_name(&self) -> String {
        format!("prod_{}", self.tag)
    }
    pub fn staging_db_name(&self) -> String {
        format!("staging_{}", self.tag)
    }
    pub fn meta_db_name(&self) -> String {
        format!("stagesync_{}", self.tag)
    }

    pub async fn prod(&self) -> Database {
        client(&self.prod_uri).await.database(&self.prod_db_name())
    }
    pub async fn staging(&self) -> Database {
        client(&self.staging_uri)
            .await
            .database(&self.staging_db_name())
    }
    pub async fn meta(&self) -> Database {
        client(&self.staging_uri)
            .await
            .database(&self.meta_db_name())
    }

    /// A complete config: `[source]`, `[target]`, `[sync]` (with `sync_extra` lines) and the
    /// given `[[collections]]` / other tables.
    pub fn config_text(&self, sync_extra: &str, rest: &str) -> String {
        format!(
            "[source]\nuri = \"{}\"\ndatabase = \"{}\"\n[target]\nuri = \"{}\"\ndatabase = \"{}\"\n\
             [sync]\nname = \"test\"\nmetadata_database = \"{}\"\nwrite_concern = 1\ncheckpoint_interval = \"200ms\"\n{sync_extra}\n{rest}\n",
            self.prod_uri,
            self.prod_db_name(),
            self.staging_uri,
            self.staging_db_name(),
            self.meta_db_name()
        )
    }

    /// A config file like [`Pair::config_text`]'s, written into the test's directory, whose
    /// staging and metadata databases are suffixed with `_{name}`: copies of the same
    /// production side by side. Returns its path and the two database names.
    pub fn config_into(
        &self,
        name: &str,
        sync_extra: &str,
        rest: &str,
    ) -> (PathBuf, String, String) {
        let staging_db = format!("{}_{name}", self.staging_db_name());
        let meta_db = format!("{}_{name}", self.meta_db_name());
        let text = self
            .config_text(sync_extra, rest)
            .replace(&self.staging_db_name(), &staging_db)
            .replace(&self.meta_db_name(), &meta_db);
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        (path, staging_db, meta_db)
    }

    /// Writes a config file into the test's directory and loads it.
    pub fn config(&self, sync_extra: &str, rest: &str) -> (PathBuf, Arc<Config>) {
        let path = self
            .dir
            .path()
            .join(format!("stagesync-{}.toml", unique_tag()));
        std::fs::write(&path, self.config_text(sync_extra, rest)).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        (path, Arc::new(config))
    }
}

pub async fn client(uri: &str) -> Client {
    Client::with_uri_str(uri).await.expect("valid test URI")
}

/// The default collection config of the semantics tests.
pub const ORDERS: &str = r#"
[[collections]]
name = "orders"
business_key = ["userEmail", "accountId"]
preserve = ["qa", "experiments.*"]
"#;

/// The stagesync engine running in this process until dropped or stopped.
pub struct Engine {
    pub stop: CancellationToken,
    pub handle: Option<tokio::task::JoinHandle<Result<(), stagesync::error::SyncError>>>,
    pub ctx: stagesync::context::Context,
}

impl Engine {
    pub async fn start(config: Arc<Config>) -> Engine {
        // `STAGESYNC_TEST_LOG=stagesync=debug cargo test …` shows the in-process engine's log.
        if let Ok(filter) = std::env::var("STAGESYNC_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let ctx = stagesync::context::Context::connect(config).await.unwrap();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(stagesync::engine::run(ctx.clone(), stop.clone()));
        let engine = Engine {
            stop,
            handle: Some(handle),
            ctx,
        };
        // Streams are open once every collection has a checkpoint with a position.
        let cfg = engine.ctx.config.clone();
        eventually(
            "every stream to open and checkpoint",
            Duration::from_secs(120),
            || async {
                for c in &cfg.collections {
                    match engine.ctx.checkpoints.load(&c.name).await.unwrap() {
                        Some(cp) if cp.token.is_some() && cp.snapshot.is_none() => {}
                        _ => return false,
                    }
                }
                true
            },
        )
        .await;
        engine
    }

    pub async fn stop(mut self) -> Result<(), stagesync::error::SyncError> {
        self.stop.cancel();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("the engine stops within 10 s")
            .expect("engine task did not panic")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Polls `condition` until it holds, failing the test with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until the stream of collection `stream` (sync `test`) has applied and checkpointed
/// every production change up to cluster time `at`. Seeing a document in staging is not enough
/// to know that: a snapshot — a resumed one too — copies documents written after it started
/// before the stream has replayed the changes made since its start.
pub async fn wait_until_stream_passes(meta: &Database, stream: &str, at: Timestamp) {
    let checkpoints = meta.collection::<Document>("checkpoints");
    let id = format!("test/{stream}");
    eventually(
        &format!("the stream of {stream} to pass {at:?}"),
        Duration::from_secs(300),
        || async {
            checkpoints
                .find_one(doc! { "_id": &id })
                .await
                .unwrap()
                .is_some_and(|cp| {
                    !cp.contains_key("snapshot")
                        && cp.get_timestamp("clusterTime").is_ok_and(|t| t >= at)
                })
        },
    )
    .await;
}

/// The cluster times of the next `n` changes of `coll`: run `writes`, which make them, while a
/// change stream opened before it watches.
pub async fn change_times<F, Fut>(
    coll: &Collection<Document>,
    n: usize,
    writes: F,
) -> Vec<Timestamp>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut watch = coll.watch().await.unwrap();
    writes().await;
    let mut times = Vec::with_capacity(n);
    while times.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(60), watch.try_next())
            .await
            .expect("the change arrives")
            .unwrap()
            .expect("the stream goes on");
        times.push(event.cluster_time.expect("a change has a cluster time"));
    }
    times
}

pub async fn all_docs(coll: &Collection<Document>) -> Vec<Document> {
    coll.find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

pub async fn find_by(coll: &Collection<Document>, filter: Document) -> Vec<Document> {
    coll.find(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Waits until exactly one staging document matches `filter` and satisfies `check`; returns it.
pub async fn staging_doc_where(
    coll: &Collection<Document>,
    filter: Document,
    what: &str,
    check: impl Fn(&Document) -> bool,
) -> Document {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let docs = find_by(coll, filter.clone()).await;
        if docs.len() == 1 && check(&docs[0]) {
            return docs.into_iter().next().unwrap();
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for the staging document {filter} to be {what}; staging has {docs:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `redis-server` process from the testkit; panics (failing the test) when it cannot start.
pub struct RedisServer(pub stagesync_testkit::RedisServer);

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer(stagesync_testkit::RedisServer::start().unwrap_or_else(|e| panic!("{e:#}")))
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    /// Kills redis-server (an outage); [`RedisServer::restart`] brings it back on the same port.
    pub fn stop(&mut self) {
        self.0.stop();
    }

    /// Starts redis-server again on the same port (empty: it runs without persistence).
    pub fn restart(&mut self) {
        self.0.restart().unwrap_or_else(|e| panic!("{e:#}"));
    }
}

/// `stagesync run -c FILE` as a child process (the real binary), its log in the test directory.
pub struct RunProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl RunProcess {
    pub fn start(config: &std::path::Path, dir: &std::path::Path, extra: &[&str]) -> RunProcess {
        RunProcess::spawn("run", config, dir, extra)
    }

    /// Another subcommand taking `-c FILE` (e.g. `snapshot`).
    pub fn start_command(
        command: &str,
        config: &std::path::Path,
        dir: &std::path::Path,
    ) -> RunProcess {
        RunProcess::spawn(command, config, dir, &[])
    }

    fn spawn(
        command: &str,
        config: &std::path::Path,
        dir: &std::path::Path,
        extra: &[&str],
    ) -> RunProcess {
        let log = dir.join(format!("{command}-{}.log", unique_tag()));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_stagesync"))
            .args([command, "-c"])
            .arg(config)
            .args(["--log-format", "json"])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the stagesync binary starts");
        RunProcess { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (waiting at most `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait(within)
    }

    pub fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to the telemetry endpoint on 127.0.0.1: (status code, body).
/// `None` when nothing answers.
pub fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let status = reply.split_whitespace().nth(1)?.parse().ok()?;
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The value of one sample (`name{labels}`) in a Prometheus text page.
pub fn metric_value(page: &str, sample: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sends `signal` (e.g. "STOP", "CONT", "TERM") to a process.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Runs the `stagesync` binary with `args` and `-c config`, to its end.
pub fn stagesync(args: &[&str], config: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap()
}

/// A command's exit code, stdout and stderr, for assertion messages.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `/metrics` page of the telemetry endpoint on `port`.
pub async fn scrape(port: u16) -> String {
    tokio::task::spawn_blocking(move || http(port, "GET", "/metrics"))
        .await
        .unwrap()
        .expect("/metrics answers")
        .1
}

/// The checkpoint of `orders`, read with a context of its own (shut down afterwards).
pub async fn orders_checkpoint(config: &Arc<Config>) -> Option<stagesync::checkpoint::Checkpoint> {
    let ctx = stagesync::context::Context::connect(config.clone())
        .await
        .unwrap();
    let cp = ctx.checkpoints.load("orders").await.unwrap();
    ctx.shutdown().await;
    cp
}

/// Polls until the stream of `orders` has opened (its checkpoint holds a resume token).
pub async fn wait_until_streaming(config: &Arc<Config>) {
    eventually("the stream to open", Duration::from_secs(60), || async {
        orders_checkpoint(config)
            .await
            .is_some_and(|c| c.token.is_some())
    })
    .await;
}
