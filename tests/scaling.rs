//! Layouts beyond one table and one relay: a partitioned outbox, and several outboxes
//! each with its own relay, slot, publication, checkpoint and metrics.

use std::collections::HashSet;

use crate::harness::*;
use crate::support::free_port;

/// A hash-partitioned outbox: rows in every partition arrive, in commit and insert
/// order, because `migrate` publishes via the partition root; a publication that does
/// not is named by `check` with its fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_outbox_is_published_via_its_root() {
    let env = Env::start().await;
    let c = env.sql().await;
    // The migration's own table, partitioned by hash of its key.
    let table = include_str!("../migrations/V1__outbox_events.sql")
        .replace("{schema}", "public")
        .replace("{table}", "outbox_events")
        .replacen("\n);\n", "\n) PARTITION BY HASH (id);\n", 1);
    assert!(table.contains("PARTITION BY HASH"), "{table}");
    c.batch_execute(&format!(
        "{table}
         CREATE TABLE outbox_events_p0 PARTITION OF outbox_events FOR VALUES WITH (MODULUS 3, REMAINDER 0);
         CREATE TABLE outbox_events_p1 PARTITION OF outbox_events FOR VALUES WITH (MODULUS 3, REMAINDER 1);
         CREATE TABLE outbox_events_p2 PARTITION OF outbox_events FOR VALUES WITH (MODULUS 3, REMAINDER 2);"
    ))
    .await
    .expect("partitioned table");
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let _relay = env.spawn_relay();
    let mut ids = insert_tx(&c, 60, "part").await;
    ids.extend(insert_tx(&c, 1, "part").await);
    let parts: i64 = c
        .query_one("SELECT count(DISTINCT tableoid) FROM outbox_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(parts, 3, "rows landed in every partition");
    let msgs = wait_read(&env.js().await, STREAM, 61).await;
    assert_eq!(msgs.iter().map(|m| m.msg_id()).collect::<Vec<_>>(), ids);

    // Without publish_via_partition_root the rows would arrive under the partitions'
    // names and never reach the relay: `check` says so.
    c.batch_execute("ALTER PUBLICATION outbox_relay SET (publish_via_partition_root = false)")
        .await
        .unwrap();
    let out = env.cli(&["check"]);
    assert!(!out.status.success());
    assert!(
        out.text().contains("is partitioned")
            && out
                .text()
                .contains("ALTER PUBLICATION outbox_relay SET (publish_via_partition_root = true)"),
        "{}",
        out.text()
    );
}

/// Two outbox tables in one database, each with its own relay process, slot,
/// publication and checkpoint key, publishing into the same stream: each delivers
/// exactly its own rows once, and names its origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_outboxes_two_relays() {
    let env = Env::start_migrated().await;
    let second_port = free_port();
    let listen = format!("127.0.0.1:{second_port}");
    let second_env = [
        ("OUTBOX_RELAY_OUTBOX_TABLE", "billing.outbox_events"),
        ("OUTBOX_RELAY_POSTGRES_SLOT", "billing_relay"),
        ("OUTBOX_RELAY_POSTGRES_PUBLICATION", "billing_relay"),
        ("OUTBOX_RELAY_HTTP_LISTEN", listen.as_str()),
    ];
    let out = env.cli_env(&["migrate"], &second_env);
    assert!(out.status.success(), "{}", out.text());
    let _first = env.spawn_relay();
    let second_dir = env.dir.path().join("billing");
    std::fs::create_dir_all(&second_dir).unwrap();
    let _second = Relay::spawn_full(&env.config_path(), &second_dir, &second_env, &[]);

    let c = env.sql().await;
    let a = insert_tx(&c, 40, "orders").await;
    c.batch_execute("SET search_path = billing").await.unwrap();
    let b = insert_tx(&c, 30, "invoices").await;
    let msgs = wait_read(&env.js().await, STREAM, 70).await;
    let by_origin = |origin: &str| -> Vec<String> {
        msgs.iter()
            .filter(|m| m.header("Outbox-Origin") == Some(origin))
            .map(|m| m.msg_id().to_string())
            .collect()
    };
    assert_eq!(by_origin("app/outbox_relay"), a);
    assert_eq!(by_origin("app/billing_relay"), b);
    let distinct: HashSet<&str> = msgs.iter().map(|m| m.msg_id()).collect();
    assert_eq!(distinct.len(), 70);
    assert_eq!(
        relay_metric(second_port, "outbox_relay_events_published_total").await,
        30.0
    );
}
