//! Live state shared by the pipeline, `/readyz` and `/metrics`.
//!
//! Metrics use `prometheus-client` (the exposition format is the crate's job). Readiness
//! is a few atomics: connected to both ends, not stalled, slot lag under the limit.
//! Every metric is documented in `docs/operations.md`; keep the two in step.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishedLabels {
    pub stream: String,
    /// First token of the subject: bounded cardinality, unlike the whole subject.
    pub subject_root: String,
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    pub end: String,
}

/// All counters and gauges, and the readiness state.
#[derive(Debug)]
pub struct Health {
    registry: Registry,
    pub published: Family<PublishedLabels, Counter>,
    pub publish_errors: Family<KindLabels, Counter>,
    pub dead_lettered: Family<KindLabels, Counter>,
    pub skipped_replays: Counter,
    /// Slot gaps the operator accepted with `run --accept-slot-gap`.
    pub slot_gaps_accepted: Counter,
    pub transactions: Counter,
    pub bytes_decoded: Counter,
    pub reconnects: Counter,
    pub in_flight: Gauge,
    pub puback_seconds: Histogram,
    pub end_to_end_seconds: Histogram,
    pub slot_lag_bytes: Gauge,
    pub confirmed_lsn: Gauge,
    pub checkpoint_lsn: Gauge,
    /// Times this process started streaming after waiting as a standby.
    pub takeovers: Counter,
    /// Telemetry spans dropped at the session because the export queue was full.
    pub telemetry_spans_dropped: Counter,
    /// Telemetry spans the OTLP endpoint accepted.
    pub telemetry_spans_exported: Counter,
    /// Telemetry spans in export requests that failed or timed out (not retried).
    pub telemetry_spans_failed: Counter,
    /// 1 while this process streams from the slot (the active relay).
    active: Gauge,
    /// Waiting for a slot another process holds.
    standby: AtomicBool,
    connected: Family<EndLabels, Gauge>,
    since_last_event: Gauge,
    since_last_confirm: Gauge,
    postgres_connected: AtomicBool,
    nats_connected: AtomicBool,
    /// Slot lag above the configured failure limit: not ready.
    lag_exceeded: AtomicBool,
    last_event_ms: AtomicU64,
    last_confirm_ms: AtomicU64,
    last_ack_ms: AtomicU64,
    /// When both ends were last connected: the stall clock starts there.
    connected_ms: AtomicU64,
    /// When the process started: before its first connection, the stall clock starts
    /// here (not at the epoch: a start after downtime is not a 57-year stall).
    started_ms: u64,
    /// `monitor.stall_after` in ms; 0 = never stalled.
    stall_after_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The last error ever seen and when (ms): kept after recovery, for `status`.
    last_error_seen: Mutex<Option<(String, u64)>>,
}

/// Slot lag below this never counts as a stall (an idle database lags a little).
const STALL_MIN_LAG_BYTES: i64 = 1 << 20;

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Health {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outbox_relay");
        let published = Family::<PublishedLabels, Counter>::default();
        let publish_errors = Family::<KindLabels, Counter>::default();
        let dead_lettered = Family::<KindLabels, Counter>::default();
        let skipped_replays = Counter::default();
        let slot_gaps_accepted = Counter::default();
        let transactions = Counter::default();
        let bytes_decoded = Counter::default();
        let reconnects = Counter::default();
        let in_flight = Gauge::default();
        // 100 µs .. ~100 s.
        let puback_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        let end_to_end_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        let slot_lag_bytes = Gauge::default();
        let confirmed_lsn = Gauge::default();
        let checkpoint_lsn = Gauge::default();
        let connected = Family::<EndLabels, Gauge>::default();
        let takeovers = Counter::default();
        let active = Gauge::default();
        let since_last_event = Gauge::default();
        let since_last_confirm = Gauge::default();
        let telemetry_spans_dropped = Counter::default();
        let telemetry_spans_exported = Counter::default();
        let telemetry_spans_failed = Counter::default();
        registry.register(
            "telemetry_spans_dropped",
            "Producer spans dropped because the telemetry export queue was full (delivery is not affected)",
            telemetry_spans_dropped.clone(),
        );
        registry.register(
            "telemetry_spans_exported",
            "Producer spans accepted by the OTLP endpoint",
            telemetry_spans_exported.clone(),
        );
        registry.register(
            "telemetry_spans_failed",
            "Producer spans in OTLP export requests that failed or timed out (not retried)",
            telemetry_spans_failed.clone(),
        );
        registry.register(
            "events_published",
            "Messages acknowledged by JetStream (PubAck)",
            published.clone(),
        );
        registry.register(
            "publish_errors",
            "Failed publishes by kind (each ends the session; the events are retried)",
            publish_errors.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Events sent to the dead-letter subject, by reason",
            dead_lettered.clone(),
        );
        registry.register(
            "replays_skipped",
            "Replayed messages found already stored (same position and Nats-Msg-Id read back)",
            skipped_replays.clone(),
        );
        registry.register(
            "slot_gaps_accepted",
            "Slots that started after the checkpoint, streamed from with run --accept-slot-gap",
            slot_gaps_accepted.clone(),
        );
        registry.register(
            "transactions",
            "Transactions read from the replication stream",
            transactions.clone(),
        );
        registry.register(
            "decoded_bytes",
            "Bytes of pgoutput messages decoded",
            bytes_decoded.clone(),
        );
        registry.register(
            "reconnects",
            "Sessions restarted after a transient error",
            reconnects.clone(),
        );
        registry.register(
            "in_flight",
            "Messages published whose PubAck is pending",
            in_flight.clone(),
        );
        registry.register(
            "puback_seconds",
            "Time from publish to PubAck",
            puback_seconds.clone(),
        );
        registry.register(
            "end_to_end_seconds",
            "Time from the transaction's commit to the PubAck",
            end_to_end_seconds.clone(),
        );
        registry.register(
            "slot_lag_bytes",
            "pg_current_wal_lsn() - confirmed_flush_lsn of the slot, refreshed on a timer",
            slot_lag_bytes.clone(),
        );
        registry.register(
            "confirmed_lsn",
            "Last position confirmed to PostgreSQL",
            confirmed_lsn.clone(),
        );
        registry.register(
            "checkpoint_lsn",
            "Last position persisted in the checkpoint bucket",
            checkpoint_lsn.clone(),
        );
        registry.register(
            "takeovers",
            "Times this relay started streaming after waiting as a standby",
            takeovers.clone(),
        );
        registry.register(
            "active",
            "1 while this relay streams from the slot, 0 while it is a standby or reconnecting",
            active.clone(),
        );
        registry.register(
            "connected",
            "1 while connected to that end (postgres, nats)",
            connected.clone(),
        );
        registry.register(
            "seconds_since_last_event",
            "Seconds since the last event was read (-1: none yet)",
            since_last_event.clone(),
        );
        registry.register(
            "seconds_since_last_confirm",
            "Seconds since the confirmed position last moved (-1: not yet)",
            since_last_confirm.clone(),
        );
        Self {
            registry,
            published,
            publish_errors,
            dead_lettered,
            skipped_replays,
            slot_gaps_accepted,
            transactions,
            bytes_decoded,
            reconnects,
            in_flight,
            puback_seconds,
            end_to_end_seconds,
            slot_lag_bytes,
            confirmed_lsn,
            checkpoint_lsn,
            takeovers,
            telemetry_spans_dropped,
            telemetry_spans_exported,
            telemetry_spans_failed,
            active,
            standby: AtomicBool::new(false),
            connected,
            since_last_event,
            since_last_confirm,
            postgres_connected: AtomicBool::new(false),
            nats_connected: AtomicBool::new(false),
            lag_exceeded: AtomicBool::new(false),
            last_event_ms: AtomicU64::new(0),
            last_confirm_ms: AtomicU64::new(0),
            last_ack_ms: AtomicU64::new(0),
            connected_ms: AtomicU64::new(0),
            started_ms: now_ms(),
            stall_after_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            last_error_seen: Mutex::new(None),
        }
    }

    pub fn published(&self, stream: &str, subject: &str, tenant: &str) {
        self.published_counter(stream, subject, tenant).inc();
    }

    /// The counter behind [`Health::published`], to keep on the hot path (a lookup
    /// allocates three label strings and hashes them).
    pub fn published_counter(&self, stream: &str, subject: &str, tenant: &str) -> Counter {
        let root = subject.split('.').next().unwrap_or("").to_string();
        self.published
            .get_or_create(&PublishedLabels {
                stream: stream.to_string(),
                subject_root: root,
                tenant: tenant.to_string(),
            })
            .clone()
    }

    pub fn dead_lettered(&self, kind: &str) {
        self.dead_lettered
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn publish_error(&self, kind: &str) {
        self.publish_errors
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn event_read(&self) {
        self.last_event_ms.store(now_ms(), Relaxed);
    }

    /// A PubAck arrived at `now_ms`.
    pub fn acked(&self, now_ms: u64) {
        self.last_ack_ms.store(now_ms, Relaxed);
    }

    pub fn set_stall_after(&self, d: std::time::Duration) {
        self.stall_after_ms.store(d.as_millis() as u64, Relaxed);
    }

    /// Why the pipeline counts as stalled, if it does: connected, the slot behind, and
    /// for `stall_after` nothing read, acknowledged or confirmed.
    pub fn stalled(&self) -> Option<String> {
        let after = self.stall_after_ms.load(Relaxed);
        let lag = self.slot_lag_bytes.get();
        if after == 0 || lag < STALL_MIN_LAG_BYTES {
            return None;
        }
        let progress = [
            &self.last_event_ms,
            &self.last_ack_ms,
            &self.last_confirm_ms,
            &self.connected_ms,
        ]
        .iter()
        .map(|a| a.load(Relaxed))
        .max()
        .unwrap_or(0)
        .max(self.started_ms);
        let idle = now_ms().saturating_sub(progress);
        (idle > after).then(|| {
            format!(
                "stalled: nothing read, published or confirmed for {} s while the slot lags by {lag} bytes",
                idle / 1000
            )
        })
    }

    pub fn confirmed(&self, lsn: u64) {
        self.confirmed_lsn.set(lsn as i64);
        self.last_confirm_ms.store(now_ms(), Relaxed);
    }

    pub fn set_connected(&self, pg: bool, nats: bool) {
        if pg && nats {
            self.connected_ms.store(now_ms(), Relaxed);
        }
        self.postgres_connected.store(pg, Relaxed);
        self.nats_connected.store(nats, Relaxed);
        self.connected
            .get_or_create(&EndLabels {
                end: "postgres".into(),
            })
            .set(i64::from(pg));
        self.connected
            .get_or_create(&EndLabels { end: "nats".into() })
            .set(i64::from(nats));
    }

    /// Streaming from the slot (`true`), or not (a session ended).
    pub fn set_active(&self, active: bool) {
        self.active.set(i64::from(active));
        if active {
            self.standby.store(false, Relaxed);
        }
    }

    /// Waiting for the slot another relay holds.
    pub fn set_standby(&self) {
        self.standby.store(true, Relaxed);
    }

    pub fn is_standby(&self) -> bool {
        self.standby.load(Relaxed)
    }

    /// `active`, `standby` or `connecting`, for `/status`.
    pub fn role(&self) -> &'static str {
        if self.active.get() == 1 {
            "active"
        } else if self.is_standby() {
            "standby"
        } else {
            "connecting"
        }
    }

    pub fn set_lag_exceeded(&self, exceeded: bool) {
        self.lag_exceeded.store(exceeded, Relaxed);
    }

    /// Why the relay is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        if self.is_standby() {
            return Some(format!(
                "standby: {}",
                self.last_error()
                    .unwrap_or_else(|| "another relay holds the slot".into())
            ));
        }
        if !(self.postgres_connected.load(Relaxed) && self.nats_connected.load(Relaxed)) {
            return Some(self.last_error().unwrap_or_else(|| "connecting".into()));
        }
        if self.lag_exceeded.load(Relaxed) {
            return Some(format!(
                "slot lag {} bytes is above monitor.lag_fail_bytes",
                self.slot_lag_bytes.get()
            ));
        }
        self.stalled()
    }

    pub fn ready(&self) -> bool {
        self.not_ready().is_none()
    }

    pub fn set_last_error(&self, e: Option<String>) {
        if let (Some(text), Ok(mut seen)) = (&e, self.last_error_seen.lock()) {
            *seen = Some((text.clone(), now_ms()));
        }
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    /// The last error seen, even if the relay recovered since, and its age in seconds.
    pub fn last_error_seen(&self) -> Option<(String, u64)> {
        let seen = self.last_error_seen.lock().ok()?.clone()?;
        Some((seen.0, now_ms().saturating_sub(seen.1) / 1000))
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let age = |ms: &AtomicU64| match ms.load(Relaxed) {
            0 => -1,
            t => (now_ms().saturating_sub(t) / 1000) as i64,
        };
        self.since_last_event.set(age(&self.last_event_ms));
        self.since_last_confirm.set(age(&self.last_confirm_ms));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14: a process that starts with a lagging slot, before its first
    /// connection, was reported "stalled for 1796403179 s" (the clock started at 1970).
    #[test]
    fn stall_clock_starts_with_the_process() {
        let h = Health::new();
        h.set_stall_after(std::time::Duration::from_secs(300));
        h.slot_lag_bytes.set(90 << 20);
        assert!(h.stalled().is_none(), "{:?}", h.stalled());
    }

    #[test]
    fn stall_needs_lag_and_no_progress() {
        let h = Health::new();
        h.set_stall_after(std::time::Duration::from_millis(1));
        h.slot_lag_bytes.set(2 << 20);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(h.stalled().is_some_and(|w| w.contains("stalled")));
        assert!(h.not_ready().is_some());
        h.event_read();
        assert!(h.stalled().is_none(), "progress just now");
        std::thread::sleep(std::time::Duration::from_millis(5));
        h.slot_lag_bytes.set(1000);
        assert!(h.stalled().is_none(), "a small lag is never a stall");
        h.slot_lag_bytes.set(2 << 20);
        h.set_stall_after(std::time::Duration::ZERO);
        assert!(h.stalled().is_none(), "disabled");
    }

    #[test]
    fn renders_counters_with_labels() {
        let h = Health::new();
        h.published("OUTBOX", "outbox.order.created", "acme");
        h.published("OUTBOX", "outbox.order.created", "acme");
        h.dead_lettered("no_stream");
        h.set_connected(true, false);
        let text = h.render();
        assert!(
            text.contains(r#"outbox_relay_events_published_total{stream="OUTBOX",subject_root="outbox",tenant="acme"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"outbox_relay_events_dead_lettered_total{kind="no_stream"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"outbox_relay_connected{end="nats"} 0"#),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_seconds_since_last_event -1"),
            "{text}"
        );
        assert!(!h.ready());
        h.set_connected(true, true);
        assert!(h.ready());
        h.set_lag_exceeded(true);
        assert!(h.not_ready().unwrap().contains("lag"));
    }
}
