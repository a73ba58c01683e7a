//! JetStream publishing: pipelined publishes, every PubAck awaited, dead letters.
//!
//! [`Sink::publish`] hands the message to the connection and returns at once; the
//! PubAck is collected by [`Sink::next_ack`]. The caller bounds how many are in flight.
//! Architecture invariant: a message counts as delivered only when JetStream acked it
//! (or acked its dead letter). Every publish carries a reply subject for its PubAck
//! ([`acks`]); a publish without one is never used.

pub mod acks;
pub mod auth;
pub mod schedule;
pub mod streams;

use std::str::FromStr;
use std::sync::Arc;

use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::{HeaderName, HeaderValue};
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Health;
use crate::progress::Ticket;
use crate::route::{Envelope, headers};

/// What a published message's ack still needs. The headers went into the publish
/// (moved, not cloned: cloning 13 headers per message cost a third of the relay's CPU);
/// a dead letter after a failed ack is rebuilt from this.
struct Sent {
    ticket: Ticket,
    pos: crate::route::Position,
    subject: String,
    payload: Bytes,
    msg_id: Option<HeaderValue>,
    /// See [`Envelope::event_id_len`].
    event_id_len: usize,
    committed_at_us: i64,
    counter: Counter,
    /// The producer span, when telemetry records one for this message.
    span: Option<Box<crate::telemetry::Started>>,
}

pub struct Sink {
    js: jetstream::Context,
    dlq_prefix: String,
    acks: acks::AckMux<Sent>,
    health: Arc<Health>,
    /// The published-events counter of the last (stream, subject root, tenant): most
    /// consecutive messages share it, and the label lookup allocates.
    last_counter: Option<(String, String, String, Counter)>,
    /// `Outbox-Origin` (the same on every message), for rebuilt dead letters.
    origin: Option<HeaderValue>,
    /// Payload bytes of the messages awaiting their PubAck.
    in_flight_bytes: usize,
    /// Permission errors of this connection, to explain failed publishes.
    denials: Arc<Denials>,
    /// Messages the server refused, waiting for their dead letter (reason, err_code).
    refused: std::collections::VecDeque<(Sent, String, u64)>,
    /// `[telemetry]`: `None` when off (one branch per message).
    telemetry: Option<crate::telemetry::Telemetry>,
}

/// Permission errors the server reported on this connection (`-ERR 'Permissions
/// Violation for Publish to "…"'`). The server drops a denied publish without an
/// answer, so all the relay would otherwise see is a PubAck timeout; with this the
/// error says what was denied.
#[derive(Default)]
pub struct Denials(std::sync::Mutex<Option<String>>);

impl Denials {
    fn record(&self, text: String) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some(text);
        }
    }
    /// The last denial, if any since the last call.
    pub fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut last| last.take())
    }
}

/// Connect to NATS. Refused credentials or certificates are fatal (a setting to fix);
/// other connect failures are transient (NATS may be starting).
///
/// Architecture invariant: a connection never outlives its first disconnect. async-nats
/// would reconnect by itself and then write the publishes still queued in the client,
/// while the ones that were in the dead socket are lost: the stream would store event
/// N+1 without event N (a gap), and the replay of N would land after N+1. So a
/// reconnect is refused (the auth callback fails on every connect after the first and
/// `max_reconnects(1)` then closes the client, dropping its queue), every pending
/// PubAck fails, the session ends, and the next session replays in order over a new
/// connection from the first unacknowledged event.
pub async fn connect(cfg: &Config) -> Result<async_nats::Client> {
    connect_with(cfg, Arc::default()).await
}

/// [`connect`], recording the server's permission errors in `denials`.
pub async fn connect_with(cfg: &Config, denials: Arc<Denials>) -> Result<async_nats::Client> {
    crate::install_tls_provider();
    let url = cfg.nats.url.expose();
    let credentials = Arc::new(auth::Credentials::load(cfg)?);
    let used = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opts = async_nats::ConnectOptions::with_auth_callback(move |nonce| {
        let first = !used.swap(true, std::sync::atomic::Ordering::SeqCst);
        let credentials = credentials.clone();
        async move {
            if first {
                credentials.auth(&nonce)
            } else {
                Err(async_nats::AuthError::new(
                    "this connection was lost; the relay opens a new session instead of reconnecting",
                ))
            }
        }
    })
    .event_callback(move |event| {
        let denials = denials.clone();
        async move {
            if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = event
                && text.to_lowercase().contains("permissions violation")
            {
                tracing::error!(
                    server_error = %text,
                    "nats denied the relay: grant its nats user the permission named (docs/security.md)"
                );
                denials.record(text);
            }
        }
    })
    .max_reconnects(1)
    .name("outbox-relay")
    .connection_timeout(std::time::Duration::from_secs(5));
    // Several URLs (a cluster): async-nats tries them in turn.
    let servers = url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            crate::config::bad_key(
                "nats.url",
                format!("not a server address ({e})"),
                "use nats://host:4222",
            )
        })?;
    auth::apply_tls(opts, cfg)?
        .connect(servers)
        .await
        .map_err(|e| connect_error(cfg, &e))
}

const TLS_HINT: &str = "the server's certificate must chain to nats.tls_ca_file and name the host of \
     nats.url; a server that asks for a client certificate needs nats.tls_cert_file and nats.tls_key_file";

fn connect_error(cfg: &Config, e: &async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind as K;
    let msg = format!(
        "connect to nats at {}: {}",
        cfg.nats.url.redacted(),
        crate::error::with_causes(e).to_lowercase()
    );
    // async-nats reports a refused certificate as an io error: look at the words too.
    let certificate = msg.contains("certificate");
    match e.kind() {
        K::Tls => Error::fatal(msg).hint(TLS_HINT),
        _ if certificate => Error::fatal(msg).hint(TLS_HINT),
        K::AuthorizationViolation | K::Authentication => Error::fatal(msg).hint(
            "check the relay's nats credentials (nats.user/password, nats.token, nats.nkey_seed_file, \
             nats.creds_file or the URL) against the server's authorization block",
        ),
        _ => Error::transient(msg)
            .hint("check that nats-server is running with -js and reachable at nats.url"),
    }
}

pub fn jetstream(client: async_nats::Client, cfg: &Config) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(cfg.nats.ack_timeout)
        // We bound in-flight ourselves; this is a safety net above it.
        .max_ack_inflight(cfg.nats.max_in_flight * 2 + 16)
        .backpressure_on_inflight(true)
        .build(client)
}

impl Sink {
    /// `origin` is this source's `Outbox-Origin` (see [`crate::app::origin`]).
    pub async fn new(
        js: jetstream::Context,
        cfg: &Config,
        health: Arc<Health>,
        origin: &str,
    ) -> Result<Self> {
        let acks = acks::AckMux::new(js.client(), cfg.nats.ack_timeout).await?;
        Ok(Self {
            js,
            dlq_prefix: cfg.routing.dead_letter_prefix.clone(),
            acks,
            health,
            last_counter: None,
            origin: <HeaderValue as FromStr>::from_str(origin).ok(),
            in_flight_bytes: 0,
            denials: Arc::default(),
            refused: Default::default(),
            telemetry: None,
        })
    }

    /// Producer spans for messages that carry a `traceparent` ([`crate::telemetry`]).
    pub fn with_telemetry(mut self, telemetry: Option<crate::telemetry::Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// End a message's span, if it has one.
    fn end_span(
        &self,
        span: Option<Box<crate::telemetry::Started>>,
        subject: &str,
        outcome: crate::telemetry::Outcome<'_>,
    ) {
        if let (Some(t), Some(s)) = (&self.telemetry, span) {
            t.end(s, subject, outcome);
        }
    }

    /// Explain failed publishes with the permission errors of the connection
    /// ([`connect_with`]).
    pub fn with_denials(mut self, denials: Arc<Denials>) -> Self {
        self.denials = denials;
        self
    }

    /// `Outbox-Origin` of this source.
    pub fn origin(&self) -> &str {
        self.origin.as_ref().map_or("", |v| v.as_str())
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn in_flight(&self) -> usize {
        self.acks.pending()
    }

    /// The highest sequence acknowledged per stream so far (dead letters included).
    pub fn tails(&self) -> &crate::floors::Tails {
        self.acks.tails()
    }

    /// Payload bytes awaiting their PubAck (the caller bounds it beside the count).
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// Send one envelope; its ack arrives through [`Sink::next_ack`]. A routing failure
    /// is sent straight to the dead-letter subject and awaited: then the ticket is
    /// returned, already delivered.
    pub async fn publish(&mut self, ticket: Ticket, mut env: Envelope) -> Result<Option<Ticket>> {
        // Telemetry off: one branch. On: the carried `traceparent` becomes the relay's
        // span (written into the headers, so a dead letter carries it too).
        let span = match &self.telemetry {
            None => None,
            Some(t) => t.start(
                &mut env.headers,
                &env.subject,
                env.pos.commit_lsn,
                env.payload.len(),
                env.event_id_len,
            ),
        };
        if let Some(reason) = env.dead_letter.clone() {
            let traced = span.map(|s| (s, env.subject.clone()));
            self.dead_letter(env, &reason, None).await?;
            if let Some((span, subject)) = traced {
                self.end_span(Some(span), &subject, dead_lettered(&reason));
            }
            return Ok(Some(ticket));
        }
        let mut headers = std::mem::take(&mut env.headers);
        let msg_id = headers.get(headers::MSG_ID).cloned();
        let counter = self.counter_for(&env, &headers);
        // A delayed copy: publish its schedule definition; the server appends the
        // message on `env.subject` when it fires.
        let subject = match env.schedule.take() {
            Some(definition) => {
                let at = schedule::fire_at(env.committed_at_us, env.delay_seconds);
                headers.insert(async_nats::header::NATS_SCHEDULE, at);
                headers.insert(
                    async_nats::header::NATS_SCHEDULE_TARGET,
                    env.subject.as_str(),
                );
                definition
            }
            None => env.subject.clone(),
        };
        let sent_meta = Sent {
            ticket,
            pos: env.pos,
            subject: env.subject,
            payload: env.payload.clone(),
            msg_id,
            event_id_len: env.event_id_len,
            committed_at_us: env.committed_at_us,
            counter,
            span,
        };
        let size = env.payload.len();
        match self
            .acks
            .publish(subject, headers, env.payload, sent_meta)
            .await
        {
            Ok(()) => {
                self.in_flight_bytes += size;
                Ok(None)
            }
            Err((sent, acks::SendError::TooLarge)) => self
                .dead_letter_sent(sent, "max payload size exceeded", None)
                .await
                .map(|()| Some(ticket)),
            Err((_, acks::SendError::Failed(e))) => Err(publish_failed(
                &self.health,
                &self.denials,
                "broken_pipe",
                &format!("jetstream publish: {e}"),
            )),
        }
    }

    fn counter_for(&mut self, env: &Envelope, headers: &async_nats::HeaderMap) -> Counter {
        let tenant = headers.get(headers::TENANT_ID).map_or("", |v| v.as_str());
        let root = env.subject.split('.').next().unwrap_or("");
        if let Some((s, r, t, c)) = &self.last_counter
            && s == &env.stream
            && r == root
            && t == tenant
        {
            return c.clone();
        }
        let c = self
            .health
            .published_counter(&env.stream, &env.subject, tenant);
        self.last_counter = Some((
            env.stream.clone(),
            root.to_string(),
            tenant.to_string(),
            c.clone(),
        ));
        c
    }

    /// The next PubAck, in publish order. `None` when nothing is in flight. A failure
    /// is an error: the caller replays from the first unacknowledged transaction (a
    /// message the client could not send for its size was dead-lettered at publish).
    /// A message the server refused for what it is is set aside for
    /// [`Sink::settle_refused`] (its ticket stays open until then). Cancel-safe: nothing
    /// is awaited between taking an outcome and recording it, so it can sit in a
    /// `select!`.
    pub async fn next_ack(&mut self) -> Option<Result<Ticket>> {
        loop {
            let (sent, sent_at, res) = self.acks.next().await?;
            self.in_flight_bytes = self.in_flight_bytes.saturating_sub(sent.payload.len());
            self.health
                .puback_seconds
                .observe(sent_at.elapsed().as_secs_f64());
            match res {
                Ok(()) => {
                    sent.counter.inc();
                    self.end_span(sent.span, &sent.subject, crate::telemetry::Outcome::Acked);
                    let now_ms = crate::metrics::now_ms();
                    self.health.acked(now_ms);
                    if sent.committed_at_us > 0 {
                        let now_us = now_ms as i64 * 1000;
                        let secs = (now_us - sent.committed_at_us).max(0) as f64 / 1e6;
                        self.health.end_to_end_seconds.observe(secs);
                    }
                    return Some(Ok(sent.ticket));
                }
                Err(e) => match e.refuses_message() {
                    // Proof that this message is not stored and never will be as it
                    // is: it is dead-lettered in its position; nothing behind it waits.
                    Some(code) => {
                        self.health.publish_error("refused");
                        let reason = format!("jetstream refused the message: {e}");
                        self.refused.push_back((sent, reason, code));
                    }
                    None => {
                        return Some(Err(publish_failed(
                            &self.health,
                            &self.denials,
                            e.kind(),
                            &format!("jetstream publish to {}: {e}", sent.subject),
                        )));
                    }
                },
            }
        }
    }

    /// Are refused messages waiting for [`Sink::settle_refused`]?
    pub fn has_refused(&self) -> bool {
        !self.refused.is_empty()
    }

    /// Dead-letter every message the server refused (with its error code) and return
    /// their tickets, now delivered. Not cancel-safe: call it outside a `select!`.
    pub async fn settle_refused(&mut self) -> Result<Vec<Ticket>> {
        let mut done = Vec::with_capacity(self.refused.len());
        while let Some((sent, reason, code)) = self.refused.pop_front() {
            let ticket = sent.ticket;
            self.dead_letter_sent(sent, &reason, Some(code)).await?;
            done.push(ticket);
        }
        Ok(done)
    }

    /// Dead letter for a message whose headers already went out with the failed
    /// publish: it keeps its `Nats-Msg-Id` (a replayed dead letter is deduplicated) and
    /// its position headers (reconciliation finds it in the dead-letter stream).
    async fn dead_letter_sent(
        &mut self,
        mut sent: Sent,
        reason: &str,
        error_code: Option<u64>,
    ) -> Result<()> {
        let traced = sent.span.take().map(|s| (s, sent.subject.clone()));
        self.dead_letter_rebuilt(sent, reason, error_code).await?;
        if let Some((span, subject)) = traced {
            self.end_span(Some(span), &subject, dead_lettered(reason));
        }
        Ok(())
    }

    /// [`Sink::dead_letter_sent`] without the span.
    async fn dead_letter_rebuilt(
        &mut self,
        sent: Sent,
        reason: &str,
        error_code: Option<u64>,
    ) -> Result<()> {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = sent.msg_id {
            // `Outbox-Event-Id` comes from it in `mark_dead_letter`.
            headers.insert(HeaderName::from_static(headers::MSG_ID), id);
        }
        if let Some(origin) = self.origin.clone() {
            headers.insert(HeaderName::from_static(headers::ORIGIN), origin);
        }
        if let Ok(v) = HeaderValue::from_str(&crate::route::format_lsn(sent.pos.commit_lsn)) {
            headers.insert(HeaderName::from_static(headers::COMMIT_LSN), v);
        }
        if let Ok(v) = HeaderValue::from_str(&sent.pos.index.to_string()) {
            headers.insert(HeaderName::from_static(headers::TX_INDEX), v);
        }
        let env = Envelope {
            pos: sent.pos,
            subject: sent.subject,
            headers,
            payload: sent.payload,
            committed_at_us: sent.committed_at_us,
            event_id_len: sent.event_id_len,
            ..Envelope::default()
        };
        self.dead_letter(env, reason, error_code).await
    }

    /// Publish `env` to `<dead_letter_prefix>.<subject>` with the reason in headers, and
    /// wait for its ack before counting the event as delivered. If even that fails, the
    /// error is transient: nothing is skipped, the event is retried.
    async fn dead_letter(
        &mut self,
        env: Envelope,
        reason: &str,
        error_code: Option<u64>,
    ) -> Result<()> {
        let subject = format!("{}.{}", self.dlq_prefix, env.subject);
        let mut headers = env.headers;
        let reason = mark_dead_letter(
            &mut headers,
            env.event_id_len,
            reason,
            &env.subject,
            error_code,
        );
        // The message's trace context (the relay's span when telemetry is on), so a
        // JSON log line joins the trace in a log store.
        let trace = headers
            .get(crate::telemetry::TRACEPARENT)
            .and_then(|v| crate::telemetry::context::TraceParent::parse(v.as_str()));
        tracing::warn!(
            subject = %env.subject,
            dead_letter = %subject,
            commit_lsn = %crate::route::format_lsn(env.pos.commit_lsn),
            tx_index = env.pos.index,
            reason,
            trace_id = trace.map(|t| t.trace_id_hex()).as_deref(),
            span_id = trace.map(|t| t.span_id_hex()).as_deref(),
            "event dead-lettered"
        );
        let mut payload = env.payload;
        // Too large or refused even as a dead letter (the dead-letter stream has limits
        // too). The row is still in the table; the dead letter says where to find it:
        // first without the payload, then also without the headers that came from the
        // row (a huge metadata value or column), which would otherwise fail it on every
        // replay.
        let mut trimmed = 0;
        let mut trim = |payload: &mut Bytes, headers: &mut async_nats::HeaderMap| {
            trimmed += 1;
            if trimmed == 2 {
                *headers = essential_headers(headers);
            }
            *payload = Bytes::new();
            trimmed <= 2
        };
        loop {
            let attempt = self
                .js
                .send_publish(
                    subject.clone(),
                    jetstream::message::PublishMessage::build()
                        .payload(payload.clone())
                        .headers(headers.clone()),
                )
                .await;
            let fut = match attempt {
                Ok(f) => f,
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    if trim(&mut payload, &mut headers) {
                        continue;
                    }
                    return Err(publish_error(&self.health, &self.denials, &e));
                }
                Err(e) => return Err(publish_error(&self.health, &self.denials, &e)),
            };
            match fut.await {
                Ok(ack) => {
                    self.acks.tails_mut().note(&ack.stream, ack.sequence);
                    self.health.dead_lettered(dead_letter_kind(&reason));
                    return Ok(());
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    return Err(Error::transient(format!(
                        "dead-letter subject {subject} is not captured by any stream"
                    ))
                    .hint(format!(
                        "create a stream for \"{}.>\" (or add it to [[streams]]); the relay retries the event until it can be stored",
                        self.dlq_prefix
                    )));
                }
                // A JetStream error reply (a limit of the dead-letter stream): smaller.
                Err(e)
                    if e.kind() == PublishErrorKind::Other && trim(&mut payload, &mut headers) => {}
                Err(e) => return Err(publish_error(&self.health, &self.denials, &e)),
            }
        }
    }
}

/// How a dead-lettered message's span ends: error status, the reason, its kind.
fn dead_lettered(reason: &str) -> crate::telemetry::Outcome<'_> {
    crate::telemetry::Outcome::DeadLettered {
        reason,
        kind: dead_letter_kind(reason),
    }
}

/// Longest `Outbox-Dlq-Reason`: reasons quote the failing subject or
/// `destination_topics` entry, which a row can make megabytes long.
const MAX_REASON: usize = 1024;

/// Make `headers` a dead letter's: which row (`Outbox-Event-Id`, also in the compact
/// profile), why (`Outbox-Dlq-Reason`, at most [`MAX_REASON`] bytes), where it was
/// going (`Outbox-Dlq-Original-Subject`) and, for a message the server refused, its
/// `err_code`. Returns the reason as written (for the log). The one place that writes
/// them, for the session's dead letters and for `replay`'s.
pub fn mark_dead_letter(
    headers: &mut async_nats::HeaderMap,
    event_id_len: usize,
    reason: &str,
    subject: &str,
    error_code: Option<u64>,
) -> String {
    if headers.get(headers::EVENT_ID).is_none()
        && let Some(id) = headers
            .get(headers::MSG_ID)
            .and_then(|m| crate::route::event_id_of(m.as_str(), event_id_len))
    {
        let id = headers::value(id);
        headers.insert(HeaderName::from_static(headers::EVENT_ID), id);
    }
    let reason = dead_letter_reason(reason);
    headers.insert(
        HeaderName::from_static(headers::DLQ_REASON),
        headers::value(&reason),
    );
    headers.insert(
        HeaderName::from_static(headers::DLQ_SUBJECT),
        headers::value(subject),
    );
    if let Some(code) = error_code {
        headers.insert(
            HeaderName::from_static(headers::DLQ_ERROR_CODE),
            headers::value(&code.to_string()),
        );
    }
    reason
}

/// The reason as written to the header and the log: at most [`MAX_REASON`] bytes.
fn dead_letter_reason(reason: &str) -> String {
    let cut = crate::route::truncate_at_char(reason, MAX_REASON);
    if cut.len() == reason.len() {
        reason.to_string()
    } else {
        format!("{cut}… ({} bytes)", reason.len())
    }
}

/// The relay's own headers of a dead letter, each short whatever the row held: what is
/// left of a dead letter too large even without its payload.
fn essential_headers(all: &async_nats::HeaderMap) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    for name in [
        headers::MSG_ID,
        headers::EVENT_ID,
        headers::ORIGIN,
        headers::COMMIT_LSN,
        headers::TX_INDEX,
        headers::DLQ_REASON,
        headers::DLQ_SUBJECT,
    ] {
        if let Some(v) = all.get(name) {
            out.insert(HeaderName::from_static(name), v.clone());
        }
    }
    out
}

/// A bounded label for the dead-letter metric.
fn dead_letter_kind(reason: &str) -> &'static str {
    if reason.starts_with("jetstream refused") {
        "refused"
    } else if reason.contains("max_payload") || reason.contains("max payload") {
        "max_payload"
    } else if reason.contains("no stream captures") {
        "no_stream"
    } else {
        "routing"
    }
}

fn publish_error(
    health: &Health,
    denials: &Denials,
    e: &jetstream::context::PublishError,
) -> Error {
    let kind = match e.kind() {
        PublishErrorKind::StreamNotFound => "stream_not_found",
        PublishErrorKind::TimedOut => "timed_out",
        PublishErrorKind::BrokenPipe => "broken_pipe",
        PublishErrorKind::MaxAckPending => "max_ack_pending",
        PublishErrorKind::MaxPayloadExceeded => "max_payload",
        _ => "other",
    };
    publish_failed(health, denials, kind, &format!("jetstream publish: {e}"))
}

/// A publish that failed for a reason retrying may fix: counted under `kind`, and
/// explained by the server's permission error when there was one.
fn publish_failed(health: &Health, denials: &Denials, kind: &str, message: &str) -> Error {
    health.publish_error(kind);
    if let Some(denied) = denials.take() {
        health.publish_error("permission_denied");
        return Error::transient(format!("nats denied the relay: {}", denied.to_lowercase())).hint(
            "grant the relay's nats user publish on the routed subjects and the dead-letter prefix, \
             and subscribe on _INBOX.> (see docs/security.md); the relay keeps retrying meanwhile",
        );
    }
    Error::transient(message.to_string())
        .hint("check nats-server health and the target stream; the relay replays from the first unacknowledged event")
}

#[cfg(test)]
mod tests {
    use super::{MAX_REASON, dead_letter_reason, essential_headers, headers, mark_dead_letter};

    /// The row id is the message id's first `event_id_len` bytes: exact for an id
    /// that holds `:` (which a suffix-stripping parse of `<id>:<subject>` got wrong),
    /// and an existing `Outbox-Event-Id` (the full profile) is left as it is.
    #[test]
    fn dead_letters_name_the_row_from_the_message_ids_prefix() {
        let id = "tenant:7:order-1";
        let cases = [
            (id.to_string(), None),
            (format!("{id}:orders.eu"), None),
            (format!("{id}:dead letter 1"), None),
            (format!("{id}:orders.eu:fill:r1:dlq:r2"), None),
            (format!("{id}:orders.eu"), Some(id)),
        ];
        for (msg_id, event_header) in cases {
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::MSG_ID, msg_id.as_str());
            if let Some(e) = event_header {
                h.insert(headers::EVENT_ID, e);
            }
            mark_dead_letter(&mut h, id.len(), "no stream", "orders.eu", None);
            let got: Vec<&str> = h.get_all(headers::EVENT_ID).map(|v| v.as_str()).collect();
            assert_eq!(got, [id], "{msg_id}");
        }
        // No message id, or a length past it: no header rather than a wrong one.
        for (msg_id, len) in [(None, 3), (Some("abc"), 9)] {
            let mut h = async_nats::HeaderMap::new();
            if let Some(m) = msg_id {
                h.insert(headers::MSG_ID, m);
            }
            mark_dead_letter(&mut h, len, "r", "s", None);
            assert!(h.get(headers::EVENT_ID).is_none());
        }
        // An empty row id (a '' id column) is named, empty, as the full profile does.
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, ":orders.eu");
        mark_dead_letter(&mut h, 0, "r", "s", None);
        assert_eq!(h.get(headers::EVENT_ID).map(|v| v.as_str()), Some(""));
    }

    /// A dead letter too large even without its payload (a row's metadata value or
    /// column of several MB became a header) failed on every replay: the relay stalled.
    /// What is left after trimming is small whatever the row held.
    #[test]
    fn trimmed_dead_letter_keeps_only_short_relay_headers() {
        let huge = "x".repeat(9 << 20);
        let mut h = async_nats::HeaderMap::new();
        for (name, value) in [
            (headers::MSG_ID, "0b0c9d2e-0000-4000-8000-000000000001"),
            (headers::EVENT_ID, "0b0c9d2e-0000-4000-8000-000000000001"),
            (headers::TX_INDEX, "3"),
            (headers::SOURCE, huge.as_str()),
            (headers::EVENT_TOPIC, huge.as_str()),
            ("traceparent", huge.as_str()),
        ] {
            h.insert(name, crate::route::headers::value(value));
        }
        let reason = dead_letter_reason(&format!("destination_topics entry {huge:?}"));
        assert!(reason.len() < MAX_REASON + 32, "{}", reason.len());
        h.insert(headers::DLQ_REASON, crate::route::headers::value(&reason));
        let kept = essential_headers(&h);
        let size: usize = kept
            .iter()
            .flat_map(|(k, vs)| {
                vs.iter()
                    .map(move |v| AsRef::<str>::as_ref(k).len() + v.as_str().len())
            })
            .sum();
        assert!(size < 2048, "{size}");
        assert_eq!(kept.get(headers::TX_INDEX).map(|v| v.as_str()), Some("3"));
        assert!(kept.get(headers::SOURCE).is_none() && kept.get("traceparent").is_none());
        assert_eq!(dead_letter_reason("short"), "short");
        assert_eq!(
            dead_letter_reason(&"é".repeat(600)).len(),
            1024 + "… (1200 bytes)".len()
        );
    }
}
