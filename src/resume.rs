//! Where a session resumes, decided from what the checkpoint, the slot and the server
//! say (pure: no I/O, so every case is a unit test).
//!
//! A position means something only on one PostgreSQL cluster and one timeline. The
//! checkpoint is bound to both ([`crate::checkpoint::Record`]); this module refuses what
//! would resume on a guess:
//! - a checkpoint written for another cluster (system identifier differs);
//! - a slot that starts after the checkpoint: it was dropped and created again (by
//!   `migrate`, by hand, by a failover that lost it), and everything committed between
//!   the two was never read. The relay tells PostgreSQL a position only after saving
//!   it in the checkpoint, so a slot this relay moved never stands after it;
//! - a missing slot after delivery.
//!
//! The last two can be accepted explicitly (`run --accept-slot-gap`), once, logged and
//! counted, after refilling the gap from the outbox table. After a promotion, a
//! checkpoint beyond the point where its timeline ended is brought back to that fork
//! point: what was committed after it on the new timeline is read, and the replays'
//! skips are decided by proof ([`crate::checkpoint::Reconciler`]), never by position.

use crate::checkpoint::Record;
use crate::error::{Error, Result};
use crate::route::format_lsn;
use crate::source::Identity;

/// What a session knows when it opens.
pub struct Facts<'a> {
    pub checkpoint: &'a Record,
    /// Delivered position this process confirmed (survives its sessions).
    pub confirmed: u64,
    pub server: &'a Identity,
    /// `None`: the slot does not exist; `Some(None)`: it exists, position unknown.
    pub slot_confirmed: Option<Option<u64>>,
    /// `run --accept-slot-gap`: stream from a slot that starts after the checkpoint (or
    /// create a missing one) instead of refusing.
    pub accept_gap: bool,
    pub slot: &'a str,
    pub bucket: &'a str,
}

/// Where to start, and what to say about it.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Commit end LSN to resume from (0: the slot's own position).
    pub start: u64,
    pub warnings: Vec<String>,
    /// A gap was accepted (`--accept-slot-gap`): counted in a metric.
    pub gap_accepted: bool,
}

pub fn plan(f: &Facts<'_>) -> Result<Plan> {
    let mut plan = Plan::default();
    let cp = f.checkpoint;
    if let Some(id) = &cp.system_id
        && *id != f.server.system_id
    {
        return Err(Error::fatal(format!(
            "the checkpoint was written for PostgreSQL cluster {id}, but this server is cluster {}: \
             its positions mean nothing here",
            f.server.system_id
        ))
        .hint(format!(
            "two clusters must not share a checkpoint: give this one its own postgres.slot or checkpoint.bucket; \
             if this cluster replaced the old one (a restore), refill the events from the outbox table, \
             then delete key position.* from KV bucket {}",
            f.bucket
        )));
    }
    let mut known = cp.lsn.max(f.confirmed);
    if let Some(tl) = cp.timeline
        && tl < f.server.timeline
    {
        match f.server.fork {
            Some(fork) if known > fork => {
                plan.warnings.push(format!(
                    "promoted server: timeline {tl} ended at {} in this server's history, before the \
                     checkpoint {}; resuming at the fork point (events of the old timeline after it are \
                     not in this server's outbox; see docs/guarantees.md)",
                    format_lsn(fork),
                    format_lsn(known)
                ));
                known = fork;
            }
            Some(_) => {}
            None => plan.warnings.push(format!(
                "the checkpoint was written on timeline {tl}, which this server's history (timeline {}) \
                 does not list; resuming at the checkpoint",
                f.server.timeline
            )),
        }
    }
    match f.slot_confirmed {
        None if known > 0 => {
            if !f.accept_gap {
                return Err(missing_slot(f.slot, known));
            }
            plan.warnings.push(format!(
                "accepted gap (--accept-slot-gap): slot {} is created anew; events committed after {} \
                 and before now are not relayed",
                f.slot,
                format_lsn(known)
            ));
            plan.gap_accepted = true;
            known = 0;
        }
        Some(Some(slot_at)) if slot_at > known && known > 0 && !cp.legacy => {
            if !f.accept_gap {
                return Err(Error::fatal(format!(
                    "replication slot {} starts at {}, after this relay's checkpoint {}: it was dropped and \
                     created again, and the events committed in between ({} bytes of WAL) were never read",
                    f.slot,
                    format_lsn(slot_at),
                    format_lsn(known),
                    slot_at - known
                ))
                .hint(gap_hint(
                    "find out who recreated the slot (`outbox-relay migrate` refuses to)",
                    known,
                )));
            }
            plan.warnings.push(format!(
                "accepted gap (--accept-slot-gap): slot {} starts at {}; events committed between {} and \
                 it are not relayed",
                f.slot,
                format_lsn(slot_at),
                format_lsn(known)
            ));
            plan.gap_accepted = true;
            known = slot_at;
        }
        Some(Some(slot_at)) => known = known.max(slot_at),
        _ => {}
    }
    plan.start = known;
    Ok(plan)
}

/// The slot is gone although this relay delivered from it up to `known`: a slot
/// created now would start at the current WAL position and skip everything in between.
pub fn missing_slot(slot: &str, known: u64) -> Error {
    Error::fatal(format!(
        "replication slot {slot} is missing, but this relay had delivered up to {}: \
         events committed after that may be lost",
        format_lsn(known)
    ))
    .hint(gap_hint("find out who dropped the slot", known))
}

fn gap_hint(what: &str, known: u64) -> String {
    format!(
        "{what}; then start once with `outbox-relay run --accept-slot-gap` (it creates a missing slot \
         and streams), and send the events committed after {} from the outbox table with \
         `outbox-relay audit` and `outbox-relay replay --fill` (docs/operations.md, \"after an incident\")",
        format_lsn(known)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(timeline: u32, fork: Option<u64>) -> Identity {
        Identity {
            system_id: "7001".into(),
            timeline,
            fork,
        }
    }

    fn bound(lsn: u64, timeline: u32) -> Record {
        Record {
            lsn,
            system_id: Some("7001".into()),
            timeline: Some(timeline),
            ..Record::default()
        }
    }

    fn facts<'a>(cp: &'a Record, srv: &'a Identity, slot: Option<Option<u64>>) -> Facts<'a> {
        Facts {
            checkpoint: cp,
            confirmed: 0,
            server: srv,
            slot_confirmed: slot,
            accept_gap: false,
            slot: "outbox_relay",
            bucket: "outbox_relay",
        }
    }

    #[test]
    fn resumes_at_the_later_of_checkpoint_and_slot() {
        let (cp, srv) = (bound(500, 1), server(1, None));
        assert_eq!(plan(&facts(&cp, &srv, Some(Some(400)))).unwrap().start, 500);
        assert_eq!(plan(&facts(&cp, &srv, Some(Some(500)))).unwrap().start, 500);
        let fresh = Record::default();
        assert_eq!(
            plan(&facts(&fresh, &srv, Some(Some(900)))).unwrap().start,
            900
        );
        assert_eq!(plan(&facts(&fresh, &srv, None)).unwrap().start, 0);
    }

    #[test]
    fn a_slot_after_the_checkpoint_is_a_gap_refused_unless_accepted() {
        let (cp, srv) = (bound(500, 1), server(1, None));
        let err = plan(&facts(&cp, &srv, Some(Some(800)))).unwrap_err();
        assert!(!err.is_transient());
        assert!(
            err.message
                .contains("starts at 0/320, after this relay's checkpoint 0/1F4"),
            "{err}"
        );
        assert!(
            err.hint
                .as_deref()
                .unwrap_or("")
                .contains("--accept-slot-gap")
        );
        let mut f = facts(&cp, &srv, Some(Some(800)));
        f.accept_gap = true;
        let p = plan(&f).unwrap();
        assert_eq!((p.start, p.gap_accepted), (800, true));
        // An older relay confirmed before saving: its bare checkpoint may trail the slot.
        let legacy = Record {
            lsn: 500,
            legacy: true,
            ..Record::default()
        };
        assert_eq!(
            plan(&facts(&legacy, &srv, Some(Some(800)))).unwrap().start,
            800
        );
    }

    #[test]
    fn a_missing_slot_after_delivery_is_refused_unless_accepted() {
        let (cp, srv) = (bound(500, 1), server(1, None));
        let err = plan(&facts(&cp, &srv, None)).unwrap_err();
        assert!(err.message.contains("is missing"), "{err}");
        let mut f = facts(&cp, &srv, None);
        f.accept_gap = true;
        assert_eq!(plan(&f).unwrap().start, 0);
    }

    #[test]
    fn another_cluster_is_refused() {
        let cp = bound(500, 1);
        let other = Identity {
            system_id: "9999".into(),
            timeline: 1,
            fork: None,
        };
        let err = plan(&facts(&cp, &other, Some(Some(100)))).unwrap_err();
        assert!(err.message.contains("cluster 7001"), "{err}");
    }

    #[test]
    fn after_a_promotion_the_checkpoint_comes_back_to_the_fork_point() {
        // The old timeline went on to 900 (delivered); the standby forked at 600.
        let cp = bound(900, 1);
        let srv = server(2, Some(600));
        let p = plan(&facts(&cp, &srv, Some(Some(550)))).unwrap();
        assert_eq!(p.start, 600);
        assert_eq!(p.warnings.len(), 1);
        // A checkpoint before the fork point stands.
        let early = bound(400, 1);
        assert_eq!(
            plan(&facts(&early, &srv, Some(Some(300)))).unwrap().start,
            400
        );
        // Same timeline: nothing to do.
        let srv1 = server(1, None);
        assert_eq!(
            plan(&facts(&cp, &srv1, Some(Some(900)))).unwrap().start,
            900
        );
    }
}
