//! An idempotent consumer: a durable JetStream pull consumer on the relay's stream that
//! applies each event to PostgreSQL exactly once, however often it is redelivered.
//! docs/consumers.md walks through it.
//!
//! ```text
//! cargo run --example consumer -- --postgres postgres://postgres@127.0.0.1:5432/shop \
//!     --nats nats://127.0.0.1:4222 --stream OUTBOX --durable order-ledger
//! ```
//!
//! For each message, in one transaction of the consumer's own database:
//!
//! 1. `INSERT INTO inbox (event_id, ...) ... ON CONFLICT (event_id) DO NOTHING`, keyed by
//!    the message's `Nats-Msg-Id` (the outbox row's id; `Outbox-Replay-Of` on a fill
//!    sent under another id);
//! 2. only if that row is new, the business effect: here one row appended to
//!    `order_ledger`, which is not idempotent by itself (no unique key), so a duplicate
//!    would show there;
//! 3. COMMIT, and only then ack the message.
//!
//! A crash before the commit leaves nothing behind and the message is redelivered after
//! `--ack-wait`; a crash between the commit and the ack redelivers a message the inbox
//! already holds, which is acked without applying it again. With `--max-ack-pending 1`
//! (the default) the server hands out the next message only after the previous one was
//! acked, so effects are applied in stream order, also across redeliveries. SIGINT or
//! SIGTERM stop it between two messages.

use std::error::Error;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use clap::Parser;
use futures::StreamExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio_postgres::{Client, NoTls};

/// async-nats reports errors as `Box<dyn Error + Send + Sync>`.
type BoxError = Box<dyn Error + Send + Sync>;

/// The consumer's tables, in its own database (it may be the outbox's database or any
/// other one). Idempotent.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inbox (
    event_id     text        PRIMARY KEY,   -- Nats-Msg-Id
    stream_seq   bigint      NOT NULL,
    subject      text        NOT NULL,
    commit_lsn   pg_lsn,                    -- Outbox-Commit-Lsn (NULL on replayed messages)
    tx_index     int,                       -- Outbox-Tx-Index
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS order_ledger (
    entry      bigserial PRIMARY KEY,
    event_id   text      NOT NULL,          -- deliberately not unique: the inbox dedups
    subject    text      NOT NULL,
    payload    jsonb     NOT NULL
);
";

#[derive(Parser)]
#[command(about = "Apply the relay's events to PostgreSQL exactly once")]
struct Args {
    /// PostgreSQL URL of the consumer's database (inbox and business tables).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/app")]
    postgres: String,
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The relay's stream.
    #[arg(long, default_value = "OUTBOX")]
    stream: String,
    /// Durable consumer name: the server remembers what this name has acked.
    #[arg(long, default_value = "order-ledger")]
    durable: String,
    /// Only subjects matching this filter, e.g. `outbox.order.>` (one partition).
    #[arg(long)]
    subject: Option<String>,
    /// Seconds before an unacknowledged message is delivered again.
    #[arg(long, default_value_t = 30.0)]
    ack_wait: f64,
    /// Messages delivered but not yet acked. 1 keeps stream order across redeliveries;
    /// more is faster but lets a redelivered message arrive after later ones (still
    /// applied exactly once).
    #[arg(long, default_value_t = 1)]
    max_ack_pending: i64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();

    let (mut db, connection) = tokio_postgres::connect(&args.postgres, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("consumer: database connection ended: {e}");
        }
    });
    db.batch_execute(SCHEMA).await?;

    let client = async_nats::ConnectOptions::new()
        .name("outbox-relay-example-consumer")
        .connect(args.nats.as_str())
        .await?;
    let js = jetstream::new(client.clone());
    let stream = wait_for_stream(&js, &args.stream).await?;
    // Created once, then reused: the configuration of an existing durable is the
    // server's (change it with `nats consumer edit` or by deleting the durable).
    let consumer = stream
        .get_or_create_consumer(
            &args.durable,
            pull::Config {
                durable_name: Some(args.durable.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs_f64(args.ack_wait),
                max_ack_pending: args.max_ack_pending,
                filter_subject: args.subject.clone().unwrap_or_default(),
                ..Default::default()
            },
        )
        .await?;
    let done: i64 = db
        .query_one("SELECT count(*) FROM inbox", &[])
        .await?
        .get(0);
    eprintln!(
        "consumer: durable {} on stream {}, {done} events already in the inbox",
        args.durable, args.stream
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut messages = consumer.messages().await?;
    let (mut applied, mut duplicates) = (0u64, 0u64);
    loop {
        let msg = tokio::select! {
            next = messages.next() => match next {
                Some(Ok(msg)) => msg,
                // A missed heartbeat (a slow or reconnecting server) is not fatal: the
                // client re-issues its pull request and the stream goes on.
                Some(Err(e)) if e.kind() == pull::MessagesErrorKind::MissingHeartbeat => {
                    eprintln!("consumer: {e}");
                    continue;
                }
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        };
        if apply(&mut db, &msg).await? {
            applied += 1;
        } else {
            duplicates += 1;
        }
        // Only now, after the commit: a crash before this line redelivers the message,
        // and the inbox recognises it.
        msg.ack().await?;
    }
    // Acks are published asynchronously: send the last ones before exiting.
    client.flush().await?;
    eprintln!("consumer: stopped; {applied} applied, {duplicates} duplicates skipped");
    Ok(())
}

/// Applies one message in one transaction: the inbox row and, if the event is new, its
/// business effect. Returns false for an event the inbox already holds (a redelivery).
async fn apply(db: &mut Client, msg: &jetstream::Message) -> Result<bool, BoxError> {
    let info = msg.info()?;
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    // The event's id: `Nats-Msg-Id`, except for a `replay --fill` copy sent under
    // `<id>:fill:<run>`, which names the original in `Outbox-Replay-Of`.
    let event_id = header("Outbox-Replay-Of")
        .or_else(|| header("Nats-Msg-Id"))
        .ok_or("message without Nats-Msg-Id")?;
    // The position headers: the outbox transaction's commit LSN (`X/X`, PostgreSQL's
    // pg_lsn text form) and the event's index in that transaction.
    let commit_lsn = header("Outbox-Commit-Lsn");
    let tx_index: Option<i32> = header("Outbox-Tx-Index").and_then(|i| i.parse().ok());
    let stream_seq = i64::try_from(info.stream_sequence)?;
    let payload = std::str::from_utf8(&msg.payload)?;

    let tx = db.transaction().await?;
    let new = tx
        .execute(
            "INSERT INTO inbox (event_id, stream_seq, subject, commit_lsn, tx_index)
             VALUES ($1, $2, $3, $4::text::pg_lsn, $5)
             ON CONFLICT (event_id) DO NOTHING",
            &[
                &event_id,
                &stream_seq,
                &msg.subject.as_str(),
                &commit_lsn,
                &tx_index,
            ],
        )
        .await?
        == 1;
    if new {
        // The business effect, in the same transaction as the inbox row.
        tx.execute(
            "INSERT INTO order_ledger (event_id, subject, payload) VALUES ($1, $2, $3::text::jsonb)",
            &[&event_id, &msg.subject.as_str(), &payload],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(new)
}

/// The relay creates its `[[streams]]` when it starts: wait for the stream rather than
/// fail when the consumer starts first.
async fn wait_for_stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<jetstream::stream::Stream, BoxError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match js.get_stream(name).await {
            Ok(stream) => return Ok(stream),
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("consumer: waiting for stream {name}: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("stream {name}: {e}").into()),
        }
    }
}
