//! OpenTelemetry (`[telemetry]`) through real servers: the relay exports its producer
//! spans to an OTLP/HTTP receiver run by the test (an axum server that decodes each
//! `ExportTraceServiceRequest` with the official generated types), and the messages'
//! `traceparent` headers name those spans. With the receiver hanging or gone, every
//! event is still delivered exactly once and the lost spans are counted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;

use crate::harness::*;
use crate::support::{free_port, wait_for};

/// Spans received, with the `service.name` of their resource.
#[derive(Default, Clone)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// An OTLP/HTTP receiver on a free port: `POST /v1/traces` with a protobuf body.
async fn receiver() -> (u16, Received) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    let received = Received::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let store = store.clone();
            async move {
                assert_eq!(
                    headers.get("content-type").map(|v| v.to_str().unwrap()),
                    Some("application/x-protobuf")
                );
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return (StatusCode::BAD_REQUEST, Vec::new());
                };
                let mut out = store.0.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref()?.value.clone());
                    let service = match service {
                        Some(Any::StringValue(s)) => s,
                        _ => String::new(),
                    };
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push((service.clone(), s));
                        }
                    }
                }
                // An empty ExportTraceServiceResponse: full success.
                (StatusCode::OK, Vec::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, received)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<Any> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn text(v: &str) -> Option<Any> {
    Some(Any::StringValue(v.to_string()))
}

/// (trace id, span id, flags) of a `traceparent` header.
fn parse_tp(tp: &str) -> (String, String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

const T_A: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const P_A: &str = "00f067aa0ba902b7";
const T_C: &str = "0af7651916cd43dd8448eb211c80319c";
const P_C: &str = "b7ad6b7169203331";
const T_D: &str = "11111111111111111111111111111111";
const P_D: &str = "2222222222222222";
const T_F: &str = "abcdefabcdefabcdefabcdefabcdef01";
const P_F: &str = "0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_spans_are_children_of_the_row_traceparent_and_parents_of_the_message() {
    let (port, received) = receiver().await;
    let env = Env::start_migrated().await;
    env.write_config(&format!(
        "[telemetry]\nendpoint = \"http://127.0.0.1:{port}/v1/traces\"\nservice_name = \"relay-under-test\"\n"
    ));
    let out = env.cli(&["check"]);
    assert!(out.status.success(), "{}", out.text());
    assert!(
        out.text().contains(&format!(
            "telemetry: producer spans are exported to http://127.0.0.1:{port}/v1/traces"
        )),
        "{}",
        out.text()
    );
    // JSON logs: the per-event line (the dead letter) carries the trace context.
    let mut relay = env.spawn_relay_env(&[("OUTBOX_RELAY_LOG_FORMAT", "json")]);
    let c = env.sql().await;
    // One transaction, in this order: B (no traceparent), D (not sampled), E
    // (malformed), then the three that make spans: A, C (dead-lettered: no stream
    // captures its subject), F (fan-out to two subjects).
    c.batch_execute(&format!(
        r#"BEGIN;
           INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             VALUES ('b', 'order', '{{"k": "b"}}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload, metadata)
             VALUES ('d', 'order', '{{"k": "d"}}', '{{"traceparent": "00-{T_D}-{P_D}-00"}}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload, metadata)
             VALUES ('e', 'order', '{{"k": "e"}}', '{{"traceparent": "00-abc-def-01"}}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload, metadata)
             VALUES ('a', 'order', '{{"k": "a"}}',
                     '{{"traceparent": "00-{T_A}-{P_A}-01", "tracestate": "congo=t61rcWkgMzE"}}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload, metadata, destination_topics)
             VALUES ('c', 'order', '{{"k": "c"}}', '{{"traceparent": "00-{T_C}-{P_C}-01"}}', '["nostream.c"]');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload, metadata, destination_topics)
             VALUES ('f', 'order', '{{"k": "f"}}', '{{"traceparent": "00-{T_F}-{P_F}-01"}}',
                     '["outbox.f.one", "outbox.f.two"]');
           COMMIT;"#
    ))
    .await
    .unwrap();
    let ids: HashMap<String, String> = c
        .query("SELECT event_topic, id::text FROM outbox_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, 7).await;
    assert_eq!(
        subjects(&msgs),
        [
            "outbox.order.b",
            "outbox.order.d",
            "outbox.order.e",
            "outbox.order.a",
            "outbox.dlq.nostream.c",
            "outbox.f.one",
            "outbox.f.two"
        ]
    );
    wait_for("4 spans at the receiver", DEADLINE, || {
        let n = received.len();
        async move { n >= 4 }
    })
    .await;
    // Spans are queued and exported in PubAck order: any span for B, D or E would have
    // arrived before these. The relay stops cleanly and sends nothing more.
    assert!(relay.terminate().success(), "{}", relay.log_text());
    let spans = received.spans();
    assert_eq!(
        spans.len(),
        4,
        "{:#?}",
        spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
    );
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "relay-under-test")
    );
    let by_trace = |t: &str| -> Vec<Span> {
        spans
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == t)
            .map(|(_, s)| s.clone())
            .collect()
    };

    // B: no traceparent, no header, no span.
    assert_eq!(msgs[0].header("traceparent"), None);
    // D: a parent that is not sampled: no span; the header names the relay's
    // (unrecorded) span in the same trace, still not sampled.
    let (t, p, f) = parse_tp(msgs[1].header("traceparent").unwrap());
    assert_eq!((t.as_str(), f.as_str()), (T_D, "00"));
    assert_ne!(p, P_D);
    assert!(by_trace(T_D).is_empty());
    // E: malformed: passed on untouched, no span.
    assert_eq!(msgs[2].header("traceparent"), Some("00-abc-def-01"));

    // A: the span is the row context's child, and the message's header names the span.
    let a = by_trace(T_A);
    assert_eq!(a.len(), 1);
    let a = &a[0];
    assert_eq!(hex(&a.parent_span_id), P_A);
    assert_eq!(a.kind(), SpanKind::Producer);
    assert_eq!(a.name, "publish outbox.order.a");
    assert_eq!(a.trace_state, "congo=t61rcWkgMzE");
    assert_eq!(a.flags & 0xff, 1, "sampled");
    assert_eq!(a.status.as_ref().unwrap().code(), StatusCode::Ok);
    assert!(a.start_time_unix_nano > 0 && a.end_time_unix_nano >= a.start_time_unix_nano);
    let id_a = &ids["a"];
    assert_eq!(attr(a, "messaging.system"), text("nats"));
    assert_eq!(
        attr(a, "messaging.destination.name"),
        text("outbox.order.a")
    );
    assert_eq!(attr(a, "messaging.message.id"), text(id_a));
    assert_eq!(attr(a, "messaging.operation.type"), text("send"));
    assert_eq!(attr(a, "messaging.operation.name"), text("publish"));
    assert_eq!(attr(a, "outbox.event_id"), text(id_a));
    assert_eq!(
        attr(a, "outbox.commit_lsn"),
        text(msgs[3].header("Outbox-Commit-Lsn").unwrap())
    );
    assert_eq!(
        attr(a, "messaging.message.body.size"),
        Some(Any::IntValue(msgs[3].payload.len() as i64))
    );
    assert_eq!(
        msgs[3].header("traceparent"),
        Some(format!("00-{T_A}-{}-01", hex(&a.span_id)).as_str())
    );
    assert_eq!(msgs[3].header("tracestate"), Some("congo=t61rcWkgMzE"));

    // C: dead-lettered: error status with the reason; the dead letter names the span.
    let cs = by_trace(T_C);
    assert_eq!(cs.len(), 1);
    let cspan = &cs[0];
    assert_eq!(hex(&cspan.parent_span_id), P_C);
    assert_eq!(cspan.name, "publish nostream.c");
    let status = cspan.status.as_ref().unwrap();
    assert_eq!(status.code(), StatusCode::Error);
    assert!(status.message.contains("no stream captures"), "{status:?}");
    assert_eq!(attr(cspan, "error.type"), text("no_stream"));
    assert_eq!(
        attr(cspan, "messaging.destination.name"),
        text("nostream.c")
    );
    assert_eq!(
        msgs[4].header("traceparent"),
        Some(format!("00-{T_C}-{}-01", hex(&cspan.span_id)).as_str())
    );
    let line: serde_json::Value = relay
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "event dead-lettered")
        .expect("a json log line for the dead letter");
    assert_eq!(line["fields"]["trace_id"], T_C, "{line}");
    assert_eq!(line["fields"]["span_id"], hex(&cspan.span_id), "{line}");

    // F: one span per copy, each named by its own message.
    let fs = by_trace(T_F);
    assert_eq!(fs.len(), 2);
    for (m, subject) in [(&msgs[5], "outbox.f.one"), (&msgs[6], "outbox.f.two")] {
        let s = fs
            .iter()
            .find(|s| s.name == format!("publish {subject}"))
            .unwrap();
        assert_eq!(hex(&s.parent_span_id), P_F);
        assert_eq!(attr(s, "messaging.message.id"), text(m.msg_id()));
        assert_eq!(attr(s, "outbox.event_id"), text(&ids["f"]));
        assert_eq!(
            m.header("traceparent"),
            Some(format!("00-{T_F}-{}-01", hex(&s.span_id)).as_str())
        );
    }
    assert_ne!(fs[0].span_id, fs[1].span_id);

    // `replay` refills a lost message with the same `traceparent` (the span id is a
    // function of the message), and exports no span.
    let filled = delete_and_fill(&env, &js, STREAM, &[&msgs[3]], &[]).await;
    assert_eq!(filled[0].header("Outbox-Event-Id"), Some(id_a.as_str()));
    assert_eq!(
        filled[0].header("traceparent"),
        msgs[3].header("traceparent")
    );
    assert_eq!(received.len(), 4);
}

/// A TCP listener that accepts connections and never answers (nor reads).
async fn hanging_endpoint() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

/// `n` rows in one transaction, each with a sampled traceparent of its own trace.
async fn insert_traced(c: &tokio_postgres::Client, n: i64, topic: &str) {
    c.execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, payload, metadata)
         SELECT $2, 'order', jsonb_build_object('n', g),
                jsonb_build_object('traceparent',
                    '00-' || md5($2 || g::text) || '-' || substr(md5('p' || g::text), 1, 16) || '-01')
         FROM generate_series(1, $1::bigint) AS s(g) ORDER BY s.g",
        &[&n, &topic],
    )
    .await
    .unwrap();
}

/// Every row of the table is in the stream exactly once, and each message's
/// `traceparent` is the relay's span in the row's trace.
async fn assert_exactly_once(env: &Env, total: usize) {
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, total as u64).await;
    let ids = table_ids(&env.sql().await).await;
    assert_eq!(ids.len(), total);
    assert_eq!(msgs.len(), total, "no duplicates");
    let stored: HashSet<&str> = msgs.iter().map(|m| m.msg_id()).collect();
    assert_eq!(stored.len(), total);
    assert_eq!(
        stored,
        ids.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    for m in &msgs {
        let (_, span, flags) = parse_tp(m.header("traceparent").unwrap());
        assert_eq!(flags, "01");
        assert_eq!(span.len(), 16);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_or_absent_collector_never_holds_delivery_back() {
    const N: i64 = 1500;
    let env = Env::start_migrated().await;

    // 1. A collector that accepts connections and never answers.
    let hanging = hanging_endpoint().await;
    env.write_config(&format!(
        "[telemetry]\nendpoint = \"http://127.0.0.1:{hanging}\"\nqueue_size = 64\nexport_timeout = \"2s\"\n"
    ));
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    for tx in 0..2 {
        insert_traced(&c, N, &format!("hang{tx}")).await;
    }
    assert_exactly_once(&env, 2 * N as usize).await;
    let port = env.http_port;
    wait_for(
        "dropped and failed spans counted",
        DEADLINE,
        || async move {
            relay_metric(port, "outbox_relay_telemetry_spans_dropped_total").await > 0.0
                && relay_metric(port, "outbox_relay_telemetry_spans_failed_total").await > 0.0
        },
    )
    .await;
    assert_eq!(
        relay_metric(port, "outbox_relay_telemetry_spans_exported_total").await,
        0.0
    );
    assert_eq!(
        relay_metric(port, "outbox_relay_reconnects_total").await,
        0.0,
        "no session ended: {}",
        relay.log_text()
    );
    // Stopping is bounded too: the exporter gets one export timeout, then is dropped.
    assert!(relay.terminate().success(), "{}", relay.log_text());

    // 2. Nothing listening at all (connection refused), switched by the environment.
    let closed = free_port();
    let endpoint = format!("http://127.0.0.1:{closed}/v1/traces");
    // `check` says so, as a note: it is not a problem for delivery.
    let out = env.cli_env(
        &["check"],
        &[("OUTBOX_RELAY_TELEMETRY_ENDPOINT", &endpoint)],
    );
    assert!(out.status.success(), "{}", out.text());
    assert!(
        out.text().contains(&format!(
            "telemetry.endpoint {endpoint}: connect: connection refused"
        )),
        "{}",
        out.text()
    );
    let mut relay = env.spawn_relay_env(&[("OUTBOX_RELAY_TELEMETRY_ENDPOINT", &endpoint)]);
    insert_traced(&c, N, "closed").await;
    assert_exactly_once(&env, 3 * N as usize).await;
    wait_for("failed spans counted", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_telemetry_spans_failed_total").await > 0.0
    })
    .await;
    assert_eq!(
        relay_metric(port, "outbox_relay_reconnects_total").await,
        0.0
    );
    let log = relay.log_text().to_lowercase();
    assert!(
        log.contains("telemetry: export failed") && log.contains("connection refused"),
        "{log}"
    );
    assert!(relay.terminate().success(), "{}", relay.log_text());
}
