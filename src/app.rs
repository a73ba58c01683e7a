//! Wiring: the supervisor loop and one streaming session.
//!
//! A *session* opens both ends, then runs one loop that reads the replication stream,
//! decodes, routes, publishes (pipelined) and collects PubAcks, feeding the progress
//! tracker; the tracker's safe position is what PostgreSQL is told. Any transient error
//! ends the session; the supervisor backs off (exponential, jitter, capped) and starts
//! a new one, which resumes from the last confirmed position, so the first
//! unacknowledged transaction is replayed in order and `Nats-Msg-Id` drops what JetStream
//! already stored. Fatal errors end the process with their hint.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;

use crate::config::Config;
use crate::decode::{self, PgMessage, RelationCache};
use crate::error::{Error, Result};
use crate::metrics::Health;
use crate::progress::Tracker;
use crate::route::{Position, Router, Template};
use crate::sink::{self, Sink};
use crate::source::{Event, Stream, admin};

/// Run the relay until `shutdown` becomes true or a fatal error occurs.
pub async fn run(cfg: Config, health: Arc<Health>, shutdown: watch::Receiver<bool>) -> Result<()> {
    let template = Template::parse(&cfg.routing.subject)
        .map_err(|e| Error::fatal(format!("config key routing.subject: {e}")))?;
    let router = Router::new(template);
    let mut confirmed: u64 = 0;
    let mut backoff = new_backoff();
    let mut last_error: Option<String> = None;
    loop {
        let started = Instant::now();
        let mut session = Session {
            cfg: &cfg,
            router: &router,
            health: health.clone(),
            shutdown: shutdown.clone(),
            confirmed: &mut confirmed,
        };
        let result = session.run().await;
        health.set_connected(false, false);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => {
                // A session that streamed for a while resets the backoff: this is a new
                // outage, not the same one continuing.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = new_backoff();
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                let text = e.to_string();
                // Logged once per state change, not once per attempt.
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %e.message, hint = e.hint.as_deref().unwrap_or(""), retry_in = ?delay, "session ended, retrying");
                    last_error = Some(text);
                } else {
                    tracing::debug!(error = %e.message, retry_in = ?delay, "still failing");
                }
                health.set_last_error(Some(e.message.clone()));
                health.reconnects.fetch_add(1, Relaxed);
                let mut stop = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
            }
        }
    }
}

fn new_backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

struct Session<'a> {
    cfg: &'a Config,
    router: &'a Router,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
    /// Survives sessions: where the next one resumes.
    confirmed: &'a mut u64,
}

/// The transaction being read.
struct OpenTx {
    commit_lsn: u64,
    index: u32,
}

impl Session<'_> {
    async fn run(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let sql = admin::connect(cfg).await?;
        admin::preflight(&sql, cfg).await?;
        if admin::ensure_slot(&sql, &cfg.postgres.slot).await? {
            tracing::info!(slot = %cfg.postgres.slot, "replication slot created");
        }
        let nats = sink::connect(cfg).await?;
        let js = sink::jetstream(nats, cfg);
        sink::streams::ensure(&js, cfg).await?;
        let mut sink = Sink::new(js, cfg, self.health.clone());
        let mut stream = Stream::open(cfg, *self.confirmed).await?;
        drop(sql);
        self.health.set_connected(true, true);
        self.health.set_last_error(None);
        tracing::info!(
            slot = %cfg.postgres.slot,
            resume_from = %crate::route::format_lsn(*self.confirmed),
            "streaming"
        );

        let (schema, table) = cfg.outbox.qualified();
        let mut relations = RelationCache::new(&schema, &table, cfg.outbox.columns.clone());
        let mut tracker = Tracker::new();
        let mut tx: Option<OpenTx> = None;
        let max_in_flight = cfg.nats.max_in_flight;
        let mut shutdown = self.shutdown.clone();

        let outcome: Result<()> = loop {
            let can_read = tracker.in_flight() < max_in_flight;
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break Ok(()),
                ack = sink.next_ack(), if sink.in_flight() > 0 => {
                    match ack {
                        Some(Ok(ticket)) => tracker.ack(ticket),
                        Some(Err(e)) => break Err(e),
                        None => {}
                    }
                }
                ev = stream.recv(), if can_read => {
                    let ev = match ev {
                        Ok(Some(ev)) => ev,
                        Ok(None) => break Err(Error::transient("replication stream ended by the server")),
                        Err(e) => break Err(e),
                    };
                    if let Err(e) = self.handle(ev, &mut tx, &mut relations, &mut tracker, &mut sink, &stream).await {
                        break Err(e);
                    }
                }
            }
            if let Some(lsn) = tracker.take_safe() {
                self.confirm(&stream, lsn);
            }
            self.health
                .in_flight
                .store(tracker.in_flight() as u64, Relaxed);
        };

        // Stop reading; deliver what is in flight so the final position is as far as it
        // can honestly be; tell PostgreSQL; close.
        let drain_deadline =
            tokio::time::Instant::now() + cfg.nats.ack_timeout + Duration::from_secs(1);
        if outcome.is_ok() {
            while sink.in_flight() > 0 {
                match tokio::time::timeout_at(drain_deadline, sink.next_ack()).await {
                    Ok(Some(Ok(t))) => tracker.ack(t),
                    _ => break,
                }
            }
            if let Some(lsn) = tracker.take_safe() {
                self.confirm(&stream, lsn);
            }
            let final_lsn = (*self.confirmed > 0).then_some(*self.confirmed);
            let wait = cfg.postgres.status_interval + Duration::from_secs(2);
            if let Err(e) = stream.close(final_lsn, wait).await {
                tracing::warn!(error = %e, "closing the replication stream");
            }
            tracing::info!(confirmed = %crate::route::format_lsn(*self.confirmed), "stopped");
        }
        outcome
    }

    fn confirm(&mut self, stream: &Stream, lsn: u64) {
        if lsn > *self.confirmed {
            *self.confirmed = lsn;
            stream.confirm(lsn);
            self.health.confirmed_lsn.store(lsn, Relaxed);
        }
    }

    async fn handle(
        &mut self,
        ev: Event,
        tx: &mut Option<OpenTx>,
        relations: &mut RelationCache,
        tracker: &mut Tracker,
        sink: &mut Sink,
        stream: &Stream,
    ) -> Result<()> {
        match ev {
            Event::Begin { final_lsn, .. } => {
                *tx = Some(OpenTx {
                    commit_lsn: final_lsn.as_u64(),
                    index: 0,
                });
            }
            Event::Commit { end_lsn, .. } => {
                tracker.push_commit(end_lsn.as_u64());
                *tx = None;
                self.health.transactions.fetch_add(1, Relaxed);
            }
            Event::KeepAlive { wal_end, .. } => {
                // Nothing open, nothing in flight: everything before wal_end was seen and
                // delivered, so an idle outbox never pins WAL.
                if tx.is_none() && tracker.is_idle() {
                    self.confirm(stream, wal_end.as_u64());
                }
            }
            Event::XLogData { data, .. } => match decode::parse(&data) {
                Ok(PgMessage::Relation(rel)) => relations.update(rel),
                Ok(PgMessage::Insert { relation_id, tuple }) => {
                    let mapping = match relations.mapping(relation_id) {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(()),
                        Err(e) => {
                            return Err(Error::fatal(format!("outbox row: {e}"))
                                .hint("fix [outbox.columns] or the table, then restart; the row is not skipped"));
                        }
                    };
                    let event = mapping.event(&tuple).map_err(|e| {
                        Error::fatal(format!("outbox row: {e}"))
                            .hint("fix [outbox.columns] or the table, then restart; the row is not skipped")
                    })?;
                    let Some(open) = tx.as_mut() else {
                        return Err(Error::transient("protocol: insert outside a transaction"));
                    };
                    let pos = Position {
                        commit_lsn: open.commit_lsn,
                        index: open.index,
                    };
                    open.index += 1;
                    for env in self.router.route(&event, pos) {
                        let ticket = tracker.push_message();
                        if let Some(done) = sink.publish(ticket, env).await? {
                            tracker.ack(done);
                        }
                    }
                }
                Ok(PgMessage::Truncate { .. }) => {
                    tracing::warn!("truncate seen on the publication: truncates publish no events");
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::fatal(format!("pgoutput: {e}")).hint(
                        "this is a bug or an unsupported server; report it with the server version",
                    ));
                }
            },
            Event::Message { .. } | Event::StoppedAt { .. } => {}
        }
        Ok(())
    }
}
