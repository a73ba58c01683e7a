//! End-to-end evaluation: route order, targets and fallback, strategy, headers, delay,
//! subjects, and the example of the module docs.

use super::testkit::{PAYLOAD, b, event, one_target, payload_json, rules};
use super::{Decision, Strategy, TargetRef};

#[test]
fn first_matching_route_wins_in_file_order() {
    let r = rules(
        r#"
[[route]]
name = "other-tenant"
match = { tenant_id = "globex" }
[[route.targets]]
subject = "globex"

[[route]]
name = "orders"
match = { event_topic = ["order.created", "order.paid"], aggregate_type = "order" }
[[route.targets]]
subject = "orders.{tenant_id}"

[[route]]
name = "catch-all"
[[route.targets]]
subject = "all"
"#,
    );
    let ev = event(PAYLOAD);
    assert_eq!(
        r.decide(&ev),
        Decision::Routed {
            route: 1,
            targets: r.evaluate(&ev),
        }
    );
    assert_eq!(r.evaluate(&ev)[0].subject, Ok("orders.acme".to_string()));
    assert_eq!(r.route_name(1), Some("orders"));

    let mut ev2 = ev.clone();
    ev2.tenant_id = Some(b("globex"));
    assert_eq!(r.evaluate(&ev2)[0].subject, Ok("globex".to_string()));

    let mut ev3 = ev.clone();
    ev3.event_topic = b("order.shipped");
    assert_eq!(r.evaluate(&ev3)[0].subject, Ok("all".to_string()));

    // A NULL column never matches a constrained key.
    let mut ev4 = ev.clone();
    ev4.aggregate_type = None;
    assert_eq!(r.evaluate(&ev4)[0].route, 2);

    let no_catch_all = rules(
        r#"
[[route]]
name = "only-globex"
match = { tenant_id = ["globex", "initech"], source_bc = "sales" }
[[route.targets]]
subject = "x"
"#,
    );
    assert_eq!(no_catch_all.decide(&ev), Decision::Unmatched);
    assert!(no_catch_all.evaluate(&ev).is_empty());
    assert_eq!(no_catch_all.len(), 1);
    assert!(!no_catch_all.is_empty());
    assert!(rules("").is_empty());
    assert_eq!(rules("").decide(&ev), Decision::Unmatched);
}

#[test]
fn targets_fallback_strategy_headers_delay() {
    let r = rules(
        r#"
[[route]]
name = "products"
strategy = "all_or_nothing"
fallback = { subject = "default.events", headers = { "X-Fallback" = "yes" } }

[[route.targets]]
subject = "search.index"
conditions = { "payload.visible" = true }

[[route.targets]]
subject = "vip.notifications"
conditions = { "payload.price" = { "$gt" = 1000 } }
transform = { include_fields = ["id", "name", "price"] }
headers = { "X-Priority" = "high", "X-Tenant" = "{tenant_id}", "X-Schema" = "{schema_id}", "X-Trace" = "{metadata.traceparent}" }
delay_seconds = 30
"#,
    );
    let out = r.evaluate(&event(PAYLOAD));
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].target, TargetRef::Target(0));
    assert_eq!(out[0].subject, Ok("search.index".to_string()));
    assert_eq!(out[0].strategy, Strategy::AllOrNothing);
    assert_eq!(out[0].delay_seconds, 0);
    assert!(out[0].headers.is_empty());
    assert_eq!(out[1].target, TargetRef::Target(1));
    assert_eq!(out[1].subject, Ok("vip.notifications".to_string()));
    assert_eq!(out[1].delay_seconds, 30);
    assert_eq!(
        payload_json(&out[1]),
        serde_json::json!({"id": "p-1", "name": "widget", "price": 1500})
    );
    // A header whose placeholder is NULL is left out.
    assert_eq!(
        out[1].headers,
        vec![
            ("X-Priority".to_string(), "high".to_string()),
            ("X-Tenant".to_string(), "acme".to_string()),
            ("X-Trace".to_string(), "00-abc-def-01".to_string()),
        ]
    );
    assert_eq!(r.max_delay_seconds(), 30);
    assert_eq!(
        r.delayed_targets(),
        vec![(
            "route \"products\" targets[1]".to_string(),
            "vip.notifications",
            30
        )]
    );

    // One target selected: no fallback.
    let out = r.evaluate(&event(r#"{"visible": true, "price": 1}"#));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].subject, Ok("search.index".to_string()));

    // None selected: the fallback, untouched payload.
    let raw = r#"{"visible": false, "price": 1}"#;
    let out = r.evaluate(&event(raw));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].target, TargetRef::Fallback);
    assert_eq!(out[0].subject, Ok("default.events".to_string()));
    assert_eq!(out[0].payload.as_ref(), raw.as_bytes());
    assert_eq!(
        out[0].headers,
        vec![("X-Fallback".to_string(), "yes".to_string())]
    );
    assert_eq!(out[0].strategy, Strategy::AllOrNothing);

    // On demand, for a target that fails at publish time.
    let fb = r.fallback(0, &event(PAYLOAD)).unwrap();
    assert_eq!(fb.subject, Ok("default.events".to_string()));
    assert_eq!(fb.target, TargetRef::Fallback);
    assert!(r.fallback(1, &event(PAYLOAD)).is_none());
}

#[test]
fn matched_route_without_fallback_may_select_nothing() {
    let r = one_target(r#"conditions = { "payload.price" = { "$gt" = 1000000 } }"#);
    let ev = event(PAYLOAD);
    assert_eq!(
        r.decide(&ev),
        Decision::Routed {
            route: 0,
            targets: vec![]
        }
    );
    assert!(r.fallback(0, &ev).is_none());
    assert_eq!(r.max_delay_seconds(), 0);
    // Default strategy.
    assert_eq!(
        one_target("").evaluate(&ev)[0].strategy,
        Strategy::BestEffort
    );
}

#[test]
fn subject_templates_render_and_fail_with_reason() {
    let r = one_target("");
    assert_eq!(r.evaluate(&event(PAYLOAD))[0].subject, Ok("s".to_string()));

    let r = rules(
        r#"
[[route]]
name = "tenants"
[[route.targets]]
subject = "t.{tenant_id}.{aggregate_type}"
"#,
    );
    let mut ev = event(PAYLOAD);
    ev.aggregate_type = Some(b("big order"));
    assert_eq!(
        r.evaluate(&ev)[0].subject,
        Ok("t.acme.big_order".to_string())
    );
    ev.tenant_id = None;
    assert_eq!(
        r.evaluate(&ev)[0].subject,
        Err(
            "route \"tenants\" targets[0]: subject needs field tenant_id but it is null or empty"
                .to_string()
        )
    );
    ev.tenant_id = Some(b(""));
    assert!(r.evaluate(&ev)[0].subject.is_err());
    ev.tenant_id = Some(b(&"x".repeat(300)));
    let e = r.evaluate(&ev)[0].subject.clone().unwrap_err();
    assert!(
        e.starts_with("route \"tenants\" targets[0]: subject: "),
        "{e}"
    );
}

#[test]
fn header_values_replace_cr_lf() {
    let mut ev = event(PAYLOAD);
    ev.tenant_id = Some(b("a\r\nb"));
    let out = one_target(r#"headers = { "X-T" = "{tenant_id}" }"#).evaluate(&ev);
    assert_eq!(
        out[0].headers,
        vec![("X-T".to_string(), "a  b".to_string())]
    );
}

#[test]
fn example_in_module_docs_compiles() {
    let r = rules(
        r#"
[[route]]
name = "orders"
match = { event_topic = ["order.created", "order.paid"], tenant_id = "acme" }
strategy = "all_or_nothing"
fallback = { subject = "orders.other" }

[[route.targets]]
subject = "orders.{tenant_id}.{event_topic}"

[[route.targets]]
subject = "orders.vip"
conditions = { "payload.price" = { "$gt" = 1000 }, "payload.visible" = true }
transform = { include_fields = ["id", "name", "price"], add_fields = { tenant = "{tenant_id}" } }
headers = { "X-Priority" = "high" }
delay_seconds = 0

[[route.targets]]
subject = "analytics.orders"
sampling_rate = 0.1
"#,
    );
    let out = r.evaluate(&event(PAYLOAD));
    assert_eq!(out[0].subject, Ok("orders.acme.order.created".to_string()));
    assert_eq!(out[1].subject, Ok("orders.vip".to_string()));
    assert_eq!(
        payload_json(&out[1]),
        serde_json::json!({"id": "p-1", "name": "widget", "price": 1500, "tenant": "acme"})
    );
}
