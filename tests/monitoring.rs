//! The monitoring files of `deploy/` against a real Prometheus scraping a real relay:
//! every query of the Grafana dashboard (`deploy/grafana/outbox-relay.json`) returns
//! data from the relay's metrics, the alert rules (`deploy/prometheus/alerts.yml`, the
//! expressions as shipped, only their `for:` shortened) evaluate without error, and the
//! alerts fire when they should.
//!
//! Prometheus runs with the scrape config `deploy/prometheus/prometheus.yml`, its
//! target and intervals rewritten for the test (the relay's port, 1 s). Binary:
//! `$OUTBOX_TEST_PROMETHEUS`, else `prometheus` on PATH (Debian's package, installed by
//! scripts/setup.sh). Without one the test is skipped with a message.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::Value;

use crate::harness::{
    DEADLINE, Env, STREAM, http_get, insert_tx, query_i64, relay_metric, wait_count,
};
use crate::support::{
    SERVER_PID_FILE, file_len, free_port, log_tail, mark_owner, read_from, test_base_dir, wait_for,
};

const FAST_MONITOR: &str = "[monitor]\ninterval = \"200ms\"\n";
/// What the dashboard's Grafana variables stand for in the test's queries. The range
/// is 5 scrapes at the test's 1 s interval.
const GRAFANA_VARIABLES: &[(&str, &str)] = &[
    ("$__rate_interval", "5s"),
    ("$__interval", "5s"),
    ("$__range", "1m"),
    ("$instance", ".*"),
];
/// `for:` of every rule in the test's copy of the rule file: Prometheus evaluates
/// every second, so an alert fires about 2 s after its condition holds.
const TEST_FOR: &str = "2s";

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// `(panel title, expression)` of every query of the dashboard, rows included, with
/// the Grafana variables replaced.
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                let mut expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {t}"))
                    .to_string();
                for (var, value) in GRAFANA_VARIABLES {
                    expr = expr.replace(var, value);
                }
                assert!(
                    !expr.contains('$'),
                    "panel {title:?}: a Grafana variable the test does not know: {expr}"
                );
                out.push((title.clone(), expr));
            }
            walk(p["panels"].as_array().map_or(&[][..], Vec::as_slice), out);
        }
    }
    let dashboard: Value = serde_json::from_str(&repo_file("deploy/grafana/outbox-relay.json"))
        .expect("deploy/grafana/outbox-relay.json is JSON");
    let mut out = Vec::new();
    walk(dashboard["panels"].as_array().expect("panels"), &mut out);
    assert!(out.len() >= 8, "the dashboard has {} queries", out.len());
    out
}

/// The rule file with every `for:` set to [`TEST_FOR`]; nothing else changes.
fn rules_for_test(shipped: &str) -> String {
    let mut replaced = 0;
    let mut out: String = shipped
        .lines()
        .map(|line| {
            let body = line.trim_start();
            if body.starts_with("for:") {
                replaced += 1;
                format!("{}for: {TEST_FOR}", &line[..line.len() - body.len()])
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    assert!(replaced > 0, "no `for:` in deploy/prometheus/alerts.yml");
    out
}

/// The names of the file's alerts, in order.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// `text` with `from` replaced by `to`; `from` must be there (the test follows the
/// shipped file: when the file changes, this says what to update).
fn replace_in(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "deploy/prometheus/prometheus.yml no longer contains {from:?}:\n{text}"
    );
    text.replace(from, to)
}

/// A throwaway Prometheus on a free port, with its data in a temp dir; killed on drop.
struct Prometheus {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("OUTBOX_TEST_PROMETHEUS").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    }

    /// Starts `bin` with `config` as prometheus.yml and `files` beside it, and waits
    /// until it is ready.
    async fn start(bin: &Path, config: &str, files: &[(&str, &str)]) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("prometheus-")
            .tempdir_in(test_base_dir())
            .expect("prometheus temp dir");
        // A test process killed before its Drop: the next one stops this server.
        mark_owner(dir.path());
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write prometheus.yml");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write a prometheus file");
        }
        let mut p = Prometheus {
            child: None,
            port: 0,
            log: dir.path().join("prometheus.log"),
            dir,
        };
        // Another process may take the free port first: try another one.
        for _ in 0..3 {
            p.port = free_port();
            let offset = file_len(&p.log);
            p.spawn(bin);
            if p.wait_ready(offset).await {
                return p;
            }
        }
        panic!(
            "prometheus found no free port in 3 tries:\n{}",
            log_tail(&p.log, 20)
        );
    }

    fn spawn(&mut self, bin: &Path) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("prometheus log");
        let dir = self.dir.path();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("prometheus log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let _ = std::fs::write(dir.join(SERVER_PID_FILE), child.id().to_string());
        self.child = Some(child);
    }

    /// True once `/-/ready` answers 200; false if the process exited because its port
    /// was taken. Any other exit panics with the log.
    async fn wait_ready(&mut self, log_offset: u64) -> bool {
        let start = Instant::now();
        loop {
            let child = self.child.as_mut().expect("prometheus spawned");
            if let Some(status) = child.try_wait().expect("wait prometheus") {
                self.child = None;
                let log = read_from(&self.log, log_offset);
                if log.contains("address already in use") {
                    return false;
                }
                panic!("prometheus exited during startup ({status}):\n{log}");
            }
            if http_get(self.port, "/-/ready")
                .await
                .is_some_and(|(status, _)| status == 200)
            {
                return true;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "prometheus not ready after 60 s:\n{}",
                log_tail(&self.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET path` of the HTTP API: its `data`, or why not.
    async fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.port, path)
            .await
            .ok_or_else(|| format!("GET {path}: no answer"))?;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| format!("GET {path}: {status} {e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("GET {path}: {status} {body}"));
        }
        Ok(v["data"].clone())
    }

    /// The instant vector `expr` evaluates to now.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let q: String = url::form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let data = self.api(&format!("/api/v1/query?query={q}")).await?;
        data["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("{expr}: not an instant vector: {data}"))
    }

    /// Pending and firing alerts.
    async fn alerts(&self) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/alerts").await?;
        data["alerts"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no alerts in {data}"))
    }

    /// Whether an alert named `name` is pending or firing; panics when Prometheus does
    /// not answer (an absence must be seen, not assumed).
    async fn active(&self, name: &str) -> bool {
        let alerts = self.alerts().await.expect("GET /api/v1/alerts");
        alerts.iter().any(|a| a["labels"]["alertname"] == name)
    }

    /// Every loaded rule.
    async fn rules(&self) -> Vec<Value> {
        let Ok(data) = self.api("/api/v1/rules").await else {
            return Vec::new();
        };
        data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The firing alerts named `name`.
    async fn firing(&self, name: &str) -> Vec<Value> {
        self.alerts()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
            .collect()
    }

    async fn wait_firing(&self, name: &str) -> Value {
        wait_for(&format!("alert {name} to fire"), DEADLINE, || async {
            !self.firing(name).await.is_empty()
        })
        .await;
        self.firing(name).await.remove(0)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- prometheus log ----\n{}", log_tail(&self.log, 40));
        }
    }
}

/// One sample of every query, or the queries without a finite one.
async fn queries_without_data(prom: &Prometheus, queries: &[(String, String)]) -> Vec<String> {
    let mut missing = Vec::new();
    for (title, expr) in queries {
        match prom.query(expr).await {
            Ok(result) => {
                let finite = result.iter().any(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(f64::is_finite)
                });
                if !finite {
                    missing.push(format!("{title}: {expr} -> {}", Value::Array(result)));
                }
            }
            Err(e) => missing.push(format!("{title}: {e}")),
        }
    }
    missing
}

/// The dashboard's queries and the alert rules against Prometheus scraping the relay:
/// with traffic, one refused event and one NATS outage, every panel has data, the rules
/// evaluate, OutboxRelayDeadLetters fires for the refused event, OutboxRelayDown when
/// NATS goes away, and OutboxRelayStalled when a relay restarted during the outage
/// confirms nothing while the slot falls 1 MiB behind; it resolves once NATS is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_and_alert_rules_in_a_real_prometheus() {
    let Some(bin) = Prometheus::binary() else {
        eprintln!(
            "skipping monitoring::dashboard_queries_and_alert_rules_in_a_real_prometheus: \
             no `prometheus` binary on PATH (nor $OUTBOX_TEST_PROMETHEUS); \
             `bash scripts/setup.sh` installs Debian's prometheus"
        );
        return;
    };
    let queries = dashboard_queries();
    let shipped_rules = repo_file("deploy/prometheus/alerts.yml");
    let names = alert_names(&shipped_rules);

    let mut env = Env::start().await;
    env.write_config(FAST_MONITOR);
    // Messages up to 64 KiB: a larger event is refused by JetStream, which counts a
    // publish error and a dead letter, both of kind "refused".
    env.js()
        .await
        .create_stream(jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec!["outbox.>".into()],
            max_message_size: 64 * 1024,
            ..Default::default()
        })
        .await
        .expect("create the stream");
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "migrate: {}", out.text());
    let mut relay = env.spawn_relay();

    let scrape = repo_file("deploy/prometheus/prometheus.yml");
    let scrape = replace_in(
        &scrape,
        "relay:9187",
        &format!("127.0.0.1:{}", env.http_port),
    );
    let scrape = replace_in(&scrape, "scrape_interval: 15s", "scrape_interval: 1s");
    let scrape = replace_in(
        &scrape,
        "evaluation_interval: 15s",
        "evaluation_interval: 1s",
    );
    let prom = Prometheus::start(
        &bin,
        &scrape,
        &[("alerts.yml", &rules_for_test(&shipped_rules))],
    )
    .await;

    // Every rule of the file is loaded and evaluates without error.
    wait_for("every rule loaded and evaluated", DEADLINE, || async {
        let rules = prom.rules().await;
        if let Some(bad) = rules.iter().find(|r| r["health"] == "err") {
            panic!(
                "rule {} does not evaluate: {}",
                bad["name"], bad["lastError"]
            );
        }
        let loaded: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
        loaded == names && rules.iter().all(|r| r["health"] == "ok")
    })
    .await;

    // Traffic: a transaction, the refused event, then one row every 200 ms so that every
    // rate and latency window of the dashboard has samples.
    let c = env.sql().await;
    insert_tx(&c, 20, "first").await;
    c.batch_execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
         VALUES ('big', 'order', jsonb_build_object('blob', repeat('x', 100000)))",
    )
    .await
    .expect("insert the refused event");
    let ticker = {
        let c = env.sql().await;
        tokio::spawn(async move {
            // Ends with PostgreSQL (a failed test drops the servers under it).
            while c
                .execute(
                    "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
                     VALUES ('tick', 'order', '{}')",
                    &[],
                )
                .await
                .is_ok()
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let port = env.http_port;
    wait_for("the refused event dead-lettered", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_events_dead_lettered_total").await >= 1.0
    })
    .await;

    // (a) Every panel has data from the relay's metrics.
    let start = Instant::now();
    loop {
        let missing = queries_without_data(&prom, &queries).await;
        if missing.is_empty() {
            break;
        }
        relay.assert_running("while Prometheus scrapes it");
        assert!(
            start.elapsed() < DEADLINE,
            "dashboard queries without a finite sample after {DEADLINE:?}:\n{}\nrelay /metrics:\n{}",
            missing.join("\n"),
            http_get(port, "/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("all {} dashboard queries have data", queries.len());

    // (b) The first dead letter of a kind fires OutboxRelayDeadLetters at once, with its kind.
    let dead = prom.wait_firing("OutboxRelayDeadLetters").await;
    assert_eq!(dead["labels"]["kind"], "refused", "{dead}");
    assert_eq!(dead["labels"]["job"], "outbox-relay", "{dead}");
    // A healthy relay is not stalled.
    assert!(
        !prom.active("OutboxRelayStalled").await,
        "{:?}",
        prom.alerts().await
    );

    // NATS goes away: the relay is not connected.
    ticker.abort();
    let _ = ticker.await;
    env.nats.stop();
    let down = prom.wait_firing("OutboxRelayDown").await;
    assert_eq!(
        down["labels"]["instance"],
        format!("127.0.0.1:{port}").as_str(),
        "{down}"
    );

    // A relay restarted during the outage confirms nothing (-1) while the slot falls
    // more than 1 MiB behind: OutboxRelayStalled.
    relay.kill();
    relay.restart();
    c.batch_execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
         SELECT 'lag', 'order', jsonb_build_object('pad', repeat('p', 500), 'n', g)
         FROM generate_series(1, 4000) g",
    )
    .await
    .expect("insert the backlog");
    wait_for("the restarted relay to measure a slot lag above 1 MiB", DEADLINE, || async move {
        relay_metric(port, "outbox_relay_slot_lag_bytes").await > (1 << 20) as f64
    })
    .await;
    let stalled = prom.wait_firing("OutboxRelayStalled").await;
    assert_eq!(
        stalled["value"]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok()),
        Some(-1.0),
        "the alert's value is seconds_since_last_confirm, -1 (nothing since start): {stalled}"
    );
    assert_eq!(stalled["labels"]["severity"], "page", "{stalled}");

    // NATS back: everything arrives and the alerts resolve.
    env.nats.start_again();
    let rows = query_i64(&c, "SELECT count(*) FROM outbox_events").await;
    wait_count(&env.js().await, STREAM, rows as u64).await;
    wait_for(
        "OutboxRelayStalled and OutboxRelayDown to resolve",
        DEADLINE,
        || async {
            !prom.active("OutboxRelayStalled").await && !prom.active("OutboxRelayDown").await
        },
    )
    .await;
    relay.assert_running("after the outage");
}
