//! Shared scaffolding for the relay's integration tests: a PostgreSQL + NATS pair with a
//! migrated `app` database, the relay binary run as a child process exactly as users run
//! it (config file, CLI, signals), and readers for what arrived in JetStream.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;

use crate::support::nats::Nats;
use crate::support::postgres::Postgres;
use crate::support::{free_port, wait_for};

pub const STREAM: &str = "OUTBOX";
pub const DEADLINE: Duration = Duration::from_secs(300);

/// PostgreSQL + NATS with the outbox migrated in database `app`.
pub struct Env {
    pub pg: Postgres,
    pub nats: Nats,
    pub dir: tempfile::TempDir,
    pub http_port: u16,
}

impl Env {
    pub async fn start() -> Env {
        Self::start_with(Postgres::start(), Nats::start()).await
    }

    pub async fn start_with(pg: Postgres, nats: Nats) -> Env {
        pg.create_database("app").await;
        let env = Env {
            pg,
            nats,
            dir: tempfile::tempdir().expect("tempdir"),
            http_port: free_port(),
        };
        env.write_config("");
        env
    }

    pub async fn start_migrated() -> Env {
        let env = Self::start().await;
        let out = env.cli(&["migrate"]);
        assert!(out.status.success(), "migrate failed: {}", out.text());
        env
    }

    /// A `blobs` outbox table whose payload is `bytea` (issue 16), `[outbox] table =
    /// "public.blobs"` plus `extra` TOML, migrated (publication and slot).
    pub async fn start_with_bytea_outbox(extra: &str) -> Env {
        let env = Self::start().await;
        env.sql()
            .await
            .batch_execute(
                "CREATE TABLE blobs (id uuid primary key default gen_random_uuid(),
                                     event_topic text not null, aggregate_type text,
                                     source_bc text, payload bytea not null, content_type text,
                                     created_at timestamptz not null default now())",
            )
            .await
            .unwrap();
        env.write_config(&format!("[outbox]\ntable = \"public.blobs\"\n{extra}"));
        let out = env.cli(&["migrate"]);
        assert!(out.status.success(), "{}", out.text());
        env
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("relay.toml")
    }

    /// The default test config plus `extra` TOML appended.
    pub fn write_config(&self, extra: &str) {
        let text = format!(
            r#"[postgres]
url = "{pg}"
status_interval = "100ms"

[nats]
url = "{nats}"
ack_timeout = "3s"

[http]
listen = "127.0.0.1:{http}"

[log]
level = "info,outbox_relay=debug"

[[streams]]
name = "{STREAM}"
subjects = ["outbox.>"]
{extra}
"#,
            pg = self.pg.url("app"),
            nats = self.nats.url(),
            http = self.http_port,
        );
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// `rules` as the rules file (`[routing] rules_file`) of the default config;
    /// `streams_extra` is appended to its `[[streams]]` table.
    pub fn write_rules_config(&self, rules: &str, streams_extra: &str) {
        let path = self.dir.path().join("rules.toml");
        std::fs::write(&path, rules).expect("write rules");
        self.write_config(&format!(
            "{streams_extra}[routing]\nrules_file = \"{}\"\n",
            path.display()
        ));
    }

    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// Run a CLI command to completion.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_env(args, &[])
    }

    /// [`Env::cli`] with extra environment variables (config overrides).
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = relay_command(&self.config_path())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("run outbox-relay");
        Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A CLI command in the background (to kill it halfway).
    pub fn spawn_cli(&self, args: &[&str]) -> std::process::Child {
        relay_command(&self.config_path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn outbox-relay")
    }

    pub fn spawn_relay(&self) -> Relay {
        Relay::spawn(&self.config_path(), self.dir.path())
    }

    /// `run` with extra environment variables (config overrides).
    pub fn spawn_relay_env(&self, env: &[(&str, &str)]) -> Relay {
        Relay::spawn_full(&self.config_path(), self.dir.path(), env, &[])
    }

    /// `run` with extra arguments, e.g. `--null-sink`.
    pub fn spawn_relay_args(&self, args: &[&str]) -> Relay {
        Relay::spawn_full(&self.config_path(), self.dir.path(), &[], args)
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        self.pg.client("app").await
    }

    pub async fn js(&self) -> jetstream::Context {
        self.nats.jetstream().await
    }

    pub async fn confirmed_flush(&self, slot: &str) -> Option<u64> {
        let c = self.sql().await;
        let row = c
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("slot query")?;
        row.get::<_, Option<i64>>(0).map(|v| v as u64)
    }
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// The relay binary: `$OUTBOX_TEST_RELAY_BIN`, else the one cargo built for this test.
/// (Worktrees sharing one target directory overwrite each other's
/// `target/debug/outbox-relay`; a copy named by the variable is immune to that.)
pub fn relay_bin() -> PathBuf {
    std::env::var_os("OUTBOX_TEST_RELAY_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay")),
            PathBuf::from,
        )
}

fn relay_command(config: &Path) -> Command {
    let mut cmd = Command::new(relay_bin());
    cmd.arg("--config").arg(config);
    // The relay reads OUTBOX_RELAY_* as config overrides: do not leak the test
    // environment's into it.
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOX_RELAY_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

/// The relay running as a child process (`run`), its stderr in a log file.
pub struct Relay {
    child: Option<Child>,
    pub log: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Relay {
    pub fn spawn(config: &Path, dir: &Path) -> Relay {
        Self::spawn_env(config, dir, &[])
    }

    pub fn spawn_env(config: &Path, dir: &Path, env: &[(&str, &str)]) -> Relay {
        Self::spawn_full(config, dir, env, &[])
    }

    /// `run` with extra environment and arguments.
    pub fn spawn_full(config: &Path, dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Relay {
        let mut r = Relay {
            child: None,
            log: dir.join("relay.log"),
            config: config.to_path_buf(),
            dir: dir.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        r.start();
        r
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("relay log");
        let mut cmd = relay_command(&self.config);
        cmd.arg("run")
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn outbox-relay run"));
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "relay still running");
        self.start();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("relay running")
    }

    /// SIGTERM and wait for the exit status (graceful drain).
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("relay running");
        crate::support::send_signal(child.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait relay") {
                return status;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!(
                    "relay did not exit within 30s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().expect("wait relay")?;
        self.child = None;
        Some(status)
    }

    /// Waits (up to [`DEADLINE`]) for the process to stop by itself, e.g. on a fatal
    /// error, and returns its exit status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "relay still running after {DEADLINE:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics with the relay's log if the process has exited.
    pub fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.exited() {
            panic!("relay exited ({status}) {when}:\n{}", self.log_text());
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- relay log ----\n{}", self.log_text());
        }
    }
}

/// One message read back from a stream.
#[derive(Debug, Clone)]
pub struct Msg {
    pub seq: u64,
    pub subject: String,
    /// The first value of each header.
    pub headers: HashMap<String, String>,
    /// How many values each header has (a forged header would show as a second one).
    pub header_counts: HashMap<String, usize>,
    pub payload: Vec<u8>,
    /// When JetStream stored it, ms since the Unix epoch.
    pub stored_at_ms: i64,
}

impl Msg {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|s| s.as_str())
    }
    pub fn msg_id(&self) -> &str {
        self.header("Nats-Msg-Id").unwrap_or("")
    }
    /// The event's position: (`Outbox-Commit-Lsn`, `Outbox-Tx-Index`).
    pub fn position(&self) -> (u64, u32) {
        let lsn = self.header("Outbox-Commit-Lsn").expect("Outbox-Commit-Lsn");
        let (hi, lo) = lsn.split_once('/').expect("an X/X lsn");
        let lsn =
            (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
        let index = self.header("Outbox-Tx-Index").expect("Outbox-Tx-Index");
        (lsn, index.parse().expect("a numeric tx index"))
    }
}

/// How many messages `stream` holds: 0 only when it does not exist. Transient errors
/// (a server restarting, a cluster electing a leader) are retried by [`stream_info`],
/// not read as an empty stream.
pub async fn stream_count(js: &jetstream::Context, stream: &str) -> u64 {
    stream_info(js, stream)
        .await
        .map_or(0, |i| i.state.messages)
}

/// Wait until `stream` holds at least `n` messages.
pub async fn wait_count(js: &jetstream::Context, stream: &str, n: u64) {
    let js = js.clone();
    wait_for(
        &format!("{n} messages in stream {stream}"),
        DEADLINE,
        || {
            let js = js.clone();
            async move { stream_count(&js, stream).await >= n }
        },
    )
    .await;
}

/// The stream's info once the server answers; `None` only when the stream does not
/// exist. Any other error (no leader yet, a request timeout on a loaded or electing
/// cluster) is retried until [`DEADLINE`]: a check must not read "no answer" as "empty".
pub async fn stream_info(js: &jetstream::Context, stream: &str) -> Option<jetstream::stream::Info> {
    use jetstream::context::GetStreamErrorKind;
    let start = Instant::now();
    loop {
        let err = match js.get_stream(stream).await {
            Ok(s) => return Some(s.cached_info().clone()),
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                return None;
            }
            Err(e) => e.to_string(),
        };
        assert!(
            start.elapsed() < DEADLINE,
            "stream {stream}: no answer within {DEADLINE:?}: {err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every message of `stream`, in stream order.
///
/// Reads with an ordered consumer and starts it again after the last sequence read
/// whenever creating it or reading from it fails: in a cluster that just lost its
/// stream leader the first attempts time out until a new leader is elected, and a
/// loaded machine can take longer than the client's request timeout to answer.
pub async fn read_all(js: &jetstream::Context, stream: &str) -> Vec<Msg> {
    let Some(info) = stream_info(js, stream).await else {
        return Vec::new();
    };
    let total = info.state.messages;
    let mut out: Vec<Msg> = Vec::with_capacity(total as usize);
    let deadline = Instant::now() + DEADLINE;
    let mut last_error = String::new();
    while (out.len() as u64) < total {
        assert!(
            Instant::now() < deadline,
            "reading stream {stream}: {} of {total} messages after {DEADLINE:?} (last error: {last_error})",
            out.len()
        );
        let next_seq = out.last().map_or(1, |m| m.seq + 1);
        if let Err(e) = read_from(js, stream, next_seq, total, &mut out).await {
            last_error = e;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    out
}

/// One attempt of [`read_all`]: appends messages from `start_seq` until `total` are
/// in `out`; an error says why the attempt stopped (the caller tries again).
async fn read_from(
    js: &jetstream::Context,
    stream: &str,
    start_seq: u64,
    total: u64,
    out: &mut Vec<Msg>,
) -> Result<(), String> {
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("get stream: {e}"))?;
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start_seq,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| format!("ordered consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("messages: {e}"))?;
    while (out.len() as u64) < total {
        let next = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| "no message within 30 s".to_string())?
            .ok_or("stream of messages closed")?
            .map_err(|e| format!("message: {e}"))?;
        let info = next.info().map_err(|e| format!("message info: {e}"))?;
        let (mut headers, mut header_counts) = (HashMap::new(), HashMap::new());
        for (k, v) in next.headers.iter().flat_map(|h| h.iter()) {
            let first = v.first().map(|v| v.to_string()).unwrap_or_default();
            headers.insert(k.to_string(), first);
            header_counts.insert(k.to_string(), v.len());
        }
        out.push(Msg {
            seq: info.stream_sequence,
            subject: next.subject.to_string(),
            headers,
            header_counts,
            payload: next.payload.to_vec(),
            stored_at_ms: (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
        });
    }
    Ok(())
}

/// Wait until `stream` (replicated) has a leader and every replica is current and
/// online: right after a node was killed or restarted, reads can time out until then.
pub async fn wait_stream_healthy(js: &jetstream::Context, stream: &str) {
    let js = js.clone();
    wait_for(
        &format!("stream {stream} to have a leader and current replicas"),
        DEADLINE,
        || {
            let js = js.clone();
            async move {
                let Ok(mut s) = js.get_stream(stream).await else {
                    return false;
                };
                let Ok(info) = s.info().await else {
                    return false;
                };
                info.cluster.as_ref().is_none_or(|c| {
                    c.leader.is_some() && c.replicas.iter().all(|r| r.current && !r.offline)
                })
            }
        },
    )
    .await;
}

/// Lose stored messages and get them back: deletes `lost` from `stream`, runs `replay
/// --fill` with `vars` (the relay's own settings, so it rebuilds the same messages),
/// checks that it sent exactly that many, and returns the messages it filled.
pub async fn delete_and_fill(
    env: &Env,
    js: &jetstream::Context,
    stream: &str,
    lost: &[&Msg],
    vars: &[(&str, &str)],
) -> Vec<Msg> {
    // Not `stream_count`: a missing stream is a failure here, not an empty one.
    let total = stream_info(js, stream)
        .await
        .expect("the stream exists")
        .state
        .messages;
    let s = js.get_stream(stream).await.expect("stream");
    for m in lost {
        s.delete_message(m.seq)
            .await
            .expect("delete a stored message");
    }
    let out = env.cli_env(&["replay", "--fill", "--wait", "60s"], vars);
    assert!(out.status.success(), "{}", out.text());
    let sent = format!(": {} sent", lost.len());
    assert!(out.stdout.contains(&sent), "{}", out.text());
    let filled: Vec<Msg> = wait_read(js, stream, total)
        .await
        .into_iter()
        .filter(|m| m.header("Outbox-Replay").is_some())
        .collect();
    assert_eq!(filled.len(), lost.len(), "one fill per lost message");
    filled
}

/// Wait until `stream` holds `n` messages and read them all.
pub async fn wait_read(js: &jetstream::Context, stream: &str, n: u64) -> Vec<Msg> {
    wait_count(js, stream, n).await;
    read_all(js, stream).await
}

pub fn subjects(msgs: &[Msg]) -> Vec<&str> {
    msgs.iter().map(|m| m.subject.as_str()).collect()
}

/// Insert `n` rows in one transaction; returns their ids in insert order.
pub async fn insert_tx(c: &tokio_postgres::Client, n: i64, topic: &str) -> Vec<String> {
    c.query(
        "INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, payload)
         SELECT $2, 'order', g::text, jsonb_build_object('n', g, 'topic', $2::text)
         FROM generate_series(1, $1::bigint) AS s(g) ORDER BY s.g
         RETURNING id::text",
        &[&n, &topic],
    )
    .await
    .expect("insert")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// PID of the walsender streaming slot `outbox_relay` (the relay's replication backend).
/// Every row id of the outbox table.
pub async fn table_ids(c: &tokio_postgres::Client) -> Vec<String> {
    c.query("SELECT id::text FROM outbox_events", &[])
        .await
        .expect("read the outbox table")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

pub async fn slot_holder_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
        &[],
    )
    .await
    .expect("slot outbox_relay is active")
    .get(0)
}

/// Waits until no walsender holds slot `slot`: a stopped or killed relay's backend
/// may take a moment to exit, and a slot still active cannot be dropped or copied.
pub async fn wait_slot_released(c: &tokio_postgres::Client, slot: &str) {
    wait_for(
        &format!("slot {slot} released by the stopped relay"),
        DEADLINE,
        || async move {
            c.query_one(
                "SELECT NOT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .is_ok_and(|r| r.get::<_, bool>(0))
        },
    )
    .await;
}

/// The single bigint of `sql` (a count, a position difference).
pub async fn query_i64(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Send `signal` (e.g. "-STOP", "-CONT") to process `pid`.
pub fn send_signal(pid: impl std::fmt::Display, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {signal} {pid}");
}

/// Wait until `GET path` answers `status` with a body containing `needle`.
pub async fn wait_http(port: u16, path: &str, status: u16, needle: &str) {
    wait_for(
        &format!("GET {path} -> {status} with {needle:?}"),
        DEADLINE,
        || async move {
            http_get(port, path)
                .await
                .is_some_and(|(s, b)| s == status && b.contains(needle))
        },
    )
    .await;
}

/// Fetch `GET path` from the relay's HTTP port; (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// Sum of every series of metric `name` in a Prometheus text body.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The relay's metric `name` (summed over labels), 0 when unreachable.
pub async fn relay_metric(port: u16, name: &str) -> f64 {
    http_get(port, "/metrics")
        .await
        .map_or(0.0, |(_, b)| metric(&b, name))
}
