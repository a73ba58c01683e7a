//! Integration-test support: throwaway PostgreSQL clusters and NATS servers on
//! free loopback ports, plus small polling helpers.
//!
//! Every server lives in its own temp dir under `<temp_dir>/outbox-relay-tests-<uid>/`
//! and is stopped and removed on drop, so tests can run in parallel. Set
//! `OUTBOX_TEST_KEEP_DIRS=1` to keep the dirs (logs, data) for debugging.
//! Servers left behind by a test process that was killed (SIGKILL, timeout)
//! are stopped and their dirs removed by the next test process that starts a
//! server (see [`sweep_stale_dirs`]).
//!
//! Signals are sent with `kill -s SIG pid` (no libc/nix in the dependencies);
//! process liveness is read from `/proc` (Linux only, like the relay itself).
#![allow(dead_code)]

pub mod nats;
pub mod postgres;
pub mod tls;

use std::collections::HashSet;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, drop the
/// listener). Never hands out the same port twice within one test process, so
/// parallel tests in one binary cannot collide; across processes a collision is
/// unlikely, and the server `start()` functions retry with a new port when the
/// server reports "address already in use".
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..1000 {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .expect("bind 127.0.0.1:0 to find a free port");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        let mut set = handed_out.lock().unwrap_or_else(|e| e.into_inner());
        if set.insert(port) {
            return port;
        }
    }
    panic!("could not find a free TCP port on 127.0.0.1");
}

/// Polls `f` every 50ms until it returns true; panics mentioning `what` when
/// `deadline` passes (a single call of `f` is also cut off at the deadline).
/// Tests wait on conditions with this, never on fixed sleeps.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        let remaining = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(remaining, f()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!(
                "timed out after {deadline:?} waiting for {what} (last check did not finish)"
            ),
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Process/file helpers shared by postgres.rs and nats.rs (not part of the
// test-facing API, but harmless to use).

/// Real uid of this process (read from /proc/self/status; no libc needed).
pub fn current_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// True when this process runs as uid 0.
pub fn is_root() -> bool {
    current_uid() == Some(0)
}

/// `kill -s <sig> <pid>`; returns whether kill reported success.
pub fn send_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// True while `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Format: "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(
                stat[i + 1..].trim_start().chars().next(),
                Some('Z') | Some('X')
            ),
            None => true,
        },
        Err(_) => false,
    }
}

/// Direct children of `pid` (scans /proc/*/stat for the parent pid).
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(i) = stat.rfind(')') else { continue };
        // After ')': state, ppid, ...
        let ppid = stat[i + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Waits until `child` has exited (and reaps it). Returns false on timeout.
pub fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) => {}
            Err(_) => return !pid_alive(child.id()),
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until all `pids` are gone (or zombies). Returns false on timeout.
pub fn wait_pids_gone(pids: &[u32], timeout: Duration) -> bool {
    let start = Instant::now();
    while pids.iter().any(|p| pid_alive(*p)) {
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// True if 127.0.0.1:`port` can be bound right now (std sets SO_REUSEADDR, as
/// the servers do, so TIME_WAIT leftovers don't count).
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Waits until `port` can be bound again. Returns false on timeout.
pub fn wait_port_free(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while !port_is_free(port) {
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// True if something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Log text from byte `offset` to the end (lossy UTF-8); "" if unreadable.
pub fn read_from(path: &Path, offset: u64) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = (offset as usize).min(bytes.len());
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(_) => String::new(),
    }
}

/// The last `lines` lines of a log file, for panic messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = read_from(path, 0);
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    all[from..].join("\n")
}

/// File length, 0 if missing.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Whether temp dirs should be kept after the test (debugging aid).
pub fn keep_test_dirs() -> bool {
    std::env::var_os("OUTBOX_TEST_KEEP_DIRS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Base dir for all test temp dirs: `<temp_dir>/outbox-relay-tests-<uid>`,
/// mode 0755, so an unprivileged server user (postgres, when tests run as
/// root) can traverse into its own dir; per uid so that root and a normal user
/// on one machine do not trip over each other's base dir. Falls back to /tmp
/// when some ancestor of `temp_dir()` is not world-traversable (e.g. TMPDIR
/// under /root).
pub fn test_base_dir() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let name = format!("outbox-relay-tests-{}", current_uid().unwrap_or(0));
        let preferred = std::env::temp_dir().join(&name);
        let fallback = Path::new("/tmp").join(&name);
        for base in [preferred, fallback] {
            if std::fs::create_dir_all(&base).is_err() {
                continue;
            }
            // Best effort: another process may own it (then it is already 0755).
            let _ = std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755));
            if world_traversable(&base) {
                sweep_stale_dirs(&base);
                return base;
            }
        }
        panic!("no world-traversable temp base dir (tried $TMPDIR and /tmp)");
    })
    .clone()
}

fn world_traversable(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    dir.ancestors().all(|a| {
        std::fs::metadata(a)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

// ---------------------------------------------------------------------------
// Leftovers of killed test processes.

/// Name of the file in each server temp dir that records the owning test process.
pub const OWNER_FILE: &str = "owner.pid";
/// Name of the file in each server temp dir with the server PID (NATS; the
/// PostgreSQL postmaster has `data/postmaster.pid`).
pub const SERVER_PID_FILE: &str = "server.pid";

/// Records this test process as the owner of `dir` ("<pid> <starttime>").
pub fn mark_owner(dir: &Path) {
    let me = std::process::id();
    // Write + rename: a concurrent sweep must never see a half-written file.
    let tmp = dir.join(format!("{OWNER_FILE}.tmp"));
    if std::fs::write(&tmp, format!("{me} {}", proc_start_time(me).unwrap_or(0))).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(OWNER_FILE));
    }
}

/// Makes `dir` ownerless-but-kept: the sweep leaves it alone.
pub fn unmark_owner(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(OWNER_FILE));
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/pid/stat).
fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let i = stat.rfind(')')?;
    stat[i + 1..].split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process recorded in an owner file is still running (pid and
/// start time match, so a reused pid does not count).
fn owner_alive(token: &str) -> bool {
    let mut parts = token.split_whitespace();
    let (Some(pid), Some(start)) = (
        parts.next().and_then(|p| p.parse::<u32>().ok()),
        parts.next().and_then(|p| p.parse::<u64>().ok()),
    ) else {
        return false;
    };
    pid_alive(pid) && proc_start_time(pid) == Some(start)
}

/// True if `/proc/<pid>/cmdline` mentions `needle` (guards against signalling
/// an unrelated process that reused a pid).
fn cmdline_mentions(pid: u32, needle: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
    cmdline.contains(&needle.display().to_string())
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Stops servers whose owning test process is gone (killed before its Drop
/// ran) and removes their dirs. Runs once per test process, best effort;
/// dirs without an owner file (being created, or kept on purpose) are skipped.
pub fn sweep_stale_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(token) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        if owner_alive(&token) {
            continue;
        }
        let data = dir.join("data");
        if let Some(pid) = read_pid(&data.join("postmaster.pid"))
            .filter(|p| pid_alive(*p) && cmdline_mentions(*p, &data))
        {
            send_signal(pid, "QUIT");
            if !wait_pids_gone(&[pid], Duration::from_secs(5)) {
                let kids = child_pids(pid);
                send_signal(pid, "KILL");
                for k in &kids {
                    send_signal(*k, "KILL");
                }
                let _ = wait_pids_gone(&kids, Duration::from_secs(5));
            }
        }
        if let Some(pid) = read_pid(&dir.join(SERVER_PID_FILE))
            .filter(|p| pid_alive(*p) && cmdline_mentions(*p, &dir))
        {
            send_signal(pid, "KILL");
            let _ = wait_pids_gone(&[pid], Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
