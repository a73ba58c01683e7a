//! Message headers. The names are part of the external contract (README, "Headers").
//!
//! `Nats-Msg-Id` is the row id, so JetStream drops a replayed copy inside the stream's
//! duplicate window; `Outbox-Commit-Lsn` + `Outbox-Tx-Index` are the event's position,
//! which lets a restart reconcile with what a stream already holds beyond that window.

use std::str::FromStr;

use async_nats::{HeaderMap, HeaderName, HeaderValue};

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
/// Dead letters only: why the event could not be published, and where it was going.
pub const DLQ_REASON: &str = "Outbox-Dlq-Reason";
pub const DLQ_SUBJECT: &str = "Outbox-Dlq-Original-Subject";

/// Every header name the relay sets itself, for the README and for tests.
pub fn header_names() -> [&'static str; 15] {
    [
        ORIGIN,
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
    ]
}

/// Header names parsed once, cloned per message (cheaper than validating each time).
#[derive(Debug, Clone)]
pub struct HeaderSet {
    names: [HeaderName; 12],
    origin: (HeaderName, HeaderValue),
}

impl HeaderSet {
    pub fn new(origin: &str) -> Self {
        let n = HeaderName::from_static;
        let origin_value =
            HeaderValue::from_str(&origin.replace(['\r', '\n'], " ")).unwrap_or_default();
        Self {
            origin: (n(ORIGIN), origin_value),
            names: [
                n(MSG_ID),
                n(EVENT_ID),
                n(EVENT_TOPIC),
                n(AGGREGATE_TYPE),
                n(AGGREGATE_ID),
                n(TENANT_ID),
                n(SOURCE),
                n(SCHEMA_ID),
                n(SCHEMA_VERSION),
                n(OCCURRED_AT),
                n(COMMIT_LSN),
                n(TX_INDEX),
            ],
        }
    }

    /// Headers for one message. A column value that cannot be a header value (CR or LF)
    /// is written with those characters replaced by spaces: the payload is the data, the
    /// headers are a convenience, and one odd value must not block the event.
    pub fn build(&self, ev: &OutboxEvent, pos: Position, msg_id: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        let [
            msg,
            id,
            topic,
            agg_type,
            agg_id,
            tenant,
            source,
            schema_id,
            schema_version,
            occurred,
            lsn,
            index,
        ] = &self.names;
        let id_str = ev.id_str();
        put(&mut h, msg, msg_id.unwrap_or(id_str));
        put(&mut h, id, id_str);
        put_bytes(&mut h, topic, Some(&ev.event_topic));
        put_bytes(&mut h, agg_type, ev.aggregate_type.as_ref());
        put_bytes(&mut h, agg_id, ev.aggregate_id.as_ref());
        put_bytes(&mut h, tenant, ev.tenant_id.as_ref());
        put_bytes(&mut h, source, ev.source_bc.as_ref());
        put_bytes(&mut h, schema_id, ev.schema_id.as_ref());
        put_bytes(&mut h, schema_version, ev.schema_version.as_ref());
        put_bytes(&mut h, occurred, ev.occurred_at.as_ref());
        put(&mut h, lsn, &format_lsn(pos.commit_lsn));
        h.insert(index.clone(), HeaderValue::from(pos.index));
        h.insert(self.origin.0.clone(), self.origin.1.clone());
        if let Some(meta) = &ev.metadata {
            metadata_headers(&mut h, meta);
        }
        h
    }
}

/// PostgreSQL's text form of an LSN, `X/X` in hex.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

fn put(h: &mut HeaderMap, name: &HeaderName, value: &str) {
    let v = HeaderValue::from_str(value).unwrap_or_else(|_| {
        HeaderValue::from_str(&value.replace(['\r', '\n'], " ")).unwrap_or_default()
    });
    h.insert(name.clone(), v);
}

fn put_bytes(h: &mut HeaderMap, name: &HeaderName, value: Option<&bytes::Bytes>) {
    if let Some(v) = value
        && let Ok(s) = std::str::from_utf8(v)
    {
        put(h, name, s);
    }
}

/// Every top-level key of the `metadata` object whose name is a valid header name and
/// whose value is a string, number or bool without CR/LF becomes a header, e.g.
/// `traceparent`. Our own names win: metadata cannot forge `Nats-*` or `Outbox-*`.
fn metadata_headers(h: &mut HeaderMap, raw: &bytes::Bytes) {
    let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(raw) else {
        return;
    };
    for (k, v) in map {
        let lower = k.to_ascii_lowercase();
        if lower.starts_with("nats-") || lower.starts_with("outbox-") {
            continue;
        }
        let value = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => continue,
        };
        let valid_name =
            !k.is_empty() && k.len() <= 128 && k.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !valid_name {
            continue;
        }
        if let (Ok(name), Ok(value)) = (HeaderName::from_str(&k), HeaderValue::from_str(&value)) {
            h.insert(name, value);
        }
    }
}
