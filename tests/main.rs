//! Integration tests. Test modules are added below `selftest`.
//! Needs PostgreSQL server binaries and nats-server: `bash scripts/setup.sh`.
// The whole binary is test code (helpers included, which clippy's allow-in-tests does not
// see as tests): a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod chaos;
mod cloudevents;
mod core;
mod exactly_once;
mod faults;
mod ha;
mod harness;
mod helpers;
mod hostile;
mod monitoring;
mod ops;
mod payloads;
mod routing;
mod scaling;
mod security;
mod standby;
mod support;
mod telemetry;

/// Self-tests of the test support code: `cargo test --test main selftest`.
mod selftest {
    use std::time::{Duration, Instant};

    use async_nats::jetstream;

    use crate::support::nats::Nats;
    use crate::support::postgres::{Postgres, StopMode};
    use crate::support::{pid_alive, port_accepts, wait_for};

    async fn count_rows(pg: &Postgres) -> i64 {
        let c = pg.client("app").await;
        c.query_one("SELECT count(*) FROM t", &[])
            .await
            .expect("count")
            .get(0)
    }

    async fn slot_exists(pg: &Postgres) -> bool {
        let c = pg.client("postgres").await;
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 's'",
                &[],
            )
            .await
            .expect("slots")
            .get(0);
        n == 1
    }

    #[tokio::test]
    async fn postgres_logical_slot_and_restarts() {
        let t = Instant::now();
        let mut pg = Postgres::start();
        eprintln!(
            "Postgres::start took {:?} (port {})",
            t.elapsed(),
            pg.port()
        );
        assert!(pg.tool("pg_recvlogical").is_file());
        assert!(pg.data_dir().join("PG_VERSION").is_file());
        assert_eq!(
            pg.url("x"),
            format!("postgres://postgres@127.0.0.1:{}/x", pg.port())
        );

        let c = pg.client("postgres").await;
        let wal_level: String = c.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
        assert_eq!(wal_level, "logical");
        let user: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(user, "postgres");

        pg.create_database("app").await;
        let app = pg.client("app").await;
        app.batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');",
        )
        .await
        .unwrap();
        // A logical slot in the app database proves wal_level=logical works end to end.
        app.query_one(
            "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
            &[],
        )
        .await
        .unwrap();

        // Immediate (crash-like) stop: committed data and the slot survive recovery.
        let pid = pg.pid().expect("running");
        pg.stop(StopMode::Immediate);
        assert!(!pid_alive(pid), "postmaster {pid} still alive after stop");
        assert!(!port_accepts(pg.port()));
        assert!(app.is_closed() || app.simple_query("SELECT 1").await.is_err());
        let t = Instant::now();
        pg.start_again();
        eprintln!(
            "Postgres::start_again after Immediate took {:?}",
            t.elapsed()
        );
        assert_eq!(count_rows(&pg).await, 1);
        assert!(slot_exists(&pg).await);

        // Fast (clean) stop.
        pg.client("app")
            .await
            .execute("INSERT INTO t VALUES (2, 'b')", &[])
            .await
            .unwrap();
        pg.stop(StopMode::Fast);
        assert!(!port_accepts(pg.port()));
        pg.stop(StopMode::Fast); // no-op when stopped
        pg.start_again();
        assert_eq!(count_rows(&pg).await, 2);

        // SIGKILL of the whole server.
        pg.client("app")
            .await
            .execute("INSERT INTO t VALUES (3, 'c')", &[])
            .await
            .unwrap();
        let pid = pg.pid().expect("running");
        pg.kill();
        assert!(!pid_alive(pid));
        let t = Instant::now();
        pg.start_again();
        eprintln!("Postgres::start_again after kill took {:?}", t.elapsed());
        assert_eq!(count_rows(&pg).await, 3);
        assert!(slot_exists(&pg).await);
        eprintln!("server log tail:\n{}", pg.log_tail(5));
    }

    #[tokio::test]
    async fn postgres_start_with_overrides_settings() {
        let pg =
            Postgres::start_with(&[("wal_level", "replica"), ("application_name", "selftest")]);
        let c = pg.client("postgres").await;
        let wal_level: String = c.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
        assert_eq!(wal_level, "replica");
        let err = c
            .query_one(
                "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
                &[],
            )
            .await
            .expect_err("logical slot must fail with wal_level=replica");
        let msg = format!("{err:?}");
        assert!(msg.contains("wal_level"), "unexpected error: {msg}");
    }

    /// Fast shutdown waits for walsenders; with a live logical consumer
    /// (pg_recvlogical) it must still finish promptly, and the consumer's
    /// connection must end.
    #[tokio::test]
    async fn postgres_fast_stop_with_active_logical_consumer() {
        let mut pg = Postgres::start();
        let c = pg.client("postgres").await;
        c.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t;")
            .await
            .unwrap();
        // Own statement: a slot cannot be created in a transaction that wrote.
        c.batch_execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
            .await
            .unwrap();
        let mut recv = std::process::Command::new(pg.tool("pg_recvlogical"))
            .args([
                "-d",
                &pg.url("postgres"),
                "--slot",
                "s",
                "--start",
                "-f",
                "/dev/null",
            ])
            .args([
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=pub",
                "-s",
                "1",
            ])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn pg_recvlogical");
        wait_for("slot s to be active", Duration::from_secs(10), || async {
            let r = c
                .query_one(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = 's'",
                    &[],
                )
                .await;
            r.map(|row| row.get::<_, bool>(0)).unwrap_or(false)
        })
        .await;
        c.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
        let t = Instant::now();
        pg.stop(StopMode::Fast);
        eprintln!(
            "stop(Fast) with an active pg_recvlogical took {:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(30));
        let _ = recv.kill();
        let _ = recv.wait();
        pg.start_again();
    }

    #[tokio::test]
    #[should_panic(expected = "exited during startup")]
    async fn postgres_bad_setting_panics_with_log() {
        let _pg = Postgres::start_with(&[("wal_level", "bogus")]);
    }

    #[tokio::test]
    #[should_panic(expected = "exited during startup")]
    async fn nats_bad_config_panics_with_log() {
        let _nats = Nats::start_with("this is { not valid");
    }

    #[tokio::test]
    async fn nats_stream_survives_restart_and_kill() {
        let t = Instant::now();
        let mut nats = Nats::start();
        eprintln!(
            "Nats::start took {:?} (port {}, version {})",
            t.elapsed(),
            nats.port(),
            nats.version()
        );
        assert!(nats.version_tuple() >= (2, 9, 0));

        let js = nats.jetstream().await;
        js.create_stream(jetstream::stream::Config {
            name: "S".into(),
            subjects: vec!["s.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let ack = js
            .publish("s.a", "hello".into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, 1);

        nats.stop();
        assert!(!port_accepts(nats.port()));
        nats.stop(); // no-op when stopped
        let t = Instant::now();
        nats.start_again();
        eprintln!("Nats::start_again took {:?}", t.elapsed());
        let js = nats.jetstream().await;
        let stream = js.get_stream("S").await.unwrap();
        let msg = stream.get_raw_message(1).await.unwrap();
        assert_eq!(&msg.payload[..], b"hello");

        let ack = js
            .publish("s.b", "world".into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, 2);
        nats.kill();
        nats.start_again();
        let js = nats.jetstream().await;
        let stream = js.get_stream("S").await.unwrap();
        assert_eq!(
            &stream.get_raw_message(2).await.unwrap().payload[..],
            b"world"
        );
    }

    #[tokio::test]
    async fn nats_start_with_config_extra() {
        let nats = Nats::start_with("max_payload: 65536");
        let client = nats.client().await;
        assert_eq!(client.server_info().max_payload, 65536);
    }

    /// Debian's nats-server 2.9 (compatibility tests use it via start_with_bin).
    #[tokio::test]
    async fn nats_debian_binary_if_present() {
        let bin = std::path::Path::new("/usr/sbin/nats-server");
        if !bin.is_file() {
            eprintln!("skipping: {} not installed", bin.display());
            return;
        }
        let nats = Nats::start_with_bin(bin, "");
        eprintln!("Debian nats-server version {}", nats.version());
        let js = nats.jetstream().await;
        js.create_stream(jetstream::stream::Config {
            name: "S".into(),
            subjects: vec!["s.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let ack = js.publish("s.a", "x".into()).await.unwrap().await.unwrap();
        assert_eq!(ack.sequence, 1);
    }

    /// Several servers at once get distinct ports and dirs (libtest also runs
    /// the tests above in parallel).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_servers_are_independent() {
        let pgs = std::thread::spawn(|| (Postgres::start(), Postgres::start()));
        let natses = std::thread::spawn(|| (Nats::start(), Nats::start()));
        let (pg1, pg2) = pgs.join().unwrap();
        let (n1, n2) = natses.join().unwrap();
        assert_ne!(pg1.port(), pg2.port());
        assert_ne!(pg1.data_dir(), pg2.data_dir());
        assert_ne!(n1.port(), n2.port());
        assert_ne!(n1.store_dir(), n2.store_dir());
        pg1.create_database("only_in_1").await;
        let c2 = pg2.client("postgres").await;
        let n: i64 = c2
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = 'only_in_1'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        n1.client().await.flush().await.unwrap();
        n2.client().await.flush().await.unwrap();
    }

    #[tokio::test]
    async fn drop_stops_servers_and_removes_dirs() {
        let pg = Postgres::start();
        let nats = Nats::start();
        let (pg_pid, pg_dir, pg_port) = (pg.pid().unwrap(), pg.data_dir().to_path_buf(), pg.port());
        let (nats_pid, nats_dir) = (nats.pid().unwrap(), nats.store_dir().to_path_buf());
        let _client = pg.client("postgres").await; // an open connection must not block drop
        let t = Instant::now();
        drop(pg);
        drop(nats);
        eprintln!("drop of both took {:?}", t.elapsed());
        assert!(!pid_alive(pg_pid));
        assert!(!pid_alive(nats_pid));
        assert!(!pg_dir.exists());
        assert!(!nats_dir.exists());
        assert!(!port_accepts(pg_port));
    }

    #[tokio::test]
    async fn wait_for_polls_until_true() {
        let start = Instant::now();
        wait_for("150ms to pass", Duration::from_secs(5), || async move {
            start.elapsed() > Duration::from_millis(150)
        })
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for the impossible")]
    async fn wait_for_panics_on_timeout() {
        wait_for("the impossible", Duration::from_millis(200), || async {
            false
        })
        .await;
    }
}
