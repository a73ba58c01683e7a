//! In-order acknowledgement tracker: which WAL position is safe to confirm.
//!
//! Modelled on vector's `OrderedFinalizer`: entries are pushed in the order they were
//! read from the WAL (each published message, then a commit marker per transaction).
//! Acks may arrive in any order. The safe position is the end LSN of the last commit
//! marker such that it and everything before it is done.
//!
//! Architecture invariant: the slot's confirmed position (and the checkpoint) only ever
//! comes from [`Tracker::take_safe`]. Nothing else may raise it while messages are in
//! flight or a transaction is open, or a crash would lose the events behind it.

use std::collections::VecDeque;

/// A published message's ticket; acknowledge it with [`Tracker::ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Message { done: bool },
    Commit { end_lsn: u64 },
}

#[derive(Debug, Default)]
pub struct Tracker {
    /// Ticket number of `entries[0]`.
    base: u64,
    entries: VecDeque<Entry>,
    /// Messages pushed and not yet acked.
    pending: usize,
    /// Highest commit end LSN whose transaction and all before it are done.
    safe: Option<u64>,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a message about to be published.
    pub fn push_message(&mut self) -> Ticket {
        let t = Ticket(self.base + self.entries.len() as u64);
        self.entries.push_back(Entry::Message { done: false });
        self.pending += 1;
        t
    }

    /// Record the end of a transaction: everything pushed before belongs to it or to
    /// earlier ones.
    pub fn push_commit(&mut self, end_lsn: u64) {
        self.entries.push_back(Entry::Commit { end_lsn });
        self.drain();
    }

    /// Mark a message as delivered (PubAck received, or dead-lettered with an ack).
    /// Unknown or repeated tickets are ignored.
    pub fn ack(&mut self, t: Ticket) {
        let Some(i) = t.0.checked_sub(self.base) else {
            return;
        };
        if let Some(Entry::Message { done }) = usize::try_from(i)
            .ok()
            .and_then(|i| self.entries.get_mut(i))
            && !*done
        {
            *done = true;
            self.pending -= 1;
            self.drain();
        }
    }

    fn drain(&mut self) {
        while let Some(front) = self.entries.front() {
            match *front {
                Entry::Message { done: false } => break,
                Entry::Message { done: true } => {}
                Entry::Commit { end_lsn } => {
                    self.safe = Some(self.safe.map_or(end_lsn, |s| s.max(end_lsn)));
                }
            }
            self.entries.pop_front();
            self.base += 1;
        }
    }

    /// The safe position, if it moved since the last call.
    pub fn take_safe(&mut self) -> Option<u64> {
        self.safe.take()
    }

    /// Messages published and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.pending
    }

    /// No message in flight and no transaction partly published: acknowledging a
    /// keepalive's `wal_end` cannot skip anything.
    pub fn is_idle(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commit_waits_for_its_messages() {
        let mut t = Tracker::new();
        let a = t.push_message();
        let b = t.push_message();
        t.push_commit(100);
        assert_eq!(t.take_safe(), None);
        t.ack(b);
        assert_eq!(t.take_safe(), None);
        t.ack(a);
        assert_eq!(t.take_safe(), Some(100));
        assert!(t.is_idle());
    }

    #[test]
    fn later_transaction_waits_for_earlier() {
        let mut t = Tracker::new();
        let a = t.push_message();
        t.push_commit(100);
        let b = t.push_message();
        t.push_commit(200);
        t.ack(b);
        assert_eq!(t.take_safe(), None);
        t.ack(a);
        assert_eq!(t.take_safe(), Some(200));
    }

    #[test]
    fn empty_transactions_advance_at_once() {
        let mut t = Tracker::new();
        t.push_commit(50);
        assert_eq!(t.take_safe(), Some(50));
        assert_eq!(t.take_safe(), None);
    }

    #[test]
    fn open_transaction_is_not_idle() {
        let mut t = Tracker::new();
        let a = t.push_message();
        t.ack(a);
        assert!(
            t.is_idle(),
            "acked messages of an open tx leave nothing to wait for"
        );
        assert_eq!(t.take_safe(), None, "but the open tx has no commit yet");
        let _b = t.push_message();
        assert!(!t.is_idle());
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn repeated_and_unknown_acks_are_ignored() {
        let mut t = Tracker::new();
        let a = t.push_message();
        t.ack(a);
        t.ack(a);
        t.ack(Ticket(999));
        t.push_commit(10);
        assert_eq!(t.take_safe(), Some(10));
        assert_eq!(t.in_flight(), 0);
    }

    proptest! {
        /// Whatever order acks arrive in, the safe position is always the end of a
        /// transaction all of whose messages (and all earlier ones) are acked.
        #[test]
        fn safe_position_never_passes_an_unacked_message(
            sizes in proptest::collection::vec(0usize..5, 1..20),
            seed in any::<u64>(),
        ) {
            let mut t = Tracker::new();
            let mut tickets = Vec::new(); // (ticket, tx index)
            for (tx, n) in sizes.iter().enumerate() {
                for _ in 0..*n { tickets.push((t.push_message(), tx)); }
                t.push_commit((tx as u64 + 1) * 10);
            }
            // Deterministic shuffle.
            let mut order: Vec<usize> = (0..tickets.len()).collect();
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut acked = vec![false; tickets.len()];
            let mut last_safe = 0u64;
            // Empty transactions at the start are safe before any ack.
            if let Some(s) = t.take_safe() { last_safe = s; }
            for i in order {
                t.ack(tickets[i].0);
                acked[i] = true;
                if let Some(s) = t.take_safe() {
                    prop_assert!(s > last_safe);
                    last_safe = s;
                }
                let safe_tx = (last_safe / 10) as usize; // transactions 0..safe_tx are confirmed
                for (j, (_, tx)) in tickets.iter().enumerate() {
                    if *tx < safe_tx { prop_assert!(acked[j]); }
                }
            }
            prop_assert_eq!(last_safe, sizes.len() as u64 * 10);
            prop_assert!(t.is_idle());
        }
    }
}
