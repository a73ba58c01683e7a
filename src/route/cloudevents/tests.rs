use bytes::Bytes;

use super::*;
use crate::route::{Envelope, Router, Template, rules};

const ID: &str = "0b0c9d2e-0000-4000-8000-000000000001";

fn event() -> OutboxEvent {
    let mut ev = OutboxEvent::new(
        Bytes::from_static(ID.as_bytes()),
        Bytes::from_static(b"created"),
        Bytes::from_static(br#"{"total": 12.50, "items": [1, 2]}"#),
    );
    let col = |v: &'static str| Some(Bytes::from_static(v.as_bytes()));
    ev.aggregate_type = col("order");
    ev.aggregate_id = col("42");
    ev.tenant_id = col("acme");
    ev.source_bc = col("sales");
    ev.schema_id = col("https://schemas.example.com/order-created");
    ev.schema_version = col("2");
    ev.occurred_at = col("2026-12-05 03:19:56.123456+00");
    ev
}

fn ce(mode: Mode) -> CloudEvents {
    CloudEvents::new(
        mode,
        "{aggregate_type}.{event_topic}",
        "{source_bc}",
        "{schema_id}",
        None,
    )
    .unwrap()
}

fn router(mode: Mode) -> Router {
    Router::new(
        Template::parse("outbox.{aggregate_type}.{event_topic}").unwrap(),
        "app/outbox_relay",
    )
    .with_cloudevents(Some(ce(mode)))
}

fn route(r: &Router, ev: &OutboxEvent) -> Vec<Envelope> {
    let mut index = 0;
    r.route(ev, 0x1_0000_00A0, &mut index)
}

fn get<'a>(e: &'a Envelope, name: &str) -> Option<&'a str> {
    e.headers.get(name).map(|v| v.as_str())
}

/// PostgreSQL's `timestamptz` output (DateStyle ISO, any TimeZone) → RFC 3339; what
/// RFC 3339 cannot say is omitted.
#[test]
fn occurred_at_becomes_rfc3339() {
    let table = [
        (
            "2026-12-05 03:19:56.123456+00",
            Some("2026-12-05T03:19:56.123456+00:00"),
        ),
        ("2026-12-05 03:19:56+00", Some("2026-12-05T03:19:56+00:00")),
        (
            "2026-12-05 08:49:56.5+05:30",
            Some("2026-12-05T08:49:56.5+05:30"),
        ),
        (
            "2026-12-04 19:19:56.001-08",
            Some("2026-12-04T19:19:56.001-08:00"),
        ),
        (
            "2026-12-05 03:19:56+05:45:00",
            Some("2026-12-05T03:19:56+05:45"),
        ),
        ("0001-01-01 00:00:00+00", Some("0001-01-01T00:00:00+00:00")),
        // Local mean time before 1900: an offset with seconds.
        ("1890-01-01 00:00:00+00:53:28", None),
        ("0044-03-15 12:00:00+00 BC", None),
        ("infinity", None),
        ("-infinity", None),
        ("10000-01-01 00:00:00+00", None),
        // Other DateStyles, timestamps without a zone, garbage.
        ("Sat Dec 05 03:19:56.123456 2026 UTC", None),
        ("05/12/2026 03:19:56.123456 UTC", None),
        ("2026-12-05 03:19:56", None),
        ("2026-12-05T03:19:56+00", Some("2026-12-05T03:19:56+00:00")),
        (
            "2026-12-05T03:19:56.25Z",
            Some("2026-12-05T03:19:56.25+00:00"),
        ),
        ("2026-12-05 03:19:56Z+00", None),
        ("2026-13-05 03:19:56+00", None),
        ("2026-12-05 24:19:56+00", None),
        ("2026-12-05 03:19:56.+00", None),
        ("2026-12-05 03:19:56+0", None),
        ("", None),
    ];
    for (pg, want) in table {
        assert_eq!(rfc3339(pg).as_deref(), want, "{pg:?}");
    }
    // What the SDK (chrono) reads back is the same instant.
    use ::cloudevents::AttributesReader;
    use ::cloudevents::event::{EventBuilder, EventBuilderV10};
    let t = rfc3339("2026-12-05 08:49:56.5+05:30").unwrap();
    let parsed = EventBuilderV10::new()
        .id("1")
        .source("s")
        .ty("t")
        .time(t)
        .build()
        .unwrap();
    assert_eq!(
        parsed.time().unwrap().to_rfc3339(),
        "2026-12-05T03:19:56.500+00:00"
    );
}

/// An unparseable `occurred_at` leaves `time` out; the event is not lost.
#[test]
fn bad_time_omits_the_attribute_only() {
    let mut ev = event();
    ev.occurred_at = Some(Bytes::from_static(b"infinity"));
    let envs = route(&router(Mode::Binary), &ev);
    assert!(envs[0].dead_letter.is_none());
    assert_eq!(get(&envs[0], CE_TIME), None);
    assert_eq!(get(&envs[0], CE_ID), Some(ID));
}

/// `dataschema`: the template's result when it is an absolute URI, else nothing.
#[test]
fn dataschema_only_when_an_absolute_uri() {
    for (template, schema_id, want) in [
        (
            "{schema_id}",
            "https://schemas.example.com/order-created",
            Some("https://schemas.example.com/order-created"),
        ),
        (
            "{schema_id}",
            "urn:example:order:created",
            Some("urn:example:order:created"),
        ),
        ("{schema_id}", "order-created", None),
        ("{schema_id}", "/schemas/order", None),
        ("{schema_id}", "https://x/a b", None),
        ("{schema_id}", "https://x/é", None),
        (
            "https://schemas.example.com/{schema_id}/v{schema_version}.json",
            "order-created",
            Some("https://schemas.example.com/order-created/v2.json"),
        ),
        ("", "https://schemas.example.com/x", None),
    ] {
        let c = CloudEvents::new(Mode::Binary, "t", "s", template, None).unwrap();
        let mut ev = event();
        ev.schema_id = Some(Bytes::copy_from_slice(schema_id.as_bytes()));
        let a = c.attributes(&ev, &ev.payload).unwrap();
        assert_eq!(a.dataschema.as_deref(), want, "{template} {schema_id}");
    }
    // A field the template needs is NULL: no dataschema, no dead letter.
    let mut ev = event();
    ev.schema_id = None;
    assert_eq!(
        ce(Mode::Binary).attributes(&ev, b"{}").unwrap().dataschema,
        None
    );
}

#[test]
fn type_and_source_templates() {
    let c = CloudEvents::new(
        Mode::Binary,
        "com.example.{aggregate_type}.{event_topic}.v{schema_version}",
        "/tenants/{tenant_id}/{source_bc}",
        "",
        None,
    )
    .unwrap();
    let ev = event();
    let a = c.attributes(&ev, &ev.payload).unwrap();
    assert_eq!(a.ty, "com.example.order.created.v2");
    assert_eq!(a.source, "/tenants/acme/sales");
    assert_eq!(a.subject, Some("42"));
    assert_eq!(a.datacontenttype.as_deref(), Some("application/json"));
    // A literal source needs no column.
    let c = CloudEvents::new(Mode::Binary, "t", "https://shop.example.com", "", None).unwrap();
    let mut ev = event();
    ev.source_bc = None;
    assert_eq!(
        c.attributes(&ev, b"{}").unwrap().source,
        "https://shop.example.com"
    );
    assert!(CloudEvents::new(Mode::Binary, "", "s", "", None).is_err());
    let err = CloudEvents::new(Mode::Binary, "t", "{nope}", "", None).unwrap_err();
    assert_eq!(err.key, "routing.cloudevents_source");
}

/// A required attribute that cannot be made dead-letters the event, with the attribute
/// and the key to change in the reason; the subject stays the routed one.
#[test]
fn missing_required_attributes_dead_letter_with_the_reason() {
    for mode in [Mode::Binary, Mode::Structured] {
        let r = router(mode);
        let mut ev = event();
        ev.source_bc = None;
        let e = &route(&r, &ev)[0];
        assert_eq!(e.subject, "outbox.order.created");
        assert_eq!(
            e.dead_letter.as_deref(),
            Some(
                "cloudevents attribute source is missing: field source_bc is null or empty but routing.cloudevents_source (\"{source_bc}\") uses it; set the column or change routing.cloudevents_source"
            )
        );
        // Not wrapped, no ce-* headers: the dead letter is the row as routed.
        assert_eq!(e.payload, ev.payload);
        assert_eq!(get(e, CE_ID), None);

        let mut ev = event();
        ev.aggregate_type = Some(Bytes::new());
        let r = Router::new(Template::parse("outbox.{event_topic}").unwrap(), "o")
            .with_cloudevents(Some(ce(mode)));
        let reason = route(&r, &ev)[0].dead_letter.clone().unwrap();
        assert!(
            reason.starts_with("cloudevents attribute type is missing: field aggregate_type")
                && reason.contains("routing.cloudevents_type"),
            "{reason}"
        );

        let mut ev = event();
        ev.id = Bytes::new();
        let reason = route(&r, &ev)[0].dead_letter.clone().unwrap();
        assert!(
            reason.starts_with("cloudevents attribute id is missing"),
            "{reason}"
        );
    }
}

/// Binary mode: the `ce-*` headers, `content-type`, the relay's own headers, the
/// payload untouched.
#[test]
fn binary_mode_headers() {
    let ev = event();
    let r = router(Mode::Binary);
    for _ in 0..2 {
        let e = &route(&r, &ev)[0];
        assert!(e.dead_letter.is_none());
        assert_eq!(e.payload, ev.payload);
        for (name, value) in [
            (CE_SPECVERSION, "1.0"),
            (CE_ID, ID),
            (CE_SOURCE, "sales"),
            (CE_TYPE, "order.created"),
            (CE_SUBJECT, "42"),
            (CE_TIME, "2026-12-05T03:19:56.123456+00:00"),
            (CE_DATASCHEMA, "https://schemas.example.com/order-created"),
            (CE_DATACONTENTTYPE, "application/json"),
            (CONTENT_TYPE, "application/json"),
            (headers::MSG_ID, ID),
            (headers::COMMIT_LSN, "1/A0"),
            (headers::TX_INDEX, "0"),
            (headers::ORIGIN, "app/outbox_relay"),
            (headers::EVENT_TOPIC, "created"),
        ] {
            assert_eq!(get(e, name), Some(value), "{name}");
        }
        assert_eq!(
            get(e, headers::CONTENT_TYPE),
            None,
            "one content type header"
        );
    }
    // The row's content type wins; no aggregate id: no subject.
    let mut ev = event();
    ev.content_type = Some(Bytes::from_static(b"application/vnd.acme+json; v=2"));
    ev.aggregate_id = None;
    let e = &route(&r, &ev)[0];
    assert_eq!(get(e, CONTENT_TYPE), Some("application/vnd.acme+json; v=2"));
    assert_eq!(
        get(e, CE_DATACONTENTTYPE),
        Some("application/vnd.acme+json;%20v=2")
    );
    assert_eq!(get(e, CE_SUBJECT), None);
    // A payload that is not JSON and no content type: no datacontenttype.
    let mut ev = event();
    ev.payload = Bytes::from_static(b"\x00\x01binary");
    let e = &route(&r, &ev)[0];
    assert_eq!(get(e, CONTENT_TYPE), None);
    assert_eq!(get(e, CE_DATACONTENTTYPE), None);
    // outbox.content_type.
    let r = Router::new(Template::parse("outbox.x").unwrap(), "o")
        .with_content_type(Some("application/octet-stream"))
        .with_cloudevents(Some(
            CloudEvents::new(Mode::Binary, "t", "s", "", Some("application/octet-stream")).unwrap(),
        ));
    let e = &route(&r, &ev)[0];
    assert_eq!(get(e, CONTENT_TYPE), Some("application/octet-stream"));
}

/// Header values are percent-encoded as the NATS binding requires (its own example),
/// and cannot carry the text `Nats-Msg-Id`.
#[test]
fn header_values_are_percent_encoded() {
    assert_eq!(
        encode_header("Euro \u{20AC} \u{1F600}"),
        "Euro%20%E2%82%AC%20%F0%9F%98%80"
    );
    assert_eq!(encode_header("a\"b%c\r\nd\t"), "a%22b%25c%0D%0Ad%09");
    assert_eq!(encode_header("/orders/42?x=1"), "/orders/42?x=1");
    assert_eq!(
        encode_header("x Nats-Msg-Id: 1 nats-msg-id"),
        "x%20Nats%2DMsg%2DId:%201%20nats%2Dmsg%2Did"
    );
    let mut ev = event();
    ev.aggregate_id = Some(Bytes::from("Zürich 1".as_bytes()));
    ev.source_bc = Some(Bytes::from_static(b"Nats-Msg-Id: forged"));
    let e = &route(&router(Mode::Binary), &ev)[0];
    assert_eq!(get(e, CE_SUBJECT), Some("Z%C3%BCrich%201"));
    assert_eq!(get(e, CE_SOURCE), Some("Nats%2DMsg%2DId:%20forged"));
    assert_eq!(get(e, headers::MSG_ID), Some(ID));
}

/// Metadata cannot forge attributes in CloudEvents modes; other keys still pass.
#[test]
fn metadata_cannot_set_ce_headers() {
    let mut ev = event();
    ev.metadata = Some(Bytes::from_static(
        br#"{"ce-id": "forged", "CE-Type": "x", "content-type": "text/plain", "traceparent": "00-1"}"#,
    ));
    let e = &route(&router(Mode::Binary), &ev)[0];
    assert_eq!(get(e, CE_ID), Some(ID));
    assert_eq!(get(e, "CE-Type"), None);
    assert_eq!(get(e, CONTENT_TYPE), Some("application/json"));
    assert_eq!(get(e, "traceparent"), Some("00-1"));
}

/// Structured mode: the exact JSON event format; `data` is the payload byte for byte.
#[test]
fn structured_mode_envelope_bytes() {
    let ev = event();
    let e = &route(&router(Mode::Structured), &ev)[0];
    assert_eq!(
        std::str::from_utf8(&e.payload).unwrap(),
        concat!(
            r#"{"specversion":"1.0","id":"0b0c9d2e-0000-4000-8000-000000000001","source":"sales","#,
            r#""type":"order.created","subject":"42","time":"2026-12-05T03:19:56.123456+00:00","#,
            r#""datacontenttype":"application/json","#,
            r#""dataschema":"https://schemas.example.com/order-created","#,
            r#""data":{"total": 12.50, "items": [1, 2]}}"#
        )
    );
    assert_eq!(get(e, CONTENT_TYPE), Some(STRUCTURED_CONTENT_TYPE));
    assert_eq!(get(e, CE_ID), None, "no ce-* headers in structured mode");
    assert_eq!(get(e, headers::MSG_ID), Some(ID));
    assert_eq!(get(e, headers::COMMIT_LSN), Some("1/A0"));
    // The SDK reads it, and data is the payload's JSON value.
    let parsed: ::cloudevents::Event = serde_json::from_slice(&e.payload).unwrap();
    use ::cloudevents::AttributesReader;
    assert_eq!(parsed.id(), ID);
    assert_eq!(parsed.ty(), "order.created");
    let ::cloudevents::Data::Json(data) = parsed.data().unwrap().clone() else {
        panic!("json data")
    };
    assert_eq!(data, serde_json::json!({"total": 12.50, "items": [1, 2]}));
}

/// A payload that is not JSON (a bytea column, or a non-JSON content type) is
/// `data_base64`; strings needing JSON escapes are escaped.
#[test]
fn structured_mode_data_base64_and_escapes() {
    let mut ev = event();
    ev.payload = Bytes::from_static(b"\x89PNG\r\n\x1a\n");
    ev.content_type = Some(Bytes::from_static(b"image/png"));
    ev.source_bc = Some(Bytes::from_static(b"a\"b\\c\n\xc3\xa9"));
    ev.schema_id = None;
    ev.occurred_at = None;
    ev.aggregate_id = None;
    let e = &route(&router(Mode::Structured), &ev)[0];
    assert_eq!(
        std::str::from_utf8(&e.payload).unwrap(),
        concat!(
            r#"{"specversion":"1.0","id":"0b0c9d2e-0000-4000-8000-000000000001","#,
            r#""source":"a\"b\\c\né","type":"order.created","datacontenttype":"image/png","#,
            r#""data_base64":"iVBORw0KGgo="}"#
        )
    );
    // JSON text under a non-JSON media type is not embedded either.
    let mut ev = event();
    ev.content_type = Some(Bytes::from_static(b"text/plain"));
    let e = &route(&router(Mode::Structured), &ev)[0];
    let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
    assert!(v.get("data").is_none() && v.get("data_base64").is_some());
    // Not JSON, no content type: base64, no datacontenttype.
    let mut ev = event();
    ev.payload = Bytes::from_static(b"{not json");
    let e = &route(&router(Mode::Structured), &ev)[0];
    let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
    assert_eq!(v["data_base64"], "e25vdCBqc29u");
    assert!(v.get("datacontenttype").is_none());
}

/// With a rules file, structured mode wraps each target's transformed payload, and the
/// rule's headers stay; `destination_topics` copies share the event's `ce-id`.
#[test]
fn rules_transforms_and_fan_out() {
    let rules = rules::Rules::from_toml(
        r#"
[[route]]
name = "r"
[[route.targets]]
subject = "outbox.slim"
transform = { include_fields = ["total"] }
headers = { x-team = "sales" }
[[route.targets]]
subject = "outbox.full"
"#,
    )
    .unwrap();
    let r = router(Mode::Structured).with_rules(Some(rules));
    let envs = route(&r, &event());
    assert_eq!(envs.len(), 2);
    let slim: serde_json::Value = serde_json::from_slice(&envs[0].payload).unwrap();
    assert_eq!(slim["data"], serde_json::json!({"total": 12.50}));
    assert_eq!(slim["id"], ID);
    assert_eq!(get(&envs[0], "x-team"), Some("sales"));
    assert!(
        std::str::from_utf8(&envs[1].payload)
            .unwrap()
            .ends_with(r#""data":{"total": 12.50, "items": [1, 2]}}"#)
    );

    let mut ev = event();
    ev.destination_topics = Some(Bytes::from_static(br#"["outbox.a", "outbox.b"]"#));
    let envs = route(&router(Mode::Binary), &ev);
    assert_eq!(envs.len(), 2);
    for e in &envs {
        assert_eq!(get(e, CE_ID), Some(ID), "the same event on both subjects");
        assert_eq!(
            get(e, headers::MSG_ID),
            Some(format!("{ID}:{}", e.subject).as_str())
        );
    }
}

/// A rules fallback copy (made by the pipeline after routing) is a CloudEvent too.
#[test]
fn fallback_copies_are_cloudevents() {
    let rules = rules::Rules::from_toml(
        r#"
[[route]]
name = "r"
strategy = "best_effort"
fallback = { subject = "outbox.fallback" }
[[route.targets]]
subject = "outbox.a"
"#,
    )
    .unwrap();
    let pos = crate::route::Position {
        commit_lsn: 0x1_0000_00A0,
        index: 0,
    };
    let r = router(Mode::Structured).with_rules(Some(rules.clone()));
    let fb = r.fallback_for(&event(), 0, pos, false).expect("a fallback");
    let v: serde_json::Value = serde_json::from_slice(&fb.payload).unwrap();
    assert_eq!(v["id"], ID);
    assert_eq!(get(&fb, CONTENT_TYPE), Some(STRUCTURED_CONTENT_TYPE));
    // A fallback that cannot be a CloudEvent is no fallback.
    let mut ev = event();
    ev.source_bc = None;
    assert!(r.fallback_for(&ev, 0, pos, false).is_none());
    let r = router(Mode::Binary).with_rules(Some(rules));
    let fb = r.fallback_for(&event(), 0, pos, false).expect("a fallback");
    assert_eq!(get(&fb, CE_ID), Some(ID));
    assert_eq!(fb.payload, event().payload);
}

/// `routing.headers = "compact"` + binary: the relay's proof headers and the `ce-*`
/// headers, no `Outbox-*` column headers.
#[test]
fn compact_binary_is_proof_plus_ce_headers() {
    let r = router(Mode::Binary).with_compact_headers(true);
    let e = &route(&r, &event())[0];
    let mut names: Vec<String> = e.headers.iter().map(|(k, _)| k.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            headers::MSG_ID,
            headers::COMMIT_LSN,
            headers::ORIGIN,
            headers::TX_INDEX,
            CE_DATACONTENTTYPE,
            CE_DATASCHEMA,
            CE_ID,
            CE_SOURCE,
            CE_SPECVERSION,
            CE_SUBJECT,
            CE_TIME,
            CE_TYPE,
            CONTENT_TYPE,
        ]
    );
}

fn column() -> impl proptest::strategy::Strategy<Value = Option<Bytes>> {
    use proptest::prelude::*;
    prop_oneof![
        2 => Just(None),
        6 => proptest::sample::select(vec!["a", "b", "x y", "Nats-Msg-Id", "é", ""])
            .prop_map(|v| Some(Bytes::from_static(v.as_bytes()))),
        1 => Just(Some(Bytes::from_static(b"\xff"))),
    ]
}

fn any_event() -> impl proptest::strategy::Strategy<Value = OutboxEvent> {
    use proptest::prelude::*;
    (
        ("[a-c]{1,2}", column(), column(), column(), column()),
        (column(), column(), column()),
        proptest::sample::select(vec![
            "2026-12-05 03:19:56.1+00",
            "2026-12-05 03:19:56+05:30",
            "infinity",
        ]),
        proptest::sample::select(vec![&b"{}"[..], b"[1]", b"\x00"]),
    )
        .prop_map(|((id, ty, agg, src, sid), (sv, ct, meta), at, payload)| {
            let mut ev = OutboxEvent::new(
                Bytes::from(id),
                Bytes::from_static(b"t"),
                Bytes::from_static(payload),
            );
            ev.aggregate_type = ty;
            ev.aggregate_id = agg;
            ev.source_bc = src;
            ev.schema_id =
                sid.map(|s| Bytes::from(format!("urn:x:{}", String::from_utf8_lossy(&s))));
            ev.schema_version = sv;
            ev.content_type = ct;
            ev.metadata = meta.map(|_| Bytes::from_static(br#"{"ce-id": "x", "k": "v"}"#));
            ev.occurred_at = Some(Bytes::from_static(at.as_bytes()));
            ev
        })
}

proptest::proptest! {
    /// In CloudEvents modes, a router that has routed other events (its header template
    /// warm) gives each event exactly what a fresh router gives it: headers, payload and
    /// dead-letter reason. Routing stays deterministic, so replays are identical.
    #[test]
    fn warm_router_equals_fresh_router(
        events in proptest::collection::vec(any_event(), 1..30),
        structured in proptest::bool::ANY,
        compact in proptest::bool::ANY,
    ) {
        let mode = if structured { Mode::Structured } else { Mode::Binary };
        let make = || router(mode).with_compact_headers(compact).with_content_type(Some("a/b"));
        let warm = make();
        for ev in &events {
            let a = route(&warm, ev);
            let b = route(&make(), ev);
            proptest::prop_assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                proptest::prop_assert_eq!(&a.headers, &b.headers);
                proptest::prop_assert_eq!(&a.payload, &b.payload);
                proptest::prop_assert_eq!(&a.dead_letter, &b.dead_letter);
                proptest::prop_assert_eq!(&a.subject, &b.subject);
            }
        }
    }
}

proptest::proptest! {
    /// Any text: no panic; whatever is produced, the SDK reads as a time. PostgreSQL's
    /// own forms (every fraction length, whole and half-hour offsets) always convert.
    #[test]
    fn rfc3339_is_total_and_valid(
        junk in "\\PC{0,40}",
        (y, mo, d, h, mi, s) in (1u32..=9999, 1u32..=12, 1u32..=28, 0u32..24, 0u32..60, 0u32..60),
        frac in "(\\.[0-9]{1,6})?",
        (sign, oh, om) in (proptest::sample::select(vec!['+', '-']), 0u32..=15, proptest::sample::select(vec![0u32, 30, 45])),
    ) {
        use ::cloudevents::event::{EventBuilder, EventBuilderV10};
        let sdk_reads = |t: String| {
            EventBuilderV10::new().id("1").source("s").ty("t").time(t).build().is_ok()
        };
        if let Some(t) = rfc3339(&junk) {
            proptest::prop_assert!(sdk_reads(t));
        }
        let offset = if om == 0 { format!("{sign}{oh:02}") } else { format!("{sign}{oh:02}:{om:02}") };
        let pg = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}{frac}{offset}");
        let t = rfc3339(&pg);
        proptest::prop_assert!(t.is_some(), "{}", pg);
        let t = t.unwrap_or_default();
        proptest::prop_assert!(t.ends_with(&format!("{sign}{oh:02}:{om:02}")), "{}", t);
        proptest::prop_assert!(sdk_reads(t));
    }
}
