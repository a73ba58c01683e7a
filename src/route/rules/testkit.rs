//! Fixtures shared by the rules tests: an event, rules from TOML, error text.

use bytes::Bytes;
use serde_json::Value;

use super::{RoutedTarget, Rules};
use crate::decode::OutboxEvent;

pub(super) const PAYLOAD: &str = r#"{"id": "p-1", "price": 1500, "ratio": 0.5, "name": "widget",
        "visible": true, "tags": ["a", "b"], "nothing": null, "neg": -3,
        "big": 18446744073709551615, "total": 99, "internal_notes": "secret",
        "customer": {"id": 7, "tier": "gold", "address": {"city": "Oslo"}},
        "items": [{"sku": "x", "qty": 2}]}"#;

pub(super) fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub(super) fn event(payload: &str) -> OutboxEvent {
    OutboxEvent {
        id: b("0b0c9d2e-0000-4000-8000-000000000001"),
        event_topic: b("order.created"),
        payload: b(payload),
        aggregate_type: Some(b("order")),
        aggregate_id: Some(b("42")),
        tenant_id: Some(b("acme")),
        source_bc: Some(b("sales")),
        destination_topics: None,
        schema_id: None,
        schema_version: Some(b("2")),
        metadata: Some(b(
            r#"{"traceparent": "00-abc-def-01", "user_id": 9, "region": "eu"}"#,
        )),
        occurred_at: Some(b("2026-11-23 03:55:33.1+00")),
        created_at: None,
        content_type: None,
    }
}

pub(super) fn rules(text: &str) -> Rules {
    match Rules::from_toml(text) {
        Ok(r) => r,
        Err(e) => panic!("rules do not compile: {e}\n{text}"),
    }
}

pub(super) fn one_target(target_body: &str) -> Rules {
    rules(&format!(
        "[[route]]\nname = \"r\"\n[[route.targets]]\nsubject = \"s\"\n{target_body}\n"
    ))
}

pub(super) fn holds_on(conditions: &str, ev: &OutboxEvent) -> bool {
    !one_target(&format!("conditions = {conditions}"))
        .evaluate(ev)
        .is_empty()
}

pub(super) fn err(text: &str) -> String {
    match Rules::from_toml(text) {
        Ok(_) => panic!("expected an error for\n{text}"),
        Err(e) => e.to_string(),
    }
}

pub(super) fn target_err(target_body: &str) -> String {
    err(&format!(
        "[[route]]\nname = \"r\"\n[[route.targets]]\nsubject = \"s\"\n{target_body}\n"
    ))
}

pub(super) fn payload_json(t: &RoutedTarget) -> Value {
    serde_json::from_slice(&t.payload).unwrap()
}
