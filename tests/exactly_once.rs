//! Exactly once without assumptions (issue 14): a replay is skipped only on proof that
//! this exact message is stored; the server's refusals are dead-lettered in place; a
//! recreated slot is a gap that is refused, not resumed across; a row that cannot be
//! mapped goes to the dead letters instead of stopping the relay.

use std::time::Duration;

use async_nats::jetstream;

use crate::harness::*;
use crate::support::nats::Nats;
use crate::support::postgres::Postgres;
use crate::support::wait_for;

/// Issue 14 (1) and (4): a stream whose `max_msg_size` (64 KiB) refuses a 100 KB row
/// and a row whose metadata makes a 200 KB header, with rows before and after them.
/// Each refused row is dead-lettered at once with the server's error code, in its
/// position; every other row arrives once, in order; a restart after SIGKILL doubles
/// nothing (the replay is skipped only where the exact message is read back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_are_dead_lettered_in_place_and_nothing_is_skipped() {
    let env = Env::start().await;
    let js = env.js().await;
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["outbox.>".into()],
        max_message_size: 64 * 1024,
        ..Default::default()
    })
    .await
    .expect("stream with max_msg_size");
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    let before = insert_tx(&c, 50, "before").await;
    c.batch_execute(
        r#"INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             VALUES ('big', 'order', jsonb_build_object('blob', repeat('x', 100000)));
           INSERT INTO outbox_events (event_topic, aggregate_type, payload, metadata)
             VALUES ('bighdr', 'order', '{"i": 1}', jsonb_build_object('x-big', repeat('h', 200000)));"#,
    )
    .await
    .unwrap();
    let after = insert_tx(&c, 99, "after").await;
    let msgs = wait_read(&js, STREAM, 151).await;
    // The dead letters are appended when the refusals come back, after what was
    // pipelined behind them: the stream holds them where they arrived, each carrying
    // its own position. Each transaction's rows, as sets (RETURNING does not promise
    // insert order), in position order.
    let (dead, rows): (Vec<Msg>, Vec<Msg>) = msgs
        .iter()
        .cloned()
        .partition(|m| m.subject.starts_with("outbox.dlq."));
    let set = |ms: &[Msg]| -> std::collections::BTreeSet<String> {
        ms.iter().map(|m| m.msg_id().to_string()).collect()
    };
    assert_eq!(set(&rows[..50]), before.iter().cloned().collect());
    assert_eq!(set(&rows[50..]), after.iter().cloned().collect());
    let index = |m: &Msg| m.header("Outbox-Tx-Index").unwrap().parse::<u32>().unwrap();
    assert!(rows[..50].iter().map(index).eq(0..50));
    assert!(rows[50..].iter().map(index).eq(0..99));
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (m, subject) in dead.iter().zip([
        "outbox.dlq.outbox.order.big",
        "outbox.dlq.outbox.order.bighdr",
    ]) {
        assert_eq!(m.subject, subject, "{m:?}");
        let reason = m.header("Outbox-Dlq-Reason").unwrap_or("");
        assert!(reason.contains("jetstream refused the message"), "{reason}");
        assert!(m.header("Outbox-Dlq-Error-Code").is_some(), "{m:?}");
        assert!(m.header("Outbox-Commit-Lsn").is_some() && m.header("Outbox-Tx-Index").is_some());
        // Rebuilt after the refusal, it still names its row.
        assert_eq!(m.header("Outbox-Event-Id"), Some(m.msg_id()), "{m:?}");
    }
    assert_eq!(dead[0].header("Outbox-Dlq-Error-Code"), Some("10054"));
    relay.assert_running("after the refusals");
    let (_, metrics) = http_get(env.http_port, "/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"outbox_relay_events_dead_lettered_total{kind="refused"} 2"#),
        "{metrics}"
    );

    // Kill and restart: the replay (if any) is proven stored, nothing doubles.
    relay.kill();
    relay.restart();
    let marker = insert_tx(&c, 1, "marker").await;
    let msgs = wait_read(&js, STREAM, 152).await;
    assert_eq!(msgs.len(), 152);
    assert_eq!(msgs[151].msg_id(), marker[0]);
}

/// Issue 14 (5): a NULL payload in a table that allows it is dead-lettered with the
/// reason; the rows after it arrive and the relay keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_required_column_is_dead_lettered_not_fatal() {
    let env = Env::start_migrated().await;
    let c = env.sql().await;
    c.batch_execute("ALTER TABLE outbox_events ALTER COLUMN payload DROP NOT NULL")
        .await
        .unwrap();
    let mut relay = env.spawn_relay();
    c.batch_execute(
        r#"BEGIN;
           INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('ok1', 'order', '{"i": 1}');
           INSERT INTO outbox_events (id, event_topic, aggregate_type, payload)
             VALUES ('00000000-0000-4000-8000-00000000000a', 'tombstone', 'order', NULL);
           INSERT INTO outbox_events (event_topic, aggregate_type, payload) VALUES ('ok2', 'order', '{"i": 2}');
           COMMIT;"#,
    )
    .await
    .unwrap();
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, 3).await;
    assert_eq!(
        subjects(&msgs),
        [
            "outbox.order.ok1",
            "outbox.dlq.outbox.order.tombstone",
            "outbox.order.ok2"
        ]
    );
    let dead = &msgs[1];
    assert_eq!(dead.msg_id(), "00000000-0000-4000-8000-00000000000a");
    assert!(
        dead.header("Outbox-Dlq-Reason")
            .unwrap_or("")
            .contains("null payload"),
        "{dead:?}"
    );
    relay.assert_running("after the NULL payload");
}

/// Issue 14 (2): deliver, stop, drop the slot, commit 10 rows. `migrate` refuses to
/// create the slot again; a slot created by hand starts after the checkpoint and `run`
/// and `check` refuse it, naming the gap; `run --accept-slot-gap` streams from it,
/// logged and counted, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreated_slot_is_a_gap_refused_until_accepted() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 5, "before").await;
    let js = env.js().await;
    wait_count(&js, STREAM, 5).await;
    assert!(relay.terminate().success());
    wait_slot_released(&c, "outbox_relay").await;
    c.batch_execute("SELECT pg_drop_replication_slot('outbox_relay')")
        .await
        .unwrap();
    insert_tx(&c, 10, "while_no_slot").await;

    let out = env.cli(&["migrate"]);
    assert!(
        !out.status.success(),
        "migrate recreated the slot: {}",
        out.text()
    );
    assert!(
        out.text().contains("is missing") && out.text().contains("not created"),
        "{}",
        out.text()
    );

    c.batch_execute("SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')")
        .await
        .unwrap();
    let after = insert_tx(&c, 1, "after").await;
    let mut refused = env.spawn_relay();
    assert!(!refused.wait_exit().await.success());
    let log = refused.log_text();
    assert!(
        log.contains("after this relay's checkpoint") && log.contains("--accept-slot-gap"),
        "{log}"
    );
    let out = env.cli(&["check"]);
    assert!(!out.status.success());
    assert!(
        out.text().contains("after this relay's checkpoint"),
        "{}",
        out.text()
    );
    assert_eq!(
        stream_count(&js, STREAM).await,
        5,
        "nothing streamed across the gap"
    );

    let mut accepted = env.spawn_relay_args(&["--accept-slot-gap"]);
    let msgs = wait_read(&js, STREAM, 6).await;
    assert_eq!(msgs[5].msg_id(), after[0]);
    assert!(accepted.log_text().contains("accepted gap"));
    wait_http(
        env.http_port,
        "/metrics",
        200,
        "outbox_relay_slot_gaps_accepted_total 1",
    )
    .await;
    // Accepted once: the next start needs no flag.
    assert!(accepted.terminate().success());
    wait_slot_released(&c, "outbox_relay").await;
    let _again = env.spawn_relay();
    let last = insert_tx(&c, 1, "last").await;
    let msgs = wait_read(&js, STREAM, 7).await;
    assert_eq!(msgs[6].msg_id(), last[0]);
}

/// Issue 14, stall clock: a relay started on a lagging slot while NATS is down reports
/// what is wrong (not connected), never a stall dated from 1970; and once NATS is up it
/// catches up without a stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_on_a_lagging_slot_is_not_a_stall() {
    let mut env = Env::start_with(Postgres::start(), Nats::start()).await;
    env.write_config("[monitor]\ninterval = \"200ms\"\n");
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let c = env.sql().await;
    // More than 1 MiB of WAL behind the slot: a lag that could count as a stall.
    c.batch_execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
         SELECT 'lag', 'order', jsonb_build_object('pad', repeat('p', 500), 'n', g)
         FROM generate_series(1, 4000) g",
    )
    .await
    .unwrap();
    env.nats.stop();
    let relay = env.spawn_relay();
    wait_for("the monitor to measure the slot lag", DEADLINE, || async {
        relay_metric(env.http_port, "outbox_relay_slot_lag_bytes").await > (1 << 20) as f64
    })
    .await;
    // A few monitor rounds with the lag known and nothing connected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, ready) = http_get(env.http_port, "/readyz").await.unwrap();
    assert!(!ready.contains("stalled"), "{ready}");
    env.nats.start_again();
    let js = env.js().await;
    wait_count(&js, STREAM, 4000).await;
    assert!(
        !relay.log_text().contains("stalled"),
        "{}",
        relay.log_text()
    );
}

/// The relay's NATS user: publish everywhere the relay needs, minus `deny`.
/// The relay's nats user in [`relay_permissions`] and [`NARROW_PERMISSIONS`], as
/// environment overrides.
pub(crate) const RELAY_CREDS: [(&str, &str); 2] = [
    ("OUTBOX_RELAY_NATS_USER", "relay"),
    ("OUTBOX_RELAY_NATS_PASSWORD", "relay-pw"),
];

pub(crate) fn relay_permissions(deny: &str) -> String {
    format!(
        r#"
authorization {{
  users = [
    {{ user: relay, password: "relay-pw", permissions: {{
        publish: {{ allow: ["outbox.>", "$JS.API.>", "$KV.outbox_relay.>"]{deny} }}
        subscribe: {{ allow: ["_INBOX.>"] }}
    }} }}
    {{ user: admin, password: "admin-pw" }}
  ]
}}
no_auth_user: admin
"#
    )
}

/// Issue 14 (3): the relay may publish `outbox.order.>` but not `outbox.payment.>`; 400
/// rows alternate between the two. The order events are stored, the payment events
/// wait: sessions end on the denial and replay, skipping only what they read back
/// (the old design skipped every denied row below the stream's last stored position
/// and reported "caught up"). When the permission is granted (config reload) every
/// payment event arrives, once, in commit order per subject, and nothing is
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_events_wait_and_arrive_once_after_the_grant() {
    let nats = Nats::start_with(&relay_permissions(r#", deny: ["outbox.payment.>"]"#));
    let mut env = Env::start_with(Postgres::start(), nats).await;
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay_env(&RELAY_CREDS);
    let c = env.sql().await;
    for tx in 0..40 {
        c.execute(
            "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             SELECT 'paid', CASE WHEN g % 2 = 0 THEN 'order' ELSE 'payment' END,
                    jsonb_build_object('n', $1::int * 10 + g)
             FROM generate_series(0, 9) AS s(g) ORDER BY g",
            &[&tx],
        )
        .await
        .unwrap();
    }
    let js = env.js().await;
    wait_count(&js, STREAM, 200).await;
    // Several sessions replay across the denied events while the denial lasts.
    let port = env.http_port;
    wait_for(
        "three sessions ended by the denial",
        DEADLINE,
        || async move { relay_metric(port, "outbox_relay_reconnects_total").await >= 3.0 },
    )
    .await;
    let held = read_all(&js, STREAM).await;
    assert_eq!(held.len(), 200, "only the order events are stored");
    assert!(held.iter().all(|m| m.subject == "outbox.order.paid"));
    assert!(
        relay.log_text().contains("Permissions Violation"),
        "{}",
        relay.log_text()
    );

    env.nats.reload_with(&relay_permissions(""));
    let marker = insert_tx(&c, 1, "marker").await;
    let msgs = wait_read(&js, STREAM, 401).await;
    assert_eq!(msgs.len(), 401);
    let ids: std::collections::HashSet<&str> = msgs.iter().map(|m| m.msg_id()).collect();
    assert_eq!(ids.len(), 401, "no event twice");
    let table: std::collections::HashSet<String> = c
        .query("SELECT id::text FROM outbox_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ids.iter().all(|id| table.contains(*id)) && table.len() == 401);
    assert!(ids.contains(marker[0].as_str()));
    for subject in ["outbox.order.paid", "outbox.payment.paid"] {
        let n: Vec<i64> = msgs
            .iter()
            .filter(|m| m.subject == subject)
            .map(|m| {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                v["n"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(n.len(), 200, "{subject}");
        assert!(
            n.windows(2).all(|w| w[0] < w[1]),
            "{subject} out of commit order: {n:?}"
        );
    }
    relay.assert_running("after the grant");
}

/// Issue 14, the read-back: a message stored late, out of position order, must not hide
/// the messages stored before it from the next session's read-back. `outbox.payment.>`
/// and `outbox.refund.>` are denied; four transactions commit 10 payment, 10 order, 10
/// refund and 10 order events. The orders are stored at once. When payment is granted,
/// the payments are stored last, above the orders, and the checkpoint moves past them
/// and the first orders; the refunds still end every session. Each next session must
/// find the second orders stored by reading them back *below* the payments (before the
/// floors the scan stopped at the first payment, whose position is before the
/// checkpoint, and sent those orders again: with a 1 s duplicate window, stored twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_stored_messages_do_not_hide_earlier_ones_from_the_read_back() {
    let deny = r#", deny: ["outbox.payment.>", "outbox.refund.>"]"#;
    let nats = Nats::start_with(&relay_permissions(deny));
    let mut env = Env::start_with(Postgres::start(), nats).await;
    env.write_config("duplicate_window = \"1s\"");
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay_env(&RELAY_CREDS);
    let c = env.sql().await;
    for kind in ["payment", "order", "refund", "order"] {
        c.execute(
            "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             SELECT 'done', $1::text, jsonb_build_object('n', g)
             FROM generate_series(1, 10) AS s(g) ORDER BY g",
            &[&kind],
        )
        .await
        .unwrap();
    }
    let js = env.js().await;
    wait_count(&js, STREAM, 20).await;
    let port = env.http_port;
    let sessions = || relay_metric(port, "outbox_relay_reconnects_total");
    let ended = sessions().await;
    wait_for("a session ended by the denial", DEADLINE, || async move {
        sessions().await > ended
    })
    .await;

    env.nats
        .reload_with(&relay_permissions(r#", deny: ["outbox.refund.>"]"#));
    wait_count(&js, STREAM, 30).await;
    // Two more sessions: the one that stored the payments, and one that resumed after
    // them (the orders of the last transaction in its replay zone).
    let ended = sessions().await;
    wait_for(
        "two sessions after the payments were stored",
        DEADLINE,
        || async move { sessions().await >= ended + 2.0 },
    )
    .await;
    let held = read_all(&js, STREAM).await;
    let ids: std::collections::HashSet<&str> = held.iter().map(|m| m.msg_id()).collect();
    assert_eq!(
        (held.len(), ids.len()),
        (30, 30),
        "while refunds wait, nothing is stored twice: {:?}",
        held.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );

    env.nats.reload_with(&relay_permissions(""));
    let msgs = wait_read(&js, STREAM, 40).await;
    let ids: std::collections::HashSet<&str> = msgs.iter().map(|m| m.msg_id()).collect();
    assert_eq!((msgs.len(), ids.len()), (40, 40), "every event once");
    assert!(msgs.iter().all(|m| !m.subject.starts_with("outbox.dlq.")));
    relay.assert_running("after the grants");
}

/// docs/security.md's narrowed permissions for the relay's nats user, word for word
/// (the stream names filled in: `OUTBOX` holds the events and the dead letters).
const NARROW_PERMISSIONS: &str = r#"
authorization {
  users = [
    { user: relay, password: "relay-pw", permissions: {
        publish: { allow: ["outbox.>", "$KV.outbox_relay.>",
                           "$JS.API.INFO", "$JS.API.STREAM.NAMES",
                           "$JS.API.STREAM.INFO.OUTBOX", "$JS.API.STREAM.CREATE.OUTBOX",
                           "$JS.API.STREAM.UPDATE.OUTBOX", "$JS.API.STREAM.MSG.GET.OUTBOX",
                           "$JS.API.DIRECT.GET.KV_outbox_relay.>",
                           "$JS.API.STREAM.CREATE.KV_outbox_relay",
                           "$JS.API.STREAM.INFO.KV_outbox_relay"] }
        subscribe: { allow: ["_INBOX.>"] }
    } }
    { user: admin, password: "admin-pw" }
  ]
}
no_auth_user: admin
"#;

/// Servers under [`NARROW_PERMISSIONS`], with a stream `name` on `subject` that the
/// admin (the `no_auth_user`) owns and the relay's user may not read.
async fn narrow_env_with_foreign_stream(name: &str, subject: &str) -> (Env, jetstream::Context) {
    let env = Env::start_with(Postgres::start(), Nats::start_with(NARROW_PERMISSIONS)).await;
    let admin = env.js().await;
    admin
        .create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    (env, admin)
}

/// Issue 14 (6): another application's stream `OTHER`, which the relay's user may not
/// read (no `INFO`, no message reads, no `STREAM.LIST`: the narrowed permissions of
/// docs/security.md). The relay migrates, delivers 200 rows, is killed mid-stream and
/// resumes, and every row arrives once, in order. Before the fix the index listed
/// every stream (`STREAM.LIST`, denied) and the session never opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_foreign_stream_changes_nothing_under_narrow_permissions() {
    let (env, admin) = narrow_env_with_foreign_stream("OTHER", "other.>").await;
    for i in 0..20 {
        admin
            .publish(format!("other.{i}"), "theirs".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let out = env.cli_env(&["migrate"], &RELAY_CREDS);
    assert!(out.status.success(), "{}", out.text());
    let out = env.cli_env(&["check"], &RELAY_CREDS);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay_env(&RELAY_CREDS);
    let c = env.sql().await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.extend(insert_tx(&c, 10, "first").await);
    }
    wait_count(&admin, STREAM, 100).await;
    relay.kill();
    for _ in 0..10 {
        ids.extend(insert_tx(&c, 10, "second").await);
    }
    relay.restart();
    let msgs = wait_read(&admin, STREAM, 200).await;
    let got: Vec<&str> = msgs.iter().map(|m| m.msg_id()).collect();
    let unique: std::collections::HashSet<&str> = got.iter().copied().collect();
    assert_eq!(got.len(), 200, "no event twice");
    assert_eq!(
        unique,
        ids.iter().map(String::as_str).collect(),
        "every row once"
    );
    let positions: Vec<(u64, u32)> = msgs.iter().map(Msg::position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "stored in position order: {positions:?}"
    );
    assert_eq!(stream_count(&admin, "OTHER").await, 20, "OTHER untouched");
    // OTHER overlaps the relay's reach (no routing.subject_prefix: every subject), so
    // its INFO was asked, refused, and named.
    assert!(
        relay.log_text().contains("$JS.API.STREAM.INFO.OTHER"),
        "{}",
        relay.log_text()
    );
    relay.assert_running("under narrow permissions");
}

/// Issue 14: a stream the relay may not read (no `INFO`) that captures a routed
/// subject. The relay cannot know the stream's limits nor read its messages back, so
/// it must not guess: the event is neither published blind nor dead-lettered as "no
/// stream captures it"; the session ends with an error naming the permission and the
/// events wait. Events before it are delivered. Once the permission is granted, the
/// waiting events arrive in `SECRET`, once, and everything after them follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_stream_that_captures_a_subject_holds_its_events() {
    let (env, admin) = narrow_env_with_foreign_stream("SECRET", "outbox.secret.>").await;
    // OUTBOX must leave `outbox.secret.>` to SECRET (streams may not overlap).
    let text = std::fs::read_to_string(env.config_path()).unwrap().replace(
        r#"subjects = ["outbox.>"]"#,
        r#"subjects = ["outbox.order.>", "outbox.dlq.>"]"#,
    );
    env.write_raw_config(&text);
    let out = env.cli_env(&["migrate"], &RELAY_CREDS);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay_env(&RELAY_CREDS);
    let c = env.sql().await;
    let before = insert_tx(&c, 10, "before").await;
    c.execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
         SELECT 'kept', 'secret', jsonb_build_object('n', g) FROM generate_series(1, 5) g",
        &[],
    )
    .await
    .unwrap();
    let after = insert_tx(&c, 10, "after").await;
    wait_count(&admin, STREAM, 10).await;
    let port = env.http_port;
    wait_for("two sessions ended on SECRET", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_reconnects_total").await >= 2.0
    })
    .await;
    let held = read_all(&admin, STREAM).await;
    let mut held: Vec<String> = held.iter().map(|m| m.msg_id().to_string()).collect();
    let mut expected = before.clone();
    held.sort();
    expected.sort();
    assert_eq!(
        held, expected,
        "only the events before the unreadable stream's, nothing dead-lettered"
    );
    assert_eq!(
        stream_count(&admin, "SECRET").await,
        0,
        "nothing sent blind"
    );
    let log = relay.log_text();
    assert!(log.contains("SECRET"), "the error names the stream: {log}");

    let granted = NARROW_PERMISSIONS.replace(
        r#""$JS.API.STREAM.MSG.GET.OUTBOX","#,
        r#""$JS.API.STREAM.MSG.GET.OUTBOX", "$JS.API.STREAM.INFO.SECRET",
                           "$JS.API.STREAM.MSG.GET.SECRET","#,
    );
    assert_ne!(granted, NARROW_PERMISSIONS);
    let mut env = env;
    env.nats.reload_with(&granted);
    wait_count(&admin, "SECRET", 5).await;
    let msgs = wait_read(&admin, STREAM, 20).await;
    let ids: std::collections::HashSet<String> =
        msgs.iter().map(|m| m.msg_id().to_string()).collect();
    assert_eq!(msgs.len(), 20, "no event twice");
    assert_eq!(ids, [before, after].concat().into_iter().collect());
    let positions: Vec<(u64, u32)> = msgs.iter().map(Msg::position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(
        stream_count(&admin, "SECRET").await,
        5,
        "every secret event once"
    );
    relay.assert_running("after the grant");
}

/// Issue 19: `routing.headers = "compact"` writes only the message id, the position and
/// the origin, and that is all the exactly-once proof needs: with a 1 s duplicate
/// window, a relay SIGKILLed mid-stream and restarted beyond the window delivers every
/// row once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_headers_carry_the_proof_across_a_kill() {
    let env = Env::start().await;
    env.write_config("duplicate_window = \"1s\"\n[routing]\nheaders = \"compact\"\n");
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.extend(insert_tx(&c, 50, "first").await);
    }
    let js = env.js().await;
    wait_count(&js, STREAM, 300).await;
    relay.kill();
    for _ in 0..10 {
        ids.extend(insert_tx(&c, 50, "second").await);
    }
    // Beyond the duplicate window: only the relay's read-back can drop the replays.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.restart();
    let msgs = wait_read(&js, STREAM, 1500).await;
    let got: std::collections::HashSet<&str> = msgs.iter().map(|m| m.msg_id()).collect();
    assert_eq!(msgs.len(), 1500, "no event twice");
    assert_eq!(got, ids.iter().map(String::as_str).collect());
    let positions: Vec<(u64, u32)> = msgs.iter().map(Msg::position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    let mut names: Vec<&str> = msgs[0].headers.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "Nats-Msg-Id",
            "Outbox-Commit-Lsn",
            "Outbox-Origin",
            "Outbox-Tx-Index"
        ]
    );
    // A dead letter names its row by `Outbox-Event-Id` in this profile too (a fan-out
    // copy's message id is `<id>:dead letter <n>`).
    let id: String = c
        .query_one(
            r#"INSERT INTO outbox_events (event_topic, aggregate_type, payload, destination_topics)
               VALUES ('x', 'order', '{}', '["outbox.ok", "outbox.>"]') RETURNING id::text"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let msgs = wait_read(&js, STREAM, 1502).await;
    let dead = msgs.last().unwrap();
    assert_eq!(dead.subject, "outbox.dlq.outbox._");
    assert_eq!(dead.msg_id(), format!("{id}:dead letter 1"));
    assert_eq!(dead.header("Outbox-Event-Id"), Some(id.as_str()));
    assert_eq!(
        msgs[1500].header("Outbox-Event-Id"),
        None,
        "not on the routed copy"
    );
    relay.assert_running("after the restart");
}
