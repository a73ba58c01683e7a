//! Exactly-once resume: the persisted position and the proof of what is stored.
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
//! bucket ([`Checkpoint`]) — next to the data it describes, replicated and persisted
//! like the streams — bound to the PostgreSQL cluster (system identifier) and timeline
//! it was read on, with the names of every stream it ever published to and, per stream,
//! the sequence below which nothing at or after the position is stored (its *floor*,
//! see [`crate::floors`]); and (2) at every session start reads those streams back from
//! their end down to the floor ([`Reconciler`]), collecting the exact messages
//! (position *and* `Nats-Msg-Id`) this source stored there after it.
//!
//! Architecture invariant (the proof behind every skip): a replayed message is treated
//! as already stored only when a message with its position and its `Nats-Msg-Id`, from
//! this origin, was read back from a stream (the target, the dead-letter stream, or a
//! schedule's generated message). Nothing is inferred from a later message: the server
//! may have stored message N+1 after refusing message N.
//!
//! Second invariant (what makes a recreated slot visible): PostgreSQL is told a position
//! only after the checkpoint holding it was saved (see `app`), so a slot this relay
//! advanced never stands after the checkpoint. A slot that does was created or moved by
//! someone else after the relay stopped: everything committed in between was never read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use async_nats::jetstream::{self, kv};

use bytes::Bytes;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::route::Position;
use crate::route::headers;

/// Upper bound on the reads of one stream's scan. Messages of other publishers, deleted
/// sequence numbers (fired schedule definitions) and this source's messages above the
/// resume position all count. Beyond it nothing more is proven: replays not found are
/// published again (a possible duplicate beyond the dedup window, never a loss).
const MAX_SCAN_READS: u64 = 262_144;

/// Reads in flight while scanning a stream back (direct gets are independent requests).
const SCAN_CONCURRENCY: usize = 64;

/// Reads per step of the scan (fetched concurrently, examined newest first).
const SCAN_CHUNK: u64 = 512;

/// What the checkpoint key holds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Commit end LSN up to which everything is delivered (`X/X` text in the key).
    #[serde(with = "lsn_text")]
    pub lsn: u64,
    /// `IDENTIFY_SYSTEM`'s system identifier of the cluster the position belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    /// The timeline the position was read on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Every stream this source published to: the streams reconciliation reads.
    #[serde(default)]
    pub streams: BTreeSet<String>,
    /// Per stream, the lowest sequence a message at or after `lsn` can be stored at
    /// ([`crate::floors`]): the read-back reads down to it. A stream missing here is
    /// read back the older way (down to the first of our messages before `lsn`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub floors: BTreeMap<String, u64>,
    /// The `{partition:N}` count of `routing.subject` the last session published with:
    /// a change moves aggregates to other partitions, which `check` and `run` say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Written by a relay before positions were bound to a server (a bare `X/X`): no
    /// stream list, and the slot may legitimately stand after it.
    #[serde(skip)]
    pub legacy: bool,
}

mod lsn_text {
    pub fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::route::format_lsn(*v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        super::parse_lsn(&text).ok_or_else(|| serde::de::Error::custom("not an LSN"))
    }
}

impl Record {
    /// The key's value: JSON, or the bare `X/X` an older relay wrote.
    pub fn parse(v: &[u8]) -> Option<Record> {
        if let Ok(r) = serde_json::from_slice::<Record>(v) {
            return Some(r);
        }
        let lsn = std::str::from_utf8(v).ok().and_then(parse_lsn)?;
        Some(Record {
            lsn,
            legacy: true,
            ..Record::default()
        })
    }

    fn encode(&self) -> Result<Bytes> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| Error::fatal(format!("encode checkpoint: {e}")))
    }
}

/// The persisted position in a KV bucket.
pub struct Checkpoint {
    store: kv::Store,
    key: String,
    record: Record,
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
        let record = match store.get(&key).await {
            Ok(Some(v)) => Record::parse(&v).ok_or_else(|| {
                Error::fatal(format!(
                    "checkpoint {bucket}/{key} holds {:?}, not a position",
                    String::from_utf8_lossy(&v)
                ))
                .hint("delete the key (nats kv del) to resume from the slot alone")
            })?,
            Ok(None) => Record::default(),
            Err(e) => {
                return Err(Error::transient(format!(
                    "read checkpoint {bucket}/{key}: {e}"
                )));
            }
        };
        Ok(Checkpoint { store, key, record })
    }

    /// Read the saved record without creating anything (for `status`, `check` and
    /// `migrate`).
    pub async fn peek(
        js: &jetstream::Context,
        bucket: &str,
        origin: &str,
    ) -> Result<Option<Record>> {
        let Ok(store) = js.get_key_value(bucket).await else {
            return Ok(None);
        };
        match store.get(key_for(origin)).await {
            Ok(v) => Ok(v.as_deref().and_then(Record::parse)),
            Err(e) => Err(Error::transient(format!("read checkpoint: {e}"))),
        }
    }

    /// The position persisted last; 0 when none.
    pub fn saved(&self) -> u64 {
        self.record.lsn
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// From now on the position belongs to this cluster and timeline; `lsn` replaces
    /// the saved position (it may go back: a fork point after a promotion, or a slot
    /// gap the operator accepted). Persisted at once.
    pub async fn rebind(&mut self, system_id: &str, timeline: u32, lsn: u64) -> Result<()> {
        let mut next = self.record.clone();
        next.system_id = Some(system_id.to_string());
        next.timeline = Some(timeline);
        if lsn < next.lsn {
            // The floors bound messages at or after the old position only.
            next.floors.clear();
        }
        next.lsn = lsn;
        next.legacy = false;
        self.write(next).await
    }

    /// Remember the partition count this session publishes with; the one saved before
    /// (`None`: none, or an older relay), when it differs.
    pub async fn note_partitions(&mut self, n: Option<u32>) -> Result<Option<Option<u32>>> {
        if self.record.partitions == n {
            return Ok(None);
        }
        let before = self.record.partitions;
        let mut next = self.record.clone();
        next.partitions = n;
        self.write(next).await?;
        Ok(Some(before))
    }

    /// Is `stream` among the streams this source published to?
    pub fn knows(&self, stream: &str) -> bool {
        self.record.streams.contains(stream)
    }

    /// Add `stream` to the persisted list before anything is published to it, so a
    /// later session reads it back.
    pub async fn note_stream(&mut self, stream: &str) -> Result<()> {
        if self.knows(stream) {
            return Ok(());
        }
        let mut next = self.record.clone();
        next.streams.insert(stream.to_string());
        self.write(next).await
    }

    /// Persist `lsn` with its `floors` ([`crate::floors::Floors::for_checkpoint`]) if it
    /// is newer.
    pub async fn save(&mut self, lsn: u64, floors: BTreeMap<String, u64>) -> Result<()> {
        if lsn <= self.record.lsn {
            return Ok(());
        }
        let mut next = self.record.clone();
        next.lsn = lsn;
        next.floors = floors;
        self.write(next).await
    }

    async fn write(&mut self, next: Record) -> Result<()> {
        self.store
            .put(&self.key, next.encode()?)
            .await
            .map_err(|e| Error::transient(format!("save checkpoint: {e}")))?;
        self.record = next;
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

/// The messages this source stored after the resume position, read back from the
/// streams: the proof behind every skipped replay.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// Position → the `Nats-Msg-Id` stored there (`None`: a schedule's generated
    /// message without one).
    stored: HashMap<Position, Option<Box<str>>>,
    /// The highest position found: positions above it need no lookup at all.
    max: Option<Position>,
    /// Each stream's last sequence when it was read back (0: empty or missing).
    tails: BTreeMap<String, u64>,
    /// Each stream's lowest sequence holding one of the messages found.
    lowest: BTreeMap<String, u64>,
}

impl Reconciler {
    /// Read `streams` back from their end to `resume` (a commit end LSN: messages of
    /// transactions that end after it may have been stored by an earlier session).
    /// A stream that does not exist holds nothing; one that cannot be read is an error,
    /// because a replay into it could not be proven.
    /// `floors` are the checkpoint's ([`Record::floors`]), valid for `resume`.
    pub async fn load(
        js: &jetstream::Context,
        streams: impl IntoIterator<Item = String>,
        origin: &str,
        resume: u64,
        floors: &BTreeMap<String, u64>,
    ) -> Result<Reconciler> {
        let mut r = Reconciler::default();
        for name in streams {
            let floor = floors.get(&name).copied();
            scan_stream(js, &name, origin, resume, floor, &mut r).await?;
        }
        Ok(r)
    }

    /// The floors of this session's first checkpoints: what the read-back saw.
    pub fn floors(&self) -> crate::floors::Floors {
        crate::floors::Floors::new(
            self.tails.clone(),
            self.lowest.clone(),
            self.max.map(|p| p.commit_lsn),
        )
    }

    /// Built from known messages (tests).
    pub fn from_stored(stored: impl IntoIterator<Item = (Position, &'static str)>) -> Reconciler {
        let mut r = Reconciler::default();
        for (p, id) in stored {
            r.insert(p, Some(id.into()));
        }
        r
    }

    fn insert(&mut self, pos: Position, id: Option<Box<str>>) {
        self.max = self.max.max(Some(pos));
        // A generated message without an id never replaces the definition's id.
        let entry = self.stored.entry(pos).or_insert(None);
        if id.is_some() {
            *entry = id;
        }
    }

    /// How many stored messages of the replay zone were found.
    pub fn len(&self) -> usize {
        self.stored.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stored.is_empty()
    }

    /// Whether any message at `pos` could already be stored (cheap pre-check).
    pub fn may_skip(&self, pos: Position) -> bool {
        self.max.is_some_and(|m| pos <= m)
    }

    /// Is `env` already stored? Past the replay zone this is one comparison (no header
    /// lookup, no hashing): the hot path once a session has caught up.
    pub fn proves_stored(&self, env: &crate::route::Envelope) -> bool {
        self.may_skip(env.pos)
            && self.already_stored(
                env.pos,
                env.headers.get(headers::MSG_ID).map(|v| v.as_str()),
            )
    }

    /// Is this exact message (position and `Nats-Msg-Id`) already stored? Proof, not
    /// inference: only a message read back at this position with this id counts.
    pub fn already_stored(&self, pos: Position, msg_id: Option<&str>) -> bool {
        if !self.may_skip(pos) {
            return false;
        }
        match (self.stored.get(&pos), msg_id) {
            (Some(Some(stored)), Some(id)) => **stored == *id,
            // A schedule's generated message at this position, which carries no id of
            // its own: its definition was published from this position by this origin.
            (Some(None), _) => true,
            _ => false,
        }
    }

    /// Forget everything once the replay zone is passed (saves the lookups and memory).
    pub fn passed(&mut self, pos: Position) {
        if !self.may_skip(pos) && self.max.is_some() {
            self.max = None;
            self.stored = HashMap::new();
        }
    }
}

/// This source's position in a message's headers, and whether a schedule generated it.
fn own_position(h: &async_nats::HeaderMap, origin: &str) -> Option<(Position, bool)> {
    if h.get(headers::ORIGIN).is_none_or(|v| v.as_str() != origin) {
        return None;
    }
    let commit_lsn = parse_lsn(h.get(headers::COMMIT_LSN)?.as_str())?;
    let index = u32::from_str(h.get(headers::TX_INDEX)?.as_str()).ok()?;
    let generated = h.get(async_nats::header::NATS_SCHEDULER).is_some();
    Some((Position { commit_lsn, index }, generated))
}

/// Scan `stream` from its end down to `floor`: every message of `origin` at or after
/// `resume` goes into `r`. Without a floor (a checkpoint of an older relay, or one moved
/// back by a promotion) the scan ends at the first message before `resume` that the
/// relay published itself (a schedule's generated message is appended when it fires,
/// out of position order, so it never ends the scan); that misses messages stored out
/// of position order above it, which are then sent again: duplicates beyond the dedup
/// window, never a loss.
async fn scan_stream(
    js: &jetstream::Context,
    name: &str,
    origin: &str,
    resume: u64,
    floor: Option<u64>,
    r: &mut Reconciler,
) -> Result<()> {
    use jetstream::context::GetStreamErrorKind;
    let mut s = match js.get_stream(name).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            r.tails.insert(name.to_string(), 0);
            return Ok(());
        }
        Err(e) => return Err(unreadable(name, &e.to_string())),
    };
    let info = s
        .info()
        .await
        .map_err(|e| unreadable(name, &e.to_string()))?;
    let last = info.state.last_sequence;
    // Read before anything of this session is published: everything it stores is above.
    r.tails.insert(name.to_string(), last);
    let first = info.state.first_sequence.max(1).max(floor.unwrap_or(0));
    if info.state.messages == 0 || first > last {
        return Ok(());
    }
    let s = &s;
    let mut hi = last;
    let mut reads = 0u64;
    while hi >= first {
        let lo = hi.saturating_sub(SCAN_CHUNK - 1).max(first);
        let mut gets = futures::stream::iter((lo..=hi).rev())
            .map(|seq| async move { (seq, s.get_raw_message(seq).await) })
            .buffered(SCAN_CONCURRENCY);
        while let Some((seq, got)) = gets.next().await {
            reads += 1;
            let m = match got {
                Ok(m) => m,
                // Deleted or purged (a fired schedule definition leaves one).
                Err(e)
                    if e.to_string().contains("not found")
                        || e.to_string().contains("no message") =>
                {
                    continue;
                }
                Err(e) => {
                    return Err(unreadable(name, &format!("seq {seq}: {e}")));
                }
            };
            let Some((pos, generated)) = own_position(&m.headers, origin) else {
                continue;
            };
            if pos.commit_lsn >= resume {
                let id = m.headers.get(headers::MSG_ID).map(|v| v.as_str().into());
                r.insert(pos, id);
                let low = r.lowest.entry(name.to_string()).or_insert(seq);
                *low = (*low).min(seq);
            } else if !generated && floor.is_none() {
                return Ok(());
            }
        }
        if reads >= MAX_SCAN_READS {
            tracing::warn!(
                stream = %name,
                reads,
                "reconciliation scan budget spent before reaching the resume position: replays not found are published again (duplicates are possible beyond the dedup window, nothing is lost)"
            );
            return Ok(());
        }
        if lo == first {
            break;
        }
        hi = lo - 1;
    }
    Ok(())
}

/// `stream`'s last sequence (for [`crate::floors::Floors::learn`]); `None` when it
/// cannot be read (then it has no floor, and is read back the older way).
pub async fn stream_tail(js: &jetstream::Context, stream: &str) -> Option<u64> {
    let s = js.get_stream(stream).await.ok()?;
    Some(s.cached_info().state.last_sequence)
}

/// The position of the newest message `origin` published to `stream`, looking back
/// over at most 512 messages (for `status`; `None` when not found or unreadable).
pub async fn last_published(
    js: &jetstream::Context,
    stream: &str,
    origin: &str,
) -> Option<Position> {
    let s = js.get_stream(stream).await.ok()?;
    let last = s.cached_info().state.last_sequence;
    let first = s.cached_info().state.first_sequence.max(1);
    for seq in (first.max(last.saturating_sub(511))..=last).rev() {
        if let Ok(m) = s.get_raw_message(seq).await
            && let Some((pos, false)) = own_position(&m.headers, origin)
        {
            return Some(pos);
        }
    }
    None
}

fn unreadable(stream: &str, e: &str) -> Error {
    Error::transient(format!("read back stream {stream}: {e}")).hint(format!(
        "the relay published to stream {stream} and must read it back to prove what is stored \
         before replaying: grant its nats user $JS.API.STREAM.INFO.{stream} and \
         $JS.API.STREAM.MSG.GET.{stream} (docs/security.md), and check the stream is online"
    ))
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

    /// Issue 14 (1): the server refused position (100, 3) and stored (100, 4) after it.
    /// Only the exact messages read back are skipped: never one below a later one.
    #[test]
    fn skip_only_on_proof_of_the_exact_message() {
        let p = |commit_lsn, index| Position { commit_lsn, index };
        let mut r = Reconciler::from_stored([(p(100, 2), "a"), (p(100, 4), "c")]);
        assert!(r.already_stored(p(100, 2), Some("a")));
        assert!(
            !r.already_stored(p(100, 3), Some("b")),
            "refused: not stored"
        );
        assert!(r.already_stored(p(100, 4), Some("c")));
        assert!(
            !r.already_stored(p(100, 4), Some("other")),
            "another event at the same position (a new timeline) is not proof"
        );
        assert!(!r.already_stored(p(100, 4), None));
        assert!(
            !r.already_stored(p(50, 0), Some("x")),
            "below: not read back"
        );
        r.passed(p(100, 3));
        assert!(r.may_skip(p(100, 4)), "still inside the replay zone");
        r.passed(p(100, 5));
        assert!(!r.already_stored(p(100, 4), Some("c")), "zone left behind");
        assert!(r.is_empty());
    }

    #[test]
    fn record_round_trips_and_reads_the_bare_lsn_of_older_relays() {
        let r = Record {
            lsn: 0x1_0000_0010,
            system_id: Some("7312345678901234567".into()),
            timeline: Some(2),
            streams: ["DLQ".to_string(), "OUTBOX".to_string()].into(),
            floors: [("OUTBOX".to_string(), 17)].into(),
            partitions: Some(8),
            legacy: false,
        };
        let bytes = r.encode().unwrap();
        assert_eq!(Record::parse(&bytes), Some(r));
        let old = Record::parse(b"0/16B3748").unwrap();
        assert_eq!(old.lsn, 0x16B_3748);
        assert!(old.legacy && old.streams.is_empty() && old.system_id.is_none());
        assert_eq!(Record::parse(b"garbage"), None);
    }

    #[test]
    fn generated_messages_prove_their_position_without_an_id() {
        let p = Position {
            commit_lsn: 7,
            index: 0,
        };
        let mut r = Reconciler::default();
        r.insert(p, None);
        assert!(r.already_stored(p, Some("id")));
        // The definition's id, read later in the scan, is kept.
        r.insert(p, Some("id".into()));
        r.insert(p, None);
        assert!(r.already_stored(p, Some("id")));
        assert!(!r.already_stored(p, Some("other")));
    }
}
