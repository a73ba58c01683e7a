//! A throwaway `nats-server` with JetStream for integration tests.
//!
//! ```ignore
//! let mut nats = Nats::start();                   // or Nats::start_with("max_payload: 65536")
//! let js = nats.jetstream().await;
//! nats.stop();                                    // SIGTERM (SIGKILL after 10s)
//! nats.start_again();                             // same port and store dir: streams survive
//! ```
//!
//! Binary: `$OUTBOX_TEST_NATS_SERVER`, else `<repo>/.tools/bin/nats-server`
//! (installed by scripts/setup.sh), else `nats-server` on PATH, else
//! `/usr/sbin/nats-server` (Debian's 2.9). [`Nats::start_with_bin`] picks a
//! binary explicitly, for compatibility tests.
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    SERVER_PID_FILE, file_len, free_port, keep_test_dirs, log_tail, mark_owner, pid_alive,
    port_accepts, read_from, send_signal, test_base_dir, unmark_owner, wait_child, wait_port_free,
};

const READY_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(10);
const KILL_DEADLINE: Duration = Duration::from_secs(10);
const PORT_FREE_DEADLINE: Duration = Duration::from_secs(10);

pub struct Nats {
    dir: Option<TempDir>,
    bin: PathBuf,
    conf: PathBuf,
    store_dir: PathBuf,
    log: PathBuf,
    port: u16,
    config_extra: String,
    /// Readiness waits for a JetStream answer; off for servers that need TLS or
    /// credentials the probe does not have ([`Nats::start_without_probe`]).
    probe_jetstream: bool,
    child: Option<Child>,
}

enum SpawnError {
    PortInUse(String),
    Other(String),
}

impl Nats {
    /// Starts `nats-server -c <conf>` with JetStream on a free port.
    pub fn start() -> Nats {
        Self::start_with("")
    }

    /// Like [`Nats::start`], with extra top-level config lines appended to the
    /// config file, e.g. `"max_payload: 65536"`.
    pub fn start_with(config_extra: &str) -> Nats {
        Self::start_with_bin(&Self::binary(), config_extra)
    }

    /// Starts a specific nats-server binary (e.g. `/usr/sbin/nats-server` for
    /// the Debian 2.9 compatibility tests).
    pub fn start_with_bin(bin: &Path, config_extra: &str) -> Nats {
        Self::start_full(bin, config_extra, true)
    }

    fn start_full(bin: &Path, config_extra: &str, probe_jetstream: bool) -> Nats {
        assert!(
            bin.is_file(),
            "nats-server binary {} not found (run `bash scripts/setup.sh` or set OUTBOX_TEST_NATS_SERVER)",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("nats-")
            .tempdir_in(test_base_dir())
            .unwrap_or_else(|e| panic!("create temp dir under {}: {e}", test_base_dir().display()));
        let root = dir.path().to_path_buf();
        mark_owner(&root);
        let mut nats = Nats {
            conf: root.join("nats.conf"),
            store_dir: root.join("js"),
            log: root.join("nats.log"),
            dir: Some(dir),
            bin: bin.to_path_buf(),
            port: 0,
            config_extra: config_extra.to_string(),
            probe_jetstream,
            child: None,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            nats.port = free_port();
            nats.write_config();
            match nats.spawn_and_wait() {
                Ok(()) => return nats,
                Err(SpawnError::PortInUse(_)) if attempt < 5 => continue,
                Err(SpawnError::PortInUse(msg)) | Err(SpawnError::Other(msg)) => panic!("{msg}"),
            }
        }
    }

    /// A server whose JetStream the readiness probe cannot reach: one that demands TLS
    /// or credentials (the test connects with its own options), or a cluster node
    /// whose JetStream waits for a quorum. Ready when its log says so and the port
    /// accepts.
    pub fn start_without_probe(config_extra: &str) -> Nats {
        Self::start_full(&Self::binary(), config_extra, false)
    }

    /// The binary [`Nats::start`] uses (see module docs for the order).
    pub fn binary() -> PathBuf {
        if let Some(p) = std::env::var_os("OUTBOX_TEST_NATS_SERVER").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server");
        if local.is_file() {
            return local;
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let candidate = dir.join("nats-server");
                if candidate.is_file() {
                    return candidate;
                }
            }
        }
        PathBuf::from("/usr/sbin/nats-server")
    }

    /// Version of the running binary without the "v", e.g. "2.15.1"
    /// (from `nats-server --version`, which prints "nats-server: v2.15.1").
    pub fn version(&self) -> String {
        binary_version(&self.bin)
    }

    /// `version()` as numbers, e.g. (2, 15, 1); missing parts are 0.
    pub fn version_tuple(&self) -> (u32, u32, u32) {
        let v = self.version();
        let mut parts = v
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().unwrap_or(0));
        (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:{port}`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    /// A JetStream context whose requests wait up to 20 s (the client's default is
    /// 5 s): a check on a loaded machine or an electing cluster must not fail on a
    /// slow answer. Pollers (`wait_for`) are cut off by their own deadline anyway.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let mut js = async_nats::jetstream::new(self.client().await);
        js.set_timeout(std::time::Duration::from_secs(20));
        js
    }

    /// SIGTERM, wait for exit (SIGKILL after 10s), wait until the port is free.
    /// No-op if not running.
    pub fn stop(&mut self) {
        if let Err(e) = self.shutdown("TERM", STOP_DEADLINE) {
            panic!("Nats::stop: {e}\nserver log tail:\n{}", self.log_tail(30));
        }
    }

    /// SIGKILL, wait for exit and a free port. No-op if not running.
    pub fn kill(&mut self) {
        if let Err(e) = self.shutdown("KILL", KILL_DEADLINE) {
            panic!("Nats::kill: {e}");
        }
    }

    /// Starts the stopped/killed server again on the same port with the same
    /// config and store dir (JetStream streams and messages survive).
    pub fn start_again(&mut self) {
        // A server that died on its own is not "running": reap it first.
        if let Some(child) = self.child.as_mut()
            && matches!(child.try_wait(), Ok(Some(_)))
        {
            self.child = None;
        }
        assert!(
            self.child.is_none(),
            "Nats::start_again: server is still running"
        );
        let start = Instant::now();
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(SpawnError::PortInUse(_)) if start.elapsed() < PORT_FREE_DEADLINE => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(SpawnError::PortInUse(msg)) | Err(SpawnError::Other(msg)) => panic!("{msg}"),
            }
        }
    }

    /// Whether the server we started is alive.
    pub fn is_running(&self) -> bool {
        self.child.as_ref().is_some_and(|c| pid_alive(c.id()))
    }

    /// Replace the extra config (e.g. its permissions) and make the running server
    /// reload it (SIGHUP), as an operator granting a permission would.
    pub fn reload_with(&mut self, config_extra: &str) {
        self.config_extra = config_extra.to_string();
        self.write_config();
        let pid = self.pid().expect("nats-server running");
        assert!(crate::support::send_signal(pid, "HUP"), "kill -HUP {pid}");
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    // -- internals ------------------------------------------------------------

    fn write_config(&self) {
        let quote = |p: &Path| {
            p.display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
        };
        let conf = format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{store}\"\n}}\n{extra}\n",
            port = self.port,
            store = quote(&self.store_dir),
            extra = self.config_extra,
        );
        std::fs::write(&self.conf, conf)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.conf.display()));
    }

    fn spawn_and_wait(&mut self) -> Result<(), SpawnError> {
        let log_offset = file_len(&self.log);
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| SpawnError::Other(format!("open {}: {e}", self.log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| SpawnError::Other(format!("dup log fd: {e}")))?;
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| SpawnError::Other(format!("spawn {}: {e}", self.bin.display())))?;
        if let Some(root) = self.conf.parent() {
            let _ = std::fs::write(root.join(SERVER_PID_FILE), child.id().to_string());
        }

        let start = Instant::now();
        let mut last_err = String::from("not started");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let new_log = read_from(&self.log, log_offset);
                let msg = format!(
                    "nats-server on port {} exited during startup ({status}); log:\n{}",
                    self.port,
                    tail_of(&new_log, 40)
                );
                return Err(if new_log.contains("address already in use") {
                    SpawnError::PortInUse(msg)
                } else {
                    SpawnError::Other(msg)
                });
            }
            // "Server is ready" in *our* log guards against talking to another
            // server that grabbed the port; then JetStream must answer.
            if read_from(&self.log, log_offset).contains("Server is ready")
                && port_accepts(self.port)
            {
                let probe = if self.probe_jetstream {
                    jetstream_account_info(&self.url())
                } else {
                    Ok(())
                };
                match probe {
                    Ok(()) => {
                        self.child = Some(child);
                        return Ok(());
                    }
                    Err(e) => last_err = e,
                }
            }
            if start.elapsed() > READY_DEADLINE {
                let _ = send_signal(child.id(), "KILL");
                let _ = wait_child(&mut child, KILL_DEADLINE);
                return Err(SpawnError::Other(format!(
                    "nats-server on port {} not ready after {READY_DEADLINE:?} (last JetStream check: {last_err}); log:\n{}",
                    self.port,
                    tail_of(&read_from(&self.log, log_offset), 40)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn shutdown(&mut self, sig: &str, deadline: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        send_signal(pid, sig);
        if !wait_child(&mut child, deadline) {
            send_signal(pid, "KILL");
            if !wait_child(&mut child, KILL_DEADLINE) {
                return Err(format!(
                    "nats-server {pid} still alive after SIG{sig} and SIGKILL"
                ));
            }
            if sig != "KILL" {
                return Err(format!(
                    "nats-server {pid} did not exit within {deadline:?} after SIG{sig}; sent SIGKILL"
                ));
            }
        }
        if !wait_port_free(self.port, PORT_FREE_DEADLINE) {
            return Err(format!(
                "port {} still in use after nats-server exited",
                self.port
            ));
        }
        Ok(())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), "KILL");
            let _ = wait_child(&mut child, KILL_DEADLINE);
        }
        if let Some(dir) = self.dir.take() {
            if keep_test_dirs() {
                unmark_owner(dir.path());
                eprintln!("keeping NATS test dir {}", dir.keep().display());
            } else {
                drop(dir);
            }
        }
    }
}

/// `<bin> --version` → "2.15.1" (or the raw output if it has no "v").
pub fn binary_version(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("run {} --version: {e}", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    text.rsplit_once('v')
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or(text)
}

fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A JetStream account-info request (`$JS.API.INFO`) through async-nats. Runs
/// on its own thread with its own runtime, because `start()` is synchronous and
/// may be called from inside a `#[tokio::test]` runtime (where block_on panics).
/// The raw JSON is checked instead of `Context::query_account()` so that old
/// servers (2.9 lacks fields that async-nats 0.51's `Account` requires) pass.
fn jetstream_account_info(url: &str) -> Result<(), String> {
    let url = url.to_string();
    let handle = std::thread::spawn(move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("build runtime: {e}"))?;
        rt.block_on(async move {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(url.as_str())
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let reply = tokio::time::timeout(
                Duration::from_secs(2),
                client.request("$JS.API.INFO", bytes::Bytes::new()),
            )
            .await
            .map_err(|_| "account info request timed out".to_string())?
            .map_err(|e| format!("account info request: {e}"))?;
            let v: serde_json::Value = serde_json::from_slice(&reply.payload)
                .map_err(|e| format!("account info reply not JSON: {e}"))?;
            if let Some(err) = v.get("error") {
                return Err(format!("account info error: {err}"));
            }
            Ok(())
        })
    });
    handle
        .join()
        .unwrap_or_else(|_| Err("account info thread panicked".into()))
}

/// A JetStream cluster of `n` nats-servers on loopback (cluster routes between all),
/// each with its own store dir; dropping it stops them all.
pub struct NatsCluster {
    /// The nodes still held, with their `server_name`.
    nodes: Vec<(String, Nats)>,
}

impl NatsCluster {
    /// Starts the nodes and waits until JetStream answers (a meta leader is elected).
    pub async fn start(n: usize) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let nodes: Vec<(String, Nats)> = cluster_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let node = Nats::start_without_probe(&format!(
                    "server_name: n{i}\ncluster {{\n  name: relaytest\n  listen: 127.0.0.1:{port}\n  routes: [{routes}]\n}}\n"
                ));
                (format!("n{i}"), node)
            })
            .collect();
        let cluster = NatsCluster { nodes };
        let url = cluster.url();
        super::wait_for(
            "the JetStream cluster to elect a meta leader",
            Duration::from_secs(60),
            || {
                let url = url.clone();
                async move { jetstream_ready(&url).await }
            },
        )
        .await;
        cluster
    }

    /// Every node's URL, comma-separated (the relay's `nats.url` for a cluster).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|(_, n)| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node named `server_name` (`n0`, `n1`, …), if still held.
    pub fn node_mut(&mut self, server_name: &str) -> Option<&mut Nats> {
        self.nodes
            .iter_mut()
            .find(|(name, _)| name == server_name)
            .map(|(_, n)| n)
    }

    /// Hands one node over (e.g. to an `Env`); the cluster keeps the others.
    pub fn take(&mut self, server_name: &str) -> Nats {
        let i = self
            .nodes
            .iter()
            .position(|(name, _)| name == server_name)
            .unwrap_or_else(|| panic!("no node {server_name}"));
        self.nodes.remove(i).1
    }
}

async fn jetstream_ready(urls: &str) -> bool {
    let servers: Vec<async_nats::ServerAddr> =
        urls.split(',').filter_map(|u| u.parse().ok()).collect();
    let Ok(Ok(client)) =
        tokio::time::timeout(Duration::from_secs(5), async_nats::connect(servers)).await
    else {
        return false;
    };
    let js = async_nats::jetstream::new(client);
    matches!(
        tokio::time::timeout(Duration::from_secs(5), js.query_account()).await,
        Ok(Ok(_))
    )
}
