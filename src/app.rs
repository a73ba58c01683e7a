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
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;

use crate::checkpoint::{Checkpoint, Reconciler};
use crate::config::Config;
use crate::decode::{self, PgMessage, RelationCache};
use crate::error::{Error, Result};
use crate::floors::Floors;
use crate::metrics::Health;
use crate::monitor::{Delivered, Monitor};
use crate::placement::Placement;
use crate::progress::Tracker;
use crate::resume;
use crate::route::{Envelope, Router, Template};
use crate::sink::streams::StreamIndex;
use crate::sink::{self, Sink};
use crate::source::{Event, Stream, admin};

/// Switches of `outbox-relay run` that are not configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Decode and route, but publish nothing and never confirm a position (the slot
    /// and the checkpoint stay where they are): measures the pipeline without NATS
    /// publishing, and cannot lose events if run by mistake.
    pub null_sink: bool,
    /// `run --accept-slot-gap`: see [`crate::resume::Facts::accept_gap`].
    pub accept_slot_gap: bool,
}

/// Run the relay until `shutdown` becomes true or a fatal error occurs.
pub async fn run(
    cfg: Config,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
    opts: RunOptions,
) -> Result<()> {
    let exporter = crate::telemetry::Exporter::spawn(&cfg.telemetry, &health)?;
    let telemetry = exporter.as_ref().and_then(|e| e.handle());
    let result = supervise(cfg, health, shutdown, opts, telemetry).await;
    // The sessions' handles are gone: the exporter sends what is queued, bounded.
    if let Some(e) = exporter {
        e.shutdown().await;
    }
    result
}

/// The supervisor loop: sessions, and the backoff between them.
async fn supervise(
    cfg: Config,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
    opts: RunOptions,
    telemetry: Option<crate::telemetry::Telemetry>,
) -> Result<()> {
    let router = router(&cfg)?;
    let mut confirmed: u64 = 0;
    let mut backoff = new_backoff();
    let mut last_error: Option<String> = None;
    let mut slot_busy_since: Option<Instant> = None;
    let delivered = Arc::new(Delivered::default());
    // One watch for the whole process, not per session: slot lag must keep moving in
    // `/metrics` and the lag guard must keep judging while NATS or PostgreSQL is down.
    let mut monitor = Monitor::spawn(cfg.clone(), health.clone(), delivered.clone());
    let mut started_once = false;
    loop {
        let started = Instant::now();
        let mut session = Session {
            null_sink: opts.null_sink,
            accept_slot_gap: opts.accept_slot_gap,
            notes_logged: started_once,
            commits: Default::default(),
            delivered: delivered.clone(),
            monitor: &mut monitor,
            cfg: &cfg,
            router: &router,
            health: health.clone(),
            shutdown: shutdown.clone(),
            confirmed: &mut confirmed,
            telemetry: telemetry.clone(),
        };
        let result = session.run().await;
        started_once |= session.notes_logged;
        health.set_connected(false, false);
        health.set_active(false);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if !e.is_transient() => return Err(e),
            Err(e)
                if is_slot_busy(&e)
                    && slot_busy_given_up(&mut slot_busy_since, cfg.postgres.slot_busy_timeout) =>
            {
                return Err(Error::fatal(format!(
                    "{} (still after {:?})",
                    e.message, cfg.postgres.slot_busy_timeout
                ))
                .hint("another relay or pg_recvlogical streams from this slot: stop it, or give this relay its own postgres.slot; set postgres.slot_busy_timeout = \"0s\" to wait as a standby"));
            }
            Err(e) => {
                let busy = is_slot_busy(&e);
                if busy {
                    health.set_standby();
                } else {
                    slot_busy_since = None;
                }
                // A session that streamed for a while resets the backoff: this is a new
                // outage, not the same one continuing.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = new_backoff();
                }
                // A standby looks at the slot at a steady pace, so it takes over within
                // about STANDBY_POLL of the active relay's connection going away (the
                // look is the preflight, before any NATS connection: `admin::preflight`).
                let delay = if busy {
                    STANDBY_POLL
                } else {
                    backoff.next().unwrap_or(Duration::from_secs(30))
                };
                let text = e.to_string();
                // Logged once per state change, not once per attempt.
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %e.message, hint = e.hint.as_deref().unwrap_or(""), retry_in = ?delay, "session ended, retrying");
                    last_error = Some(text);
                } else {
                    tracing::debug!(error = %e.message, retry_in = ?delay, "still failing");
                }
                health.set_last_error(Some(e.message.clone()));
                health.reconnects.inc();
                // Shutdown first, then a fatal condition, as within a session.
                tokio::select! {
                    biased;
                    end = session_end(shutdown.clone(), monitor.fatal_watch()) => return end,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// How often a standby checks whether the slot became free.
const STANDBY_POLL: Duration = Duration::from_secs(1);

fn is_slot_busy(e: &Error) -> bool {
    e.message.to_lowercase().contains("is active for pid")
}

/// Resolves once `shutdown` is true (or its sender is gone). The guard `wait_for`
/// returns is dropped here: held in a `select!` it would make the session future
/// `!Send`, and the session runs as a spawned task.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Resolves when a session (or the backoff between sessions) must end, with what the
/// process returns: `Ok` once `shutdown` is true (or its sender is gone), or the fatal
/// condition the monitor found (shutdown first when both hold).
async fn session_end(
    mut shutdown: watch::Receiver<bool>,
    mut fatal: watch::Receiver<Option<Error>>,
) -> Result<()> {
    tokio::select! {
        biased;
        _ = stopped(&mut shutdown) => Ok(()),
        e = crate::monitor::fatal_of(&mut fatal) => Err(e),
    }
}

/// Starts the clock at the first "slot busy" and says when the timeout has passed.
fn slot_busy_given_up(since: &mut Option<Instant>, timeout: Duration) -> bool {
    let first = *since.get_or_insert_with(Instant::now);
    !timeout.is_zero() && first.elapsed() >= timeout
}

fn new_backoff() -> backon::ExponentialBackoff {
    // backon's jitter adds up to 100% of the delay, so a 5 s cap keeps every wait
    // within 200 ms .. 10 s, as documented.
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

struct Session<'a> {
    null_sink: bool,
    accept_slot_gap: bool,
    notes_logged: bool,
    /// Commit end LSN and time of transactions read but not yet confirmed (retention
    /// must not prune rows of undelivered transactions).
    commits: std::collections::VecDeque<(u64, i64)>,
    delivered: Arc<Delivered>,
    monitor: &'a mut Monitor,
    cfg: &'a Config,
    router: &'a Router,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
    /// Survives sessions: where the next one resumes.
    confirmed: &'a mut u64,
    /// `[telemetry]` on: the exporter's queue.
    telemetry: Option<crate::telemetry::Telemetry>,
}

/// Per-session pipeline state.
struct State {
    relations: RelationCache,
    tracker: Tracker,
    tx: Option<OpenTx>,
    max_payload: usize,
    index: StreamIndex,
    /// Logged once per session, when the backlog it started with is delivered (not
    /// after every later event: one line per state change, not per event).
    caught_up: bool,
    checkpoint: Checkpoint,
    /// What earlier sessions stored after the resume position: the proof behind skips.
    reconciler: Reconciler,
    /// Where the next session's read-back starts, saved with each checkpoint.
    floors: Floors,
}

/// The router `run` uses: the subject template, the rules file and the enforced
/// subject prefix of `cfg` (also what `audit` and `replay` route with).
pub fn router(cfg: &Config) -> Result<Router> {
    let template = Template::parse(&cfg.routing.subject)
        .map_err(|e| Error::fatal(format!("config key routing.subject: {e}")))?;
    let prefix = if cfg.routing.subject_prefix.is_empty() {
        None
    } else {
        Some(
            Template::parse(&cfg.routing.subject_prefix)
                .map_err(|e| Error::fatal(format!("config key routing.subject_prefix: {e}")))?,
        )
    };
    Ok(Router::new(template, &origin(cfg)?)
        .with_rules(cfg.routing.load_rules()?)
        .with_prefix(prefix)
        .with_compact_headers(cfg.routing.compact_headers())
        .with_content_type(Some(&cfg.outbox.content_type))
        .with_cloudevents(cfg.routing.cloudevents(&cfg.outbox.content_type)?))
}

/// `<database>/<slot>`: names this source in every message (`Outbox-Origin`) and the
/// checkpoint key.
pub fn origin(cfg: &Config) -> Result<String> {
    let s = crate::source::settings::PgSettings::parse(cfg)?;
    let pc = &s.pg;
    let db = pc.get_dbname().or(pc.get_user()).unwrap_or("postgres");
    Ok(format!("{db}/{}", cfg.postgres.slot))
}

/// The transaction being read.
struct OpenTx {
    commit_lsn: u64,
    index: u32,
    committed_at_us: i64,
    // No tracing span per transaction: creating, entering and closing one cost ~0.2 us
    // per event in catch-up and more per single-row transaction. The log lines made
    // for an event (a dead letter) carry its `commit_lsn` and `tx_index` themselves.
}

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

/// The `Outbox-Tenant-Id` of a message ("" when none), for metrics.
pub fn tenant_of(env: &Envelope) -> &str {
    env.headers
        .get(crate::route::headers::TENANT_ID)
        .map_or("", |v| v.as_str())
}

/// Everything a session holds once both ends are open.
struct Opened {
    stream: Stream,
    sink: Sink,
    nats: async_nats::Client,
    st: State,
}

impl Session<'_> {
    /// Open both ends, stream until shutdown or an error, then drain. Each phase is
    /// its own function: [`Session::open`], [`Session::stream`], [`Session::drain`].
    async fn run(&mut self) -> Result<()> {
        let mut o = self.open().await?;
        let outcome = self.stream(&mut o).await;
        self.drain(o, outcome).await
    }

    /// Connect to PostgreSQL and NATS, check that the checkpoint belongs to this server
    /// and this slot, read back what earlier sessions stored after it, and start the
    /// replication stream there.
    async fn open(&mut self) -> Result<Opened> {
        let cfg = self.cfg;
        let origin = origin(cfg)?;
        let sql = admin::connect(cfg).await?;
        admin::preflight(&sql, cfg).await?;
        if !self.notes_logged {
            for line in admin::settings_summary(&sql).await.unwrap_or_default() {
                tracing::info!("{line}");
            }
            for note in admin::setting_notes(&sql, cfg).await.unwrap_or_default() {
                tracing::warn!("{note}");
            }
            self.notes_logged = true;
        }
        let denials = Arc::new(sink::Denials::default());
        let nats = sink::connect_with(cfg, denials.clone()).await?;
        let max_payload = nats.server_info().max_payload;
        let js = sink::jetstream(nats.clone(), cfg);
        let max_delay = self.router.max_delay_seconds();
        let version = &nats.server_info().version;
        if max_delay > 0 && !sink::schedule::supported(version) {
            return Err(sink::schedule::unsupported(version, max_delay));
        }
        sink::streams::ensure(&js, cfg, max_delay > 0).await?;
        let replicas = cfg.streams.iter().map(|s| s.replicas).max().unwrap_or(1);
        let mut checkpoint =
            Checkpoint::open(&js, &cfg.checkpoint.bucket, &origin, replicas).await?;
        let slot = &cfg.postgres.slot;
        let identity = Stream::identify(cfg, checkpoint.record().timeline).await?;
        let slot_info = admin::slot_info(&sql, slot).await?;
        let plan = resume::plan(&resume::Facts {
            checkpoint: checkpoint.record(),
            confirmed: *self.confirmed,
            server: &identity,
            slot_confirmed: slot_info.as_ref().map(|s| {
                s.confirmed_flush_lsn
                    .as_deref()
                    .and_then(crate::checkpoint::parse_lsn)
            }),
            accept_gap: self.accept_slot_gap,
            slot,
            bucket: &cfg.checkpoint.bucket,
        })?;
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
        }
        if plan.gap_accepted {
            self.health.slot_gaps_accepted.inc();
        }
        let current = admin::current_wal_lsn(&sql).await?;
        if checkpoint.record().legacy && checkpoint.saved() > current {
            // An unbound position ahead of this server's WAL: it belongs to another
            // cluster. (A bound one was checked by system identifier above.)
            return Err(Error::fatal(format!(
                "checkpoint {} is ahead of this server's WAL ({}): the checkpoint belongs to \
                 another database with the same name and slot, or this one was restored from a backup",
                crate::route::format_lsn(checkpoint.saved()),
                crate::route::format_lsn(current)
            ))
            .hint(format!(
                "give this database its own postgres.slot (the checkpoint key is <database>/<slot>), \
                 or, if the old events are all delivered, delete key position.* from KV bucket {}",
                cfg.checkpoint.bucket
            )));
        }
        if admin::ensure_slot(&sql, slot).await? {
            tracing::info!(slot = %slot, "replication slot created");
        }
        // Nothing known yet (a first start): the slot's own position is where
        // streaming starts, and where the read-back of the streams stops.
        let start = match plan.start {
            0 => admin::slot_info(&sql, slot)
                .await?
                .and_then(|s| s.confirmed_flush_lsn)
                .and_then(|l| crate::checkpoint::parse_lsn(&l))
                .unwrap_or(0),
            known => known,
        };
        // The checkpoint is at least where streaming starts, and bound to this server:
        // PostgreSQL's first status feedback carries the start position, and a slot
        // must never stand after the checkpoint (the gap check relies on it).
        checkpoint
            .rebind(&identity.system_id, identity.timeline, start)
            .await?;
        let partitions = self.router.partitions();
        if let Some(before) = checkpoint.note_partitions(partitions).await?
            && before.is_some()
        {
            tracing::warn!("{}", crate::cli::partitions_changed(before, partitions));
        }
        let index = StreamIndex::load(&js, crate::sink::streams::reach(cfg)).await?;
        let mut readback: std::collections::BTreeSet<String> = checkpoint.record().streams.clone();
        readback.extend(cfg.streams.iter().map(|s| s.name.clone()));
        let dlq = format!("{}.>", cfg.routing.dead_letter_prefix);
        readback.extend(
            index
                .filters()
                .iter()
                .filter(|(f, _)| crate::sink::streams::patterns_overlap(f, &dlq))
                .map(|(_, s)| s.clone()),
        );
        for name in &readback {
            checkpoint.note_stream(name).await?;
        }
        let floors = checkpoint.record().floors.clone();
        let reconciler = Reconciler::load(&js, readback, &origin, start, &floors).await?;
        let sink = Sink::new(js.clone(), cfg, self.health.clone(), &origin)
            .await?
            .with_denials(denials)
            .with_telemetry(self.telemetry.clone());
        let stream = Stream::open(cfg, start).await?;
        drop(sql);
        self.health.set_connected(true, true);
        if self.health.is_standby() {
            self.health.takeovers.inc();
            tracing::info!(slot = %slot, "took over the slot: this relay is now the active one");
        }
        self.health.set_active(true);
        self.health.set_last_error(None);
        tracing::info!(
            slot = %slot,
            resume_from = %crate::route::format_lsn(start),
            checkpoint = %crate::route::format_lsn(checkpoint.saved()),
            timeline = identity.timeline,
            stored_after_resume = reconciler.len(),
            "streaming"
        );
        let (schema, table) = cfg.outbox.qualified();
        Ok(Opened {
            stream,
            sink,
            nats,
            st: State {
                relations: RelationCache::new(&schema, &table, cfg.outbox.columns.clone()),
                tracker: Tracker::new(),
                tx: None,
                max_payload,
                index,
                caught_up: false,
                checkpoint,
                floors: reconciler.floors(),
                reconciler,
            },
        })
    }

    /// The streaming loop: read, route, publish, collect PubAcks, confirm.
    async fn stream(&mut self, o: &mut Opened) -> Result<()> {
        let cfg = self.cfg;
        let max_in_flight = cfg.nats.max_in_flight;
        // Made once and polled in every turn of the loop: a future made per turn
        // registered and removed two watch waiters per event (~3.5% of the relay's samples
        // in catch-up).
        let end = session_end(self.shutdown.clone(), self.monitor.fatal_watch());
        tokio::pin!(end);
        let mut save_timer = tokio::time::interval(cfg.checkpoint.interval);
        save_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // An idle session publishes nothing, so a lost NATS connection (which never
        // comes back: see `sink::connect`) would go unnoticed without a look.
        let mut liveness = tokio::time::interval(Duration::from_secs(1));
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let Opened {
            stream,
            sink,
            nats,
            st,
        } = o;
        loop {
            let can_read = st.tracker.in_flight() < max_in_flight
                && sink.in_flight_bytes() < cfg.nats.max_in_flight_bytes;
            tokio::select! {
                biased;
                end = &mut end => return end,
                ack = sink.next_ack(), if sink.in_flight() > 0 => {
                    match ack {
                        Some(Ok(ticket)) => st.tracker.ack(ticket),
                        Some(Err(e)) => return Err(e),
                        None => {}
                    }
                }
                _ = liveness.tick() => {
                    if nats.connection_state() != async_nats::connection::State::Connected {
                        return Err(Error::transient(format!(
                            "lost the connection to nats at {}", cfg.nats.url.redacted()
                        ))
                        .hint("check that nats-server is running and reachable at nats.url; the relay reconnects with backoff"));
                    }
                }
                _ = save_timer.tick() => {
                    self.save_checkpoint(st, stream, sink).await?;
                }
                ev = stream.recv(), if can_read => {
                    let ev = match ev {
                        Ok(Some(ev)) => ev,
                        Ok(None) => return Err(Error::transient("replication stream ended by the server")),
                        Err(e) => return Err(e),
                    };
                    self.handle(ev, st, sink).await?;
                }
            }
            if sink.has_refused() {
                for t in sink.settle_refused().await? {
                    st.tracker.ack(t);
                }
            }
            if let Some(lsn) = st.tracker.take_safe() {
                self.confirm(lsn);
            }
            self.health.in_flight.set(st.tracker.in_flight() as i64);
        }
    }

    /// Persist the delivered position, then (only then) let PostgreSQL move the slot
    /// there: the slot never stands after the checkpoint (see [`crate::checkpoint`]).
    async fn save_checkpoint(
        &mut self,
        st: &mut State,
        stream: &Stream,
        sink: &Sink,
    ) -> Result<()> {
        let floors = st.floors.for_checkpoint(*self.confirmed);
        st.checkpoint.save(*self.confirmed, floors).await?;
        st.floors.mark(sink.tails());
        let saved = st.checkpoint.saved();
        self.health.checkpoint_lsn.set(saved as i64);
        if !self.null_sink && saved > 0 {
            stream.confirm(saved);
        }
        Ok(())
    }

    /// Stop reading; deliver what is in flight so the final position is as far as it
    /// can honestly be; persist it; tell PostgreSQL; close.
    async fn drain(&mut self, o: Opened, outcome: Result<()>) -> Result<()> {
        let cfg = self.cfg;
        let Opened {
            stream,
            mut sink,
            mut st,
            ..
        } = o;
        if outcome.is_err() {
            // Keep what is already safe, even on the way out of a failed session.
            let floors = st.floors.for_checkpoint(*self.confirmed);
            let _ = st.checkpoint.save(*self.confirmed, floors).await;
            return outcome;
        }
        let drain_deadline =
            tokio::time::Instant::now() + cfg.nats.ack_timeout + Duration::from_secs(1);
        while sink.in_flight() > 0 {
            match tokio::time::timeout_at(drain_deadline, sink.next_ack()).await {
                Ok(Some(Ok(t))) => st.tracker.ack(t),
                _ => break,
            }
        }
        match sink.settle_refused().await {
            Ok(done) => done.into_iter().for_each(|t| st.tracker.ack(t)),
            Err(e) => tracing::warn!(error = %e, "dead-lettering refused messages while stopping"),
        }
        if let Some(lsn) = st.tracker.take_safe() {
            self.confirm(lsn);
        }
        if let Err(e) = self.save_checkpoint(&mut st, &stream, &sink).await {
            tracing::warn!(error = %e, "saving the final checkpoint");
        }
        let saved = st.checkpoint.saved();
        let final_lsn = (saved > 0 && !self.null_sink).then_some(saved);
        let wait = cfg.postgres.status_interval + Duration::from_secs(2);
        if let Err(e) = stream.close(final_lsn, wait).await {
            tracing::warn!(error = %e, "closing the replication stream");
        }
        tracing::info!(confirmed = %crate::route::format_lsn(saved), "stopped");
        Ok(())
    }

    /// Everything up to `lsn` is delivered. PostgreSQL hears of it once the checkpoint
    /// holding it is saved ([`Session::save_checkpoint`]).
    fn confirm(&mut self, lsn: u64) {
        if self.null_sink {
            return;
        }
        let mut last = None;
        while let Some(&(end, at)) = self.commits.front() {
            if end > lsn {
                break;
            }
            last = Some(at);
            self.commits.pop_front();
        }
        if let Some(at) = last {
            self.delivered
                .committed_at_us
                .store(at, std::sync::atomic::Ordering::Relaxed);
        }
        if lsn > *self.confirmed {
            *self.confirmed = lsn;
            self.health.confirmed(lsn);
        }
    }

    async fn handle(&mut self, ev: Event, st: &mut State, sink: &mut Sink) -> Result<()> {
        match ev {
            Event::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                st.tx = Some(OpenTx {
                    commit_lsn: final_lsn.as_u64(),
                    index: 0,
                    committed_at_us: commit_time_micros.saturating_add(PG_EPOCH_UNIX_US),
                });
            }
            Event::Commit { end_lsn, .. } => {
                if let Some(open) = &st.tx {
                    self.commits
                        .push_back((end_lsn.as_u64(), open.committed_at_us));
                }
                st.tracker.push_commit(end_lsn.as_u64());
                st.tx = None;
                self.health.transactions.inc();
            }
            Event::KeepAlive { wal_end, .. } => {
                // Nothing open, nothing in flight: everything before wal_end was seen and
                // delivered, so an idle outbox never pins WAL.
                if st.tx.is_none() && st.tracker.is_idle() {
                    self.confirm(wal_end.as_u64());
                    if !st.caught_up {
                        st.caught_up = true;
                        tracing::info!(confirmed = %crate::route::format_lsn(*self.confirmed), "caught up: everything read is delivered");
                    }
                }
            }
            Event::XLogData { data, .. } => {
                self.health.bytes_decoded.inc_by(data.len() as u64);
                self.handle_message(decode::parse(&data), st, sink).await?;
            }
            Event::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                let ours = !self.cfg.outbox.message_prefix.is_empty()
                    && prefix == self.cfg.outbox.message_prefix;
                if !ours {
                    return Ok(());
                }
                if !transactional || st.tx.is_none() {
                    // Not atomic with any business change: publishing it could announce
                    // something that never committed, or lose it. Refused, said, counted.
                    tracing::warn!(%prefix, lsn = %lsn, "non-transactional logical message refused: emit outbox events with pg_logical_emit_message(true, ...)");
                    self.health.dead_lettered("non_transactional");
                    return Ok(());
                }
                self.health.bytes_decoded.inc_by(content.len() as u64);
                let (event, refused) =
                    match decode::message::event_from_message(&content, lsn.as_u64()) {
                        Ok(ev) => (ev, None),
                        Err(reason) => (
                            decode::message::invalid_message_event(&content, lsn.as_u64()),
                            Some(reason),
                        ),
                    };
                self.publish_event(&event, refused, st, sink).await?;
            }
            Event::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// Route one event (a row, or a table-less logical message) and publish its
    /// envelopes; `refused` dead-letters all of them with that reason.
    async fn publish_event(
        &mut self,
        event: &decode::OutboxEvent,
        refused: Option<String>,
        st: &mut State,
        sink: &mut Sink,
    ) -> Result<()> {
        let Some(open) = st.tx.as_mut() else {
            return Err(Error::transient("protocol: event outside a transaction"));
        };
        self.health.event_read();
        let envs = Placement {
            routing: &self.cfg.routing,
            router: self.router,
            index: &mut st.index,
            js: sink.context(),
            origin: sink.origin(),
            max_payload: st.max_payload,
        }
        .place(
            event,
            open.commit_lsn,
            &mut open.index,
            open.committed_at_us,
            refused,
        )
        .await?;
        for env in envs {
            let ticket = st.tracker.push_message();
            // Proof, not inference: this exact message was read back from a stream.
            if st.reconciler.proves_stored(&env) {
                st.tracker.ack(ticket);
                self.health.skipped_replays.inc();
                continue;
            }
            st.reconciler.passed(env.pos);
            if !self.null_sink && !st.checkpoint.knows(&env.stream) {
                // Listed before the first publish to it: a later session reads it back,
                // from the sequence it ends at now.
                st.checkpoint.note_stream(&env.stream).await?;
                if let Some(tail) =
                    crate::checkpoint::stream_tail(sink.context(), &env.stream).await
                {
                    st.floors.learn(&env.stream, tail);
                }
            }
            // Before the publish, so every mark after this one counts it (the floors'
            // proof needs what is published, not what is acknowledged).
            if st.floors.publishing(env.pos.commit_lsn) {
                st.floors.mark(sink.tails());
            }
            if self.null_sink {
                st.tracker.ack(ticket);
                self.health
                    .published(&env.stream, &env.subject, tenant_of(&env));
                continue;
            }
            // The in-flight bound holds within one event too: a fan-out may have more
            // copies than the window (every PubAck must fit the ack subscription).
            while sink.in_flight() >= self.cfg.nats.max_in_flight {
                match sink.next_ack().await {
                    Some(Ok(done)) => st.tracker.ack(done),
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            if let Some(done) = sink.publish(ticket, env).await? {
                st.tracker.ack(done);
            }
        }
        Ok(())
    }

    /// One pgoutput message of the stream (Begin/Commit come pre-parsed).
    async fn handle_message(
        &mut self,
        msg: std::result::Result<PgMessage, decode::DecodeError>,
        st: &mut State,
        sink: &mut Sink,
    ) -> Result<()> {
        match msg {
            Ok(PgMessage::Relation(rel)) => st.relations.update(rel),
            Ok(PgMessage::Insert { relation_id, tuple }) => {
                let mapping = match st.relations.mapping(relation_id) {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        return Err(Error::fatal(format!("outbox row: {e}"))
                                .hint("fix [outbox.columns] or the table, then restart; the row is not skipped"));
                    }
                };
                let (mut event, refused) = match mapping.event(&tuple) {
                    Ok(event) => (event, None),
                    // The row is in the WAL and cannot be fixed any more: stopping on it
                    // would stop every event after it. It goes to the dead letters.
                    Err(e) if e.is_row_problem() => {
                        let (commit_lsn, index) =
                            st.tx.as_ref().map_or((0, 0), |t| (t.commit_lsn, t.index));
                        (
                            mapping.unmappable_event(&tuple, commit_lsn, index),
                            Some(format!("outbox row: {e}")),
                        )
                    }
                    Err(e) => {
                        return Err(Error::fatal(format!("outbox row: {e}")).hint(
                            "fix [outbox.columns] or the table, then restart; the row is not skipped",
                        ));
                    }
                };
                // The payload is a slice of the whole WAL message (every column of the
                // row): held in flight, it would keep that buffer alive while only its
                // own bytes count against `nats.max_in_flight_bytes`. Copied out, the
                // message is freed here and the count is what the memory holds.
                event.payload = bytes::Bytes::copy_from_slice(&event.payload);
                self.publish_event(&event, refused, st, sink).await?;
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
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_the_documented_range() {
        let delays: Vec<Duration> = new_backoff().take(60).collect();
        assert_eq!(delays.len(), 60, "retries forever");
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_millis(200) && *d <= Duration::from_secs(10)),
            "{delays:?}"
        );
    }

    /// The end of a session, and of the backoff between sessions: shutdown wins over a
    /// fatal condition when both hold (a SIGTERM exits 0), a dropped shutdown sender
    /// means stop, and nothing ends without one of them. Each answer is known at the
    /// first poll (`now_or_never`), so a wrong one fails rather than hangs.
    #[test]
    fn session_end_puts_shutdown_before_a_fatal_condition() {
        use futures::FutureExt;
        let end = |stop: &watch::Receiver<bool>, found: &watch::Receiver<Option<Error>>| {
            session_end(stop.clone(), found.clone())
                .now_or_never()
                .map(|end| end.err().map(|e| e.message))
        };
        let (stop, stop_rx) = watch::channel(false);
        let (found, found_rx) = watch::channel(None);
        assert_eq!(end(&stop_rx, &found_rx), None, "nothing happened yet");

        found.send_replace(Some(Error::fatal("the slot was invalidated")));
        assert_eq!(
            end(&stop_rx, &found_rx),
            Some(Some("the slot was invalidated".into()))
        );

        stop.send_replace(true);
        assert_eq!(end(&stop_rx, &found_rx), Some(None), "shutdown first");

        let (stop, stop_rx) = watch::channel(false);
        drop(stop);
        let (_found, found_rx) = watch::channel(None);
        assert_eq!(end(&stop_rx, &found_rx), Some(None), "sender gone: stop");
    }
}
