//! Table-less events: a transactional `pg_logical_emit_message(true, prefix, json)`
//! turned into an [`OutboxEvent`], so it is routed and published like an outbox row.
//!
//! The JSON object carries the row's fields: `event_topic` and `payload` required;
//! `id`, `aggregate_type`, `aggregate_id`, `tenant_id`, `source_bc`, `schema_id`,
//! `schema_version`, `occurred_at`, `destination_topics`, `metadata` optional. Without an
//! `id` the event is named after its WAL position (`msg-<lsn>`), which is the same on
//! every replay, so `Nats-Msg-Id` deduplication still holds. `payload`, `metadata` and
//! `destination_topics` are kept as the JSON text of the message, byte for byte (zero
//! copy: slices of the message).

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::OutboxEvent;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Shape<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    event_topic: &'a RawValue,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(borrow)]
    aggregate_type: Option<&'a RawValue>,
    #[serde(borrow)]
    aggregate_id: Option<&'a RawValue>,
    #[serde(borrow)]
    tenant_id: Option<&'a RawValue>,
    #[serde(borrow)]
    source_bc: Option<&'a RawValue>,
    #[serde(borrow)]
    schema_id: Option<&'a RawValue>,
    #[serde(borrow)]
    schema_version: Option<&'a RawValue>,
    #[serde(borrow)]
    occurred_at: Option<&'a RawValue>,
    #[serde(borrow)]
    destination_topics: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    content_type: Option<&'a RawValue>,
}

/// The id of a message event without one: its WAL position, the same on every replay.
fn position_id(lsn: u64) -> Bytes {
    Bytes::from(format!("msg-{}", crate::route::format_lsn(lsn)))
}

/// A message with our prefix that is not an outbox event, as an event to dead-letter
/// as it is (named after its position).
pub fn invalid_message_event(content: &Bytes, lsn: u64) -> OutboxEvent {
    OutboxEvent::new(
        position_id(lsn),
        Bytes::from_static(b"invalid_message"),
        content.clone(),
    )
}

/// The event in a logical message's `content`, emitted at WAL position `lsn`.
pub fn event_from_message(content: &Bytes, lsn: u64) -> Result<OutboxEvent, String> {
    let shape: Shape<'_> = serde_json::from_slice(content).map_err(|e| {
        format!("logical message is not an outbox event object ({e}); see the JSON shape in docs/routing.md")
    })?;
    // A RawValue borrows from `content`: its text is a sub-slice, found by address.
    let raw = |v: &RawValue| -> Bytes {
        let text = v.get().as_bytes();
        let start = (text.as_ptr() as usize).saturating_sub(content.as_ptr() as usize);
        content.slice(start..start + text.len())
    };
    let null = |v: &&RawValue| v.get() != "null";
    let text = |name: &str, v: Option<&RawValue>| -> Result<Option<Bytes>, String> {
        let Some(v) = v.filter(null) else {
            return Ok(None);
        };
        match serde_json::from_str::<serde_json::Value>(v.get()) {
            Ok(serde_json::Value::String(s)) => Ok(Some(Bytes::from(s))),
            Ok(serde_json::Value::Number(n)) => Ok(Some(Bytes::from(n.to_string()))),
            _ => Err(format!("logical message field {name} must be a string")),
        }
    };
    let event_topic = text("event_topic", Some(shape.event_topic))?
        .filter(|t| !t.is_empty())
        .ok_or("logical message field event_topic must be a non-empty string")?;
    let id = match text("id", shape.id)? {
        Some(id) => id,
        None => position_id(lsn),
    };
    Ok(OutboxEvent {
        id,
        event_topic,
        payload: raw(shape.payload),
        aggregate_type: text("aggregate_type", shape.aggregate_type)?,
        aggregate_id: text("aggregate_id", shape.aggregate_id)?,
        tenant_id: text("tenant_id", shape.tenant_id)?,
        source_bc: text("source_bc", shape.source_bc)?,
        destination_topics: shape.destination_topics.filter(null).map(raw),
        schema_id: text("schema_id", shape.schema_id)?,
        schema_version: text("schema_version", shape.schema_version)?,
        metadata: shape.metadata.filter(null).map(raw),
        occurred_at: text("occurred_at", shape.occurred_at)?,
        created_at: None,
        content_type: text("content_type", shape.content_type)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(json: &str) -> Result<OutboxEvent, String> {
        event_from_message(&Bytes::from(json.to_string()), 0x16B_3748)
    }

    #[test]
    fn fields_and_payload_bytes() {
        let e = ev(
            r#"{"event_topic": "created", "aggregate_type": "order", "schema_version": 2,
                      "payload": {"b": 1,  "a": [1, 2]}, "metadata": {"traceparent": "00-x"}}"#,
        )
        .unwrap();
        assert_eq!(e.event_topic_str(), "created");
        assert_eq!(e.aggregate_type.as_deref(), Some(&b"order"[..]));
        assert_eq!(e.schema_version.as_deref(), Some(&b"2"[..]));
        assert_eq!(
            &e.payload[..],
            br#"{"b": 1,  "a": [1, 2]}"#,
            "byte for byte"
        );
        assert_eq!(
            e.metadata.as_deref(),
            Some(&br#"{"traceparent": "00-x"}"#[..])
        );
        assert_eq!(e.id_str(), "msg-0/16B3748", "named after its position");
    }

    #[test]
    fn explicit_id_and_nulls() {
        let e = ev(
            r#"{"id": "e-1", "event_topic": "t", "payload": "x", "tenant_id": null,
                      "destination_topics": null}"#,
        )
        .unwrap();
        assert_eq!(e.id_str(), "e-1");
        assert!(e.tenant_id.is_none() && e.destination_topics.is_none());
        assert_eq!(&e.payload[..], br#""x""#);
    }

    #[test]
    fn refusals_say_why() {
        for (json, needle) in [
            ("not json", "not an outbox event object"),
            (r#"{"payload": {}}"#, "event_topic"),
            (r#"{"event_topic": "t"}"#, "payload"),
            (r#"{"event_topic": "", "payload": 1}"#, "non-empty"),
            (
                r#"{"event_topic": ["x"], "payload": 1}"#,
                "must be a string",
            ),
            (r#"{"event_topic": "t", "payload": 1, "extra": 1}"#, "extra"),
        ] {
            let err = ev(json).unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
