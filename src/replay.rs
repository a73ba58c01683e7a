//! `outbox-relay replay`: send rows of the outbox table again, through the same router.
//!
//! - `--fill` (the default): only the copies the audit ([`crate::audit`]) finds
//!   missing, under their original `Nats-Msg-Id`, so the result is exactly once: what
//!   is stored is never sent again (the audit proved it is there), what is sent twice
//!   by two fills within the stream's duplicate window is dropped by JetStream. A fill
//!   killed halfway is resumed by running it again: it audits first, so it sends only
//!   what is still missing. Rows the relay has not confirmed yet (in flight) are left
//!   to the relay.
//! - `--redeliver`: every selected row again, under the new id `<id>:replay:<run>`, for
//!   consumers that rebuild state.
//! - `dlq redrive`: the dead-lettered copies, from the table (a dead letter may carry
//!   no payload), to where the routing sends them now, under their original id, with
//!   `Outbox-Redrive: <run id>`.
//!
//! A copy the server refuses again (a size or a stream limit) is dead-lettered with the
//! new reason and error code, under `<id>:dlq:<run>` with `Outbox-Replay-Of: <id>`.
//!
//! Every message carries `Outbox-Replay: <run id>` (or `Outbox-Redrive`) and no position headers (a replayed
//! message has no place in the commit order; the relay's read-back and the audit's
//! order check ignore messages without a position). The slot is never touched, so a
//! replay runs beside `run`.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderName};
use futures::StreamExt;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use serde::Serialize;

use crate::audit::{self, Audit, Verdict, Window};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::route::{Envelope, headers};

pub use crate::route::headers::{REDRIVE, REPLAY, REPLAY_OF};

/// PubAcks awaited at once.
const WINDOW: usize = 256;

/// Row ids fetched per query in the second pass.
const ID_CHUNK: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Fill,
    Redeliver,
    /// Dead letters whose reason contains this text (any, when `None`).
    Redrive {
        reason: Option<String>,
    },
}

impl Mode {
    /// Is a copy with verdict `v` sent?
    fn sends(&self, v: &Verdict) -> bool {
        match (self, v) {
            (_, Verdict::Missing { in_flight: true } | Verdict::Unplaced) => false,
            (Mode::Redeliver, _) => true,
            (Mode::Fill, v) => *v == Verdict::Missing { in_flight: false },
            (Mode::Redrive { reason }, Verdict::DeadLettered(kind)) => reason
                .as_ref()
                .is_none_or(|r| kind.to_lowercase().contains(&r.to_lowercase())),
            (Mode::Redrive { .. }, _) => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub window: Window,
    /// Messages per second at most (0: unlimited).
    pub rate: u64,
    pub dry_run: bool,
    /// How long to wait for the relay to confirm past the audit's snapshot.
    pub wait: Duration,
}

/// What a replay did.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub run: String,
    /// Messages sent (or, with `--dry-run`, that would be).
    pub sent: u64,
    /// Of those, dropped by JetStream as duplicates (already stored in the window).
    pub duplicates: u64,
    /// Copies left alone: the relay has not confirmed past them yet.
    pub in_flight: u64,
    /// Copies that would go nowhere: no stream captures their subject.
    pub unplaced: u64,
    /// `subject id` of each message, with `--dry-run` (the first 1,000).
    pub planned: Vec<String>,
    /// Refused by the server again, and dead-lettered with the new reason.
    pub dead_lettered: u64,
}

/// A new run id: time and process, unique enough to tell runs apart in headers.
fn run_id() -> String {
    format!("{}-{}", crate::metrics::now_ms(), std::process::id())
}

/// The copy as replayed: `Outbox-Replay`, no position headers, the id of the mode.
fn replayed(env: &Envelope, run: &str, mode: &Mode) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in env.headers.iter() {
        let n: &str = name.as_ref();
        if n == headers::COMMIT_LSN || n == headers::TX_INDEX {
            continue;
        }
        for v in values {
            if *mode == Mode::Redeliver && n == headers::MSG_ID {
                out.append(
                    HeaderName::from_static(headers::MSG_ID),
                    headers::value(&format!("{}:replay:{run}", v.as_str())),
                );
            } else {
                out.append(name.clone(), v.clone());
            }
        }
    }
    let marker = match mode {
        Mode::Redrive { .. } => REDRIVE,
        _ => REPLAY,
    };
    out.insert(HeaderName::from_static(marker), headers::value(run));
    out
}

/// Run a replay.
pub async fn run(
    cfg: &Config,
    opts: &Options,
    mut progress: impl FnMut(&str, u64),
) -> Result<Outcome> {
    let mut a = Audit::connect(cfg).await?;
    let run = run_id();
    let mut outcome = Outcome {
        run: run.clone(),
        ..Outcome::default()
    };
    // First pass: which rows, and for `--fill` which of their copies (by message id).
    let mut rows: Vec<String> = Vec::new();
    let mut wanted: HashSet<String> = HashSet::new();
    let mode = &opts.mode;
    let mut in_flight = 0u64;
    let mut unplaced = 0u64;
    a.run(
        &opts.window,
        opts.wait,
        |event, judged| {
            let mut take = false;
            for (env, _, v) in judged {
                match v {
                    Verdict::Missing { in_flight: true } => in_flight += 1,
                    Verdict::Unplaced => unplaced += 1,
                    _ => {}
                }
                if mode.sends(v) {
                    wanted.insert(audit::msg_id(env).to_string());
                    take = true;
                }
            }
            if take {
                rows.push(String::from_utf8_lossy(&event.id).into_owned());
            }
        },
        &mut progress,
    )
    .await?;
    outcome.in_flight = in_flight;
    outcome.unplaced = unplaced;
    // Second pass: those rows again, routed, and their wanted copies sent.
    let mut pending: Pending = FuturesOrdered::new();
    let mut rechecks: Rechecks = FuturesUnordered::new();
    let dlq = &cfg.routing.dead_letter_prefix;
    // With `[telemetry]` on, the session wrote the relay's span into `traceparent`:
    // a replayed message carries the same value (the span id is a function of the
    // message, `telemetry::context::span_id`); no span is exported for it.
    let traceparent = async_nats::HeaderName::from_static(crate::telemetry::TRACEPARENT);
    let trace_ratio = cfg
        .telemetry
        .enabled()
        .then_some(cfg.telemetry.sampling_ratio);
    let began = tokio::time::Instant::now();
    for chunk in rows.chunks(ID_CHUNK) {
        let window = Window {
            ids: chunk.to_vec(),
            ..Window::default()
        };
        let events = a.rows(&window).await?;
        for event in events {
            for mut env in audit::copies(&a.router, &event) {
                let id = audit::msg_id(&env).to_string();
                if !wanted.contains(&id) {
                    continue;
                }
                let Some(stream) = a.index.stream_of(&env.subject) else {
                    continue;
                };
                if env.dead_letter.is_some() {
                    continue;
                }
                if opts.dry_run {
                    if outcome.planned.len() < 1_000 {
                        outcome
                            .planned
                            .push(format!("{} {stream} {id}", env.subject));
                    }
                    outcome.sent += 1;
                    continue;
                }
                if opts.rate > 0 {
                    tokio::time::sleep_until(
                        began + Duration::from_secs_f64(outcome.sent as f64 / opts.rate as f64),
                    )
                    .await;
                }
                if let Some(ratio) = trace_ratio {
                    crate::telemetry::propagate(
                        &mut env.headers,
                        &traceparent,
                        &env.subject,
                        ratio,
                    );
                }
                let msg = Outgoing {
                    subject: env.subject.clone(),
                    headers: replayed(&env, &run, &opts.mode),
                    payload: env.payload.clone(),
                    event_id_len: env.event_id_len,
                    stream,
                };
                let ack = publish(&a.js, &msg).await?;
                pending.push_back(Box::pin(async move { (ack.await, msg) }));
                outcome.sent += 1;
                if pending.len() >= WINDOW {
                    settle(&a.js, &mut pending, &mut rechecks, &mut outcome, &run, dlq).await?;
                }
                if outcome.sent.is_multiple_of(1_000) {
                    progress("messages sent", outcome.sent);
                }
            }
        }
    }
    while !pending.is_empty() {
        settle(&a.js, &mut pending, &mut rechecks, &mut outcome, &run, dlq).await?;
    }
    while !rechecks.is_empty() {
        settle_recheck(&a.js, &mut rechecks, &mut outcome, &run, dlq).await?;
    }
    progress("messages sent", outcome.sent);
    Ok(outcome)
}

/// One replayed message.
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
    /// See [`crate::route::Envelope::event_id_len`].
    event_id_len: usize,
    /// The stream the index says captures it.
    stream: String,
}

async fn publish(
    js: &jetstream::Context,
    msg: &Outgoing,
) -> Result<jetstream::context::PublishAckFuture> {
    js.publish_with_headers(
        msg.subject.clone(),
        msg.headers.clone(),
        msg.payload.clone(),
    )
    .await
    .map_err(|e| Error::transient(format!("replay: publish {}: {e}", msg.subject)))
}

type AckResult =
    std::result::Result<jetstream::publish::PublishAck, jetstream::context::PublishError>;
type Pending = FuturesOrdered<
    std::pin::Pin<Box<dyn std::future::Future<Output = (AckResult, Outgoing)> + Send>>,
>;

fn no_ack(e: jetstream::context::PublishError) -> Error {
    Error::transient(format!("replay: no PubAck: {e}"))
        .hint("run the same replay again: it sends only what is still missing")
}

/// What a recheck of a duplicate PubAck found.
enum Recheck {
    /// The message the duplicate names is this copy: stored before.
    Stored,
    /// It was not (deleted since, or the copy's own dead letter): sent again under
    /// `<id>:fill:<run>`.
    Sent,
    /// Sent again and refused for what it is.
    Refused(Outgoing, u64, jetstream::context::PublishError),
}

type Rechecks =
    FuturesUnordered<std::pin::Pin<Box<dyn std::future::Future<Output = Result<Recheck>> + Send>>>;

/// Await the oldest PubAck. JetStream calls a message a duplicate when its id is in the
/// stream's duplicate window, also when the message stored under it was deleted or
/// purged since (what the audit found missing), or is the copy's own dead letter in
/// the same stream: a duplicate is rechecked ([`recheck`], concurrently, up to
/// [`WINDOW`] at once). A copy the server refuses for what it is is dead-lettered with
/// the new reason.
async fn settle(
    js: &jetstream::Context,
    pending: &mut Pending,
    rechecks: &mut Rechecks,
    outcome: &mut Outcome,
    run: &str,
    dlq: &str,
) -> Result<()> {
    let Some((ack, msg)) = pending.next().await else {
        return Ok(());
    };
    match ack {
        Ok(ack) if ack.duplicate => {
            rechecks.push(Box::pin(recheck(
                js.clone(),
                msg,
                ack.sequence,
                run.to_string(),
                dlq.to_string(),
            )));
            while rechecks.len() >= WINDOW {
                settle_recheck(js, rechecks, outcome, run, dlq).await?;
            }
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => match refused_code(&e) {
            Some(code) => dead_letter(js, msg, outcome, run, dlq, code, &e).await,
            None => Err(no_ack(e)),
        },
    }
}

/// Await one recheck.
async fn settle_recheck(
    js: &jetstream::Context,
    rechecks: &mut Rechecks,
    outcome: &mut Outcome,
    run: &str,
    dlq: &str,
) -> Result<()> {
    match rechecks.next().await {
        Some(Ok(Recheck::Stored)) => outcome.duplicates += 1,
        Some(Ok(Recheck::Sent)) | None => {}
        Some(Ok(Recheck::Refused(msg, code, e))) => {
            dead_letter(js, msg, outcome, run, dlq, code, &e).await?
        }
        Some(Err(e)) => return Err(e),
    }
    Ok(())
}

/// Is the message at `seq` (which a duplicate PubAck named) this copy? If not, send the
/// copy again under `<id>:fill:<run>` with `Outbox-Replay-Of: <id>`, which the audit
/// reads as the original id.
async fn recheck(
    js: jetstream::Context,
    msg: Outgoing,
    seq: u64,
    run: String,
    dlq: String,
) -> Result<Recheck> {
    let id = msg
        .headers
        .get(headers::MSG_ID)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let dead = format!("{dlq}.");
    let stored = match js.get_stream_no_info(&msg.stream).await {
        Ok(s) => s.get_raw_message(seq).await.ok().is_some_and(|m| {
            !m.subject.starts_with(&dead)
                && m.headers
                    .get(headers::MSG_ID)
                    .is_some_and(|v| v.as_str() == id)
        }),
        Err(_) => false,
    };
    if stored {
        return Ok(Recheck::Stored);
    }
    let again = renamed(msg, &id, &format!("{id}:fill:{run}"));
    match publish(&js, &again).await?.await {
        Ok(ack) if ack.duplicate => Ok(Recheck::Stored),
        Ok(_) => Ok(Recheck::Sent),
        Err(e) => match refused_code(&e) {
            Some(code) => Ok(Recheck::Refused(again, code, e)),
            None => Err(no_ack(e)),
        },
    }
}

/// `msg` under the message id `new_id`, naming `id` in `Outbox-Replay-Of`.
fn renamed(mut msg: Outgoing, id: &str, new_id: &str) -> Outgoing {
    msg.headers.insert(
        HeaderName::from_static(headers::MSG_ID),
        headers::value(new_id),
    );
    msg.headers
        .insert(HeaderName::from_static(REPLAY_OF), headers::value(id));
    msg
}

/// The `err_code` of a PubAck that refuses the message for what it is (and would
/// again), as the relay's sink decides ([`crate::sink::acks::refuses_again`]).
fn refused_code(e: &jetstream::context::PublishError) -> Option<u64> {
    let source = std::error::Error::source(e)?;
    let api = source.downcast_ref::<async_nats::jetstream::Error>()?;
    let code = api.error_code().0;
    crate::sink::acks::refuses_again(code).then_some(code)
}

/// Dead-letter a copy the server refused again: to `<dlq>.<subject>`, with the new
/// reason and code, under `<id>:dlq:<run>` (its original id may be held by the
/// duplicate window); without its payload when the payload made it too large (the row
/// is in the table).
async fn dead_letter(
    js: &jetstream::Context,
    msg: Outgoing,
    outcome: &mut Outcome,
    run: &str,
    dlq: &str,
    code: u64,
    e: &jetstream::context::PublishError,
) -> Result<()> {
    let id = msg
        .headers
        .get(REPLAY_OF)
        .or_else(|| msg.headers.get(headers::MSG_ID))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let mut dead = renamed(msg, &id, &format!("{id}:dlq:{run}"));
    let reason = crate::sink::mark_dead_letter(
        &mut dead.headers,
        dead.event_id_len,
        &format!("jetstream refused the message ({code}): {e}"),
        &dead.subject,
        Some(code),
    );
    dead.subject = format!("{dlq}.{}", dead.subject);
    if code == 10054 {
        dead.payload = bytes::Bytes::new();
    }
    tracing::warn!(subject = %dead.subject, reason, "replayed copy refused again: dead-lettered");
    publish(js, &dead).await?.await.map_err(no_ack)?;
    outcome.dead_lettered += 1;
    Ok(())
}
