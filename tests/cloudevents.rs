//! CloudEvents (issue 16): rows through the real relay into JetStream with
//! `routing.cloudevents = "binary"` and `"structured"`, read back and parsed with the
//! CloudEvents Rust SDK as a consumer would; a row missing a required attribute is
//! dead-lettered with the reason while the rows after it arrive.

use ::cloudevents::event::{EventBuilder, EventBuilderV10};
use ::cloudevents::{AttributesReader, Data, Event};

use crate::harness::*;

/// The header value, percent-decoded as the NATS binding requires of a receiver.
fn ce_header(m: &Msg, name: &str) -> Option<String> {
    m.header(name).map(|v| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .expect("utf-8 after percent-decoding")
            .into_owned()
    })
}

/// A binary-mode message as an SDK event: built from its `ce-*` headers, `content-type`
/// and payload with the SDK's builder, which validates the attributes.
fn binary_event(m: &Msg) -> Event {
    assert_eq!(ce_header(m, "ce-specversion").as_deref(), Some("1.0"));
    let mut b = EventBuilderV10::new()
        .id(ce_header(m, "ce-id").expect("ce-id"))
        .source(ce_header(m, "ce-source").expect("ce-source"))
        .ty(ce_header(m, "ce-type").expect("ce-type"));
    if let Some(s) = ce_header(m, "ce-subject") {
        b = b.subject(s);
    }
    if let Some(t) = ce_header(m, "ce-time") {
        b = b.time(t);
    }
    let content_type = m.header("content-type").expect("content-type").to_string();
    assert_eq!(
        ce_header(m, "ce-datacontenttype").as_deref(),
        Some(content_type.as_str())
    );
    let data: serde_json::Value = serde_json::from_slice(&m.payload).expect("json data");
    b = match ce_header(m, "ce-dataschema") {
        Some(schema) => b.data_with_schema(content_type, schema, data),
        None => b.data(content_type, data),
    };
    b.build().expect("a valid CloudEvent")
}

/// The relay's exactly-once headers are on every message, whatever the mode.
fn assert_relay_headers(m: &Msg, id: &str) {
    assert_eq!(m.msg_id(), id);
    let _ = m.position();
    assert_eq!(m.header("Outbox-Origin"), Some("app/outbox_relay"));
}

/// A row: aggregate type, aggregate id, source_bc, occurred_at (NULL: now()), payload.
type Row<'a> = (
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
);

/// Inserts rows in one transaction; returns each id and its payload as PostgreSQL
/// writes it (jsonb text), in insert order.
async fn insert(c: &tokio_postgres::Client, rows: &[Row<'_>]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    c.batch_execute("BEGIN").await.unwrap();
    for (agg_type, agg_id, source, occurred_at, payload) in rows {
        let row = c
            .query_one(
                "INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, source_bc,
                     schema_id, schema_version, occurred_at, payload)
                 VALUES ('created', $1, $2, $3, 'order-created', 3,
                         coalesce($4::text::timestamptz, now()), $5::text::jsonb)
                 RETURNING id::text, payload::text",
                &[agg_type, agg_id, source, occurred_at, payload],
            )
            .await
            .unwrap();
        out.push((row.get(0), row.get(1)));
    }
    c.batch_execute("COMMIT").await.unwrap();
    out
}

const PAYLOAD: &str = r#"{"total": 12.50, "note": "Zürich \"HQ\"", "items": [1, 2]}"#;
const OCCURRED_AT: &str = "2026-12-05 08:49:56.123456+05:30";
const OCCURRED_AT_UTC: &str = "2026-12-05T03:19:56.123456+00:00";
/// A row with every attribute a CloudEvent can take from it.
const FULL_ROW: Row<'static> = (
    "order",
    Some("ord-1"),
    Some("sales"),
    Some(OCCURRED_AT),
    PAYLOAD,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_messages_parse_as_cloudevents() {
    let env = Env::start_migrated().await;
    env.write_config(
        r#"
[routing]
cloudevents = "binary"
cloudevents_dataschema = "https://schemas.example.com/{schema_id}/v{schema_version}.json"
"#,
    );
    let js = env.js().await;
    let _relay = env.spawn_relay();
    let c = env.sql().await;
    let rows = insert(
        &c,
        &[
            FULL_ROW,
            // No source_bc: `source` (default "{source_bc}") cannot be made.
            ("order", Some("ord-2"), None, None, r#"{"n": 2}"#),
            ("order", None, Some("Sales Dept/ü"), None, r#"{"n": 3}"#),
        ],
    )
    .await;
    let msgs = wait_read(&js, STREAM, 3).await;
    assert_eq!(
        subjects(&msgs),
        [
            "outbox.order.created",
            "outbox.dlq.outbox.order.created",
            "outbox.order.created"
        ],
        "the dead letter in its place, the row after it delivered"
    );

    let (id, payload) = &rows[0];
    let m = &msgs[0];
    assert_relay_headers(m, id);
    assert_eq!(m.payload, payload.as_bytes(), "payload untouched");
    let ev = binary_event(m);
    assert_eq!(ev.id(), id);
    assert_eq!(ev.ty(), "order.created");
    assert_eq!(ev.source(), "sales");
    assert_eq!(ev.subject(), Some("ord-1"));
    assert_eq!(ev.time().unwrap().to_rfc3339(), OCCURRED_AT_UTC);
    assert_eq!(ev.datacontenttype(), Some("application/json"));
    assert_eq!(
        ev.dataschema().map(|u| u.as_str()),
        Some("https://schemas.example.com/order-created/v3.json")
    );
    let Some(Data::Json(data)) = ev.data() else {
        panic!("json data: {:?}", ev.data())
    };
    assert_eq!(
        data,
        &serde_json::from_str::<serde_json::Value>(PAYLOAD).unwrap()
    );
    // The relay's column headers are still there (full profile).
    assert_eq!(m.header("Outbox-Aggregate-Id"), Some("ord-1"));

    let dead = &msgs[1];
    assert_relay_headers(dead, &rows[1].0);
    let reason = dead.header("Outbox-Dlq-Reason").unwrap();
    assert!(
        reason.contains("cloudevents attribute source is missing")
            && reason.contains("routing.cloudevents_source"),
        "{reason}"
    );

    let m = &msgs[2];
    assert_relay_headers(m, &rows[2].0);
    let ev = binary_event(m);
    assert_eq!(ev.source(), "Sales Dept/ü", "percent-encoded on the wire");
    assert_eq!(m.header("ce-source"), Some("Sales%20Dept/%C3%BC"));
    assert_eq!(ev.subject(), None, "no aggregate id, no subject");
    assert!(ev.time().is_some());
    assert_eq!(m.payload, rows[2].1.as_bytes());

    // The exactly-once proof is intact: the audit finds every row once (or dead-lettered).
    let out = env.cli(&["audit", "--wait", "60s"]);
    assert!(out.status.success(), "{}", out.text());
}

const STRUCTURED: &[(&str, &str)] = &[("OUTBOX_RELAY_ROUTING_CLOUDEVENTS", "structured")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_messages_parse_as_cloudevents() {
    let env = Env::start_migrated().await;
    // The type needs aggregate_type, the subject does not: a row without one routes
    // but cannot be a CloudEvent. The mode comes from the environment, as in a
    // container.
    env.write_config(
        r#"
[routing]
subject = "outbox.{event_topic}"
headers = "compact"
cloudevents_type = "com.example.{aggregate_type}.{event_topic}"
cloudevents_source = "/shop/{source_bc}"
"#,
    );
    let js = env.js().await;
    let _relay = env.spawn_relay_env(STRUCTURED);
    let c = env.sql().await;
    let rows = insert(
        &c,
        &[
            FULL_ROW,
            (
                "order",
                Some("ord-1"),
                Some("sales"),
                None,
                r#"[1, "two", null]"#,
            ),
        ],
    )
    .await;
    // A row missing its type, then one more.
    let more = insert(&c, &[("x", None, Some("sales"), None, "{}")]).await;
    let no_type: String = c
        .query_one(
            "INSERT INTO outbox_events (event_topic, aggregate_type, source_bc, payload)
             VALUES ('created', NULL, 'sales', '{\"n\": 4}') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let last = insert(&c, &[("order", None, Some("sales"), None, r#"{"n": 5}"#)]).await;
    let msgs = wait_read(&js, STREAM, 5).await;
    assert_eq!(
        subjects(&msgs),
        [
            "outbox.created",
            "outbox.created",
            "outbox.created",
            "outbox.dlq.outbox.created",
            "outbox.created"
        ]
    );

    for (m, (id, payload)) in msgs.iter().zip(rows.iter().chain(&more)) {
        assert_relay_headers(m, id);
        assert_eq!(
            m.header("content-type"),
            Some("application/cloudevents+json")
        );
        assert_eq!(m.header("Outbox-Aggregate-Id"), None, "compact profile");
        assert!(m.headers.keys().all(|k| !k.starts_with("ce-")));
        let ev: Event = serde_json::from_slice(&m.payload).expect("a structured CloudEvent");
        assert_eq!(ev.id(), id);
        assert_eq!(ev.source(), "/shop/sales");
        assert_eq!(ev.datacontenttype(), Some("application/json"));
        assert_eq!(ev.dataschema(), None, "schema_id is no absolute URI");
        let Some(Data::Json(data)) = ev.data() else {
            panic!("json data: {:?}", ev.data())
        };
        assert_eq!(
            data,
            &serde_json::from_str::<serde_json::Value>(payload).unwrap()
        );
        // `data` is the row's payload byte for byte.
        let text = std::str::from_utf8(&m.payload).unwrap();
        assert!(text.ends_with(&format!(r#","data":{payload}}}"#)), "{text}");
    }
    let first: Event = serde_json::from_slice(&msgs[0].payload).unwrap();
    assert_eq!(first.ty(), "com.example.order.created");
    assert_eq!(first.subject(), Some("ord-1"));
    assert_eq!(first.time().unwrap().to_rfc3339(), OCCURRED_AT_UTC);
    let third: Event = serde_json::from_slice(&msgs[2].payload).unwrap();
    assert_eq!(third.ty(), "com.example.x.created");
    assert_eq!(third.subject(), None);

    let dead = &msgs[3];
    assert_relay_headers(dead, &no_type);
    let reason = dead.header("Outbox-Dlq-Reason").unwrap();
    assert!(
        reason.contains("cloudevents attribute type is missing: field aggregate_type")
            && reason.contains("routing.cloudevents_type"),
        "{reason}"
    );
    assert_eq!(
        dead.payload, br#"{"n": 4}"#,
        "a dead letter is the row, not wrapped"
    );

    let m = &msgs[4];
    assert_relay_headers(m, &last[0].0);
    let ev: Event = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(ev.id(), last[0].0);

    // Routing is deterministic: `replay --fill` rebuilds a lost message from the table
    // as the same CloudEvent, byte for byte.
    let lost = &msgs[0];
    // The same configuration as the relay's, environment included.
    let filled = delete_and_fill(&env, &js, STREAM, &[lost], STRUCTURED).await;
    // Within the duplicate window the fill is sent as `<id>:fill:<run>`, naming the id.
    let of = filled[0].header("Outbox-Replay-Of");
    assert_eq!(of.unwrap_or(filled[0].msg_id()), lost.msg_id());
    assert_eq!(filled[0].payload, lost.payload, "the same envelope");
    assert_eq!(
        filled[0].header("content-type"),
        Some("application/cloudevents+json")
    );
}

/// A `bytea` payload in structured mode: `data_base64` of the raw bytes, with the row's
/// content type; the SDK reads it back as binary data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_bytea_payload_is_data_base64() {
    let env = Env::start_with_bytea_outbox("[routing]\ncloudevents = \"structured\"\n").await;
    let c = env.sql().await;
    let js = env.js().await;
    let _relay = env.spawn_relay();
    let bytes: Vec<u8> = (0..=255u8).collect();
    let id: String = c
        .query_one(
            "INSERT INTO blobs (event_topic, aggregate_type, source_bc, payload, content_type)
             VALUES ('uploaded', 'file', 'media', $1, 'application/x-protobuf')
             RETURNING id::text",
            &[&bytes],
        )
        .await
        .unwrap()
        .get(0);
    let msgs = wait_read(&js, STREAM, 1).await;
    let m = &msgs[0];
    assert_eq!(m.subject, "outbox.file.uploaded");
    assert_relay_headers(m, &id);
    let ev: Event = serde_json::from_slice(&m.payload).expect("a structured CloudEvent");
    assert_eq!(ev.id(), id);
    assert_eq!(ev.ty(), "file.uploaded");
    assert_eq!(ev.source(), "media");
    assert_eq!(ev.datacontenttype(), Some("application/x-protobuf"));
    assert_eq!(ev.time(), None, "the table has no occurred_at");
    let Some(Data::Binary(data)) = ev.data() else {
        panic!("binary data: {:?}", ev.data())
    };
    assert_eq!(data, &bytes, "the raw bytes");
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert!(v.get("data_base64").is_some() && v.get("data").is_none());
}
