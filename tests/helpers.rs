//! Producer and consumer helpers: the `outbox_emit()` SQL function that `migrate`
//! installs, the producer examples (Rust and Python: the event commits with its business
//! row or not at all) and the idempotent consumer example (every event applied exactly
//! once across SIGKILLs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::harness::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TP2: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

// ---------------------------------------------------------------------------------
// outbox_emit()

/// `outbox_emit()` inserts one row that the relay publishes; `metadata.traceparent` comes
/// from `SET LOCAL outbox.traceparent` unless the metadata brings its own, and becomes
/// the message's `traceparent` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_emit_publishes_with_the_session_traceparent() {
    let env = Env::start_migrated().await;
    let _relay = env.spawn_relay();
    let mut c = env.sql().await;

    // (setting, metadata argument) → the event's expected metadata.
    let cases: [(Option<&str>, Option<&str>, Option<serde_json::Value>); 5] = [
        (
            Some(TP),
            None,
            Some(serde_json::json!({ "traceparent": TP })),
        ),
        (
            Some(TP),
            Some(r#"{"traceparent": "own", "user": "x"}"#),
            Some(serde_json::json!({ "traceparent": "own", "user": "x" })),
        ),
        (
            Some(TP2),
            Some(r#"{"k": 1}"#),
            Some(serde_json::json!({ "k": 1, "traceparent": TP2 })),
        ),
        // SET LOCAL ended with the previous transaction: the setting is '' now.
        (None, None, None),
        (
            Some(""),
            Some(r#"{"k": 2}"#),
            Some(serde_json::json!({ "k": 2 })),
        ),
    ];
    let mut ids = Vec::new();
    for (i, (setting, metadata, _)) in cases.iter().enumerate() {
        let tx = c.transaction().await.unwrap();
        if let Some(tp) = setting {
            tx.batch_execute(&format!("SET LOCAL outbox.traceparent = '{tp}'"))
                .await
                .unwrap();
        }
        let payload = format!(r#"{{"n": {i}}}"#);
        let id: String = match metadata {
            Some(m) => tx
                .query_one(
                    "SELECT outbox_emit('emitted', 'order', $1, $2::text::jsonb, $3::text::jsonb)::text",
                    &[&format!("o-{i}"), &payload, m],
                )
                .await
                .unwrap()
                .get(0),
            None => tx
                .query_one(
                    "SELECT outbox_emit('emitted', 'order', $1, $2::text::jsonb)::text",
                    &[&format!("o-{i}"), &payload],
                )
                .await
                .unwrap()
                .get(0),
        };
        tx.commit().await.unwrap();
        ids.push(id);
    }

    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, cases.len() as u64).await;
    assert_eq!(
        msgs.iter().map(|m| m.msg_id()).collect::<Vec<_>>(),
        ids.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "one message per outbox_emit call, Nats-Msg-Id = the id it returned"
    );
    for (i, ((_, _, expected), m)) in cases.iter().zip(&msgs).enumerate() {
        assert_eq!(m.subject, "outbox.order.emitted");
        assert_eq!(
            m.header("Outbox-Aggregate-Id"),
            Some(format!("o-{i}").as_str())
        );
        let payload: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(payload, serde_json::json!({ "n": i }));
        let stored: Option<String> = c
            .query_one(
                "SELECT metadata::text FROM outbox_events WHERE id = $1::text::uuid",
                &[&ids[i]],
            )
            .await
            .unwrap()
            .get(0);
        let stored: Option<serde_json::Value> = stored.map(|s| serde_json::from_str(&s).unwrap());
        assert_eq!(&stored, expected, "metadata of event {i}");
        let traceparent = expected
            .as_ref()
            .and_then(|m| m.get("traceparent"))
            .and_then(|v| v.as_str());
        assert_eq!(m.header("traceparent"), traceparent, "header of event {i}");
    }
    assert_eq!(msgs[1].header("user"), Some("x"));
}

/// `migrate` creates `outbox_emit` in the configured table's schema only beside a table
/// it creates itself; it keeps a function of another table in the same schema, and adds
/// none for a table it did not create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_installs_outbox_emit_only_beside_the_table_it_creates() {
    let env = Env::start_migrated().await;
    let c = env.sql().await;
    let emit_exists = |schema: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT to_regprocedure($1) IS NOT NULL",
                &[&format!(
                    "{schema}.outbox_emit(text, text, text, jsonb, jsonb)"
                )],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
        }
    };
    assert!(emit_exists("public").await);
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    assert!(out.stdout.contains("left unchanged"), "{}", out.stdout);

    // Each table with a publication of its own (the slot exists already).
    let migrate = |table: &str, publication: &str| {
        let out = env.cli_env(
            &["migrate"],
            &[
                ("OUTBOX_RELAY_OUTBOX_TABLE", table),
                ("OUTBOX_RELAY_POSTGRES_PUBLICATION", publication),
            ],
        );
        assert!(out.status.success(), "migrate {table}: {}", out.text());
        out.stdout
    };
    // A table of its own in another schema: the function lands beside it (and, like
    // any INSERT, works without a relay running).
    let out = migrate("billing.events", "pub1");
    assert!(
        out.contains("created function billing.outbox_emit"),
        "{out}"
    );
    let id: String = c
        .query_one(
            "SELECT billing.outbox_emit('paid', 'invoice', 'i-1', '{}')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let n = query_i64(
        &c,
        &format!("SELECT count(*) FROM billing.events WHERE id = '{id}'"),
    )
    .await;
    assert_eq!(n, 1, "billing.outbox_emit writes to billing.events");

    // A second table in `public`: public.outbox_emit keeps writing to outbox_events.
    let out = migrate("public.second_outbox", "pub2");
    assert!(
        out.contains("function public.outbox_emit exists and does not write to public.second_outbox: left unchanged"),
        "{out}"
    );
    let id: String = c
        .query_one("SELECT outbox_emit('x', 'y', 'z', '{}')::text", &[])
        .await
        .unwrap()
        .get(0);
    let n = query_i64(
        &c,
        &format!("SELECT count(*) FROM public.outbox_events WHERE id = '{id}'"),
    )
    .await;
    assert_eq!(
        n, 1,
        "public.outbox_emit still writes to public.outbox_events"
    );

    // A table migrate did not create gets no function.
    c.batch_execute(
        "CREATE SCHEMA legacy;
         CREATE TABLE legacy.outbox (id uuid PRIMARY KEY, type text NOT NULL, payload jsonb NOT NULL);",
    )
    .await
    .unwrap();
    let out = migrate("legacy.outbox", "pub3");
    assert!(out.contains("left unchanged"), "{out}");
    assert!(!out.contains("outbox_emit"), "{out}");
    assert!(!emit_exists("legacy").await);
}

// ---------------------------------------------------------------------------------
// Producer examples

/// The Rust producer example: events arrive, each committed with its business row; a
/// rolled-back transaction publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_producer_example_commits_events_with_their_orders() {
    let bin = example_bin("producer");
    check_producer(|args| {
        let out = Command::new(&bin)
            .args(args)
            .output()
            .expect("run producer");
        (out.status.success(), text(&out))
    })
    .await;
}

/// The Python (psycopg 3) producer example, same checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_example_commits_events_with_their_orders() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/producer.py");
    let python_path = python_path();
    let probe = Command::new("python3")
        .args(["-c", "import psycopg; print(psycopg.__version__)"])
        .env("PYTHONPATH", &python_path)
        .output();
    match probe {
        Ok(out) if out.status.success() => {
            eprintln!("psycopg {}", String::from_utf8_lossy(&out.stdout).trim());
        }
        Ok(out) => {
            eprintln!(
                "SKIPPED python_producer_example: psycopg is not importable (PYTHONPATH={}): {}\n\
                 install it with `bash scripts/setup.sh` (or `pip install \"psycopg[binary]\"`)",
                python_path.to_string_lossy(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED python_producer_example: python3 not found ({e})");
            return;
        }
    }
    check_producer(|args| {
        let out = Command::new("python3")
            .arg(&script)
            .args(args)
            .env("PYTHONPATH", &python_path)
            .output()
            .expect("run producer.py");
        (out.status.success(), text(&out))
    })
    .await;
}

/// Runs a producer (`run(args) -> (success, output)`) against a fresh environment:
/// rolled-back orders, orders through a plain INSERT and through `outbox_emit`, each
/// with a traceparent. Checks the stream holds exactly the committed events, in commit
/// order, each in the transaction of its order row.
async fn check_producer(run: impl Fn(&[&str]) -> (bool, String)) {
    let env = Env::start_migrated().await;
    let _relay = env.spawn_relay();
    let url = env.pg.url("app");
    let produce = |extra: &[&str]| -> Vec<Order> {
        let mut args = vec!["--postgres", url.as_str()];
        args.extend_from_slice(extra);
        let (ok, out) = run(&args);
        assert!(ok, "producer {extra:?} failed:\n{out}");
        let orders = parse_orders(&out);
        assert!(
            !orders.is_empty(),
            "producer {extra:?} printed no order:\n{out}"
        );
        orders
    };

    let rolled_back = produce(&["--rollback", "--orders", "2"]);
    let rolled_back_emit = produce(&["--rollback", "--via", "emit", "--orders", "1"]);
    let inserted = produce(&["--via", "insert", "--orders", "3", "--traceparent", TP]);
    let emitted = produce(&["--via", "emit", "--orders", "2", "--traceparent", TP2]);
    let plain = produce(&["--via", "emit", "--orders", "1"]);
    for Order { line, .. } in rolled_back.iter().chain(&rolled_back_emit) {
        assert!(line.starts_with("rolled back: "), "{line}");
    }

    let committed: Vec<(&Order, Option<&str>)> = inserted
        .iter()
        .map(|o| (o, Some(TP)))
        .chain(emitted.iter().map(|o| (o, Some(TP2))))
        .chain(plain.iter().map(|o| (o, None)))
        .collect();
    let js = env.js().await;
    let msgs = wait_read(&js, STREAM, committed.len() as u64).await;
    assert_eq!(
        msgs.iter().map(|m| m.msg_id()).collect::<Vec<_>>(),
        committed
            .iter()
            .map(|(o, _)| o.event_id.as_str())
            .collect::<Vec<_>>(),
        "exactly the committed events, in commit order (the rolled-back ones never)"
    );

    let c = env.sql().await;
    for ((order, traceparent), m) in committed.iter().zip(&msgs) {
        let Order {
            order_id,
            event_id,
            line,
        } = order;
        assert_eq!(m.subject, "outbox.order.created", "{line}");
        assert_eq!(m.header("traceparent"), *traceparent, "{line}");
        assert_eq!(
            m.header("Outbox-Aggregate-Id"),
            Some(order_id.to_string().as_str())
        );
        let payload: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(payload["order_id"], serde_json::json!(order_id), "{line}");
        // The business row exists and was written by the same transaction as the event.
        let row = c
            .query_opt(
                "SELECT o.xmin::text = e.xmin::text, o.total_cents = (e.payload->>'total_cents')::int
                 FROM orders o JOIN outbox_events e ON e.aggregate_id = o.id::text
                 WHERE o.id = $1 AND e.id = $2::text::uuid",
                &[order_id, event_id],
            )
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("order {order_id} or event {event_id} missing: {line}"));
        assert!(
            row.get::<_, bool>(0),
            "order {order_id} and event {event_id} in one transaction"
        );
        assert!(row.get::<_, bool>(1));
    }
    for Order {
        order_id,
        event_id,
        line,
    } in rolled_back.iter().chain(&rolled_back_emit)
    {
        let n = query_i64(
            &c,
            &format!(
                "SELECT (SELECT count(*) FROM orders WHERE id = {order_id})
                      + (SELECT count(*) FROM outbox_events WHERE id = '{event_id}')"
            ),
        )
        .await;
        assert_eq!(n, 0, "rolled back, yet stored: {line}");
    }
    // Nothing else arrives: the stream still holds exactly the committed events once a
    // later transaction went through (commit order: the rolled-back ones came before).
    let sentinel = insert_tx(&c, 1, "sentinel").await;
    let all = wait_read(&js, STREAM, committed.len() as u64 + 1).await;
    assert_eq!(all.len(), committed.len() + 1);
    assert_eq!(all.last().unwrap().msg_id(), sentinel[0]);
}

/// One order a producer placed, from its output line.
struct Order {
    order_id: i64,
    /// The outbox row's id: the message's `Nats-Msg-Id`.
    event_id: String,
    line: String,
}

/// The lines `[rolled back: ]order=<id> event=<uuid> via=<how>` a producer prints.
fn parse_orders(out: &str) -> Vec<Order> {
    out.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("rolled back: ").unwrap_or(line);
            let mut order = None;
            let mut event = None;
            for field in rest.split_whitespace() {
                if let Some(v) = field.strip_prefix("order=") {
                    order = v.parse::<i64>().ok();
                } else if let Some(v) = field.strip_prefix("event=") {
                    event = Some(v.to_string());
                }
            }
            Some(Order {
                order_id: order?,
                event_id: event?,
                line: line.to_string(),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Consumer example

/// The consumer example, SIGKILLed mid-stream and restarted again and again while
/// events keep arriving, applies every event exactly once (inbox + ledger in one
/// transaction, ack after commit) and in stream order (`--max-ack-pending 1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_example_applies_each_event_once_across_sigkills() {
    const KILLS: usize = 6;
    let bin = example_bin("consumer");
    let env = Env::start_migrated().await;
    let _relay = env.spawn_relay();
    env.pg.create_database("shop").await;
    let c = env.sql().await;
    let shop = env.pg.client("shop").await;
    let js = env.js().await;

    // A backlog, so that every kill lands mid-stream.
    let mut backlog = 0;
    for i in 0..60 {
        backlog += insert_tx(&c, 1 + (i * 37) % 99, "backlog").await.len();
    }
    wait_count(&js, STREAM, backlog as u64).await;
    // More events while the consumer is being killed.
    let live = env.sql().await;
    let producer = tokio::spawn(async move {
        let mut n = 0;
        for i in 0..40 {
            n += insert_tx(&live, 1 + (i * 13) % 20, "live").await.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    });

    let log = env.dir.path().join("consumer.log");
    let nats_url = env.nats.url();
    let shop_url = env.pg.url("shop");
    let spawn = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("consumer log");
        Command::new(&bin)
            .args(["--postgres", &shop_url, "--nats", &nats_url])
            .args(["--stream", STREAM, "--durable", "ledger", "--ack-wait", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn consumer")
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    for round in 0..KILLS {
        let mut child = spawn();
        let before = ledger_count(&shop).await;
        let step = 40 + (round as i64 * 29) % 80;
        wait_child_progress(&mut child, &shop, before + step, &log_text).await;
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let applied = ledger_count(&shop).await;
        let published = stream_count(&js, STREAM).await as i64;
        eprintln!("kill {round}: {applied} of {published} published events applied");
        assert!(
            applied < published,
            "kill {round} came after the consumer caught up ({applied} of {published}): not mid-stream"
        );
    }

    let mut child = spawn();
    let live = producer.await.unwrap();
    let total = (backlog + live) as i64;
    assert_eq!(
        query_i64(&c, "SELECT count(*) FROM outbox_events").await,
        total
    );
    wait_count(&js, STREAM, total as u64).await;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("consumer exited ({status}):\n{}", log_text());
        }
        let consumer_idle = match js.get_stream(STREAM).await {
            Ok(s) => match s.consumer_info("ledger").await {
                Ok(info) => info.num_ack_pending == 0 && info.num_pending == 0,
                Err(_) => false,
            },
            Err(_) => false,
        };
        if consumer_idle && inbox_count(&shop).await == total {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "consumer did not catch up: {} of {total} in the inbox\n{}",
            inbox_count(&shop).await,
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A graceful stop (SIGTERM) exits 0.
    crate::support::send_signal(child.id(), "TERM");
    assert!(
        crate::support::wait_child(&mut child, Duration::from_secs(30)),
        "consumer did not exit on SIGTERM"
    );
    let status = child.wait().unwrap();
    eprintln!(
        "last consumer run: {}",
        log_text().lines().last().unwrap_or_default()
    );
    assert!(
        status.success(),
        "consumer exit status {status}:\n{}",
        log_text()
    );

    // The effect table against the outbox table, row by row.
    let outbox: Vec<String> = table_ids(&c).await;
    let ledger: Vec<String> = shop
        .query("SELECT event_id FROM order_ledger ORDER BY entry", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &ledger {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = outbox
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    let duplicated: Vec<(&str, usize)> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (*id, *n))
        .collect();
    let outbox_set: std::collections::HashSet<&str> = outbox.iter().map(|s| s.as_str()).collect();
    let unknown: Vec<&String> = ledger
        .iter()
        .filter(|id| !outbox_set.contains(id.as_str()))
        .collect();
    eprintln!(
        "{} outbox rows, {} ledger rows: {} missing, {} duplicated, {} unknown",
        outbox.len(),
        ledger.len(),
        missing.len(),
        duplicated.len(),
        unknown.len()
    );
    assert!(
        missing.is_empty(),
        "missing from the ledger: {:?}",
        &missing[..missing.len().min(10)]
    );
    assert!(
        duplicated.is_empty(),
        "applied more than once: {:?}",
        &duplicated[..duplicated.len().min(10)]
    );
    assert!(
        unknown.is_empty(),
        "not in the outbox: {:?}",
        &unknown[..unknown.len().min(10)]
    );
    assert_eq!(ledger.len(), outbox.len());

    // Applied in stream order, and the inbox recorded each message's position.
    let msgs = read_all(&js, STREAM).await;
    assert_eq!(
        ledger.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        msgs.iter().map(|m| m.msg_id()).collect::<Vec<_>>(),
        "effects in stream order"
    );
    let positions = query_i64(
        &shop,
        "SELECT count(*) FROM inbox WHERE commit_lsn IS NOT NULL AND tx_index IS NOT NULL",
    )
    .await;
    assert_eq!(positions, total, "every inbox row has its position");
    let last = msgs.last().unwrap();
    let row = shop
        .query_one(
            "SELECT stream_seq, (commit_lsn - '0/0')::bigint, tx_index FROM inbox WHERE event_id = $1",
            &[&last.msg_id()],
        )
        .await
        .unwrap();
    let (lsn, index) = last.position();
    assert_eq!(row.get::<_, i64>(0) as u64, last.seq);
    assert_eq!(row.get::<_, i64>(1) as u64, lsn);
    assert_eq!(row.get::<_, i32>(2) as u32, index);
}

/// Waits until the consumer's ledger holds `target` rows; panics with its log if the
/// process exits first or [`DEADLINE`] passes.
async fn wait_child_progress(
    child: &mut Child,
    shop: &tokio_postgres::Client,
    target: i64,
    log: &dyn Fn() -> String,
) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("consumer exited ({status}):\n{}", log());
        }
        if ledger_count(shop).await >= target {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "consumer did not reach {target} ledger rows:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rows in `order_ledger`; 0 until the consumer created it.
async fn ledger_count(shop: &tokio_postgres::Client) -> i64 {
    shop.query_one("SELECT count(*) FROM order_ledger", &[])
        .await
        .map_or(0, |r| r.get(0))
}

async fn inbox_count(shop: &tokio_postgres::Client) -> i64 {
    shop.query_one("SELECT count(*) FROM inbox", &[])
        .await
        .map_or(0, |r| r.get(0))
}

// ---------------------------------------------------------------------------------
// Locating the example programs

/// The built example `name`: `<target>/<profile>/examples/<name>`, next to this test
/// binary's `deps/` directory. A plain `cargo test` builds every example before it runs
/// the tests; `cargo test --test main` does not, so an example that is missing or older
/// than its source is built here with `cargo build --example` (same target directory
/// and profile).
fn example_bin(name: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _serial = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable in <target>/<profile>/deps");
    let bin = profile_dir.join("examples").join(name);
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(format!("{name}.rs"));
    if modified(&bin) >= modified(&source) && bin.is_file() {
        return bin;
    }
    let target_dir = profile_dir.parent().expect("<target>");
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .expect("profile dir name");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--example", name, "--target-dir"])
        .arg(target_dir);
    if profile != "debug" {
        cmd.args(["--profile", profile]);
    }
    eprintln!("building example {name}: {cmd:?}");
    let out = cmd.output().expect("run cargo build --example");
    assert!(
        out.status.success() && bin.is_file(),
        "cargo build --example {name} failed (or did not produce {}):\n{}",
        bin.display(),
        text(&out)
    );
    bin
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// PYTHONPATH for the Python examples: `.tools/python` (where scripts/setup.sh installs
/// psycopg) before any inherited one.
fn python_path() -> std::ffi::OsString {
    let mut paths = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/python")];
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).expect("PYTHONPATH")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
