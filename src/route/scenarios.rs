//! The scenarios of docs/routing.md ("Scenarios from the smart-routing guide"), read
//! from the page itself, compiled and run through the router: the documented examples
//! are exactly what the relay does.

use bytes::Bytes;

use super::rules::Rules;
use super::{Envelope, Router, Template};
use crate::decode::OutboxEvent;

const DOC: &str = include_str!("../../docs/routing.md");

/// The TOML block of docs/routing.md that starts with `# scenario: <name>`.
fn scenario(name: &str) -> Router {
    let marker = format!("# scenario: {name}\n");
    let start = DOC
        .find(&marker)
        .unwrap_or_else(|| panic!("docs/routing.md has no block {marker:?}"));
    let end = DOC[start..]
        .find("```")
        .map(|e| start + e)
        .expect("block end");
    let rules = Rules::from_toml(&DOC[start..end])
        .unwrap_or_else(|e| panic!("scenario {name} does not compile: {e}"));
    Router::new(
        Template::parse("outbox.{aggregate_type}.{event_topic}").expect("template"),
        "app/outbox_relay",
    )
    .with_rules(Some(rules))
}

fn event(id: &str, agg: &str, topic: &str, payload: &str) -> OutboxEvent {
    let mut ev = OutboxEvent::new(
        Bytes::copy_from_slice(id.as_bytes()),
        Bytes::copy_from_slice(topic.as_bytes()),
        Bytes::copy_from_slice(payload.as_bytes()),
    );
    ev.aggregate_type = Some(Bytes::copy_from_slice(agg.as_bytes()));
    ev.aggregate_id = Some(Bytes::from_static(b"42"));
    ev.tenant_id = Some(Bytes::from_static(b"acme"));
    ev
}

fn route(r: &Router, ev: &OutboxEvent) -> Vec<Envelope> {
    r.route(ev, 0x1_0000_0010, &mut 0)
}

fn subjects(envs: &[Envelope]) -> Vec<&str> {
    assert!(envs.iter().all(|e| e.dead_letter.is_none()), "{envs:?}");
    envs.iter().map(|e| e.subject.as_str()).collect()
}

fn json(e: &Envelope) -> serde_json::Value {
    serde_json::from_slice(&e.payload).expect("json payload")
}

const ID: &str = "0b0c9d2e-0000-4000-8000-000000000001";

#[test]
fn high_value_orders_go_to_a_second_subject_trimmed() {
    let r = scenario("high-value");
    let payload = r#"{"id": "p1", "name": "lamp", "price": 1500, "visible": true, "cost": 900}"#;
    let envs = route(&r, &event(ID, "product", "updated", payload));
    assert_eq!(
        subjects(&envs),
        ["outbox.search.index", "outbox.vip.notifications"]
    );
    assert_eq!(&envs[0].payload[..], payload.as_bytes(), "untouched bytes");
    assert_eq!(
        json(&envs[1]),
        serde_json::json!({"id": "p1", "name": "lamp", "price": 1500})
    );
    // Cheap and visible: the index only. Neither: the fallback.
    let cheap = route(
        &r,
        &event(
            ID,
            "product",
            "updated",
            r#"{"price": 10, "visible": true}"#,
        ),
    );
    assert_eq!(subjects(&cheap), ["outbox.search.index"]);
    let hidden = route(
        &r,
        &event(
            ID,
            "product",
            "updated",
            r#"{"price": 10, "visible": false}"#,
        ),
    );
    assert_eq!(subjects(&hidden), ["outbox.default.events"]);
    // A price that is not a number is not > 1000 (never an error).
    let odd = route(&r, &event(ID, "product", "updated", r#"{"price": "1500"}"#));
    assert_eq!(subjects(&odd), ["outbox.default.events"]);
}

#[test]
fn tenant_fan_out_under_each_tenant_and_to_audit() {
    let r = scenario("tenant-fan-out");
    let envs = route(&r, &event(ID, "order", "placed", r#"{"total": 5}"#));
    assert_eq!(
        subjects(&envs),
        ["outbox.tenants.acme.orders.placed", "outbox.audit.orders"]
    );
    assert_eq!(
        json(&envs[1]),
        serde_json::json!({"total": 5, "tenant": "acme"})
    );
    assert_eq!(
        envs[1].headers.get("X-Tenant").map(|v| v.as_str()),
        Some("acme")
    );
    assert!(envs.iter().all(|e| e.all_or_nothing));
    let mut other = event(ID, "order", "placed", "{}");
    other.tenant_id = Some(Bytes::from_static(b"globex"));
    assert_eq!(
        subjects(&route(&r, &other))[0],
        "outbox.tenants.globex.orders.placed"
    );
}

#[test]
fn sampling_sends_a_stable_tenth_to_analytics() {
    let r = scenario("sampling");
    let mut sampled = 0;
    for i in 0..2000 {
        let id = format!("0b0c9d2e-0000-4000-8000-{i:012}");
        let ev = event(&id, "page", "page.viewed", "{}");
        let envs = route(&r, &ev);
        assert_eq!(envs[0].subject, "outbox.web.page-viewed");
        if envs.len() == 2 {
            assert_eq!(envs[1].subject, "outbox.analytics.events");
            sampled += 1;
        }
        // A replay decides the same.
        assert_eq!(route(&r, &ev).len(), envs.len());
    }
    assert!((150..=250).contains(&sampled), "{sampled} of 2000 sampled");
}

#[test]
fn fallback_takes_the_unmatched_and_the_unrenderable() {
    let r = scenario("fallback");
    let high = route(&r, &event(ID, "job", "queued", r#"{"priority": "high"}"#));
    assert_eq!(subjects(&high), ["outbox.urgent.processing.42"]);
    let normal = route(&r, &event(ID, "job", "queued", r#"{"priority": "normal"}"#));
    assert_eq!(subjects(&normal), ["outbox.normal.processing"]);
    let low = route(&r, &event(ID, "job", "queued", r#"{"priority": "low"}"#));
    assert_eq!(subjects(&low), ["outbox.backup.service"]);
    // High, but the subject needs aggregate_id, which is NULL: best_effort falls back.
    let mut no_id = event(ID, "job", "queued", r#"{"priority": "high"}"#);
    no_id.aggregate_id = None;
    assert_eq!(subjects(&route(&r, &no_id)), ["outbox.backup.service"]);
}
