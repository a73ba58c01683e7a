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
use std::os::unix::fs::DirBuilderExt;
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

// -- physical standbys -----------------------------------------------------------

/// How long a standby may take to catch up, sync a slot or finish a promotion.
const STANDBY_DEADLINE: Duration = Duration::from_secs(300);

impl Postgres {
    /// A hot standby of `primary` (which must be running): its own data dir and a new
    /// free port, streaming from a new physical slot `standby_<n>` on the primary with
    /// `hot_standby_feedback = on`. On PostgreSQL 17+ also `sync_replication_slots = on`
    /// (`primary_conninfo` names a database, as slot synchronisation needs), so a
    /// logical slot created with `failover = true` on the primary gets a synced copy:
    /// wait for it with [`Postgres::wait_synced_slot`].
    ///
    /// The base backup is taken with `pg_basebackup -X stream -R` when a client as new
    /// as the server is at hand ([`Postgres::tool`]), else (the npm builds of 16+ ship
    /// no `pg_basebackup`, and an older one refuses a newer server) with the low-level
    /// API: `pg_backup_start`, a copy of the data dir, `pg_backup_stop` and its
    /// `backup_label`, the WAL coming from the slot. Either way the settings the
    /// primary was started with are kept (sockets aside), so the standby also runs with
    /// `wal_level = logical`. The primary's `pg_hba.conf` must let `postgres` open
    /// replication connections over TCP from 127.0.0.1 (initdb's default does). Returns
    /// once the standby accepts read-only connections.
    pub async fn start_standby_of(primary: &Postgres) -> Postgres {
        Self::start_standby_with(primary, &[]).await
    }

    /// [`Postgres::start_standby_of`] with extra `-c name=value` settings that override
    /// the standby's, e.g. `&[("sync_replication_slots", "off")]`.
    pub async fn start_standby_with(primary: &Postgres, extra: &[(&str, &str)]) -> Postgres {
        static NEXT_SLOT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let version = primary.version_num().await;
        let slot = format!(
            "standby_{}",
            NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let c = primary.client("postgres").await;
        c.execute(
            "SELECT pg_create_physical_replication_slot($1, true)",
            &[&slot],
        )
        .await
        .unwrap_or_else(|e| panic!("create physical slot {slot} on the primary: {e}"));

        let run_as = primary.run_as;
        let dir = tempfile::Builder::new()
            .prefix("pg-standby-")
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

        let basebackup = primary.tool("pg_basebackup");
        let use_basebackup = tool_major(&basebackup).is_some_and(|m| m >= version / 10_000);
        eprintln!(
            "standby of the server on port {} (PostgreSQL {version}), slot {slot}: base backup by {}",
            primary.port,
            if use_basebackup {
                "pg_basebackup"
            } else {
                "the low-level API"
            }
        );
        if use_basebackup {
            let mut cmd = Command::new(&basebackup);
            cmd.arg("-D")
                .arg(&data)
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
                .args(["-U", "postgres", "-X", "stream", "-R", "-S", &slot])
                .args(["--checkpoint=fast", "--no-sync"])
                .current_dir(&root)
                .stdin(Stdio::null());
            if let Some((uid, gid)) = run_as {
                cmd.uid(uid).gid(gid);
            }
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", basebackup.display()));
            assert!(
                out.status.success(),
                "pg_basebackup failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let (start, stop) = if version >= 150_000 {
                (
                    "SELECT pg_backup_start('standby', true)::text",
                    "SELECT labelfile, spcmapfile FROM pg_backup_stop(false)",
                )
            } else {
                (
                    "SELECT pg_start_backup('standby', true, false)::text",
                    "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)",
                )
            };
            // Start and stop in the same session (a non-exclusive backup).
            c.query_one(start, &[])
                .await
                .unwrap_or_else(|e| panic!("{start}: {e}"));
            copy_data_dir(&primary.data, &data, true);
            let row = c
                .query_one(stop, &[])
                .await
                .unwrap_or_else(|e| panic!("{stop}: {e}"));
            let label: String = row.get(0);
            let spcmap: Option<String> = row.get(1);
            write_private(&data.join("backup_label"), label.as_bytes());
            if let Some(map) = spcmap.filter(|m| !m.is_empty()) {
                write_private(&data.join("tablespace_map"), map.as_bytes());
            }
            write_private(&data.join("standby.signal"), b"");
            if let Some((uid, gid)) = run_as {
                chown_tree(&data, uid, gid);
            }
        }

        let mut settings: Vec<(String, String)> = primary
            .settings
            .iter()
            .filter(|(k, _)| k != "unix_socket_directories")
            .cloned()
            .collect();
        let mut set = |k: &str, v: String| settings.push((k.to_string(), v));
        set("unix_socket_directories", root.display().to_string());
        set(
            "primary_conninfo",
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres application_name={slot}",
                primary.port
            ),
        );
        set("primary_slot_name", slot.clone());
        set("hot_standby", "on".into());
        set("hot_standby_feedback", "on".into());
        set("wal_receiver_status_interval", "1s".into());
        if version >= 170_000 {
            set("sync_replication_slots", "on".into());
        }
        for (k, v) in extra {
            set(k, v.to_string());
        }

        let mut pg = Postgres {
            dir: Some(dir),
            root,
            data,
            log,
            bin: primary.bin.clone(),
            port: 0,
            settings,
            run_as,
            child: None,
        };
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

    /// `pg_is_in_recovery()`: a standby not (yet) promoted.
    pub async fn in_recovery(&self) -> bool {
        self.client("postgres")
            .await
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .expect("pg_is_in_recovery()")
            .get(0)
    }

    /// `pg_current_wal_lsn()` of a primary, as a number.
    pub async fn current_wal_lsn(&self) -> u64 {
        let v: i64 = self
            .client("postgres")
            .await
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
            .await
            .expect("pg_current_wal_lsn()")
            .get(0);
        v as u64
    }

    /// Waits until this standby has replayed the primary's WAL up to `lsn`.
    pub async fn wait_replayed(&self, lsn: u64) {
        let c = self.client("postgres").await;
        let c = &c;
        super::wait_for(
            &format!("standby on port {} to replay up to {lsn:#x}", self.port),
            STANDBY_DEADLINE,
            || async move {
                c.query_one(
                    "SELECT coalesce((pg_last_wal_replay_lsn() - '0/0')::bigint, 0)",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) as u64 >= lsn)
            },
        )
        .await;
    }

    /// PostgreSQL 17+: the `confirmed_flush_lsn` of this standby's synced, persistent
    /// copy of logical slot `slot` (`None` while there is none).
    pub async fn synced_slot_confirmed(&self, slot: &str) -> Option<u64> {
        let row = self
            .client("postgres")
            .await
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots
                 WHERE slot_name = $1 AND synced AND NOT temporary",
                &[&slot],
            )
            .await
            .expect("synced slot query")?;
        row.get::<_, Option<i64>>(0).map(|v| v as u64)
    }

    /// PostgreSQL 17+: waits until this standby holds a synced, persistent copy of
    /// logical slot `slot` with `confirmed_flush_lsn >= lsn`. Each round logs a
    /// standby snapshot on `primary` (`pg_log_standby_snapshot()`): a synced slot is
    /// persisted only once the primary's slot has moved past what the standby
    /// reserved, which takes decoded running-transactions records.
    pub async fn wait_synced_slot(&self, primary: &Postgres, slot: &str, lsn: u64) {
        let standby = self.client("postgres").await;
        let primary = primary.client("postgres").await;
        let (standby, primary) = (&standby, &primary);
        let mut rounds = 0u32;
        super::wait_for(
            &format!(
                "standby on port {} to hold synced slot {slot} at or after {lsn:#x}",
                self.port
            ),
            STANDBY_DEADLINE,
            || {
                rounds += 1;
                let nudge = rounds % 10 == 1;
                async move {
                    if nudge {
                        let _ = primary
                            .batch_execute("SELECT pg_log_standby_snapshot()")
                            .await;
                    }
                    standby
                        .query_opt(
                            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots
                             WHERE slot_name = $1 AND synced AND NOT temporary",
                            &[&slot],
                        )
                        .await
                        .ok()
                        .flatten()
                        .and_then(|r| r.get::<_, Option<i64>>(0))
                        .is_some_and(|v| v as u64 >= lsn)
                }
            },
        )
        .await;
    }

    /// Promotes this standby (`pg_promote(true, 60)`) and waits until it is out of
    /// recovery and accepts writes.
    pub async fn promote(&self) {
        let c = self.client("postgres").await;
        let done: bool = c
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .unwrap_or_else(|e| panic!("pg_promote on port {}: {e}", self.port))
            .get(0);
        assert!(
            done,
            "pg_promote on port {} did not finish within 60 s; server log:\n{}",
            self.port,
            self.log_tail(30)
        );
        let c = &c;
        super::wait_for(
            &format!("server on port {} to leave recovery", self.port),
            STANDBY_DEADLINE,
            || async move {
                c.query_one("SELECT NOT pg_is_in_recovery()", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, bool>(0))
            },
        )
        .await;
    }

    /// On a promoted server: its timeline and where the timeline before it ended in its
    /// history (the fork point), from the timeline history file.
    pub async fn timeline_fork(&self) -> (u32, u64) {
        let c = self.client("postgres").await;
        let file: String = c
            .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
            .await
            .expect("pg_walfile_name")
            .get(0);
        let tli = u32::from_str_radix(&file[..8], 16).expect("timeline of a WAL file name");
        let history: String = c
            .query_one(
                &format!("SELECT pg_read_file('pg_wal/{tli:08X}.history')"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("timeline {tli} history: {e}"))
            .get(0);
        let fork = history
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                let parent: u32 = parts.next()?.parse().ok()?;
                let (hi, lo) = parts.next()?.split_once('/')?;
                let lsn =
                    (u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?;
                (parent == tli - 1).then_some(lsn)
            })
            .next()
            .unwrap_or_else(|| panic!("timeline {} not in history {history:?}", tli - 1));
        (tli, fork)
    }
}

/// Major version of a PostgreSQL client tool (`pg_basebackup (PostgreSQL) 15.20 ...`),
/// `None` when it does not run.
fn tool_major(tool: &Path) -> Option<i32> {
    let out = Command::new(tool).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split("(PostgreSQL)")
        .nth(1)?
        .split_whitespace()
        .next()?;
    version.split('.').next()?.parse().ok()
}

/// Copies a running server's data dir for a low-level base backup: what
/// `pg_basebackup` leaves out is left out (the WAL, slots, runtime state, the pid
/// file), files that vanish during the copy are skipped; dirs get mode 0700, files
/// keep theirs.
fn copy_data_dir(src: &Path, dst: &Path, top: bool) {
    const EMPTY_DIRS: &[&str] = &[
        "pg_wal",
        "pg_replslot",
        "pg_stat_tmp",
        "pg_dynshmem",
        "pg_notify",
        "pg_serial",
        "pg_snapshots",
        "pg_subtrans",
    ];
    const SKIP_FILES: &[&str] = &[
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "tablespace_map",
        "standby.signal",
        "recovery.signal",
        "current_logfiles",
        "backup_manifest",
    ];
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dst)
        .unwrap_or_else(|e| panic!("create {}: {e}", dst.display()));
    let entries = match std::fs::read_dir(src) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => panic!("read {}: {e}", src.display()),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let (from, to) = (entry.path(), dst.join(&name));
        if kind.is_dir() {
            if name.starts_with("pgsql_tmp") {
                continue;
            }
            if top && EMPTY_DIRS.contains(&name.as_str()) {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&to)
                    .unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
                if name == "pg_wal" {
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(to.join("archive_status"))
                        .expect("create pg_wal/archive_status");
                }
                continue;
            }
            copy_data_dir(&from, &to, false);
        } else if kind.is_file() {
            if (top && SKIP_FILES.contains(&name.as_str())) || name == "pg_internal.init" {
                continue;
            }
            match std::fs::copy(&from, &to) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("copy {} to {}: {e}", from.display(), to.display()),
            }
        }
    }
}

/// Writes `contents` to `path` with mode 0600.
fn write_private(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// `chown -R uid:gid path` (no symlinks are followed).
fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .flatten()
        {
            chown_tree(&entry.path(), uid, gid);
        }
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
