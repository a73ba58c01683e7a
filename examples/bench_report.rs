//! Benchmark helper: turns the raw measurements of `bench/run` (one JSON object per
//! line: `{"workload", "rep", "phase", "rate", "data"}`) into one table (Markdown, on
//! stdout) and one JSON document (`--out`): per metric the median over the repetitions,
//! min and max, the goal of issue 7 and whether the median meets it.
//!
//! A repetition whose exactly-once check failed scores zero throughput: a fast wrong
//! relay does not count. Measurements that overlapped other builds or tests on the
//! machine (`"disturbed": true`, after `bench/run` gave up repeating them) are counted
//! and reported under the table.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::PathBuf;

use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Summarise bench/run measurements")]
struct Args {
    /// Raw measurements, one JSON object per line.
    #[arg(long)]
    raw: PathBuf,
    /// Machine, versions and settings (a JSON object), copied into the output.
    #[arg(long)]
    meta: Option<PathBuf>,
    /// Where to write the JSON summary.
    #[arg(long)]
    out: PathBuf,
}

struct Row {
    section: String,
    metric: String,
    unit: &'static str,
    values: Vec<f64>,
    goal: String,
    /// How the median is judged against the goal.
    check: Check,
}

#[derive(Clone, Copy)]
enum Check {
    /// No goal: information.
    Info,
    Above(f64),
    AtLeast(f64),
    AtMost(f64),
    /// Decided over all repetitions, not on the median.
    Fixed(bool),
}

impl Check {
    fn verdict(self, median: Option<f64>) -> &'static str {
        let pass = match (self, median) {
            (Check::Info, _) => return "",
            (Check::Fixed(b), _) => b,
            (_, None) => return "n/a",
            (Check::Above(g), Some(m)) => m > g,
            (Check::AtLeast(g), Some(m)) => m >= g,
            (Check::AtMost(g), Some(m)) => m <= g,
        };
        if pass { "PASS" } else { "MISS" }
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.raw)?;
    let raw: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let meta: Value = match &args.meta {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
        None => Value::Null,
    };

    let mut rows: Vec<Row> = Vec::new();
    let rows_of = |w: &str| {
        raw.iter()
            .find(|v| v["workload"] == w && v["phase"] == "load")
            .and_then(|v| v["data"]["rows"].as_f64())
            .map(|n| thousands(n as i64))
            .unwrap_or_else(|| "?".into())
    };
    catch_up(
        &raw,
        "A",
        &format!("A. catch-up {} rows", rows_of("A")),
        &mut rows,
    );
    live(&raw, &mut rows);
    catch_up(
        &raw,
        "C",
        &format!("C. one {}-row tx", rows_of("C")),
        &mut rows,
    );

    header_sets(&raw, &mut rows);

    println!("| workload | metric | median | min – max | goal | verdict |");
    println!("|---|---|---:|---:|---|---|");
    let mut out_rows = Vec::new();
    for r in &rows {
        let (med, min, max) = stats(&r.values);
        let verdict = r.check.verdict(med);
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.section,
            r.metric,
            fmt(med, r.unit),
            match (min, max) {
                (Some(a), Some(b)) if r.values.len() > 1 => {
                    format!("{} – {}", fmt(Some(a), r.unit), fmt(Some(b), r.unit))
                }
                _ => String::new(),
            },
            r.goal,
            verdict
        );
        out_rows.push(json!({
            "workload": r.section,
            "metric": r.metric,
            "unit": r.unit,
            "median": med,
            "min": min,
            "max": max,
            "values": r.values,
            "goal": r.goal,
            "verdict": verdict,
        }));
    }
    let disturbed = raw.iter().filter(|v| v["disturbed"] == true).count();
    if disturbed > 0 {
        println!();
        println!(
            "Note: {disturbed} measurement(s) overlapped other builds or tests on the machine \
             (marked \"disturbed\" in the JSON) and are included."
        );
    }
    let doc =
        json!({ "meta": meta, "disturbed_measurements": disturbed, "rows": out_rows, "raw": raw });
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)? + "\n")?;
    Ok(())
}

/// Workload H: what a message costs nats-server (and the publisher) by header set.
fn header_sets(raw: &[Value], rows: &mut Vec<Row>) {
    for set in ["none", "id", "compact", "full"] {
        let runs = phase(raw, "H", &format!("headers_{set}"));
        if runs.is_empty() {
            continue;
        }
        let bytes = per_rep(&runs, &["header_bytes"])
            .first()
            .copied()
            .unwrap_or(0.0);
        let section = format!("H. headers {set} ({bytes} B)");
        for (metric, path, unit) in [
            ("nats-server CPU per message", "nats_us_per_event", "µs"),
            ("publisher CPU per message", "cpu_us_per_event", "µs"),
            ("publish rate", "rate_wall", "ev/s"),
        ] {
            rows.push(Row {
                section: section.clone(),
                metric: metric.into(),
                unit,
                values: per_rep(&runs, &[path]),
                goal: String::new(),
                check: Check::Info,
            });
        }
    }
}

fn phase<'a>(raw: &'a [Value], workload: &str, phase: &str) -> BTreeMap<u64, &'a Value> {
    raw.iter()
        .filter(|v| v["workload"] == workload && v["phase"] == phase)
        .filter_map(|v| Some((v["rep"].as_u64()?, &v["data"])))
        .collect()
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

/// Events per second of a catch-up phase: from the replication connection to the end
/// (`rate_stream`), else from the first event (`rate_active`), else wall time.
fn rate(v: &Value) -> Option<f64> {
    num(v, &["rate_stream"])
        .or_else(|| num(v, &["rate_active"]))
        .or_else(|| num(v, &["rate_wall"]))
}

fn rates(m: &BTreeMap<u64, &Value>) -> BTreeMap<u64, f64> {
    m.iter()
        .filter_map(|(rep, v)| Some((*rep, rate(v)?)))
        .collect()
}

/// One value per repetition that has it.
fn per_rep(m: &BTreeMap<u64, &Value>, path: &[&str]) -> Vec<f64> {
    m.values().filter_map(|v| num(v, path)).collect()
}

/// Workloads A and C: ceilings, null sink, relay, ratios in the same repetition.
fn catch_up(raw: &[Value], w: &str, section: &str, rows: &mut Vec<Row>) {
    let decode = phase(raw, w, "decode");
    let publish = phase(raw, w, "publish");
    let null = phase(raw, w, "null");
    let relay = phase(raw, w, "relay");
    let verify = phase(raw, w, "verify");
    if decode.is_empty() && relay.is_empty() {
        return;
    }
    let ok = |rep: &u64| verify.get(rep).is_some_and(|v| v["ok"] == true);
    // Relay throughput, zero when that repetition's output was wrong.
    let relay_rate: BTreeMap<u64, f64> = relay
        .iter()
        .filter_map(|(rep, v)| {
            let r = rate(v)?;
            Some((*rep, if ok(rep) { r } else { 0.0 }))
        })
        .collect();
    let ratio = |num_m: &BTreeMap<u64, f64>, den: &BTreeMap<u64, f64>| {
        num_m
            .iter()
            .filter_map(|(rep, n)| Some(n / den.get(rep)?))
            .collect::<Vec<f64>>()
    };
    let decode_rate = rates(&decode);
    let publish_rate = rates(&publish);
    let null_rate = rates(&null);
    let s = section.to_string();
    let mut add = |metric: &str, unit: &'static str, values: Vec<f64>, goal: &str, check: Check| {
        rows.push(Row {
            section: s.clone(),
            metric: metric.to_string(),
            unit,
            values,
            goal: goal.to_string(),
            check,
        })
    };
    let a = w == "A";
    add(
        "decode ceiling: pg_recvlogical pgoutput → /dev/null",
        "ev/s",
        decode_rate.values().copied().collect(),
        "",
        Check::Info,
    );
    if !publish.is_empty() {
        add(
            "publish ceiling: raw async-nats JetStream, acks",
            "ev/s",
            publish_rate.values().copied().collect(),
            "",
            Check::Info,
        );
    }
    add(
        "relay run --null-sink (decode + route)",
        "ev/s",
        null_rate.values().copied().collect(),
        "",
        Check::Info,
    );
    add(
        "relay run (end to end, PubAcks)",
        "ev/s",
        relay_rate.values().copied().collect(),
        if a { "> 90,000" } else { "" },
        if a {
            Check::Above(90_000.0)
        } else {
            Check::Info
        },
    );
    add(
        "relay ÷ decode ceiling",
        "ratio",
        ratio(&relay_rate, &decode_rate),
        if a { "≥ 0.90" } else { "" },
        if a { Check::AtLeast(0.9) } else { Check::Info },
    );
    if !publish.is_empty() {
        add(
            "relay ÷ publish ceiling",
            "ratio",
            ratio(&relay_rate, &publish_rate),
            "",
            Check::Info,
        );
    }
    add(
        "null-sink ÷ decode ceiling",
        "ratio",
        ratio(&null_rate, &decode_rate),
        "",
        Check::Info,
    );
    add(
        "relay CPU per event",
        "µs",
        per_rep(&relay, &["cpu_us_per_event"]),
        "≤ 10",
        Check::AtMost(10.0),
    );
    add(
        "null-sink CPU per event",
        "µs",
        per_rep(&null, &["cpu_us_per_event"]),
        "",
        Check::Info,
    );
    add(
        "relay context switches per event",
        "n",
        per_rep(&relay, &["ctx_switches_per_event"]),
        "",
        Check::Info,
    );
    if !publish.is_empty() {
        add(
            "publish ceiling: publisher CPU per message",
            "µs",
            per_rep(&publish, &["cpu_us_per_event"]),
            "",
            Check::Info,
        );
        add(
            "nats-server CPU per message during publish ceiling",
            "µs",
            per_rep(&publish, &["nats_us_per_event"]),
            "",
            Check::Info,
        );
    }
    add(
        "walsender CPU per event during decode ceiling",
        "µs",
        per_rep(&decode, &["walsender_us_per_event"]),
        "",
        Check::Info,
    );
    add(
        "walsender CPU per event during relay run",
        "µs",
        per_rep(&relay, &["walsender_us_per_event"]),
        "",
        Check::Info,
    );
    add(
        "nats-server CPU per event during relay run",
        "µs",
        per_rep(&relay, &["nats_us_per_event"]),
        "",
        Check::Info,
    );
    add(
        "machine busy during relay run (2 cores = 100%)",
        "%",
        per_rep(&relay, &["machine_busy_pct"]),
        "",
        Check::Info,
    );
    if !a {
        add(
            "relay: first event after start (walsender decodes the tx)",
            "s",
            per_rep(&relay, &["first_event_s"]),
            "",
            Check::Info,
        );
    }
    add(
        "relay peak RSS (VmHWM)",
        "MB",
        per_rep(&relay, &["vm_hwm_kb"])
            .into_iter()
            .map(|k| k / 1024.0)
            .collect(),
        if a { "" } else { "≤ 100" },
        if a { Check::Info } else { Check::AtMost(100.0) },
    );
    add(
        "relay steady RSS (median VmRSS, 10–90% done)",
        "MB",
        per_rep(&relay, &["rss_steady_kb"])
            .into_iter()
            .map(|k| k / 1024.0)
            .collect(),
        if a { "" } else { "≤ 50" },
        if a { Check::Info } else { Check::AtMost(50.0) },
    );
    let all_ok = !verify.is_empty() && verify.values().all(|v| v["ok"] == true);
    add(
        "exactly once: count = rows, distinct ids = rows, order",
        "ok",
        vec![if all_ok { 1.0 } else { 0.0 }],
        "all reps ok",
        Check::Fixed(all_ok),
    );
}

/// Workload B: one block per rate.
fn live(raw: &[Value], rows: &mut Vec<Row>) {
    let mut rates: Vec<u64> = raw
        .iter()
        .filter(|v| v["workload"] == "B" && v["phase"] == "live")
        .filter_map(|v| v["rate"].as_u64())
        .collect();
    rates.sort_unstable();
    rates.dedup();
    for rate in rates {
        let runs: BTreeMap<u64, &Value> = raw
            .iter()
            .filter(|v| v["workload"] == "B" && v["phase"] == "live" && v["rate"] == rate)
            .filter_map(|v| Some((v["rep"].as_u64()?, &v["data"])))
            .collect();
        let section = format!("B. live {rate}/s");
        let at5k = rate == 5000;
        // 1% of the rate: the slope of a backlog that only fluctuates stays far below.
        let limit = rate as f64 / 100.0;
        let mut add =
            |metric: &str, unit: &'static str, values: Vec<f64>, goal: String, check: Check| {
                rows.push(Row {
                    section: section.clone(),
                    metric: metric.to_string(),
                    unit,
                    values,
                    goal,
                    check,
                })
            };
        add(
            "achieved insert rate (open loop)",
            "ev/s",
            per_rep(&runs, &["rate_achieved"]),
            String::new(),
            Check::Info,
        );
        add(
            "latency insert → JetStream stored, p50",
            "ms",
            per_rep(&runs, &["latency_ms", "p50"]),
            if at5k {
                "≤ 1 ms".into()
            } else {
                String::new()
            },
            if at5k {
                Check::AtMost(1.0)
            } else {
                Check::Info
            },
        );
        add(
            "latency p90",
            "ms",
            per_rep(&runs, &["latency_ms", "p90"]),
            String::new(),
            Check::Info,
        );
        add(
            "latency p99",
            "ms",
            per_rep(&runs, &["latency_ms", "p99"]),
            if at5k {
                "≤ 5 ms".into()
            } else {
                String::new()
            },
            if at5k {
                Check::AtMost(5.0)
            } else {
                Check::Info
            },
        );
        add(
            "latency max",
            "ms",
            per_rep(&runs, &["latency_ms", "max"]),
            String::new(),
            Check::Info,
        );
        add(
            "commit (client-side INSERT round trip), p50",
            "ms",
            per_rep(&runs, &["commit_ms", "p50"]),
            String::new(),
            Check::Info,
        );
        add(
            "commit p99",
            "ms",
            per_rep(&runs, &["commit_ms", "p99"]),
            String::new(),
            Check::Info,
        );
        add(
            "driver lag (release → start of INSERT), p99",
            "ms",
            per_rep(&runs, &["driver_lag_ms", "p99"]),
            String::new(),
            Check::Info,
        );
        // "No backlog growth": the backlog (committed − stored, sampled every second)
        // has no upward trend over the run, and what is left when the last commit
        // returns is the pipeline in flight, delivered within a second. The end sample
        // alone is not the criterion: it lands wherever a burst happens to be.
        let growth = per_rep(&runs, &["undelivered_growth_per_s"]);
        let drain = per_rep(&runs, &["drain_s"]);
        let ok = !growth.is_empty()
            && growth.iter().all(|g| *g <= limit)
            && drain.iter().all(|d| *d <= 1.0);
        add(
            "backlog growth over the run (slope of committed − stored), ev/s",
            "n",
            growth,
            format!("no growth: ≤ {limit:.0} ev/s, rest delivered ≤ 1 s"),
            Check::Fixed(ok),
        );
        add(
            "backlog when the last commit returned (committed − stored)",
            "ev",
            per_rep(&runs, &["undelivered_end"]),
            String::new(),
            Check::Info,
        );
        add(
            "time to deliver that rest",
            "s",
            drain,
            String::new(),
            Check::Info,
        );
        // Issue 19's goals: ≤ 20 µs at live rates up to 2,000/s, ≤ 10 µs from 5,000/s.
        let cpu_goal = if rate >= 5000 { 10.0 } else { 20.0 };
        add(
            "relay CPU per event",
            "µs",
            per_rep(&runs, &["cpu_us_per_event"]),
            format!("≤ {cpu_goal}"),
            Check::AtMost(cpu_goal),
        );
        add(
            "relay context switches per event",
            "n",
            per_rep(&runs, &["ctx_switches_per_event"]),
            String::new(),
            Check::Info,
        );
        add(
            "walsender + nats-server CPU per event",
            "µs",
            runs.values()
                .filter_map(|v| {
                    Some(num(v, &["walsender_us_per_event"])? + num(v, &["nats_us_per_event"])?)
                })
                .collect(),
            String::new(),
            Check::Info,
        );
        add(
            "machine busy (2 cores = 100%)",
            "%",
            per_rep(&runs, &["machine_busy_pct"]),
            String::new(),
            Check::Info,
        );
        // Same run, same rate: a raw async-nats publisher on the relay's runtime flavour,
        // one message per tick, each PubAck awaited: what publishing alone costs a
        // process per message at this rate (its wake-ups), without PostgreSQL's side.
        let paced: BTreeMap<u64, &Value> = raw
            .iter()
            .filter(|v| v["workload"] == "B" && v["phase"] == "paced" && v["rate"] == rate)
            .filter_map(|v| Some((v["rep"].as_u64()?, &v["data"])))
            .collect();
        if !paced.is_empty() {
            add(
                "reference: paced raw publisher CPU per message",
                "µs",
                per_rep(&paced, &["cpu_us_per_event"]),
                String::new(),
                Check::Info,
            );
            add(
                "reference: paced raw publisher context switches per message",
                "n",
                per_rep(&paced, &["ctx_switches_per_event"]),
                String::new(),
                Check::Info,
            );
        }
        let all_ok = runs.values().all(|v| v["ok"] == true) && !runs.is_empty();
        add(
            "exactly once (every seq stored once)",
            "ok",
            vec![if all_ok { 1.0 } else { 0.0 }],
            "all reps ok".into(),
            Check::Fixed(all_ok),
        );
    }
}

fn stats(v: &[f64]) -> (Option<f64>, Option<f64>, Option<f64>) {
    if v.is_empty() {
        return (None, None, None);
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (Some(med), Some(s[0]), Some(s[n - 1]))
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    let Some(v) = v else {
        return "–".into();
    };
    match unit {
        "ev/s" => format!("{} ev/s", thousands(v.round() as i64)),
        "ev" => format!("{}", v.round() as i64),
        "n" => format!("{v:.1}"),
        "ratio" => format!("{v:.2}"),
        "ok" => if v >= 1.0 { "yes" } else { "NO" }.into(),
        "%" => format!("{v:.0}%"),
        "s" => format!("{v:.2} s"),
        "MB" => format!("{v:.1} MB"),
        "µs" => format!("{v:.2} µs"),
        "ms" => format!("{v:.2} ms"),
        _ => format!("{v}"),
    }
}

fn thousands(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}
