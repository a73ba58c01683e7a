//! `audit` and `replay --fill` (issue 15): the outbox table against the streams, row by
//! row, and what is missing sent again, once.

use std::collections::HashSet;

use crate::harness::*;
use crate::support::wait_for;

/// `audit --json`: the report and the exit status.
fn audit(env: &Env) -> (serde_json::Value, i32) {
    let out = env.cli(&["audit", "--json", "--wait", "60s"]);
    let code = out.status.code().unwrap_or(-1);
    assert!(code == 0 || code == 1, "audit failed: {}", out.text());
    let report =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.text()));
    (report, code)
}

fn ids_of(v: &serde_json::Value) -> HashSet<String> {
    v["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// Every row once in the stream, nothing else.
async fn assert_stream_matches_table(env: &Env) {
    let c = env.sql().await;
    let table: HashSet<String> = table_ids(&c).await.into_iter().collect();
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, table.len() as u64).await;
    // A filled copy whose id was still held by the duplicate window names its row.
    let got: Vec<&str> = msgs
        .iter()
        .map(|m| m.header("Outbox-Replay-Of").unwrap_or(m.msg_id()))
        .collect();
    let unique: HashSet<&str> = got.iter().copied().collect();
    assert_eq!(got.len(), unique.len(), "a row twice");
    assert_eq!(unique, table.iter().map(String::as_str).collect());
}

/// (a) Messages deleted from the stream by hand are reported missing by `audit` (exit
/// 1, with their ids), `replay --fill` sends exactly those, and `audit` is then clean.
/// Their ids are still in the stream's duplicate window, so JetStream calls the fill a
/// duplicate: the fill sees the stored sequence no longer holds them and sends them
/// under `<id>:fill:<run>` with `Outbox-Replay-Of`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_messages_are_found_missing_and_filled_once() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 30, "a").await;
    insert_tx(&c, 20, "b").await;
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, 50).await;
    let stream = js.get_stream(STREAM).await.unwrap();
    let mut deleted = HashSet::new();
    for m in [&msgs[3], &msgs[17], &msgs[40]] {
        stream.delete_message(m.seq).await.unwrap();
        deleted.insert(m.msg_id().to_string());
    }
    let (report, code) = audit(&env);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["rows"], 50);
    let s = &report["streams"][STREAM];
    assert_eq!(s["missing"]["count"], 3, "{report:#}");
    assert_eq!(ids_of(&s["missing"]), deleted);
    assert_eq!(s["delivered_once"], 47);
    assert_eq!(s["duplicated"]["count"], 0);

    // A window that holds none of them.
    let none = env.cli(&["audit", "--json", "--since", "2100-01-01", "--wait", "60s"]);
    assert!(none.status.success(), "{}", none.text());
    assert!(none.stdout.contains("\"rows\": 0"), "{}", none.text());
    let one = env.cli(&["audit", "--json", "--topic", "b", "--wait", "60s"]);
    assert!(one.stdout.contains("\"rows\": 20"), "{}", one.text());

    let dry = env.cli(&["replay", "--fill", "--dry-run", "--wait", "60s"]);
    assert!(dry.status.success(), "{}", dry.text());
    assert_eq!(
        dry.stdout.matches("would send:").count(),
        3,
        "{}",
        dry.text()
    );
    assert_eq!(
        stream_count(&js, STREAM).await,
        47,
        "a dry run sends nothing"
    );

    let out = env.cli(&["replay", "--wait", "60s"]);
    assert!(out.status.success(), "{}", out.text());
    assert!(out.stdout.contains(": 3 sent"), "{}", out.text());
    let (report, code) = audit(&env);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["streams"][STREAM]["delivered_once"], 50);
    assert_stream_matches_table(&env).await;
    // The filled messages say so, and carry no position.
    let all = read_all(&js, STREAM).await;
    let filled: Vec<&Msg> = all
        .iter()
        .filter(|m| m.header("Outbox-Replay").is_some())
        .collect();
    assert_eq!(filled.len(), 3);
    assert!(
        filled
            .iter()
            .all(|m| m.header("Outbox-Commit-Lsn").is_none())
    );
    // A second fill finds nothing to send.
    let out = env.cli(&["replay", "--wait", "60s"]);
    assert!(out.stdout.contains(": 0 sent"), "{}", out.text());
    relay.assert_running("beside audit and replay");
}

/// (b) The slot dropped and recreated while rows were committed: `audit` names exactly
/// the rows committed while there was no slot, `replay --fill` sends them, and nothing
/// is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_gap_is_named_row_by_row_and_filled() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 20, "before").await;
    let js = env.js().await;
    wait_count(&js, STREAM, 20).await;
    assert!(relay.terminate().success());
    c.batch_execute("SELECT pg_drop_replication_slot('outbox_relay')")
        .await
        .unwrap();
    let gap: HashSet<String> = insert_tx(&c, 10, "gap").await.into_iter().collect();
    c.batch_execute("SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')")
        .await
        .unwrap();
    let mut relay = env.spawn_relay_args(&["--accept-slot-gap"]);
    insert_tx(&c, 5, "after").await;
    wait_count(&js, STREAM, 25).await;

    let (report, code) = audit(&env);
    assert_eq!(code, 1, "{report:#}");
    let s = &report["streams"][STREAM];
    assert_eq!(s["missing"]["count"], 10, "{report:#}");
    assert_eq!(ids_of(&s["missing"]), gap);
    assert_eq!(s["delivered_once"], 25);

    // The text report, as docs/operations.md shows it.
    let text = env.cli(&["audit", "--wait", "60s"]);
    assert_eq!(text.status.code(), Some(1), "{}", text.text());
    assert!(text.stdout.contains("10 missing"), "{}", text.text());
    eprintln!("$ outbox-relay audit\n{}", text.stdout);
    let out = env.cli(&["replay", "--fill", "--wait", "60s"]);
    assert!(out.status.success(), "{}", out.text());
    assert!(out.stdout.contains(": 10 sent"), "{}", out.text());
    eprintln!("$ outbox-relay replay --fill\n{}", out.stdout);
    let text = env.cli(&["audit", "--wait", "60s"]);
    assert!(text.status.success(), "{}", text.text());
    eprintln!("$ outbox-relay audit\n{}", text.stdout);
    let (report, code) = audit(&env);
    assert_eq!(code, 0, "{report:#}");
    assert_stream_matches_table(&env).await;
    relay.assert_running("after the fill");
}

/// (c) A copy stored twice beyond the duplicate window (published by hand) is reported
/// as duplicated, and as a position going backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_beyond_the_window_are_reported() {
    let env = Env::start().await;
    env.write_config("duplicate_window = \"1s\"");
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 10, "a").await;
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, 10).await;
    let copy = &msgs[2];
    let stream = js.get_stream(STREAM).await.unwrap();
    let raw = stream.get_raw_message(copy.seq).await.unwrap();
    // Past the 1 s window, JetStream stores the same Nats-Msg-Id again.
    let js2 = js.clone();
    let (subject, headers, payload) = (
        raw.subject.to_string(),
        raw.headers.clone(),
        raw.payload.clone(),
    );
    wait_for(
        "a copy stored again",
        std::time::Duration::from_secs(30),
        || {
            let (js2, subject, headers, payload) = (
                js2.clone(),
                subject.clone(),
                headers.clone(),
                payload.clone(),
            );
            async move {
                let ack = js2
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                if ack.duplicate {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
                !ack.duplicate
            }
        },
    )
    .await;
    let (report, code) = audit(&env);
    assert_eq!(code, 1, "{report:#}");
    let s = &report["streams"][STREAM];
    assert_eq!(s["duplicated"]["count"], 1, "{report:#}");
    assert_eq!(
        ids_of(&s["duplicated"]),
        HashSet::from([copy.msg_id().to_string()])
    );
    assert_eq!(s["missing"]["count"], 0);
    assert_eq!(s["out_of_order"], 1);
    relay.assert_running("at the end");
}

/// `dlq list --json`.
fn dlq_list(env: &Env) -> Vec<serde_json::Value> {
    let out = env.cli(&["dlq", "list", "--json"]);
    assert!(out.status.success(), "{}", out.text());
    serde_json::from_str::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", out.text()))
}

/// (d) Two rows the stream's size limit refused are dead letters; `dlq redrive` while
/// the limit stands dead-letters them again with the new reason; after the limit is
/// raised, `dlq redrive` delivers each exactly once, and a second redrive sends
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_after_raising_the_limit_delivers_once() {
    let env = Env::start().await;
    let js = env.js().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["outbox.>".into()],
        max_message_size: 64 * 1024,
        ..Default::default()
    })
    .await
    .unwrap();
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    insert_tx(&c, 10, "before").await;
    let big: HashSet<String> = c
        .query(
            "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
             SELECT 'big', 'order', jsonb_build_object('blob', repeat('x', 100000), 'g', g)
             FROM generate_series(1, 2) g RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    insert_tx(&c, 5, "after").await;
    wait_count(&js, STREAM, 17).await;

    let list = dlq_list(&env);
    assert_eq!(list.len(), 2, "{list:#?}");
    for d in &list {
        assert!(big.contains(d["event_id"].as_str().unwrap()), "{d:#}");
        assert_eq!(d["error_code"], 10054, "{d:#}");
        assert_eq!(d["redriven"], false);
    }
    let show = env.cli(&["dlq", "show", list[0]["event_id"].as_str().unwrap()]);
    assert!(show.status.success(), "{}", show.text());
    assert!(show.stdout.contains("Outbox-Dlq-Reason"), "{}", show.text());

    // Still too large: refused again, dead-lettered again.
    let out = env.cli(&["dlq", "redrive", "--all"]);
    assert!(out.status.success(), "{}", out.text());
    assert!(out.stdout.contains("2 refused again"), "{}", out.text());
    let list = dlq_list(&env);
    assert_eq!(list.len(), 2, "one entry per event: {list:#?}");
    assert!(list.iter().all(|d| d["redriven"] == false));

    // Raise the limit, redrive: each once.
    let mut config = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_message_size = -1;
    js.update_stream(config).await.unwrap();
    let out = env.cli(&["dlq", "redrive", "--reason", "refused"]);
    assert!(out.status.success(), "{}", out.text());
    assert!(out.stdout.contains(": 2 sent"), "{}", out.text());
    let list = dlq_list(&env);
    assert!(list.iter().all(|d| d["redriven"] == true), "{list:#?}");
    let out = env.cli(&["dlq", "redrive", "--all"]);
    assert!(out.stdout.contains(": 0 sent"), "{}", out.text());
    let (report, code) = audit(&env);
    assert_eq!(code, 0, "{report:#}");
    let all = read_all(&js, STREAM).await;
    let delivered: Vec<&Msg> = all
        .iter()
        .filter(|m| !m.subject.starts_with("outbox.dlq."))
        .filter(|m| big.contains(m.header("Outbox-Replay-Of").unwrap_or(m.msg_id())))
        .collect();
    assert_eq!(delivered.len(), 2, "each big event once");
    assert!(
        delivered
            .iter()
            .all(|m| m.header("Outbox-Redrive").is_some())
    );
    relay.assert_running("after the redrive");
}

/// (e) A `replay` killed with SIGKILL halfway: run again, it sends only what is still
/// missing, and every row ends up stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replay_resumes_without_doubles() {
    let env = Env::start_migrated().await;
    let mut relay = env.spawn_relay();
    let c = env.sql().await;
    for _ in 0..20 {
        insert_tx(&c, 100, "load").await;
    }
    let js = env.js().await;
    wait_count(&js, STREAM, 2_000).await;
    js.get_stream(STREAM).await.unwrap().purge().await.unwrap();
    let dry = env.cli(&["replay", "--dry-run", "--wait", "60s"]);
    assert!(dry.stdout.contains(": 2000 to send"), "{}", dry.text());
    assert_eq!(
        stream_count(&js, STREAM).await,
        0,
        "a dry run sends nothing"
    );
    let mut child = env.spawn_cli(&["replay", "--rate", "400", "--wait", "60s"]);
    let js2 = js.clone();
    wait_for("the replay halfway", DEADLINE, || {
        let js2 = js2.clone();
        async move { stream_count(&js2, STREAM).await >= 500 }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = stream_count(&js, STREAM).await;
    assert!(partial < 2_000, "killed before the end: {partial}");
    let out = env.cli(&["replay", "--wait", "60s"]);
    assert!(out.status.success(), "{}", out.text());
    let sent: u64 = out
        .stdout
        .split(": ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", out.text()));
    // Only what was still missing (what the killed run had sent stays: every id once,
    // below, proves nothing doubled).
    assert!(
        sent <= 2_000 - 500,
        "only what was still missing: {}",
        out.text()
    );
    let (report, code) = audit(&env);
    assert_eq!(code, 0, "{report:#}");
    assert_stream_matches_table(&env).await;
    relay.assert_running("beside the replays");
}
