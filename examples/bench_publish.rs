//! Benchmark helper: the JetStream publish ceiling. Publishes `--count` messages shaped
//! like the relay's (same payload size, the same header names with values of the same
//! length, a unique `Nats-Msg-Id` each) the way the relay does: `send_publish`, PubAck
//! futures collected in a `FuturesUnordered`, at most `--max-in-flight` unacknowledged.
//! Prints one JSON line, with this process's and (given `--nats-pid`) nats-server's CPU
//! time per message.
//!
//! ```text
//! bench_publish --nats nats://127.0.0.1:4222 --count 200000 --payload-bytes 200
//! ```
//!
//! The stream (`--stream`, capturing `<--subject>`) is created fresh with the relay's
//! stream settings (file storage, one replica, 2 min duplicate window) and deleted after
//! the run unless `--keep`.

use std::error::Error;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use clap::Parser;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Raw JetStream publish ceiling (pipelined, every PubAck awaited)")]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long, default_value = "BENCH_CEILING")]
    stream: String,
    #[arg(long, default_value = "ceiling.order.created")]
    subject: String,
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Payload size in bytes (the relay's payload is the jsonb text of the row).
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Unacknowledged publishes at most (the relay's `nats.max_in_flight` default).
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// Rows per "transaction" for the synthetic Outbox-Tx-Index/Commit-Lsn headers.
    #[arg(long, default_value_t = 1000)]
    tx_rows: u64,
    /// Only `Nats-Msg-Id`, not the relay's full header set.
    #[arg(long)]
    minimal_headers: bool,
    /// No headers at all (no `Nats-Msg-Id`: nothing deduplicated): the floor of what a
    /// message costs the server, for the header-set study (bench/run workload H).
    #[arg(long, conflicts_with = "minimal_headers")]
    no_headers: bool,
    /// The relay's compact header set (`routing.headers = "compact"`): `Nats-Msg-Id`
    /// and the position headers.
    #[arg(long, conflicts_with_all = ["minimal_headers", "no_headers"])]
    compact_headers: bool,
    /// Keep the stream after the run.
    #[arg(long)]
    keep: bool,
    /// nats-server PID: its CPU per message over the run.
    #[arg(long)]
    nats_pid: Option<u32>,
    /// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    #[arg(long, default_value = "publish_ceiling")]
    label: String,
    /// Paced instead of as fast as possible: this many messages per second, each
    /// published on its tick, on a single-threaded runtime like the relay's. The floor
    /// of what a process that publishes one message at a time and waits for its PubAck
    /// spends per message at a live rate (bench/run workload B's reference).
    #[arg(long)]
    rate: Option<u64>,
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let rt = if args.rate.is_some() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let client = async_nats::ConnectOptions::new()
        .name("bench-publish")
        .connect(args.nats.as_str())
        .await?;
    // Same context settings as the relay's sink (src/sink/mod.rs).
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(args.max_in_flight * 2 + 16)
        .backpressure_on_inflight(true)
        .build(client);
    let _ = js.delete_stream(&args.stream).await;
    js.create_stream(stream::Config {
        name: args.stream.clone(),
        subjects: vec![args.subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: 1,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;

    let payload = Bytes::from(payload_of(args.payload_bytes));
    let subject = async_nats::Subject::from(args.subject.as_str());
    let mut acks = FuturesUnordered::new();
    let mut header_bytes = 0usize;
    let self_cpu0 = proc_cpu("self");
    let self_ctx0 = ctx_switches();
    let nats_cpu0 = args.nats_pid.and_then(|p| proc_cpu(&p.to_string()));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut ticks = args.rate.map(|r| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(1) as f64));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    while acked < args.count {
        if let Some(t) = ticks.as_mut()
            && sent < args.count
        {
            tokio::select! {
                _ = t.tick() => {}
                Some(r) = acks.next(), if !acks.is_empty() => {
                    let r: Result<_, _> = r;
                    r?;
                    acked += 1;
                    continue;
                }
            }
        }
        if sent < args.count && acks.len() < args.max_in_flight {
            // Collect what is already acknowledged without waiting, then publish.
            while let Some(Some(r)) = acks.next().now_or_never() {
                let r: Result<_, _> = r;
                r?;
                acked += 1;
            }
            let headers = headers_for(sent, args.tx_rows, args.header_set());
            if sent == 0 {
                header_bytes = header_len(&headers);
            }
            let fut = js
                .send_publish(
                    subject.clone(),
                    jetstream::message::PublishMessage::build()
                        .payload(payload.clone())
                        .headers(headers),
                )
                .await?;
            acks.push(fut.into_future());
            sent += 1;
        } else if let Some(r) = acks.next().await {
            r?;
            acked += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let per_msg = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => {
            json!((b - a) as f64 / args.clk_tck as f64 * 1e6 / args.count.max(1) as f64)
        }
        _ => serde_json::Value::Null,
    };
    let cpu_us = per_msg(self_cpu0, proc_cpu("self"));
    let ctx_per_msg = match (self_ctx0, ctx_switches()) {
        (Some(a), Some(b)) => json!((b - a) as f64 / args.count.max(1) as f64),
        _ => serde_json::Value::Null,
    };
    let nats_us = per_msg(
        nats_cpu0,
        args.nats_pid.and_then(|p| proc_cpu(&p.to_string())),
    );
    let stored = js
        .get_stream(&args.stream)
        .await?
        .info()
        .await?
        .state
        .messages;
    if !args.keep {
        js.delete_stream(&args.stream).await?;
    }
    println!(
        "{}",
        json!({
            "label": args.label,
            "events": args.count,
            "stored": stored,
            "ok": stored == args.count,
            "wall_s": secs,
            "rate_wall": args.count as f64 / secs,
            "payload_bytes": args.payload_bytes,
            "header_bytes": header_bytes,
            "max_in_flight": args.max_in_flight,
            "cpu_us_per_event": cpu_us,
            "ctx_switches_per_event": ctx_per_msg,
            "rate": args.rate,
            "nats_us_per_event": nats_us,
        })
    );
    if stored != args.count {
        return Err(format!("stream holds {stored} messages, expected {}", args.count).into());
    }
    Ok(())
}

/// A JSON object of exactly `n` bytes (at least 12).
fn payload_of(n: usize) -> Vec<u8> {
    let head = br#"{"pad": ""#;
    let tail = br#""}"#;
    let fill = n.saturating_sub(head.len() + tail.len());
    let mut v = Vec::with_capacity(n);
    v.extend_from_slice(head);
    v.extend(std::iter::repeat_n(b'x', fill));
    v.extend_from_slice(tail);
    v
}

/// Which headers each message carries.
#[derive(Clone, Copy, PartialEq)]
enum HeaderSet {
    None,
    MsgId,
    Compact,
    Full,
}

impl Args {
    fn header_set(&self) -> HeaderSet {
        if self.no_headers {
            HeaderSet::None
        } else if self.minimal_headers {
            HeaderSet::MsgId
        } else if self.compact_headers {
            HeaderSet::Compact
        } else {
            HeaderSet::Full
        }
    }
}

/// The relay's header set for message `i` (README, "Headers"), values of the same length.
fn headers_for(i: u64, tx_rows: u64, set: HeaderSet) -> HeaderMap {
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (i >> 32) as u32 ^ 0x5eed_0000,
        (i >> 16) & 0xffff,
        (i >> 4) & 0xfff,
        i & 0xf,
        i
    );
    let mut h = HeaderMap::new();
    if set == HeaderSet::None {
        return h;
    }
    h.insert("Nats-Msg-Id", id.as_str());
    if set == HeaderSet::MsgId {
        return h;
    }
    let tx = i / tx_rows.max(1);
    let position = |h: &mut HeaderMap| {
        h.insert(
            "Outbox-Commit-Lsn",
            format!("0/{:X}", 0x1000_0000 + tx * 0x6_0000).as_str(),
        );
        h.insert("Outbox-Tx-Index", (i % tx_rows.max(1)).to_string().as_str());
        h.insert("Outbox-Origin", "app/outbox_relay");
    };
    if set == HeaderSet::Compact {
        position(&mut h);
        return h;
    }
    h.insert("Outbox-Event-Id", id.as_str());
    h.insert("Outbox-Event-Topic", "created");
    h.insert("Outbox-Aggregate-Type", "order");
    h.insert("Outbox-Aggregate-Id", (i + 1).to_string().as_str());
    h.insert("Outbox-Tenant-Id", "default");
    h.insert("Outbox-Schema-Version", "1");
    h.insert("Outbox-Occurred-At", "2026-01-01 00:00:00.000000+00");
    position(&mut h);
    h
}

/// Bytes of the header block on the wire: `NATS/1.0\r\n`, `Name: value\r\n`…, `\r\n`.
fn header_len(h: &HeaderMap) -> usize {
    let mut n = 10 + 2;
    for (k, vs) in h.iter() {
        for v in vs {
            n += AsRef::<str>::as_ref(k).len() + 2 + v.as_str().len() + 2;
        }
    }
    n
}

/// Voluntary and involuntary context switches of every thread of this process.
fn ctx_switches() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// `utime + stime` (all threads) of `/proc/<pid>/stat`, in clock ticks.
fn proc_cpu(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}
