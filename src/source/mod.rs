//! The replication source: slot and publication admin ([`admin`]) and the pgoutput
//! stream ([`Stream`]).
//!
//! `pgwire-replication` is the transport: it frames the protocol, answers keepalives
//! that request a reply, and sends status feedback carrying the *applied* LSN we give
//! it. Architecture invariant: we only ever give it a position from
//! [`crate::progress::Tracker`], or a keepalive's `wal_end` while the tracker is idle.

pub mod admin;
pub mod settings;

use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};

use crate::config::Config;
use crate::error::{Error, Result, from_repl};

pub use pgwire_replication::ReplicationEvent as Event;

/// Replication events buffered between the socket and the pipeline: the read-ahead,
/// the part of memory `nats.max_in_flight_bytes` does not count. pgwire-replication
/// bounds it in events, so it is kept small: at most this many WAL messages (rows) are
/// held beyond the in-flight ones (docs/guarantees.md, "memory"). 16 keeps the walsender
/// streaming while the pipeline takes a message; 256 held 51 MB of 200 KB rows.
pub const REPLICATION_BUFFER_EVENTS: usize = 16;

/// An open replication stream.
pub struct Stream {
    client: ReplicationClient,
}

/// Who the server is: a position means something only on one cluster and timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub system_id: String,
    pub timeline: u32,
    /// Where the timeline asked about ended in this server's history, when it did.
    pub fork: Option<u64>,
}

/// Where `timeline` ended according to a timeline history file (lines of
/// `<parent timeline> <switch point> <reason>`); `None` when it is not listed.
pub fn timeline_end(history: &str, timeline: u32) -> Option<u64> {
    history.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let tli = parts.next()?.parse::<u32>().ok()?;
        let switch = crate::checkpoint::parse_lsn(parts.next()?)?;
        (tli == timeline).then_some(switch)
    })
}

fn replication_config(cfg: &Config, start: u64) -> Result<ReplicationConfig> {
    let settings = settings::PgSettings::load(cfg)?;
    let pc = &settings.pg;
    let host = settings.host();
    let port = pc.get_ports().first().copied().unwrap_or(5432);
    let user = pc.get_user().unwrap_or("postgres").to_string();
    let password = pc
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = pc.get_dbname().unwrap_or(&user).to_string();
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        cfg.postgres.slot.clone(),
        cfg.postgres.publication.clone(),
    )
    .with_port(port)
    .with_tls(settings.replication_tls())
    .with_start_lsn(Lsn::from_u64(start))
    .with_status_interval(cfg.postgres.status_interval)
    .with_wakeup_interval(Duration::from_secs(10))
    .with_buffer_size(REPLICATION_BUFFER_EVENTS)
    .with_application_name("outbox-relay"))
}

impl Stream {
    /// Start streaming from `start` (0 = the slot's confirmed position).
    pub async fn open(cfg: &Config, start: u64) -> Result<Stream> {
        let client = ReplicationClient::connect(replication_config(cfg, start)?)
            .await
            .map_err(|e| from_repl(&e))?;
        Ok(Stream { client })
    }

    /// The server's identity (`IDENTIFY_SYSTEM`) and, when `since_timeline` is older
    /// than its current timeline, where that timeline ended in this server's history
    /// (`TIMELINE_HISTORY`): positions after that point were never part of it.
    pub async fn identify(cfg: &Config, since_timeline: Option<u32>) -> Result<Identity> {
        let mut client = ReplicationClient::connect_gated(replication_config(cfg, 0)?)
            .await
            .map_err(|e| from_repl(&e))?;
        let id = client.identify_system().await.map_err(|e| from_repl(&e))?;
        let mut fork = None;
        if let Some(old) = since_timeline.filter(|t| *t < id.timeline) {
            let history = client
                .timeline_history(id.timeline)
                .await
                .map_err(|e| from_repl(&e))?;
            fork = timeline_end(&String::from_utf8_lossy(&history.content), old);
        }
        // Gated: it never started streaming, so there is nothing to stop gracefully.
        client.abort();
        Ok(Identity {
            system_id: id.system_id,
            timeline: id.timeline,
            fork,
        })
    }
    /// Next event; `Ok(None)` when the server ended the stream.
    pub async fn recv(&mut self) -> Result<Option<ReplicationEvent>> {
        self.client.recv().await.map_err(|e| from_repl(&e))
    }

    /// Everything up to `lsn` is delivered: report it to the server (at the next status
    /// interval, or at once when the server asks).
    pub fn confirm(&self, lsn: u64) {
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
    }

    /// Graceful end: wait (bounded) until the server was told `lsn`, then close.
    pub async fn close(mut self, lsn: Option<u64>, wait: Duration) -> Result<()> {
        if let Some(lsn) = lsn {
            self.confirm(lsn);
            let metrics = self.client.metrics();
            let deadline = tokio::time::Instant::now() + wait;
            while metrics.last_applied_lsn().as_u64() < lsn
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if metrics.last_applied_lsn().as_u64() < lsn {
                return Err(Error::transient(
                    "final status feedback was not sent before the deadline",
                ));
            }
        }
        self.client.shutdown().await.map_err(|e| from_repl(&e))
    }
}

#[cfg(test)]
mod identity_tests {
    use super::timeline_end;

    #[test]
    fn fork_point_of_a_timeline_from_its_history() {
        let history =
            "1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tbefore 2000-01-01\n";
        assert_eq!(timeline_end(history, 1), Some(0x300_0060));
        assert_eq!(timeline_end(history, 2), Some(0x500_0000));
        assert_eq!(timeline_end(history, 3), None);
        assert_eq!(timeline_end("", 1), None);
    }
}
