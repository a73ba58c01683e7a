//! Payloads that are not JSON (issue 16): a `bytea` payload is published as its raw
//! bytes, whatever the server's `bytea_output`, with a `Content-Type` from the row or
//! `outbox.content_type`; `audit` and `replay --fill` see the same bytes.

use std::collections::HashMap;

use crate::harness::*;

/// Every byte value, an empty payload and bytes that happen to be JSON.
fn payloads() -> Vec<Vec<u8>> {
    vec![
        (0..=255u8).collect(),
        (0..=255u8).rev().chain([b'\\', b'x', b'0', b'0']).collect(),
        Vec::new(),
        br#"{"a": 1}"#.to_vec(),
        b"\\x41\\\\".to_vec(),
    ]
}

async fn insert_payloads(c: &tokio_postgres::Client, topic: &str) -> HashMap<String, Vec<u8>> {
    let mut sent = HashMap::new();
    for (i, p) in payloads().into_iter().enumerate() {
        // Every other row names its own type; the others get outbox.content_type.
        let content_type = (i % 2 == 1).then_some("application/x-protobuf");
        let row = c
            .query_one(
                "INSERT INTO blobs (event_topic, aggregate_type, payload, content_type) \
                 VALUES ($1, 'file', $2, $3) RETURNING id::text",
                &[&topic, &p, &content_type],
            )
            .await
            .unwrap();
        sent.insert(row.get::<_, String>(0), p);
    }
    sent
}

async fn set_bytea_output(env: &Env, format: &str) {
    let c = env.pg.client("postgres").await;
    // Two statements: ALTER SYSTEM refuses to run in the implicit transaction of a
    // multi-statement string.
    c.batch_execute(&format!("ALTER SYSTEM SET bytea_output = '{format}'"))
        .await
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    // A new session sees the reloaded setting once the postmaster has read it; the
    // relay's walsender is started after this, so it reads it at its start.
    crate::support::wait_for("bytea_output to be reloaded", DEADLINE, || async {
        let c = env.pg.client("app").await;
        let v: String = c.query_one("SHOW bytea_output", &[]).await.unwrap().get(0);
        v == format
    })
    .await;
}

fn assert_published(msgs: &[Msg], sent: &HashMap<String, Vec<u8>>) {
    for (id, bytes) in sent {
        let got: Vec<&Msg> = msgs.iter().filter(|m| m.msg_id() == id).collect();
        assert_eq!(got.len(), 1, "{id} once");
        assert_eq!(&got[0].payload, bytes, "{id}: the raw bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytea_payloads_are_published_as_their_bytes_with_a_content_type() {
    let env = Env::start_with_bytea_outbox("content_type = \"application/octet-stream\"\n").await;
    let c = env.sql().await;
    let js = env.js().await;

    // `escape` first: the walsender started by this relay writes bytea that way.
    set_bytea_output(&env, "escape").await;
    let mut relay = env.spawn_relay();
    let mut sent = insert_payloads(&c, "escaped").await;
    let n = sent.len() as u64;
    let msgs = wait_read(&js, STREAM, n).await;
    assert_published(&msgs, &sent);
    assert!(relay.terminate().success());

    // Then the default, `hex`, with a new walsender.
    set_bytea_output(&env, "hex").await;
    let _relay = env.spawn_relay();
    sent.extend(insert_payloads(&c, "hex").await);
    let msgs = wait_read(&js, STREAM, 2 * n).await;
    assert_published(&msgs, &sent);
    for m in &msgs {
        let own = c
            .query_one(
                "SELECT content_type FROM blobs WHERE id::text = $1",
                &[&m.msg_id()],
            )
            .await
            .unwrap()
            .get::<_, Option<String>>(0);
        let expected = own.as_deref().unwrap_or("application/octet-stream");
        assert_eq!(m.header("Content-Type"), Some(expected), "{}", m.msg_id());
        let topic = m.header("Outbox-Event-Topic").unwrap();
        assert_eq!(m.subject, format!("outbox.file.{topic}"));
    }

    // audit reads the table with SQL: it must see the same bytes to find a lost one,
    // and replay --fill must send those bytes.
    let lost = msgs.iter().find(|m| m.payload.len() == 256).unwrap();
    let filled = delete_and_fill(&env, &js, STREAM, &[lost], &[]).await;
    assert_eq!(
        filled[0].payload, lost.payload,
        "the fill sends the raw bytes"
    );
    assert_eq!(
        filled[0].header("Content-Type"),
        lost.header("Content-Type")
    );
    let out = env.cli(&["audit", "--wait", "60s"]);
    assert!(out.status.success(), "audit after the fill: {}", out.text());
}
