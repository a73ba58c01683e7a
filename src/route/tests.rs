use bytes::Bytes;

use super::*;

fn event(topic: &str, agg: Option<&str>) -> OutboxEvent {
    OutboxEvent {
        id: Bytes::from_static(b"0b0c9d2e-0000-4000-8000-000000000001"),
        event_topic: Bytes::copy_from_slice(topic.as_bytes()),
        payload: Bytes::from_static(br#"{"a": 1}"#),
        aggregate_type: agg.map(|a| Bytes::copy_from_slice(a.as_bytes())),
        aggregate_id: Some(Bytes::from_static(b"42")),
        tenant_id: Some(Bytes::from_static(b"default")),
        source_bc: None,
        destination_topics: None,
        schema_id: None,
        schema_version: Some(Bytes::from_static(b"1")),
        metadata: None,
        occurred_at: Some(Bytes::from_static(b"2026-11-23 03:55:33.1+00")),
        created_at: None,
        content_type: None,
    }
}

fn router() -> Router {
    Router::new(
        Template::parse("outbox.{aggregate_type}.{event_topic}").unwrap(),
        "app/outbox_relay",
    )
}

const LSN: u64 = 0x1_0000_0010;

fn route(r: &Router, ev: &OutboxEvent) -> Vec<Envelope> {
    let mut index = 3;
    r.route(ev, LSN, &mut index)
}

fn header<'a>(e: &'a Envelope, name: &str) -> Option<&'a str> {
    e.headers.get(name).map(|v| v.as_str())
}

#[test]
fn default_template_routes_and_sets_headers() {
    let envs = route(&router(), &event("created", Some("order")));
    assert_eq!(envs.len(), 1);
    let e = &envs[0];
    assert_eq!(e.subject, "outbox.order.created");
    assert!(e.dead_letter.is_none());
    assert_eq!(e.payload.as_ref(), br#"{"a": 1}"#);
    assert_eq!(
        header(e, "Nats-Msg-Id"),
        Some("0b0c9d2e-0000-4000-8000-000000000001")
    );
    assert_eq!(header(e, "Outbox-Event-Topic"), Some("created"));
    assert_eq!(header(e, "Outbox-Aggregate-Type"), Some("order"));
    assert_eq!(header(e, "Outbox-Aggregate-Id"), Some("42"));
    assert_eq!(header(e, "Outbox-Tenant-Id"), Some("default"));
    assert_eq!(header(e, "Outbox-Schema-Version"), Some("1"));
    assert_eq!(header(e, "Outbox-Commit-Lsn"), Some("1/10"));
    assert_eq!(header(e, "Outbox-Tx-Index"), Some("3"));
    assert_eq!(header(e, "Outbox-Source"), None);
}

#[test]
fn tokens_are_sanitised() {
    let envs = route(&router(), &event("order created>*", Some("big order")));
    assert_eq!(envs[0].subject, "outbox.big_order.order_created__");
    assert!(envs[0].dead_letter.is_none());
}

#[test]
fn null_template_field_is_dead_lettered_with_reason() {
    let envs = route(&router(), &event("created", None));
    assert_eq!(envs.len(), 1);
    let reason = envs[0].dead_letter.as_deref().unwrap();
    assert!(reason.contains("aggregate_type"), "{reason}");
}

#[test]
fn empty_token_from_dots_is_dead_lettered() {
    let envs = route(&router(), &event("a..b", Some("order")));
    assert!(
        envs[0]
            .dead_letter
            .as_deref()
            .unwrap()
            .contains("empty token")
    );
}

#[test]
fn destination_topics_fan_out_with_distinct_msg_ids() {
    let mut ev = event("created", Some("order"));
    ev.destination_topics = Some(Bytes::from_static(
        br#"["billing.orders", "audit.all", "billing.orders"]"#,
    ));
    let envs = route(&router(), &ev);
    let subjects: Vec<&str> = envs.iter().map(|e| e.subject.as_str()).collect();
    assert_eq!(subjects, ["billing.orders", "audit.all"]);
    assert_eq!(
        header(&envs[0], "Nats-Msg-Id"),
        Some("0b0c9d2e-0000-4000-8000-000000000001:billing.orders")
    );
    assert_eq!(
        header(&envs[1], "Outbox-Event-Id"),
        Some("0b0c9d2e-0000-4000-8000-000000000001")
    );
}

#[test]
fn destination_topics_single_keeps_plain_msg_id_and_null_means_template() {
    let mut ev = event("created", Some("order"));
    ev.destination_topics = Some(Bytes::from_static(br#"["billing.orders"]"#));
    let envs = route(&router(), &ev);
    assert_eq!(
        header(&envs[0], "Nats-Msg-Id"),
        Some("0b0c9d2e-0000-4000-8000-000000000001")
    );
    ev.destination_topics = Some(Bytes::from_static(b"null"));
    assert_eq!(route(&router(), &ev)[0].subject, "outbox.order.created");
}

#[test]
fn hostile_destination_topics_are_refused() {
    for bad in [
        r#"["a.>"]"#,
        r#"["$JS.API.STREAM.DELETE.X"]"#,
        r#"["a..b"]"#,
        r#"["a b"]"#,
        r#"[""]"#,
        r#""x""#,
        "[1]",
        "[]",
    ] {
        let mut ev = event("created", Some("order"));
        ev.destination_topics = Some(Bytes::copy_from_slice(bad.as_bytes()));
        let envs = route(&router(), &ev);
        assert!(
            envs.iter().all(|e| e.dead_letter.is_some()),
            "{bad} was accepted"
        );
        for e in &envs {
            validate_subject(&e.subject)
                .unwrap_or_else(|err| panic!("dlq tail {:?} invalid: {err}", e.subject));
        }
    }
    let long = format!(r#"["{}"]"#, "a".repeat(300));
    let mut ev = event("created", Some("order"));
    ev.destination_topics = Some(Bytes::from(long));
    assert!(route(&router(), &ev)[0].dead_letter.is_some());
}

#[test]
fn long_multibyte_dead_letter_subject_is_cut_on_a_char_boundary() {
    // Found by the `route` fuzz target: the dead-letter subject was cut at byte 200
    // whatever the character there, and a multi-byte one straddling it panicked.
    for pad in 0..4 {
        let topic = format!("{}{}", "a".repeat(197 + pad), "\u{20ac}".repeat(10));
        // The template needs aggregate_type: NULL dead-letters under event_topic.
        let null_field = event(&topic, None);
        let mut bad_destination = event("created", Some("order"));
        bad_destination.destination_topics = Some(Bytes::from(
            serde_json::to_vec(&[format!("{topic} x")]).unwrap(),
        ));
        for ev in [null_field, bad_destination] {
            let envs = route(&router(), &ev);
            assert!(envs[0].dead_letter.is_some());
            let subject = &envs[0].subject;
            assert!(subject.len() <= 200, "{} bytes", subject.len());
            assert!(subject.starts_with(&"a".repeat(197)), "{subject}");
            validate_subject(subject).unwrap();
        }
    }
}

#[test]
fn metadata_becomes_headers_but_cannot_forge_ours() {
    let mut ev = event("created", Some("order"));
    ev.metadata = Some(Bytes::from_static(
        br#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "user_id": 7,
            "Nats-Msg-Id": "forged", "Outbox-Tenant-Id": "other", "bad\nname": "x", "crlf": "a\r\nb", "nested": {"x": 1}}"#,
    ));
    let e = &route(&router(), &ev)[0];
    assert_eq!(
        header(e, "traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(header(e, "user_id"), Some("7"));
    assert_eq!(
        header(e, "Nats-Msg-Id"),
        Some("0b0c9d2e-0000-4000-8000-000000000001")
    );
    assert_eq!(header(e, "Outbox-Tenant-Id"), Some("default"));
    assert_eq!(header(e, "crlf"), None);
    assert_eq!(header(e, "nested"), None);
}

#[test]
fn metadata_not_an_object_is_ignored() {
    let mut ev = event("created", Some("order"));
    ev.metadata = Some(Bytes::from_static(b"[1,2]"));
    let e = &route(&router(), &ev)[0];
    assert!(e.dead_letter.is_none());
}

#[test]
fn crlf_in_column_does_not_block_event() {
    let mut ev = event("created", Some("order"));
    ev.aggregate_id = Some(Bytes::from_static(b"a\r\nb"));
    let e = &route(&router(), &ev)[0];
    assert_eq!(header(e, "Outbox-Aggregate-Id"), Some("a  b"));
}

#[test]
fn template_parse_errors() {
    assert!(
        Template::parse("outbox.{nope}")
            .unwrap_err()
            .contains("nope")
    );
    assert!(Template::parse("outbox.{event_topic").is_err());
    assert!(Template::parse("outbox.>").is_err());
    assert!(Template::parse("outbox..{event_topic}").is_err());
    assert!(Template::parse("{tenant_id}.events.{event_topic}").is_ok());
}

#[test]
fn subject_rules() {
    assert!(validate_subject("a.b.c").is_ok());
    assert!(validate_subject("a.*").is_err());
    assert!(validate_subject("$SYS.x").is_err());
    assert!(validate_subject(".a").is_err());
    assert!(validate_subject("a.").is_err());
    assert!(validate_subject("a\tb").is_err());
}

proptest::proptest! {
    #[test]
    fn routing_is_deterministic_and_subjects_valid(topic in ".{0,40}", agg in proptest::option::of(".{0,20}")) {
        let ev = event(&topic, agg.as_deref());
        let a = route(&router(), &ev);
        let b = route(&router(), &ev);
        proptest::prop_assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b.iter()) {
            proptest::prop_assert_eq!(&x.subject, &y.subject);
            proptest::prop_assert_eq!(&x.dead_letter, &y.dead_letter);
            if x.dead_letter.is_none() {
                proptest::prop_assert!(validate_subject(&x.subject).is_ok());
            }
        }
    }
}

#[test]
fn fan_out_copies_get_consecutive_positions_and_origin() {
    let mut ev = event("created", Some("order"));
    ev.destination_topics = Some(Bytes::from_static(br#"["a.b", "c.d"]"#));
    let envs = route(&router(), &ev);
    assert_eq!(
        envs[0].pos,
        Position {
            commit_lsn: LSN,
            index: 3
        }
    );
    assert_eq!(
        envs[1].pos,
        Position {
            commit_lsn: LSN,
            index: 4
        }
    );
    assert_eq!(header(&envs[1], "Outbox-Tx-Index"), Some("4"));
    assert_eq!(header(&envs[0], "Outbox-Origin"), Some("app/outbox_relay"));
}

/// The dead-letter subject is cut to 200 bytes; cutting inside a multi-byte character
/// panicked (the relay crashed on the row, and again on every replay of it).
#[test]
fn long_multibyte_subjects_dead_letter_without_panic() {
    let long = format!("outbox.{}", "é".repeat(130));
    let mut ev = event(&format!("x{}", "é".repeat(150)), None);
    ev.destination_topics = Some(Bytes::from(format!(r#"["{long}"]"#)));
    let envs = route(&router(), &ev);
    assert!(
        envs[0]
            .dead_letter
            .as_ref()
            .unwrap()
            .contains("longer than 255")
    );
    ev.destination_topics = None;
    let envs = envs.into_iter().chain(route(&router(), &ev));
    for e in envs {
        assert!(e.dead_letter.is_some());
        assert!(e.subject.len() <= 200, "{}", e.subject);
        validate_subject(&e.subject).unwrap();
    }
    assert_eq!(truncate_at_char("aé", 2), "a");
    assert_eq!(truncate_at_char("aé", 3), "aé");
}

/// `outbox.>` and `outbox.*` are dead-lettered under `outbox._`, the subject of the valid
/// entry `outbox._`: keyed by subject, all three copies had one `Nats-Msg-Id` and
/// JetStream kept only the first (the routed copy was lost).
#[test]
fn fan_out_copies_never_share_a_msg_id() {
    let mut ev = event("created", Some("order"));
    ev.destination_topics = Some(Bytes::from_static(
        br#"["outbox.>", "outbox._", "outbox.*", "outbox..x", "outbox.x."]"#,
    ));
    let envs = route(&router(), &ev);
    let ids: Vec<&str> = envs
        .iter()
        .map(|e| header(e, "Nats-Msg-Id").unwrap())
        .collect();
    let id = "0b0c9d2e-0000-4000-8000-000000000001";
    assert_eq!(
        ids,
        [
            format!("{id}:dead letter 0"),
            format!("{id}:outbox._"),
            format!("{id}:dead letter 2"),
            format!("{id}:dead letter 3"),
            format!("{id}:dead letter 4"),
        ]
    );
}

/// A reason quotes the failing entry, cut: a row can make it megabytes long.
#[test]
fn reasons_quote_long_entries_cut() {
    let mut ev = event("created", Some("order"));
    ev.destination_topics = Some(Bytes::from(format!(r#"["{}"]"#, "a".repeat(10_000))));
    let reason = route(&router(), &ev)[0].dead_letter.clone().unwrap();
    assert!(reason.len() < 250, "{reason}");
    assert!(reason.contains("(10000 bytes)") && reason.ends_with("longer than 255 bytes"));
}

/// A per-tenant prefix: a tenant value that is not one token as written could reach
/// another tenant's subjects (`acme.evil` publishes below `tenants.acme`; `a b` and
/// `a*b` share `tenants.a_b`).
#[test]
fn prefix_fields_must_be_single_tokens() {
    let r = Router::new(
        Template::parse("tenants.{tenant_id}.{event_topic}").unwrap(),
        "app/outbox_relay",
    )
    .with_prefix(Some(Template::parse("tenants.{tenant_id}").unwrap()));
    let mut ev = event("created", Some("order"));
    for (tenant, ok) in [
        ("acme", true),
        ("ünï-😀_1", true),
        ("acme.evil", false),
        ("a b", false),
        ("a*b", false),
        (">", false),
        ("", false),
    ] {
        ev.tenant_id = Some(Bytes::copy_from_slice(tenant.as_bytes()));
        let e = &route(&r, &ev)[0];
        assert_eq!(
            e.dead_letter.is_none(),
            ok,
            "{tenant:?}: {:?}",
            e.dead_letter
        );
        if ok {
            assert_eq!(e.subject, format!("tenants.{tenant}.created"));
        } else {
            validate_subject(&e.subject).unwrap();
        }
    }
}

/// The fallback that replaces a copy found unpublishable by the pipeline: at that
/// copy's position, never outside the enforced prefix, absent without a fallback.
#[test]
fn fallback_for_takes_the_position_and_keeps_to_the_prefix() {
    let rules = rules::Rules::from_toml(
        r#"
[[route]]
name = "r"
fallback = { subject = "outbox.{tenant_id}.fallback" }
[[route.targets]]
subject = "outbox.{tenant_id}.a"

[[route]]
name = "none"
match = { aggregate_type = "none" }
[[route.targets]]
subject = "x"
"#,
    )
    .unwrap();
    let r = router().with_rules(Some(rules.clone()));
    let ev = event("t", Some("order"));
    let pos = Position {
        commit_lsn: LSN,
        index: 7,
    };
    let fb = r.fallback_for(&ev, 0, pos, true).expect("a fallback");
    assert_eq!(fb.subject, "outbox.default.fallback");
    assert_eq!(fb.pos, pos);
    assert_eq!(fb.fallback, FallbackRole::Copy);
    assert_eq!(
        header(&fb, "Nats-Msg-Id"),
        Some("0b0c9d2e-0000-4000-8000-000000000001:outbox.default.fallback")
    );
    assert!(
        r.fallback_for(&ev, 1, pos, false).is_none(),
        "route without fallback"
    );
    let fenced = router()
        .with_rules(Some(rules))
        .with_prefix(Some(Template::parse("outbox.other").unwrap()));
    assert!(
        fenced.fallback_for(&ev, 0, pos, false).is_none(),
        "outside the prefix"
    );
    // The routed copy of a best_effort target offers the fallback.
    let envs = route(&r, &ev);
    assert_eq!(envs[0].fallback, FallbackRole::Available(0));
}

/// A rules target's `{partition:N}` carries the header too (its own count, whatever
/// `routing.subject` says), as does a fallback; a dead-lettered target has none.
#[test]
fn rules_subjects_with_a_partition_carry_the_header() {
    let rules = rules::Rules::from_toml(
        r#"
[[route]]
name = "r"
fallback = { subject = "outbox.fb.{partition:3}" }
[[route.targets]]
subject = "outbox.{aggregate_type}.{partition:16}"
[[route.targets]]
subject = "outbox.plain"
[[route.targets]]
subject = "outbox.{schema_id}.{partition:16}"
"#,
    )
    .unwrap();
    let r = router().with_rules(Some(rules));
    let ev = event("created", Some("order"));
    let envs = route(&r, &ev);
    let p16 = partition(b"42", 16).to_string();
    assert_eq!(envs[0].subject, format!("outbox.order.{p16}"));
    assert_eq!(header(&envs[0], headers::PARTITION), Some(p16.as_str()));
    assert_eq!(header(&envs[1], headers::PARTITION), None);
    // The third target's subject fails (schema_id is NULL): best_effort replaces it by
    // the fallback, with the fallback's partition.
    let p3 = partition(b"42", 3).to_string();
    assert_eq!(envs[2].subject, format!("outbox.fb.{p3}"));
    assert_eq!(header(&envs[2], headers::PARTITION), Some(p3.as_str()));
    let pos = Position {
        commit_lsn: LSN,
        index: 0,
    };
    let fb = r.fallback_for(&ev, 0, pos, false).expect("a fallback");
    assert_eq!(header(&fb, headers::PARTITION), Some(p3.as_str()));
    // Without a fallback it is a dead letter, and has no partition.
    let rules = rules::Rules::from_toml(
        "[[route]]\nname = \"r\"\n[[route.targets]]\nsubject = \"outbox.{schema_id}.{partition:16}\"\n",
    )
    .unwrap();
    let envs = route(&router().with_rules(Some(rules)), &ev);
    assert!(envs[0].dead_letter.is_some(), "schema_id is null");
    assert_eq!(header(&envs[0], headers::PARTITION), None);
}

/// FNV-1a (32-bit), the hash nats-server's `partition()` mapping uses: its published
/// test vectors, and the placeholder and header that carry it.
#[test]
fn partition_placeholder_hashes_the_aggregate_id_like_nats_server() {
    assert_eq!(partition(b"", u32::MAX), 0x811c_9dc5);
    assert_eq!(partition(b"a", u32::MAX), 0xe40c_292c);
    assert_eq!(partition(b"foobar", u32::MAX), 0xbf9c_f968);
    assert_eq!(partition(b"foobar", 7), 0xbf9c_f968 % 7);
    let r = Router::new(
        Template::parse("outbox.{aggregate_type}.{partition:8}").unwrap(),
        "app/outbox_relay",
    );
    let envs = route(&r, &event("created", Some("order")));
    let p = partition(b"42", 8);
    assert_eq!(envs[0].subject, format!("outbox.order.{p}"));
    assert_eq!(
        header(&envs[0], headers::PARTITION),
        Some(p.to_string().as_str())
    );
    // Without the placeholder, no header.
    let envs = route(&router(), &event("created", Some("order")));
    assert_eq!(header(&envs[0], headers::PARTITION), None);
    // No aggregate id: a dead letter with the reason, never a guessed partition.
    let mut ev = event("created", Some("order"));
    ev.aggregate_id = None;
    let envs = route(&r, &ev);
    assert!(
        envs[0]
            .dead_letter
            .as_deref()
            .is_some_and(|d| d.contains("aggregate_id")),
        "{:?}",
        envs[0].dead_letter
    );
    for bad in [
        "x.{partition:0}",
        "x.{partition:}",
        "x.{partition:-1}",
        "x.{partition:1000001}",
    ] {
        let e = Template::parse(bad).unwrap_err();
        assert!(e.contains("partition count"), "{bad}: {e}");
    }
    assert_eq!(
        Template::parse("x.{partition:3}").unwrap().partitions(),
        Some(3)
    );
    assert_eq!(
        Template::parse("x.{aggregate_id}").unwrap().partitions(),
        None
    );
}
