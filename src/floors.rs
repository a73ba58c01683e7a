//! Where a later session's read-back of each stream may start (pure).
//!
//! The read-back ([`crate::checkpoint::Reconciler`]) must see every message this source
//! stored at a position at or after the checkpoint. Reading a stream back from its end
//! until the first of our messages below the checkpoint is not enough: the server
//! stores messages in the order they arrive, not in position order. The dead letter of
//! a refused message, or a replay that waited for a permission, is stored after
//! messages at later positions, and would end that scan above them: they would be sent
//! again, as duplicates beyond the dedup window.
//!
//! So with each checkpoint `C` the relay saves a *floor* per stream: a stream sequence
//! below which no message at a position at or after `C` can be stored.
//!
//! Why a floor holds (the proof written next to the code that keeps it):
//! - JetStream gives sequences in storage order: once a PubAck with sequence `X` has
//!   arrived, every message published afterwards is stored above `X`.
//! - Within a session messages are published in position order; a dead letter of a
//!   refused message goes out later than its message, never earlier.
//! - So a [`Mark`] taken at one moment, holding the highest position published so far
//!   (`P`) and the highest sequence acknowledged so far per stream (`T`), proves that
//!   every message at a position after `P` is stored above `T`.
//! - For a checkpoint `C`, the newest mark with `P < C` gives floor `T + 1`. The first
//!   mark of a session holds the streams' last sequences read at its start, before it
//!   published anything.
//! - Messages an earlier session stored at positions at or after the resume point were
//!   found by this session's read-back, with their sequences: while `C` has not passed
//!   them, the floor is lowered to the lowest of them.
//!
//! A stream without a floor (learned nowhere) is read back the old way by the next
//! session (see `checkpoint::scan_stream`).

use std::collections::{BTreeMap, VecDeque};

/// The highest sequence acknowledged per stream, updated on every PubAck (a linear
/// search over a handful of names: no allocation on the hot path).
#[derive(Debug, Default, Clone)]
pub struct Tails(Vec<(Box<str>, u64)>);

impl Tails {
    /// A message of `stream` is stored at `seq`.
    pub fn note(&mut self, stream: &str, seq: u64) {
        match self.0.iter_mut().find(|(s, _)| &**s == stream) {
            Some((_, t)) => *t = (*t).max(seq),
            None => self.0.push((stream.into(), seq)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(s, t)| (&**s, *t))
    }
}

/// What was true at one moment of a session.
#[derive(Debug, Clone, PartialEq)]
struct Mark {
    /// Highest commit LSN of a message published before the mark (`None`: nothing yet).
    published: Option<u64>,
    /// Highest sequence known stored per stream before the mark.
    tails: BTreeMap<String, u64>,
}

/// A mark is taken after this many publishes (and at every checkpoint save): the floor
/// lags the checkpoint by at most this many messages plus what was in flight.
pub const MARK_EVERY: u32 = 1024;

#[derive(Debug)]
pub struct Floors {
    /// Oldest first; `marks[0]` qualifies for every checkpoint still to come.
    marks: VecDeque<Mark>,
    /// Messages earlier sessions stored at or after the resume position: the highest
    /// commit LSN among them, and their lowest sequence per stream.
    earlier: Option<(u64, BTreeMap<String, u64>)>,
    published: Option<u64>,
    since_mark: u32,
}

impl Floors {
    /// `tails`: each read-back stream's last sequence, read before anything was
    /// published. `earlier`: the lowest sequence per stream of the messages found by
    /// the read-back at or after the resume position, the highest of whose commit LSNs
    /// is `earlier_max`.
    pub fn new(
        tails: BTreeMap<String, u64>,
        earlier: BTreeMap<String, u64>,
        earlier_max: Option<u64>,
    ) -> Floors {
        Floors {
            marks: VecDeque::from([Mark {
                published: None,
                tails,
            }]),
            earlier: earlier_max.map(|m| (m, earlier)),
            published: None,
            since_mark: 0,
        }
    }

    /// A message at `commit_lsn` is about to be published. True when a mark is due
    /// ([`Floors::mark`]).
    pub fn publishing(&mut self, commit_lsn: u64) -> bool {
        self.published = self.published.max(Some(commit_lsn));
        self.since_mark += 1;
        self.since_mark >= MARK_EVERY
    }

    /// A stream this session had not published to, with its last sequence before the
    /// first publish: nothing of this session is below it, so every mark gets it.
    pub fn learn(&mut self, stream: &str, tail: u64) {
        for m in &mut self.marks {
            m.tails.entry(stream.to_string()).or_insert(tail);
        }
    }

    /// Remember now: what is published so far, and `acked`, the highest sequences
    /// acknowledged so far.
    pub fn mark(&mut self, acked: &Tails) {
        self.since_mark = 0;
        let Some(last) = self.marks.back() else {
            return;
        };
        let mut tails = last.tails.clone();
        for (s, t) in acked.iter() {
            let e = tails.entry(s.to_string()).or_insert(t);
            *e = (*e).max(t);
        }
        // Same published position: the newer mark is as valid and tighter. The first
        // mark stays: it is the one that qualifies for every checkpoint.
        if self.marks.len() > 1 && last.published == self.published {
            self.marks.pop_back();
        }
        self.marks.push_back(Mark {
            published: self.published,
            tails,
        });
    }

    /// The floors to save with checkpoint `c` (a commit end LSN; checkpoints only move
    /// forward within a session). Streams without a known floor are left out.
    pub fn for_checkpoint(&mut self, c: u64) -> BTreeMap<String, u64> {
        // Every message at a position at or after `c` was published after a mark
        // whose published position is below `c`: the newest such mark is the tightest.
        while self.marks.len() > 1 && self.marks[1].published < Some(c) {
            self.marks.pop_front();
        }
        let mut floors: BTreeMap<String, u64> = match self.marks.front() {
            Some(m) if m.published < Some(c) => m
                .tails
                .iter()
                .map(|(s, t)| (s.clone(), t.saturating_add(1)))
                .collect(),
            _ => return BTreeMap::new(),
        };
        match &self.earlier {
            Some((max, lowest)) if c <= *max => {
                for (s, seq) in lowest {
                    let f = floors.entry(s.clone()).or_insert(*seq);
                    *f = (*f).min(*seq);
                }
            }
            _ => self.earlier = None,
        }
        floors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(v: &[(&str, u64)]) -> BTreeMap<String, u64> {
        v.iter().map(|(s, t)| (s.to_string(), *t)).collect()
    }

    #[test]
    fn floor_is_the_tail_before_the_first_message_at_or_after_the_checkpoint() {
        let mut f = Floors::new(map(&[("S", 10)]), BTreeMap::new(), None);
        let mut acked = Tails::default();
        f.publishing(100); // stored at 11
        f.publishing(200); // stored at 12
        acked.note("S", 11);
        f.mark(&acked); // published 200, tail 11
        f.publishing(300); // stored at 13
        acked.note("S", 13);
        f.mark(&acked); // published 300, tail 13
        // Checkpoint 150: (200) may be in flight: read from 11 on.
        assert_eq!(f.for_checkpoint(150), map(&[("S", 11)]));
        // Checkpoint 250: only (300) and later matter; it was published after mark 1.
        assert_eq!(f.for_checkpoint(250), map(&[("S", 12)]));
        assert_eq!(f.for_checkpoint(400), map(&[("S", 14)]));
    }

    /// A mark taken after a message of the checkpoint's own position was published
    /// does not bound it: only marks strictly below the checkpoint count.
    #[test]
    fn a_mark_at_the_checkpoints_position_does_not_count() {
        let mut f = Floors::new(map(&[("S", 0)]), BTreeMap::new(), None);
        let mut acked = Tails::default();
        f.publishing(5);
        acked.note("S", 1);
        f.mark(&acked);
        assert_eq!(f.for_checkpoint(5), map(&[("S", 1)]));
        assert_eq!(f.for_checkpoint(6), map(&[("S", 2)]));
    }

    #[test]
    fn earlier_sessions_messages_lower_the_floor_until_passed() {
        let mut f = Floors::new(map(&[("S", 50)]), map(&[("S", 20), ("DLQ", 3)]), Some(500));
        assert_eq!(f.for_checkpoint(400), map(&[("S", 20), ("DLQ", 3)]));
        assert_eq!(f.for_checkpoint(501), map(&[("S", 51)]));
        assert_eq!(
            f.for_checkpoint(600),
            map(&[("S", 51)]),
            "passed: forgotten"
        );
    }

    #[test]
    fn a_stream_learned_later_is_in_every_mark() {
        let mut f = Floors::new(map(&[("S", 1)]), BTreeMap::new(), None);
        f.publishing(10);
        f.mark(&Tails::default());
        f.learn("NEW", 7);
        assert_eq!(f.for_checkpoint(5), map(&[("S", 2), ("NEW", 8)]));
    }

    #[test]
    fn marks_stay_few_while_nothing_is_published() {
        let mut f = Floors::new(BTreeMap::new(), BTreeMap::new(), None);
        f.publishing(10);
        for i in 0..1000 {
            let mut t = Tails::default();
            t.note("S", i);
            f.mark(&t);
        }
        assert_eq!(f.marks.len(), 2);
    }

    proptest! {
        /// A session publishes messages in position order to a few streams; the server
        /// stores each (and, for some, a dead letter later) in arrival order, and PubAcks
        /// arrive some time after. Whatever the timing, no message at or after the
        /// checkpoint is stored below the floor saved with it.
        #[test]
        fn no_message_at_or_after_the_checkpoint_is_below_its_floor(
            steps in proptest::collection::vec((0u8..6, 0usize..3), 1..300),
        ) {
            let names = ["A", "B", "DLQ"];
            let mut seq = [5u64, 0, 9];
            let mut f = Floors::new(map(&[("A", 5), ("B", 0), ("DLQ", 9)]), BTreeMap::new(), None);
            let mut acked = Tails::default();
            let mut stored: Vec<(u64, usize, u64)> = Vec::new(); // (commit lsn, stream, seq)
            let mut unacked: VecDeque<(usize, u64)> = VecDeque::new();
            let mut late_dlq: VecDeque<u64> = VecDeque::new();
            let mut lsn = 0u64;
            let mut checkpoint = 0u64;
            for (op, s) in steps {
                match op {
                    0 | 1 => {
                        lsn += s as u64; // 0: another message of the same transaction
                        if f.publishing(lsn) { f.mark(&acked); }
                        seq[s] += 1;
                        stored.push((lsn, s, seq[s]));
                        unacked.push_back((s, seq[s]));
                        if op == 1 { late_dlq.push_back(lsn); }
                    }
                    2 => if let Some((s, q)) = unacked.pop_front() { acked.note(names[s], q); },
                    3 => if let Some(at) = late_dlq.pop_front() {
                        seq[2] += 1;
                        stored.push((at, 2, seq[2]));
                        unacked.push_back((2, seq[2]));
                    },
                    4 => f.mark(&acked),
                    _ => {
                        // A checkpoint somewhere at or below what is published.
                        checkpoint = checkpoint.max(lsn.saturating_sub(s as u64));
                        let floors = f.for_checkpoint(checkpoint);
                        for (at, st, q) in &stored {
                            if *at >= checkpoint {
                                let fl = floors.get(names[*st]).copied().unwrap_or(0);
                                prop_assert!(*q >= fl, "{} seq {} at {} below floor {} (c {})", names[*st], q, at, fl, checkpoint);
                            }
                        }
                    }
                }
            }
        }
    }
}
