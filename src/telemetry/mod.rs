//! OpenTelemetry (`[telemetry]`): a PRODUCER span per published message whose headers
//! carry a W3C `traceparent` (from the row's `metadata`), exported over OTLP/HTTP.
//!
//! - [`context`]: pure W3C Trace Context: parsing, the deterministic span id, sampling.
//! - [`otlp`]: the OTLP protobuf encoding of finished spans.
//! - [`export`]: the background task that batches and POSTs them.
//!
//! Architecture invariant: telemetry never slows or blocks delivery. The session's
//! only work is on its own task and never awaits: [`Telemetry::start`] parses the
//! header and writes the relay's `traceparent`, [`Telemetry::end`] hands the finished
//! span to a bounded queue with `try_send`; when the queue is full (the exporter is
//! down, slow or hanging) the span is dropped and counted
//! (`outbox_relay_telemetry_spans_dropped_total`). Encoding and HTTP happen on the
//! exporter task, each request bounded by `telemetry.export_timeout`. With telemetry
//! off the sink holds `None` and pays one branch per message.
//!
//! The message's `traceparent` header is replaced by the relay's span (same trace id,
//! the relay's span id, the sampling decision in the flags) whenever telemetry is on
//! and the carried value is valid, so a consumer's span is the relay span's child.
//! `tracestate` is passed on unchanged. An invalid `traceparent` is passed on as it
//! was and makes no span.

pub mod context;
mod export;
pub mod otlp;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::config::TelemetryConfig;
use crate::error::Result;
use crate::metrics::Health;
use crate::route::headers::MSG_ID;
use context::TraceParent;
use otlp::{SpanData, StatusCode, Value};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Longest dead-letter reason in a span (as in the `Outbox-Dlq-Reason` header).
const MAX_REASON: usize = 1024;

/// Most spans in one export request.
const MAX_BATCH: usize = 512;

/// The session's handle: cheap to clone (a queue sender and two numbers).
#[derive(Clone)]
pub struct Telemetry {
    queue: mpsc::Sender<Ended>,
    ratio: f64,
    dropped: Counter,
    traceparent: HeaderName,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("ratio", &self.ratio)
            .finish_non_exhaustive()
    }
}

/// The exporter task and the handle feeding it; see [`Exporter::shutdown`].
pub struct Exporter {
    handle: Option<Telemetry>,
    task: tokio::task::JoinHandle<()>,
    timeout: std::time::Duration,
}

impl Exporter {
    /// Start the exporter task for `cfg` (`None` when telemetry is off).
    pub fn spawn(cfg: &TelemetryConfig, health: &Arc<Health>) -> Result<Option<Exporter>> {
        if !cfg.enabled() {
            return Ok(None);
        }
        cfg.validate()?;
        let (tx, rx) = mpsc::channel(cfg.queue_size);
        let client = export::Client::new(cfg)?;
        let resource = vec![
            ("service.name", Value::Str(cfg.service_name.clone())),
            (
                "service.version",
                Value::Str(env!("CARGO_PKG_VERSION").into()),
            ),
            ("telemetry.sdk.name", Value::Str(otlp::SCOPE.into())),
            ("telemetry.sdk.language", Value::Str("rust".into())),
        ];
        tracing::info!(
            endpoint = %client.redacted_url(),
            sampling_ratio = cfg.sampling_ratio,
            queue_size = cfg.queue_size,
            "telemetry: exporting producer spans over otlp/http"
        );
        let task = tokio::spawn(export::run(rx, client, resource, health.clone()));
        Ok(Some(Exporter {
            handle: Some(Telemetry {
                queue: tx,
                ratio: cfg.sampling_ratio,
                dropped: health.telemetry_spans_dropped.clone(),
                traceparent: HeaderName::from_static(TRACEPARENT),
            }),
            task,
            timeout: cfg.export_timeout,
        }))
    }

    /// The handle for the sessions.
    pub fn handle(&self) -> Option<Telemetry> {
        self.handle.clone()
    }

    /// Close the queue and give the task one export timeout to send what it holds
    /// (spans still queued after that are lost; the process is stopping).
    pub async fn shutdown(mut self) {
        self.handle = None;
        let wait = self.timeout + std::time::Duration::from_secs(1);
        if tokio::time::timeout(wait, &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

/// `check`'s line on telemetry (`None` when it is off): where spans go, or that the
/// endpoint does not accept a connection (spans would be dropped and counted).
pub async fn check_note(cfg: &TelemetryConfig) -> Option<String> {
    if !cfg.enabled() {
        return None;
    }
    let client = export::Client::new(cfg).ok()?;
    let url = client.redacted_url();
    let wait = cfg.export_timeout.min(std::time::Duration::from_secs(5));
    Some(
        match tokio::time::timeout(wait, client.connect_tcp()).await {
            Ok(Ok(_)) => format!("telemetry: producer spans are exported to {url} (otlp/http)"),
            Ok(Err(e)) => format!(
                "telemetry.endpoint {url}: {e}: delivery is not affected, but spans will be dropped \
             and counted (outbox_relay_telemetry_spans_*) until a collector listens there"
            ),
            Err(_) => format!(
                "telemetry.endpoint {url}: no connection within {wait:?}: delivery is not affected, \
             but spans will be dropped and counted until a collector answers there"
            ),
        },
    )
}

/// A span started at publish, waiting for its PubAck. Boxed in flight, so a message
/// without a span costs the in-flight record one null pointer.
#[derive(Debug)]
pub struct Started {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: [u8; 8],
    trace_flags: u8,
    trace_state: Option<String>,
    msg_id: String,
    /// See [`crate::route::Envelope::event_id_len`]: the row id is `msg_id`'s prefix.
    event_id_len: usize,
    commit_lsn: u64,
    body_size: usize,
    start_unix_ns: u64,
}

/// How a span ends.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// JetStream acknowledged the message.
    Acked,
    /// The event went to the dead-letter subject for `reason`; `kind` is the bounded
    /// label of `outbox_relay_events_dead_lettered_total`.
    DeadLettered { reason: &'a str, kind: &'static str },
}

/// A span as the session hands it to the queue: what it knew, not yet the OTLP
/// shape. Names, attributes and encoding are built on the exporter task
/// ([`Ended::into_span`]), off the publish path.
#[derive(Debug)]
pub struct Ended {
    started: Box<Started>,
    subject: String,
    end_unix_ns: u64,
    /// Dead-lettered: the reason (at most [`MAX_REASON`] bytes) and its kind.
    dead_letter: Option<(String, &'static str)>,
}

impl Ended {
    /// The finished span ([`finish`]).
    pub fn into_span(self) -> SpanData {
        let outcome = match &self.dead_letter {
            None => Outcome::Acked,
            Some((reason, kind)) => Outcome::DeadLettered { reason, kind },
        };
        finish(*self.started, &self.subject, outcome, self.end_unix_ns)
    }
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What [`propagate`] decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Propagated {
    pub parent: TraceParent,
    /// The relay's span, as written to the header.
    pub span: TraceParent,
    /// Recorded (exported) or not.
    pub recorded: bool,
}

/// Replace a valid `traceparent` in `headers` by the relay's span for the message
/// `msg_id` on `subject` (see [`context::span_id`]), with the sampling decision under
/// `ratio` in its flags. `None` (headers untouched) when there is no valid
/// `traceparent`. Pure: `replay` uses it too, so its messages equal the session's.
pub fn propagate(
    headers: &mut HeaderMap,
    name: &HeaderName,
    subject: &str,
    ratio: f64,
) -> Option<Propagated> {
    let parent = TraceParent::parse(headers.get(name.clone())?.as_str())?;
    let msg_id = headers
        .get(HeaderName::from_static(MSG_ID))
        .map_or("", |v| v.as_str());
    let recorded = context::sampled(&parent, ratio);
    let flags = if recorded {
        parent.flags | context::SAMPLED
    } else {
        parent.flags & !context::SAMPLED
    };
    let span = TraceParent {
        trace_id: parent.trace_id,
        span_id: context::span_id(&parent.trace_id, msg_id, subject),
        flags,
    };
    if let Ok(v) = span.format().parse::<HeaderValue>() {
        headers.insert(name.clone(), v);
    }
    Some(Propagated {
        parent,
        span,
        recorded,
    })
}

impl Telemetry {
    /// At publish: if `headers` carry a valid `traceparent`, write the relay's span
    /// into it and, if it is recorded, start it. Never awaits.
    pub fn start(
        &self,
        headers: &mut HeaderMap,
        subject: &str,
        commit_lsn: u64,
        body_size: usize,
        event_id_len: usize,
    ) -> Option<Box<Started>> {
        let p = propagate(headers, &self.traceparent, subject, self.ratio)?;
        if !p.recorded {
            return None;
        }
        Some(Box::new(Started {
            trace_id: p.span.trace_id,
            span_id: p.span.span_id,
            parent_span_id: p.parent.span_id,
            trace_flags: p.span.flags,
            trace_state: headers
                .get(HeaderName::from_static(TRACESTATE))
                .map(|v| v.as_str().to_string()),
            msg_id: headers
                .get(HeaderName::from_static(MSG_ID))
                .map_or_else(String::new, |v| v.as_str().to_string()),
            event_id_len,
            commit_lsn,
            body_size,
            start_unix_ns: now_unix_ns(),
        }))
    }

    /// At the PubAck (or the dead letter's): end the span and queue it for export,
    /// or drop it (counted) when the queue is full. Never awaits.
    // Boxed because the in-flight record holds it boxed (a message without a span
    // pays one null pointer there).
    #[allow(clippy::boxed_local)]
    pub fn end(&self, started: Box<Started>, subject: &str, outcome: Outcome<'_>) {
        let ended = Ended {
            started,
            subject: subject.to_string(),
            end_unix_ns: now_unix_ns(),
            dead_letter: match outcome {
                Outcome::Acked => None,
                Outcome::DeadLettered { reason, kind } => Some((
                    crate::route::truncate_at_char(reason, MAX_REASON).to_string(),
                    kind,
                )),
            },
        };
        if self.queue.try_send(ended).is_err() {
            self.dropped.inc();
        }
    }
}

/// The finished span: name, the messaging semantic-convention attributes, the
/// relay's own (`outbox.*`), and the status.
pub fn finish(s: Started, subject: &str, outcome: Outcome<'_>, end_unix_ns: u64) -> SpanData {
    let mut attributes = vec![
        ("messaging.system", Value::Str("nats".into())),
        ("messaging.operation.name", Value::Str("publish".into())),
        ("messaging.operation.type", Value::Str("send".into())),
        ("messaging.destination.name", Value::Str(subject.into())),
        ("messaging.message.id", Value::Str(s.msg_id.clone())),
        (
            "messaging.message.body.size",
            Value::Int(s.body_size as i64),
        ),
        (
            "outbox.commit_lsn",
            Value::Str(crate::route::format_lsn(s.commit_lsn)),
        ),
    ];
    // The same rule as a dead letter's `Outbox-Event-Id`: no attribute rather than a
    // wrong one.
    if let Some(id) = crate::route::event_id_of(&s.msg_id, s.event_id_len) {
        attributes.push(("outbox.event_id", Value::Str(id.to_string())));
    }
    let (status, status_message) = match outcome {
        Outcome::Acked => (StatusCode::Ok, String::new()),
        Outcome::DeadLettered { reason, kind } => {
            // Reasons quote subjects a row can make megabytes long.
            let reason = crate::route::truncate_at_char(reason, MAX_REASON);
            attributes.push(("error.type", Value::Str(kind.into())));
            attributes.push(("outbox.dead_letter.reason", Value::Str(reason.into())));
            (StatusCode::Error, reason.to_string())
        }
    };
    SpanData {
        trace_id: s.trace_id,
        span_id: s.span_id,
        parent_span_id: s.parent_span_id,
        trace_flags: s.trace_flags,
        trace_state: s.trace_state,
        name: format!("publish {subject}"),
        start_unix_ns: s.start_unix_ns,
        end_unix_ns: end_unix_ns.max(s.start_unix_ns),
        attributes,
        status,
        status_message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const ID: &str = "0b0c9d2e-0000-4000-8000-000000000001";

    fn headers(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(MSG_ID, ID);
        h.insert(TRACEPARENT, tp);
        h.insert(TRACESTATE, "congo=t61rcWkgMzE");
        h
    }

    fn handle(ratio: f64, capacity: usize) -> (Telemetry, mpsc::Receiver<Ended>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Telemetry {
                queue: tx,
                ratio,
                dropped: Counter::default(),
                traceparent: HeaderName::from_static(TRACEPARENT),
            },
            rx,
        )
    }

    #[test]
    fn the_header_names_the_relay_span_and_the_span_its_parent() {
        let (t, mut rx) = handle(1.0, 8);
        let mut h = headers(TP);
        let started = t
            .start(&mut h, "outbox.order.created", 0x1_0000_0A00, 42, ID.len())
            .unwrap();
        let written = TraceParent::parse(h.get(TRACEPARENT).unwrap().as_str()).unwrap();
        let parent = TraceParent::parse(TP).unwrap();
        assert_eq!(written.trace_id, parent.trace_id);
        assert_ne!(written.span_id, parent.span_id);
        assert!(written.sampled());
        assert_eq!(h.get(TRACESTATE).unwrap().as_str(), "congo=t61rcWkgMzE");
        // The same message again (a replay): the same header.
        let mut again = headers(TP);
        t.start(
            &mut again,
            "outbox.order.created",
            0x1_0000_0A00,
            42,
            ID.len(),
        );
        assert_eq!(again.get(TRACEPARENT), h.get(TRACEPARENT));
        t.end(started, "outbox.order.created", Outcome::Acked);
        let span = rx.try_recv().unwrap().into_span();
        assert_eq!(span.span_id, written.span_id);
        assert_eq!(span.parent_span_id, parent.span_id);
        assert_eq!(span.trace_id, parent.trace_id);
        assert_eq!(span.trace_state.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(span.name, "publish outbox.order.created");
        assert_eq!(span.status, StatusCode::Ok);
        let attr = |k: &str| {
            span.attributes
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        };
        let s = |v: &str| Some(Value::Str(v.into()));
        assert_eq!(attr("messaging.system"), s("nats"));
        assert_eq!(
            attr("messaging.destination.name"),
            s("outbox.order.created")
        );
        assert_eq!(attr("messaging.message.id"), s(ID));
        assert_eq!(attr("messaging.operation.type"), s("send"));
        assert_eq!(attr("messaging.operation.name"), s("publish"));
        assert_eq!(attr("messaging.message.body.size"), Some(Value::Int(42)));
        assert_eq!(attr("outbox.commit_lsn"), s("1/A00"));
        assert_eq!(attr("outbox.event_id"), s(ID));
        assert_eq!(attr("error.type"), None);
        assert!(span.end_unix_ns >= span.start_unix_ns && span.start_unix_ns > 0);
    }

    #[test]
    fn a_fan_out_copy_has_its_own_span_and_a_dead_letter_an_error() {
        let (t, mut rx) = handle(1.0, 8);
        let mut h = headers(TP);
        let copy_id = format!("{ID}:outbox.audit");
        h.insert(MSG_ID, copy_id.as_str());
        let started = t.start(&mut h, "outbox.audit", 7, 0, ID.len()).unwrap();
        let mut first = headers(TP);
        t.start(&mut first, "outbox.order.created", 7, 0, ID.len());
        assert_ne!(h.get(TRACEPARENT), first.get(TRACEPARENT));
        t.end(
            started,
            "outbox.audit",
            Outcome::DeadLettered {
                reason: "no stream captures the subject",
                kind: "no_stream",
            },
        );
        let span = rx.try_recv().unwrap().into_span();
        assert_eq!(span.status, StatusCode::Error);
        assert_eq!(span.status_message, "no stream captures the subject");
        let has = |k: &str, v: &str| {
            span.attributes
                .iter()
                .any(|(n, x)| *n == k && *x == Value::Str(v.into()))
        };
        assert!(has("messaging.message.id", &copy_id));
        assert!(has("outbox.event_id", ID), "{:?}", span.attributes);
        assert!(has("error.type", "no_stream"));
    }

    /// A length that does not fit the message id names no event (as a dead letter's
    /// `Outbox-Event-Id` does not) rather than a wrong one.
    #[test]
    fn no_event_id_attribute_when_the_length_does_not_fit() {
        let (t, mut rx) = handle(1.0, 8);
        let mut h = headers(TP);
        let started = t.start(&mut h, "outbox.order.created", 7, 0, ID.len() + 1);
        t.end(started.unwrap(), "outbox.order.created", Outcome::Acked);
        let span = rx.try_recv().unwrap().into_span();
        assert!(span.attributes.iter().all(|(n, _)| *n != "outbox.event_id"));
        assert!(
            span.attributes
                .iter()
                .any(|(n, _)| *n == "messaging.message.id")
        );
    }

    #[test]
    fn no_span_without_a_valid_traceparent_and_none_for_unsampled() {
        let (t, _rx) = handle(1.0, 8);
        for bad in [
            "00-abc-def-01",
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let mut h = headers(bad);
            assert!(t.start(&mut h, "a.b", 1, 1, ID.len()).is_none());
            assert_eq!(h.get(TRACEPARENT).unwrap().as_str(), bad, "left as it was");
        }
        let mut h = HeaderMap::new();
        h.insert(MSG_ID, ID);
        assert!(t.start(&mut h, "a.b", 1, 1, ID.len()).is_none());
        assert!(h.get(TRACEPARENT).is_none());
        // Unsampled parent: not recorded, but the header still names the relay's span
        // (unsampled), as an OpenTelemetry SDK propagates a non-recording span.
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let mut h = headers(unsampled);
        assert!(t.start(&mut h, "a.b", 1, 1, ID.len()).is_none());
        let written = TraceParent::parse(h.get(TRACEPARENT).unwrap().as_str()).unwrap();
        assert!(!written.sampled());
        assert_ne!(
            written.span_id,
            TraceParent::parse(unsampled).unwrap().span_id
        );
        // Ratio 0: sampled parent, not recorded, flag cleared downstream.
        let (t0, _rx) = handle(0.0, 8);
        let mut h = headers(TP);
        assert!(t0.start(&mut h, "a.b", 1, 1, ID.len()).is_none());
        assert!(
            !TraceParent::parse(h.get(TRACEPARENT).unwrap().as_str())
                .unwrap()
                .sampled()
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (t, mut rx) = handle(1.0, 2);
        for _ in 0..5 {
            let mut h = headers(TP);
            let s = t.start(&mut h, "a.b", 1, 1, ID.len()).unwrap();
            t.end(s, "a.b", Outcome::Acked);
        }
        assert_eq!(t.dropped.get(), 3);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok() && rx.try_recv().is_err());
        drop(rx);
        let mut h = headers(TP);
        let s = t.start(&mut h, "a.b", 1, 1, ID.len()).unwrap();
        t.end(s, "a.b", Outcome::Acked);
        assert_eq!(t.dropped.get(), 4, "a closed queue drops too");
    }

    /// What a traced message costs the session: header parse and rewrite, span start,
    /// end and `try_send` (the queue drained beside it). A measurement, not a check:
    /// `cargo test --lib telemetry_cost -- --ignored --nocapture` (opt-level 1 in the
    /// dev profile: an upper bound of a release build).
    #[test]
    #[ignore]
    fn telemetry_cost_per_message() {
        const N: u32 = 200_000;
        let (t, mut rx) = handle(1.0, 1024);
        let base = headers(TP);
        let started = std::time::Instant::now();
        for _ in 0..N {
            let mut h = base.clone();
            let s = t.start(&mut h, "outbox.order.created", 7, 100, ID.len());
            if let Some(s) = s {
                t.end(s, "outbox.order.created", Outcome::Acked);
            }
            while rx.try_recv().is_ok() {}
        }
        let with = started.elapsed();
        let started = std::time::Instant::now();
        for _ in 0..N {
            let h = base.clone();
            std::hint::black_box(&h);
        }
        let clone_only = started.elapsed();
        eprintln!(
            "traced message: {:.0} ns (of which {:.0} ns cloning the test's headers)",
            with.as_nanos() as f64 / f64::from(N),
            clone_only.as_nanos() as f64 / f64::from(N)
        );
    }
}
