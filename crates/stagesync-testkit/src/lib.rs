//! Real server processes for stagesync's tests, benchmark and demo — never a mock.
//!
//! [`LocalServer`] is a MongoDB-compatible server, [`RedisServer`] a `redis-server`; both run on
//! free loopback ports with private storage and are killed when dropped (also when a test
//! panics). This crate is a dev-dependency of the product and a dependency of `xtask`; nothing
//! here is compiled into the `stagesync` binary users run.
//!
//! There is no `mongod` in the package registries this project can reach, so by default the
//! servers are SecantusDB (a separate GPL program, started as a process — never linked):
//! `secantusd-py` from the project's `.tools/venv`, or the native `secantusd-rs` from
//! `.tools/bin` when asked for speed. `STAGESYNC_TEST_MONGOD=/path/to/binary` picks another
//! binary taking the same flags (`--host --port --storage-path`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Where `.tools/` lives: `STAGESYNC_TOOLS_DIR`, else the root of the checkout this was built
/// from (`scripts/setup.sh` installs the servers there).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("STAGESYNC_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools"))
}

/// Which server binary to run. `native` prefers the faster `secantusd-rs` when it is installed.
pub fn server_binary(native: bool) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("STAGESYNC_TEST_MONGOD") {
        let p = PathBuf::from(p);
        if !p.exists() {
            bail!(
                "STAGESYNC_TEST_MONGOD points at {}, which does not exist",
                p.display()
            );
        }
        return Ok(p);
    }
    let py = tools_dir().join("venv/bin/secantusd-py");
    let rs = tools_dir().join("bin/secantusd-rs");
    let order = if native { [rs, py] } else { [py, rs] };
    order.into_iter().find(|p| p.exists()).ok_or_else(|| {
        anyhow::anyhow!(
            "no MongoDB-compatible test server found. Install one with `bash scripts/setup.sh` \
             (creates .tools/venv with SecantusDB), or set STAGESYNC_TEST_MONGOD=/path/to/server, \
             or point the suite at running servers with STAGESYNC_TEST_PROD_URI and STAGESYNC_TEST_STAGING_URI"
        )
    })
}

/// A free TCP port on loopback, chosen *below* the kernel's ephemeral range.
///
/// Ports the OS hands out for `bind(0)` and for outgoing connections come from the ephemeral
/// range; a server port taken from there can, once the server is stopped for an outage test, be
/// handed to another test's server or even to a client socket (a TCP self-connect) — and the
/// sync would talk to the wrong peer. Below the range only this picker hands ports out.
pub fn free_port() -> std::io::Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 12000 {
        let mut rng = rand::rng();
        for _ in 0..200 {
            let port = rand::Rng::random_range(&mut rng, 10000..low);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One server process on a private storage directory; killed when dropped.
pub struct LocalServer {
    binary: PathBuf,
    pub port: u16,
    storage: PathBuf,
    _storage_guard: Option<tempfile::TempDir>,
    extra_args: Vec<String>,
    child: Option<Child>,
    log_path: PathBuf,
}

impl LocalServer {
    /// Starts a server on a free port with fresh temporary storage and waits for it to answer.
    pub fn start(binary: &Path, extra_args: &[&str]) -> anyhow::Result<LocalServer> {
        let dir = tempfile::Builder::new()
            .prefix("stagesync-server-")
            .tempdir()?;
        let storage = dir.path().join("data");
        let log_path = dir.path().join("server.log");
        let mut server = LocalServer {
            binary: binary.to_path_buf(),
            port: free_port()?,
            storage,
            _storage_guard: Some(dir),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            log_path,
        };
        // Another process may take the free port before the server binds it: try other ports.
        let mut attempts = 0;
        loop {
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e)
                    if attempts < 3
                        && server
                            .child
                            .as_mut()
                            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))) =>
                {
                    tracing::debug!(error = %e, "server did not start; trying another port");
                    attempts += 1;
                    server.port = free_port()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `mongodb://127.0.0.1:PORT/?directConnection=true`
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(&self.binary)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--storage-path")
            .arg(&self.storage)
            .args(["--log-level", "WARNING"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Polls until the server accepts connections and answers a `ping`.
    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "server {} exited with {status} before answering; its log:\n{}",
                        self.binary.display(),
                        self.log_tail()
                    );
                }
            }
            if ping(self.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "server on port {} did not answer within {timeout:?}; its log:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills the process (an outage); storage is kept for [`LocalServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(30);
        // The port may take a moment to be free again after the kill.
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "restart not ready yet");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True when something on `port` answers an OP_MSG `ping` with `ok: 1`.
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let body = mongodb::bson::doc! { "ping": 1, "$db": "admin" };
    let mut doc_bytes = Vec::new();
    if body.to_writer(&mut doc_bytes).is_err() {
        return false;
    }
    // OP_MSG: header (length, requestID, responseTo, opCode 2013), flagBits, section kind 0.
    let len = 16 + 4 + 1 + doc_bytes.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend((len as i32).to_le_bytes());
    msg.extend(1i32.to_le_bytes());
    msg.extend(0i32.to_le_bytes());
    msg.extend(2013i32.to_le_bytes());
    msg.extend(0u32.to_le_bytes());
    msg.push(0);
    msg.extend(doc_bytes);
    if s.write_all(&msg).is_err() {
        return false;
    }
    let mut header = [0u8; 16];
    if s.read_exact(&mut header).is_err() {
        return false;
    }
    let total = i32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(21..=16 * 1024 * 1024).contains(&total) {
        return false;
    }
    let mut rest = vec![0u8; total - 16];
    if s.read_exact(&mut rest).is_err() {
        return false;
    }
    mongodb::bson::Document::from_reader(&mut &rest[5..])
        .map(|d| {
            d.get_f64("ok")
                .map(|ok| ok == 1.0)
                .unwrap_or_else(|_| d.get_i32("ok") == Ok(1))
        })
        .unwrap_or(false)
}

/// A `redis-server` process on a free port (Debian's `redis-server`), killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` without persistence and waits until it answers `PING`.
    pub fn start() -> anyhow::Result<RedisServer> {
        let mut server = RedisServer {
            port: free_port()?,
            child: None,
        };
        server.spawn()?;
        server.wait_ready()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server; install it with `bash scripts/setup.sh` (apt-get install redis-server)")?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .map(|n| buf[..n].starts_with(b"+PONG"))
                        .unwrap_or(false)
                {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("redis-server exited with {status} before answering PING");
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the process (an outage). Without persistence, a restarted server starts empty.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts redis-server again on the same port (like [`LocalServer::restart`]) and waits
    /// until it answers `PING`.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(30);
        // The port may take a moment to be free again after the kill.
        loop {
            self.spawn()?;
            match self.wait_ready() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "redis restart not ready yet");
                    self.stop();
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
