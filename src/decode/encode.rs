//! Test-only pgoutput encoder: the inverse of [`super::parse`], so tests can
//! build any message (and fuzz seeds) without a live PostgreSQL.

use bytes::{BufMut, Bytes, BytesMut};

use super::{PgMessage, Relation, Tuple, TupleValue};

pub fn message(msg: &PgMessage) -> Bytes {
    let mut b = BytesMut::new();
    match msg {
        PgMessage::Begin {
            final_lsn,
            commit_time_micros,
            xid,
        } => {
            b.put_u8(b'B');
            b.put_u64(*final_lsn);
            b.put_i64(*commit_time_micros);
            b.put_u32(*xid);
        }
        PgMessage::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time_micros,
        } => {
            b.put_u8(b'C');
            b.put_u8(*flags);
            b.put_u64(*commit_lsn);
            b.put_u64(*end_lsn);
            b.put_i64(*commit_time_micros);
        }
        PgMessage::Origin { commit_lsn, name } => {
            b.put_u8(b'O');
            b.put_u64(*commit_lsn);
            cstr(&mut b, name);
        }
        PgMessage::Relation(rel) => relation(&mut b, rel),
        PgMessage::Type {
            type_oid,
            namespace,
            name,
        } => {
            b.put_u8(b'Y');
            b.put_u32(*type_oid);
            cstr(&mut b, namespace);
            cstr(&mut b, name);
        }
        PgMessage::Insert { relation_id, tuple } => return insert(*relation_id, tuple),
        PgMessage::Update { relation_id } => return update(*relation_id, None, &Tuple::default()),
        PgMessage::Delete { relation_id } => return delete(*relation_id, b'K', &Tuple::default()),
        PgMessage::Truncate { relation_ids } => {
            b.put_u8(b'T');
            b.put_u32(relation_ids.len() as u32);
            b.put_u8(0);
            for id in relation_ids {
                b.put_u32(*id);
            }
        }
        PgMessage::Message {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            b.put_u8(b'M');
            b.put_u8(u8::from(*transactional));
            b.put_u64(*lsn);
            cstr(&mut b, prefix);
            b.put_u32(content.len() as u32);
            b.put_slice(content);
        }
        PgMessage::StreamStart { xid, first_segment } => {
            b.put_u8(b'S');
            b.put_u32(*xid);
            b.put_u8(u8::from(*first_segment));
        }
        PgMessage::StreamStop => b.put_u8(b'E'),
        PgMessage::StreamCommit {
            xid,
            commit_lsn,
            end_lsn,
            commit_time_micros,
        } => {
            b.put_u8(b'c');
            b.put_u32(*xid);
            b.put_u8(0);
            b.put_u64(*commit_lsn);
            b.put_u64(*end_lsn);
            b.put_i64(*commit_time_micros);
        }
        PgMessage::StreamAbort { xid } => {
            b.put_u8(b'A');
            b.put_u32(*xid);
            b.put_u32(*xid);
        }
        PgMessage::Unsupported { tag } => b.put_u8(*tag),
    }
    b.freeze()
}

pub fn insert(relation_id: u32, t: &Tuple) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(relation_id);
    b.put_u8(b'N');
    tuple(&mut b, t);
    b.freeze()
}

/// `old` is `(b'K' | b'O', key or old tuple)`.
pub fn update(relation_id: u32, old: Option<(u8, &Tuple)>, new: &Tuple) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'U');
    b.put_u32(relation_id);
    if let Some((kind, t)) = old {
        b.put_u8(kind);
        tuple(&mut b, t);
    }
    b.put_u8(b'N');
    tuple(&mut b, new);
    b.freeze()
}

pub fn delete(relation_id: u32, kind: u8, old: &Tuple) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'D');
    b.put_u32(relation_id);
    b.put_u8(kind);
    tuple(&mut b, old);
    b.freeze()
}

/// The protocol-4 parallel-streaming form, with abort lsn and timestamp.
pub fn stream_abort_v4(xid: u32, subxid: u32, abort_lsn: u64, abort_time: i64) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'A');
    b.put_u32(xid);
    b.put_u32(subxid);
    b.put_u64(abort_lsn);
    b.put_i64(abort_time);
    b.freeze()
}

fn relation(b: &mut BytesMut, rel: &Relation) {
    b.put_u8(b'R');
    b.put_u32(rel.id);
    cstr(b, &rel.namespace);
    cstr(b, &rel.name);
    b.put_u8(rel.replica_identity);
    b.put_u16(rel.columns.len() as u16);
    for c in &rel.columns {
        b.put_u8(c.flags);
        cstr(b, &c.name);
        b.put_u32(c.type_oid);
        b.put_i32(c.type_modifier);
    }
}

fn tuple(b: &mut BytesMut, t: &Tuple) {
    b.put_u16(t.0.len() as u16);
    for v in &t.0 {
        match v {
            TupleValue::Null => b.put_u8(b'n'),
            TupleValue::UnchangedToast => b.put_u8(b'u'),
            TupleValue::Text(x) => {
                b.put_u8(b't');
                b.put_u32(x.len() as u32);
                b.put_slice(x);
            }
            TupleValue::Binary(x) => {
                b.put_u8(b'b');
                b.put_u32(x.len() as u32);
                b.put_slice(x);
            }
        }
    }
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}
