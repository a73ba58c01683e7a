//! Hostile input through real servers and the real binary: a table of rows, each in its
//! own transaction, in one relay run. Every row is published exactly as written or goes
//! to the dead-letter subject with its reason; never a panic, a stall, a forged or hidden
//! header, or a publish the streams do not capture; and a normal row inserted after all
//! of them arrives. The table is in docs/security.md.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::support::nats::Nats;
use crate::support::postgres::Postgres;

/// The test server's max_payload: room for a payload of several MB.
const MAX_PAYLOAD: usize = 8 << 20;
const MB: usize = 1 << 20;
/// 5,000 levels of nested arrays.
const DEEP: &str = "(repeat('[', 5000) || repeat(']', 5000))::jsonb";
const SENTINEL: &str = "outbox.order.sentinel";

/// Headers the relay itself writes; any other name must come from the row's metadata.
const RELAY_HEADERS: [&str; 15] = [
    "Nats-Msg-Id",
    "Outbox-Event-Id",
    "Outbox-Event-Topic",
    "Outbox-Aggregate-Type",
    "Outbox-Aggregate-Id",
    "Outbox-Tenant-Id",
    "Outbox-Source",
    "Outbox-Schema-Id",
    "Outbox-Schema-Version",
    "Outbox-Occurred-At",
    "Outbox-Commit-Lsn",
    "Outbox-Tx-Index",
    "Outbox-Origin",
    "Outbox-Dlq-Reason",
    "Outbox-Dlq-Original-Subject",
];

/// One message a row becomes, in stream order.
enum Out {
    /// Published to this subject with the row's payload byte for byte.
    Pub(String),
    /// Dead-lettered to this subject, the reason containing the text; payload kept.
    Dead(String, &'static str),
    /// Dead-lettered without its payload: too large even for the dead letter.
    DeadEmpty(String, &'static str),
}

use Out::{Dead, DeadEmpty, Pub};

fn dlq(tail: &str) -> String {
    format!("outbox.dlq.{tail}")
}

struct Case {
    name: &'static str,
    /// Column → SQL expression, over the defaults: `event_topic` = the name,
    /// `aggregate_type` = `hostile`, `payload` = `{"case": <name>}`.
    cols: Vec<(&'static str, String)>,
    out: Vec<Out>,
    /// Headers every message of the row carries with this value, or lacks (`None`).
    headers: Vec<(&'static str, Option<String>)>,
    /// The payload's bytes as the test expects them (always also compared with
    /// PostgreSQL's text of the column).
    payload: Option<&'static [u8]>,
}

/// A row published to `outbox.hostile.<name>` unless told otherwise.
fn case(name: &'static str) -> Case {
    Case {
        name,
        cols: Vec::new(),
        out: vec![Pub(format!("outbox.hostile.{name}"))],
        headers: Vec::new(),
        payload: None,
    }
}

/// A row with every nullable column set (the destination is the template's subject).
fn full(name: &'static str) -> Case {
    case(name)
        .text("aggregate_id", "agg-1")
        .text("source_bc", "billing")
        .text("schema_id", "schema-1")
        .text("metadata", r#"{"traceparent": "00-full"}"#)
        .text(
            "destination_topics",
            &format!(r#"["outbox.hostile.{name}"]"#),
        )
        .header("traceparent", Some("00-full"))
}

/// A SQL string literal (standard-conforming: only `'` needs doubling).
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Case {
    fn set(mut self, col: &'static str, sql: impl Into<String>) -> Self {
        self.cols.retain(|(c, _)| *c != col);
        self.cols.push((col, sql.into()));
        self
    }
    fn text(self, col: &'static str, value: &str) -> Self {
        self.set(col, lit(value))
    }
    /// Column `col` set to `value`, which header `header` carries unchanged.
    fn echoed(self, col: &'static str, header: &'static str, value: &str) -> Self {
        self.text(col, value).header(header, Some(value))
    }
    fn to(mut self, out: Vec<Out>) -> Self {
        self.out = out;
        self
    }
    fn header(mut self, name: &'static str, value: Option<&str>) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.map(str::to_string)));
        self
    }
    fn payload_is(mut self, bytes: &'static [u8]) -> Self {
        self.payload = Some(bytes);
        self
    }

    fn insert_sql(&self) -> String {
        let mut cols: Vec<(&str, String)> = vec![
            ("event_topic", lit(self.name)),
            ("aggregate_type", lit("hostile")),
            (
                "payload",
                format!("jsonb_build_object('case', {})", lit(self.name)),
            ),
        ];
        for (col, sql) in &self.cols {
            cols.retain(|(c, _)| c != col);
            cols.push((col, sql.clone()));
        }
        let names: Vec<&str> = cols.iter().map(|(c, _)| *c).collect();
        let values: Vec<&str> = cols.iter().map(|(_, v)| v.as_str()).collect();
        format!(
            "INSERT INTO outbox_events ({}) VALUES ({}) RETURNING id::text, payload::text",
            names.join(", "),
            values.join(", ")
        )
    }
}

fn cases() -> Vec<Case> {
    let long_a = "a".repeat(300);
    let e_acute = "é";
    [
        // Payloads that are not objects, deep, huge, odd Unicode.
        case("payload_string")
            .text("payload", r#""just a string""#)
            .payload_is(br#""just a string""#),
        case("payload_number")
            .text("payload", "42")
            .payload_is(b"42"),
        case("payload_array")
            .text("payload", r#"[1, "two", null, {"three": 3}]"#)
            .payload_is(br#"[1, "two", null, {"three": 3}]"#),
        case("payload_json_null")
            .text("payload", "null")
            .payload_is(b"null"),
        case("payload_deep").set("payload", DEEP),
        case("payload_3mb").set("payload", format!("to_jsonb(repeat('x', {}))", 3 * MB)),
        case("payload_over_max")
            .set("payload", format!("to_jsonb(repeat('x', {}))", 9 * MB))
            .to(vec![DeadEmpty(
                dlq("outbox.hostile.payload_over_max"),
                "max_payload",
            )])
            .header("Outbox-Aggregate-Type", Some("hostile")),
        case("payload_unicode").text(
            "payload",
            "{\"rtl\": \"\u{202E}evil\u{202C} \u{200F}\", \"zwj\": \"\u{1F469}\u{200D}\u{1F469}\u{200D}\u{1F467}\", \
             \"emoji\": \"\u{1F600}\u{1F3F3}\u{FE0F}\u{200D}\u{1F308}\", \
             \"nonchar\": \"\u{FDD0}\u{FFFE}\u{FFFF}\u{10FFFF}\", \"combining\": \"e\u{301}\u{302}\u{303}\", \
             \"bom\": \"\u{FEFF}\", \"separators\": \"a\u{2028}b\u{2029}c\u{85}d\"}",
        ),
        // Odd but valid Unicode in the columns that feed subjects and headers.
        case("unicode_topic")
            .echoed("event_topic", "Outbox-Event-Topic", "cr\u{E9}\u{E9}\u{200D}\u{1F44D}\u{1F3FD}")
            .to(vec![Pub(
                "outbox.hostile.cr\u{E9}\u{E9}\u{200D}\u{1F44D}\u{1F3FD}".into(),
            )]),
        case("unicode_aggregate_type")
            .echoed("aggregate_type", "Outbox-Aggregate-Type", "ord\u{301}er\u{200F}\u{FFFF}")
            .to(vec![Pub(
                "outbox.ord\u{301}er\u{200F}\u{FFFF}.unicode_aggregate_type".into(),
            )]),
        // Unicode whitespace is a subject separator for nobody, but it is replaced too.
        case("unicode_whitespace_aggregate_type")
            .echoed("aggregate_type", "Outbox-Aggregate-Type", "a\u{A0}b\u{3000}c\u{2028}d")
            .to(vec![Pub(
                "outbox.a_b_c_d.unicode_whitespace_aggregate_type".into(),
            )]),
        case("unicode_tenant_and_id")
            .echoed("tenant_id", "Outbox-Tenant-Id", "\u{202E}tenant\u{FFFF}")
            .echoed("aggregate_id", "Outbox-Aggregate-Id", "\u{FEFF}id\u{200D}\u{10FFFF}"),
        case("unicode_destination")
            .text(
                "destination_topics",
                "[\"outbox.\u{FC}n\u{EF}.\u{1F600}.\u{FFFF}\"]",
            )
            .to(vec![Pub("outbox.\u{FC}n\u{EF}.\u{1F600}.\u{FFFF}".into())]),
        // CR/LF and other control characters where they become headers.
        case("crlf_aggregate_id")
            .text("aggregate_id", "a\r\nNats-Msg-Id: evil")
            .header("Outbox-Aggregate-Id", Some("a  Nats_Msg_Id: evil")),
        case("crlf_tenant")
            .text("tenant_id", "acme\r\nOutbox-Tenant-Id: other\r\n")
            .header("Outbox-Tenant-Id", Some("acme  Outbox-Tenant-Id: other")),
        case("crlf_topic")
            .text("event_topic", "crlf_topic\r\nX-Injected: 1")
            .to(vec![Pub("outbox.hostile.crlf_topic__X-Injected:_1".into())])
            .header("Outbox-Event-Topic", Some("crlf_topic  X-Injected: 1"))
            .header("X-Injected", None),
        case("crlf_metadata")
            .text(
                "metadata",
                r#"{"traceparent": "00-a\r\nNats-Msg-Id: evil", "lf": "a\nb", "cr": "a\rb", "ok": "fine"}"#,
            )
            .header("traceparent", None)
            .header("lf", None)
            .header("cr", None)
            .header("ok", Some("fine")),
        case("control_chars")
            .text("source_bc", "src\u{1b}[31m\u{7f}\tend")
            .text("schema_id", "\u{1}schema\u{2}")
            .header("Outbox-Source", Some("src [31m  end"))
            .header("Outbox-Schema-Id", Some("schema")),
        case("msg_id_text")
            .text("aggregate_id", "Nats-Msg-Id")
            .text("source_bc", "x nats-msg-id y")
            .text(
                "metadata",
                r#"{"X-Nats-Msg-Id": "1", "note": "Nats-Msg-Id: forged", "traceparent": "00-t"}"#,
            )
            .header("Outbox-Aggregate-Id", Some("Nats_Msg_Id"))
            .header("Outbox-Source", Some("x nats_msg_id y"))
            .header("traceparent", Some("00-t"))
            .header("X-Nats-Msg-Id", None)
            .header("note", None),
        case("tenant_quotes").echoed("tenant_id", "Outbox-Tenant-Id", r#"a"b\c} 1"#),
        // Subjects from the template: aggregate_type feeds outbox.{aggregate_type}.{event_topic}.
        case("agg_dotted")
            .text("aggregate_type", "a.b")
            .to(vec![Pub("outbox.a.b.agg_dotted".into())]),
        case("agg_star")
            .text("aggregate_type", "*")
            .to(vec![Pub("outbox._.agg_star".into())]),
        case("agg_gt")
            .text("aggregate_type", ">")
            .to(vec![Pub("outbox._.agg_gt".into())]),
        case("agg_empty").text("aggregate_type", "").to(vec![Dead(
            dlq("agg_empty"),
            "field aggregate_type is null or empty",
        )]),
        // `$` is refused only where it makes a system subject: at the start.
        case("agg_sys")
            .text("aggregate_type", "$SYS")
            .to(vec![Pub("outbox.$SYS.agg_sys".into())]),
        case("agg_js_api")
            .text("aggregate_type", "$JS.API.STREAM.DELETE.OUTBOX")
            .to(vec![Pub(
                "outbox.$JS.API.STREAM.DELETE.OUTBOX.agg_js_api".into(),
            )]),
        case("agg_dots")
            .text("aggregate_type", "..")
            .to(vec![Dead(dlq("agg_dots"), "empty token")]),
        case("agg_space")
            .text("aggregate_type", "a b\tc")
            .to(vec![Pub("outbox.a_b_c.agg_space".into())]),
        case("agg_long")
            .text("aggregate_type", &long_a)
            .to(vec![Dead(dlq("agg_long"), "longer than 255 bytes")]),
        case("topic_wildcard")
            .text("event_topic", "topic.>")
            .to(vec![Pub("outbox.hostile.topic._".into())]),
        // The dead-letter subject is cut to 200 bytes: inside a character, this panicked.
        case("topic_long_multibyte")
            .set("event_topic", format!("'x' || repeat('{e_acute}', 150)"))
            .set("aggregate_type", "NULL")
            .to(vec![Dead(
                dlq(&format!("x{}", e_acute.repeat(99))),
                "field aggregate_type is null or empty",
            )]),
        // Subjects from destination_topics.
        case("dest_js_api")
            .text("destination_topics", r#"["$JS.API.STREAM.DELETE.OUTBOX"]"#)
            .to(vec![Dead(
                dlq("_JS.API.STREAM.DELETE.OUTBOX"),
                "subject starts with $",
            )]),
        case("dest_sys")
            .text("destination_topics", r#"["$SYS.REQ.SERVER.PING"]"#)
            .to(vec![Dead(dlq("_SYS.REQ.SERVER.PING"), "subject starts with $")]),
        case("dest_kv")
            .text("destination_topics", r#"["$KV.outbox_relay.key"]"#)
            .to(vec![Dead(dlq("_KV.outbox_relay.key"), "subject starts with $")]),
        case("dest_wildcards")
            .text(
                "destination_topics",
                r#"["outbox.*", "outbox.>", "outbox.a.*.b", "outbox.hostile.dest_wildcards"]"#,
            )
            .to(vec![
                Dead(dlq("outbox._"), "wildcard"),
                Dead(dlq("outbox._"), "wildcard"),
                Dead(dlq("outbox.a._.b"), "wildcard"),
                Pub("outbox.hostile.dest_wildcards".into()),
            ]),
        // The dead letter of `outbox.>` and the copy to `outbox._` must not share a
        // Nats-Msg-Id: JetStream would drop the second as a duplicate.
        case("dest_collision")
            .text("destination_topics", r#"["outbox.>", "outbox._"]"#)
            .to(vec![
                Dead(dlq("outbox._"), "wildcard"),
                Pub("outbox._".into()),
            ]),
        case("dest_space")
            .text("destination_topics", r#"["outbox.a b"]"#)
            .to(vec![Dead(dlq("outbox.a_b"), "whitespace")]),
        case("dest_nel")
            .text("destination_topics", "[\"outbox.a\u{85}b\"]")
            .to(vec![Dead(dlq("outbox.a_b"), "whitespace")]),
        case("dest_empty_tokens")
            .text("destination_topics", r#"["outbox..a", ".outbox", "outbox."]"#)
            .to(vec![
                Dead(dlq("outbox.a"), "empty token"),
                Dead(dlq("outbox"), "empty token"),
                Dead(dlq("outbox"), "empty token"),
            ]),
        case("dest_empty_string")
            .text("destination_topics", r#"[""]"#)
            .to(vec![Dead(dlq("unroutable"), "subject is empty")]),
        case("dest_long")
            .text("destination_topics", &format!(r#"["outbox.{long_a}"]"#))
            .to(vec![Dead(
                dlq(&format!("outbox.{}", "a".repeat(193))),
                "longer than 255 bytes",
            )]),
        case("dest_long_multibyte")
            .text(
                "destination_topics",
                &format!(r#"["outbox.{}"]"#, e_acute.repeat(130)),
            )
            .to(vec![Dead(
                dlq(&format!("outbox.{}", e_acute.repeat(96))),
                "longer than 255 bytes",
            )]),
        case("dest_not_captured")
            .text(
                "destination_topics",
                r#"["_INBOX.hostile", "other.app.subject"]"#,
            )
            .to(vec![
                Dead(
                    dlq("_INBOX.hostile"),
                    "no stream captures subject _INBOX.hostile",
                ),
                Dead(
                    dlq("other.app.subject"),
                    "no stream captures subject other.app.subject",
                ),
            ]),
        case("dest_entry_huge")
            .set(
                "destination_topics",
                format!("jsonb_build_array('outbox.' || repeat('a', {}))", 9 * MB),
            )
            .to(vec![Dead(
                dlq(&format!("outbox.{}", "a".repeat(193))),
                "longer than 255 bytes",
            )]),
        case("dest_duplicates").text(
            "destination_topics",
            r#"["outbox.hostile.dest_duplicates", "outbox.hostile.dest_duplicates"]"#,
        ),
        // destination_topics that is not an array of strings.
        case("dest_object")
            .text("destination_topics", r#"{"a": "outbox.x"}"#)
            .to(vec![Dead(dlq("dest_object"), "must be a json array")]),
        case("dest_number")
            .text("destination_topics", "42")
            .to(vec![Dead(dlq("dest_number"), "must be a json array")]),
        case("dest_string")
            .text("destination_topics", r#""outbox.hostile.dest_string""#)
            .to(vec![Dead(dlq("dest_string"), "must be a json array")]),
        case("dest_mixed")
            .text("destination_topics", r#"[1, "outbox.hostile.dest_mixed"]"#)
            .to(vec![Dead(dlq("dest_mixed"), "must be a json array")]),
        case("dest_deep")
            .set("destination_topics", DEEP)
            .to(vec![Dead(dlq("dest_deep"), "must be a json array")]),
        case("dest_empty_array")
            .text("destination_topics", "[]")
            .to(vec![Dead(dlq("dest_empty_array"), "empty array")]),
        case("dest_json_null").text("destination_topics", "null"),
        // metadata that is not an object, odd keys and values.
        case("metadata_array").text("metadata", r#"[1, "a", {"b": 2}]"#),
        case("metadata_string").text("metadata", r#""traceparent""#),
        case("metadata_number").text("metadata", "7"),
        case("metadata_json_null").text("metadata", "null"),
        case("metadata_deep").set("metadata", DEEP),
        case("metadata_deep_value")
            .set(
                "metadata",
                format!("jsonb_build_object('deep', {DEEP}, 'traceparent', '00-deep')"),
            )
            .header("traceparent", Some("00-deep"))
            .header("deep", None),
        case("metadata_bad_names")
            .set(
                "metadata",
                format!(
                    "'{{\"a b\": \"1\", \"\": \"2\", \"\u{43A}\u{43B}\u{44E}\u{447}\": \"3\", \"a:b\": \"4\", \
                     \"x\\u0001\": \"5\", \"{}\": \"6\", \"Nats-Msg-Id\": \"forged\", \
                     \"nats-expected-stream\": \"X\", \"OUTBOX-TENANT-ID\": \"evil\", \
                     \"X-Nats-Msg-Id\": \"z\", \"ok-key\": \"9\"}}'",
                    "k".repeat(129)
                ),
            )
            .header("ok-key", Some("9"))
            .header("Outbox-Tenant-Id", Some("default")),
        case("metadata_values")
            .text(
                "metadata",
                r#"{"num": 1.50, "long": 123456789012345678901234567890, "big": 1e400, "t": true,
                    "f": false, "nul": null, "obj": {"a": 1}, "arr": [1], "tab": "a\tb",
                    "ansi": "\u001b[0m", "empty": ""}"#,
            )
            .header("num", Some("1.50"))
            .header("long", Some("123456789012345678901234567890"))
            .header("big", Some(&format!("1{}", "0".repeat(400))))
            .header("t", Some("true"))
            .header("f", Some("false"))
            .header("empty", Some(""))
            .header("nul", None)
            .header("obj", None)
            .header("arr", None)
            .header("tab", None)
            .header("ansi", None),
        // Headers larger than max_payload: the dead letter keeps only the relay's own.
        case("metadata_huge_value")
            .set(
                "metadata",
                format!(
                    "jsonb_build_object('huge', repeat('y', {}), 'traceparent', '00-huge')",
                    9 * MB
                ),
            )
            .to(vec![DeadEmpty(
                dlq("outbox.hostile.metadata_huge_value"),
                "max_payload",
            )])
            .header("huge", None)
            .header("traceparent", None)
            .header("Outbox-Aggregate-Type", None),
        case("source_bc_huge")
            .set("source_bc", format!("repeat('s', {})", 9 * MB))
            .to(vec![DeadEmpty(
                dlq("outbox.hostile.source_bc_huge"),
                "max_payload",
            )])
            .header("Outbox-Source", None),
    ]
    .into_iter()
    .chain(null_cases())
    .collect()
}

/// NULL in every nullable column, each alone (published, without the header the column
/// feeds) and all at once (dead-lettered: the template needs aggregate_type).
fn null_cases() -> Vec<Case> {
    let nullable = [
        (
            "null_aggregate_type",
            "aggregate_type",
            "Outbox-Aggregate-Type",
        ),
        ("null_aggregate_id", "aggregate_id", "Outbox-Aggregate-Id"),
        ("null_source_bc", "source_bc", "Outbox-Source"),
        ("null_destination_topics", "destination_topics", ""),
        ("null_schema_id", "schema_id", "Outbox-Schema-Id"),
        ("null_metadata", "metadata", "traceparent"),
    ];
    let mut all = full("null_all").to(vec![Dead(
        dlq("null_all"),
        "field aggregate_type is null or empty",
    )]);
    let mut cases = vec![
        full("null_none")
            .header("Outbox-Aggregate-Id", Some("agg-1"))
            .header("Outbox-Source", Some("billing"))
            .header("Outbox-Schema-Id", Some("schema-1")),
    ];
    for (name, col, header) in nullable {
        let alone = full(name).set(col, "NULL");
        all = all.set(col, "NULL");
        if header.is_empty() {
            cases.push(alone);
        } else {
            cases.push(alone.header(header, None));
            all = all.header(header, None);
        }
    }
    cases.push(all);
    cases
}

/// Asserts that `m`, the `n`-th message of the row `case` (id `id`, payload text
/// `payload` as PostgreSQL reads it), is what `out` says.
fn check(case: &Case, id: &str, payload: &str, n: usize, m: &Msg) {
    let what = format!(
        "case {} message {n}: {} {:?}",
        case.name,
        m.subject,
        m.headers.get("Outbox-Dlq-Reason")
    );
    let (subject, reason, payload_kept) = match &case.out[n] {
        Pub(s) => (s, None, true),
        Dead(s, r) => (s, Some(*r), true),
        DeadEmpty(s, r) => (s, Some(*r), false),
    };
    assert_eq!(&m.subject, subject, "{what}");
    assert_eq!(m.header("Outbox-Event-Id"), Some(id), "{what}");
    if let Some(bytes) = case.payload {
        assert_eq!(payload.as_bytes(), bytes, "{what}: PostgreSQL's text");
    }
    if payload_kept {
        assert!(m.payload == payload.as_bytes(), "{what}: payload differs");
    } else {
        assert!(m.payload.is_empty(), "{what}: payload not dropped");
    }
    match reason {
        None => assert_eq!(m.header("Outbox-Dlq-Reason"), None, "{what}"),
        Some(r) => {
            let got = m.header("Outbox-Dlq-Reason").unwrap_or_default();
            assert!(got.contains(r), "{what}: reason {got:?} lacks {r:?}");
            assert!(got.len() <= 1100, "{what}: reason of {} bytes", got.len());
            assert!(m.header("Outbox-Dlq-Original-Subject").is_some(), "{what}");
        }
    }
    let fan_out = case.out.len() > 1;
    match (fan_out, reason) {
        (false, _) => assert_eq!(m.msg_id(), id, "{what}"),
        (true, None) => assert_eq!(m.msg_id(), format!("{id}:{subject}"), "{what}"),
        // Refused after routing (no stream, too large): keyed by the routed subject.
        (true, Some(r)) if r.contains("no stream captures") || r.contains("max_payload") => {
            let routed = m.header("Outbox-Dlq-Original-Subject").unwrap_or_default();
            assert_eq!(m.msg_id(), format!("{id}:{routed}"), "{what}")
        }
        (true, Some(_)) => assert_eq!(m.msg_id(), format!("{id}:dead letter {n}"), "{what}"),
    }
    for (name, value) in &case.headers {
        assert_eq!(m.header(name), value.as_deref(), "{what}: header {name}");
    }
    // Nothing forged, nothing hidden: each header once, ours or an expected metadata
    // key, and `Nats-Msg-Id` nowhere but in its own header (a server finds it by the
    // first occurrence of the text in the header block).
    for (name, count) in &m.header_counts {
        assert_eq!(*count, 1, "{what}: header {name} {count} times");
        let ours = RELAY_HEADERS.contains(&name.as_str());
        let expected = case.headers.iter().any(|(n, v)| n == name && v.is_some());
        assert!(ours || expected, "{what}: unexpected header {name}");
        let value = &m.headers[name];
        if name != "Nats-Msg-Id" {
            assert!(
                !format!("{name}: {value}")
                    .to_ascii_lowercase()
                    .contains("nats-msg-id"),
                "{what}: {name}: {value}"
            );
        }
    }
}

/// Every row of [`cases`] in its own transaction, then one normal row; one relay run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rows_pass_through_or_dead_letter_and_the_stream_moves_on() {
    relay_table("", &cases(), SENTINEL).await;
}

/// A per-tenant enforced prefix: a tenant value that is not one subject token as
/// written must not reach another tenant's subjects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_values_cannot_escape_a_per_tenant_prefix() {
    let config = "[routing]\nsubject = \"outbox.tenants.{tenant_id}.{event_topic}\"\n\
                  subject_prefix = \"outbox.tenants.{tenant_id}\"\n";
    let own = |name: &'static str, tenant: &str| {
        case(name)
            .text("tenant_id", tenant)
            .to(vec![Pub(format!("outbox.tenants.{tenant}.{name}"))])
    };
    let escaping = |name: &'static str, tenant: &str, tail: &str| {
        case(name).text("tenant_id", tenant).to(vec![Dead(
            dlq(&format!("outbox.tenants.{tail}.{name}")),
            "not one subject token",
        )])
    };
    let cases = vec![
        own("tenant_plain", "acme"),
        own("tenant_unicode", "\u{FC}n\u{EF}-\u{1F600}"),
        escaping("tenant_dotted", "acme.evil", "acme.evil"),
        escaping("tenant_space", "a b", "a_b"),
        escaping("tenant_star", "*", "_"),
        escaping("tenant_crlf", "acme\r\n", "acme__"),
        case("tenant_empty").text("tenant_id", "").to(vec![Dead(
            dlq("tenant_empty"),
            "field tenant_id is null or empty",
        )]),
        own("tenant_dest_own", "acme")
            .text("destination_topics", r#"["outbox.tenants.acme.x"]"#)
            .to(vec![Pub("outbox.tenants.acme.x".into())]),
        own("tenant_dest_other", "acme")
            .text("destination_topics", r#"["outbox.tenants.other.x"]"#)
            .to(vec![Dead(
                dlq("outbox.tenants.other.x"),
                "outside the enforced prefix outbox.tenants.acme",
            )]),
    ];
    relay_table(config, &cases, "outbox.tenants.default.sentinel").await;
}

/// One relay run (config `extra`, a server max_payload of [`MAX_PAYLOAD`]) over every
/// case, each in its own transaction, then a normal row routed to `sentinel`: the
/// stream holds exactly what the table says, in row order, every `Nats-Msg-Id`
/// deduplicates, and the relay is still running and healthy.
async fn relay_table(extra: &str, cases: &[Case], sentinel_subject: &str) {
    let nats = Nats::start_with(&format!("max_payload: {MAX_PAYLOAD}"));
    let env = Env::start_with(Postgres::start(), nats).await;
    env.write_config(extra);
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "migrate failed: {}", out.text());
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    let mut rows = Vec::with_capacity(cases.len());
    for case in cases {
        let row = c
            .query_one(&case.insert_sql(), &[])
            .await
            .unwrap_or_else(|e| panic!("insert {}: {e:?}", case.name));
        rows.push((row.get::<_, String>(0), row.get::<_, String>(1)));
    }
    let sentinel = insert_tx(&c, 1, "sentinel").await;

    // The normal row after all of them arrives: no stall, no crash.
    let js = env.js().await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        // The relay creates the stream when its session starts.
        if let Ok(stream) = js.get_stream(STREAM).await
            && stream
                .get_last_raw_message_by_subject(sentinel_subject)
                .await
                .is_ok()
        {
            break;
        }
        relay.assert_running("while relaying the hostile rows");
        assert!(
            Instant::now() < deadline,
            "the row after the hostile ones did not arrive within {DEADLINE:?}; log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Exactly the expected messages, in row order, each as the table says.
    let expected = cases.iter().map(|c| c.out.len()).sum::<usize>() + 1;
    let msgs = read_all(&js, STREAM).await;
    let got: Vec<String> = msgs
        .iter()
        .map(|m| {
            format!(
                "{} {}",
                m.subject,
                m.header("Outbox-Event-Id").unwrap_or("")
            )
        })
        .collect();
    assert_eq!(msgs.len(), expected, "stream:\n{}", got.join("\n"));
    let mut it = msgs.iter();
    for (case, (id, payload)) in cases.iter().zip(&rows) {
        for n in 0..case.out.len() {
            check(case, id, payload, n, it.next().unwrap());
        }
    }
    let last = it.next().unwrap();
    assert_eq!(
        (last.subject.as_str(), last.msg_id()),
        (sentinel_subject, sentinel[0].as_str())
    );
    let ids: HashSet<&str> = msgs.iter().map(Msg::msg_id).collect();
    assert_eq!(ids.len(), msgs.len(), "Nats-Msg-Id not unique");

    // JetStream registered every Nats-Msg-Id: a replayed copy is dropped.
    for m in &msgs {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", m.msg_id());
        let ack = js
            .publish_with_headers(m.subject.clone(), h, "replay".into())
            .await
            .expect("publish")
            .await
            .expect("puback");
        assert!(
            ack.duplicate,
            "{} {}: not deduplicated",
            m.subject,
            m.msg_id()
        );
    }
    assert_eq!(stream_count(&js, STREAM).await, expected as u64);

    // Still running, healthy, and the metrics agree with the stream.
    relay.assert_running("after the hostile rows");
    let port = env.http_port;
    wait_http(port, "/healthz", 200, "").await;
    wait_http(port, "/readyz", 200, "").await;
    let published = cases
        .iter()
        .flat_map(|c| &c.out)
        .filter(|o| matches!(o, Pub(_)))
        .count()
        + 1;
    let dead = expected - published;
    crate::support::wait_for("metrics to count every message", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_events_published_total").await == published as f64
            && relay_metric(port, "outbox_relay_events_dead_lettered_total").await == dead as f64
    })
    .await;
    assert!(
        !relay.log_text().contains("panicked"),
        "{}",
        relay.log_text()
    );
}
