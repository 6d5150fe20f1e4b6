//! The deployment artifacts, each checked against the product it deploys:
//!
//! - `Dockerfile` (+ `.dockerignore`): parsed — stages, non-root numeric user, exec-form
//!   `ENTRYPOINT ["stagesync"]`, a `CMD` the real CLI accepts, the cargo command, the Rust image
//!   version against the workspace's `rust-version`, every copied path present and not ignored,
//!   the binary copied from where cargo puts it. (No Docker engine here: the image is not built.)
//! - `deploy/kubernetes/`: every YAML document parsed — kinds, replicas, probes on routes the
//!   telemetry router really serves, the ConfigMap's `stagesync.toml` loaded and validated with
//!   the Secret template's variables, security context, resources; and the container's command
//!   run as a process with that config: the probes answer and SIGTERM stops it in time.
//! - `deploy/systemd/stagesync.service`: parsed as INI — command, restart policy (exit 2 is the
//!   product's config-error code, checked by running the binary), stop timeout, hardening; plus
//!   `systemd-analyze verify` and `security` when `systemd-analyze` is installed.
//! - `deploy/grafana/stagesync.json`: every metric an expression queries is one `/metrics`
//!   exports, with a type that fits how it is queried and the labels the query uses.
//! - `examples/stagesync.toml`: loaded and validated with its environment variables.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use stagesync::cli::{Cli, Command};
use stagesync::config::{Config, DeleteMode, WriteConcernSetting};
use stagesync::health::Health;
use stagesync::metrics::{Metrics, Side};
use yaml_rust2::{Yaml, YamlLoader};

// ---- shared helpers -----------------------------------------------------------------------

/// The repository root (two levels above this crate).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The workspace's root manifest.
fn workspace_manifest() -> toml::Table {
    toml::from_str(&read("Cargo.toml")).unwrap()
}

fn workspace_rust_version() -> Vec<u64> {
    let manifest = workspace_manifest();
    let v = manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .expect("[workspace.package] rust-version");
    version_numbers(v).unwrap_or_else(|| panic!("rust-version {v:?}"))
}

/// `1.88` / `1.88.0` → [1, 88] / [1, 88, 0]; the leading dotted numbers of a string.
fn version_numbers(s: &str) -> Option<Vec<u64>> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let nums: Option<Vec<u64>> = s[..end]
        .trim_end_matches('.')
        .split('.')
        .map(|p| p.parse().ok())
        .collect();
    nums.filter(|n| !n.is_empty())
}

/// `a >= b`, comparing missing trailing components as 0.
fn version_at_least(a: &[u64], b: &[u64]) -> bool {
    let n = a.len().max(b.len());
    let get = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    for i in 0..n {
        if get(a, i) != get(b, i) {
            return get(a, i) > get(b, i);
        }
    }
    true
}

/// Parses a `stagesync …` argument list with the real CLI: (config path, metrics address).
fn run_command(args: &[String]) -> (PathBuf, Option<SocketAddr>) {
    let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    match cli.command {
        Command::Run {
            config,
            metrics_addr,
            ..
        } => (config.config, metrics_addr),
        other => panic!("{args:?} is not `stagesync run`: {other:?}"),
    }
}

/// `Config::parse` with `env`, also returning every variable the text asked for.
fn parse_config(
    text: &str,
    env: &BTreeMap<String, String>,
) -> (Result<Config, String>, BTreeSet<String>) {
    let asked = RefCell::new(BTreeSet::new());
    let lookup = |name: &str| {
        asked.borrow_mut().insert(name.to_string());
        env.get(name).cloned()
    };
    let config = Config::parse(text, &lookup).map_err(|e| e.to_string());
    (config, asked.into_inner())
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The variables the three deployment artifacts pass to `${VAR}` in the config.
const CONFIG_VARIABLES: [&str; 3] = ["PROD_URI", "STAGING_URI", "STAGESYNC_MASK_KEY"];

// ---- Dockerfile ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Instruction {
    op: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, op: &str) -> impl Iterator<Item = &Instruction> {
        let op = op.to_string();
        self.instructions.iter().filter(move |i| i.op == op)
    }

    fn last(&self, op: &str) -> Option<&Instruction> {
        self.all(op).last()
    }
}

/// Instructions of a Dockerfile: comments and blank lines dropped, `\` continuations joined.
fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Docker drops comment and empty lines, also inside a continuation.
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (op, args) = current.trim().split_once(char::is_whitespace).unwrap();
                out.push(Instruction {
                    op: op.to_ascii_uppercase(),
                    args: args.trim().to_string(),
                });
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "a continuation runs past the end");
    out
}

fn dockerfile_stages(text: &str) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    for i in dockerfile_instructions(text) {
        if i.op == "FROM" {
            let words: Vec<&str> = i
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                other => panic!("FROM {other:?}"),
            };
            stages.push(Stage {
                image: words[0].to_string(),
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("an instruction before the first FROM")
                .instructions
                .push(i);
        }
    }
    stages
}

/// `["a", "b"]` (exec form) → the strings; shell form is refused: under `sh -c` SIGTERM would
/// reach the shell, not stagesync.
fn exec_form(i: &Instruction) -> Vec<String> {
    serde_json::from_str(&i.args).unwrap_or_else(|e| {
        panic!(
            "{} {} must be in exec form (a JSON array): {e}",
            i.op, i.args
        )
    })
}

/// COPY/ADD: (flags such as `--from=builder`, sources, destination).
fn copy_parts(i: &Instruction) -> (BTreeMap<String, String>, Vec<String>, String) {
    let mut flags = BTreeMap::new();
    let mut words: Vec<String> = Vec::new();
    for w in i.args.split_whitespace() {
        match w.strip_prefix("--") {
            Some(flag) if words.is_empty() => {
                let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
                flags.insert(k.to_string(), v.to_string());
            }
            _ => words.push(w.to_string()),
        }
    }
    let dest = words.pop().expect("COPY needs a destination");
    assert!(!words.is_empty(), "COPY {} has no source", i.args);
    (flags, words, dest)
}

/// One `.dockerignore` pattern against a path (both `/`-separated, relative to the context):
/// `*` and `?` within a segment, `**` for any number of segments; a pattern matching a parent
/// directory excludes everything below it.
fn dockerignore_matches(pattern: &str, path: &str) -> bool {
    fn segment(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => segment(&p[1..], s) || (!s.is_empty() && segment(p, &s[1..])),
            (Some(b'?'), Some(_)) => segment(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => segment(&p[1..], &s[1..]),
            _ => false,
        }
    }
    fn segments(p: &[&str], s: &[&str]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(&"**"), _) => segments(&p[1..], s) || (!s.is_empty() && segments(p, &s[1..])),
            (Some(a), Some(b)) if segment(a.as_bytes(), b.as_bytes()) => segments(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let pattern: Vec<&str> = pattern
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    let path: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    (1..=path.len()).any(|n| segments(&pattern, &path[..n]))
}

/// Whether `.dockerignore` keeps `path` out of the build context (the last matching line wins;
/// `!` re-includes).
fn dockerignored(patterns: &[String], path: &str) -> bool {
    let mut ignored = false;
    for p in patterns {
        match p.strip_prefix('!') {
            Some(p) if dockerignore_matches(p, path) => ignored = false,
            None if dockerignore_matches(p, path) => ignored = true,
            _ => {}
        }
    }
    ignored
}

fn dockerignore_patterns() -> Vec<String> {
    read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Every file below `dir` (relative to the repository, `/`-separated).
fn files_below(dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![repo().join(dir)];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let rel = path.strip_prefix(repo()).unwrap();
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out
}

/// `(package version, rust-version)` of every locked package `cargo build -p stagesync` compiles
/// for Linux (normal and build dependencies, not dev ones), from `cargo metadata`.
fn locked_dependency_rust_versions() -> Vec<(String, Vec<u64>)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Process::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", "x86_64-unknown-linux-gnu"])
        .current_dir(repo())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes: BTreeMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "stagesync" && p["source"].is_null())
        .unwrap()["id"]
        .as_str()
        .unwrap();
    let mut seen = BTreeSet::from([root]);
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let used = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null() || k["kind"] == "build");
            let dep_id = dep["pkg"].as_str().unwrap();
            if used && seen.insert(dep_id) {
                todo.push(dep_id);
            }
        }
    }
    let packages = meta["packages"].as_array().unwrap();
    assert!(
        seen.len() > 50,
        "the product's dependency graph: {}",
        seen.len()
    );
    packages
        .iter()
        .filter(|p| seen.contains(p["id"].as_str().unwrap()))
        .filter_map(|p| {
            let needs = version_numbers(p["rust_version"].as_str()?)?;
            Some((
                format!("{} {}", p["name"].as_str()?, p["version"].as_str()?),
                needs,
            ))
        })
        .collect()
}

#[test]
fn dockerfile_builds_the_product_into_a_small_non_root_image() {
    let stages = dockerfile_stages(&read("Dockerfile"));
    assert!(stages.len() >= 2, "multi-stage: {stages:#?}");
    let runtime = stages.last().unwrap();

    // The builder: the official Rust image, at least the workspace's rust-version.
    let (builder_index, builder) = stages
        .iter()
        .enumerate()
        .find(|(_, s)| s.all("RUN").any(|r| r.args.contains("cargo build")))
        .expect("a stage runs `cargo build`");
    assert!(
        builder_index < stages.len() - 1,
        "the build is not the final stage"
    );
    let tag = builder
        .image
        .strip_prefix("rust:")
        .or_else(|| builder.image.strip_prefix("docker.io/library/rust:"))
        .unwrap_or_else(|| panic!("the builder is the official rust image: {}", builder.image));
    let image_version = version_numbers(tag)
        .unwrap_or_else(|| panic!("the rust image is pinned to a version, not {tag:?}"));
    let rust_version = workspace_rust_version();
    assert!(
        image_version.len() >= 2 && version_at_least(&image_version, &rust_version),
        "rust:{tag} is older than the workspace's rust-version {rust_version:?}"
    );
    // `--locked` builds the locked dependencies, whose own rust-version may be newer.
    for (package, needs) in locked_dependency_rust_versions() {
        assert!(
            version_at_least(&image_version, &needs),
            "rust:{tag} cannot build {package} (Cargo.lock), which needs Rust {needs:?}"
        );
    }

    // `cargo build --release --locked -p stagesync`.
    let build = builder
        .all("RUN")
        .find(|r| r.args.contains("cargo build"))
        .unwrap();
    let words: Vec<&str> = build.args.split_whitespace().collect();
    for flag in ["--release", "--locked"] {
        assert!(words.contains(&flag), "{flag} in `{}`", build.args);
    }
    let package = words
        .windows(2)
        .find(|w| w[0] == "-p" || w[0] == "--package")
        .map(|w| w[1])
        .or_else(|| words.iter().find_map(|w| w.strip_prefix("--package=")));
    assert_eq!(package, Some("stagesync"), "`{}`", build.args);

    // Where cargo puts the binary: <WORKDIR>/target/release/<bin name>.
    let workdir = builder
        .last("WORKDIR")
        .map(|w| w.args.trim_end_matches('/').to_string())
        .expect("the builder sets WORKDIR");
    assert!(workdir.starts_with('/'), "WORKDIR {workdir} is absolute");
    let target_dir = words
        .windows(2)
        .find(|w| w[0] == "--target-dir")
        .map(|w| w[1].to_string())
        .or_else(|| {
            builder.all("ENV").find_map(|e| {
                e.args
                    .strip_prefix("CARGO_TARGET_DIR")
                    .map(|v| v.trim_start_matches(['=', ' ']).to_string())
            })
        })
        .unwrap_or_else(|| format!("{workdir}/target"));
    let package_manifest: toml::Table =
        toml::from_str(&read("crates/stagesync/Cargo.toml")).unwrap();
    let bin = package_manifest["bin"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|b| b["name"].as_str())
        .unwrap();
    assert_eq!(bin, "stagesync");
    let built = format!("{target_dir}/release/{bin}");

    // The runtime stage copies exactly that binary onto PATH and runs it as the entrypoint.
    assert!(
        !runtime.image.starts_with("rust"),
        "the runtime image is not the Rust toolchain image: {}",
        runtime.image
    );
    let builder_refs: Vec<String> = [Some(builder_index.to_string()), builder.name.clone()]
        .into_iter()
        .flatten()
        .collect();
    let from_builder: Vec<_> = runtime
        .all("COPY")
        .map(copy_parts)
        .filter(|(flags, _, _)| flags.get("from").is_some_and(|f| builder_refs.contains(f)))
        .collect();
    assert_eq!(
        from_builder.len(),
        1,
        "one COPY --from the builder: {from_builder:?}"
    );
    let (_, sources, dest) = &from_builder[0];
    assert_eq!(sources, &vec![built.clone()], "the binary cargo built");
    let installed = if dest.ends_with('/') {
        format!("{dest}{bin}")
    } else {
        dest.clone()
    };
    assert_eq!(installed, "/usr/local/bin/stagesync", "on the default PATH");
    let entrypoint = exec_form(runtime.last("ENTRYPOINT").expect("ENTRYPOINT"));
    assert!(
        entrypoint == ["stagesync"] || entrypoint == [installed.clone()],
        "ENTRYPOINT {entrypoint:?}"
    );

    // A non-root, numeric user (runAsNonRoot can only verify a numeric one).
    let user = runtime.last("USER").expect("the runtime stage sets USER");
    let ids: Vec<&str> = user.args.split(':').collect();
    for id in &ids {
        let n: u32 = id
            .parse()
            .unwrap_or_else(|_| panic!("USER {} is numeric (uid[:gid])", user.args));
        assert_ne!(n, 0, "USER {} is not root", user.args);
    }

    // The default command is one the CLI accepts: run, the mounted config, metrics on every
    // interface at the exposed port.
    let cmd = exec_form(runtime.last("CMD").expect("CMD"));
    let argv: Vec<String> = ["stagesync".to_string()].into_iter().chain(cmd).collect();
    let (config, metrics) = run_command(&argv);
    assert_eq!(config, Path::new("/etc/stagesync/stagesync.toml"));
    let metrics = metrics.expect("CMD serves the probes and metrics (--metrics-addr)");
    assert!(
        metrics.ip().is_unspecified(),
        "{metrics}: reachable from outside the container"
    );
    let exposed: Vec<u16> = runtime
        .all("EXPOSE")
        .flat_map(|e| e.args.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert!(exposed.contains(&metrics.port()), "EXPOSE {exposed:?}");
    assert_eq!(metrics.port(), 9464);
}

#[test]
fn dockerfile_copies_only_what_exists_and_the_context_keeps() {
    let stages = dockerfile_stages(&read("Dockerfile"));
    let ignore = dockerignore_patterns();
    // The target directory (tens of GB) and .git never enter the build context.
    for heavy in ["target", "target/debug/stagesync", ".git", ".tools"] {
        assert!(dockerignored(&ignore, heavy), "{heavy} is in .dockerignore");
    }
    let mut copied: Vec<String> = Vec::new();
    for stage in &stages {
        for i in stage.all("COPY").chain(stage.all("ADD")) {
            let (flags, sources, _) = copy_parts(i);
            if flags.contains_key("from") {
                continue;
            }
            for src in sources {
                let rel = src
                    .trim_start_matches("./")
                    .trim_end_matches('/')
                    .to_string();
                assert!(
                    !rel.contains('*') && !rel.starts_with('/') && !rel.contains(".."),
                    "COPY {src}: a plain path in the context"
                );
                assert!(repo().join(&rel).exists(), "COPY {src}: no such path");
                assert!(
                    !dockerignored(&ignore, &rel),
                    "COPY {src} is excluded by .dockerignore"
                );
                copied.push(rel);
            }
        }
    }
    let covered = |path: &str| {
        copied
            .iter()
            .any(|c| path == c || path.starts_with(&format!("{c}/")))
    };
    // `--locked` needs the lock file; loading the workspace needs every member.
    for file in ["Cargo.toml", "Cargo.lock"] {
        assert!(covered(file), "{file} is copied");
    }
    let manifest = workspace_manifest();
    let members = manifest["workspace"]["members"].as_array().unwrap();
    assert!(members.len() >= 3, "{members:?}");
    for member in members {
        let member = member.as_str().unwrap();
        let mut needed = vec![format!("{member}/Cargo.toml")];
        needed.extend(files_below(&format!("{member}/src")));
        for file in needed {
            assert!(
                covered(&file),
                "{file} is copied (workspace member {member})"
            );
            assert!(
                !dockerignored(&ignore, &file),
                "{file} is excluded by .dockerignore"
            );
        }
    }
}

#[test]
fn the_dockerignore_matcher_follows_docker_rules() {
    let p = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(dockerignored(&p(&["target"]), "target/release/stagesync"));
    assert!(!dockerignored(&p(&["target"]), "crates/stagesync/target"));
    assert!(dockerignored(
        &p(&["crates/*/tests"]),
        "crates/stagesync/tests/cli.rs"
    ));
    assert!(!dockerignored(
        &p(&["crates/*/tests"]),
        "crates/stagesync/src/lib.rs"
    ));
    assert!(dockerignored(&p(&["**/*.log"]), "a/b/run.log"));
    assert!(dockerignored(&p(&["**/*.log"]), "run.log"));
    assert!(!dockerignored(&p(&["*.log", "!keep.log"]), "keep.log"));
}

// ---- Kubernetes ---------------------------------------------------------------------------

/// Every YAML document of deploy/kubernetes, by kind (file name kept for messages).
fn kubernetes_documents() -> Vec<(String, Yaml)> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        for doc in YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}")) {
            docs.push((name.clone(), doc));
        }
    }
    docs
}

fn one_of_kind<'a>(docs: &'a [(String, Yaml)], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some(kind))
        .map(|(_, d)| d)
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn yaml_str<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: a string, not {y:?}"))
}

fn yaml_strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The Secret template's variables (its stringData).
fn secret_variables(secret: &Yaml) -> BTreeMap<String, String> {
    secret["stringData"]
        .as_hash()
        .expect("the Secret template uses stringData")
        .iter()
        .map(|(k, v)| {
            (
                yaml_str(k, "a Secret key").to_string(),
                yaml_str(v, "a Secret value").to_string(),
            )
        })
        .collect()
}

/// The ConfigMap's stagesync.toml and where the Deployment mounts it.
fn mounted_config_path(deployment: &Yaml, configmap: &Yaml) -> PathBuf {
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let cm_name = yaml_str(&configmap["metadata"]["name"], "ConfigMap name");
    let volume = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some(cm_name))
        .expect("a volume of the ConfigMap");
    let volume_name = yaml_str(&volume["name"], "volume name");
    let mount = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| m["name"].as_str() == Some(volume_name))
        .expect("the ConfigMap volume is mounted");
    assert_eq!(mount["readOnly"].as_bool(), Some(true), "mounted read-only");
    let file = match volume["configMap"]["items"].as_vec() {
        Some(items) => {
            let item = items
                .iter()
                .find(|i| i["key"].as_str() == Some("stagesync.toml"))
                .expect("the stagesync.toml item");
            yaml_str(&item["path"], "item path").to_string()
        }
        None => "stagesync.toml".to_string(),
    };
    Path::new(yaml_str(&mount["mountPath"], "mountPath")).join(file)
}

/// A probe's (path, port number), resolving a named port through the container's ports.
fn probe_target(container: &Yaml, probe: &str) -> (String, i64) {
    let get = &container[probe]["httpGet"];
    assert!(!get.is_badvalue(), "{probe} is an httpGet probe");
    let path = yaml_str(&get["path"], "probe path").to_string();
    let port = match &get["port"] {
        Yaml::Integer(n) => *n,
        Yaml::String(name) => container["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
            .unwrap_or_else(|| panic!("{probe}: no container port named {name}")),
        other => panic!("{probe} port {other:?}"),
    };
    (path, port)
}

#[test]
fn kubernetes_manifests_deploy_two_probed_replicas_with_config_and_secrets() {
    let docs = kubernetes_documents();
    let kinds: BTreeSet<&str> = docs
        .iter()
        .map(|(f, d)| d["kind"].as_str().unwrap_or_else(|| panic!("{f}: kind")))
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ConfigMap",
            "Deployment",
            "Kustomization",
            "Secret",
            "Service"
        ])
    );
    let deployment = one_of_kind(&docs, "Deployment");
    let configmap = one_of_kind(&docs, "ConfigMap");
    let secret = one_of_kind(&docs, "Secret");
    let service = one_of_kind(&docs, "Service");

    // kustomization.yaml applies every manifest except the Secret template.
    let kustomization = one_of_kind(&docs, "Kustomization");
    let listed: BTreeSet<String> = yaml_strings(&kustomization["resources"])
        .into_iter()
        .collect();
    let files: BTreeSet<String> = docs
        .iter()
        .map(|(f, _)| f.clone())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    let templates: BTreeSet<String> = docs
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some("Secret"))
        .map(|(f, _)| f.clone())
        .collect();
    assert!(
        templates.iter().all(|f| f.contains("template")),
        "{templates:?}"
    );
    assert_eq!(
        listed,
        files.difference(&templates).cloned().collect(),
        "kustomization resources"
    );

    // Two replicas, spread; a rollout never runs more than that.
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"].as_i64(), Some(2));
    assert_eq!(
        spec["strategy"]["rollingUpdate"]["maxSurge"].as_i64(),
        Some(0),
        "no third pod during a rollout"
    );
    let labels = &spec["template"]["metadata"]["labels"];
    for (k, v) in spec["selector"]["matchLabels"].as_hash().unwrap() {
        assert_eq!(
            &labels[yaml_str(k, "label")],
            v,
            "the selector matches the pods"
        );
    }
    for (k, v) in service["spec"]["selector"].as_hash().unwrap() {
        assert_eq!(
            &labels[yaml_str(k, "label")],
            v,
            "the Service selects the pods"
        );
    }
    let pod = &spec["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        grace >= 15,
        "stagesync stops within 10 s of SIGTERM: {grace}"
    );
    let containers = pod["containers"].as_vec().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // The container's command: the image's entrypoint with these args.
    let mut argv = vec!["stagesync".to_string()];
    argv.extend(yaml_strings(&container["args"]));
    let (config_path, metrics) = run_command(&argv);
    let metrics = metrics.expect("--metrics-addr");
    assert!(
        metrics.ip().is_unspecified(),
        "{metrics}: kubelet probes the pod IP"
    );
    assert_eq!(
        config_path,
        mounted_config_path(deployment, configmap),
        "--config names the mounted ConfigMap file"
    );

    // Probes: /livez and /readyz on the metrics port.
    assert_eq!(
        probe_target(container, "livenessProbe"),
        ("/livez".to_string(), i64::from(metrics.port()))
    );
    assert_eq!(
        probe_target(container, "readinessProbe"),
        ("/readyz".to_string(), i64::from(metrics.port()))
    );
    assert_eq!(metrics.port(), 9464);
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["port"].as_i64(), Some(9464));
    let target = &service_port["targetPort"];
    assert!(
        target.as_i64() == Some(9464)
            || container["ports"]
                .as_vec()
                .unwrap()
                .iter()
                .any(|p| &p["name"] == target && p["containerPort"].as_i64() == Some(9464)),
        "the Service targets the metrics port: {target:?}"
    );

    // Secrets: every key of the Secret is in the environment (envFrom), and the template holds
    // only placeholders.
    let secret_name = yaml_str(&secret["metadata"]["name"], "Secret name");
    let env_from = container["envFrom"].as_vec().expect("envFrom");
    assert!(
        env_from
            .iter()
            .any(|e| e["secretRef"]["name"].as_str() == Some(secret_name)),
        "envFrom the Secret {secret_name}"
    );
    let variables = secret_variables(secret);
    assert_eq!(
        variables
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(CONFIG_VARIABLES)
    );
    for (k, v) in &variables {
        assert!(v.contains("REPLACE_ME"), "{k} is a marked placeholder: {v}");
    }
    for uri in ["PROD_URI", "STAGING_URI"] {
        let cs = mongodb::options::ConnectionString::parse(&variables[uri])
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert!(cs.replica_set.is_some(), "{uri} names its replica set");
    }

    // The ConfigMap's stagesync.toml loads and validates with exactly those variables.
    let toml_text = yaml_str(
        &configmap["data"]["stagesync.toml"],
        "ConfigMap stagesync.toml",
    );
    let (config, asked) = parse_config(toml_text, &variables);
    let config = config.unwrap_or_else(|e| panic!("ConfigMap stagesync.toml: {e}"));
    assert_eq!(asked, BTreeSet::from(CONFIG_VARIABLES.map(String::from)));
    assert_eq!(config.source.uri, variables["PROD_URI"]);
    assert_eq!(config.target.uri, variables["STAGING_URI"]);
    assert_eq!(
        config.masking.as_ref().map(|m| m.key.as_str()),
        Some(variables["STAGESYNC_MASK_KEY"].as_str())
    );
    assert!(!config.collections.is_empty());
    // Without the Secret nothing starts: the missing variable is named.
    let (missing, _) = parse_config(toml_text, &BTreeMap::new());
    assert!(
        missing
            .as_ref()
            .is_err_and(|e| CONFIG_VARIABLES.iter().any(|v| e.contains(v))),
        "{missing:?}"
    );

    // Hardening and resources.
    let pod_sc = &pod["securityContext"];
    let sc = &container["securityContext"];
    assert!(
        pod_sc["runAsNonRoot"].as_bool() == Some(true)
            || sc["runAsNonRoot"].as_bool() == Some(true),
        "runAsNonRoot"
    );
    if let Some(uid) = pod_sc["runAsUser"].as_i64() {
        assert_ne!(uid, 0);
    }
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(
        yaml_strings(&sc["capabilities"]["drop"]).contains(&"ALL".to_string()),
        "drop ALL capabilities"
    );
    let resources = &container["resources"];
    assert_eq!(resources["limits"]["memory"].as_str(), Some("256Mi"));
    for r in ["cpu", "memory"] {
        assert!(!resources["requests"][r].is_badvalue(), "requests.{r}");
    }
}

/// A telemetry server of the product's own router on a free port.
async fn serve_router() -> SocketAddr {
    let metrics = Arc::new(Metrics::new(Health::new(
        ["orders"],
        Duration::from_secs(30),
    )));
    let status: stagesync::telemetry::StatusProvider =
        Arc::new(|| Box::pin(async { Ok(serde_json::json!([])) }));
    let app =
        stagesync::telemetry::router(stagesync::telemetry::TelemetryState::new(metrics, status));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// `GET path` with hyper's client: the status code.
async fn get_status(addr: SocketAddr, path: &str) -> u16 {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answered within 10 s")
        .unwrap();
    res.status().as_u16()
}

#[tokio::test]
async fn the_probe_paths_are_routes_the_telemetry_server_serves() {
    let docs = kubernetes_documents();
    let container = &one_of_kind(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    let addr = serve_router().await;
    for probe in ["livenessProbe", "readinessProbe"] {
        let (path, _) = probe_target(container, probe);
        let status = get_status(addr, &path).await;
        assert_ne!(
            status, 404,
            "{probe} {path} is a route of telemetry::router"
        );
        if probe == "livenessProbe" {
            assert_eq!(status, 200, "liveness answers while the process runs");
        }
    }
    // The check can fail: an unknown path is 404.
    assert_eq!(get_status(addr, "/healthz-typo").await, 404);
}

/// The real binary with the Deployment's args and the ConfigMap's config, its variables from
/// the Secret template but both URIs pointing at a closed loopback port (nothing is reached):
/// the probes answer on the configured paths while it waits for the servers, and SIGTERM
/// stops it with exit 0 well within terminationGracePeriodSeconds.
#[test]
fn the_container_command_serves_the_probes_and_stops_on_sigterm() {
    let docs = kubernetes_documents();
    let deployment = one_of_kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let configmap = one_of_kind(&docs, "ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stagesync.toml");
    std::fs::write(
        &config,
        yaml_str(&configmap["data"]["stagesync.toml"], "stagesync.toml"),
    )
    .unwrap();
    let port = free_port();
    let closed = free_port();
    let dead = format!("mongodb://127.0.0.1:{closed}/?directConnection=true");
    let mut args = yaml_strings(&container["args"]);
    let config_at = args.iter().position(|a| a == "-c").unwrap() + 1;
    args[config_at] = config.to_string_lossy().to_string();
    let addr_at = args.iter().position(|a| a == "--metrics-addr").unwrap() + 1;
    args[addr_at] = format!("127.0.0.1:{port}");
    let variables = secret_variables(one_of_kind(&docs, "Secret"));
    let log = dir.path().join("run.log");
    let mut child = Process::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(&args)
        .env_remove("RUST_LOG")
        .env("STAGESYNC_MASK_KEY", &variables["STAGESYNC_MASK_KEY"])
        .env("PROD_URI", &dead)
        .env("STAGING_URI", &dead)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let probe = |path: String| {
        rt.block_on(async {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => Some(get_status(addr, &path).await),
                Err(_) => None,
            }
        })
    };
    let (live_path, _) = probe_target(container, "livenessProbe");
    let (ready_path, _) = probe_target(container, "readinessProbe");
    let deadline = Instant::now() + Duration::from_secs(30);
    let live = loop {
        if let Some(status) = probe(live_path.clone()) {
            break status;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "stagesync exited early: {}",
            log_text()
        );
        assert!(Instant::now() < deadline, "no telemetry: {}", log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(live, 200, "{live_path}");
    assert_eq!(
        probe(ready_path.clone()),
        Some(503),
        "{ready_path}: not ready while the servers are unreachable"
    );

    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap() as u64;
    let stopped_at = Instant::now();
    let kill = Process::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if stopped_at.elapsed() > Duration::from_secs(grace) {
            let _ = child.kill();
            panic!("still running {grace}s after SIGTERM: {}", log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", log_text());
    assert!(
        stopped_at.elapsed() < Duration::from_secs(10),
        "stopped within 10 s"
    );
    assert!(!log_text().contains("panicked"), "{}", log_text());
}

// ---- systemd ------------------------------------------------------------------------------

/// An INI-style unit file: section → key → values in order (a key may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(part) = line.strip_suffix('\\') {
            pending.push_str(part);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        if let Some(name) = full.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = Some(name.to_string());
            unit.entry(name.to_string()).or_default();
            continue;
        }
        let (key, value) = full
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {full}"));
        let section = section.clone().expect("a key before the first section");
        unit.entry(section)
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    unit
}

/// The last value of a key (systemd: later assignments override, except list-like keys).
fn unit_value<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    unit.get(section)
        .and_then(|s| s.get(key))
        .and_then(|v| v.last())
        .unwrap_or_else(|| panic!("[{section}] {key}= is set"))
}

/// `15`, `15s`, `1min 30s` → seconds.
fn unit_seconds(v: &str) -> u64 {
    stagesync::config::parse_duration(v)
        .or_else(|| v.parse().ok().map(Duration::from_secs))
        .unwrap_or_else(|| panic!("a time span: {v}"))
        .as_secs()
}

/// `KEY=value` / `KEY="value"` lines of an EnvironmentFile.
fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("KEY=value: {l}"));
            (k.trim().to_string(), v.trim().trim_matches('"').to_string())
        })
        .collect()
}

#[test]
fn the_systemd_unit_runs_the_product_restarts_on_failure_and_is_hardened() {
    let unit = parse_unit(&read("deploy/systemd/stagesync.service"));
    let service = "Service";
    let value = |key: &str| unit_value(&unit, service, key);
    assert_eq!(value("Type"), "simple");

    // The command the CLI accepts: run, the config under /etc, metrics on loopback only.
    let exec: Vec<String> = value("ExecStart")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(exec[0], "/usr/local/bin/stagesync");
    let (config, metrics) = run_command(&exec);
    assert_eq!(config, Path::new("/etc/stagesync/stagesync.toml"));
    let metrics = metrics.expect("--metrics-addr");
    assert!(metrics.ip().is_loopback(), "{metrics}");
    assert_eq!(metrics.port(), 9464);
    assert_eq!(value("EnvironmentFile"), "/etc/stagesync/stagesync.env");

    // Restart on failure, but not on a configuration error (exit 2), which would only loop.
    assert_eq!(value("Restart"), "on-failure");
    let prevent: Vec<&str> = unit[service]
        .get("RestartPreventExitStatus")
        .expect("[Service] RestartPreventExitStatus= is set")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    assert!(
        prevent.contains(&stagesync::cli::EXIT_USAGE.to_string().as_str()),
        "RestartPreventExitStatus {prevent:?}"
    );
    assert!(unit_seconds(value("RestartSec")) >= 1);
    assert_eq!(value("KillSignal"), "SIGTERM");
    assert!(
        unit_seconds(value("TimeoutStopSec")) >= 15,
        "stagesync stops within 10 s of SIGTERM"
    );

    // Not root.
    let dynamic = unit[service].get("DynamicUser").and_then(|v| v.last());
    let user = unit[service].get("User").and_then(|v| v.last());
    assert!(
        dynamic.is_some_and(|v| v == "yes") || user.is_some_and(|u| u != "root" && u != "0"),
        "DynamicUser=yes or User=<not root>"
    );

    // Hardening.
    for (key, expected) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(value(key), expected, "{key}");
    }
    // Every assignment of CapabilityBoundingSet is empty (a later one would add capabilities).
    assert!(unit[service]["CapabilityBoundingSet"]
        .iter()
        .all(String::is_empty));
    let families: BTreeSet<&str> = value("RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    assert_eq!(families, BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX"]));
    assert!(
        unit[service]["SystemCallFilter"]
            .first()
            .is_some_and(|f| f.split_whitespace().any(|g| g == "@system-service")),
        "SystemCallFilter=@system-service first: {:?}",
        unit[service]["SystemCallFilter"]
    );
    assert!(!value("MemoryMax").is_empty());
    assert_eq!(
        unit_value(&unit, "Install", "WantedBy"),
        "multi-user.target"
    );
}

/// The unit's exit-status rule holds for the real binary: a missing variable in the config (an
/// EnvironmentFile without it) is exit 2, which the unit does not restart.
#[test]
fn a_config_error_under_the_units_command_is_exit_2() {
    let unit = parse_unit(&read("deploy/systemd/stagesync.service"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stagesync.toml");
    std::fs::write(&config, read("examples/stagesync.toml")).unwrap();
    let port = free_port();
    let args: Vec<String> = unit_value(&unit, "Service", "ExecStart")
        .split_whitespace()
        .skip(1)
        .map(|a| match a {
            "/etc/stagesync/stagesync.toml" => config.to_string_lossy().to_string(),
            "127.0.0.1:9464" => format!("127.0.0.1:{port}"),
            other => other.to_string(),
        })
        .collect();
    let out = Process::new(env!("CARGO_BIN_EXE_stagesync"))
        .args(&args)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(stagesync::cli::EXIT_USAGE),
        "{stderr}"
    );
    assert!(
        CONFIG_VARIABLES.iter().any(|v| stderr.contains(v)),
        "names the missing variable: {stderr}"
    );
}

#[test]
fn the_environment_file_template_fits_the_example_config() {
    let env = parse_env_file(&read("deploy/systemd/stagesync.env.example"));
    assert_eq!(
        env.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(CONFIG_VARIABLES)
    );
    for (k, v) in &env {
        assert!(v.contains("REPLACE_ME"), "{k} is a marked placeholder: {v}");
    }
    let (config, asked) = parse_config(&read("examples/stagesync.toml"), &env);
    config.unwrap_or_else(|e| panic!("examples/stagesync.toml with the env template: {e}"));
    assert!(asked.iter().all(|v| env.contains_key(v)), "{asked:?}");
}

/// `systemd-analyze` where it is installed: `verify` (unknown keys, bad values, the command)
/// and the offline `security` score. The structural test above runs everywhere.
#[test]
fn systemd_analyze_accepts_the_unit_where_installed() {
    let Ok(version) = Process::new("systemd-analyze").arg("--version").output() else {
        eprintln!(
            "NOTE: systemd-analyze is not installed; the unit was checked structurally only \
             (the_systemd_unit_runs_the_product_restarts_on_failure_and_is_hardened)"
        );
        return;
    };
    let version: u32 = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // The unit names /usr/local/bin/stagesync, which verify requires to exist: point a copy
    // at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let unit_path = dir.path().join("stagesync.service");
    let text = read("deploy/systemd/stagesync.service")
        .replace("/usr/local/bin/stagesync", env!("CARGO_BIN_EXE_stagesync"));
    std::fs::write(&unit_path, text).unwrap();
    let verify = Process::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "systemd-analyze verify: {stderr}");
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("stagesync.service") || l.contains(env!("CARGO_BIN_EXE_stagesync")))
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze verify: {stderr}");

    if version < 250 {
        eprintln!("NOTE: systemd {version} has no `security --offline`; verify only");
        return;
    }
    let security = Process::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = stdout
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level: {stdout}{}",
                String::from_utf8_lossy(&security.stderr)
            )
        });
    assert!(
        exposure <= 2.0,
        "exposure {exposure} (0 = locked down, 10 = unsafe):\n{stdout}"
    );
}

// ---- Grafana ------------------------------------------------------------------------------

/// Every PromQL expression of the dashboard: panel targets (rows included) and variable
/// queries.
fn dashboard_expressions(dash: &serde_json::Value) -> Vec<String> {
    fn panels(list: &serde_json::Value, out: &mut Vec<String>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(
                    t["expr"]
                        .as_str()
                        .expect("each target has an expr")
                        .to_string(),
                );
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = &v["query"];
        if let Some(q) = q.as_str().or_else(|| q["query"].as_str()) {
            out.push(q.to_string());
        }
    }
    out
}

/// `stagesync_…` names in an expression, with the byte offset after each.
fn metric_names(expr: &str) -> Vec<(String, usize)> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(found) = expr[i..].find("stagesync_") {
        let start = i + found;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "stagesync_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.push((expr[start..end].to_string(), end));
        }
        i = end;
    }
    out
}

/// The label names inside `{…}` right after a metric name (empty without a selector).
fn selector_labels(expr: &str, after: usize) -> Vec<String> {
    let Some(rest) = expr[after..].strip_prefix('{') else {
        return Vec::new();
    };
    let body = &rest[..rest.find('}').expect("a closed selector")];
    let mut labels = Vec::new();
    let mut in_quotes = false;
    let mut current = String::new();
    for c in body.chars() {
        match c {
            '"' => in_quotes = !in_quotes,
            _ if in_quotes => {}
            '=' | '!' | '~' => {
                if !current.trim().is_empty() {
                    labels.push(current.trim().to_string());
                }
                current.clear();
            }
            ',' => current.clear(),
            c => current.push(c),
        }
    }
    labels
}

/// The labels of every `by (…)` clause.
fn by_labels(expr: &str) -> Vec<String> {
    expr.match_indices("by (")
        .flat_map(|(i, _)| {
            let rest = &expr[i + 4..];
            rest[..rest.find(')').unwrap()]
                .split(',')
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What `/metrics` exports, with one sample of every family: family → (type, sample name →
/// label names).
type Exported = BTreeMap<String, (String, BTreeMap<String, BTreeSet<String>>)>;

fn exported_metrics() -> Exported {
    let m = Metrics::new(Health::new(["orders"], Duration::from_secs(30)));
    m.read("orders", "insert");
    m.applied("orders", "insert");
    m.skipped("orders", "update", "stale");
    m.dead_lettered("orders", "insert", "key_collision");
    m.batch(10);
    m.lag("orders", 0.2);
    m.ddl_event("orders", "drop");
    m.conflict("orders");
    m.retry(Side::Production);
    m.checkpoint_saved("orders");
    m.lease("orders", "p1", true);
    let text = m.render();
    let mut families = Exported::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.insert(name.to_string(), (kind.to_string(), BTreeMap::new()));
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let series = line.rsplit_once(' ').unwrap().0;
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|base| families.get(*base).is_some_and(|(k, _)| k == "histogram"))
            })
            .unwrap_or(name);
        let label_names: BTreeSet<String> = labels
            .split(',')
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
            .collect();
        families
            .get_mut(family)
            .unwrap_or_else(|| panic!("{name} has a # TYPE line"))
            .1
            .entry(name.to_string())
            .or_default()
            .extend(label_names);
    }
    for (name, (_, samples)) in &families {
        assert!(
            !samples.is_empty(),
            "{name} has a sample after recording every kind"
        );
    }
    families
}

/// The family and sample name `name` refers to in PromQL (histogram components included).
fn lookup<'e>(exported: &'e Exported, name: &str) -> Option<(&'e str, &'e BTreeSet<String>)> {
    exported.iter().find_map(|(family, (kind, samples))| {
        samples.get(name).map(|labels| {
            // A histogram is queried by its components, never by its bare name.
            assert!(kind != "histogram" || name != family);
            (kind.as_str(), labels)
        })
    })
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/stagesync.json")).unwrap();
    let exported = exported_metrics();
    let expressions = dashboard_expressions(&dash);
    assert!(expressions.len() >= 10, "{expressions:?}");
    let mut queried = BTreeSet::new();
    for expr in &expressions {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "queries a stagesync metric: {expr}");
        let mut labels_in_expr: BTreeSet<String> =
            ["le", "instance", "job"].map(String::from).into();
        for (name, after) in &names {
            let (kind, labels) = lookup(&exported, name)
                .unwrap_or_else(|| panic!("{name} (in `{expr}`) is not exported by /metrics"));
            queried.insert(name.clone());
            // Label matchers name labels the metric has (or Prometheus' target labels).
            for l in selector_labels(expr, *after) {
                assert!(
                    labels.contains(&l) || l == "instance" || l == "job",
                    "{name} has no label {l:?}: {expr}"
                );
            }
            labels_in_expr.extend(labels.iter().cloned());
            // rate()/increase() only over counters and histogram components.
            let before = expr[..after - name.len()].trim_end();
            if before.ends_with("rate(") || before.ends_with("increase(") {
                assert!(
                    kind == "counter" || kind == "histogram",
                    "rate/increase over the {kind} {name}: {expr}"
                );
            } else {
                assert!(
                    kind == "gauge",
                    "the {kind} {name} is used without rate(): {expr}"
                );
            }
            if name.ends_with("_bucket") {
                assert!(expr.contains("histogram_quantile("), "{expr}");
            }
        }
        if expr.contains("histogram_quantile(") {
            assert!(
                by_labels(expr).contains(&"le".to_string()),
                "histogram_quantile keeps `le`: {expr}"
            );
        }
        for l in by_labels(expr) {
            assert!(
                labels_in_expr.contains(&l),
                "no metric of `{expr}` has label {l}"
            );
        }
    }
    // The panels the issue asks for.
    let all = expressions.join("\n");
    for needed in [
        "sum by (le, collection) (rate(stagesync_lag_seconds_bucket",
        "stagesync_changes_read_total",
        "stagesync_changes_applied_total",
        "stagesync_changes_skipped_total",
        "stagesync_changes_dead_lettered_total",
        "stagesync_checkpoint_age_seconds",
        "stagesync_lease_held",
    ] {
        assert!(all.contains(needed), "the dashboard queries {needed}");
    }
    assert!(queried.len() >= 10, "{queried:?}");
}

#[test]
fn the_dashboard_is_importable_with_a_prometheus_input() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/stagesync.json")).unwrap();
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
        && i["type"] == "datasource"
        && i["pluginId"] == "prometheus"));
    let mut ids = BTreeSet::new();
    let mut panels_checked = 0;
    let mut stack: Vec<&serde_json::Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        let id = p["id"].as_i64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} is unique");
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_i64(), "panel {id} gridPos.{k}");
        }
        stack.extend(p["panels"].as_array().into_iter().flatten());
        if p["type"] == "row" {
            continue;
        }
        panels_checked += 1;
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {id}");
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {id}");
        }
    }
    assert!(panels_checked >= 8);
    for v in dash["templating"]["list"].as_array().unwrap() {
        assert_eq!(
            v["datasource"]["uid"], "${DS_PROMETHEUS}",
            "variable {}",
            v["name"]
        );
    }
}

#[test]
fn the_metric_name_scanner_finds_names_and_their_labels() {
    let expr = r#"histogram_quantile(0.99, sum by (le, collection) (rate(stagesync_lag_seconds_bucket{instance=~"$i", collection!="a,b"}[5m]))) / x_stagesync_not"#;
    let names = metric_names(expr);
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(names[0].0, "stagesync_lag_seconds_bucket");
    assert_eq!(
        selector_labels(expr, names[0].1),
        ["instance", "collection"]
    );
    assert_eq!(by_labels(expr), ["le", "collection"]);
    let exported = exported_metrics();
    assert!(lookup(&exported, "stagesync_lag_seconds_bucket").is_some());
    assert!(lookup(&exported, "stagesync_lease_held").is_some());
}

// ---- examples/ ----------------------------------------------------------------------------

#[test]
fn the_example_config_loads_for_two_replica_sets() {
    let text = read("examples/stagesync.toml");
    let env: BTreeMap<String, String> = [
        (
            "PROD_URI",
            "mongodb://stagesync:secret@prod-db-1:27017,prod-db-2:27017,prod-db-3:27017/?replicaSet=prod&authSource=admin&tls=true&readPreference=secondaryPreferred",
        ),
        (
            "STAGING_URI",
            "mongodb://stagesync:secret@staging-db-1:27017,staging-db-2:27017,staging-db-3:27017/?replicaSet=staging&authSource=admin&tls=true",
        ),
        ("STAGESYNC_MASK_KEY", "0123456789abcdef0123456789abcdef"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    let (config, asked) = parse_config(&text, &env);
    let config = config.unwrap_or_else(|e| panic!("examples/stagesync.toml: {e}"));
    // Secrets come from the environment only.
    assert_eq!(asked, BTreeSet::from(CONFIG_VARIABLES.map(String::from)));
    assert_eq!(config.source.uri, env["PROD_URI"]);
    assert_eq!(config.target.uri, env["STAGING_URI"]);
    let masking = config.masking.as_ref().expect("[masking]");
    assert_eq!(masking.key, env["STAGESYNC_MASK_KEY"]);
    assert_ne!(config.source.database, config.target.database);
    assert_eq!(
        config.sync.write_concern,
        WriteConcernSetting::Tag("majority".into())
    );
    assert_eq!(config.collections.len(), 2);
    for c in &config.collections {
        assert!(!c.business_key.is_empty(), "{}", c.name);
        assert!(!c.preserve.is_empty(), "{}: preserve", c.name);
        assert_eq!(c.deletes, DeleteMode::Soft, "{}", c.name);
        assert!(!c.mask.is_empty(), "{}: masking", c.name);
    }
    assert!(
        config
            .collections
            .iter()
            .any(|c| c.business_key.iter().any(|k| c.mask.contains_key(k))),
        "a masked business key (masked keys still match)"
    );

    // The example's two URIs are two different replica sets.
    let sets: Vec<String> = [&config.source.uri, &config.target.uri]
        .iter()
        .map(|u| {
            mongodb::options::ConnectionString::parse(u)
                .unwrap()
                .replica_set
                .expect("replicaSet")
        })
        .collect();
    assert_ne!(sets[0], sets[1]);

    // Without the mask key it is refused, naming the variable.
    let mut without = env.clone();
    without.remove("STAGESYNC_MASK_KEY");
    let (refused, _) = parse_config(&text, &without);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("STAGESYNC_MASK_KEY")),
        "{refused:?}"
    );
}
