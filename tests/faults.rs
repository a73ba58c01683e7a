//! Exactly once under faults: SIGKILL, restarts beyond the dedup window, NATS and
//! PostgreSQL outages, a killed replication backend, a huge transaction, poison events.
//!
//! Every scenario ends with [`verify_exactly_once`]: the stream holds each committed row
//! exactly once (count, distinct `Nats-Msg-Id`, id sets equal to the table) and in commit
//! order (the producer's sequence number `n` strictly increases along the stream).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::harness::*;
use crate::support::nats::Nats;
use crate::support::postgres::{Postgres, StopMode};
use crate::support::wait_for;

/// A producer inserting `total` rows in transactions of mixed sizes, one connection,
/// sequentially, with `n` = a global counter in the payload ([`Producer::start`]) or
/// in transactions of the caller's making ([`Producer::start_with`]). Survives a
/// PostgreSQL restart (reconnects; the table is the truth of what committed).
pub(crate) struct Producer {
    done: Arc<AtomicBool>,
    /// Rows whose commit was acknowledged (progress, for waiting on load).
    committed: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl Producer {
    /// `rate`: rows per second at most (0 = as fast as possible), so that faults
    /// injected over several seconds all land while load is still running.
    pub(crate) fn start(url: String, total: i64, seed: u64, rate: u64) -> Producer {
        let mut rng = seed;
        Self::start_with(url, total, rate, move |n| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Mostly small transactions, some large: 1..=20 or 100..=1000.
            let size = if (rng >> 40).is_multiple_of(10) {
                100 + (rng >> 20) as i64 % 900
            } else {
                1 + (rng >> 20) as i64 % 20
            };
            let size = size.min(total - n);
            let sql = format!(
                "INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, payload)
                 SELECT 'load', 'order', g::text, jsonb_build_object('n', g)
                 FROM generate_series({}::bigint, {}::bigint) AS s(g) ORDER BY s.g",
                n + 1,
                n + size
            );
            (size, sql)
        })
    }

    /// A producer of `total` rows whose transactions `next_tx` makes: given the rows
    /// made so far, the next transaction's row count and its one SQL statement (run
    /// in autocommit). A failed statement is not retried: an ambiguous commit may or
    /// may not be in the table, the table is the truth.
    pub(crate) fn start_with(
        url: String,
        total: i64,
        rate: u64,
        mut next_tx: impl FnMut(i64) -> (i64, String) + Send + 'static,
    ) -> Producer {
        let done = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicI64::new(0));
        let (d, c) = (done.clone(), committed.clone());
        let task = tokio::spawn(async move {
            let began = tokio::time::Instant::now();
            let mut n: i64 = 0;
            let mut client: Option<tokio_postgres::Client> = None;
            while n < total {
                if client.is_none() {
                    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                        Ok((cl, conn)) => {
                            tokio::spawn(conn);
                            client = Some(cl);
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
                let Some(cl) = client.as_ref() else { continue };
                let (size, sql) = next_tx(n);
                let res = cl.batch_execute(&sql).await;
                // Counted either way: an ambiguous commit may or may not be in the table.
                n += size;
                if rate > 0 {
                    tokio::time::sleep_until(
                        began + Duration::from_secs_f64(n as f64 / rate as f64),
                    )
                    .await;
                }
                match res {
                    Ok(()) => {
                        c.fetch_add(size, Ordering::Relaxed);
                    }
                    Err(_) => client = None,
                }
            }
            d.store(true, Ordering::Relaxed);
        });
        Producer {
            done,
            committed,
            task,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    pub(crate) fn committed(&self) -> i64 {
        self.committed.load(Ordering::Relaxed)
    }

    pub(crate) async fn finish(self) {
        self.task.await.expect("producer");
        assert!(self.done.load(Ordering::Relaxed));
    }
}

/// Waits until the stream holds every row of the table, then checks exactly-once and
/// commit order; returns the messages.
pub(crate) async fn verify_exactly_once(env: &Env) -> Vec<Msg> {
    let c = env.sql().await;
    let ids: HashSet<String> = c
        .query("SELECT id::text FROM outbox_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let js = env.js().await;
    wait_count(&js, STREAM, ids.len() as u64).await;
    // Anything extra (a duplicate) would arrive with the rest; let a marker row pass
    // through the whole pipeline after them, then count.
    let marker = insert_tx(&c, 1, "marker").await;
    wait_count(&js, STREAM, ids.len() as u64 + 1).await;
    let msgs = read_all(&js, STREAM).await;
    let got: Vec<&str> = msgs.iter().map(|m| m.msg_id()).collect();
    let distinct: HashSet<&str> = got.iter().copied().collect();
    assert_eq!(distinct.len(), got.len(), "duplicates in the stream");
    // A dead letter keeps its event's Nats-Msg-Id: without this, a fault misread as the
    // server refusing the message (dead-lettered) would pass the id checks below.
    let dead: Vec<&str> = msgs
        .iter()
        .filter(|m| m.subject.starts_with("outbox.dlq."))
        .map(|m| m.subject.as_str())
        .collect();
    assert!(
        dead.is_empty(),
        "events dead-lettered by a transient fault: {dead:?}"
    );
    assert_eq!(got.len(), ids.len() + 1, "count differs from the table");
    assert_eq!(got.last().copied(), Some(marker[0].as_str()));
    let got_set: HashSet<String> = got[..got.len() - 1].iter().map(|s| s.to_string()).collect();
    assert!(
        got_set == ids,
        "id sets differ: {} missing",
        ids.difference(&got_set).count()
    );
    // Commit order: positions strictly increase along the stream; and the producer's
    // counter, which follows its (sequential) commits, increases too.
    let mut last_pos = (0u64, 0u32);
    let mut last_n = 0i64;
    for m in &msgs {
        let pos = m.position();
        assert!(
            pos > last_pos,
            "position order broken at seq {}: {pos:?} after {last_pos:?}",
            m.seq
        );
        last_pos = pos;
        if m.header("Outbox-Event-Topic") == Some("load") {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let n = v["n"].as_i64().unwrap();
            assert!(
                n > last_n,
                "commit order broken at seq {}: n {n} after {last_n}",
                m.seq
            );
            last_n = n;
        }
    }
    msgs
}

fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

/// Returns how many replayed messages the restarted relays skipped by reconciliation
/// (summed over the processes, read just before each kill).
async fn sigkill_scenario(
    rows: i64,
    kills: usize,
    restart_delay: Duration,
    extra_config: &str,
) -> f64 {
    let env = Env::start_migrated().await;
    env.write_config(extra_config);
    let mut relay = env.spawn_relay();
    // Paced so the producer outlasts all the kills and restarts.
    let rate =
        rows as u64 * 1000 / (kills as u64 * (1500 + restart_delay.as_millis() as u64)).max(1);
    let producer = Producer::start(env.pg.url("app"), rows, 7, rate);
    let js = env.js().await;
    let mut seed = 42u64;
    let mut skipped = 0.0;
    for i in 0..kills {
        // Kill at a random moment, once something new was published since the last
        // restart (so the kill lands mid-stream), or the producer is done.
        let before = stream_count(&js, STREAM).await;
        let js2 = js.clone();
        let producer_ref = &producer;
        wait_for("progress before the next kill", DEADLINE, || {
            let js2 = js2.clone();
            async move { producer_ref.is_done() || stream_count(&js2, STREAM).await > before }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50 + lcg(&mut seed) % 400)).await;
        skipped += relay_metric(env.http_port, "outbox_relay_replays_skipped_total").await;
        relay.kill();
        if !restart_delay.is_zero() {
            tokio::time::sleep(restart_delay).await;
        }
        relay.restart();
        eprintln!(
            "kill {} done at {} messages",
            i + 1,
            stream_count(&js, STREAM).await
        );
    }
    producer.finish().await;
    verify_exactly_once(&env).await;
    relay.assert_running("after the kills");
    skipped + relay_metric(env.http_port, "outbox_relay_replays_skipped_total").await
}

/// 1. 100,000 rows in mixed transactions, the relay SIGKILLed 10 times at random moments
///    and restarted at once: every row exactly once, in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_ten_times_under_load_exactly_once() {
    sigkill_scenario(100_000, 10, Duration::ZERO, "").await;
}

/// 2. The same with the stream's duplicate window at 1 s and every restart delayed beyond
///    it: `Nats-Msg-Id` cannot help; the checkpoint and stream reconciliation must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restarts_beyond_duplicate_window_exactly_once() {
    // Replace the default stream declaration with one whose window is 1 s.
    let skipped = sigkill_scenario(
        100_000,
        10,
        Duration::from_millis(1500),
        "duplicate_window = \"1s\"",
    )
    .await;
    // Proof that replays happened beyond the window and reconciliation, not dedup,
    // kept them out.
    assert!(
        skipped > 0.0,
        "no replay was skipped: the test proved nothing"
    );
}

/// 3. nats-server stopped for 30 s under load and started again with the same store:
///    nothing lost or duplicated, and the relay process never restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_under_load() {
    let mut env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let pid = relay.pid();
    let producer = Producer::start(env.pg.url("app"), 30_000, 11, 0);
    let js = env.js().await;
    wait_count(&js, STREAM, 2_000).await;
    env.nats.stop();
    let during = producer.committed();
    tokio::time::sleep(Duration::from_secs(30)).await;
    relay.assert_running("during the outage");
    assert!(
        producer.committed() > during,
        "the producer kept committing during the outage"
    );
    env.nats.start_again();
    producer.finish().await;
    verify_exactly_once(&env).await;
    relay.assert_running("at the end");
    assert_eq!(relay.pid(), pid);
}

/// 3a. SIGTERM while nats-server is down: the relay is between sessions (a session
///     cannot open, so it waits out its backoff and tries again) and exits 0 rather
///     than retrying a connection forever; what was delivered stays delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_between_sessions_exits_0() {
    let mut env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let port = env.http_port;
    let c = env.sql().await;
    insert_tx(&c, 3, "before").await;
    wait_count(&env.js().await, STREAM, 3).await;
    env.nats.stop();
    // Two ended sessions: the streaming one, and one that could not open.
    wait_for("sessions ended by the outage", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_reconnects_total").await >= 2.0
    })
    .await;
    let status = relay.terminate();
    assert!(status.success(), "{status}: {}", relay.log_text());
    env.nats.start_again();
    assert_eq!(stream_count(&env.js().await, STREAM).await, 3);
}

/// 3b. nats-server restarted quickly, several times, under load: the outage is shorter
///     than the ack timeout, so a client that reconnected by itself would write its
///     queued publishes after the ones lost in the dead socket (a gap, then the replay
///     out of order). Nothing lost, nothing duplicated, stream order = commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_nats_restarts_keep_order_without_gaps() {
    let mut env = Env::start_migrated().await;
    // A backlog first, so the relay publishes flat out when each restart lands.
    Producer::start(env.pg.url("app"), 80_000, 17, 0)
        .finish()
        .await;
    let mut relay = env.spawn_relay();
    let js = env.js().await;
    for at in [5_000, 25_000, 45_000, 65_000] {
        wait_count(&js, STREAM, at).await;
        env.nats.stop();
        env.nats.start_again();
    }
    verify_exactly_once(&env).await;
    relay.assert_running("after the fault");
}

/// 3b'. The PubAck multiplexer times out each message at its own deadline (sent +
///      `ack_timeout`): never before it, and not at a later message's. One timer serves
///      every pending message and is re-armed when it fires for an earlier deadline;
///      a PubAck that does come for a later message is kept for it, in order. Checked
///      after the queue emptied, with the timer set for an earlier, acknowledged
///      message, and with waits cancelled before one is awaited to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_that_never_come_time_out_each_at_its_own_deadline() {
    use outbox_relay::sink::acks::{AckError, AckMux};
    let nats = Nats::start();
    let client = nats.client().await;
    // A plain subscriber takes these messages and never answers: no PubAck comes.
    let _silent = client.subscribe("silent.>").await.unwrap();
    nats.jetstream()
        .await
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ACKED".into(),
            subjects: vec!["acked.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let timeout = Duration::from_secs(2);
    let mut acks = AckMux::<u32>::new(client.clone(), timeout).await.unwrap();
    async fn send(acks: &mut AckMux<u32>, subject: &str, n: u32) {
        let payload = bytes::Bytes::from_static(b"x");
        let headers = async_nats::HeaderMap::new();
        acks.publish(subject.into(), headers, payload, n)
            .await
            .unwrap();
    }
    // The next outcome, which must be `n`'s; a timer that never fires fails here.
    async fn next(acks: &mut AckMux<u32>, timeout: Duration, n: u32) -> (Duration, bool) {
        let (got, sent_at, outcome) = tokio::time::timeout(3 * timeout, acks.next())
            .await
            .unwrap_or_else(|_| panic!("no outcome for message {n} within {:?}", 3 * timeout))
            .unwrap();
        assert_eq!(got, n);
        match outcome {
            Ok(()) => (sent_at.elapsed(), true),
            Err(AckError::TimedOut) => (sent_at.elapsed(), false),
            Err(e) => panic!("message {n}: {e}"),
        }
    }
    let timed_out_on_time = |n: u32, (waited, acked): (Duration, bool)| {
        assert!(!acked, "message {n} has no PubAck to come");
        assert!(
            waited >= timeout,
            "message {n} timed out after {waited:?}, before its deadline"
        );
        // The messages that time out here are sent `timeout / 2` apart or more: a
        // later deadline is not its own.
        assert!(
            waited < timeout + timeout / 2,
            "message {n} timed out only after {waited:?}"
        );
    };

    send(&mut acks, "silent.a", 1).await;
    tokio::time::sleep(timeout / 2).await;
    send(&mut acks, "silent.b", 2).await;
    send(&mut acks, "acked.c", 3).await;
    timed_out_on_time(1, next(&mut acks, timeout, 1).await);
    timed_out_on_time(2, next(&mut acks, timeout, 2).await);
    assert!(
        next(&mut acks, timeout, 3).await.1,
        "message 3's PubAck was kept for it"
    );
    assert!(acks.next().await.is_none(), "nothing is pending");

    // The queue emptied; the timer is left at message 2's deadline.
    send(&mut acks, "acked.d", 4).await;
    assert!(next(&mut acks, timeout, 4).await.1);
    tokio::time::sleep(timeout / 2).await;
    send(&mut acks, "silent.e", 5).await;
    timed_out_on_time(5, next(&mut acks, timeout, 5).await);

    // Waits cancelled before one is awaited to the end lose nothing and move nothing.
    send(&mut acks, "silent.f", 6).await;
    for _ in 0..5 {
        let cut = tokio::time::timeout(timeout / 10, acks.next()).await;
        assert!(cut.is_err(), "message 6 has no outcome yet");
    }
    timed_out_on_time(6, next(&mut acks, timeout, 6).await);
    assert!(acks.next().await.is_none());
    let tails: Vec<(&str, u64)> = acks.tails().iter().collect();
    assert_eq!(
        tails,
        [("ACKED", 2)],
        "the PubAcks named where they are stored"
    );
}

/// 3c. nats-server frozen (SIGSTOP) under load for longer than the ack timeout: the
///     connection stays open but no PubAck comes. The session ends on the timeouts and
///     retries; after SIGCONT every row arrives once, in order, with no process restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_timeouts_recover_without_loss() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let pid = relay.pid();
    let producer = Producer::start(env.pg.url("app"), 20_000, 19, 0);
    let js = env.js().await;
    wait_count(&js, STREAM, 2_000).await;
    let nats_pid = env.nats.pid().expect("nats-server running").to_string();
    let signal = |sig: &str| send_signal(&nats_pid, sig);
    signal("-STOP");
    let r = &relay;
    wait_for("a PubAck timeout", DEADLINE, || async move {
        r.log_text().contains("didn't receive ack in time")
    })
    .await;
    signal("-CONT");
    producer.finish().await;
    verify_exactly_once(&env).await;
    relay.assert_running("after the fault");
    assert_eq!(relay.pid(), pid);
}

/// 4. PostgreSQL stopped with `-m immediate` under load (its slot position goes back to
///    the last checkpoint) and started again: nothing lost, zero duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_under_load() {
    let mut env = Env::start_migrated().await;
    // A 1 s dedup window and a longer outage: replays of the rewound slot must be
    // kept out by the checkpoint and reconciliation, not by `Nats-Msg-Id`.
    env.write_config("duplicate_window = \"1s\"");
    let mut relay = env.spawn_relay();
    let producer = Producer::start(env.pg.url("app"), 30_000, 13, 0);
    let js = env.js().await;
    wait_count(&js, STREAM, 5_000).await;
    env.pg.stop(StopMode::Immediate);
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.pg.start_again();
    producer.finish().await;
    verify_exactly_once(&env).await;
    relay.assert_running("after the fault");
}

/// 5. The replication backend terminated from SQL: the relay reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_replication_backend_reconnects() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    let js = env.js().await;
    insert_tx(&c, 10, "before").await;
    wait_count(&js, STREAM, 10).await;
    let killed = query_i64(&c, "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = 'outbox_relay' AND active_pid IS NOT NULL").await;
    assert_eq!(killed, 1);
    insert_tx(&c, 10, "after").await;
    wait_count(&js, STREAM, 20).await;
    let port = env.http_port;
    wait_for("reconnect counted", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_reconnects_total").await >= 1.0
    })
    .await;
    relay.assert_running("at the end");
    verify_exactly_once(&env).await;
}

/// 6. One 1,000,000-row transaction is delivered whole with resident memory under 100 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_row_transaction_bounded_memory() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    let js = env.js().await;
    wait_for("relay streaming", DEADLINE, || async {
        relay_log_contains(&relay, "streaming")
    })
    .await;
    c.execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, payload)
         SELECT 'bulk', 'order', g::text, jsonb_build_object('n', g, 'pad', repeat('x', 150))
         FROM generate_series(1, 1000000) AS s(g) ORDER BY s.g",
        &[],
    )
    .await
    .unwrap();
    let pid = relay.pid();
    let mut peak_kb = 0u64;
    let js2 = js.clone();
    wait_for("1,000,000 messages", Duration::from_secs(900), || {
        let js2 = js2.clone();
        peak_kb = peak_kb.max(vm_hwm_kb(pid));
        async move { stream_count(&js2, STREAM).await >= 1_000_000 }
    })
    .await;
    peak_kb = peak_kb.max(vm_hwm_kb(pid));
    eprintln!(
        "relay VmHWM after a 1,000,000-row transaction: {} MB",
        peak_kb / 1024
    );
    assert!(
        peak_kb < 100 * 1024,
        "peak RSS {} MB >= 100 MB",
        peak_kb / 1024
    );
    assert_eq!(
        stream_info(&js, STREAM).await.map(|i| i.state.messages),
        Some(1_000_000)
    );
    // First and last message: the transaction's first and last row, in order.
    let s = js.get_stream(STREAM).await.unwrap();
    let first = s.get_raw_message(1).await.unwrap();
    let last = s.get_raw_message(1_000_000).await.unwrap();
    assert!(String::from_utf8_lossy(&first.payload).contains("\"n\": 1,"));
    assert!(String::from_utf8_lossy(&last.payload).contains("\"n\": 1000000,"));
    assert_eq!(
        last.headers.get("Outbox-Tx-Index").map(|v| v.as_str()),
        Some("999999")
    );
    assert!(relay.terminate().success());
}

/// Issue 14 (7): 2,000 rows, each with a 200 KB column the relay does not publish,
/// committed while nats-server is frozen: 500 wait in flight (`nats.max_in_flight`),
/// and the replication read-ahead fills behind them. The relay's peak RSS stays within
/// `nats.max_in_flight_bytes` (4 MiB here) + 16 WAL messages of read-ahead (16 x 200 KB)
/// + 24 MiB, the bound docs/guarantees.md states (16 MB measured). Before the fix each
/// in-flight message kept its whole row buffer alive (412 MB with all 2,000 in flight),
/// and the read-ahead was 256 messages (61 MB peak with the copy-out alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_rows_in_flight_stay_within_the_memory_bound() {
    let env = Env::start_migrated().await;
    let c = env.sql().await;
    c.batch_execute("ALTER TABLE outbox_events ADD COLUMN wide text")
        .await
        .unwrap();
    // Long enough that every row is published before the first PubAck times out, and
    // no checkpoint save (which waits for the frozen server) stops the session first.
    let relay = env.spawn_relay_env(&[
        ("OUTBOX_RELAY_NATS_ACK_TIMEOUT", "300s"),
        ("OUTBOX_RELAY_CHECKPOINT_INTERVAL", "300s"),
        ("OUTBOX_RELAY_NATS_MAX_IN_FLIGHT", "500"),
        ("OUTBOX_RELAY_NATS_MAX_IN_FLIGHT_BYTES", "4194304"),
    ]);
    let js = env.js().await;
    let first = insert_tx(&c, 1, "first").await;
    wait_count(&js, STREAM, 1).await;
    let nats_pid = env.nats.pid().expect("nats-server running").to_string();
    send_signal(&nats_pid, "-STOP");
    for tx in 0..20 {
        c.execute(
            "INSERT INTO outbox_events (event_topic, aggregate_type, payload, wide)
             SELECT 'wide', 'order', jsonb_build_object('n', $1::int * 100 + g),
                    repeat(md5(g::text), 6400)
             FROM generate_series(1, 100) AS s(g) ORDER BY g",
            &[&tx],
        )
        .await
        .unwrap();
    }
    let port = env.http_port;
    wait_for("500 wide rows in flight", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_in_flight").await >= 500.0
    })
    .await;
    send_signal(&nats_pid, "-CONT");
    let msgs = wait_read(&js, STREAM, 2_001).await;
    // The high-water mark covers the frozen phase and the catch-up after it.
    let peak_kb = vm_hwm_kb(relay.pid());
    assert_eq!(msgs.len(), 2_001);
    assert_eq!(msgs[0].msg_id(), first[0]);
    let n: Vec<i64> = msgs[1..]
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            v["n"].as_i64().unwrap()
        })
        .collect();
    assert!(n.windows(2).all(|w| w[0] < w[1]) && n.len() == 2_000);
    eprintln!(
        "relay VmHWM with 200 KB rows, 500 in flight: {} MB",
        peak_kb / 1024
    );
    let bound_kb = (4 + 24) * 1024 + 16 * 200;
    assert!(
        peak_kb < bound_kb,
        "peak RSS {} MB over max_in_flight_bytes + the stated overhead ({} MB)",
        peak_kb / 1024,
        bound_kb / 1024
    );
}

fn relay_log_contains(relay: &Relay, text: &str) -> bool {
    relay.log_text().contains(text)
}

fn vm_hwm_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// 7. Poison events in the middle of a batch (payload over max_payload, a subject no
///    stream captures) are dead-lettered with reasons; everything after them arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_dead_lettered_and_the_stream_moves_on() {
    let env = Env::start_with(Postgres::start(), Nats::start_with("max_payload: 65536")).await;
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let _relay = env.spawn_relay();
    let c = env.sql().await;
    c.batch_execute(
        r#"BEGIN;
           INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('ok1', 'order', '{"i": 1}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('big', 'order', jsonb_build_object('blob', repeat('x', 100000)));
           INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('ok2', 'order', '{"i": 2}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload, destination_topics) VALUES ('lost', 'order', '{"i": 3}', '["nostream.anywhere"]');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload, metadata) VALUES ('ok3', 'order', '{"i": 4}', '{"bad": "a\r\nb", "traceparent": "00-1-2-01"}');
           COMMIT;
           INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('ok4', 'order', '{"i": 5}');"#,
    )
    .await
    .unwrap();
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, 6).await;
    assert_eq!(
        subjects(&msgs),
        [
            "outbox.order.ok1",
            "outbox.dlq.outbox.order.big",
            "outbox.order.ok2",
            "outbox.dlq.nostream.anywhere",
            "outbox.order.ok3",
            "outbox.order.ok4"
        ]
    );
    let big = &msgs[1];
    assert!(
        big.header("Outbox-Dlq-Reason")
            .unwrap()
            .contains("max_payload"),
        "{big:?}"
    );
    assert_eq!(
        big.header("Outbox-Dlq-Original-Subject"),
        Some("outbox.order.big")
    );
    assert!(
        big.payload.is_empty(),
        "too large for the dead letter too: sent without payload"
    );
    assert!(big.header("Outbox-Event-Id").is_some());
    let lost = &msgs[3];
    assert!(
        lost.header("Outbox-Dlq-Reason")
            .unwrap()
            .contains("no stream captures subject nostream.anywhere")
    );
    assert_eq!(lost.payload, br#"{"i": 3}"#);
    assert_eq!(msgs[4].header("traceparent"), Some("00-1-2-01"));
    assert_eq!(msgs[4].header("bad"), None);
    let port = env.http_port;
    let (_, metrics) = http_get(port, "/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"outbox_relay_events_dead_lettered_total{kind="max_payload"} 1"#)
            && metrics.contains(r#"outbox_relay_events_dead_lettered_total{kind="no_stream"} 1"#),
        "{metrics}"
    );
}

/// A slot that vanished after the relay had delivered from it stops the relay with a
/// message saying events may be lost; it is never silently recreated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_slot_after_delivery_is_fatal() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 3, "x").await;
    wait_count(&env.js().await, STREAM, 3).await;
    assert!(relay.terminate().success());
    wait_slot_released(&c, "outbox_relay").await;
    c.execute("SELECT pg_drop_replication_slot('outbox_relay')", &[])
        .await
        .unwrap();
    let out = env.cli(&["run"]);
    assert!(!out.status.success());
    assert!(
        out.stderr
            .contains("replication slot outbox_relay is missing"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("may be lost"), "{}", out.stderr);
    assert!(
        env.confirmed_flush("outbox_relay").await.is_none(),
        "slot must not be recreated"
    );
}

/// A slot held by another process: the relay retries, then stops naming the holder's PID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_held_by_another_process_is_named() {
    let env = Env::start_migrated().await;
    let _first = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 1, "x").await;
    wait_count(&env.js().await, STREAM, 1).await;
    let holder = slot_holder_pid(&c).await;
    let text = std::fs::read_to_string(env.config_path())
        .unwrap()
        .replace(
            "status_interval = \"100ms\"",
            "status_interval = \"100ms\"\nslot_busy_timeout = \"2s\"",
        )
        .replace(&format!("127.0.0.1:{}", env.http_port), "");
    env.write_raw_config(&text);
    let out = env.cli(&["run"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains(&format!("is active for PID {holder}")),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("slot_busy_timeout"), "{}", out.stderr);
}

/// The publication dropped while streaming stops the relay with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_dropped_while_streaming_is_fatal() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 1, "x").await;
    wait_count(&env.js().await, STREAM, 1).await;
    c.batch_execute("DROP PUBLICATION outbox_relay")
        .await
        .unwrap();
    insert_tx(&c, 1, "y").await;
    relay.wait_exit().await;
    let log = relay.log_text();
    assert!(
        log.contains("publication") && log.contains("does not exist"),
        "{log}"
    );
    assert!(log.contains("outbox-relay migrate"), "{log}");
}

/// REPLICATION revoked from the relay's role: it stops with the GRANT to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_privilege_revoked_is_fatal() {
    let env = Env::start_migrated().await;
    let c = env.sql().await;
    c.batch_execute(
        "CREATE ROLE relay LOGIN REPLICATION;
         GRANT SELECT ON outbox_events TO relay;",
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(env.config_path())
        .unwrap()
        .replace("postgres://postgres@", "postgres://relay@");
    env.write_raw_config(&text);
    let mut relay = env.spawn_relay();
    insert_tx(&c, 1, "x").await;
    wait_count(&env.js().await, STREAM, 1).await;
    c.batch_execute(
        "ALTER ROLE relay NOREPLICATION;
         SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active_pid IS NOT NULL;",
    )
    .await
    .unwrap();
    relay.wait_exit().await;
    let log = relay.log_text();
    assert!(log.contains("REPLICATION"), "{log}");
}

/// A checkpoint ahead of the server's WAL (another database with the same name and
/// slot, or a restored backup) would skip events: fatal, saying why and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_ahead_of_the_server_is_fatal() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 1, "x").await;
    wait_count(&env.js().await, STREAM, 1).await;
    assert!(relay.terminate().success());
    let kv = env
        .js()
        .await
        .get_key_value("outbox_relay")
        .await
        .expect("checkpoint bucket");
    kv.put("position.app_outbox_relay", "FF/0".into())
        .await
        .unwrap();
    let out = env.cli(&["run"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("is ahead of this server's WAL")
            && out.stderr.contains("own postgres.slot"),
        "{}",
        out.stderr
    );
}

/// Large payloads: the in-flight window is bounded in bytes too (`nats.max_in_flight_bytes`),
/// so 400 rows of 300 KB in one transaction pass with a small resident set; the
/// count bound alone (4096 messages) would let all 120 MB be in flight at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_bounded_by_in_flight_bytes() {
    let env = Env::start_migrated().await;
    let relay = env.spawn_relay_env(&[("OUTBOX_RELAY_NATS_MAX_IN_FLIGHT_BYTES", "2097152")]);
    wait_for("relay streaming", DEADLINE, || async {
        relay_log_contains(&relay, "streaming")
    })
    .await;
    env.sql()
        .await
        .execute(
            "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             SELECT 'big', 'order', jsonb_build_object('n', g, 'pad', repeat('x', 300000))
             FROM generate_series(1, 400) AS s(g) ORDER BY s.g",
            &[],
        )
        .await
        .unwrap();
    wait_count(&env.js().await, STREAM, 400).await;
    let peak_kb = vm_hwm_kb(relay.pid());
    eprintln!(
        "relay VmHWM with 400 x 300 KB in one transaction: {} MB",
        peak_kb / 1024
    );
    assert!(
        peak_kb < 80 * 1024,
        "peak RSS {} MB >= 80 MB",
        peak_kb / 1024
    );
}
