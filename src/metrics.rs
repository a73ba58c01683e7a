//! Live state shared by the pipeline, `/readyz` and `/metrics`: counters and gauges
//! updated with relaxed atomics (cheap on the hot path), read by the HTTP server.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Health {
    pub postgres_connected: AtomicBool,
    pub nats_connected: AtomicBool,
    /// Last position confirmed to PostgreSQL.
    pub confirmed_lsn: AtomicU64,
    pub events_published: AtomicU64,
    pub events_dead_lettered: AtomicU64,
    pub transactions: AtomicU64,
    pub reconnects: AtomicU64,
    pub in_flight: AtomicU64,
    /// Replayed messages found already stored in their stream (reconciliation).
    pub skipped_replays: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Health {
    pub fn published(&self) {
        self.events_published.fetch_add(1, Relaxed);
    }
    pub fn dead_lettered(&self) {
        self.events_dead_lettered.fetch_add(1, Relaxed);
    }
    pub fn set_connected(&self, pg: bool, nats: bool) {
        self.postgres_connected.store(pg, Relaxed);
        self.nats_connected.store(nats, Relaxed);
    }
    pub fn ready(&self) -> bool {
        self.postgres_connected.load(Relaxed) && self.nats_connected.load(Relaxed)
    }
    pub fn set_last_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    /// Prometheus text exposition of the counters (the full metric set grows with the
    /// operations work).
    pub fn render(&self) -> String {
        let g = |v: &AtomicU64| v.load(Relaxed);
        let b = |v: &AtomicBool| u8::from(v.load(Relaxed));
        format!(
            "# TYPE outbox_relay_events_published_total counter\noutbox_relay_events_published_total {}\n\
             # TYPE outbox_relay_events_dead_lettered_total counter\noutbox_relay_events_dead_lettered_total {}\n\
             # TYPE outbox_relay_transactions_total counter\noutbox_relay_transactions_total {}\n\
             # TYPE outbox_relay_reconnects_total counter\noutbox_relay_reconnects_total {}\n\
             # TYPE outbox_relay_replays_skipped_total counter\noutbox_relay_replays_skipped_total {}\n\
             # TYPE outbox_relay_in_flight gauge\noutbox_relay_in_flight {}\n\
             # TYPE outbox_relay_confirmed_lsn gauge\noutbox_relay_confirmed_lsn {}\n\
             # TYPE outbox_relay_postgres_connected gauge\noutbox_relay_postgres_connected {}\n\
             # TYPE outbox_relay_nats_connected gauge\noutbox_relay_nats_connected {}\n",
            g(&self.events_published),
            g(&self.events_dead_lettered),
            g(&self.transactions),
            g(&self.reconnects),
            g(&self.skipped_replays),
            g(&self.in_flight),
            g(&self.confirmed_lsn),
            b(&self.postgres_connected),
            b(&self.nats_connected),
        )
    }
}
