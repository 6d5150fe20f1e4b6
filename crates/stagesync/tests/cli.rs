//! The command line as users and their scripts see it: help, exit codes, `check`, `status`,
//! and the metrics endpoint of `run`.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Output};
use std::time::Duration;

use common::{eventually, staging_doc_where, Pair, RunProcess, ORDERS};
use mongodb::bson::{doc, Document};
use stagesync_testkit::{server_binary, LocalServer};

fn stagesync(args: &[&str], config: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stagesync"));
    cmd.args(args);
    if let Some(c) = config {
        cmd.arg("-c").arg(c);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_and_version_describe_every_subcommand() {
    let help = stagesync(&["--help"], None);
    assert!(help.status.success());
    let help = text(&help);
    for sub in [
        "run",
        "check",
        "snapshot",
        "verify",
        "dlq",
        "status",
        "mask-preview",
    ] {
        assert!(help.contains(sub), "--help lists `{sub}`: {help}");
    }
    // Developer tools live in xtask, not in the binary users run.
    assert!(!help.contains("bench") && !help.contains("demo"), "{help}");
    // The exit codes are documented where users look for them.
    for code in [
        "0  success",
        "1  the command ran and found a problem",
        "2  bad usage or configuration",
        "3  a runtime failure",
    ] {
        assert!(
            help.contains(code),
            "--help documents exit code `{code}`: {help}"
        );
    }
    let version = text(&stagesync(&["--version"], None));
    assert!(version.starts_with("stagesync ") && version.contains(env!("CARGO_PKG_VERSION")));
    let dlq = text(&stagesync(&["dlq", "--help"], None));
    for action in ["list", "show", "replay", "purge"] {
        assert!(dlq.contains(action), "{dlq}");
    }
}

#[test]
fn bad_configs_exit_2_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[source]\nuri = \"mongodb://127.0.0.1:1\"\ndatabase = \"p\"\n[target]\nuri = \"mongodb://127.0.0.1:1\"\ndatabase = \"s\"\n";
    let cases = [
        (
            "unknown.toml",
            format!("{base}[sync]\nbatch_size = 5\n{ORDERS}"),
            "unknown field `batch_size`",
        ),
        (
            "nokey.toml",
            format!("{base}[[collections]]\nname = \"orders\"\n"),
            "business_key",
        ),
        (
            "emptykey.toml",
            format!("{base}[[collections]]\nname = \"orders\"\nbusiness_key = []\n"),
            "collections[0].business_key",
        ),
        (
            "twice.toml",
            format!("{base}{ORDERS}{ORDERS}"),
            "listed twice",
        ),
        (
            "badvalue.toml",
            format!("{base}[sync]\ninitial_sync = \"sometimes\"\n{ORDERS}"),
            "sometimes",
        ),
        (
            "noenv.toml",
            format!("{base}{ORDERS}").replace(
                "mongodb://127.0.0.1:1\"\ndatabase = \"p\"",
                "${STAGESYNC_SURELY_UNSET}\"\ndatabase = \"p\"",
            ),
            "STAGESYNC_SURELY_UNSET",
        ),
    ];
    for (name, body, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        for sub in ["run", "check"] {
            let out = stagesync(&[sub], Some(&path));
            assert_eq!(out.status.code(), Some(2), "{sub} {name}: {}", text(&out));
            let err = text(&out);
            assert!(
                err.contains(name) && err.contains(expected),
                "{sub} {name}: {err}"
            );
        }
    }
    let missing = stagesync(&["run"], Some(&dir.path().join("nope.toml")));
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).contains("cannot read the config file"));
}

#[tokio::test]
async fn check_confirms_both_sides_and_lists_the_indexes() {
    let pair = Pair::start();
    let (path, _) = pair.config("", ORDERS);
    let out = stagesync(&["check"], Some(&path));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("production.orders: change stream opens"), "{t}");
    assert!(
        t.contains("stagesync_business_key") && t.contains("stagesync_production_id"),
        "{t}"
    );
}

#[tokio::test]
async fn check_fails_when_production_is_not_a_replica_set() {
    let binary = server_binary(true).unwrap();
    let standalone = LocalServer::start(&binary, &["--standalone"]).unwrap();
    let pair = Pair::start();
    let text_config = pair
        .config_text("", ORDERS)
        .replace(&pair.prod_uri, &standalone.uri());
    let path = pair.dir.path().join("standalone.toml");
    std::fs::write(&path, text_config).unwrap();
    let out = stagesync(&["check"], Some(&path));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("NOT a replica set"), "{}", text(&out));
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // HTTP/1.1 keeps the connection open unless asked not to; this reads to the end.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[tokio::test]
async fn run_serves_metrics_and_health_and_status_reports_each_collection() {
    let pair = Pair::start();
    let (path, config) = pair.config("", ORDERS);
    // `write!` below sends the request in several pieces: the server must read the whole head
    // (it once answered the first piece and closed, and this test failed with a broken pipe).
    let port = stagesync_testkit::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut run = RunProcess::start(&path, pair.dir.path(), &["--metrics-addr", &addr]);
    let ctx = stagesync::context::Context::connect(config).await.unwrap();
    eventually("the stream to open", Duration::from_secs(30), || async {
        ctx.checkpoints
            .load("orders")
            .await
            .unwrap()
            .map(|c| c.token.is_some())
            .unwrap_or(false)
    })
    .await;
    let logged = run.log_text();
    assert!(
        logged.contains("telemetry: serving /livez /healthz /readyz /metrics /status")
            && logged.contains(&addr),
        "{logged}"
    );
    let prod = pair.prod().await.collection::<Document>("orders");
    prod.insert_one(doc! { "userEmail": "a@x.org", "accountId": 1 })
        .await
        .unwrap();
    let staging = pair.staging().await.collection::<Document>("orders");
    staging_doc_where(&staging, doc! { "userEmail": "a@x.org" }, "synced", |_| {
        true
    })
    .await;

    assert!(http_get(port, "/healthz").contains("200 OK"));
    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains(
            r#"stagesync_changes_applied_total{collection="orders",operation="insert"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("stagesync_lag_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("stagesync_batch_size_count"), "{metrics}");
    assert!(
        metrics.contains(r#"stagesync_checkpoint_age_seconds{collection="orders"}"#),
        "{metrics}"
    );

    let out = stagesync(&["status", "--json"], Some(&path));
    assert!(out.status.success(), "{}", text(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["collection"], "orders");
    assert_eq!(rows[0]["dead_letters"], 0);
    assert!(rows[0]["checkpoint_saved_at"].is_string(), "{rows}");
    let human = text(&stagesync(&["status"], Some(&path)));
    assert!(
        human.contains("orders") && human.contains("dead letters"),
        "{human}"
    );
    assert!(run.terminate(Duration::from_secs(10)).unwrap().success());
}
