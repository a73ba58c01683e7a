//! A standing randomized fault test (issue 14): one seeded schedule of faults (SIGKILL
//! of the relay, nats-server stopped and started, nats-server frozen with SIGSTOP past
//! the ack timeout, PostgreSQL stopped `-m immediate`, the relay's publish permission on
//! `outbox.payment.>` granted and denied again) under a producer whose transactions the
//! same seed draws, with a stream that refuses rows over 64 KiB. Checked row by row
//! against the table: every row once (refused ones only as dead letters), nothing
//! extra, commit order per subject, and out of stream order only on the denied subject.
//!
//! `CHAOS_SEED` (default 1), `CHAOS_ROWS` (default 25,000: the size CI runs),
//! `CHAOS_FAULTS` (default one per 2,500 rows, at least 6), `CHAOS_DUPLICATE_WINDOW`
//! (seconds, default 1: the stream's window, short so that exactly-once rests on the
//! relay's proof alone, not on NATS dedup). A failure prints its replay: `CHAOS_SEED=7 CHAOS_ROWS=25000 CHAOS_FAULTS=10 cargo test --test main --
//! chaos:: --nocapture`. The long form, several seeds over 200,000 rows each:
//! `bash scripts/chaos.sh`.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::exactly_once::{RELAY_CREDS as CREDS, relay_permissions};
use crate::faults::Producer;
use crate::harness::*;
use crate::support::nats::Nats;
use crate::support::postgres::{Postgres, StopMode};
use crate::support::{file_len, read_from, wait_for};

/// The relay's NATS user, denied `outbox.payment.>` while [`DENY`] is in force.
const DENY: &str = r#", deny: ["outbox.payment.>"]"#;
/// The harness config's `nats.ack_timeout`: a freeze lasts longer.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// The stream refuses messages over this (10054); the big rows are over it.
const MAX_MESSAGE_SIZE: i32 = 64 * 1024;
const BIG_PAYLOAD: usize = 100_000;
/// No new message for this long while some are missing: report instead of waiting.
const STALL: Duration = Duration::from_secs(120);

/// splitmix64: small, seedable, good enough to draw a schedule.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn per_mille(&mut self, p: u64) -> bool {
        self.next() % 1000 < p
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    RelayKill,
    NatsRestart,
    NatsFreeze,
    PgCrash,
    Permission,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::RelayKill,
        Kind::NatsRestart,
        Kind::NatsFreeze,
        Kind::PgCrash,
        Kind::Permission,
    ];
    fn name(self) -> &'static str {
        match self {
            Kind::RelayKill => "relay_sigkill",
            Kind::NatsRestart => "nats_restart",
            Kind::NatsFreeze => "nats_sigstop",
            Kind::PgCrash => "pg_immediate",
            Kind::Permission => "grant_or_deny",
        }
    }
    /// Weight in the draw of the faults beyond the first of each kind.
    fn weight(self) -> u64 {
        match self {
            Kind::RelayKill => 3,
            Kind::Permission => 1,
            _ => 2,
        }
    }
}

struct Fault {
    kind: Kind,
    /// Pause after the progress the fault waits for.
    gap: Duration,
    /// The relay's restart delay, the servers' down time, the freeze.
    hold: Duration,
    /// [`Kind::Permission`]: grant (else deny) `outbox.payment.>`.
    grant: bool,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hold = self.hold.as_secs_f64();
        match self.kind {
            Kind::RelayKill => write!(f, "relay SIGKILL, restart after {hold:.1} s"),
            Kind::NatsRestart => write!(f, "nats-server stop, start after {hold:.1} s"),
            Kind::NatsFreeze => write!(f, "nats-server SIGSTOP for {hold:.1} s"),
            Kind::PgCrash => write!(f, "postgres stop -m immediate, start after {hold:.1} s"),
            Kind::Permission if self.grant => write!(f, "grant outbox.payment.> (reload)"),
            Kind::Permission => write!(f, "deny outbox.payment.> (reload)"),
        }
    }
}

/// At most this many other faults in a row while the payment subject is denied (it is
/// at the start): every session replays from the first denied event, so the longer a
/// denial lasts under load, the less each session gets done, down to nothing.
const MAX_FAULTS_DENIED: usize = 3;

/// `n` faults: one of each kind, the rest drawn by weight, in a shuffled order; a
/// grant added wherever the denial would outlast [`MAX_FAULTS_DENIED`] faults.
fn schedule(rng: &mut Rng, n: usize) -> Vec<Fault> {
    let total: u64 = Kind::ALL.iter().map(|k| k.weight()).sum();
    let mut kinds: Vec<Kind> = (0..n)
        .map(|i| match Kind::ALL.get(i) {
            Some(k) => *k,
            None => {
                let mut pick = rng.next() % total;
                *Kind::ALL
                    .iter()
                    .find(|k| {
                        let hit = pick < k.weight();
                        pick = pick.saturating_sub(k.weight());
                        hit
                    })
                    .expect("weights cover the draw")
            }
        })
        .collect();
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.range(0, i as u64) as usize);
    }
    let mut fault = |kind: Kind, grant: bool| {
        let hold = match kind {
            // Half at once, half beyond a 1 s duplicate window (the long form's).
            Kind::RelayKill if rng.per_mille(500) => Duration::ZERO,
            Kind::RelayKill => rng.ms(1_200, 2_500),
            Kind::NatsRestart => rng.ms(200, 4_000),
            Kind::NatsFreeze => ACK_TIMEOUT + rng.ms(500, 3_000),
            Kind::PgCrash => rng.ms(200, 3_000),
            Kind::Permission => Duration::ZERO,
        };
        Fault {
            kind,
            gap: rng.ms(1_000, 4_000),
            hold,
            grant,
        }
    };
    let (mut denied, mut denied_for) = (true, 0);
    let mut plan = Vec::new();
    for kind in kinds {
        if kind == Kind::Permission {
            plan.push(fault(kind, denied));
            denied = !denied;
            denied_for = 0;
            continue;
        }
        if denied && denied_for == MAX_FAULTS_DENIED {
            plan.push(fault(Kind::Permission, true));
            denied = false;
        }
        denied_for += usize::from(denied);
        plan.push(fault(kind, false));
    }
    plan
}

/// The two subjects' aggregate types; the per-subject counter `n` is in each payload.
const TYPES: [&str; 2] = ["order", "payment"];

/// The producer's transactions: 1–20 rows, one in ten 100–500 rows; 15 % of the rows
/// are payments, 2 ‰ carry a 100 KB payload (refused by the stream's size limit).
fn transactions(mut rng: Rng, total: i64) -> impl FnMut(i64) -> (i64, String) + Send + 'static {
    let mut next_n = [0i64; 2];
    move |made| {
        let size = if rng.per_mille(100) {
            rng.range(100, 500)
        } else {
            rng.range(1, 20)
        };
        let size = (size as i64).min(total - made);
        let (mut types, mut ns, mut bigs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..size {
            let t = usize::from(rng.per_mille(150));
            next_n[t] += 1;
            types.push(TYPES[t]);
            ns.push(next_n[t].to_string());
            bigs.push(if rng.per_mille(2) { "t" } else { "f" });
        }
        let sql = format!(
            "INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, payload)
             SELECT 'chaos', t, n::text, CASE WHEN big
                 THEN jsonb_build_object('n', n, 'blob', repeat('x', {BIG_PAYLOAD}))
                 ELSE jsonb_build_object('n', n) END
             FROM unnest('{{{}}}'::text[], '{{{}}}'::bigint[], '{{{}}}'::bool[])
                  WITH ORDINALITY AS u(t, n, big, i)
             ORDER BY i",
            types.join(","),
            ns.join(","),
            bigs.join(",")
        );
        (size, sql)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.replace('_', "")
                .parse()
                .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
        })
        .unwrap_or(default)
}

/// Waits until the stream holds `n` messages, or none arrived for [`STALL`] (the
/// row-by-row check then says which are missing).
async fn wait_all(js: &jetstream::Context, n: u64) {
    let mut last = (0, Instant::now());
    loop {
        let count = stream_count(js, STREAM).await;
        if count >= n {
            return;
        }
        if count != last.0 {
            last = (count, Instant::now());
        } else if last.1.elapsed() > STALL {
            eprintln!("chaos: stalled at {count} of {n} messages for {STALL:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of one series, `name{labels}`, in the relay's metrics (-1 if unreachable).
async fn relay_series(port: u16, series: &str) -> f64 {
    let Some((_, body)) = http_get(port, "/metrics").await else {
        return -1.0;
    };
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(-1.0)
}

fn reloads(nats: &Nats) -> usize {
    std::fs::read_to_string(nats.log_path())
        .unwrap_or_default()
        .matches("Reloaded server configuration")
        .count()
}

/// Reloads nats-server with the payment subject denied or granted and waits until it
/// took effect.
async fn set_denial(nats: &mut Nats, deny: bool) {
    let before = reloads(nats);
    nats.reload_with(&relay_permissions(if deny { DENY } else { "" }));
    let nats = &*nats;
    wait_for(
        "nats-server to reload its config",
        DEADLINE,
        || async move { reloads(nats) > before },
    )
    .await;
}

/// What the relay logs for each publish the server denied.
const DENIAL_LOGGED: &str = "nats denied the relay: grant its nats user";

/// Grants the denied subject while no session of the relay has a denied event
/// outstanding. Inside such a session a grant could let event N+1 of the subject be
/// stored while event N, published just before, was denied; N would then arrive after
/// N+1 on replay (no loss, no duplicate, but out of order). A session with a denied
/// event ends on its PubAck timeout, [`ACK_TIMEOUT`] after it, so the grant takes effect
/// either in the backoff after a session end (the second one seen, whose retry delay is
/// at least 400 ms), or after a session streamed for longer than the ack timeout
/// without a denial. Returns whether it was confirmed clean: no session opened between
/// the end seen and the reload, or no denial logged up to just after the reload.
async fn grant_between_sessions(env: &mut Env, relay: &Relay) -> bool {
    let port = env.http_port;
    let reconnects = || relay_series(port, "outbox_relay_reconnects_total");
    let nats_up = || relay_series(port, r#"outbox_relay_connected{end="nats"}"#);
    let denials = |from: u64| read_from(&relay.log, from).matches(DENIAL_LOGGED).count();
    let began = Instant::now();
    let start = reconnects().await;
    // Since when the relay has streamed without a denial: (time, log offset, reconnects).
    let mut quiet = (Instant::now(), file_len(&relay.log), start);
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let seen = reconnects().await;
        if seen >= start + 2.0 {
            set_denial(&mut env.nats, false).await;
            return reconnects().await == seen && nats_up().await == 0.0;
        }
        let (since, offset, at) = quiet;
        if seen != at || nats_up().await != 1.0 || denials(offset) > 0 {
            quiet = (Instant::now(), file_len(&relay.log), seen);
        } else if since.elapsed() > ACK_TIMEOUT + Duration::from_secs(2) {
            set_denial(&mut env.nats, false).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            return denials(offset) == 0 && reconnects().await == seen;
        }
        assert!(
            began.elapsed() < DEADLINE,
            "no moment to grant in {DEADLINE:?}"
        );
    }
}

#[derive(Default)]
struct Tally {
    /// Faults done, by kind.
    faults: HashMap<Kind, usize>,
    grants: usize,
    unconfirmed_grants: usize,
    denies: usize,
    /// Replays the relay skipped on proof, summed over its processes.
    replays_skipped: f64,
}

/// What the row-by-row check found.
#[derive(Default)]
struct Check {
    rows: usize,
    messages: usize,
    dead_letters: usize,
    missing: usize,
    duplicates: usize,
    extra: usize,
    wrong: usize,
    order_broken: usize,
    /// Messages below a position already stored (allowed on the denied subject only).
    late: HashMap<String, usize>,
    problems: Vec<String>,
}

impl Check {
    fn problem(&mut self, text: String) {
        if self.problems.len() < 30 {
            self.problems.push(text);
        }
    }
    fn ok(&self) -> bool {
        self.missing + self.duplicates + self.extra + self.wrong + self.order_broken == 0
            && self.late.keys().all(|s| s.starts_with("outbox.payment."))
    }
}

/// One row of the table, as the check sees it.
struct Row {
    subject: String,
    n: i64,
    big: bool,
    seen: usize,
    /// Index of its first message in the stream.
    first: usize,
}

/// Where the first copy of a duplicate is, and the first message stored after it at a
/// lower position (a dead letter, an event replayed after a denial): a read-back that
/// ends at the first message below its resume position, scanning from the end, stops
/// there and never sees the first copy.
fn stopper(msgs: &[Msg], first: usize) -> String {
    let m = &msgs[first];
    let pos = m.position();
    let text = format!("first copy at seq {} position {pos:?}", m.seq);
    match msgs[first..]
        .iter()
        .find(|l| l.headers.contains_key("Outbox-Commit-Lsn") && l.position() < pos)
    {
        Some(l) => format!(
            "{text}; first later message at a lower position: seq {} {} position {:?}",
            l.seq,
            l.subject,
            l.position()
        ),
        None => format!("{text}; no later message at a lower position"),
    }
}

/// Reads the table and the whole stream, and checks them against each other, row by
/// row (the table is the truth: a commit that failed ambiguously is either there and
/// delivered, or in neither).
async fn check(env: &Env) -> Check {
    let c = env.sql().await;
    let mut rows: HashMap<String, Row> = c
        .query(
            "SELECT id::text, aggregate_type, (payload->>'n')::bigint,
                    octet_length(payload::text) > $1
             FROM outbox_events",
            &[&MAX_MESSAGE_SIZE],
        )
        .await
        .expect("read the table")
        .iter()
        .map(|r| {
            let t: String = r.get(1);
            let row = Row {
                subject: format!("outbox.{t}.chaos"),
                n: r.get(2),
                big: r.get(3),
                seen: 0,
                first: 0,
            };
            (r.get(0), row)
        })
        .collect();
    let js = env.js().await;
    wait_all(&js, rows.len() as u64).await;
    // Anything extra (a duplicate) would arrive with the rest: let a marker row pass
    // through the whole pipeline after them.
    let marker = insert_tx(&c, 1, "marker").await.remove(0);
    wait_all(&js, rows.len() as u64 + 1).await;
    let msgs = read_all(&js, STREAM).await;
    let mut k = Check {
        rows: rows.len(),
        messages: msgs.len(),
        ..Default::default()
    };
    if msgs.last().map(|m| m.msg_id()) != Some(marker.as_str()) {
        k.wrong += 1;
        k.problem(format!("the marker {marker} is not the last message"));
    }
    let mut last_n: HashMap<String, i64> = HashMap::new();
    let mut last_pos: HashMap<String, (u64, u32)> = HashMap::new();
    let mut stream_max = (0u64, 0u32);
    for (i, m) in msgs.iter().enumerate() {
        let id = m.msg_id();
        let at = format!("seq {} ({}, id {id})", m.seq, m.subject);
        if id == marker {
            continue;
        }
        let Some(row) = rows.get_mut(id) else {
            k.extra += 1;
            k.problem(format!("{at}: not a row of the table"));
            continue;
        };
        row.seen += 1;
        if row.seen > 1 {
            k.duplicates += 1;
            let text = format!(
                "{at}: stored again (copy {}); {}",
                row.seen,
                stopper(&msgs, row.first)
            );
            k.problem(text);
            continue;
        }
        row.first = i;
        if row.big {
            k.dead_letters += 1;
            let dlq = format!("outbox.dlq.{}", row.subject);
            if m.subject != dlq
                || m.header("Outbox-Dlq-Error-Code") != Some("10054")
                || m.header("Outbox-Dlq-Original-Subject") != Some(row.subject.as_str())
            {
                k.wrong += 1;
                k.problem(format!(
                    "{at}: a refused row must be a dead letter on {dlq} with code 10054: {:?}",
                    m.headers
                ));
            }
            continue;
        }
        let n = serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .and_then(|v| v["n"].as_i64());
        if m.subject != row.subject || n != Some(row.n) {
            k.wrong += 1;
            k.problem(format!(
                "{at}: expected {} with n {}, got n {n:?}",
                row.subject, row.n
            ));
            continue;
        }
        let pos = m.position();
        let prev_n = last_n.insert(m.subject.clone(), row.n).unwrap_or(0);
        let prev_pos = last_pos.insert(m.subject.clone(), pos).unwrap_or((0, 0));
        if row.n <= prev_n || pos <= prev_pos {
            k.order_broken += 1;
            k.problem(format!(
                "{at}: commit order broken on the subject: n {} at {pos:?} after n {prev_n} at {prev_pos:?}",
                row.n
            ));
        }
        if pos < stream_max {
            *k.late.entry(m.subject.clone()).or_default() += 1;
            if !m.subject.starts_with("outbox.payment.") {
                k.problem(format!(
                    "{at}: position {pos:?} after {stream_max:?} in the stream, on a subject never denied"
                ));
            }
        } else {
            stream_max = pos;
        }
    }
    for (id, row) in &rows {
        if row.seen == 0 {
            k.missing += 1;
            k.problem(format!(
                "missing: id {id} ({}, n {}, big {})",
                row.subject, row.n, row.big
            ));
        }
    }
    k
}

/// Issue 14: one seeded schedule of every fault kind under load, checked row by row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_exactly_once() {
    let seed = env_u64("CHAOS_SEED", 1);
    let rows = env_u64("CHAOS_ROWS", 25_000) as i64;
    let drawn = env_u64("CHAOS_FAULTS", (rows as u64 / 2_500).max(6)) as usize;
    let window = env_u64("CHAOS_DUPLICATE_WINDOW", 1);
    let began = Instant::now();
    let plan = schedule(&mut Rng(seed), drawn);
    let faults = plan.len();
    // Paced so that the load lasts about as long as the schedule.
    let planned: Duration = plan.iter().map(|f| f.gap + f.hold).sum::<Duration>()
        + Duration::from_millis(1_500) * faults as u32;
    let rate = (rows as f64 / planned.as_secs_f64()).max(100.0) as u64;
    let replay = format!(
        "CHAOS_SEED={seed} CHAOS_ROWS={rows} CHAOS_FAULTS={drawn} CHAOS_DUPLICATE_WINDOW={window}"
    );
    eprintln!("chaos: {replay}: {rows} rows at {rate}/s, schedule:");
    for (i, f) in plan.iter().enumerate() {
        eprintln!(
            "chaos:   {:>3}. after progress + {:.1} s: {f}",
            i + 1,
            f.gap.as_secs_f64()
        );
    }

    let nats = Nats::start_with(&relay_permissions(DENY));
    let mut env = Env::start_with(Postgres::start(), nats).await;
    let js = env.js().await;
    // The size limit refuses the big rows; a 1 s duplicate window (the long form) leaves exactly-once
    // to the relay's proof, not to NATS dedup.
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["outbox.>".into()],
        max_message_size: MAX_MESSAGE_SIZE,
        duplicate_window: Duration::from_secs(window),
        ..Default::default()
    })
    .await
    .expect("create the stream");
    env.write_config(&format!("duplicate_window = \"{window}s\""));
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay_env(&CREDS);
    let producer = Producer::start_with(
        env.pg.url("app"),
        rows,
        rate,
        transactions(Rng(seed ^ 0x00c0_ffee_d00d_f00d), rows),
    );
    let mut tally = Tally::default();
    let mut denied = true;
    for (i, f) in plan.iter().enumerate() {
        // Progress since the last fault (the relay reconnected and publishes), unless
        // the load is over; while the payment subject is denied, a session that ended
        // on the denial is progress too (see MAX_FAULTS_DENIED).
        let before = stream_count(&js, STREAM).await;
        let sessions = relay_metric(env.http_port, "outbox_relay_reconnects_total").await;
        let (js2, producer, port) = (&js, &producer, env.http_port);
        wait_for(
            &format!("progress before fault {} ({replay})", i + 1),
            DEADLINE,
            || async move {
                producer.is_done()
                    || stream_count(js2, STREAM).await > before
                    || (denied
                        && relay_metric(port, "outbox_relay_reconnects_total").await > sessions)
            },
        )
        .await;
        tokio::time::sleep(f.gap).await;
        relay.assert_running(&format!("before fault {} ({replay})", i + 1));
        let what = match f.kind {
            Kind::RelayKill => {
                tally.replays_skipped +=
                    relay_metric(env.http_port, "outbox_relay_replays_skipped_total").await;
                relay.kill();
                tokio::time::sleep(f.hold).await;
                relay.restart();
                f.to_string()
            }
            Kind::NatsRestart => {
                env.nats.stop();
                tokio::time::sleep(f.hold).await;
                env.nats.start_again();
                f.to_string()
            }
            Kind::NatsFreeze => {
                let pid = env.nats.pid().expect("nats-server running");
                send_signal(pid, "-STOP");
                tokio::time::sleep(f.hold).await;
                send_signal(pid, "-CONT");
                f.to_string()
            }
            Kind::PgCrash => {
                env.pg.stop(StopMode::Immediate);
                tokio::time::sleep(f.hold).await;
                env.pg.start_again();
                f.to_string()
            }
            Kind::Permission if f.grant => {
                tally.grants += 1;
                if !grant_between_sessions(&mut env, &relay).await {
                    tally.unconfirmed_grants += 1;
                }
                denied = false;
                f.to_string()
            }
            Kind::Permission => {
                tally.denies += 1;
                set_denial(&mut env.nats, true).await;
                denied = true;
                f.to_string()
            }
        };
        *tally.faults.entry(f.kind).or_default() += 1;
        eprintln!(
            "chaos: {:>6.1} s  fault {}/{faults} done: {what}; {} rows committed, {} messages",
            began.elapsed().as_secs_f64(),
            i + 1,
            producer.committed(),
            stream_count(&js, STREAM).await
        );
    }
    producer.finish().await;
    let load_done = began.elapsed();
    if denied {
        tally.grants += 1;
        if !grant_between_sessions(&mut env, &relay).await {
            tally.unconfirmed_grants += 1;
        }
    }
    eprintln!(
        "chaos: {:>6.1} s  load done, payment granted; checking",
        began.elapsed().as_secs_f64()
    );
    let k = check(&env).await;
    relay.assert_running(&format!("at the end ({replay})"));
    tally.replays_skipped +=
        relay_metric(env.http_port, "outbox_relay_replays_skipped_total").await;
    let by_kind: Vec<String> = Kind::ALL
        .iter()
        .map(|kind| {
            format!(
                "{}={}",
                kind.name(),
                tally.faults.get(kind).copied().unwrap_or(0)
            )
        })
        .collect();
    let late: usize = k.late.values().sum();
    eprintln!(
        "chaos summary: seed={seed} rows={} faults={faults} ({}; grants={} unconfirmed={} denies={}) \
         load={:.0}s total={:.0}s messages={} dead_letters={} replays_skipped={} late_payment={late} \
         missing={} duplicates={} extra={} wrong={} order_broken={} result={}",
        k.rows,
        by_kind.join(" "),
        tally.grants,
        tally.unconfirmed_grants,
        tally.denies,
        load_done.as_secs_f64(),
        began.elapsed().as_secs_f64(),
        k.messages,
        k.dead_letters,
        tally.replays_skipped,
        k.missing,
        k.duplicates,
        k.extra,
        k.wrong,
        k.order_broken,
        if k.ok() { "ok" } else { "FAILED" }
    );
    for p in &k.problems {
        eprintln!("chaos problem: {p}");
    }
    assert!(
        k.ok(),
        "chaos failed ({replay}): {} missing, {} duplicates, {} extra, {} wrong, {} out of order; see the problems above",
        k.missing,
        k.duplicates,
        k.extra,
        k.wrong,
        k.order_broken
    );
}
