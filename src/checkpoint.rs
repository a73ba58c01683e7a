//! Exactly-once resume: the persisted position and stream-tail reconciliation.
//!
//! Why both, and why in NATS:
//! - The slot's `confirmed_flush_lsn` is not enough. PostgreSQL persists it only at
//!   checkpoints, so after a PostgreSQL crash it can move backwards; and the relay may be
//!   SIGKILLed after JetStream stored messages but before it confirmed them. Either way
//!   PostgreSQL re-sends transactions whose messages are already in the streams.
//! - `Nats-Msg-Id` drops those copies only inside each stream's `duplicate_window`
//!   (2 minutes by default). A relay down for longer would publish duplicates.
//!
//! So the relay (1) keeps the last fully acknowledged commit position in a JetStream KV
//! bucket — next to the data it describes, replicated and persisted like the streams, so
//! it cannot be ahead of or behind them by a lost database write — and resumes from the
//! later of it and the slot; and (2) at every session start reads, from each stream, the
//! last message this source published (`Outbox-Origin`) and its position
//! (`Outbox-Commit-Lsn`, `Outbox-Tx-Index`). A replayed message whose position is at or
//! below its stream's mark is already stored: it is skipped, whatever the dedup window.
//!
//! Architecture invariant: messages of one source reach one stream in position order
//! (the pipeline never reorders within a stream, and a NATS connection never resumes
//! after a disconnect: see [`crate::sink::connect`]), so "at or below the last stored
//! position" means "stored".

use std::collections::HashMap;
use std::str::FromStr;

use async_nats::jetstream::{self, kv};

use bytes::Bytes;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::route::Position;
use crate::route::headers;

/// How many messages of other publishers to look past, from a stream's end, for this
/// source's last message. Messages a schedule generated from this source's definitions
/// and deleted sequence numbers (the definitions themselves, once fired) do not count:
/// they pile up at the end while the relay is down, when reconciliation matters most.
const SCAN_BACK: u64 = 512;

/// Upper bound on the reads of one stream's scan, whatever they find.
const MAX_SCAN_READS: u64 = 65_536;

/// The persisted position in a KV bucket.
pub struct Checkpoint {
    store: kv::Store,
    key: String,
    saved: u64,
}

impl Checkpoint {
    /// Open (creating if needed) the bucket and read the saved position.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        origin: &str,
        replicas: usize,
    ) -> Result<Checkpoint> {
        let store = match js.get_key_value(bucket).await {
            Ok(s) => s,
            Err(_) => {
                // Created as a plain stream with the KV conventions (what
                // `create_key_value` does), because that call first queries account
                // info, which async-nats cannot parse from nats-server 2.9.
                js.create_stream(jetstream::stream::Config {
                    name: format!("KV_{bucket}"),
                    description: Some("outbox-relay positions (one key per database/slot)".into()),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 1,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas.max(1),
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: jetstream::stream::DiscardPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    Error::transient(format!("create checkpoint bucket {bucket}: {e}"))
                        .hint("check that JetStream has room for a small KV bucket, or create it: nats kv add <bucket>")
                })?;
                js.get_key_value(bucket).await.map_err(|e| {
                    Error::transient(format!("open checkpoint bucket {bucket}: {e}"))
                })?
            }
        };
        let key = key_for(origin);
        let saved = match store.get(&key).await {
            Ok(Some(v)) => parse(&v).ok_or_else(|| {
                Error::fatal(format!(
                    "checkpoint {bucket}/{key} holds {:?}, not a position",
                    String::from_utf8_lossy(&v)
                ))
                .hint("delete the key (nats kv del) to resume from the slot alone")
            })?,
            Ok(None) => 0,
            Err(e) => {
                return Err(Error::transient(format!(
                    "read checkpoint {bucket}/{key}: {e}"
                )));
            }
        };
        Ok(Checkpoint { store, key, saved })
    }

    /// Read the saved position without creating anything (for `status`).
    pub async fn peek(js: &jetstream::Context, bucket: &str, origin: &str) -> Result<Option<u64>> {
        let Ok(store) = js.get_key_value(bucket).await else {
            return Ok(None);
        };
        match store.get(key_for(origin)).await {
            Ok(v) => Ok(v.as_deref().and_then(parse)),
            Err(e) => Err(Error::transient(format!("read checkpoint: {e}"))),
        }
    }

    /// The position persisted last; 0 when none.
    pub fn saved(&self) -> u64 {
        self.saved
    }

    /// Persist `lsn` if it is newer.
    pub async fn save(&mut self, lsn: u64) -> Result<()> {
        if lsn <= self.saved {
            return Ok(());
        }
        let value = Bytes::from(crate::route::format_lsn(lsn));
        self.store
            .put(&self.key, value)
            .await
            .map_err(|e| Error::transient(format!("save checkpoint: {e}")))?;
        self.saved = lsn;
        Ok(())
    }
}

/// KV keys allow `[-/_=.a-zA-Z0-9]`.
fn key_for(origin: &str) -> String {
    format!("position.{}", origin_token(origin))
}

/// `origin` (`<database>/<slot>`) as one subject token and KV key part: characters
/// outside `[A-Za-z0-9_-]` become `_`.
pub fn origin_token(origin: &str) -> String {
    origin
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `X/X` hex, PostgreSQL's LSN text form.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some((hi << 32) | lo)
}

fn parse(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok().and_then(parse_lsn)
}

/// Per-stream high-water marks of this source, and a subject → stream cache.
#[derive(Debug, Default)]
pub struct Reconciler {
    marks: HashMap<String, Position>,
    /// The highest mark: positions above it need no lookup at all.
    max: Option<Position>,
}

impl Reconciler {
    /// Read the last message of `origin` from every stream (KV and object-store streams
    /// excluded).
    pub async fn load(js: &jetstream::Context, origin: &str) -> Result<Reconciler> {
        let mut r = Reconciler::default();
        let mut names = js.stream_names();
        let mut all = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| Error::transient(format!("list streams: {e}")))?;
            if !name.starts_with("KV_") && !name.starts_with("OBJ_") {
                all.push(name);
            }
        }
        for name in all {
            if let Some(pos) = last_position(js, &name, origin).await? {
                r.marks.insert(name, pos);
                r.max = r.max.max(Some(pos));
            }
        }
        Ok(r)
    }

    /// Built from known marks (tests).
    pub fn from_marks(marks: impl IntoIterator<Item = (String, Position)>) -> Reconciler {
        let mut r = Reconciler::default();
        for (s, p) in marks {
            r.max = r.max.max(Some(p));
            r.marks.insert(s, p);
        }
        r
    }

    pub fn marks(&self) -> &HashMap<String, Position> {
        &self.marks
    }

    /// Whether any message at `pos` could already be stored (cheap pre-check).
    pub fn may_skip(&self, pos: Position) -> bool {
        self.max.is_some_and(|m| pos <= m)
    }

    /// Is the message at `pos`, bound for `stream`, already stored there?
    pub fn already_stored(&self, stream: Option<&str>, pos: Position) -> bool {
        self.may_skip(pos)
            && stream
                .and_then(|s| self.marks.get(s))
                .is_some_and(|mark| pos <= *mark)
    }

    /// Forget everything once the replay zone is passed (saves the lookups and memory).
    pub fn passed(&mut self, pos: Position) {
        if !self.may_skip(pos) && self.max.is_some() {
            self.max = None;
            self.marks.clear();
        }
    }
}

/// The position of the last message in `stream` published by `origin`.
async fn last_position(
    js: &jetstream::Context,
    stream: &str,
    origin: &str,
) -> Result<Option<Position>> {
    let mut s = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(e) => return Err(Error::transient(format!("stream {stream}: {e}"))),
    };
    let info = s
        .info()
        .await
        .map_err(|e| Error::transient(format!("stream {stream}: {e}")))?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    if info.state.messages == 0 {
        return Ok(None);
    }
    let mut tail = TailMark::default();
    let (mut foreign, mut reads) = (0u64, 0u64);
    let mut seq = last;
    while seq >= first.max(1) && foreign < SCAN_BACK && reads < MAX_SCAN_READS {
        reads += 1;
        match s.get_raw_message(seq).await {
            Ok(m) => {
                let h = &m.headers;
                let ours = h.get(headers::ORIGIN).is_some_and(|v| v.as_str() == origin);
                if ours
                    && let (Some(lsn), Some(idx)) =
                        (h.get(headers::COMMIT_LSN), h.get(headers::TX_INDEX))
                    && let (Some(commit_lsn), Ok(index)) =
                        (parse_lsn(lsn.as_str()), u32::from_str(idx.as_str()))
                {
                    let generated = h.get(async_nats::header::NATS_SCHEDULER).is_some();
                    if let Some(mark) = tail.see(Position { commit_lsn, index }, generated) {
                        return Ok(Some(mark));
                    }
                } else {
                    foreign += 1;
                }
            }
            // Deleted or purged message (a fired schedule definition leaves one):
            // keep looking further back.
            Err(e)
                if e.to_string().contains("not found") || e.to_string().contains("no message") => {}
            Err(e) => {
                return Err(Error::transient(format!(
                    "read stream {stream} seq {seq}: {e}"
                )));
            }
        }
        if seq == 0 {
            break;
        }
        seq -= 1;
    }
    Ok(tail.end())
}

/// This source's mark in one stream, from its messages seen newest first.
///
/// A message a schedule generated (`Nats-Scheduler`, see [`crate::sink::schedule`]) was
/// appended when it fired, after messages the relay published later: its position is
/// out of the stream's order, so it cannot end the scan. But its definition (deleted on
/// firing) was stored in order, so the generated message is evidence that its position
/// is stored. The mark is the newest message the relay published itself, raised by the
/// generated messages after it.
#[derive(Debug, Default)]
struct TailMark {
    generated: Option<Position>,
}

impl TailMark {
    /// See the next older message; the mark once it is known.
    fn see(&mut self, pos: Position, generated: bool) -> Option<Position> {
        if generated {
            self.generated = self.generated.max(Some(pos));
            None
        } else {
            Some(pos.max(self.generated.unwrap_or(pos)))
        }
    }

    /// The scan ended without a message published by the relay itself.
    fn end(self) -> Option<Position> {
        self.generated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trip() {
        for v in [0u64, 1, 0x16B_3748, 0x1_0000_0010, u64::MAX] {
            assert_eq!(parse_lsn(&crate::route::format_lsn(v)), Some(v));
        }
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("x"), None);
        assert_eq!(parse_lsn("1/"), None);
        assert_eq!(parse_lsn("100000000/0"), None);
    }

    #[test]
    fn keys_are_valid() {
        assert_eq!(key_for("app/outbox_relay"), "position.app_outbox_relay");
        assert_eq!(key_for("my db/s"), "position.my_db_s");
    }

    #[test]
    fn skip_only_at_or_below_mark() {
        let p = |commit_lsn, index| Position { commit_lsn, index };
        let mut r = Reconciler::from_marks([("A".to_string(), p(100, 3))]);
        assert!(r.may_skip(p(100, 3)));
        assert!(r.may_skip(p(50, 9)));
        assert!(!r.may_skip(p(100, 4)));
        assert!(!r.may_skip(p(101, 0)));
        assert!(r.already_stored(Some("A"), p(100, 3)));
        assert!(!r.already_stored(Some("B"), p(100, 3)));
        assert!(!r.already_stored(None, p(1, 0)));
        r.passed(p(100, 2));
        assert!(r.may_skip(p(100, 3)), "still inside the replay zone");
        r.passed(p(101, 0));
        assert!(!r.may_skip(p(1, 0)), "past the zone, nothing is skipped");
    }

    /// Newest first: `(position, generated by a schedule)`.
    fn mark_of(tail: &[((u64, u32), bool)]) -> Option<Position> {
        let mut m = TailMark::default();
        for &((commit_lsn, index), generated) in tail {
            if let Some(mark) = m.see(Position { commit_lsn, index }, generated) {
                return Some(mark);
            }
        }
        m.end()
    }

    #[test]
    fn scheduled_messages_raise_the_mark_but_never_end_the_scan() {
        let p = |commit_lsn, index| Some(Position { commit_lsn, index });
        // Plain stream: the newest message.
        assert_eq!(mark_of(&[((20, 0), false), ((19, 0), false)]), p(20, 0));
        // A delayed event (10) fired after 11..20 were stored: 20 stays the mark.
        assert_eq!(mark_of(&[((10, 0), true), ((20, 0), false)]), p(20, 0));
        // The newest publish was a definition that has fired (deleted): its generated
        // message is the evidence.
        assert_eq!(mark_of(&[((30, 1), true), ((30, 0), false)]), p(30, 1));
        assert_eq!(
            mark_of(&[((5, 0), true), ((30, 1), true), ((30, 0), false)]),
            p(30, 1)
        );
        // Only generated messages within reach.
        assert_eq!(mark_of(&[((7, 0), true), ((9, 0), true)]), p(9, 0));
        assert_eq!(mark_of(&[]), None);
    }
}
