//! PostgreSQL standby promotion, on real servers: a hot standby built from the primary
//! (`Postgres::start_standby_of`), the primary killed, the standby promoted, the relay's
//! `postgres.url` pointed at it.
//!
//! On PostgreSQL 17+ the relay's slot is a failover slot and the standby keeps a synced
//! copy, so the relay resumes on the new primary: from the fork point, when its
//! checkpoint was written on the old timeline beyond it. Before 17 the slot is lost
//! with the promotion: the relay refuses to go on until the operator accepts the gap,
//! and the documented runbook republishes what was committed in it.

use std::collections::BTreeSet;

use async_nats::jetstream;

use crate::harness::*;
use crate::support::postgres::{Postgres, StopMode};
use crate::support::wait_for;

const SLOT: &str = "outbox_relay";

/// Appended to the `[[streams]]` table: republished events that were delivered already
/// (the runbook's widened bounds) are dropped by `Nats-Msg-Id` inside the window, which
/// must not run out while the test runs on a slow machine.
const STREAMS_EXTRA: &str = "duplicate_window = \"1h\"\n";

fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {text:?}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The relay's saved checkpoint: position and the timeline it is bound to.
async fn saved_checkpoint(js: &jetstream::Context) -> (u64, Option<u64>) {
    let kv = js
        .get_key_value("outbox_relay")
        .await
        .expect("checkpoint bucket");
    let value = kv
        .get("position.app_outbox_relay")
        .await
        .expect("read checkpoint")
        .expect("checkpoint key");
    let record: serde_json::Value = serde_json::from_slice(&value).expect("checkpoint record");
    (
        parse_lsn(record["lsn"].as_str().expect("lsn")),
        record["timeline"].as_u64(),
    )
}

fn commit_lsn(m: &Msg) -> u64 {
    parse_lsn(m.header("Outbox-Commit-Lsn").expect("Outbox-Commit-Lsn"))
}

fn id_set<'a>(ids: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    ids.into_iter().cloned().collect()
}

fn msg_ids(msgs: &[Msg]) -> BTreeSet<String> {
    msgs.iter().map(|m| m.msg_id().to_string()).collect()
}

/// `block` is exactly the transaction that inserted `ids` with [`insert_tx`] and topic
/// `topic`: the same rows, once each, in insert order (`Outbox-Tx-Index` 0.., payload
/// `n` 1..), all at one commit position.
fn assert_tx(block: &[Msg], ids: &[String], topic: &str) {
    assert_eq!(block.len(), ids.len(), "{topic}: {block:#?}");
    assert_eq!(msg_ids(block), id_set(ids), "{topic}: ids");
    for (i, m) in block.iter().enumerate() {
        assert_eq!(m.subject, format!("outbox.order.{topic}"), "{m:?}");
        assert_eq!(m.header("Outbox-Tx-Index"), Some(i.to_string().as_str()));
        let payload: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(payload["n"].as_u64(), Some(i as u64 + 1), "{topic}: {m:?}");
        assert_eq!(commit_lsn(m), commit_lsn(&block[0]), "{topic}: one commit");
    }
}

/// No message twice, and every one is a row of the (new) primary's outbox table.
async fn assert_once_each(msgs: &[Msg], c: &tokio_postgres::Client) {
    assert_eq!(
        msg_ids(msgs).len(),
        msgs.len(),
        "a message twice: {msgs:#?}"
    );
    let table: BTreeSet<String> = table_ids(c).await.into_iter().collect();
    assert_eq!(
        msg_ids(msgs),
        table,
        "the stream holds exactly the table's rows"
    );
}

/// Points the relay's config at `pg`, which becomes `env.pg`; returns the server it
/// pointed at before.
fn point_at(env: &mut Env, pg: Postgres) -> Postgres {
    let old = std::mem::replace(&mut env.pg, pg);
    env.write_config(STREAMS_EXTRA);
    old
}

/// The relay log written since byte `offset`.
fn log_since(relay: &Relay, offset: usize) -> String {
    relay
        .log_text()
        .get(offset..)
        .unwrap_or_default()
        .to_string()
}

fn log_len(env: &Env) -> usize {
    std::fs::metadata(env.dir.path().join("relay.log")).map_or(0, |m| m.len() as usize)
}

/// The logical slot's `confirmed_flush_lsn` on `pg` (`None`: no such slot).
async fn slot_confirmed(pg: &Postgres) -> Option<u64> {
    pg.client("postgres")
        .await
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .expect("slot query")
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .map(|v| v as u64)
}

/// Waits until the primary's slot confirms at least `lsn` (the relay tells PostgreSQL a
/// position only after saving it in the checkpoint).
async fn wait_confirmed(env: &Env, lsn: u64) {
    wait_for(
        &format!("slot {SLOT} confirmed at or after {}", lsn_text(lsn)),
        DEADLINE,
        || async move { env.confirmed_flush(SLOT).await.is_some_and(|l| l >= lsn) },
    )
    .await;
}

/// Waits until the relay has ended `sessions` sessions and retried; panics at once, with
/// its log, if it exits instead.
async fn wait_retrying(relay: &mut Relay, port: u16, sessions: u32, when: &str) {
    wait_for(
        &format!("{sessions} sessions ended and retried {when}"),
        DEADLINE,
        || {
            relay.assert_running(when);
            async move {
                relay_metric(port, "outbox_relay_reconnects_total").await >= f64::from(sessions)
            }
        },
    )
    .await;
}

/// A standby promoted after its primary died: every row committed on either server
/// reaches the stream exactly once (or, before PostgreSQL 17, once the operator has
/// followed the runbook for the lost slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_keeps_every_row_exactly_once() {
    let env = Env::start().await;
    env.write_config(STREAMS_EXTRA);
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "migrate failed: {}", out.text());
    let version = env.pg.version_num().await;
    eprintln!("PostgreSQL {version}");
    if version >= 170_000 {
        failover_slot_resumes_at_the_fork_point(env).await;
    } else {
        lost_slot_is_refused_until_the_runbook_is_followed(env).await;
    }
}

/// PostgreSQL 17+. The standby's synced slot stands at A (100 rows); the standby stops;
/// B (50 rows) is committed and delivered on the primary after a WAL segment switch, so
/// the checkpoint lies a segment beyond everything the standby has; the primary dies,
/// the standby is promoted, C (50 rows) is committed on the new timeline, at positions
/// above the fork point and below the checkpoint. The relay resumes at the fork point:
/// C arrives once, in order, and A and B are not doubled. (A relay that resumed at its
/// checkpoint would skip C: its positions are below a mark written on the old timeline.)
async fn failover_slot_resumes_at_the_fork_point(mut env: Env) {
    let mut standby = Postgres::start_standby_of(&env.pg).await;
    let js = env.js().await;
    let c = env.sql().await;
    let mut relay = env.spawn_relay();
    let a = insert_tx(&c, 100, "a").await;
    let msgs = wait_read(&js, STREAM, 100).await;
    assert_tx(&msgs, &a, "a");
    wait_confirmed(&env, commit_lsn(&msgs[99])).await;
    let primary_slot = env.confirmed_flush(SLOT).await.unwrap();
    standby.wait_synced_slot(&env.pg, SLOT, primary_slot).await;
    assert!(relay.terminate().success(), "{}", relay.log_text());
    let synced = standby.synced_slot_confirmed(SLOT).await.unwrap();
    standby.stop(StopMode::Fast);

    // WAL the standby never receives: a segment switch, then B, delivered.
    c.batch_execute("SELECT pg_switch_wal()").await.unwrap();
    let b = insert_tx(&c, 50, "b").await;
    relay.restart();
    let msgs = wait_read(&js, STREAM, 150).await;
    assert_tx(&msgs[100..], &b, "b");
    assert!(relay.terminate().success(), "{}", relay.log_text());
    let (checkpoint, timeline) = saved_checkpoint(&js).await;
    assert_eq!(timeline, Some(1));
    assert!(checkpoint >= commit_lsn(&msgs[149]));

    env.pg.stop(StopMode::Immediate);
    standby.start_again();
    assert!(standby.in_recovery().await);
    standby.promote().await;
    let (new_timeline, fork) = standby.timeline_fork().await;
    assert_eq!(new_timeline, 2);
    let slot_at = slot_confirmed(&standby)
        .await
        .expect("the synced slot survives the promotion");
    eprintln!(
        "synced slot {} (at the standby's stop {}), fork point {}, checkpoint {}",
        lsn_text(slot_at),
        lsn_text(synced),
        lsn_text(fork),
        lsn_text(checkpoint)
    );
    assert!(slot_at >= synced && slot_at <= fork, "slot {slot_at:#x}");
    assert!(
        fork < checkpoint,
        "the checkpoint must lie beyond the fork point"
    );

    let _old_primary = point_at(&mut env, standby);
    let c = env.sql().await;
    let cc = insert_tx(&c, 50, "c").await;
    let c_end = env.pg.current_wal_lsn().await;
    eprintln!(
        "C committed on timeline 2 below {} (checkpoint {})",
        lsn_text(c_end),
        lsn_text(checkpoint)
    );
    assert!(
        c_end < checkpoint,
        "C must lie below the checkpoint for this test to mean anything"
    );
    let offset = log_len(&env);
    let mut relay = env.spawn_relay();
    wait_count(&js, STREAM, 200).await;
    // A last row proves the relay went past everything before it: what it would
    // double or skip is decided by then.
    let marker = insert_tx(&c, 1, "marker").await;
    let msgs_all = wait_read(&js, STREAM, 201).await;
    assert_eq!(msgs_all.len(), 201, "nothing doubled");
    assert_tx(&msgs_all[..100], &a, "a");
    assert_tx(&msgs_all[100..150], &b, "b");
    assert_tx(&msgs_all[150..200], &cc, "c");
    assert_tx(&msgs_all[200..], &marker, "marker");
    for m in &msgs_all[150..200] {
        let at = commit_lsn(m);
        assert!(
            at > fork && at < checkpoint,
            "C at {} (fork {}, checkpoint {})",
            lsn_text(at),
            lsn_text(fork),
            lsn_text(checkpoint)
        );
    }
    // The new primary's table holds A, C and the marker: B, committed on the old
    // timeline after the fork point, is not in it (the stream keeps it).
    let table: BTreeSet<String> = table_ids(&c).await.into_iter().collect();
    let expected: BTreeSet<String> = a.iter().chain(&cc).chain(&marker).cloned().collect();
    assert_eq!(table, expected);
    assert_eq!(msg_ids(&msgs_all).len(), 201, "no message twice");
    let log = log_since(&relay, offset);
    assert!(
        log.contains(&format!(
            "promoted server: timeline 1 ended at {} in this server's history, before the checkpoint {}",
            lsn_text(fork),
            lsn_text(checkpoint)
        )),
        "{log}"
    );
    // Resumed at the fork point, with B (stored after it, on the old timeline) as the
    // read-back proof: C's positions were looked up there, not skipped by position.
    assert!(
        log.contains(&format!("resume_from={}", lsn_text(fork)))
            && log.contains("stored_after_resume=50"),
        "{log}"
    );
    relay.assert_running("after the promotion");
    assert!(relay.terminate().success());
    let (_, timeline) = saved_checkpoint(&js).await;
    assert_eq!(
        timeline,
        Some(2),
        "the checkpoint is bound to the new timeline"
    );
}

/// PostgreSQL 14–16: the promotion loses the slot. A (100 rows) delivered; H (10) on the
/// old primary after the relay stopped, replicated; the primary dies, the standby is
/// promoted; G (10) committed before any slot exists. `run` stops naming the missing
/// slot, `migrate` and `check` refuse; the runbook the error's hint names (docs/
/// operations.md, "A slot that starts after the checkpoint") is followed: `run
/// --accept-slot-gap` (logged, counted), E (10) arrives, then the gap is republished
/// by deleting and re-inserting its rows. Every row is in the stream exactly once.
async fn lost_slot_is_refused_until_the_runbook_is_followed(mut env: Env) {
    let standby = Postgres::start_standby_of(&env.pg).await;
    let js = env.js().await;
    let c = env.sql().await;
    let mut relay = env.spawn_relay();
    let a = insert_tx(&c, 100, "a").await;
    let msgs = wait_read(&js, STREAM, 100).await;
    assert_tx(&msgs, &a, "a");
    assert!(relay.terminate().success(), "{}", relay.log_text());
    let (delivered, _) = saved_checkpoint(&js).await;
    let h = insert_tx(&c, 10, "h").await;
    standby.wait_replayed(env.pg.current_wal_lsn().await).await;

    env.pg.stop(StopMode::Immediate);
    standby.promote().await;
    assert_eq!(
        slot_confirmed(&standby).await,
        None,
        "slots are not replicated before 17"
    );
    let _old_primary = point_at(&mut env, standby);
    let c = env.sql().await;
    let g = insert_tx(&c, 10, "g").await;

    let offset = log_len(&env);
    let mut refused = env.spawn_relay();
    assert!(!refused.wait_exit().await.success());
    let log = log_since(&refused, offset);
    assert!(
        log.contains(&format!(
            "replication slot {SLOT} is missing, but this relay had delivered up to {}",
            lsn_text(delivered)
        )) && log.contains("--accept-slot-gap"),
        "{log}"
    );
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
    let out = env.cli(&["check"]);
    assert!(!out.status.success(), "{}", out.text());
    assert!(out.text().contains("is missing"), "{}", out.text());
    assert_eq!(slot_confirmed(&env.pg).await, None);
    assert_eq!(stream_count(&js, STREAM).await, 100);

    // Runbook step 2: start once with --accept-slot-gap.
    let offset = log_len(&env);
    let mut accepted = env.spawn_relay_args(&["--accept-slot-gap"]);
    let pg = &env.pg;
    wait_for("the relay to create the slot", DEADLINE, || async move {
        slot_confirmed(pg).await.is_some()
    })
    .await;
    wait_http(
        env.http_port,
        "/metrics",
        200,
        "outbox_relay_slot_gaps_accepted_total 1",
    )
    .await;
    let log = log_since(&accepted, offset);
    assert!(log.contains("accepted gap"), "{log}");
    // The time the slot exists from (runbook: "until the slot was created").
    let slot_since: String = c.query_one("SELECT now()::text", &[]).await.unwrap().get(0);
    let e = insert_tx(&c, 10, "e").await;
    let msgs = wait_read(&js, STREAM, 110).await;
    assert_tx(&msgs[100..], &e, "e");

    // Step 3: republish the gap (the SQL of "Recover from an invalidated or dropped
    // slot", step 5), from the last delivered event's created_at less 5 minutes to the
    // slot's creation. A is inside the widened bounds too: its copies are dropped by
    // Nats-Msg-Id.
    let last_delivered = msgs[99].header("Outbox-Event-Id").unwrap().to_string();
    let created: String = c
        .query_one(
            "SELECT created_at::text FROM outbox_events WHERE id = $1::text::uuid",
            &[&last_delivered],
        )
        .await
        .unwrap()
        .get(0);
    let mut runbook = env.sql().await;
    let tx = runbook.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE gap ON COMMIT DROP AS
           SELECT * FROM public.outbox_events
           WHERE created_at >= '{created}'::timestamptz - interval '5 minutes'
             AND created_at < '{slot_since}';
         DELETE FROM public.outbox_events WHERE id IN (SELECT id FROM gap);"
    ))
    .await
    .unwrap();
    let republished = tx
        .execute(
            "INSERT INTO public.outbox_events SELECT * FROM gap ORDER BY created_at",
            &[],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(republished, 120, "A (inside the widened bounds), H and G");
    let marker = insert_tx(&c, 1, "marker").await;
    let msgs = wait_read(&js, STREAM, 131).await;
    assert_eq!(msgs.len(), 131, "{:#?}", &msgs[110..]);
    assert_tx(&msgs[..100], &a, "a");
    assert_tx(&msgs[100..110], &e, "e");
    assert_eq!(
        msg_ids(&msgs[110..130]),
        id_set(h.iter().chain(&g)),
        "the gap: H (old primary, never relayed) and G (new primary, before the slot)"
    );
    assert_tx(&msgs[130..], &marker, "marker");
    assert_once_each(&msgs, &c).await;
    accepted.assert_running("after the republish");
    // Accepted once: the next start needs no flag.
    assert!(accepted.terminate().success());
    wait_slot_released(&c, SLOT).await;
    let _again = env.spawn_relay();
    let last = insert_tx(&c, 1, "last").await;
    let msgs = wait_read(&js, STREAM, 132).await;
    assert_eq!(msgs.len(), 132);
    assert_eq!(msgs[131].msg_id(), last[0]);
}

/// PostgreSQL 17+: the relay pointed at a standby that is not promoted yet (a failover
/// under way: the URL already names the new primary) retries, as for any server not
/// accepting work, and does not exit; it delivers once the standby is promoted: A
/// (delivered on the old primary) not again, B (committed on the old primary after the
/// relay stopped, replicated) and C (committed after the promotion) once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_waits_for_the_standby_to_be_promoted() {
    let mut env = Env::start().await;
    env.write_config(STREAMS_EXTRA);
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "migrate failed: {}", out.text());
    let version = env.pg.version_num().await;
    if version < 170_000 {
        eprintln!(
            "PostgreSQL {version}: no failover slots; skipped (a standby without a copy of the \
             slot: replica_in_recovery_is_waited_for_not_taken_for_a_lost_slot)"
        );
        return;
    }
    let standby = Postgres::start_standby_of(&env.pg).await;
    let js = env.js().await;
    let c = env.sql().await;
    let mut relay = env.spawn_relay();
    let a = insert_tx(&c, 20, "a").await;
    let msgs = wait_read(&js, STREAM, 20).await;
    assert_tx(&msgs, &a, "a");
    wait_confirmed(&env, commit_lsn(&msgs[19])).await;
    let primary_slot = env.confirmed_flush(SLOT).await.unwrap();
    standby.wait_synced_slot(&env.pg, SLOT, primary_slot).await;
    assert!(relay.terminate().success(), "{}", relay.log_text());
    let b = insert_tx(&c, 20, "b").await;
    standby.wait_replayed(env.pg.current_wal_lsn().await).await;

    let mut old_primary = point_at(&mut env, standby);
    assert!(env.pg.in_recovery().await);
    let offset = log_len(&env);
    let mut relay = env.spawn_relay();
    wait_retrying(
        &mut relay,
        env.http_port,
        3,
        "while the standby is in recovery",
    )
    .await;
    let log = log_since(&relay, offset);
    assert!(log.contains("recovery is in progress"), "{log}");
    assert_eq!(stream_count(&js, STREAM).await, 20);

    old_primary.stop(StopMode::Immediate);
    env.pg.promote().await;
    let c = env.sql().await;
    let cc = insert_tx(&c, 20, "c").await;
    let msgs = wait_read(&js, STREAM, 60).await;
    assert_eq!(msgs.len(), 60);
    assert_tx(&msgs[..20], &a, "a");
    assert_tx(&msgs[20..40], &b, "b");
    assert_tx(&msgs[40..], &cc, "c");
    assert_once_each(&msgs, &c).await;
    relay.assert_running("after the promotion");
}

/// A replica in recovery that holds no copy of the slot (before PostgreSQL 17, or 17+
/// without `sync_replication_slots`) says nothing about the slot: the relay pointed at
/// it (a URL or DNS name briefly naming the replica) must wait as for any server in
/// recovery, not stop declaring the slot lost. Pointed back at the primary, which held
/// the slot all along, it delivers what was committed meanwhile, once, and nothing of
/// what it had delivered again.
///
/// Before the fix the relay stopped at once with "replication slot outbox_relay is
/// missing, but this relay had delivered up to X" (fatal): no slot row on the replica
/// was taken for a lost slot. `admin::preflight` now waits on `pg_is_in_recovery()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_in_recovery_is_waited_for_not_taken_for_a_lost_slot() {
    let mut env = Env::start().await;
    env.write_config(STREAMS_EXTRA);
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "migrate failed: {}", out.text());
    let version = env.pg.version_num().await;
    let no_sync: &[(&str, &str)] = if version >= 170_000 {
        &[("sync_replication_slots", "off")]
    } else {
        &[]
    };
    let replica = Postgres::start_standby_with(&env.pg, no_sync).await;
    let js = env.js().await;
    let c = env.sql().await;
    let mut relay = env.spawn_relay();
    let a = insert_tx(&c, 20, "a").await;
    let msgs = wait_read(&js, STREAM, 20).await;
    assert_tx(&msgs, &a, "a");
    assert!(relay.terminate().success(), "{}", relay.log_text());
    let b = insert_tx(&c, 20, "b").await;
    replica.wait_replayed(env.pg.current_wal_lsn().await).await;

    let primary = point_at(&mut env, replica);
    assert!(env.pg.in_recovery().await);
    let offset = log_len(&env);
    let mut relay = env.spawn_relay();
    wait_retrying(
        &mut relay,
        env.http_port,
        3,
        "while the server is in recovery",
    )
    .await;
    let log = log_since(&relay, offset);
    assert!(log.contains("recovery"), "{log}");
    assert!(relay.terminate().success(), "{}", relay.log_text());
    assert_eq!(stream_count(&js, STREAM).await, 20);

    let _replica = point_at(&mut env, primary);
    let mut relay = env.spawn_relay();
    let msgs = wait_read(&js, STREAM, 40).await;
    assert_eq!(msgs.len(), 40);
    assert_tx(&msgs[..20], &a, "a");
    assert_tx(&msgs[20..], &b, "b");
    assert_once_each(&msgs, &c).await;
    relay.assert_running("back on the primary");
}
