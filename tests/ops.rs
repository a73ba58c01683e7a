//! Operations: metrics, readiness and the lag guard, lost slots, heartbeat, retention,
//! `check` notes.

use std::time::Duration;

use crate::harness::*;
use crate::support::nats::Nats;
use crate::support::postgres::Postgres;
use crate::support::wait_for;

const FAST_MONITOR: &str = "[monitor]\ninterval = \"200ms\"\n";

/// Slot lag is exported and refreshed while idle; latency histograms and labelled
/// counters are there after traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_lag_latency_and_labels() {
    let env = Env::start_migrated().await;
    env.write_config(FAST_MONITOR);
    let _relay = env.spawn_relay();
    let c = env.sql().await;
    c.execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, tenant_id, payload) VALUES ('m', 'order', 'acme', '{}')",
        &[],
    )
    .await
    .unwrap();
    wait_count(&env.js().await, STREAM, 1).await;
    let port = env.http_port;
    wait_for("end-to-end latency observed", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_end_to_end_seconds_count").await >= 1.0
    })
    .await;
    let (_, body) = http_get(port, "/metrics").await.unwrap();
    for needle in [
        r#"outbox_relay_events_published_total{stream="OUTBOX",subject_root="outbox",tenant="acme"} 1"#,
        "outbox_relay_puback_seconds_count 1",
        "outbox_relay_slot_lag_bytes ",
        "outbox_relay_decoded_bytes_total ",
        "outbox_relay_seconds_since_last_event ",
        r#"outbox_relay_connected{end="postgres"} 1"#,
        "outbox_relay_in_flight 0",
        "outbox_relay_seconds_since_last_confirm ",
    ] {
        assert!(body.contains(needle), "{needle} missing:\n{body}");
    }
    assert!(
        metric(&body, "outbox_relay_transactions_total") >= 1.0,
        "{body}"
    );
    assert!(metric(&body, "outbox_relay_confirmed_lsn") > 0.0, "{body}");
    // The checkpoint is persisted on its own timer.
    wait_for("checkpoint position exported", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_checkpoint_lsn").await > 0.0
    })
    .await;
}

/// Slot lag over `monitor.lag_fail_bytes` fails readiness, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_guard_fails_readiness() {
    let env = Env::start_migrated().await;
    let c = env.sql().await;
    let lag = query_i64(&c, "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'outbox_relay'").await;
    let (warn, fail) = (lag + 100_000, lag + 500_000);
    env.write_config(&format!(
        "[monitor]\ninterval = \"200ms\"\nlag_warn_bytes = {warn}\nlag_fail_bytes = {fail}\n"
    ));
    // The null sink never confirms: the slot falls behind as rows are written.
    let relay = env.spawn_relay_args(&["--null-sink"]);
    let port = env.http_port;
    wait_http(port, "/readyz", 200, "").await;
    insert_tx(&c, 10_000, "lag").await;
    wait_http(port, "/readyz", 503, "slot lag").await;
    assert!(
        relay.log_text().contains("replication slot lag is high"),
        "{}",
        relay.log_text()
    );
}

/// A slot invalidated by `max_slot_wal_keep_size` stops the relay with recovery steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_slot_is_fatal_with_recovery_steps() {
    let pg = Postgres::start_with(&[
        ("max_slot_wal_keep_size", "32MB"),
        ("wal_keep_size", "0"),
        ("max_wal_size", "64MB"),
    ]);
    let env = Env::start_with(pg, Nats::start()).await;
    assert!(env.cli(&["migrate"]).status.success());
    env.write_config(FAST_MONITOR);
    let mut relay = env.spawn_relay_args(&["--null-sink"]);
    let port = env.http_port;
    wait_http(port, "/readyz", 200, "").await;
    let c = env.sql().await;
    c.batch_execute("CREATE TABLE filler (v text)")
        .await
        .unwrap();
    wait_for("slot invalidated and relay stopped", DEADLINE, || {
        let c = &c;
        let exited = relay.exited();
        async move {
            if exited.is_some() {
                return true;
            }
            c.batch_execute(
                "INSERT INTO filler SELECT repeat(md5(g::text), 30) FROM generate_series(1, 20000) g; CHECKPOINT;",
            )
            .await
            .unwrap();
            false
        }
    })
    .await;
    let log = relay.log_text();
    assert!(log.contains("wal_status = lost"), "{log}");
    assert!(log.contains("drop the slot"), "{log}");
}

/// With the heartbeat on, the slot advances while the outbox is idle, and heartbeats
/// publish nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_advances_the_slot() {
    let env = Env::start_migrated().await;
    env.write_config("[monitor]\ninterval = \"200ms\"\nheartbeat_interval = \"200ms\"\n");
    let _relay = env.spawn_relay();
    wait_for("slot active", DEADLINE, || async {
        env.confirmed_flush("outbox_relay").await.is_some()
    })
    .await;
    let start = env.confirmed_flush("outbox_relay").await.unwrap();
    wait_for(
        "confirmed_flush_lsn to advance on heartbeats alone",
        DEADLINE,
        || async { env.confirmed_flush("outbox_relay").await.unwrap() > start },
    )
    .await;
    let c = env.sql().await;
    let heartbeats: i64 = c
        .query_one("SELECT count(*) FROM outbox_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(heartbeats, 0);
    assert_eq!(stream_count(&env.js().await, STREAM).await, 0);
}

/// Retention deletes delivered rows older than max_age, in batches, and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_only_old_delivered_rows() {
    let env = Env::start_migrated().await;
    env.write_config(
        "[retention]\nenabled = true\nmax_age = \"1h\"\ninterval = \"300ms\"\nbatch_size = 7\n",
    );
    let _relay = env.spawn_relay();
    let c = env.sql().await;
    c.execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, payload, created_at)
         SELECT 'old', 'order', '{}', now() - interval '2 hours' FROM generate_series(1, 30)",
        &[],
    )
    .await
    .unwrap();
    insert_tx(&c, 5, "fresh").await;
    // Rows keep arriving while the pruner deletes in batches: none of them is touched.
    let url = env.pg.url("app");
    let writer = tokio::spawn(async move {
        let (w, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..40 {
            insert_tx(&w, 5, "live").await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    wait_count(&env.js().await, STREAM, 35).await;
    wait_for("old rows pruned", DEADLINE, || async {
        let n = query_i64(
            &c,
            "SELECT count(*) FROM outbox_events WHERE event_topic = 'old'",
        )
        .await;
        n == 0
    })
    .await;
    let fresh = query_i64(
        &c,
        "SELECT count(*) FROM outbox_events WHERE event_topic = 'fresh'",
    )
    .await;
    assert_eq!(fresh, 5);
    writer.await.unwrap();
    wait_count(&env.js().await, STREAM, 235).await;
    let live = query_i64(
        &c,
        "SELECT count(*) FROM outbox_events WHERE event_topic = 'live'",
    )
    .await;
    assert_eq!(live, 200, "retention touched rows written while it ran");
}

/// `check` explains the server settings that matter (unlimited WAL retention here) and
/// orphaned relay slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_explains_settings_and_orphaned_slots() {
    let env = Env::start_migrated().await;
    env.sql()
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot('outbox_relay_old', 'pgoutput')",
            &[],
        )
        .await
        .unwrap();
    let out = env.cli(&["check"]);
    assert!(out.status.success(), "{}", out.text());
    assert!(
        out.stdout
            .contains("note: max_slot_wal_keep_size is unlimited"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("slot outbox_relay_old is inactive"),
        "{}",
        out.stdout
    );
    // Every safety-relevant setting is explained, whatever its value.
    for needle in [
        "note: setting max_slot_wal_keep_size = unlimited",
        "note: setting wal_sender_timeout = 60000 ms: the slot of a relay that died",
        "note: setting max_replication_slots = ",
    ] {
        assert!(out.stdout.contains(needle), "{needle}:\n{}", out.stdout);
    }
}

/// NATS down: `/readyz` turns unready with the reason, the slot lag in `/metrics` keeps
/// rising as rows are written (the watch runs between sessions too); NATS back: ready
/// again and every row delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_lag_follow_a_nats_outage() {
    let mut env = Env::start_migrated().await;
    env.write_config(FAST_MONITOR);
    let _relay = env.spawn_relay();
    let port = env.http_port;
    let c = env.sql().await;
    insert_tx(&c, 1, "before").await;
    wait_count(&env.js().await, STREAM, 1).await;
    wait_http(port, "/readyz", 200, "").await;
    env.nats.stop();
    wait_http(port, "/readyz", 503, "nats").await;
    let before = relay_metric(port, "outbox_relay_slot_lag_bytes").await;
    insert_tx(&c, 5_000, "during").await;
    wait_for("slot lag to rise while NATS is down", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_slot_lag_bytes").await > before + 100_000.0
    })
    .await;
    env.nats.start_again();
    wait_http(port, "/readyz", 200, "").await;
    wait_count(&env.js().await, STREAM, 5_001).await;
    assert!(relay_metric(port, "outbox_relay_reconnects_total").await >= 1.0);
    // Recovered, and `status` still tells what went wrong.
    let out = env.cli(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&out.stdout).expect("status --json");
    assert!(
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("nats")),
        "{}",
        out.stdout
    );
    assert_eq!(st["relay"], "ready", "{}", out.stdout);
}

/// A silent stall (the walsender frozen with SIGSTOP while rows pile up): `/readyz`
/// says "stalled" and the log says so once; after SIGCONT it is ready again and every
/// row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_stall_fails_readiness() {
    let env = Env::start_migrated().await;
    env.write_config("[monitor]\ninterval = \"200ms\"\nstall_after = \"2s\"\n");
    let relay = env.spawn_relay();
    let port = env.http_port;
    let c = env.sql().await;
    insert_tx(&c, 1, "before").await;
    wait_count(&env.js().await, STREAM, 1).await;
    wait_http(port, "/readyz", 200, "").await;
    let pid = slot_holder_pid(&c).await;
    let signal = |sig: &str| send_signal(pid, sig);
    signal("-STOP");
    insert_tx(&c, 20_000, "during").await;
    wait_http(port, "/readyz", 503, "stalled").await;
    let r = &relay;
    wait_for("the stall logged", DEADLINE, || async move {
        r.log_text().contains("stalled: nothing read")
    })
    .await;
    signal("-CONT");
    wait_count(&env.js().await, STREAM, 20_001).await;
    wait_http(port, "/readyz", 200, "").await;
    wait_for("the end of the stall logged", DEADLINE, || async move {
        r.log_text().contains("moving again after a stall")
    })
    .await;
    let log = relay.log_text();
    assert_eq!(log.matches("stalled: nothing read").count(), 1, "{log}");
}

/// `log.format = "json"`: every line is a JSON object; the backlog drained is logged
/// once ("caught up"); a dead-letter line carries the event's position (its commit
/// LSN and index in the transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_state_changes_and_the_commit_lsn() {
    let env = Env::start_migrated().await;
    let relay = env.spawn_relay_env(&[("OUTBOX_RELAY_LOG_FORMAT", "json")]);
    let c = env.sql().await;
    c.batch_execute(
        r#"INSERT INTO outbox_events (event_topic, aggregate_type, payload, destination_topics)
           VALUES ('lost', 'order', '{}', '["nostream.anywhere"]')"#,
    )
    .await
    .unwrap();
    wait_count(&env.js().await, STREAM, 1).await;
    let r = &relay;
    wait_for("caught up logged", DEADLINE, || async move {
        r.log_text().contains("caught up")
    })
    .await;
    let lines: Vec<serde_json::Value> = relay
        .log_text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let caught_up = lines
        .iter()
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("caught up"))
        })
        .count();
    assert_eq!(caught_up, 1);
    let dead = lines
        .iter()
        .find(|v| v["fields"]["message"] == "event dead-lettered")
        .expect("dead-letter line");
    assert!(
        dead["fields"]["commit_lsn"]
            .as_str()
            .is_some_and(|l| l.contains('/')),
        "{dead}"
    );
    assert_eq!(dead["fields"]["tx_index"], 0, "{dead}");
}

/// `check` judges stream coverage by the pattern routing can produce: streams split by
/// aggregate type are "partly captured" (a note), no overlapping stream is a problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_uncaptured_subjects() {
    let env = Env::start_migrated().await;
    let config = |subjects: &str| {
        format!(
            "[postgres]\nurl = \"{}\"\n[nats]\nurl = \"{}\"\n[http]\nlisten = \"\"\n\
             [[streams]]\nname = \"S\"\nsubjects = [{subjects}]\n",
            env.pg.url("app"),
            env.nats.url()
        )
    };
    env.write_raw_config(&config(r#""outbox.order.>", "outbox.dlq.>""#));
    let out = env.cli(&["check"]);
    assert!(out.status.success(), "{}", out.text());
    assert!(
        out.stdout.contains(
            "subjects outbox.*.* (routing.subject) are only partly captured, by outbox.order.>"
        ),
        "{}",
        out.stdout
    );
    env.write_raw_config(&config(r#""other.>""#));
    let out = env.cli(&["check"]);
    assert!(!out.status.success(), "{}", out.text());
    for needle in [
        "no jetstream stream captures outbox.*.* (routing.subject)",
        "no jetstream stream captures outbox.dlq.> (routing.dead_letter_prefix)",
    ] {
        assert!(out.stdout.contains(needle), "{needle}:\n{}", out.stdout);
    }
}

/// `check` lists every problem at once, each with its fix: wal_level, the REPLICATION
/// privilege, the missing table and the missing publication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_lists_every_problem_at_once() {
    let pg = Postgres::start_with(&[("wal_level", "replica")]);
    let env = Env::start_with(pg, Nats::start()).await;
    env.sql()
        .await
        .batch_execute("CREATE ROLE weak LOGIN")
        .await
        .unwrap();
    let url = env.pg.url("app").replacen("postgres@", "weak@", 1);
    assert!(url.contains("weak@"), "{url}");
    env.write_raw_config(&format!(
        "[postgres]\nurl = \"{url}\"\n[nats]\nurl = \"{}\"\n[http]\nlisten = \"\"\n\
         [[streams]]\nname = \"OUTBOX\"\nsubjects = [\"outbox.>\"]\n",
        env.nats.url()
    ));
    let out = env.cli(&["check"]);
    assert!(!out.status.success(), "{}", out.text());
    for needle in [
        "problem: wal_level is replica",
        "fix: set wal_level = logical",
        "problem: the relay's role has no REPLICATION privilege",
        "fix: ALTER ROLE <relay user> REPLICATION",
        "problem: outbox table public.outbox_events does not exist",
        "fix: run `outbox-relay migrate`",
        "problem: publication outbox_relay does not exist",
    ] {
        assert!(out.stdout.contains(needle), "{needle}:\n{}", out.stdout);
    }
    assert!(out.stderr.contains("problem(s) found"), "{}", out.stderr);
}
