//! Benchmark helper for workload B (live): an open-loop driver of single-row
//! transactions plus the latency reader. Prints one JSON line.
//!
//! ```text
//! bench_live --pg postgres://postgres@127.0.0.1:5432/app --nats nats://127.0.0.1:4222 \
//!     --rate 5000 --seconds 30 --relay-pid 1234
//! ```
//!
//! - **Open loop**: a dispatcher thread releases insert number `i` at `t0 + i / rate`,
//!   whatever happened to earlier ones; `--connections` workers (one PostgreSQL
//!   connection each) take them in order, each an autocommit `INSERT` (one transaction
//!   per row). A worker that is still waiting for its commit does not slow the schedule;
//!   the release-to-start delay is reported as `driver_lag` (when it grows, the machine
//!   could not keep the rate).
//! - **Timestamp**: the payload carries `ts_us`, the database's `clock_timestamp()` in
//!   µs since the epoch, taken while the row is inserted (before the commit, so commit
//!   time counts in the latency). nats-server runs on the same machine, so both clocks
//!   are the same clock.
//! - **Latency**: after the run the messages are read back (ordered consumer, from the
//!   stream sequence the run started at); latency = JetStream stored time (message info
//!   `published`, the server's receive time) − `ts_us`.
//! - **Backlog**: every second, rows committed − messages stored (`undelivered`); at the
//!   end of the run also the slot lag in bytes and how long the rest took to arrive.
//! - **CPU**: `utime + stime` of the relay process over the run plus its drain, per event
//!   (and its threads' context switches per event);
//!   likewise the walsender serving the relay's slot and nats-server when their PIDs
//!   are known.
//! - **Exactly once**: every inserted `seq` must be stored once, with distinct
//!   `Nats-Msg-Id`s (`ok`).

#[path = "common/procfs.rs"]
mod procfs;
use procfs::{machine_ticks, proc_cpu, proc_ctx_switches, proc_mem};

use std::collections::HashSet;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::{Mutex, mpsc};

#[derive(Parser)]
#[command(about = "Open-loop single-row insert driver and insert-to-stored latency reader")]
struct Args {
    /// The database with the outbox table.
    #[arg(long)]
    pg: String,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long, default_value = "OUTBOX")]
    stream: String,
    /// The relay's slot (for the slot lag and its walsender).
    #[arg(long, default_value = "outbox_relay")]
    slot: String,
    /// Inserts (transactions) per second.
    #[arg(long)]
    rate: u64,
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// PostgreSQL connections inserting in parallel.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Padding in the payload; 150 gives a payload of about 200 bytes.
    #[arg(long, default_value_t = 150)]
    pad_bytes: usize,
    /// Relay PID: its CPU time and memory over the run.
    #[arg(long)]
    relay_pid: Option<u32>,
    #[arg(long)]
    nats_pid: Option<u32>,
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// How long to wait after the run for the rest of the messages.
    #[arg(long, default_value_t = 60)]
    drain_timeout: u64,
    #[arg(long, default_value = "live")]
    label: String,
}

const INSERT: &str = "INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, payload) \
     VALUES ('created', 'order', $1, jsonb_build_object('seq', $2::bigint, \
     'ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, 'pad', $3::text))";

struct Job {
    seq: u64,
    due: Instant,
}

#[derive(Clone, Copy)]
struct Done {
    lag_us: u64,
    commit_us: u64,
    ok: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let total = args.rate * args.seconds;
    if total == 0 {
        return Err("--rate and --seconds must be > 0".into());
    }

    let client = async_nats::connect(args.nats.as_str()).await?;
    let js = jetstream::new(client);
    let base = js
        .get_stream(&args.stream)
        .await?
        .info()
        .await?
        .state
        .clone();
    let stored_now = {
        let js = js.clone();
        let name = args.stream.clone();
        move || {
            let js = js.clone();
            let name = name.clone();
            async move {
                match js.get_stream(&name).await {
                    Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
                    Err(_) => 0,
                }
            }
        }
    };

    let admin = connect(&args.pg).await?;
    let walsender: Option<u32> = admin
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&args.slot],
        )
        .await?
        .and_then(|r| r.get::<_, Option<i32>>(0))
        .map(|p| p as u32);
    let mut workers_pg = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let c = connect(&args.pg).await?;
        let stmt = c.prepare(INSERT).await?;
        workers_pg.push((c, stmt));
    }
    let pad = "x".repeat(args.pad_bytes);

    let cpu0 = Snapshot::take(&args, walsender);
    let committed = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut workers = Vec::new();
    for (c, stmt) in workers_pg {
        let rx = rx.clone();
        let committed = committed.clone();
        let pad = pad.clone();
        workers.push(tokio::spawn(async move {
            let mut done: Vec<(u64, Done)> = Vec::new();
            loop {
                let job = { rx.lock().await.recv().await };
                let Some(job) = job else { break };
                let start = Instant::now();
                let seq = job.seq as i64;
                let res = c.execute(&stmt, &[&job.seq.to_string(), &seq, &pad]).await;
                let end = Instant::now();
                committed.fetch_add(1, Relaxed);
                done.push((
                    job.seq,
                    Done {
                        lag_us: start.saturating_duration_since(job.due).as_micros() as u64,
                        commit_us: end.duration_since(start).as_micros() as u64,
                        ok: res.is_ok(),
                    },
                ));
            }
            done
        }));
    }
    // Open-loop schedule on its own thread: std sleeps are finer than tokio's 1 ms timer.
    let rate = args.rate;
    let dispatcher = std::thread::spawn(move || {
        for seq in 0..total {
            let due = t0 + Duration::from_nanos(seq * 1_000_000_000 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send(Job { seq, due }).is_err() {
                break;
            }
        }
    });

    // Backlog samples while the schedule runs.
    let mut samples: Vec<(f64, u64, i64)> = Vec::new();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(t0) + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    while !dispatcher.is_finished() {
        tokio::select! {
            _ = tick.tick() => {
                let c = committed.load(Relaxed);
                let s = stored_now().await.saturating_sub(base.messages);
                samples.push((t0.elapsed().as_secs_f64(), c, c as i64 - s as i64));
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let _ = dispatcher.join();
    let mut results: Vec<(u64, Done)> = Vec::with_capacity(total as usize);
    for w in workers {
        results.extend(w.await?);
    }
    let run_s = t0.elapsed().as_secs_f64();
    let end_stored = stored_now().await.saturating_sub(base.messages);
    let undelivered_end = total as i64 - end_stored as i64;
    let slot_lag: Option<i64> = admin
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&args.slot],
        )
        .await?
        .and_then(|r| r.get(0));
    let drain_start = Instant::now();
    let drain_deadline = drain_start + Duration::from_secs(args.drain_timeout);
    let mut stored = end_stored;
    while stored < total && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        stored = stored_now().await.saturating_sub(base.messages);
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let cpu1 = Snapshot::take(&args, walsender);
    let window_s = t0.elapsed().as_secs_f64();

    // Read back exactly this run's messages.
    let mut latencies: Vec<i64> = Vec::with_capacity(total as usize);
    let mut seqs_seen: HashSet<u64> = HashSet::with_capacity(total as usize);
    let mut ids: HashSet<String> = HashSet::with_capacity(total as usize);
    let mut foreign = 0u64;
    if stored > 0 {
        let consumer = js
            .get_stream(&args.stream)
            .await?
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: base.last_sequence + 1,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let mut read = 0u64;
        while read < stored {
            let msg = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .map_err(|_| "no message for 30 s while reading back")?
                .ok_or("message stream ended")??;
            read += 1;
            let info = msg.info().map_err(|e| e.to_string())?;
            let stored_us = (info.published.unix_timestamp_nanos() / 1000) as i64;
            let v: serde_json::Value = serde_json::from_slice(&msg.payload)?;
            let (Some(seq), Some(ts)) = (
                v.get("seq").and_then(|x| x.as_u64()),
                v.get("ts_us").and_then(|x| x.as_i64()),
            ) else {
                foreign += 1;
                continue;
            };
            seqs_seen.insert(seq);
            if let Some(id) = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
                ids.insert(id.as_str().to_string());
            }
            latencies.push(stored_us - ts);
        }
    }
    latencies.sort_unstable();
    let lat_ms = |q: f64| pct(&latencies, q).map(|v| v as f64 / 1000.0);
    let mut commit: Vec<u64> = results.iter().map(|(_, d)| d.commit_us).collect();
    let mut lag: Vec<u64> = results.iter().map(|(_, d)| d.lag_us).collect();
    commit.sort_unstable();
    lag.sort_unstable();
    let failed = results.iter().filter(|(_, d)| !d.ok).count() as u64;
    let inserted = total - failed;
    let ok = failed == 0
        && stored == total
        && seqs_seen.len() as u64 == total
        && ids.len() as u64 == total
        && latencies.len() as u64 == total
        && foreign == 0;
    let max_undelivered = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let growth = slope(&samples);
    let events = stored.max(1);
    let per_event = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => {
            json!((b.saturating_sub(a)) as f64 / args.clk_tck as f64 * 1e6 / events as f64)
        }
        _ => serde_json::Value::Null,
    };
    println!(
        "{}",
        json!({
            "label": args.label,
            "ok": ok,
            "rate_target": args.rate,
            "seconds": args.seconds,
            "connections": args.connections,
            "events": total,
            "inserted": inserted,
            "insert_errors": failed,
            "stored": stored,
            "distinct_msg_ids": ids.len(),
            "rate_achieved": total as f64 / run_s,
            "run_s": run_s,
            "latency_ms": {
                "p50": lat_ms(0.50), "p90": lat_ms(0.90), "p99": lat_ms(0.99),
                "p999": lat_ms(0.999), "max": latencies.last().map(|v| *v as f64 / 1000.0),
                "min": latencies.first().map(|v| *v as f64 / 1000.0),
            },
            "commit_ms": {
                "p50": pct(&commit, 0.50).map(|v| v as f64 / 1000.0),
                "p99": pct(&commit, 0.99).map(|v| v as f64 / 1000.0),
            },
            "driver_lag_ms": {
                "p50": pct(&lag, 0.50).map(|v| v as f64 / 1000.0),
                "p99": pct(&lag, 0.99).map(|v| v as f64 / 1000.0),
                "max": lag.last().map(|v| *v as f64 / 1000.0),
            },
            "undelivered_end": undelivered_end,
            "undelivered_max": max_undelivered,
            "undelivered_growth_per_s": growth,
            "slot_lag_bytes_end": slot_lag,
            "drain_s": drain_s,
            "window_s": window_s,
            "cpu_us_per_event": per_event(cpu0.relay, cpu1.relay),
            "ctx_switches_per_event": match (cpu0.relay_ctx, cpu1.relay_ctx) {
                (Some(a), Some(b)) => json!(b.saturating_sub(a) as f64 / events as f64),
                _ => serde_json::Value::Null,
            },
            "walsender_us_per_event": per_event(cpu0.walsender, cpu1.walsender),
            "nats_us_per_event": per_event(cpu0.nats, cpu1.nats),
            "machine_busy_pct": match (cpu0.machine, cpu1.machine) {
                (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => json!(100.0 * (b1 - b0) as f64 / (t1 - t0) as f64),
                _ => serde_json::Value::Null,
            },
            "relay_vm_rss_kb": args.relay_pid.map(|p| proc_mem(p).0),
            "relay_vm_hwm_kb": args.relay_pid.map(|p| proc_mem(p).1),
            "backlog_samples": samples.iter().map(|s| json!([s.0, s.1, s.2])).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// Nearest-rank percentile of sorted values.
fn pct<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Least-squares slope of undelivered over time (events/s); ~0 when there is no growth.
fn slope(samples: &[(f64, u64, i64)]) -> Option<f64> {
    if samples.len() < 3 {
        return None;
    }
    let n = samples.len() as f64;
    let mx = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.2 as f64).sum::<f64>() / n;
    let sxy: f64 = samples.iter().map(|s| (s.0 - mx) * (s.2 as f64 - my)).sum();
    let sxx: f64 = samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

struct Snapshot {
    relay: Option<u64>,
    relay_ctx: Option<u64>,
    walsender: Option<u64>,
    nats: Option<u64>,
    machine: Option<(u64, u64)>,
}

impl Snapshot {
    fn take(args: &Args, walsender: Option<u32>) -> Snapshot {
        Snapshot {
            relay: args.relay_pid.and_then(proc_cpu),
            relay_ctx: args.relay_pid.and_then(proc_ctx_switches),
            walsender: walsender.and_then(proc_cpu),
            nats: args.nats_pid.and_then(proc_cpu),
            machine: machine_ticks(),
        }
    }
}
