//! High availability: active/standby relays on one slot; a JetStream cluster losing
//! its stream leader.

use std::time::{Duration, Instant};

use crate::faults::{Producer, verify_exactly_once};
use crate::harness::*;
use crate::support::nats::NatsCluster;
use crate::support::postgres::Postgres;
use crate::support::{free_port, wait_for};

/// `/status` of the relay on `port`: its role, or "" while it does not answer.
async fn role(port: u16) -> String {
    match http_get(port, "/status").await {
        Some((_, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["role"].as_str().map(str::to_string))
            .unwrap_or_default(),
        None => String::new(),
    }
}

async fn wait_role(port: u16, want: &str) {
    wait_for(
        &format!("relay on :{port} to be {want}"),
        DEADLINE,
        || async { role(port).await == want },
    )
    .await;
}

/// Two relays with the same configuration: one streams, the other waits (readiness
/// says which). SIGKILL the active one under load: the standby takes over within
/// seconds, and every event is in the stream exactly once, in commit order. The killed
/// one, restarted, becomes the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_sigkill_exactly_once() {
    let env = Env::start_migrated().await;
    env.write_config("");
    let standby_env = [("OUTBOX_RELAY_POSTGRES_SLOT_BUSY_TIMEOUT", "0s")];
    let mut first = env.spawn_relay_env(&standby_env);
    wait_role(env.http_port, "active").await;

    let second_dir = env.dir.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let second_port = free_port();
    let second_listen = format!("127.0.0.1:{second_port}");
    let second = Relay::spawn_full(
        &env.config_path(),
        &second_dir,
        &[
            standby_env[0],
            ("OUTBOX_RELAY_HTTP_LISTEN", second_listen.as_str()),
        ],
        &[],
    );
    wait_role(second_port, "standby").await;
    let (code, body) = http_get(second_port, "/readyz").await.expect("/readyz");
    assert_eq!(code, 503, "a standby is not ready: {body}");
    assert!(body.contains("standby"), "{body}");
    assert_eq!(
        http_get(env.http_port, "/readyz").await.map(|r| r.0),
        Some(200)
    );

    let producer = Producer::start(env.pg.url("app"), 30_000, 11, 3_000);
    let js = env.js().await;
    wait_for("load flowing through the active relay", DEADLINE, || {
        let js = js.clone();
        async move { stream_count(&js, STREAM).await > 5_000 }
    })
    .await;
    first.kill();
    let killed_at = Instant::now();
    wait_role(second_port, "active").await;
    let takeover = killed_at.elapsed();
    eprintln!("standby took over {takeover:?} after the SIGKILL");
    // Generous for a loaded CI machine; typically about a second (STANDBY_POLL).
    assert!(
        takeover < Duration::from_secs(30),
        "takeover took {takeover:?}"
    );
    assert!(!producer.is_done(), "the kill landed under load");

    producer.finish().await;
    verify_exactly_once(&env).await;
    assert_eq!(
        relay_metric(second_port, "outbox_relay_takeovers_total").await,
        1.0
    );
    assert_eq!(relay_metric(second_port, "outbox_relay_active").await, 1.0);

    // The old active, back, waits as the standby.
    first.restart();
    wait_role(env.http_port, "standby").await;
    drop(second);
}

/// Streams with 3 replicas on a 3-node JetStream cluster; the stream leader is killed
/// under load. The relay rides through the election (its session ends, it reconnects
/// to a surviving node and replays): nothing lost, nothing doubled, and the stream
/// keeps growing after the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cluster_leader_loss_under_load_exactly_once() {
    let mut cluster = NatsCluster::start(3).await;
    let url = cluster.url();
    let first = cluster.take("n0");
    let mut env = Env::start_with(Postgres::start(), first).await;
    env.write_config("replicas = 3\n");
    let nats_env = [("OUTBOX_RELAY_NATS_URL", url.as_str())];
    let out = env.cli_env(&["migrate"], &nats_env);
    assert!(out.status.success(), "{}", out.text());
    let mut relay = env.spawn_relay_env(&nats_env);

    const TOTAL: u64 = 30_000;
    let producer = Producer::start(env.pg.url("app"), TOTAL as i64, 5, 2_000);
    let servers: Vec<async_nats::ServerAddr> = url.split(',').map(|u| u.parse().unwrap()).collect();
    let js = async_nats::jetstream::new(async_nats::connect(servers).await.unwrap());
    wait_for("load flowing into the replicated stream", DEADLINE, || {
        let js = js.clone();
        async move { stream_count(&js, STREAM).await > 3_000 }
    })
    .await;
    let info = stream_info(&js, STREAM)
        .await
        .expect("the replicated stream");
    let cluster_info = info.cluster.expect("a clustered stream");
    assert_eq!(info.config.num_replicas, 3);
    let leader = cluster_info.leader.expect("a stream leader");
    let at_kill = info.state.messages;
    // n0 went to the Env; the others are still the cluster's.
    match cluster.node_mut(&leader) {
        Some(node) => node.kill(),
        None => env.nats.kill(),
    }
    eprintln!("killed the stream leader {leader} at {at_kill} messages");
    wait_for(
        "the stream to grow again after the election",
        DEADLINE,
        || {
            let js = js.clone();
            // On a loaded machine the check above can come late, even after the
            // producer is done: then the whole load is the growth to wait for.
            async move { stream_count(&js, STREAM).await >= (at_kill + 2_000).min(TOTAL) }
        },
    )
    .await;
    relay.assert_running("after the leader was killed");
    producer.finish().await;
    // Back in the cluster, so the checks can use any node.
    match cluster.node_mut(&leader) {
        Some(node) => node.start_again(),
        None => env.nats.start_again(),
    }
    // The restarted node must have caught up before it answers reads of the stream.
    wait_stream_healthy(&env.js().await, STREAM).await;
    verify_exactly_once(&env).await;
}
