//! Routing rules through real servers: conditions, transforms, sampling, fallback,
//! per-target headers and the all-or-nothing strategy (`[routing] rules_file`).

use crate::harness::*;
use crate::support::wait_for;

const RULES: &str = r#"
[[route]]
name = "orders"
match = { aggregate_type = "order" }
strategy = "best_effort"
fallback = { subject = "outbox.orders.other" }

[[route.targets]]
subject = "outbox.orders.big.{tenant_id}"
conditions = { "payload.total" = { "$gt" = 1000 } }
transform = { include_fields = ["total", "sku"], add_fields = { tenant = "{tenant_id}" } }
headers = { "X-Priority" = "high" }

[[route.targets]]
subject = "outbox.orders.audit"
conditions = { "payload.sku" = { "$in" = ["a", "b"] } }

[[route.targets]]
subject = "outbox.orders.never"
sampling_rate = 0.0

[[route]]
name = "refunds"
match = { aggregate_type = "refund" }
fallback = { subject = "outbox.refunds.unrouted" }

[[route.targets]]
subject = "outbox.refunds.{aggregate_id}"

[[route]]
name = "payments"
match = { aggregate_type = "payment" }
strategy = "all_or_nothing"

[[route.targets]]
subject = "outbox.payments.ok"

[[route.targets]]
subject = "nostream.payments"

[[route]]
name = "shipments"
match = { aggregate_type = "shipment" }
fallback = { subject = "outbox.shipments.fallback" }

[[route.targets]]
subject = "outbox.shipments.ok"

[[route.targets]]
subject = "nostream.shipments"

[[route]]
name = "returns"
match = { aggregate_type = "return" }
fallback = { subject = "nostream.fallback" }

[[route.targets]]
subject = "nostream.returns"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_route_transform_sample_and_fall_back() {
    let env = Env::start_migrated().await;
    env.write_rules_config(RULES, "");
    let out = env.cli(&["check"]);
    assert!(out.status.success(), "{}", out.text());
    let _relay = env.spawn_relay();
    let c = env.sql().await;
    c.batch_execute(
        r#"INSERT INTO outbox_events (event_topic, aggregate_type, tenant_id, payload)
             VALUES ('placed', 'order', 'acme', '{"total": 1500, "sku": "a", "secret": 1}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             VALUES ('placed', 'order', '{"total": 5, "sku": "z"}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             VALUES ('paid', 'payment', '{"amount": 1}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             VALUES ('created', 'user', '{"k": 1}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             VALUES ('issued', 'refund', '{"k": 2}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             VALUES ('sent', 'shipment', '{"k": 3}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             VALUES ('back', 'return', '{"k": 4}');"#,
    )
    .await
    .unwrap();
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, 10).await;
    assert_eq!(
        subjects(&msgs),
        [
            // Big order: two targets matched (sampling 0 dropped the third).
            "outbox.orders.big.acme",
            "outbox.orders.audit",
            // Small order: no target matched, the fallback took it.
            "outbox.orders.other",
            // Payment: one target has no stream, so neither copy is published.
            "outbox.dlq.outbox.payments.ok",
            "outbox.dlq.nostream.payments",
            // No route for users: the subject template.
            "outbox.user.created",
            // Refund without aggregate_id: its target cannot render, the fallback takes it.
            "outbox.refunds.unrouted",
            // Shipment: one target has no stream (found at publish time): under
            // best_effort the fallback takes that copy.
            "outbox.shipments.ok",
            "outbox.shipments.fallback",
            // Return: its target and its fallback have no stream: dead-lettered.
            "outbox.dlq.nostream.returns",
        ]
    );
    assert_ne!(msgs[7].msg_id(), msgs[8].msg_id());
    assert!(
        msgs[9]
            .header("Outbox-Dlq-Reason")
            .is_some_and(|r| r.contains("no stream captures")),
        "{:?}",
        msgs[9].header("Outbox-Dlq-Reason")
    );
    let big: serde_json::Value = serde_json::from_slice(&msgs[0].payload).unwrap();
    assert_eq!(
        big,
        serde_json::json!({"total": 1500, "sku": "a", "tenant": "acme"})
    );
    assert_eq!(msgs[0].header("X-Priority"), Some("high"));
    // Without a transform the payload passes byte for byte.
    assert_eq!(
        msgs[1].payload,
        br#"{"sku": "a", "total": 1500, "secret": 1}"#
    );
    assert!(
        msgs[3]
            .header("Outbox-Dlq-Reason")
            .is_some_and(|r| r.starts_with("all_or_nothing")),
        "{:?}",
        msgs[3].header("Outbox-Dlq-Reason")
    );
    // Fan-out copies of one event do not dedup each other.
    assert_ne!(msgs[0].msg_id(), msgs[1].msg_id());
}

/// A bad rules file is refused by `check` and `run`, naming the rule and the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_file_is_refused_naming_rule_and_field() {
    let env = Env::start_migrated().await;
    env.write_rules_config("[[route]]\nname = \"r\"\n[[route.targets]]\nsubject = \"x.y\"\nconditions = { \"payload.p\" = { \"$gtt\" = 1 } }\n", "");
    for cmd in ["check", "run"] {
        let out = env.cli(&[cmd]);
        assert!(!out.status.success(), "{cmd}: {}", out.text());
        assert!(
            out.text().contains("routing.rules_file") && out.text().contains("$gtt"),
            "{cmd}: {}",
            out.text()
        );
    }
}

/// An enforced per-tenant prefix: nothing a row asks for can publish outside its
/// tenant's subjects; each refusal is dead-lettered with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforced_tenant_prefix_refuses_everything_outside_it() {
    let env = Env::start_migrated().await;
    env.write_config(
        "[[streams]]\nname = \"TENANTS\"\nsubjects = [\"tenants.>\"]\n\
         [routing]\nsubject = \"tenants.{tenant_id}.{event_topic}\"\nsubject_prefix = \"tenants.{tenant_id}\"\n",
    );
    let _relay = env.spawn_relay();
    let long = format!("tenants.acme.{}", "x".repeat(300));
    let hostile = [
        ">".to_string(),
        "$JS.API.STREAM.DELETE.OUTBOX".to_string(),
        "tenants.other.orders".to_string(),
        "tenants.acme..x".to_string(),
        "tenants".to_string(),
        long,
    ];
    let c = env.sql().await;
    for d in &hostile {
        c.execute(
            "INSERT INTO outbox_events (event_topic, tenant_id, payload, destination_topics)
             VALUES ('x', 'acme', '{}', jsonb_build_array($1::text))",
            &[d],
        )
        .await
        .unwrap();
    }
    c.batch_execute(
        r#"INSERT INTO outbox_events (event_topic, tenant_id, payload, destination_topics)
             VALUES ('x', 'acme', '{}', '["tenants.acme.ok"]');
           INSERT INTO outbox_events (event_topic, tenant_id, payload) VALUES ('created', 'acme', '{}');"#,
    )
    .await
    .unwrap();
    let js = env.js().await;
    let dead = wait_read(&js, STREAM, hostile.len() as u64).await;
    assert!(
        dead.iter().all(
            |m| m.subject.starts_with("outbox.dlq.") && m.header("Outbox-Dlq-Reason").is_some()
        ),
        "{:?}",
        subjects(&dead)
    );
    let reason = |i: usize| dead[i].header("Outbox-Dlq-Reason").unwrap_or("");
    assert!(
        reason(2).contains("outside the enforced prefix tenants.acme"),
        "{}",
        reason(2)
    );
    assert!(
        reason(4).contains("outside the enforced prefix"),
        "{}",
        reason(4)
    );
    let ok = wait_read(&js, "TENANTS", 2).await;
    assert_eq!(subjects(&ok), ["tenants.acme.ok", "tenants.acme.created"]);
}

/// Table-less events: a transactional `pg_logical_emit_message` with the configured
/// prefix is routed like a row (payload byte for byte); a non-transactional one is
/// refused and counted; one that is not an event object is dead-lettered with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_messages_are_table_less_events() {
    let env = Env::start_migrated().await;
    let _relay = env.spawn_relay();
    let c = env.sql().await;
    c.batch_execute(
        r#"SELECT pg_logical_emit_message(false, 'outbox', '{"event_topic": "nope", "payload": {}}');
           BEGIN;
           SELECT pg_logical_emit_message(true, 'outbox',
             '{"id": "e-1", "event_topic": "created", "aggregate_type": "order", "tenant_id": "acme", "payload": {"b": 1,  "a": 2}}');
           SELECT pg_logical_emit_message(true, 'other-app', '{"ignored": true}');
           SELECT pg_logical_emit_message(true, 'outbox', 'not json');
           SELECT pg_logical_emit_message(true, 'outbox', '{"event_topic": "paid", "aggregate_type": "order", "payload": [1]}');
           COMMIT;"#,
    )
    .await
    .unwrap();
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, 3).await;
    assert_eq!(msgs[0].subject, "outbox.order.created");
    assert_eq!(msgs[0].msg_id(), "e-1");
    assert_eq!(msgs[0].header("Outbox-Tenant-Id"), Some("acme"));
    assert_eq!(msgs[0].payload, br#"{"b": 1,  "a": 2}"#, "byte for byte");
    assert!(
        msgs[1].subject.starts_with("outbox.dlq."),
        "{}",
        msgs[1].subject
    );
    assert!(
        msgs[1]
            .header("Outbox-Dlq-Reason")
            .is_some_and(|r| r.contains("not an outbox event object")),
        "{:?}",
        msgs[1].header("Outbox-Dlq-Reason")
    );
    assert_eq!(msgs[2].subject, "outbox.order.paid");
    assert!(msgs[2].msg_id().starts_with("msg-"), "{}", msgs[2].msg_id());
    let port = env.http_port;
    wait_for(
        "non-transactional message counted",
        DEADLINE,
        || async move {
            http_get(port, "/metrics").await.is_some_and(|(_, b)| {
                b.contains(r#"outbox_relay_events_dead_lettered_total{kind="non_transactional"} 1"#)
            })
        },
    )
    .await;
}

const DELAY_RULES: &str = r#"
[[route]]
name = "carts"
match = { aggregate_type = "cart" }

[[route.targets]]
subject = "outbox.cart.now"

[[route.targets]]
subject = "outbox.cart.reminder"
delay_seconds = 2
"#;

/// The version of the test's nats-server.
async fn nats_version(env: &Env) -> String {
    async_nats::connect(env.nats.url())
        .await
        .expect("connect to nats")
        .server_info()
        .version
}

fn is_definition(m: &Msg) -> bool {
    m.subject.starts_with("outbox-relay.schedule.")
}

/// Carts with a delayed reminder in the test below.
const CARTS: i64 = 600;

/// Delayed targets through JetStream message schedules: the copy is stored at commit
/// time + delay, not before, exactly once; and after a replay beyond the duplicate window
/// (slot rewound, checkpoint gone) neither the delayed copies fire again nor does a
/// message published after them return, although the fired copies were appended to the
/// stream after it: more of them ([`CARTS`]) than the reconciliation scan looks past
/// for other publishers' messages (512), which they must not count against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_targets_fire_at_commit_plus_delay_exactly_once() {
    let env = Env::start_migrated().await;
    env.write_rules_config(DELAY_RULES, "duplicate_window = \"1s\"\n");
    let out = env.cli(&["check"]);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay();
    wait_http(env.http_port, "/readyz", 200, "").await;
    let c = env.sql().await;
    // A copy of the slot from before the events, to rewind to later.
    c.batch_execute("SELECT pg_copy_logical_replication_slot('outbox_relay', 'rewind')")
        .await
        .unwrap();

    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let carts = insert_carts(&c, CARTS).await;
    // Committed after the carts, stored before their reminders fire: the stream's
    // newest message of the relay's own is then not the highest position.
    c.batch_execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('created', 'user', '{}')",
    )
    .await
    .unwrap();
    let js = env.js().await;
    let msgs = wait_reminders(&js, CARTS as usize).await;
    assert_eq!(
        count(&msgs, "outbox.cart.now"),
        CARTS as usize,
        "{:?}",
        subjects(&msgs)
    );
    assert_eq!(count(&msgs, "outbox.user.created"), 1);
    let reminders: Vec<&Msg> = msgs
        .iter()
        .filter(|m| m.subject == "outbox.cart.reminder")
        .collect();
    let mut ids: Vec<&str> = reminders
        .iter()
        .map(|m| m.header("Outbox-Event-Id").unwrap())
        .collect();
    ids.sort();
    let mut want: Vec<&str> = carts.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(ids, want, "each cart's reminder, once");
    for r in &reminders {
        assert!(
            r.stored_at_ms >= t0 + 2000,
            "stored {} ms after the insert began: before the delay",
            r.stored_at_ms - t0
        );
        assert!(r.header("Nats-Scheduler").is_some(), "{:?}", r.headers);
        assert_eq!(r.payload, br#"{"cart": 1}"#, "payload passes untouched");
    }

    // Replay everything beyond the duplicate window.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    relay.kill();
    wait_slot_released(&c, "outbox_relay").await;
    c.batch_execute(
        "SELECT pg_drop_replication_slot('outbox_relay');
         SELECT pg_copy_logical_replication_slot('rewind', 'outbox_relay');
         SELECT pg_drop_replication_slot('rewind');",
    )
    .await
    .unwrap();
    js.delete_stream("KV_outbox_relay").await.unwrap();
    let _relay = env.spawn_relay();
    // A new cart whose reminder fires two seconds after its commit: a replayed
    // definition (its time long past) would have fired before it.
    insert_carts(&c, 1).await;
    let msgs = wait_reminders(&js, CARTS as usize + 1).await;
    assert_eq!(
        count(&msgs, "outbox.cart.reminder"),
        CARTS as usize + 1,
        "{:?}",
        subjects(&msgs)
    );
    assert_eq!(
        count(&msgs, "outbox.cart.now"),
        CARTS as usize + 1,
        "{:?}",
        subjects(&msgs)
    );
    assert_eq!(
        count(&msgs, "outbox.user.created"),
        1,
        "the message stored after the first definitions was not published again"
    );
}

async fn insert_carts(c: &tokio_postgres::Client, n: i64) -> Vec<String> {
    c.query(
        r#"INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, payload)
           SELECT 'abandoned', 'cart', 'c' || g, '{"cart": 1}' FROM generate_series(1, $1::bigint) g
           RETURNING id::text"#,
        &[&n],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn count(msgs: &[Msg], subject: &str) -> usize {
    msgs.iter().filter(|m| m.subject == subject).count()
}

/// Wait until `n` reminders are stored and no schedule definition is pending; every
/// message of the stream.
async fn wait_reminders(js: &async_nats::jetstream::Context, n: usize) -> Vec<Msg> {
    let js2 = js.clone();
    wait_for(
        &format!("{n} fired reminders and no pending definition"),
        DEADLINE,
        move || {
            let js = js2.clone();
            async move {
                let msgs = read_all(&js, STREAM).await;
                count(&msgs, "outbox.cart.reminder") >= n && !msgs.iter().any(is_definition)
            }
        },
    )
    .await;
    read_all(js, STREAM).await
}

/// Definitions already stored outlive the delays: a restart whose rules no longer delay
/// anything keeps the stream's schedule namespace (taking the subjects or
/// `allow_msg_schedules` away would leave the stored definitions unable to fire), and
/// the pending reminder still fires, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_schedules_survive_rules_without_delays() {
    let env = Env::start_migrated().await;
    env.write_rules_config(
        &DELAY_RULES.replace("delay_seconds = 2", "delay_seconds = 20"),
        "",
    );
    let mut relay = env.spawn_relay();
    wait_http(env.http_port, "/readyz", 200, "").await;
    insert_carts(&env.sql().await, 1).await;
    let js = env.js().await;
    let js2 = js.clone();
    wait_for("the reminder's definition stored", DEADLINE, move || {
        let js = js2.clone();
        async move { read_all(&js, STREAM).await.iter().any(is_definition) }
    })
    .await;
    assert!(relay.terminate().success());

    env.write_rules_config(
        "[[route]]\nname = \"carts\"\nmatch = { aggregate_type = \"cart\" }\n\n[[route.targets]]\nsubject = \"outbox.cart.now\"\n",
        "",
    );
    let _relay = env.spawn_relay();
    wait_http(env.http_port, "/readyz", 200, "").await;
    let config = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert!(config.allow_message_schedules, "{config:?}");
    assert!(
        config
            .subjects
            .iter()
            .any(|s| s == "outbox-relay.schedule.OUTBOX.>"),
        "{:?}",
        config.subjects
    );
    assert!(
        read_all(&js, STREAM).await.iter().any(is_definition),
        "still pending after the restart"
    );
    let msgs = wait_reminders(&js, 1).await;
    assert_eq!(
        count(&msgs, "outbox.cart.reminder"),
        1,
        "{:?}",
        subjects(&msgs)
    );
    assert_eq!(count(&msgs, "outbox.cart.now"), 1, "{:?}", subjects(&msgs));
}

/// `delay_seconds` needs JetStream message schedules (nats-server 2.12+). On an older
/// server (the compatibility run on Debian's 2.9) `check` and `run` refuse the rules
/// file naming the version needed; on a newer one `check` accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_seconds_needs_a_server_with_schedules() {
    let env = Env::start_migrated().await;
    env.write_rules_config(DELAY_RULES, "");
    let version = nats_version(&env).await;
    let out = env.cli(&["check"]);
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let old = (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) < (2, 12);
    if !old {
        assert!(out.status.success(), "nats {version}: {}", out.text());
        undeclared_stream_without_schedules(&env).await;
        return;
    }
    assert!(!out.status.success(), "nats {version}: {}", out.text());
    let needs = "delay_seconds (up to 2) needs nats-server 2.12 or newer";
    assert!(out.text().contains(needs), "{}", out.text());
    assert!(out.text().contains(&version), "{}", out.text());
    let mut relay = env.spawn_relay();
    assert!(!relay.wait_exit().await.success());
    assert!(relay.log_text().contains(needs), "{}", relay.log_text());
}

/// A delayed target bound for a stream the relay does not manage (not in `[[streams]]`)
/// and without schedules: `check` names the target, the stream and what it lacks; the
/// relay dead-letters the delayed copy with that reason and publishes the rest.
async fn undeclared_stream_without_schedules(env: &Env) {
    let js = env.js().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "LATER".into(),
        subjects: vec!["later.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // Schedules allowed, but definitions would expire before they fire.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SHORT".into(),
        subjects: vec!["short.>".into(), "outbox-relay.schedule.SHORT.>".into()],
        max_age: std::time::Duration::from_secs(3),
        allow_message_schedules: true,
        ..Default::default()
    })
    .await
    .unwrap();
    env.write_rules_config(
        r#"
[[route]]
name = "carts"
match = { aggregate_type = "cart" }

[[route.targets]]
subject = "outbox.cart.now"

[[route.targets]]
subject = "later.{aggregate_type}"
delay_seconds = 5

[[route.targets]]
subject = "short.{aggregate_type}"
delay_seconds = 5
"#,
        "",
    );
    let out = env.cli(&["check"]);
    assert!(!out.status.success(), "{}", out.text());
    for needle in [
        r#"route "carts" targets[1] (delay_seconds) can route to stream LATER"#,
        "allow_msg_schedules and the subjects outbox-relay.schedule.LATER.>",
        "declare stream LATER in [[streams]]",
        r#"route "carts" targets[2] (delay_seconds 5) can route to stream SHORT: stream SHORT keeps messages for max_age 3s, not longer than delay_seconds 5"#,
    ] {
        assert!(out.text().contains(needle), "{needle}: {}", out.text());
    }
    let _relay = env.spawn_relay();
    insert_carts(&env.sql().await, 1).await;
    let msgs = wait_read(&js, STREAM, 3).await;
    assert_eq!(
        subjects(&msgs),
        [
            "outbox.cart.now",
            "outbox.dlq.later.cart",
            "outbox.dlq.short.cart"
        ]
    );
    let reason = msgs[1].header("Outbox-Dlq-Reason").unwrap_or("");
    assert!(
        reason.contains("stream LATER (subject later.cart) cannot hold schedule definitions"),
        "{reason}"
    );
    let reason = msgs[2].header("Outbox-Dlq-Reason").unwrap_or("");
    assert!(
        reason.contains("the schedule definition would expire before it fires"),
        "{reason}"
    );
    assert_eq!(stream_count(&js, "LATER").await, 0);
    assert_eq!(stream_count(&js, "SHORT").await, 0);
}

/// Issue 16: `{partition:N}` in `routing.subject` is the same partition nats-server's
/// subject mapping computes. The stream `PARTS` rewrites each stored subject
/// `parts.<relay's partition>.<aggregate id>` to `checked.<server's partition(4) of the
/// aggregate id>.<relay's partition>`: the two must agree for every row, and every
/// message carries `Outbox-Partition`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_placeholder_agrees_with_the_servers_partition_mapping() {
    let env = Env::start().await;
    let js = env.js().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "PARTS".into(),
        subjects: vec!["parts.>".into()],
        subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
            source: "parts.*.*".into(),
            destination: "checked.{{partition(4,2)}}.{{wildcard(1)}}".into(),
        }),
        ..Default::default()
    })
    .await
    .expect("create PARTS (nats-server 2.10+)");
    env.write_config("[routing]\nsubject = \"parts.{partition:4}.{aggregate_id}\"\n");
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    c.execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, payload)
         SELECT 'created', 'order', 'order-' || g, '{}' FROM generate_series(1, 200) g",
        &[],
    )
    .await
    .unwrap();
    let msgs = wait_read(&js, "PARTS", 200).await;
    let mut used = std::collections::BTreeSet::new();
    for m in &msgs {
        let tokens: Vec<&str> = m.subject.split('.').collect();
        assert_eq!(tokens.len(), 3, "{}", m.subject);
        assert_eq!(
            tokens[1], tokens[2],
            "server and relay disagree: {}",
            m.subject
        );
        assert_eq!(
            m.headers.get("Outbox-Partition").map(String::as_str),
            Some(tokens[2])
        );
        used.insert(tokens[2].to_string());
    }
    assert_eq!(
        used.len(),
        4,
        "200 ids spread over all 4 partitions: {used:?}"
    );
    relay.assert_running("after partitioned routing");
    // The count is remembered with the checkpoint: `check` says what a change does.
    env.write_config("[routing]\nsubject = \"parts.{partition:8}.{aggregate_id}\"\n");
    let out = env.cli(&["check"]);
    assert!(
        out.text()
            .contains("note: routing.subject changed from 4 partitions to 8 partitions"),
        "{}",
        out.text()
    );
}
