//! Benchmark helper: correctness after a run. Reads every message of the stream and
//! checks it against the outbox table:
//!
//! - message count == rows, and every `Nats-Msg-Id` is distinct and is the id of a row
//!   (so no loss, no duplicate, nothing invented);
//! - positions (`Outbox-Commit-Lsn`, `Outbox-Tx-Index`) strictly increase in stream
//!   order (commit order, then insert order).
//!
//! Prints one JSON line with `"ok": true|false`; exit status 1 when not ok. A fast but
//! wrong relay scores zero: the report discards the throughput of a run that fails here.
//!
//! ```text
//! bench_verify --nats nats://127.0.0.1:4222 --stream OUTBOX \
//!     --pg postgres://postgres@127.0.0.1:5432/app --expect 200000
//! ```

use std::collections::HashSet;
use std::error::Error;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Check a benchmark run: exactly once, in order, against the table")]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long, default_value = "OUTBOX")]
    stream: String,
    /// The database with the outbox table.
    #[arg(long)]
    pg: String,
    #[arg(long, default_value = "public.outbox_events")]
    table: String,
    /// Rows the run committed (checked against the table too).
    #[arg(long, default_value_t = 0)]
    expect: u64,
    /// Purge the stream and exit (the audit/replay benchmark empties it to refill it).
    #[arg(long)]
    purge: bool,
    #[arg(long, default_value = "verify")]
    label: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let started = Instant::now();
    if args.purge {
        let client = async_nats::connect(args.nats.as_str()).await?;
        let js = jetstream::new(client);
        js.get_stream(&args.stream).await?.purge().await?;
        return Ok(());
    }

    let (pg, conn) = tokio_postgres::connect(&args.pg, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let rows = pg
        .query(&format!("SELECT id::text FROM {}", args.table), &[])
        .await?;
    let mut table_ids: HashSet<u128> = HashSet::with_capacity(rows.len());
    for r in &rows {
        let s: &str = r.get(0);
        table_ids.insert(parse_uuid(s).ok_or("unparseable id in the table")?);
    }
    drop(rows);

    let client = async_nats::connect(args.nats.as_str()).await?;
    let js = jetstream::new(client);
    let mut stream = js.get_stream(&args.stream).await?;
    let total = stream.info().await?.state.messages;

    let mut seen: HashSet<u128> = HashSet::with_capacity(total as usize);
    let mut duplicates = 0u64;
    let mut unknown = 0u64;
    let mut bad_id = 0u64;
    let mut out_of_order = 0u64;
    let mut last_pos: Option<(u64, u64)> = None;
    let mut bytes = 0u64;
    let mut read = 0u64;
    if total > 0 {
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        while read < total {
            let msg = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .map_err(|_| "no message for 30 s while reading the stream")?
                .ok_or("message stream ended")??;
            read += 1;
            let h = msg.headers.as_ref();
            let get = |name: &str| h.and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
            bytes += msg.payload.len() as u64 + h.map(header_len).unwrap_or(0) as u64;
            match get("Nats-Msg-Id").as_deref().and_then(parse_uuid) {
                Some(id) => {
                    if !seen.insert(id) {
                        duplicates += 1;
                    }
                    if !table_ids.contains(&id) {
                        unknown += 1;
                    }
                }
                None => bad_id += 1,
            }
            let pos = get("Outbox-Commit-Lsn")
                .as_deref()
                .and_then(parse_lsn)
                .zip(get("Outbox-Tx-Index").and_then(|v| v.parse::<u64>().ok()));
            match (pos, last_pos) {
                (Some(p), Some(l)) if p <= l => out_of_order += 1,
                (None, _) => out_of_order += 1,
                _ => {}
            }
            if pos.is_some() {
                last_pos = pos;
            }
        }
    }
    let missing = table_ids.iter().filter(|id| !seen.contains(id)).count() as u64;
    let ok = total == args.expect
        && table_ids.len() as u64 == args.expect
        && seen.len() as u64 == args.expect
        && duplicates == 0
        && unknown == 0
        && bad_id == 0
        && missing == 0
        && out_of_order == 0;
    println!(
        "{}",
        json!({
            "label": args.label,
            "ok": ok,
            "expected": args.expect,
            "rows": table_ids.len(),
            "messages": total,
            "distinct_msg_ids": seen.len(),
            "duplicates": duplicates,
            "missing": missing,
            "unknown_ids": unknown,
            "bad_msg_ids": bad_id,
            "out_of_order": out_of_order,
            "avg_message_bytes": if read > 0 { bytes as f64 / read as f64 } else { 0.0 },
            "verify_s": started.elapsed().as_secs_f64(),
        })
    );
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

/// A UUID in its text form as 128 bits.
fn parse_uuid(s: &str) -> Option<u128> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

/// PostgreSQL's `X/X` LSN text.
fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Bytes of the header block on the wire.
fn header_len(h: &async_nats::HeaderMap) -> usize {
    let mut n = 12;
    for (k, vs) in h.iter() {
        for v in vs {
            n += AsRef::<str>::as_ref(k).len() + 2 + v.as_str().len() + 2;
        }
    }
    n
}
