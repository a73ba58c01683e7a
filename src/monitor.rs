//! The SQL-side watch, beside the streaming sessions and between them: slot lag on a timer (also when
//! idle), the lag guard, detection of an invalidated slot, the optional heartbeat and
//! optional retention.
//!
//! It runs on its own connection. A failed tick is logged and retried at the next one:
//! the watch must never take the pipeline down, except for one condition that makes
//! continuing pointless, an invalidated slot, which it reports through its handle.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Config;
use crate::error::{Error, Result, from_pg};
use crate::metrics::Health;
use crate::source::admin;

/// Commit time (µs since the Unix epoch) of the last transaction whose events are all
/// delivered; retention never deletes rows created after it.
#[derive(Debug, Default)]
pub struct Delivered {
    pub committed_at_us: AtomicI64,
}

/// Runs as long as the relay, across sessions (the task is aborted on drop of the handle).
pub struct Monitor {
    task: tokio::task::JoinHandle<()>,
    fatal: watch::Receiver<Option<Error>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Monitor {
    pub fn spawn(cfg: Config, health: Arc<Health>, delivered: Arc<Delivered>) -> Monitor {
        let (tx, fatal) = watch::channel(None);
        let task = tokio::spawn(async move { watch_loop(cfg, health, delivered, tx).await });
        Monitor { task, fatal }
    }

    /// The fatal condition the watch finds, for [`fatal_of`]: a receiver, so that the
    /// wait outlives a borrow of the monitor (the session's loop keeps one for the
    /// whole session).
    pub fn fatal_watch(&self) -> watch::Receiver<Option<Error>> {
        self.fatal.clone()
    }
}

/// Resolves with the fatal condition `fatal` carries (at once if it already does).
pub async fn fatal_of(fatal: &mut watch::Receiver<Option<Error>>) -> Error {
    loop {
        if let Some(e) = fatal.borrow_and_update().clone() {
            return e;
        }
        if fatal.changed().await.is_err() {
            // The watch ended without a fatal condition: never resolve.
            std::future::pending::<()>().await;
        }
    }
}

async fn watch_loop(
    cfg: Config,
    health: Arc<Health>,
    delivered: Arc<Delivered>,
    fatal: watch::Sender<Option<Error>>,
) {
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(cfg.monitor.interval);
    let hb = cfg.monitor.heartbeat_interval;
    let mut heartbeat = tokio::time::interval(if hb.is_zero() {
        Duration::from_secs(3600)
    } else {
        hb
    });
    let mut retention = tokio::time::interval(cfg.retention.interval.max(Duration::from_secs(1)));
    let mut warned = false;
    let mut stalled = false;
    loop {
        enum Due {
            Lag,
            Heartbeat,
            Retention,
        }
        let due = tokio::select! {
            _ = tick.tick() => Due::Lag,
            _ = heartbeat.tick(), if !hb.is_zero() => Due::Heartbeat,
            _ = retention.tick(), if cfg.retention.enabled => Due::Retention,
        };
        if client.is_none() {
            match admin::connect(&cfg).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e.message, "monitor: no sql connection this tick");
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let result = match due {
            Due::Lag => {
                let r = match check_publication(c, &cfg).await {
                    Ok(()) => check_slot(c, &cfg, &health, &mut warned).await,
                    Err(e) => Err(e),
                };
                log_stall_changes(&health, &mut stalled);
                r
            }
            Due::Heartbeat => heartbeat_write(c).await,
            Due::Retention => prune(c, &cfg, &delivered).await,
        };
        match result {
            Ok(()) => {}
            Err(e) if e.is_transient() => {
                tracing::debug!(error = %e.message, "monitor tick failed");
                if c.is_closed() {
                    client = None;
                }
            }
            Err(e) => {
                let _ = fatal.send(Some(e));
                return;
            }
        }
    }
}

/// A stall is logged when it starts and when it ends, not on every tick.
fn log_stall_changes(health: &Health, stalled: &mut bool) {
    match (health.stalled(), *stalled) {
        (Some(why), false) => {
            tracing::warn!(
                "{why}; check the relay's connections (pg_stat_replication, nats-server) or a very large transaction being decoded"
            );
            *stalled = true;
        }
        (None, true) => {
            tracing::info!("moving again after a stall");
            *stalled = false;
        }
        _ => {}
    }
}

/// The publication must still publish the outbox table. PostgreSQL up to 17 stops the
/// stream with an error at the next change when it is dropped; PostgreSQL 18 skips a
/// missing publication with a warning in its own log and streams nothing for the table,
/// so without this look the relay would go on confirming positions, silently.
async fn check_publication(c: &Client, cfg: &Config) -> Result<()> {
    let (schema, table) = cfg.outbox.qualified();
    let publication = &cfg.postgres.publication;
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1),
                    EXISTS (SELECT 1 FROM pg_publication_tables
                            WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
            &[publication, &schema, &table],
        )
        .await
        .map_err(|e| from_pg(&e))?;
    let (exists, published): (bool, bool) = (row.get(0), row.get(1));
    if published {
        return Ok(());
    }
    let what = if exists {
        format!("publication {publication} no longer publishes {schema}.{table}")
    } else {
        format!("publication {publication} does not exist any more")
    };
    Err(Error::fatal(format!(
        "{what} (changed while the relay ran): rows committed since are not decoded"
    ))
    .hint(
        "recreate it with `outbox-relay migrate`, then republish rows committed since from the outbox \
         table (see docs/operations.md); never drop the publication of a running relay",
    ))
}

/// Refresh the lag gauge, apply the lag guard, detect an invalidated slot.
async fn check_slot(c: &Client, cfg: &Config, health: &Health, warned: &mut bool) -> Result<()> {
    let Some(slot) = admin::slot_info(c, &cfg.postgres.slot).await? else {
        return Ok(());
    };
    if slot.wal_status.as_deref() == Some("lost") {
        return Err(lost_slot(&cfg.postgres.slot));
    }
    let lag = slot.lag_bytes.unwrap_or(0).max(0) as u64;
    health.slot_lag_bytes.set(lag as i64);
    let exceeded = lag >= cfg.monitor.lag_fail_bytes;
    health.set_lag_exceeded(exceeded);
    if lag >= cfg.monitor.lag_warn_bytes {
        if !*warned {
            tracing::warn!(
                lag_bytes = lag,
                warn_at = cfg.monitor.lag_warn_bytes,
                fail_at = cfg.monitor.lag_fail_bytes,
                "replication slot lag is high: PostgreSQL retains this much WAL for the relay"
            );
            *warned = true;
        }
    } else if *warned {
        tracing::info!(
            lag_bytes = lag,
            "replication slot lag back under the warning level"
        );
        *warned = false;
    }
    Ok(())
}

pub fn lost_slot(slot: &str) -> Error {
    Error::fatal(format!(
        "replication slot {slot} is invalidated (wal_status = lost): PostgreSQL removed WAL it still needed, \
         events committed while it was behind can no longer be streamed"
    ))
    .hint(
        "drop the slot, run `outbox-relay migrate` to create a new one, republish the gap from the outbox table \
         (rows after the checkpoint), delete the checkpoint key, restart; raise max_slot_wal_keep_size to prevent it",
    )
}

/// A transactional logical message: it travels through the slot like a commit, so the
/// relay confirms past it even if no outbox row was written.
async fn heartbeat_write(c: &Client) -> Result<()> {
    c.execute(
        "SELECT pg_logical_emit_message(true, 'outbox_relay_heartbeat', '')",
        &[],
    )
    .await
    .map_err(|e| from_pg(&e).context("heartbeat"))?;
    Ok(())
}

/// Delete rows older than `retention.max_age` and created before the last delivered
/// commit, in batches (each DELETE its own short transaction: no long locks).
async fn prune(c: &Client, cfg: &Config, delivered: &Delivered) -> Result<()> {
    let delivered_us = delivered.committed_at_us.load(Relaxed);
    if delivered_us == 0 {
        return Ok(());
    }
    let (schema, table) = cfg.outbox.qualified();
    let created = &cfg.outbox.columns.created_at;
    if created.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "DELETE FROM {t} WHERE ctid = ANY (ARRAY(
             SELECT ctid FROM {t}
             WHERE {c} < least(now() - make_interval(secs => $1), to_timestamp($2::float8 / 1e6))
             ORDER BY {c} LIMIT $3))",
        t = format_args!(
            "{}.{}",
            admin::quote_ident(&schema),
            admin::quote_ident(&table)
        ),
        c = admin::quote_ident(created),
    );
    let age = cfg.retention.max_age.as_secs_f64();
    let mut total = 0u64;
    loop {
        let n = c
            .execute(
                &sql,
                &[
                    &age,
                    &(delivered_us as f64),
                    &i64::from(cfg.retention.batch_size),
                ],
            )
            .await
            .map_err(|e| from_pg(&e).context("retention"))?;
        total += n;
        if n < u64::from(cfg.retention.batch_size) {
            break;
        }
        tokio::task::yield_now().await;
    }
    if total > 0 {
        tracing::info!(rows = total, "retention: pruned delivered rows");
    }
    Ok(())
}
