//! Message headers. The names are part of the external contract (README, "Headers").
//!
//! `Nats-Msg-Id` is the row id, so JetStream drops a replayed copy inside the stream's
//! duplicate window; `Outbox-Commit-Lsn` + `Outbox-Tx-Index` are the event's position,
//! which lets a restart reconcile with what a stream already holds beyond that window.

use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use super::Position;
use crate::decode::OutboxEvent;

pub const MSG_ID: &str = "Nats-Msg-Id";
pub const EVENT_ID: &str = "Outbox-Event-Id";
pub const EVENT_TOPIC: &str = "Outbox-Event-Topic";
pub const AGGREGATE_TYPE: &str = "Outbox-Aggregate-Type";
pub const AGGREGATE_ID: &str = "Outbox-Aggregate-Id";
pub const TENANT_ID: &str = "Outbox-Tenant-Id";
pub const SOURCE: &str = "Outbox-Source";
pub const SCHEMA_ID: &str = "Outbox-Schema-Id";
pub const SCHEMA_VERSION: &str = "Outbox-Schema-Version";
pub const OCCURRED_AT: &str = "Outbox-Occurred-At";
pub const COMMIT_LSN: &str = "Outbox-Commit-Lsn";
pub const TX_INDEX: &str = "Outbox-Tx-Index";
pub const ORIGIN: &str = "Outbox-Origin";
/// The payload's media type, from the row's content-type column or
/// `outbox.content_type` (absent when neither says).
pub const CONTENT_TYPE: &str = "Content-Type";
/// With `{partition:N}` in `routing.subject`: the partition of the aggregate id.
pub const PARTITION: &str = "Outbox-Partition";
/// Dead letters only: why the event could not be published, and where it was going.
pub const DLQ_REASON: &str = "Outbox-Dlq-Reason";
pub const DLQ_SUBJECT: &str = "Outbox-Dlq-Original-Subject";
/// On a message JetStream refused: the server's `err_code` (e.g. 10054 message size,
/// 10097 header size, 10077 a stream limit); its description is in the reason.
pub const DLQ_ERROR_CODE: &str = "Outbox-Dlq-Error-Code";

/// On messages `replay` sent: its run id (such a message carries no position).
pub const REPLAY: &str = "Outbox-Replay";
/// On a filled message sent under `<id>:fill:<run>` (the stream's duplicate window still
/// held the id of a message deleted since): the id it stands for.
pub const REPLAY_OF: &str = "Outbox-Replay-Of";

/// On messages `dlq redrive` sent: its run id.
pub const REDRIVE: &str = "Outbox-Redrive";

/// Every header name the relay sets itself, for the README and for tests.
pub fn header_names() -> [&'static str; 30] {
    use super::cloudevents as ce;
    [
        ORIGIN,
        CONTENT_TYPE,
        PARTITION,
        MSG_ID,
        EVENT_ID,
        EVENT_TOPIC,
        AGGREGATE_TYPE,
        AGGREGATE_ID,
        TENANT_ID,
        SOURCE,
        SCHEMA_ID,
        SCHEMA_VERSION,
        OCCURRED_AT,
        COMMIT_LSN,
        TX_INDEX,
        DLQ_REASON,
        DLQ_SUBJECT,
        DLQ_ERROR_CODE,
        REPLAY,
        REPLAY_OF,
        REDRIVE,
        ce::CE_SPECVERSION,
        ce::CE_ID,
        ce::CE_SOURCE,
        ce::CE_TYPE,
        ce::CE_SUBJECT,
        ce::CE_TIME,
        ce::CE_DATASCHEMA,
        ce::CE_DATACONTENTTYPE,
        ce::CONTENT_TYPE,
    ]
}

/// Builds each message's headers by cloning a template instead of inserting all of
/// them one by one.
///
/// `async_nats::HeaderMap` is a SipHash `HashMap` that cannot be created with a
/// capacity: inserting 13 headers into an empty one hashed each name, grew the table 3
/// times (rehashing what it held) and validated every value: a quarter of the relay's
/// CPU per event in catch-up (docs/benchmarks.md). Consecutive messages mostly repeat
/// their headers (same transaction, topic, aggregate type, tenant), so the template
/// keeps the last values of those "sticky" headers and is cloned (one table
/// allocation, no hashing), and only the headers that change per message are inserted.
///
/// Invariant: the template holds exactly the header names the next message gets
/// (sticky ones with their last value, per-message ones with an empty placeholder that
/// [`HeaderSet::build`] always overwrites), so a clone never carries a header the
/// message should not have. A sticky header appearing or disappearing (a column that
/// is NULL in one row and set in the next) rebuilds the template.
#[derive(Debug)]
pub struct HeaderSet {
    names: Names,
    origin: HeaderValue,
    /// `routing.headers = "compact"`: only `Nats-Msg-Id`, the position and the origin
    /// (plus metadata headers); no event id, aggregate or column headers.
    compact: bool,
    /// `outbox.content_type`: the `Content-Type` of rows whose own column is NULL or
    /// unmapped.
    content_type: Option<Bytes>,
    /// `routing.cloudevents` is on: the content type header is `content-type` (as
    /// CloudEvents SDKs read it) and metadata cannot set `ce-*` or `content-type`
    /// headers (they would forge the event's attributes).
    cloudevents: bool,
    /// Interior mutability keeps routing `&self`; a session routes on one task, so the
    /// lock is never contended (a `Mutex` rather than a `RefCell` so that the session
    /// future is `Send` and can run as a spawned task, see `main.rs`).
    template: Mutex<Option<Template>>,
}

impl Clone for HeaderSet {
    /// A clone starts with no template (it is only a cache).
    fn clone(&self) -> Self {
        Self {
            names: self.names.clone(),
            origin: self.origin.clone(),
            compact: self.compact,
            content_type: self.content_type.clone(),
            cloudevents: self.cloudevents,
            template: Mutex::new(None),
        }
    }
}

/// Header names parsed once (cheaper than validating them per message).
#[derive(Debug, Clone)]
struct Names {
    msg_id: HeaderName,
    event_id: HeaderName,
    aggregate_id: HeaderName,
    commit_lsn: HeaderName,
    tx_index: HeaderName,
    origin: HeaderName,
    /// In the order of [`sticky_values`].
    sticky: [HeaderName; STICKY],
}

/// Headers from columns that usually repeat from one message to the next.
const STICKY: usize = 8;

/// The raw column values behind the sticky headers, in the order of `Names::sticky`.
fn sticky_values<'a>(
    ev: &'a OutboxEvent,
    content_type: Option<&'a Bytes>,
) -> [Option<&'a Bytes>; STICKY] {
    [
        Some(&ev.event_topic),
        ev.aggregate_type.as_ref(),
        ev.tenant_id.as_ref(),
        ev.source_bc.as_ref(),
        ev.schema_id.as_ref(),
        ev.schema_version.as_ref(),
        ev.occurred_at.as_ref(),
        content_type,
    ]
}

/// The headers of the previous message minus what changes per message.
#[derive(Debug)]
struct Template {
    map: HeaderMap,
    /// The transaction whose `Outbox-Commit-Lsn` `map` holds (`None`: a placeholder).
    commit_lsn: Option<u64>,
    /// The raw values the sticky headers in `map` were made from (`None`: no header,
    /// the column is NULL or not UTF-8). Copies, not `Bytes` slices: a slice would keep
    /// the whole WAL message it came from in memory (a row of many MB) for as long as
    /// the value repeats.
    sticky: [Option<Box<[u8]>>; STICKY],
    has_aggregate_id: bool,
}

/// A column value usable as header text: present and UTF-8 (else no header).
fn text(value: Option<&Bytes>) -> Option<&str> {
    value.and_then(|v| std::str::from_utf8(v).ok())
}

impl HeaderSet {
    pub fn new(origin: &str) -> Self {
        let n = HeaderName::from_static;
        Self {
            names: Names {
                msg_id: n(MSG_ID),
                event_id: n(EVENT_ID),
                aggregate_id: n(AGGREGATE_ID),
                commit_lsn: n(COMMIT_LSN),
                tx_index: n(TX_INDEX),
                origin: n(ORIGIN),
                sticky: [
                    n(EVENT_TOPIC),
                    n(AGGREGATE_TYPE),
                    n(TENANT_ID),
                    n(SOURCE),
                    n(SCHEMA_ID),
                    n(SCHEMA_VERSION),
                    n(OCCURRED_AT),
                    n(CONTENT_TYPE),
                ],
            },
            origin: value(origin),
            compact: false,
            content_type: None,
            cloudevents: false,
            template: Mutex::new(None),
        }
    }

    /// `outbox.content_type` (`None` or empty: rows without their own say nothing).
    pub fn with_content_type(mut self, content_type: Option<&str>) -> Self {
        self.content_type = content_type
            .filter(|c| !c.is_empty())
            .map(|c| Bytes::copy_from_slice(c.as_bytes()));
        self
    }

    /// The compact profile (`routing.headers = "compact"`).
    pub fn compact(mut self, compact: bool) -> Self {
        self.compact = compact;
        self
    }

    /// CloudEvents modes (`routing.cloudevents` not `"off"`): see the field. The
    /// `ce-*` headers themselves are added per message by
    /// [`super::cloudevents::CloudEvents::apply`], after [`HeaderSet::build`], so they are
    /// never part of the template.
    pub fn cloudevents(mut self, on: bool) -> Self {
        self.cloudevents = on;
        self.names.sticky[STICKY - 1] = HeaderName::from_static(if on {
            super::cloudevents::CONTENT_TYPE
        } else {
            CONTENT_TYPE
        });
        *self
            .template
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self
    }

    /// The column values behind the sticky headers: in the compact profile only the
    /// content type (the consumer cannot read it from the payload).
    fn sticky_values<'a>(&'a self, ev: &'a OutboxEvent) -> [Option<&'a Bytes>; STICKY] {
        let content_type = ev.content_type.as_ref().or(self.content_type.as_ref());
        if self.compact {
            let mut only = [None; STICKY];
            only[STICKY - 1] = content_type;
            return only;
        }
        sticky_values(ev, content_type)
    }

    /// Headers for one message. Column values are written through [`sanitize`]: the
    /// payload is the data, the headers are a convenience, and one odd value must not
    /// block the event.
    pub fn build(&self, ev: &OutboxEvent, pos: Position, msg_id: Option<&str>) -> HeaderMap {
        let names = &self.names;
        let aggregate_id = text(ev.aggregate_id.as_ref()).filter(|_| !self.compact);
        let mut cache = self.template.lock().unwrap_or_else(|poisoned| {
            // A panic while the template was being changed may have left it
            // half-written: rebuild it.
            self.template.clear_poison();
            let mut cache = poisoned.into_inner();
            *cache = None;
            cache
        });
        let fits = cache.as_mut().is_some_and(|t| {
            t.has_aggregate_id == aggregate_id.is_some() && self.update(t, ev).is_ok()
        });
        if !fits {
            *cache = None;
        }
        let t = cache.get_or_insert_with(|| self.template(ev, aggregate_id.is_some()));
        if t.commit_lsn != Some(pos.commit_lsn) {
            put(&mut t.map, &names.commit_lsn, &format_lsn(pos.commit_lsn));
            t.commit_lsn = Some(pos.commit_lsn);
        }
        let mut h = t.map.clone();
        drop(cache);
        // In the full profile the row id is sanitized and validated once, though two
        // headers may carry it.
        let msg_id = msg_id.map(value);
        if self.compact {
            h.insert(
                names.msg_id.clone(),
                msg_id.unwrap_or_else(|| value(ev.id_str())),
            );
        } else {
            let id = value(ev.id_str());
            h.insert(names.msg_id.clone(), msg_id.unwrap_or_else(|| id.clone()));
            h.insert(names.event_id.clone(), id);
        }
        h.insert(names.tx_index.clone(), index_value(pos.index));
        if let Some(a) = aggregate_id {
            put(&mut h, &names.aggregate_id, a);
        }
        if let Some(meta) = &ev.metadata {
            metadata_headers(&mut h, meta, self.cloudevents);
        }
        h
    }

    /// Brings the template's sticky headers to `ev`'s values; `Err` when one appears or
    /// disappears (the template must be rebuilt, see the invariant on [`HeaderSet`]).
    fn update(&self, t: &mut Template, ev: &OutboxEvent) -> Result<(), ()> {
        let values = self.sticky_values(ev);
        // Raw bytes equal: same header. Only a changed value is checked and written.
        let changed: [bool; STICKY] =
            std::array::from_fn(|i| t.sticky[i].as_deref() != values[i].map(|b| &b[..]));
        if (0..STICKY).any(|i| changed[i] && text(values[i]).is_some() != t.sticky[i].is_some()) {
            return Err(());
        }
        for i in (0..STICKY).filter(|&i| changed[i]) {
            self.keep(t, i, values[i]);
        }
        Ok(())
    }

    /// Writes sticky header `i` from column value `v` into the template (nothing when
    /// `v` is no header text).
    fn keep(&self, t: &mut Template, i: usize, v: Option<&Bytes>) {
        if let Some(s) = text(v) {
            put(&mut t.map, &self.names.sticky[i], s);
            t.sticky[i] = Some(Box::from(s.as_bytes()));
        }
    }

    /// A new template for messages shaped like `ev`.
    fn template(&self, ev: &OutboxEvent, has_aggregate_id: bool) -> Template {
        let names = &self.names;
        let mut map = HeaderMap::new();
        map.insert(names.origin.clone(), self.origin.clone());
        map.insert(names.commit_lsn.clone(), HeaderValue::new());
        // Placeholders, overwritten for every message.
        map.insert(names.msg_id.clone(), HeaderValue::new());
        if !self.compact {
            map.insert(names.event_id.clone(), HeaderValue::new());
        }
        map.insert(names.tx_index.clone(), HeaderValue::new());
        if has_aggregate_id {
            map.insert(names.aggregate_id.clone(), HeaderValue::new());
        }
        let mut t = Template {
            map,
            commit_lsn: None,
            sticky: Default::default(),
            has_aggregate_id,
        };
        for (i, v) in self.sticky_values(ev).into_iter().enumerate() {
            self.keep(&mut t, i, v);
        }
        t
    }
}

/// `Outbox-Tx-Index`'s value. `HeaderValue::from(u32)` goes through `fmt`, which was
/// most of what this header cost per message.
fn index_value(index: u32) -> HeaderValue {
    HeaderValue::from_str(itoa::Buffer::new().format(index)).unwrap_or_default()
}

/// PostgreSQL's text form of an LSN, `X/X` in hex.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

fn put(h: &mut HeaderMap, name: &HeaderName, text: &str) {
    h.insert(name.clone(), value(text));
}

/// The text server-side header lookups search for. NATS servers (2.9 and 2.10 at
/// least) find `Nats-Msg-Id` by the first occurrence of that text in the header block
/// and ignore it unless it starts a line: a value (or a name) containing it, written
/// before the real header, turns JetStream's deduplication off for the message.
const MSG_ID_TEXT: &[u8] = b"nats-msg-id";

/// `text` made safe as a header value: ASCII control characters (CR and LF would end
/// the header line and start a forged one; all but tab make readers that follow RFC 9110,
/// such as Go's `net/textproto`, reject the header block) become spaces, and `Nats-Msg-Id` in
/// any case is written with underscores (`Nats_Msg_Id`), see [`MSG_ID_TEXT`].
pub fn sanitize(text: &str) -> std::borrow::Cow<'_, str> {
    if is_clean(text) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out: String = text
        .chars()
        .map(|c| if c.is_ascii_control() { ' ' } else { c })
        .collect();
    let mut from = 0;
    while let Some(at) = find_msg_id(&out.as_bytes()[from..]) {
        let at = from + at;
        // The match is ASCII, so these one-byte ranges are character boundaries.
        out.replace_range(at + 4..at + 5, "_");
        out.replace_range(at + 8..at + 9, "_");
        from = at + MSG_ID_TEXT.len();
    }
    std::borrow::Cow::Owned(out)
}

/// `text` is written as a header value unchanged (no [`sanitize`]ing needed).
pub fn is_header_value(text: &str) -> bool {
    is_clean(text) && HeaderValue::from_str(text).is_ok()
}

/// No control character and no `Nats-Msg-Id`: usable as a header value (or, with the
/// name rules, a header name) as it is.
fn is_clean(text: &str) -> bool {
    !text.bytes().any(|b| b.is_ascii_control()) && find_msg_id(text.as_bytes()).is_none()
}

/// Where [`MSG_ID_TEXT`] starts in `bytes`, in any case. Anchored on its first `-`
/// (few values have one), as this runs for every header of every message.
pub(crate) fn find_msg_id(bytes: &[u8]) -> Option<usize> {
    bytes
        .iter()
        .enumerate()
        .skip(4)
        .filter(|&(_, &b)| b == b'-')
        .map(|(i, _)| i - 4)
        .find(|&at| {
            bytes
                .get(at..at + MSG_ID_TEXT.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(MSG_ID_TEXT))
        })
}

/// [`sanitize`]d `text` as a header value (cannot fail).
pub fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(&sanitize(text)).unwrap_or_default()
}

/// Every top-level key of the `metadata` object whose name is a valid header name and
/// whose value is a string, number or bool that needs no [`sanitize`]ing becomes a
/// header, e.g. `traceparent`. Our own names win: metadata cannot forge `Nats-*` or
/// `Outbox-*`, nor hide `Nats-Msg-Id` (see [`MSG_ID_TEXT`]). Values are read one by
/// one, so one key that cannot be a header (nested 5,000 levels deep, a number beyond
/// f64) leaves the others in place; a number is written as PostgreSQL wrote it.
///
/// In CloudEvents modes (`cloudevents`), `ce-*` and `content-type` keys (any case) are
/// left out too: the event's attributes come from its columns only.
fn metadata_headers(h: &mut HeaderMap, raw: &bytes::Bytes, cloudevents: bool) {
    let Ok(map) = serde_json::from_slice::<
        std::collections::BTreeMap<String, &serde_json::value::RawValue>,
    >(raw) else {
        return;
    };
    for (k, raw) in map {
        if !is_metadata_name(&k) || (cloudevents && is_cloudevents_name(&k)) {
            continue;
        }
        let text = raw.get();
        let value = match text.as_bytes().first() {
            Some(b'"') => match serde_json::from_str::<String>(text) {
                Ok(s) => s,
                Err(_) => continue,
            },
            Some(b'-' | b'0'..=b'9' | b't' | b'f') => text.to_string(),
            _ => continue,
        };
        if !is_clean(&value) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (HeaderName::from_str(&k), HeaderValue::from_str(&value)) {
            h.insert(name, value);
        }
    }
}

/// A CloudEvents header name: `ce-*` or `content-type`, any case.
fn is_cloudevents_name(k: &str) -> bool {
    k.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce-"))
        || k.eq_ignore_ascii_case(super::cloudevents::CONTENT_TYPE)
}

/// A metadata key usable as a header name: printable ASCII without `:`, at most 128
/// bytes, not one of ours (`Nats-*`, `Outbox-*`, any case) and not containing
/// `Nats-Msg-Id`.
fn is_metadata_name(k: &str) -> bool {
    // Per metadata key of every event: compared in place, no lowercased copy.
    let starts = |p: &str| k.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
    !k.is_empty()
        && k.len() <= 128
        && k.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        && !starts("nats-")
        && !starts("outbox-")
        && find_msg_id(k.as_bytes()).is_none()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::strategy::Strategy;

    use super::*;

    fn headers_of(edit: impl FnOnce(&mut OutboxEvent)) -> HeaderMap {
        let mut ev = OutboxEvent::new(
            Bytes::from_static(b"0b0c9d2e-0000-4000-8000-000000000001"),
            Bytes::from_static(b"created"),
            Bytes::from_static(b"{}"),
        );
        edit(&mut ev);
        HeaderSet::new("app/outbox_relay").build(&ev, Position::default(), None)
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.as_str())
    }

    /// One optional column value from a small pool, so that consecutive events often
    /// repeat it (the template's fast path) and sometimes change, vanish or are not
    /// UTF-8 (its rebuilds).
    fn column() -> impl proptest::strategy::Strategy<Value = Option<Bytes>> {
        proptest::prop_oneof![
            3 => proptest::strategy::Just(None),
            6 => proptest::sample::select(vec!["a", "b", "x\r\ny", "Nats-Msg-Id: 1"])
                .prop_map(|v| Some(Bytes::from_static(v.as_bytes()))),
            1 => proptest::strategy::Just(Some(Bytes::from_static(b"\xff\xfe"))),
        ]
    }

    fn any_event() -> impl proptest::strategy::Strategy<Value = (OutboxEvent, Position)> {
        use proptest::prelude::*;
        (
            (0u64..3, 0u32..4, "[a-c]{1,2}", column(), column(), column()),
            (column(), column(), column(), column(), column()),
            proptest::option::of(proptest::sample::select(vec![
                r#"{"traceparent": "00-1"}"#,
                r#"{"k": 1}"#,
            ])),
            column(),
        )
            .prop_map(
                |((lsn, index, id, topic, ty, agg), (tenant, src, sid, sv, at), meta, ct)| {
                    let mut ev = OutboxEvent::new(
                        Bytes::from(id),
                        topic.unwrap_or_else(|| Bytes::from_static(b"t")),
                        Bytes::from_static(b"{}"),
                    );
                    ev.aggregate_type = ty;
                    ev.aggregate_id = agg;
                    ev.tenant_id = tenant;
                    ev.source_bc = src;
                    ev.schema_id = sid;
                    ev.schema_version = sv;
                    ev.occurred_at = at;
                    ev.metadata = meta.map(|m| Bytes::from_static(m.as_bytes()));
                    ev.content_type = ct;
                    let pos = Position {
                        commit_lsn: lsn << 32 | 0x10,
                        index,
                    };
                    (ev, pos)
                },
            )
    }

    proptest::proptest! {
        /// Whatever the order of events, the template gives each message exactly the
        /// headers a template built for it alone would: no value left over from the
        /// previous message, none missing.
        #[test]
        fn template_headers_equal_fresh_headers(
            events in proptest::collection::vec(any_event(), 1..40),
            explicit_id in proptest::bool::ANY,
            default_type in proptest::option::of("[a-z]{1,3}/[a-z]{1,3}"),
        ) {
            let set = || HeaderSet::new("app/outbox_relay").with_content_type(default_type.as_deref());
            let shared = set();
            for (ev, pos) in &events {
                let msg_id = explicit_id.then_some("id:subject");
                let fresh = set().build(ev, *pos, msg_id);
                proptest::prop_assert_eq!(shared.build(ev, *pos, msg_id), fresh);
            }
        }
    }

    proptest::proptest! {
        /// The same for the compact profile: only its headers, never one left over.
        #[test]
        fn compact_template_headers_equal_fresh_headers(
            events in proptest::collection::vec(any_event(), 1..40),
            explicit_id in proptest::bool::ANY,
        ) {
            let set = || HeaderSet::new("app/outbox_relay").compact(true).with_content_type(Some("a/b"));
            let shared = set();
            for (ev, pos) in &events {
                let msg_id = explicit_id.then_some("id:subject");
                let fresh = set().build(ev, *pos, msg_id);
                proptest::prop_assert_eq!(shared.build(ev, *pos, msg_id), fresh);
            }
        }
    }

    /// Which id each profile writes where, for ids that need sanitizing too: the row id
    /// in `Outbox-Event-Id` (full profile only), the given message id or else the row id
    /// in `Nats-Msg-Id`, each exactly as [`value`] makes it.
    #[test]
    fn the_row_id_and_the_message_id_go_where_each_profile_says() {
        let pos = Position {
            commit_lsn: 0x10,
            index: 7,
        };
        for id in [
            "order-1",
            "",
            "a\r\nNats-Msg-Id: forged",
            "x-nats-msg-id",
            "tenant:7:o",
        ] {
            let ev = OutboxEvent::new(
                Bytes::copy_from_slice(id.as_bytes()),
                Bytes::from_static(b"t"),
                Bytes::from_static(b"{}"),
            );
            for compact in [false, true] {
                for msg_id in [None, Some("m:orders.eu"), Some("m\nNats-Msg-Id")] {
                    let h = HeaderSet::new("o").compact(compact).build(&ev, pos, msg_id);
                    let want_msg = value(msg_id.unwrap_or(id));
                    assert_eq!(
                        h.get(MSG_ID),
                        Some(&want_msg),
                        "{id:?} {compact} {msg_id:?}"
                    );
                    let want_event = (!compact).then(|| value(id));
                    assert_eq!(h.get(EVENT_ID), want_event.as_ref(), "{id:?} {compact}");
                    assert_eq!(h.get(TX_INDEX).map(|v| v.as_str()), Some("7"));
                }
            }
        }
    }

    /// `routing.headers = "compact"`: the message id, the position and the origin (the
    /// exactly-once proof needs all four), and metadata headers; nothing from columns.
    #[test]
    fn compact_profile_keeps_id_position_origin_and_metadata() {
        let (mut ev, pos) = full_row();
        ev.metadata = Some(Bytes::from_static(br#"{"traceparent":"00-abc-def-01"}"#));
        let h = HeaderSet::new("app/outbox_relay")
            .compact(true)
            .build(&ev, pos, None);
        let mut names: Vec<String> = h.iter().map(|(k, _)| k.to_string()).collect();
        names.sort();
        assert_eq!(names, [MSG_ID, COMMIT_LSN, ORIGIN, TX_INDEX, "traceparent"]);
        assert_eq!(h.get(MSG_ID).map(|v| v.as_str()), Some("id-1"));
        assert_eq!(h.get(COMMIT_LSN).map(|v| v.as_str()), Some("1/A0"));
        assert_eq!(h.get(TX_INDEX).map(|v| v.as_str()), Some("3"));
    }

    /// `Content-Type`: the row's own, else `outbox.content_type`, else none; kept by the
    /// compact profile (a consumer cannot read it from the payload).
    #[test]
    fn content_type_from_the_row_or_the_config() {
        let (mut ev, pos) = full_row();
        let plain = HeaderSet::new("o");
        assert_eq!(get(&plain.build(&ev, pos, None), CONTENT_TYPE), None);
        let with_default = HeaderSet::new("o").with_content_type(Some("application/octet-stream"));
        let h = with_default.build(&ev, pos, None);
        assert_eq!(get(&h, CONTENT_TYPE), Some("application/octet-stream"));
        ev.content_type = Some(Bytes::from_static(b"image/png"));
        assert_eq!(
            get(&with_default.build(&ev, pos, None), CONTENT_TYPE),
            Some("image/png")
        );
        let compact = HeaderSet::new("o")
            .compact(true)
            .with_content_type(Some("x/y"));
        let h = compact.build(&ev, pos, None);
        assert_eq!(get(&h, CONTENT_TYPE), Some("image/png"));
        assert_eq!(
            h.len(),
            5,
            "compact: id, position, origin and the content type"
        );
        assert_eq!(
            HeaderSet::new("o").with_content_type(Some("")).content_type,
            None
        );
    }

    /// A row with every column that becomes a header set, at position (1/A0, 3).
    fn full_row() -> (OutboxEvent, Position) {
        let mut ev = OutboxEvent::new(
            Bytes::from_static(b"id-1"),
            Bytes::from_static(b"created"),
            Bytes::from_static(b"{}"),
        );
        let col = |v: &'static str| Some(Bytes::from_static(v.as_bytes()));
        ev.aggregate_type = col("order");
        ev.aggregate_id = col("42");
        ev.tenant_id = col("acme");
        ev.source_bc = col("sales");
        ev.schema_id = col("s1");
        ev.schema_version = col("2");
        ev.occurred_at = col("2026-12-02 08:00:00+00");
        let pos = Position {
            commit_lsn: 0x1_0000_00A0,
            index: 3,
        };
        (ev, pos)
    }

    #[test]
    fn every_header_from_a_full_row() {
        let (ev, pos) = full_row();
        let set = HeaderSet::new("app/outbox_relay");
        // Twice: the second comes from the template.
        for _ in 0..2 {
            let h = set.build(&ev, pos, None);
            let want = [
                (ORIGIN, "app/outbox_relay"),
                (MSG_ID, "id-1"),
                (EVENT_ID, "id-1"),
                (EVENT_TOPIC, "created"),
                (AGGREGATE_TYPE, "order"),
                (AGGREGATE_ID, "42"),
                (TENANT_ID, "acme"),
                (SOURCE, "sales"),
                (SCHEMA_ID, "s1"),
                (SCHEMA_VERSION, "2"),
                (OCCURRED_AT, "2026-12-02 08:00:00+00"),
                (COMMIT_LSN, "1/A0"),
                (TX_INDEX, "3"),
            ];
            for (name, value) in want {
                assert_eq!(get(&h, name), Some(value), "{name}");
            }
            assert_eq!(h.len(), want.len());
        }
    }

    /// A NATS server looks `Nats-Msg-Id` up by the first occurrence of the text in the
    /// header block: row data containing it, serialised first, disabled deduplication
    /// (seen with nats-server 2.9.10).
    #[test]
    fn row_data_cannot_hide_the_msg_id() {
        let h = headers_of(|ev| {
            ev.aggregate_id = Some(Bytes::from_static(b"x Nats-Msg-Id: y"));
            ev.tenant_id = Some(Bytes::from_static(b"NATS-MSG-ID"));
            ev.metadata = Some(Bytes::from_static(
                br#"{"X-Nats-Msg-Id": "1", "note": "see nats-msg-id", "traceparent": "00-1"}"#,
            ));
        });
        for (name, values) in h.iter() {
            let name: &str = name.as_ref();
            if name == MSG_ID {
                continue;
            }
            let texts = std::iter::once(name).chain(values.iter().map(|v| v.as_str()));
            for t in texts {
                assert!(find_msg_id(t.as_bytes()).is_none(), "{name}: {t:?}");
            }
        }
        assert_eq!(
            get(&h, MSG_ID),
            Some("0b0c9d2e-0000-4000-8000-000000000001")
        );
        assert_eq!(get(&h, AGGREGATE_ID), Some("x Nats_Msg_Id: y"));
        assert_eq!(get(&h, TENANT_ID), Some("NATS_MSG_ID"));
        assert_eq!(get(&h, "traceparent"), Some("00-1"));
        assert_eq!(get(&h, "X-Nats-Msg-Id"), None);
        assert_eq!(get(&h, "note"), None);
    }

    /// CR/LF would end the line; other control characters make readers that follow
    /// RFC 9110 (Go's `net/textproto`) reject the header block.
    #[test]
    fn control_characters_become_spaces_or_leave_metadata_out() {
        let h = headers_of(|ev| {
            ev.aggregate_id = Some(Bytes::from_static(b"a\x1b[31mb\x7f\tc\r\nd"));
            ev.metadata = Some(Bytes::from_static(
                br#"{"ansi": "\u001b[0m", "tab": "a\tb", "crlf": "a\r\nb", "ok": "a b"}"#,
            ));
        });
        assert_eq!(get(&h, AGGREGATE_ID), Some("a [31mb  c  d"));
        assert_eq!(get(&h, "ansi"), None);
        assert_eq!(get(&h, "tab"), None);
        assert_eq!(get(&h, "crlf"), None);
        assert_eq!(get(&h, "ok"), Some("a b"));
        assert_eq!(sanitize("plain"), std::borrow::Cow::Borrowed("plain"));
    }

    /// One metadata value that is no header (5,000 levels deep, beyond f64) used to
    /// make the whole object unreadable and drop every metadata header.
    #[test]
    fn one_bad_metadata_value_leaves_the_others() {
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let big = format!("1{}", "0".repeat(400));
        let meta = format!(
            r#"{{"deep": {deep}, "big": {big}, "price": 1.50, "ok": true, "nul": null, "obj": {{"a": 1}}, "traceparent": "00-1"}}"#
        );
        let h = headers_of(|ev| ev.metadata = Some(Bytes::from(meta)));
        assert_eq!(get(&h, "traceparent"), Some("00-1"));
        assert_eq!(get(&h, "price"), Some("1.50"));
        assert_eq!(get(&h, "ok"), Some("true"));
        assert_eq!(get(&h, "big"), Some(big.as_str()));
        for absent in ["deep", "nul", "obj"] {
            assert_eq!(get(&h, absent), None, "{absent}");
        }
    }

    #[test]
    fn metadata_names_must_be_header_names() {
        let long = "k".repeat(129);
        let meta = format!(
            r#"{{"a b": "1", "": "2", "ключ": "3", "a:b": "4", "x\u0001": "5", "{long}": "6", "nats-expected-stream": "7", "OUTBOX-TENANT-ID": "8", "ok-key": "9"}}"#
        );
        let h = headers_of(|ev| ev.metadata = Some(Bytes::from(meta)));
        let names: Vec<&str> = h
            .iter()
            .map(|(n, _)| -> &str { n.as_ref() })
            .filter(|n| !n.starts_with("Nats-") && !n.starts_with("Outbox-"))
            .collect();
        assert_eq!(names, ["ok-key"]);
    }
}
