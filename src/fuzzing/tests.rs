//! Corpus replay (every file of both corpora, on every `cargo test`) and the seeds of
//! `fuzz/corpus/route`.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{RouteInput, bytea_one, decode_one, route_one};
use crate::decode::OutboxEvent;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Runs `one` on every file of `fuzz/corpus/<target>`; fails naming every file that
/// panics (the panic message itself is printed by the panic hook).
fn replay(target: &str, one: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    // The corpus is part of the test: losing it must not pass silently.
    assert!(
        files.len() >= 20,
        "{} holds only {} files",
        dir.display(),
        files.len()
    );
    let failed: Vec<String> = files
        .iter()
        .filter(|f| {
            let data = std::fs::read(f).unwrap();
            std::panic::catch_unwind(|| one(&data)).is_err()
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "corpus inputs that fail:\n{}",
        failed.join("\n")
    );
}

#[test]
fn decode_corpus_replays() {
    replay("decode", decode_one);
}

#[test]
fn bytea_corpus_replays() {
    replay("bytea", bytea_one);
}

#[test]
fn route_corpus_replays() {
    replay("route", route_one);
}

#[test]
fn route_input_round_trips() {
    let mut ev = order_event(PAYLOAD);
    ev.schema_id = None;
    ev.destination_topics = Some(b(r#"["a.b"]"#));
    let data = RouteInput::encode("[[route]]", "x.{event_topic}", "x", &ev);
    let input = RouteInput::parse(&data);
    assert_eq!(input.rules, b"[[route]]");
    assert_eq!(input.template, b"x.{event_topic}");
    assert_eq!(input.prefix, b"x");
    assert_eq!(input.event, ev);
    // Short inputs are events with what is there.
    let input = RouteInput::parse(b"");
    assert!(input.rules.is_empty() && input.event.id.is_empty());
    assert_eq!(input.event.aggregate_type, None);
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

const PAYLOAD: &str = r#"{"id": "p-1", "price": 1500, "ratio": 0.5, "name": "widget",
    "visible": true, "tags": ["a", "b"], "nothing": null, "neg": -3,
    "big": 18446744073709551615, "total": 99, "internal_notes": "secret",
    "customer": {"id": 7, "tier": "gold", "address": {"city": "Oslo", "geo": {"lat": 59.9, "lon": 10.7}}},
    "items": [{"sku": "x", "qty": 2}, {"sku": "y", "qty": 1, "attrs": [[1, 2], {"k": "v"}]}]}"#;

const TRACE_METADATA: &str = r#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "congo=t61rcWkgMzE", "user_id": 9, "region": "eu", "sampled": true}"#;

fn order_event(payload: &str) -> OutboxEvent {
    let mut ev = OutboxEvent::new(
        b("0b0c9d2e-0000-4000-8000-000000000001"),
        b("order.created"),
        b(payload),
    );
    ev.aggregate_type = Some(b("order"));
    ev.aggregate_id = Some(b("42"));
    ev.tenant_id = Some(b("acme"));
    ev.source_bc = Some(b("sales"));
    ev.schema_version = Some(b("2"));
    ev.metadata = Some(b(TRACE_METADATA));
    ev.occurred_at = Some(b("2026-11-23 03:55:33.1+00"));
    ev.created_at = Some(b("2026-11-23 03:55:33.2+00"));
    ev
}

/// Events that exercise the decisions: the docs' example, NULL columns, payload not JSON,
/// `destination_topics` (fan-out, hostile, null), metadata trying to forge headers.
fn events() -> Vec<(&'static str, OutboxEvent)> {
    let mut out = vec![("order", order_event(PAYLOAD))];

    let mut placed = order_event(r#"{"total": 1500, "sku": "a", "lines": [{"sku": "a", "n": 3}]}"#);
    placed.event_topic = b("placed");
    out.push(("placed", placed));

    let mut nulls = order_event("not json {");
    nulls.aggregate_type = None;
    nulls.tenant_id = None;
    nulls.source_bc = None;
    nulls.schema_version = None;
    nulls.metadata = None;
    out.push(("nulls", nulls));

    let mut fan_out = order_event(r#"{"a": 1}"#);
    fan_out.destination_topics = Some(b(r#"["billing.orders", "audit.all", "billing.orders"]"#));
    out.push(("destinations", fan_out));

    let mut hostile = order_event(r#"{"a": 1}"#);
    hostile.destination_topics = Some(b(r#"["$JS.API.STREAM.DELETE.X", "a.>", "a..b", "ok"]"#));
    out.push(("hostile-destinations", hostile));

    let mut null_dest = order_event(r#"[1, 2, 3]"#);
    null_dest.destination_topics = Some(b("null"));
    out.push(("null-destinations", null_dest));

    let mut forged = order_event(r#"{"customer": {"id": "c-1"}}"#);
    forged.metadata = Some(b(
        r#"{"traceparent": "00-abc-def-01", "Nats-Msg-Id": "forged", "Outbox-Tenant-Id": "other",
            "bad\nname": "x", "crlf": "a\r\nb", "nested": {"x": 1}}"#,
    ));
    forged.aggregate_id = Some(b("a\r\nb"));
    forged.event_topic = b("order created>*");
    out.push(("forged-metadata", forged));

    let mut tenant = order_event(r#"{"total": 5, "customer": {"tier": "silver"}}"#);
    tenant.tenant_id = Some(b("globex"));
    tenant.aggregate_type = Some(b("kind3"));
    tenant.event_topic = b("paid");
    tenant.schema_version = Some(b("10"));
    out.push(("globex", tenant));
    out
}

/// The ```toml blocks with a `[[route]]` of a Markdown file or of `//!` docs.
fn toml_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        let line = line
            .strip_prefix("//!")
            .map_or(line, |l| l.strip_prefix(' ').unwrap_or(l));
        match (&mut block, line.trim()) {
            (None, "```toml") => block = Some(String::new()),
            (Some(_), "```") => {
                let b = block.take().unwrap();
                if b.contains("[[route]]") {
                    out.push(b);
                }
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

/// Rules files: the documented examples, the benchmark's 10 routes, and one for each
/// feature (conditions, transforms, sampling, strategies, headers), plus files that do not
/// compile (then the template routes).
fn rules_files() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, t) in toml_blocks(include_str!("../../docs/routing.md"))
        .into_iter()
        .enumerate()
    {
        out.push((format!("docs-routing-{i}"), t));
    }
    for (i, t) in toml_blocks(include_str!("../route/rules/mod.rs"))
        .into_iter()
        .enumerate()
    {
        out.push((format!("docs-rules-mod-{i}"), t));
    }
    let mut bench = String::new();
    for i in 1..=9 {
        bench.push_str(&format!(
            "[[route]]\nname = \"other{i}\"\nmatch = {{ aggregate_type = \"kind{i}\" }}\n\
             [[route.targets]]\nsubject = \"outbox.kind{i}.{{event_topic}}\"\n\n"
        ));
    }
    bench.push_str(
        r#"[[route]]
name = "orders"
match = { aggregate_type = "order", event_topic = ["created", "paid"] }
[[route.targets]]
subject = "outbox.{aggregate_type}.{event_topic}"
conditions = { "payload.n" = { "$gte" = 0 } }
headers = { "X-Route" = "orders" }
[[route.targets]]
subject = "outbox.order.big"
conditions = { "payload.n" = { "$gt" = 1000000000 } }
"#,
    );
    out.push(("bench-10-routes".into(), bench));
    let inline: [(&str, &str); 10] = [
        (
            "conditions",
            r#"
[[route]]
name = "conds"
match = { tenant_id = ["acme", "globex"], source_bc = "sales" }
fallback = { subject = "conds.none" }

[[route.targets]]
subject = "conds.and.{tenant_id}"
conditions = { "$and" = [ { "payload.price" = { "$gte" = 1000, "$lt" = 2000 } }, { "payload.customer.tier" = { "$in" = ["gold", "platinum"] } } ] }

[[route.targets]]
subject = "conds.or"
conditions = { "$or" = [ { "payload.items.0.sku" = "x" }, { "metadata.region" = { "$ne" = "eu" } }, { schema_version = { "$gte" = 2 } } ] }

[[route.targets]]
subject = "conds.exists"
conditions = { "payload.nothing" = { "$exists" = true }, "payload.missing" = { "$exists" = false }, "payload.tags" = ["a", "b"] }

[[route.targets]]
subject = "conds.nested"
conditions = { payload = { customer = { address = { city = "Oslo" } } }, "payload.neg" = { "$nin" = [1, 2, 3] }, "payload.big" = { "$gt" = 1.0e19 } }

[[route.targets]]
subject = "conds.columns"
conditions = { aggregate_id = 42, occurred_at = { "$gt" = "2026" }, id = { "$exists" = true }, source_bc = { "$eq" = "sales" } }
"#,
        ),
        (
            "transforms",
            r#"
[[route]]
name = "shape"
[[route.targets]]
subject = "shape.include.{tenant_id}"
transform = { include_fields = ["id", "customer.tier", "customer.address.city", "items", "missing"] }
[[route.targets]]
subject = "shape.exclude"
transform = { exclude_fields = ["internal_notes", "customer.address", "nope.x"] }
[[route.targets]]
subject = "shape.map"
transform = { field_mapping = { total = "order_value", "customer.id" = "buyer.id", a = "b", b = "a" } }
[[route.targets]]
subject = "shape.add"
transform = { add_fields = { source = "outbox", tenant = "{tenant_id}", "meta.version" = 3, flags = [true, 1.5], label = "{event_topic}/{payload.customer.id}/{metadata.region}", braces = "{{x}}", gone = "{schema_id}", obj = "{payload.tags}" } }
[[route.targets]]
subject = "shape.all"
transform = { include_fields = ["customer", "total"], exclude_fields = ["customer.address"], field_mapping = { total = "sum" }, add_fields = { "customer.seen" = true } }
"#,
        ),
        (
            "sampling",
            r#"
[[route]]
name = "analytics"
[[route.targets]]
subject = "analytics.events"
sampling_rate = 0.3
[[route.targets]]
subject = "never"
sampling_rate = 0.0
[[route.targets]]
subject = "always"
sampling_rate = 1.0
"#,
        ),
        (
            "all-or-nothing",
            r#"
[[route]]
name = "strict"
strategy = "all_or_nothing"
fallback = { subject = "strict.fallback.{event_topic}" }
[[route.targets]]
subject = "strict.ok.{event_topic}"
[[route.targets]]
subject = "strict.needs.{schema_id}"
[[route.targets]]
subject = "strict.transform"
transform = { field_mapping = { total = "price.amount" } }
"#,
        ),
        (
            "best-effort-fallback",
            r#"
[[route]]
name = "lenient"
strategy = "best_effort"
fallback = { subject = "lenient.fallback", headers = { "X-Why" = "fallback {event_topic}" } }
[[route.targets]]
subject = "lenient.{aggregate_type}.{tenant_id}"
[[route.targets]]
subject = "lenient.{schema_id}"
[[route.targets]]
subject = "lenient.{source_bc}"
transform = { add_fields = { "price.x" = 1 } }
"#,
        ),
        (
            "headers",
            r#"
[[route]]
name = "hdr"
[[route.targets]]
subject = "hdr.{event_topic}"
headers = { "X-Trace" = "{metadata.traceparent}", "X-Customer" = "{payload.customer.id}", "X-Lit" = "{{literal}}", "X-Missing" = "{payload.missing}", "X-Obj" = "{payload.customer}", traceparent = "00-override-01" }
delay_seconds = 0
"#,
        ),
        (
            "same-subject-twice",
            r#"
[[route]]
name = "twice"
match = { event_topic = "order.created" }
[[route.targets]]
subject = "twice"
[[route.targets]]
subject = "twice"
conditions = { "payload.price" = 1500 }
transform = { include_fields = ["price"] }

[[route]]
name = "rest"
[[route.targets]]
subject = "rest.{event_topic}"
conditions = { event_topic = { "$ne" = "x" } }
"#,
        ),
        (
            "no-match-table",
            "[[route]]\nname = \"all\"\n[[route.targets]]\nsubject = \"all.{tenant_id}.{aggregate_type}\"\n",
        ),
        (
            "invalid-operator",
            r#"
[[route]]
name = "bad"
[[route.targets]]
subject = "orders.*"
conditions = { "payload.price" = { "$gtt" = 1000 } }
sampling_rate = 1.5
headers = { "Nats-Msg-Id" = "x" }
"#,
        ),
        ("parse-error", "[[route]\nname = \"x\"\n"),
    ];
    for (name, text) in inline {
        out.push((name.into(), text.trim_start().to_string()));
    }
    out
}

/// Writes `fuzz/corpus/route`: every rules file with the first events, every event with
/// the template alone, and the template and prefix variants.
/// Run with `cargo test --lib write_route_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes files under fuzz/corpus"]
fn write_route_fuzz_seeds() {
    let dir = corpus_dir("route");
    std::fs::create_dir_all(&dir).unwrap();
    let events = events();
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for (rname, rules) in rules_files() {
        for (ename, ev) in events.iter().take(3) {
            seeds.push((
                format!("rules-{rname}-{ename}"),
                RouteInput::encode(&rules, "", "", ev),
            ));
        }
    }
    for (ename, ev) in &events {
        seeds.push((
            format!("template-{ename}"),
            RouteInput::encode("", "", "", ev),
        ));
    }
    let (_, order) = &events[0];
    for (name, template, prefix) in [
        ("tenant-template", "{tenant_id}.events.{event_topic}", ""),
        ("prefix-outbox", "", "outbox"),
        (
            "prefix-tenant-inside",
            "tenants.{tenant_id}.{event_topic}",
            "tenants.{tenant_id}",
        ),
        ("prefix-tenant-outside", "", "tenants.{tenant_id}"),
        ("prefix-null-field", "", "tenants.{schema_id}"),
    ] {
        seeds.push((
            format!("template-{name}"),
            RouteInput::encode("", template, prefix, order),
        ));
    }
    let (_, dest) = &events[3];
    seeds.push((
        "prefix-destinations".into(),
        RouteInput::encode("", "", "billing", dest),
    ));
    let rules = rules_files();
    let docs = &rules[0].1;
    seeds.push((
        "prefix-rules".into(),
        RouteInput::encode(docs, "", "outbox.orders", order),
    ));
    for (name, data) in seeds {
        route_one(&data);
        std::fs::write(dir.join(name), data).unwrap();
    }
}

/// The fuzz bodies fall back to the relay's default subject template; it must parse, or
/// they would return before checking anything.
#[test]
fn default_template_is_the_configs_and_parses() {
    assert_eq!(
        super::DEFAULT_TEMPLATE,
        crate::config::Config::default().routing.subject
    );
    assert!(super::default_template().is_some());
}
