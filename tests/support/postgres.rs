//! A throwaway PostgreSQL cluster for integration tests.
//!
//! ```ignore
//! let mut pg = Postgres::start();                 // initdb + postgres, wal_level=logical
//! let client = pg.client("postgres").await;
//! pg.stop(StopMode::Immediate);                   // crash-like stop (SIGQUIT)
//! pg.start_again();                               // same data dir and port, crash recovery
//! ```
//!
//! Binaries: `$OUTBOX_TEST_PG_BIN` (a bin dir), else the highest
//! `/usr/lib/postgresql/<ver>/bin` that has `initdb`.
//!
//! Running as root: PostgreSQL refuses to run as root, so `initdb` and
//! `postgres` are started as the `postgres` user. This is done with
//! `std::os::unix::process::CommandExt::{uid, gid}` (setuid/setgid right before
//! exec) rather than `runuser`: `runuser` forks and stays as the parent, ignores
//! SIGINT/SIGQUIT and turns SIGTERM into SIGTERM + SIGKILL-after-2s for its
//! child, so the PID we would hold would not be the postmaster's. With the
//! setuid exec, the child PID *is* the postmaster PID; stop/kill still signal
//! the PID read from `postmaster.pid` (falling back to the child PID).
//!
//! Stop modes (PostgreSQL signal semantics): SIGINT = fast shutdown (clean,
//! checkpoint), SIGQUIT = immediate shutdown (no checkpoint: crash recovery on
//! the next start; children are stopped by the postmaster). [`Postgres::kill`]
//! sends SIGKILL, which leaves the postmaster's children running and the
//! shared memory attached (a restart would then refuse to start), so it also
//! SIGKILLs the direct children and waits for them: use it to simulate a
//! hard crash of the whole server; prefer [`StopMode::Immediate`] for an
//! ordinary "server crashed" test.
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    child_pids, file_len, free_port, is_root, keep_test_dirs, log_tail, mark_owner, pid_alive,
    port_accepts, read_from, send_signal, test_base_dir, unmark_owner, wait_child, wait_pids_gone,
    wait_port_free,
};

/// How long a start (including crash recovery) may take before we give up.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Fast shutdown waits for walsenders to send all WAL; a stalled replication
/// client can hold it up to wal_sender_timeout (60s), so allow more than that.
const FAST_STOP_DEADLINE: Duration = Duration::from_secs(90);
const IMMEDIATE_STOP_DEADLINE: Duration = Duration::from_secs(20);
const KILL_DEADLINE: Duration = Duration::from_secs(10);
const PORT_FREE_DEADLINE: Duration = Duration::from_secs(10);

/// Settings every cluster starts with (before `start_with` extras, which win).
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("wal_level", "logical"),
    ("max_wal_senders", "20"),
    ("max_replication_slots", "20"),
    ("fsync", "off"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "off"),
    ("shared_buffers", "64MB"),
    ("wal_sender_timeout", "60s"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: fast shutdown (disconnects clients, checkpoints, clean stop).
    Fast,
    /// SIGQUIT: immediate shutdown (no checkpoint; next start runs crash recovery).
    Immediate,
}

pub struct Postgres {
    dir: Option<TempDir>,
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    port: u16,
    settings: Vec<(String, String)>,
    /// (uid, gid) of the `postgres` user when we run as root.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

enum SpawnError {
    PortInUse(String),
    Other(String),
}

impl Postgres {
    /// initdb + start with the default settings (wal_level=logical, ...).
    /// Panics with a descriptive message on failure.
    pub fn start() -> Postgres {
        Self::start_with(&[])
    }

    /// Like [`Postgres::start`], with extra `-c name=value` settings that
    /// override the defaults, e.g. `&[("wal_level", "replica")]`. They are kept
    /// for [`Postgres::start_again`].
    pub fn start_with(extra: &[(&str, &str)]) -> Postgres {
        Self::start_configured(extra, &[])
    }

    /// Like [`Postgres::start_with`], writing `files` (name, contents) into the data
    /// directory after initdb, owned by the server's user with mode 0600 (what
    /// PostgreSQL demands of a TLS key): e.g. `pg_hba.conf`, `server.crt`.
    pub fn start_configured(extra: &[(&str, &str)], files: &[(&str, &[u8])]) -> Postgres {
        let bin = pg_bin_dir();
        for tool in ["initdb", "postgres"] {
            assert!(
                bin.join(tool).is_file(),
                "{} not found (set OUTBOX_TEST_PG_BIN or run scripts/setup.sh)",
                bin.join(tool).display()
            );
        }
        let run_as = if is_root() {
            Some(postgres_user_ids())
        } else {
            None
        };

        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir_in(test_base_dir())
            .unwrap_or_else(|e| panic!("create temp dir under {}: {e}", test_base_dir().display()));
        let root = dir.path().to_path_buf();
        mark_owner(&root);
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", root.display()));
        }
        let data = root.join("data");
        let log = root.join("postgres.log");

        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .current_dir(&root)
            .stdin(Stdio::null());
        if let Some((uid, gid)) = run_as {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.join("initdb").display()));
        if !out.status.success() {
            panic!(
                "initdb failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        for (name, contents) in files {
            let path = data.join(name);
            std::fs::write(&path, contents)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
            }
        }

        let mut settings: Vec<(String, String)> = DEFAULT_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        settings.push(("unix_socket_directories".into(), root.display().to_string()));
        settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));

        let mut pg = Postgres {
            dir: Some(dir),
            root,
            data,
            log,
            bin,
            port: 0,
            settings,
            run_as,
            child: None,
        };
        // A port handed out by free_port() can be grabbed by another process
        // before postgres binds it: retry with a new port in that case.
        let mut attempt = 0;
        loop {
            attempt += 1;
            pg.port = free_port();
            match pg.spawn_and_wait() {
                Ok(()) => return pg,
                Err(SpawnError::PortInUse(_)) if attempt < 5 => continue,
                Err(SpawnError::PortInUse(msg)) | Err(SpawnError::Other(msg)) => panic!("{msg}"),
            }
        }
    }

    /// Starts the stopped/killed server again: same data dir, port and settings.
    /// Waits until it accepts connections (crash recovery included).
    pub fn start_again(&mut self) {
        // A server that died on its own is not "running": reap it first.
        if let Some(child) = self.child.as_mut()
            && matches!(child.try_wait(), Ok(Some(_)))
        {
            self.child = None;
        }
        assert!(
            self.child.is_none(),
            "Postgres::start_again: server is still running (pid {:?})",
            self.pid()
        );
        let start = Instant::now();
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // Someone briefly holds our port: keep trying on the same port.
                Err(SpawnError::PortInUse(_)) if start.elapsed() < PORT_FREE_DEADLINE => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(SpawnError::PortInUse(msg)) | Err(SpawnError::Other(msg)) => panic!("{msg}"),
            }
        }
    }

    /// Stops the postmaster with SIGINT (Fast) or SIGQUIT (Immediate), waits
    /// until it exited and the port is free. Escalates to SIGKILL (of the
    /// postmaster and its children) if it does not stop in time. No-op if not running.
    pub fn stop(&mut self, mode: StopMode) {
        if self.child.is_none() {
            return;
        }
        let (sig, deadline) = match mode {
            StopMode::Fast => ("INT", FAST_STOP_DEADLINE),
            StopMode::Immediate => ("QUIT", IMMEDIATE_STOP_DEADLINE),
        };
        if let Err(e) = self.shutdown(sig, deadline) {
            panic!(
                "Postgres::stop({mode:?}): {e}\nserver log tail:\n{}",
                self.log_tail(30)
            );
        }
    }

    /// SIGKILL of the postmaster *and* its direct children (see module docs:
    /// SIGKILL alone leaves the children running and a restart would fail).
    /// Waits until all are gone and the port is free. No-op if not running.
    pub fn kill(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Err(e) = self.kill_tree() {
            panic!("Postgres::kill: {e}");
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:{port}/{db}` (trust auth, no password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db)
    }

    /// A connected superuser client; its connection task is spawned on the current
    /// runtime. It uses the Unix socket, so a test may make TCP TLS-only in pg_hba.conf.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(&self.root)
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {db} via {}: {e}", self.root.display()));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    pub async fn create_database(&self, name: &str) {
        let client = self.client("postgres").await;
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Path of a PostgreSQL binary in the bin dir in use, e.g. `bin("pg_recvlogical")`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// A client tool (`psql`, `pg_recvlogical`) to use with this server: the bin dir's
    /// own, else a Debian one (server-only builds, like the npm package's, ship none;
    /// the clients speak to newer servers fine), else the one on PATH.
    pub fn tool(&self, name: &str) -> PathBuf {
        let own = self.bin(name);
        if own.is_file() {
            return own;
        }
        std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin").join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// `server_version_num`, e.g. 150020 or 180004.
    pub async fn version_num(&self) -> i32 {
        self.client("postgres")
            .await
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .expect("server_version_num")
            .get(0)
    }

    /// The server log (stdout+stderr of all starts, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The postmaster PID while running.
    pub fn pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?;
        Some(
            self.pidfile()
                .map(|p| p.pid)
                .filter(|p| pid_alive(*p))
                .unwrap_or(child.id()),
        )
    }

    /// Whether the postmaster we started is alive (false after stop/kill or
    /// when it died on its own).
    pub fn is_running(&self) -> bool {
        self.child.as_ref().is_some_and(|c| pid_alive(c.id()))
    }

    // -- internals ------------------------------------------------------------

    fn pidfile(&self) -> Option<PidFile> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        Some(PidFile {
            pid: lines.first()?.trim().parse().ok()?,
            port: lines.get(3).and_then(|p| p.trim().parse().ok()),
            status: lines
                .get(7)
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        })
    }

    /// Spawns the postmaster on `self.port` and waits until it is ready. On
    /// failure the child is killed and the error carries the log tail.
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

        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string());
        for (k, v) in &self.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().map_err(|e| {
            SpawnError::Other(format!(
                "spawn {}: {e}",
                self.bin.join("postgres").display()
            ))
        })?;

        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let new_log = read_from(&self.log, log_offset);
                let msg = format!(
                    "postgres on port {} exited during startup ({status}); server log:\n{}",
                    self.port,
                    tail_of(&new_log, 40)
                );
                return Err(if new_log.contains("Address already in use") {
                    SpawnError::PortInUse(msg)
                } else {
                    SpawnError::Other(msg)
                });
            }
            // Ready = our postmaster wrote status "ready" to postmaster.pid and
            // the port accepts connections (checking the pid file first makes
            // sure we are not talking to another server that grabbed the port).
            if let Some(pf) = self.pidfile()
                && pf.pid == child.id()
                // "standby": a hot standby accepting read-only connections
                // ([`Postgres::start_standby_of`]); a primary never writes it.
                && (pf.status == "ready" || pf.status == "standby")
                && pf.port == Some(self.port)
                && port_accepts(self.port)
            {
                self.child = Some(child);
                return Ok(());
            }
            if start.elapsed() > READY_DEADLINE {
                let _ = send_signal(child.id(), "KILL");
                let kids = child_pids(child.id());
                for k in &kids {
                    let _ = send_signal(*k, "KILL");
                }
                let _ = wait_child(&mut child, KILL_DEADLINE);
                let _ = wait_pids_gone(&kids, KILL_DEADLINE);
                return Err(SpawnError::Other(format!(
                    "postgres on port {} not ready after {READY_DEADLINE:?}; server log:\n{}",
                    self.port,
                    tail_of(&read_from(&self.log, log_offset), 40)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Signals the postmaster and waits for it to exit and the port to be
    /// free; escalates to SIGKILL of the process tree on timeout.
    fn shutdown(&mut self, sig: &str, deadline: Duration) -> Result<(), String> {
        let Some(child_pid) = self.child.as_ref().map(|c| c.id()) else {
            return Ok(());
        };
        let pid = self
            .pidfile()
            .map(|p| p.pid)
            .filter(|p| pid_alive(*p))
            .unwrap_or(child_pid);
        send_signal(pid, sig);
        if pid != child_pid {
            // Not expected (we exec postgres directly), but make sure our child goes too.
            send_signal(child_pid, sig);
        }
        let child = self.child.as_mut().expect("child");
        if !wait_child(child, deadline) {
            let msg = format!(
                "postmaster {pid} did not exit within {deadline:?} after SIG{sig}; sent SIGKILL"
            );
            self.kill_tree()?;
            return Err(msg);
        }
        self.child = None;
        if !wait_port_free(self.port, PORT_FREE_DEADLINE) {
            return Err(format!(
                "port {} still in use after the server exited",
                self.port
            ));
        }
        Ok(())
    }

    /// SIGKILL the postmaster and its direct children, wait for all of them.
    fn kill_tree(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        // Collect the children first: once the postmaster is dead they are
        // re-parented and can no longer be found by parent pid.
        let mut kids = child_pids(pid);
        send_signal(pid, "KILL");
        // A child forked between the scan and the SIGKILL: scan again.
        kids.extend(child_pids(pid));
        for k in &kids {
            send_signal(*k, "KILL");
        }
        let exited = wait_child(&mut child, KILL_DEADLINE);
        let kids_gone = wait_pids_gone(&kids, KILL_DEADLINE);
        if !exited || !kids_gone {
            return Err(format!(
                "postgres processes still alive after SIGKILL (postmaster {pid}, children {kids:?})"
            ));
        }
        if !wait_port_free(self.port, PORT_FREE_DEADLINE) {
            return Err(format!("port {} still in use after SIGKILL", self.port));
        }
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Never panic or hang here: immediate shutdown with a bounded wait,
        // then SIGKILL; errors are ignored.
        if self.child.is_some() {
            let _ = self.shutdown("QUIT", Duration::from_secs(10));
            let _ = self.kill_tree();
        }
        if let Some(dir) = self.dir.take() {
            if keep_test_dirs() {
                unmark_owner(dir.path());
                eprintln!("keeping PostgreSQL test dir {}", dir.keep().display());
            } else {
                drop(dir); // removes it; errors ignored by TempDir
            }
        }
    }
}

struct PidFile {
    pid: u32,
    port: Option<u16>,
    status: String,
}

fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `$OUTBOX_TEST_PG_BIN`, else the highest `/usr/lib/postgresql/<ver>/bin` with initdb.
pub fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTBOX_TEST_PG_BIN").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in entries.flatten() {
            let bin = e.path().join("bin");
            if !bin.join("initdb").is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let ver: Vec<u32> = name.split('.').map(|p| p.parse().unwrap_or(0)).collect();
            if best.as_ref().is_none_or(|(bv, _)| ver > *bv) {
                best = Some((ver, bin));
            }
        }
    }
    best.map(|(_, b)| b).unwrap_or_else(|| {
        panic!("no PostgreSQL found: set OUTBOX_TEST_PG_BIN or install it (bash scripts/setup.sh)")
    })
}

/// uid and gid of the `postgres` system user (needed when running as root).
fn postgres_user_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap_or_else(|e| panic!("run `id {flag} postgres`: {e}"));
        assert!(
            out.status.success(),
            "running as root, but there is no `postgres` user to run the server as \
             (install the postgresql package: bash scripts/setup.sh)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}
