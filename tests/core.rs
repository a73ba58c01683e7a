//! The relay core, end to end through real servers and the real binary.

use std::collections::HashSet;
use std::time::Duration;

use crate::harness::*;
use crate::support::postgres::Postgres;
use crate::support::wait_for;

/// Transactions of 1, 10 and 10,000 rows: each row once, commit order then insert order,
/// subject, byte-identical payload, `Nats-Msg-Id` and the documented headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_row_once_in_commit_and_insert_order() {
    let env = Env::start_migrated().await;
    let _relay = env.spawn_relay();
    let c = env.sql().await;
    c.execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, tenant_id, source_bc, schema_id, schema_version, payload, metadata)
         VALUES ('created', 'order', 'o-1', 'acme', 'sales', 'order.v1', 3, '{\"b\": [1, 2.50, \"x\"], \"a\": {\"ü\": null}}',
                 '{\"traceparent\": \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\", \"user_id\": 7}')",
        &[],
    )
    .await
    .unwrap();
    let mut expected: Vec<String> = table_ids(&c).await;
    expected.extend(insert_tx(&c, 10, "updated").await);
    expected.extend(insert_tx(&c, 10_000, "bulk").await);

    let js = env.js().await;
    wait_count(&js, STREAM, expected.len() as u64).await;
    let msgs = read_all(&js, STREAM).await;
    let got: Vec<&str> = msgs.iter().map(|m| m.msg_id()).collect();
    assert_eq!(got.len(), expected.len(), "exactly one message per row");
    assert_eq!(
        got,
        expected.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "commit order, then insert order"
    );

    let first = &msgs[0];
    let (payload, occurred): (String, String) = {
        let r = c
            .query_one(
                "SELECT payload::text, occurred_at::text FROM outbox_events WHERE id = $1::text::uuid",
                &[&expected[0]],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(first.subject, "outbox.order.created");
    assert_eq!(
        String::from_utf8(first.payload.clone()).unwrap(),
        payload,
        "payload byte for byte"
    );
    assert_eq!(first.header("Outbox-Event-Id"), Some(expected[0].as_str()));
    assert_eq!(first.header("Outbox-Event-Topic"), Some("created"));
    assert_eq!(first.header("Outbox-Aggregate-Type"), Some("order"));
    assert_eq!(first.header("Outbox-Aggregate-Id"), Some("o-1"));
    assert_eq!(first.header("Outbox-Tenant-Id"), Some("acme"));
    assert_eq!(first.header("Outbox-Source"), Some("sales"));
    assert_eq!(first.header("Outbox-Schema-Id"), Some("order.v1"));
    assert_eq!(first.header("Outbox-Schema-Version"), Some("3"));
    assert_eq!(first.header("Outbox-Occurred-At"), Some(occurred.as_str()));
    assert_eq!(first.header("Outbox-Tx-Index"), Some("0"));
    assert_eq!(first.header("Nats-Msg-Id"), Some(expected[0].as_str()));
    // `<database>/<slot>`: how a restart finds its own last message in a shared stream.
    assert_eq!(first.header("Outbox-Origin"), Some("app/outbox_relay"));
    assert!(
        first
            .header("Outbox-Commit-Lsn")
            .is_some_and(|l| l.contains('/'))
    );
    assert_eq!(
        first.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(first.header("user_id"), Some("7"));
    assert_eq!(msgs[1].subject, "outbox.order.updated");
    assert_eq!(msgs[11].header("Outbox-Tx-Index"), Some("0"));
    assert_eq!(msgs[10_010].header("Outbox-Tx-Index"), Some("9999"));
    // Every message of one transaction carries the same commit position.
    let lsns: HashSet<&str> = msgs[11..]
        .iter()
        .map(|m| m.header("Outbox-Commit-Lsn").unwrap())
        .collect();
    assert_eq!(lsns.len(), 1);
}

/// A rolled-back transaction and rows of other tables (even ones in the publication)
/// publish nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_other_tables_publish_nothing() {
    let env = Env::start_migrated().await;
    let c = env.sql().await;
    c.batch_execute(
        "CREATE TABLE orders (id serial primary key, total int);
         ALTER PUBLICATION outbox_relay ADD TABLE orders;",
    )
    .await
    .unwrap();
    let _relay = env.spawn_relay();
    c.batch_execute(
        "BEGIN; INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('ghost', 'order', '{}'); ROLLBACK;
         INSERT INTO orders (total) SELECT g FROM generate_series(1, 100) g;
         UPDATE orders SET total = 0; DELETE FROM orders WHERE id < 10;",
    )
    .await
    .unwrap();
    let marker = insert_tx(&c, 1, "marker").await;
    let js = env.js().await;
    wait_count(&js, STREAM, 1).await;
    let msgs = read_all(&js, STREAM).await;
    assert_eq!(msgs.len(), 1, "only the marker: {msgs:?}");
    assert_eq!(msgs[0].msg_id(), marker[0]);
}

/// SIGTERM mid-load drains and exits 0; the restarted relay continues: every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_then_restart_delivers_exactly_once() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    let js = env.js().await;
    let mut expected = Vec::new();
    for i in 0..40 {
        expected.extend(insert_tx(&c, 50, &format!("t{i}")).await);
        if i == 20 {
            wait_count(&js, STREAM, 1).await;
            let status = relay.terminate();
            assert!(
                status.success(),
                "graceful exit: {status:?}\n{}",
                relay.log_text()
            );
            assert!(relay.log_text().contains("stopped"), "{}", relay.log_text());
        }
    }
    relay.restart();
    wait_count(&js, STREAM, expected.len() as u64).await;
    // Give a duplicate the chance to show up before counting.
    let more = insert_tx(&c, 1, "last").await;
    expected.extend(more);
    wait_count(&js, STREAM, expected.len() as u64).await;
    let msgs = read_all(&js, STREAM).await;
    let ids: Vec<&str> = msgs.iter().map(|m| m.msg_id()).collect();
    assert_eq!(ids, expected.iter().map(|s| s.as_str()).collect::<Vec<_>>());
}

/// An idle outbox must not pin WAL: with only other tables written, the slot's
/// confirmed_flush_lsn still advances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_advances_while_outbox_idle() {
    let env = Env::start_migrated().await;
    let c = env.sql().await;
    c.batch_execute("CREATE TABLE other (id serial primary key, v text)")
        .await
        .unwrap();
    let _relay = env.spawn_relay();
    // Wait until the relay created the slot and streams.
    wait_for("slot created", DEADLINE, || async {
        env.confirmed_flush("outbox_relay").await.is_some()
    })
    .await;
    let start = env.confirmed_flush("outbox_relay").await.unwrap();
    let c2 = env.sql().await;
    wait_for(
        "confirmed_flush_lsn to advance past other-table writes",
        DEADLINE,
        || {
            let c2 = &c2;
            let env = &env;
            async move {
                c2.execute(
                    "INSERT INTO other (v) SELECT repeat('x', 100) FROM generate_series(1, 200)",
                    &[],
                )
                .await
                .unwrap();
                env.confirmed_flush("outbox_relay").await.unwrap() > start + 100_000
            }
        },
    )
    .await;
    assert_eq!(stream_count(&env.js().await, STREAM).await, 0);
}

/// A table in Debezium's outbox layout works with `[outbox.columns]` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_layout_via_column_mapping() {
    let env = Env::start().await;
    let c = env.sql().await;
    c.batch_execute(
        "CREATE TABLE outbox (id uuid primary key, aggregatetype varchar(255) not null, aggregateid varchar(255) not null,
                              type varchar(255) not null, payload jsonb);",
    )
    .await
    .unwrap();
    env.write_config(
        r#"
[outbox]
table = "public.outbox"
[outbox.columns]
aggregate_type = "aggregatetype"
aggregate_id = "aggregateid"
event_topic = "type"
"#,
    );
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    assert!(out.stdout.contains("left unchanged"), "{}", out.stdout);
    let _relay = env.spawn_relay();
    c.execute(
        "INSERT INTO outbox VALUES ('6f1c1f0e-5b7a-4c1e-9d55-0a4f8c7f2b11', 'customer', 'c-9', 'registered', '{\"name\": \"Ada\"}')",
        &[],
    )
    .await
    .unwrap();
    let js = env.js().await;
    wait_count(&js, STREAM, 1).await;
    let m = &read_all(&js, STREAM).await[0];
    assert_eq!(m.subject, "outbox.customer.registered");
    assert_eq!(m.msg_id(), "6f1c1f0e-5b7a-4c1e-9d55-0a4f8c7f2b11");
    assert_eq!(m.header("Outbox-Aggregate-Id"), Some("c-9"));
    assert_eq!(m.payload, br#"{"name": "Ada"}"#);
}

/// `ALTER TABLE` while streaming: PostgreSQL re-sends the relation, the relay follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream() {
    let env = Env::start_migrated().await;
    let _relay = env.spawn_relay();
    let c = env.sql().await;
    let js = env.js().await;
    insert_tx(&c, 5, "before").await;
    wait_count(&js, STREAM, 5).await;
    c.batch_execute("ALTER TABLE outbox_events ADD COLUMN extra text DEFAULT 'x'")
        .await
        .unwrap();
    insert_tx(&c, 5, "after").await;
    c.batch_execute("ALTER TABLE outbox_events DROP COLUMN aggregate_id")
        .await
        .unwrap();
    c.execute("INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('dropped', 'order', '{}')", &[])
        .await
        .unwrap();
    wait_count(&js, STREAM, 11).await;
    let msgs = read_all(&js, STREAM).await;
    assert_eq!(msgs[10].subject, "outbox.order.dropped");
    assert_eq!(msgs[10].header("Outbox-Aggregate-Id"), None);
    assert_eq!(msgs[9].subject, "outbox.order.after");
}

/// `destination_topics` overrides the template and fans out; a hostile entry goes to the
/// dead-letter subject with its reason, and the events after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_topics_fan_out_and_bad_subjects_dead_letter() {
    let env = Env::start_migrated().await;
    let _relay = env.spawn_relay();
    let c = env.sql().await;
    c.batch_execute(
        r#"INSERT INTO outbox_events (event_topic, aggregate_type, payload, destination_topics)
           VALUES ('x', 'order', '{"k":1}', '["outbox.billing.orders", "outbox.audit"]');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload, destination_topics)
           VALUES ('x', 'order', '{"k":2}', '["outbox.>"]');
           INSERT INTO outbox_events (event_topic, payload) VALUES ('no-aggregate', '{"k":3}');
           INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('after', 'order', '{"k":4}');"#,
    )
    .await
    .unwrap();
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, 5).await;
    assert_eq!(
        subjects(&msgs),
        [
            "outbox.billing.orders",
            "outbox.audit",
            "outbox.dlq.outbox._",
            "outbox.dlq.no-aggregate",
            "outbox.order.after"
        ]
    );
    assert!(
        msgs[2]
            .header("Outbox-Dlq-Reason")
            .unwrap()
            .contains("wildcard")
    );
    assert!(
        msgs[3]
            .header("Outbox-Dlq-Reason")
            .unwrap()
            .contains("aggregate_type")
    );
    assert_eq!(msgs[3].payload, br#"{"k": 3}"#);
}

/// `/healthz` answers; `/readyz` turns ready once both ends are connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints() {
    let env = Env::start_migrated().await;
    let _relay = env.spawn_relay();
    let port = env.http_port;
    wait_http(port, "/healthz", 200, "").await;
    wait_http(port, "/readyz", 200, "").await;
    let (status, body) = http_get(port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("outbox_relay_slot_lag_bytes")
            && body.contains("outbox_relay_reconnects_total 0")
            && body.contains(r#"outbox_relay_connected{end="nats"} 1"#),
        "{body}"
    );
}

/// Bad configuration: exit non-zero with a message naming what to fix; `check` says the
/// same without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_is_refused_with_the_key_named() {
    let env = Env::start_migrated().await;

    env.write_config("[nats.extra]\n");
    let out = env.cli(&["check"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("extra"), "{}", out.text());

    let text = std::fs::read_to_string(env.config_path())
        .unwrap()
        .replace("[log]", "[log]\nverbose = true");
    env.write_raw_config(&text);
    for cmd in ["run", "check"] {
        let out = env.cli(&[cmd]);
        assert!(!out.status.success());
        assert!(out.stderr.contains("verbose"), "{cmd}: {}", out.text());
    }

    env.write_raw_config("[postgres]\nurl = \"mysql://root@localhost/app\"\n");
    let out = env.cli(&["run"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("postgres.url"), "{}", out.text());

    // Environment override with a bad value names the variable and the key.
    env.write_config("");
    let out = {
        let mut cmd = std::process::Command::new(relay_bin());
        cmd.arg("--config").arg(env.config_path()).arg("check");
        cmd.env("OUTBOX_RELAY_NATS_MAX_IN_FLIGHT", "lots");
        cmd.output().unwrap()
    };
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("OUTBOX_RELAY_NATS_MAX_IN_FLIGHT") && err.contains("nats.max_in_flight"),
        "{err}"
    );

    // Missing publication: check lists it with the fix, run refuses.
    env.sql()
        .await
        .batch_execute("DROP PUBLICATION outbox_relay")
        .await
        .unwrap();
    let out = env.cli(&["check"]);
    assert!(!out.status.success());
    assert!(
        out.stdout
            .contains("publication outbox_relay does not exist"),
        "{}",
        out.text()
    );
    assert!(
        out.stdout.contains("outbox-relay migrate"),
        "{}",
        out.text()
    );
    let out = env.cli(&["run"]);
    assert!(!out.status.success());
    assert!(
        out.stderr
            .contains("publication outbox_relay does not exist"),
        "{}",
        out.text()
    );

    // And when all is well, check passes.
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let out = env.cli(&["check"]);
    assert!(out.status.success(), "{}", out.text());
}

/// wal_level=replica is refused by `check` and `run` with the setting to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_not_logical_is_refused() {
    let pg = Postgres::start_with(&[("wal_level", "replica")]);
    let env = Env::start_with(pg, crate::support::nats::Nats::start()).await;
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    for cmd in ["check", "run"] {
        let out = env.cli(&[cmd]);
        assert!(!out.status.success(), "{cmd} succeeded");
        assert!(
            out.text().contains("wal_level is replica"),
            "{cmd}: {}",
            out.text()
        );
        assert!(
            out.text().contains("wal_level = logical"),
            "{cmd}: {}",
            out.text()
        );
    }
}

/// Passwords and tokens in URLs never appear in logs, errors, `check` or `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_printed() {
    let env = Env::start_migrated().await;
    const PG_SECRET: &str = "pg-Secret-9f2c";
    const NATS_SECRET: &str = "nats-Token-77ab";
    let pg_url = env
        .pg
        .url("app")
        .replace("postgres@", &format!("postgres:{PG_SECRET}@"));
    let nats_url = env
        .nats
        .url()
        .replace("nats://", &format!("nats://relay:{NATS_SECRET}@"));
    let text = std::fs::read_to_string(env.config_path())
        .unwrap()
        .replace(&env.pg.url("app"), &pg_url)
        .replace(&env.nats.url(), &nats_url)
        .replace("outbox_relay=debug", "outbox_relay=trace");
    env.write_raw_config(&text);
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 3, "s").await;
    wait_count(&env.js().await, STREAM, 3).await;
    let mut seen = relay.log_text();
    assert!(relay.terminate().success());
    seen.push_str(&relay.log_text());
    for args in [&["status", "--json"][..], &["status"], &["check"]] {
        seen.push_str(&env.cli(args).text());
    }
    // An error path: an unreachable database.
    let bad = text.replace(&format!(":{}/app", env.pg.port()), ":1/app");
    env.write_raw_config(&bad);
    let out = env.cli(&["status", "--json"]);
    seen.push_str(&out.text());
    assert!(
        out.text().contains("***"),
        "redacted url shown: {}",
        out.text()
    );
    assert!(
        !seen.contains(PG_SECRET),
        "postgres password leaked:\n{seen}"
    );
    assert!(!seen.contains(NATS_SECRET), "nats password leaked:\n{seen}");
}

/// `status --json` reports the slot and the streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_slot_and_streams() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    insert_tx(&env.sql().await, 4, "st").await;
    wait_count(&env.js().await, STREAM, 4).await;
    let live = env.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&live.stdout).unwrap();
    assert_eq!(v["relay"], "ready", "{}", live.stdout);
    assert!(v["slot_info"]["active_pid"].is_i64());
    assert!(v["slot_info"].get("lag_seconds").is_some());
    assert!(relay.terminate().success());
    let out = env.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", out.text());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(v["relay"].is_null(), "stopped relay does not answer");
    assert_eq!(v["slot"], "outbox_relay");
    assert_eq!(v["slot_exists"], true);
    assert!(v["slot_info"]["lag_bytes"].is_i64());
    assert_eq!(v["streams"][0]["name"], STREAM);
    assert_eq!(v["streams"][0]["messages"], 4);
    assert_eq!(v["origin"], "app/outbox_relay");
    let checkpoint = v["checkpoint"]
        .as_str()
        .expect("checkpoint saved at shutdown");
    let confirmed = v["slot_info"]["confirmed_flush_lsn"].as_str().unwrap();
    assert_eq!(
        checkpoint, confirmed,
        "graceful stop persists and confirms the same position"
    );
    let last = v["streams"][0]["last_published"].as_str().unwrap();
    assert!(last.ends_with(".3"), "{last}");
    let _ = Duration::ZERO;
}

/// `run --null-sink` decodes and routes everything but publishes nothing and never
/// moves the slot, so a normal run afterwards still delivers every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_sink_publishes_and_confirms_nothing() {
    let env = Env::start_migrated().await;
    let c = env.sql().await;
    let before = env.confirmed_flush("outbox_relay").await.unwrap();
    insert_tx(&c, 500, "n").await;
    let mut relay = env.spawn_relay_args(&["--null-sink"]);
    let port = env.http_port;
    wait_for(
        "500 events through the null sink",
        DEADLINE,
        || async move { relay_metric(port, "outbox_relay_events_published_total").await == 500.0 },
    )
    .await;
    assert!(relay.terminate().success());
    let js = env.js().await;
    assert_eq!(stream_count(&js, STREAM).await, 0);
    assert_eq!(env.confirmed_flush("outbox_relay").await.unwrap(), before);
    let _relay = env.spawn_relay();
    wait_count(&js, STREAM, 500).await;
}

/// The slot is created as a failover slot where the server has them (PostgreSQL 17+),
/// so a promoted standby that synchronises slots keeps it; older servers get a plain
/// one. The suite runs on 14, 15, 16, 17 and 18 (scripts/test.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_is_a_failover_slot_where_supported() {
    let env = Env::start_migrated().await;
    let version = env.pg.version_num().await;
    let c = env.sql().await;
    let sql = if version >= 170_000 {
        "SELECT failover FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
    } else {
        "SELECT true FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
    };
    let failover: bool = c.query_one(sql, &[]).await.expect("slot exists").get(0);
    assert!(failover, "server {version}: slot not created as expected");
}
