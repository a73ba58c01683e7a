//! Delayed delivery (`delay_seconds`) with JetStream message schedules (ADR-51,
//! nats-server 2.12+).
//!
//! A delayed copy is not published on its subject. The relay publishes a schedule
//! definition instead, on `<routing.schedule_prefix>.<stream>.<origin>.<lsn>-<index>`
//! inside the stream that captures the target subject, with
//! `Nats-Schedule: @at <commit time + delay>` and `Nats-Schedule-Target: <subject>`.
//! At that time the server deletes the definition and appends the message on the target
//! subject with the definition's headers (minus `Nats-Msg-Id` and `Nats-Schedule*`,
//! plus `Nats-Scheduler`). Measured against nats-server 2.15.1.
//!
//! Why each choice:
//! - The fire time is the commit time plus the delay, never "now plus the delay": a replay
//!   or a backlog must not push an event later than the application asked.
//! - The definition keeps `Nats-Msg-Id` and the position headers, so a replay inside the
//!   duplicate window is dropped by the server, and reconciliation beyond it finds the
//!   definition (or, once fired, the generated message) as evidence. A definition
//!   published again beyond the window with its time in the past would fire again: that
//!   is what reconciliation prevents (see [`crate::checkpoint`]).
//! - The definition subject is a function of the position, so a replay that somehow got
//!   past both replaces the pending schedule instead of adding a second one.
//! - One namespace per stream (`<prefix>.<stream>.>`) because the target and its
//!   definition must be in the same stream, and two streams cannot share subjects.

use crate::error::Error;
use crate::route::Position;

/// The oldest nats-server that stores schedule definitions.
pub const MIN_SERVER: (u64, u64) = (2, 12);

/// Does nats-server `version` (e.g. `2.12.1`, `v2.15.0-beta.2`) support schedules?
pub fn supported(version: &str) -> bool {
    let mut parts = version
        .trim()
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= MIN_SERVER,
        _ => false,
    }
}

/// The refusal when a rules file delays targets but the server cannot schedule.
pub fn unsupported(version: &str, max_delay: u64) -> Error {
    Error::fatal(format!(
        "config key routing.rules_file: delay_seconds (up to {max_delay}) needs nats-server {}.{} or newer \
         (jetstream message schedules); the connected server is {version}",
        MIN_SERVER.0, MIN_SERVER.1
    ))
    .hint("upgrade nats-server to 2.12 or newer, or remove delay_seconds from the rules file")
}

/// The subject filter a stream needs to hold its schedule definitions.
pub fn stream_filter(prefix: &str, stream: &str) -> String {
    format!("{prefix}.{stream}.>")
}

/// The definition subject of the copy at `pos`, bound for `stream`. `origin` is made a
/// single token (`/` and other characters outside `[A-Za-z0-9_-]` become `_`).
pub fn definition_subject(prefix: &str, stream: &str, origin: &str, pos: Position) -> String {
    let origin = crate::checkpoint::origin_token(origin);
    let origin = if origin.is_empty() { "_" } else { &origin };
    format!(
        "{prefix}.{stream}.{origin}.{:X}-{}",
        pos.commit_lsn, pos.index
    )
}

/// `Nats-Schedule` for a copy committed at `committed_at_us` (µs since the Unix epoch)
/// and delayed by `delay_seconds`: `@at` and an RFC 3339 UTC time, whole seconds
/// rounded up so the message never fires before the delay has passed.
pub fn fire_at(committed_at_us: i64, delay_seconds: u64) -> String {
    let at_us = committed_at_us
        .max(0)
        .saturating_add((delay_seconds as i64).saturating_mul(1_000_000));
    // The last second of year 9999: the latest time RFC 3339 can write (rules cap the
    // delay at ten years, so only a corrupt commit time could get here).
    let secs = (at_us as u64).div_ceil(1_000_000).min(253_402_300_799);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    format!("@at {}", humantime::format_rfc3339_seconds(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for v in ["2.12.0", "2.12.1", "v2.15.1", "2.13.0-beta.1", "3.0.0"] {
            assert!(supported(v), "{v}");
        }
        for v in ["2.9.10", "2.11.9", "v2.10.0", "1.99.0", "", "x.y", "2"] {
            assert!(!supported(v), "{v}");
        }
    }

    #[test]
    fn definition_subject_is_one_token_per_part() {
        let pos = Position {
            commit_lsn: 0x116B_3748,
            index: 7,
        };
        assert_eq!(
            definition_subject(
                "outbox-relay.schedule",
                "ORDERS",
                "app db/outbox_relay",
                pos
            ),
            "outbox-relay.schedule.ORDERS.app_db_outbox_relay.116B3748-7"
        );
        crate::route::validate_subject(&definition_subject("p", "S", "a.b*>/c", pos))
            .expect("a valid literal subject");
        assert_eq!(stream_filter("p.q", "S"), "p.q.S.>");
        assert_eq!(definition_subject("p", "S", "", pos), "p.S._.116B3748-7");
    }

    #[test]
    fn fire_time_is_commit_plus_delay_rounded_up() {
        // 2026-12-02T04:00:00Z = 1_796_184_000 s.
        let commit = 1_796_184_000_000_000;
        assert_eq!(fire_at(commit, 30), "@at 2026-12-02T04:00:30Z");
        assert_eq!(fire_at(commit + 1, 30), "@at 2026-12-02T04:00:31Z");
        assert_eq!(fire_at(commit + 999_999, 0), "@at 2026-12-02T04:00:01Z");
        assert_eq!(fire_at(0, 1), "@at 1970-01-01T00:00:01Z");
        assert_eq!(fire_at(i64::MAX, u64::MAX), "@at 9999-12-31T23:59:59Z");
    }
}
