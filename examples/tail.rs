//! Follow a JetStream stream and print one line per message: stream sequence, subject,
//! `Nats-Msg-Id`, and the end-to-end latency when the payload has a numeric `sent_at_ms`
//! field (the producer's clock, unix milliseconds).
//!
//! ```text
//! cargo run --release --example tail -- --nats nats://127.0.0.1:4222 --stream OUTBOX
//! cargo run --release --example tail -- --stream OUTBOX --all      # from the first message
//! ```
//!
//! It uses an ordered pull consumer: ephemeral, no acks, recreated by the client when it
//! sees a gap, so it never changes what the stream holds or what other consumers see.
//! Latency is measured against this machine's clock, so it is only meaningful when the
//! producer's clock is the same (or synchronised).

use std::error::Error;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use clap::Parser;
use futures::StreamExt;

#[derive(Parser)]
#[command(about = "Print the messages of a JetStream stream as they arrive")]
struct Args {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Stream to follow.
    #[arg(long, default_value = "OUTBOX")]
    stream: String,
    /// Start at the first message the stream holds instead of the next one stored.
    #[arg(long)]
    all: bool,
    /// Only messages whose subject matches this filter (e.g. `outbox.order.>`).
    #[arg(long)]
    subject: Option<String>,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// How long to wait for the stream to exist before giving up, in seconds.
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let client = async_nats::ConnectOptions::new()
        .name("outbox-relay-tail")
        .connect(args.nats.as_str())
        .await?;
    let js = jetstream::new(client);

    // The relay creates its [[streams]] at start: wait for the stream rather than fail
    // when the tail is started first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait);
    let stream = loop {
        match js.get_stream(&args.stream).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("tail: waiting for stream {}: {e}", args.stream);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("stream {}: {e}", args.stream).into()),
        }
    };

    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: if args.all {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            filter_subject: args.subject.clone().unwrap_or_default(),
            ..Default::default()
        })
        .await?;
    eprintln!(
        "tail: following stream {} ({})",
        args.stream,
        if args.all {
            "from the first message"
        } else {
            "new messages only"
        }
    );

    let mut messages = consumer.messages().await?;
    let mut seen: u64 = 0;
    while let Some(next) = messages.next().await {
        let msg = next?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let msg_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_else(|| "-".to_string());
        let latency = match (sent_at_ms(&msg.payload), now_ms()) {
            (Some(sent), Some(now)) => format!("  e2e={}ms", now - sent),
            _ => String::new(),
        };
        println!("seq={seq}  {}  id={msg_id}{latency}", msg.subject);
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}

/// The payload's top-level `sent_at_ms`, if it is a JSON object with a number there.
fn sent_at_ms(payload: &[u8]) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let field = value.get("sent_at_ms")?;
    field
        .as_i64()
        .or_else(|| field.as_f64().map(|f| f.round() as i64))
}

fn now_ms() -> Option<i64> {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}
