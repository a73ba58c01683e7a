//! Parser for one pgoutput logical replication message.
//!
//! Layout follows PostgreSQL's "Logical Replication Message Formats" for
//! `proto_version '1'`, which is what the transport negotiates. In protocol 2+
//! the change messages (R, Y, I, U, D, T, M) carry an extra leading xid *only
//! inside streamed transactions*; streaming is never requested, so those are
//! parsed without it. The stream control messages (S, E, c, A) have a single
//! layout and are parsed so the decoder is complete.
//!
//! Every message must be consumed exactly: leftover bytes are an error rather
//! than ignored, because a layout mismatch (e.g. a slot sending protocol-2
//! streamed changes) would otherwise decode into plausible but wrong values.

use bytes::Bytes;

use super::relation::{RelColumn, Relation};

/// One decoded pgoutput message. Text/binary column values and message
/// content are slices of the input buffer, never copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgMessage {
    Begin {
        final_lsn: u64,
        /// Microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL epoch).
        commit_time_micros: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_micros: i64,
    },
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        type_oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_id: u32,
        tuple: Tuple,
    },
    /// The tuples are validated but not kept: the outbox is insert-only, so
    /// materialising them would only cost allocations.
    Update {
        relation_id: u32,
    },
    /// Same as [`PgMessage::Update`]: validated, not kept.
    Delete {
        relation_id: u32,
    },
    Truncate {
        relation_ids: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_micros: i64,
    },
    StreamAbort {
        xid: u32,
    },
    /// A tag PostgreSQL defines but the relay never asks for (two-phase
    /// commit: b, P, K, r, p). Its body is not parsed.
    Unsupported {
        tag: u8,
    },
}

/// Column values of one row, in the column order of the last Relation
/// message for that relation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<TupleValue>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value that did not change; never sent for INSERT.
    UnchangedToast,
    /// The column's text output function result, exactly as sent.
    Text(Bytes),
    /// The column's binary send function result (only with the `binary` option).
    Binary(Bytes),
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {what}")]
    Truncated { what: &'static str },
    #[error(
        "unknown pgoutput message tag 0x{0:02x}: the server speaks a newer protocol than this relay supports"
    )]
    UnknownTag(u8),
    #[error("pgoutput {what} is not valid utf-8: the database encoding must be UTF8")]
    BadUtf8 { what: &'static str },
    #[error("pgoutput {what} has negative length {len}")]
    NegativeLength { what: &'static str, len: i32 },
    #[error("pgoutput {what} has unexpected byte 0x{found:02x}")]
    UnexpectedByte { what: &'static str, found: u8 },
    #[error(
        "pgoutput {what} message has {count} trailing bytes: the slot must use pgoutput proto_version 1 without streaming"
    )]
    TrailingBytes { what: &'static str, count: usize },
}

/// Decodes one pgoutput message (the payload of one XLogData).
///
/// Never panics: any byte sequence yields a message or a [`DecodeError`].
pub fn parse(data: &Bytes) -> Result<PgMessage, DecodeError> {
    let mut r = Reader { src: data, pos: 0 };
    let tag = r.u8("message tag")?;
    match tag {
        b'B' => {
            let final_lsn = r.u64("begin final lsn")?;
            let commit_time_micros = r.i64("begin commit timestamp")?;
            let xid = r.u32("begin xid")?;
            r.finish("begin")?;
            Ok(PgMessage::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            })
        }
        b'C' => {
            let flags = r.u8("commit flags")?;
            let commit_lsn = r.u64("commit lsn")?;
            let end_lsn = r.u64("commit end lsn")?;
            let commit_time_micros = r.i64("commit timestamp")?;
            r.finish("commit")?;
            Ok(PgMessage::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time_micros,
            })
        }
        b'O' => {
            let commit_lsn = r.u64("origin commit lsn")?;
            let name = r.cstr("origin name")?;
            r.finish("origin")?;
            Ok(PgMessage::Origin { commit_lsn, name })
        }
        b'R' => {
            let rel = relation(&mut r)?;
            r.finish("relation")?;
            Ok(PgMessage::Relation(rel))
        }
        b'Y' => {
            let type_oid = r.u32("type oid")?;
            let namespace = r.cstr("type namespace")?;
            let name = r.cstr("type name")?;
            r.finish("type")?;
            Ok(PgMessage::Type {
                type_oid,
                namespace,
                name,
            })
        }
        b'I' => {
            let relation_id = r.u32("insert relation id")?;
            let marker = r.u8("insert tuple marker")?;
            if marker != b'N' {
                return Err(DecodeError::UnexpectedByte {
                    what: "insert tuple marker",
                    found: marker,
                });
            }
            let tuple = tuple(&mut r)?;
            r.finish("insert")?;
            Ok(PgMessage::Insert { relation_id, tuple })
        }
        b'U' => {
            let relation_id = r.u32("update relation id")?;
            let mut marker = r.u8("update tuple marker")?;
            if marker == b'K' || marker == b'O' {
                skip_tuple(&mut r)?;
                marker = r.u8("update new tuple marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::UnexpectedByte {
                    what: "update tuple marker",
                    found: marker,
                });
            }
            skip_tuple(&mut r)?;
            r.finish("update")?;
            Ok(PgMessage::Update { relation_id })
        }
        b'D' => {
            let relation_id = r.u32("delete relation id")?;
            let marker = r.u8("delete tuple marker")?;
            if marker != b'K' && marker != b'O' {
                return Err(DecodeError::UnexpectedByte {
                    what: "delete tuple marker",
                    found: marker,
                });
            }
            skip_tuple(&mut r)?;
            r.finish("delete")?;
            Ok(PgMessage::Delete { relation_id })
        }
        b'T' => {
            let count = r.len_i32("truncate relation count")?;
            let _options = r.u8("truncate options")?;
            // Checked before allocating so a hostile count cannot reserve
            // gigabytes for ids that are not there.
            if count.saturating_mul(4) > r.remaining() {
                return Err(DecodeError::Truncated {
                    what: "truncate relation ids",
                });
            }
            let mut relation_ids = Vec::with_capacity(count);
            for _ in 0..count {
                relation_ids.push(r.u32("truncate relation ids")?);
            }
            r.finish("truncate")?;
            Ok(PgMessage::Truncate { relation_ids })
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = r.u64("message lsn")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.len_i32("message content")?;
            let content = r.bytes(len, "message content")?;
            r.finish("message")?;
            Ok(PgMessage::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            })
        }
        b'S' => {
            let xid = r.u32("stream start xid")?;
            let first = r.u8("stream start first-segment flag")?;
            r.finish("stream start")?;
            Ok(PgMessage::StreamStart {
                xid,
                first_segment: first == 1,
            })
        }
        b'E' => {
            r.finish("stream stop")?;
            Ok(PgMessage::StreamStop)
        }
        b'c' => {
            let xid = r.u32("stream commit xid")?;
            let _flags = r.u8("stream commit flags")?;
            let commit_lsn = r.u64("stream commit lsn")?;
            let end_lsn = r.u64("stream commit end lsn")?;
            let commit_time_micros = r.i64("stream commit timestamp")?;
            r.finish("stream commit")?;
            Ok(PgMessage::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time_micros,
            })
        }
        b'A' => {
            let xid = r.u32("stream abort xid")?;
            let _subxid = r.u32("stream abort subtransaction xid")?;
            // Protocol 4 with parallel streaming appends abort lsn and
            // timestamp; accept that whole form, but nothing in between.
            if r.remaining() != 0 {
                let _abort_lsn = r.u64("stream abort lsn")?;
                let _abort_time = r.i64("stream abort timestamp")?;
            }
            r.finish("stream abort")?;
            Ok(PgMessage::StreamAbort { xid })
        }
        b'b' | b'P' | b'K' | b'r' | b'p' => Ok(PgMessage::Unsupported { tag }),
        other => Err(DecodeError::UnknownTag(other)),
    }
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.cstr("relation namespace")?;
    let name = r.cstr("relation name")?;
    let replica_identity = r.u8("relation replica identity")?;
    let ncols = usize::from(r.u16("relation column count")?);
    // Smallest column: flags, empty name's NUL, type oid, typmod.
    const MIN_COLUMN: usize = 1 + 1 + 4 + 4;
    let mut columns = Vec::with_capacity(ncols.min(r.remaining() / MIN_COLUMN));
    for _ in 0..ncols {
        let flags = r.u8("relation column flags")?;
        let name = r.cstr("relation column name")?;
        let type_oid = r.u32("relation column type oid")?;
        let type_modifier = r.i32("relation column type modifier")?;
        columns.push(RelColumn {
            flags,
            name,
            type_oid,
            type_modifier,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let ncols = usize::from(r.u16("tuple column count")?);
    // Every column takes at least its kind byte, which bounds a lying count.
    let mut values = Vec::with_capacity(ncols.min(r.remaining()));
    for _ in 0..ncols {
        values.push(tuple_value(r)?);
    }
    Ok(Tuple(values))
}

fn tuple_value(r: &mut Reader<'_>) -> Result<TupleValue, DecodeError> {
    match r.u8("tuple column kind")? {
        b'n' => Ok(TupleValue::Null),
        b'u' => Ok(TupleValue::UnchangedToast),
        b't' => {
            let len = r.len_i32("tuple text value")?;
            Ok(TupleValue::Text(r.bytes(len, "tuple text value")?))
        }
        b'b' => {
            let len = r.len_i32("tuple binary value")?;
            Ok(TupleValue::Binary(r.bytes(len, "tuple binary value")?))
        }
        found => Err(DecodeError::UnexpectedByte {
            what: "tuple column kind",
            found,
        }),
    }
}

/// Validates a TupleData without building it (no allocation, no refcounts).
fn skip_tuple(r: &mut Reader<'_>) -> Result<(), DecodeError> {
    let ncols = r.u16("tuple column count")?;
    for _ in 0..ncols {
        match r.u8("tuple column kind")? {
            b'n' | b'u' => {}
            b't' | b'b' => {
                let len = r.len_i32("tuple value")?;
                r.skip(len, "tuple value")?;
            }
            found => {
                return Err(DecodeError::UnexpectedByte {
                    what: "tuple column kind",
                    found,
                });
            }
        }
    }
    Ok(())
}

/// Bounds-checked big-endian cursor; values are sliced from `src` so they
/// share its allocation.
struct Reader<'a> {
    src: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn rest(&self) -> &[u8] {
        self.src.get(self.pos..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.src.len().saturating_sub(self.pos)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = *self
            .rest()
            .first_chunk::<N>()
            .ok_or(DecodeError::Truncated { what })?;
        self.pos += N;
        Ok(bytes)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// An Int32 byte/element count; the wire type is signed.
    fn len_i32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len })
    }

    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        let start = self.pos;
        self.pos += len;
        Ok(self.src.slice(start..self.pos))
    }

    fn skip(&mut self, len: usize, what: &'static str) -> Result<(), DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        self.pos += len;
        Ok(())
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self.rest();
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { what })?;
        let (text, _) = rest
            .split_at_checked(nul)
            .ok_or(DecodeError::Truncated { what })?;
        let text = std::str::from_utf8(text)
            .map_err(|_| DecodeError::BadUtf8 { what })?
            .to_owned();
        self.pos += nul + 1;
        Ok(text)
    }

    fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { what, count }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::decode::encode;

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn outbox_relation() -> Relation {
        let col = |flags, name: &str, type_oid| RelColumn {
            flags,
            name: name.to_owned(),
            type_oid,
            type_modifier: -1,
        };
        Relation {
            id: 16390,
            namespace: "public".to_owned(),
            name: "outbox_events".to_owned(),
            replica_identity: b'd',
            columns: vec![
                col(1, "id", 2950),
                col(0, "event_topic", 25),
                col(0, "payload", 3802),
            ],
        }
    }

    /// One instance of every message the encoder can build.
    fn samples() -> Vec<PgMessage> {
        vec![
            PgMessage::Begin {
                final_lsn: 0x0000_0001_6B37_4D48,
                commit_time_micros: 767_805_296_789_012,
                xid: 741,
            },
            PgMessage::Commit {
                flags: 0,
                commit_lsn: 0x1_6B37_4D48,
                end_lsn: 0x1_6B37_4D78,
                commit_time_micros: -1,
            },
            PgMessage::Origin {
                commit_lsn: u64::MAX,
                name: "pg_16399".to_owned(),
            },
            PgMessage::Relation(outbox_relation()),
            PgMessage::Relation(Relation {
                id: 1,
                namespace: String::new(),
                name: "ünïcode".to_owned(),
                replica_identity: b'f',
                columns: vec![],
            }),
            PgMessage::Type {
                type_oid: 16400,
                namespace: "public".to_owned(),
                name: "mood".to_owned(),
            },
            PgMessage::Insert {
                relation_id: 16390,
                tuple: Tuple(vec![
                    text("a"),
                    TupleValue::Null,
                    TupleValue::UnchangedToast,
                    TupleValue::Binary(Bytes::from_static(&[0, 1, 2])),
                    text(""),
                ]),
            },
            PgMessage::Insert {
                relation_id: 2,
                tuple: Tuple::default(),
            },
            PgMessage::Update { relation_id: 16390 },
            PgMessage::Delete { relation_id: 16390 },
            PgMessage::Truncate {
                relation_ids: vec![16390, 16391],
            },
            PgMessage::Truncate {
                relation_ids: vec![],
            },
            PgMessage::Message {
                transactional: true,
                lsn: 42,
                prefix: "outbox".to_owned(),
                content: Bytes::from_static(b"hello\0world"),
            },
            PgMessage::Message {
                transactional: false,
                lsn: 0,
                prefix: String::new(),
                content: Bytes::new(),
            },
            PgMessage::StreamStart {
                xid: 9,
                first_segment: true,
            },
            PgMessage::StreamStart {
                xid: 9,
                first_segment: false,
            },
            PgMessage::StreamStop,
            PgMessage::StreamCommit {
                xid: 9,
                commit_lsn: 100,
                end_lsn: 200,
                commit_time_micros: 300,
            },
            PgMessage::StreamAbort { xid: 9 },
        ]
    }

    /// Update/Delete with real tuples, whose bodies `samples` leaves empty.
    fn skipped_bodies() -> Vec<(Bytes, PgMessage)> {
        let old = Tuple(vec![text("1"), TupleValue::Null]);
        let new = Tuple(vec![text("1"), TupleValue::UnchangedToast, text("x")]);
        vec![
            (
                encode::update(7, None, &new),
                PgMessage::Update { relation_id: 7 },
            ),
            (
                encode::update(7, Some((b'K', &old)), &new),
                PgMessage::Update { relation_id: 7 },
            ),
            (
                encode::update(7, Some((b'O', &old)), &new),
                PgMessage::Update { relation_id: 7 },
            ),
            (
                encode::delete(7, b'K', &old),
                PgMessage::Delete { relation_id: 7 },
            ),
            (
                encode::delete(7, b'O', &new),
                PgMessage::Delete { relation_id: 7 },
            ),
            (
                encode::stream_abort_v4(9, 10, 11, 12),
                PgMessage::StreamAbort { xid: 9 },
            ),
        ]
    }

    /// A Relation and an Insert for `public.outbox_events`, byte for byte as
    /// PostgreSQL 15 pgoutput (proto_version 1) sends them for:
    ///
    /// ```sql
    /// CREATE TABLE public.outbox_events (
    ///   id uuid PRIMARY KEY, event_topic text NOT NULL, payload jsonb NOT NULL,
    ///   aggregate_id varchar(64), created_at timestamptz NOT NULL DEFAULT now());
    /// ```
    ///
    /// jsonb output reorders keys (shorter first), hence the payload text.
    const PG15_RELATION: &[u8] = b"R\x00\x00\x40\x06public\x00outbox_events\x00d\x00\x05\
        \x01id\x00\x00\x00\x0b\x86\xff\xff\xff\xff\
        \x00event_topic\x00\x00\x00\x00\x19\xff\xff\xff\xff\
        \x00payload\x00\x00\x00\x0e\xda\xff\xff\xff\xff\
        \x00aggregate_id\x00\x00\x00\x04\x13\x00\x00\x00\x44\
        \x00created_at\x00\x00\x00\x04\xa0\xff\xff\xff\xff";

    const PG15_INSERT: &[u8] = b"I\x00\x00\x40\x06N\x00\x05\
        t\x00\x00\x00\x240190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b\
        t\x00\x00\x00\x0dorder.created\
        t\x00\x00\x00\x1a{\"sku\": \"A1\", \"total\": 42}\
        n\
        t\x00\x00\x00\x1d2024-05-01 12:34:56.789012+00";

    fn valid_messages() -> Vec<Bytes> {
        let mut all: Vec<Bytes> = samples().iter().map(encode::message).collect();
        all.extend(skipped_bodies().into_iter().map(|(bytes, _)| bytes));
        all.push(Bytes::from_static(PG15_RELATION));
        all.push(Bytes::from_static(PG15_INSERT));
        all
    }

    #[test]
    fn round_trips_every_message() {
        for msg in samples() {
            assert_eq!(parse(&encode::message(&msg)), Ok(msg));
        }
        for (bytes, msg) in skipped_bodies() {
            assert_eq!(parse(&bytes), Ok(msg));
        }
    }

    #[test]
    fn two_phase_tags_are_unsupported_not_errors() {
        for tag in [b'b', b'P', b'K', b'r', b'p'] {
            let bytes = Bytes::from(vec![tag, 1, 2, 3]);
            assert_eq!(parse(&bytes), Ok(PgMessage::Unsupported { tag }));
        }
    }

    #[test]
    fn unknown_tag_and_empty_input() {
        assert_eq!(
            parse(&Bytes::from_static(b"Z\x00")),
            Err(DecodeError::UnknownTag(b'Z'))
        );
        assert_eq!(
            parse(&Bytes::new()),
            Err(DecodeError::Truncated {
                what: "message tag"
            })
        );
    }

    #[test]
    fn pg15_captured_relation_and_insert() {
        let Ok(PgMessage::Relation(rel)) = parse(&Bytes::from_static(PG15_RELATION)) else {
            panic!("not a relation");
        };
        assert_eq!(rel.id, 16390);
        assert_eq!(
            (rel.namespace.as_str(), rel.name.as_str()),
            ("public", "outbox_events")
        );
        assert_eq!(rel.replica_identity, b'd');
        let summary: Vec<_> = rel
            .columns
            .iter()
            .map(|c| (c.flags, c.name.as_str(), c.type_oid, c.type_modifier))
            .collect();
        assert_eq!(
            summary,
            [
                (1, "id", 2950, -1),
                (0, "event_topic", 25, -1),
                (0, "payload", 3802, -1),
                (0, "aggregate_id", 1043, 68),
                (0, "created_at", 1184, -1),
            ]
        );

        let insert = Bytes::from_static(PG15_INSERT);
        let Ok(PgMessage::Insert { relation_id, tuple }) = parse(&insert) else {
            panic!("not an insert");
        };
        assert_eq!(relation_id, 16390);
        assert_eq!(
            tuple.0,
            [
                text("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
                text("order.created"),
                text(r#"{"sku": "A1", "total": 42}"#),
                TupleValue::Null,
                text("2024-05-01 12:34:56.789012+00"),
            ]
        );

        // And through the cache to an event, as the relay does it.
        let mut cache = crate::decode::RelationCache::new(
            "public",
            "outbox_events",
            crate::decode::ColumnMap::default(),
        );
        cache.update(rel);
        let event = cache
            .mapping(relation_id)
            .unwrap()
            .unwrap()
            .event(&tuple)
            .unwrap();
        assert_eq!(event.id_str(), "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(event.event_topic_str(), "order.created");
        assert_eq!(event.payload.as_ref(), br#"{"sku": "A1", "total": 42}"#);
        assert_eq!(event.aggregate_id, None);
        assert_eq!(
            event.created_at.as_deref(),
            Some(&b"2024-05-01 12:34:56.789012+00"[..])
        );
        assert_eq!(event.metadata, None);
    }

    #[test]
    fn values_and_content_share_the_input_buffer() {
        let within = |outer: &Bytes, inner: &Bytes| {
            let range = outer.as_ptr_range();
            let inner = inner.as_ptr_range();
            range.start <= inner.start && inner.end <= range.end
        };
        let insert = Bytes::from_static(PG15_INSERT);
        let Ok(PgMessage::Insert { tuple, .. }) = parse(&insert) else {
            panic!("not an insert");
        };
        for value in &tuple.0 {
            if let TupleValue::Text(b) = value {
                assert!(within(&insert, b));
            }
        }
        // Heap-backed input, as from the network, not just static data.
        let msg = encode::message(&PgMessage::Message {
            transactional: true,
            lsn: 1,
            prefix: "p".to_owned(),
            content: Bytes::from_static(b"content"),
        });
        let Ok(PgMessage::Message { content, .. }) = parse(&msg) else {
            panic!("not a message");
        };
        assert!(within(&msg, &content));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for full in valid_messages() {
            for len in 0..full.len() {
                let prefix = full.slice(..len);
                let is_v1_abort = full.first() == Some(&b'A') && len == 9;
                if is_v1_abort {
                    // The protocol-4 abort's first 9 bytes are a whole
                    // protocol-1 abort.
                    assert!(parse(&prefix).is_ok());
                } else {
                    assert!(parse(&prefix).is_err(), "{full:?} cut at {len} parsed");
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for full in valid_messages() {
            let mut longer = full.to_vec();
            longer.push(0);
            let got = parse(&Bytes::from(longer));
            if full.first() == Some(&b'A') {
                // Read as a cut-off protocol-4 abort instead.
                assert!(got.is_err());
            } else {
                assert!(
                    matches!(got, Err(DecodeError::TrailingBytes { count: 1, .. })),
                    "{full:?}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn malformed_fields() {
        let err = |bytes: &[u8]| parse(&Bytes::copy_from_slice(bytes)).unwrap_err();
        assert_eq!(
            err(b"Y\x00\x00\x00\x01ns\x00\xffname\x00"),
            DecodeError::BadUtf8 { what: "type name" }
        );
        assert_eq!(
            err(b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xff"),
            DecodeError::NegativeLength {
                what: "tuple text value",
                len: -1
            }
        );
        assert_eq!(
            err(b"I\x00\x00\x00\x01N\x00\x01x"),
            DecodeError::UnexpectedByte {
                what: "tuple column kind",
                found: b'x'
            }
        );
        assert_eq!(
            err(b"I\x00\x00\x00\x01K\x00\x00"),
            DecodeError::UnexpectedByte {
                what: "insert tuple marker",
                found: b'K'
            }
        );
        assert_eq!(
            err(b"D\x00\x00\x00\x01N\x00\x00"),
            DecodeError::UnexpectedByte {
                what: "delete tuple marker",
                found: b'N'
            }
        );
        assert_eq!(
            err(b"U\x00\x00\x00\x01K\x00\x00K\x00\x00"),
            DecodeError::UnexpectedByte {
                what: "update tuple marker",
                found: b'K'
            }
        );
        // A huge count with no ids behind it fails before allocating.
        assert_eq!(
            err(b"T\x7f\xff\xff\xff\x00"),
            DecodeError::Truncated {
                what: "truncate relation ids"
            }
        );
        assert_eq!(
            err(b"M\x01\x00\x00\x00\x00\x00\x00\x00\x01p\x00\x00\x00\x00\x05abc"),
            DecodeError::Truncated {
                what: "message content"
            }
        );
        // An insert as protocol 2 sends it inside a streamed transaction
        // (xid first) must not decode as a protocol-1 insert.
        assert!(
            parse(&Bytes::from_static(
                b"I\x00\x00\x03\xe8\x00\x00\x40\x06N\x00\x00"
            ))
            .is_err()
        );
    }

    #[test]
    fn error_messages_are_lowercase() {
        let errors = [
            DecodeError::Truncated { what: "x" },
            DecodeError::UnknownTag(b'Z'),
            DecodeError::BadUtf8 { what: "x" },
            DecodeError::NegativeLength { what: "x", len: -1 },
            DecodeError::UnexpectedByte {
                what: "x",
                found: 0,
            },
            DecodeError::TrailingBytes {
                what: "x",
                count: 1,
            },
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(msg.starts_with(char::is_lowercase), "{msg}");
        }
    }

    /// Writes the fuzz seed corpus: each valid message alone, plus framed
    /// sequences (`u16` big-endian length before each message, the format
    /// `fuzz/fuzz_targets/decode.rs` reads) that reach the relation cache.
    /// Run with `cargo test --lib write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes files under fuzz/corpus"]
    fn write_fuzz_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
        std::fs::create_dir_all(&dir).unwrap();
        let framed = |messages: &[Bytes]| {
            let mut out = Vec::new();
            for m in messages {
                out.extend_from_slice(&(m.len() as u16).to_be_bytes());
                out.extend_from_slice(m);
            }
            out
        };
        let mut seeds: Vec<(String, Vec<u8>)> = valid_messages()
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("single-{i:02}-{}", char::from(m[0])), m.to_vec()))
            .collect();
        let pg15 = [
            Bytes::from_static(PG15_RELATION),
            Bytes::from_static(PG15_INSERT),
        ];
        seeds.push(("framed-pg15-relation-insert".into(), framed(&pg15)));
        let short_row = encode::insert(16390, &Tuple(vec![text("1"), TupleValue::Null]));
        let relation = encode::message(&PgMessage::Relation(outbox_relation()));
        seeds.push((
            "framed-short-row".into(),
            framed(&[relation.clone(), short_row.clone()]),
        ));
        seeds.push(("framed-row-before-relation".into(), framed(&[short_row])));
        let mut other = outbox_relation();
        other.name = "orders".to_owned();
        let row = encode::insert(16390, &Tuple(vec![text("1"), text("t"), text("{}")]));
        seeds.push((
            "framed-other-table".into(),
            framed(&[encode::message(&PgMessage::Relation(other)), row.clone()]),
        ));
        seeds.push(("framed-outbox-row".into(), framed(&[relation, row])));
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    fn arb_value() -> impl Strategy<Value = TupleValue> {
        prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|v| TupleValue::Text(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|v| TupleValue::Binary(Bytes::from(v))),
        ]
    }

    fn arb_relation() -> impl Strategy<Value = Relation> {
        let name = "[^\u{0}]{0,12}";
        let column = (any::<u8>(), name, any::<u32>(), any::<i32>()).prop_map(
            |(flags, name, type_oid, type_modifier)| RelColumn {
                flags,
                name,
                type_oid,
                type_modifier,
            },
        );
        (
            any::<u32>(),
            name,
            name,
            any::<u8>(),
            proptest::collection::vec(column, 0..20),
        )
            .prop_map(
                |(id, namespace, name, replica_identity, columns)| Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            )
    }

    proptest! {
        #[test]
        fn relation_and_insert_round_trip(
            rel in arb_relation(),
            values in proptest::collection::vec(arb_value(), 0..40),
        ) {
            let msg = PgMessage::Relation(rel);
            prop_assert_eq!(parse(&encode::message(&msg)), Ok(msg));
            let insert = PgMessage::Insert { relation_id: 5, tuple: Tuple(values) };
            prop_assert_eq!(parse(&encode::message(&insert)), Ok(insert));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&Bytes::from(bytes));
        }

        #[test]
        fn arbitrary_change_bodies_never_panic(
            tag in proptest::sample::select(b"RYIUDTMOBCScAE".to_vec()),
            body in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(body);
            let _ = parse(&Bytes::from(bytes));
        }
    }
}
