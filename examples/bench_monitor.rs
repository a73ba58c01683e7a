//! Benchmark helper: spawn a process (the relay, or `pg_recvlogical` for the decode
//! ceiling), watch it, and print one JSON line with what it cost.
//!
//! ```text
//! bench_monitor --label relay --metrics 127.0.0.1:9187 --target 200000 --terminate \
//!     --postmaster-pid 1234 --nats-pid 5678 -- target/release/outbox-relay --config r.toml run
//! bench_monitor --label decode --until-exit --postmaster-pid 1234 -- pg_recvlogical ...
//! ```
//!
//! - With `--metrics` and `--target`, it polls the relay's `/metrics`
//!   (`outbox_relay_events_published_total`, summed over its label sets) until the counter reaches the target; the
//!   moment it did is interpolated between two polls.
//! - With `--until-exit`, the run ends when the process exits (`pg_recvlogical
//!   --endpos`).
//! - Rates: `rate_stream` (the one the report uses) counts from the moment the walsender
//!   serving the run appears, i.e. the replication connection exists, to the end: the
//!   same clock for `pg_recvlogical` and the relay, process start-up and the relay's
//!   preflight left out for both. `rate_active` counts from the first poll that saw an
//!   event; `rate_wall` from the spawn.
//! - CPU: `utime + stime` from `/proc/<pid>/stat` of the spawned process (all its threads),
//!   from spawn to the end of the run, divided by the events. With `--postmaster-pid`, the
//!   same for the walsender serving the run (a child of that postmaster, found by its
//!   process title), and with `--nats-pid` for nats-server over the same window. Machine
//!   busy time comes from `/proc/stat`; context switches from every thread's
//!   `/proc/<pid>/task/*/status`.
//! - Memory: `VmHWM` (peak RSS) and `VmRSS` from `/proc/<pid>/status`, sampled at every
//!   poll; "steady" is the median `VmRSS` while between 10% and 90% of the events were
//!   done.
//! - `--terminate`: after the run, SIGTERM and wait for the exit (graceful drain).

#[path = "common/procfs.rs"]
mod procfs;
use procfs::{machine_ticks, proc_ctx_switches, proc_mem};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Spawn and watch a process for the benchmark; prints one JSON line")]
struct Args {
    /// Name of this measurement, copied into the output.
    #[arg(long, default_value = "run")]
    label: String,
    /// `host:port` of the relay's HTTP listener (`/metrics`).
    #[arg(long)]
    metrics: Option<String>,
    /// Stop when `outbox_relay_events_published_total` reaches this many.
    #[arg(long)]
    target: Option<u64>,
    /// Stop when the process exits.
    #[arg(long)]
    until_exit: bool,
    /// Events handled by the run when they are not counted by `/metrics`.
    #[arg(long)]
    events: Option<u64>,
    /// Give up after this many seconds (the output then says `"timed_out": true`).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Poll interval in milliseconds.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// PostgreSQL postmaster PID: measure the walsender child that serves the run.
    #[arg(long)]
    postmaster_pid: Option<u32>,
    /// nats-server PID: measure its CPU over the same window.
    #[arg(long)]
    nats_pid: Option<u32>,
    /// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// After the run, SIGTERM the process and wait for it to exit.
    #[arg(long)]
    terminate: bool,
    /// File for the process's stdout and stderr (default: discarded).
    #[arg(long)]
    log: Option<PathBuf>,
    /// The command to run.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("bench_monitor: {e}");
            std::process::exit(1);
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    ticks: u64,
}

struct Sample {
    events: u64,
    rss_kb: u64,
}

fn run(args: &Args) -> Result<serde_json::Value, String> {
    if args.target.is_some() == args.until_exit {
        return Err("give exactly one of --target (with --metrics) or --until-exit".into());
    }
    if args.target.is_some() && args.metrics.is_none() {
        return Err("--target needs --metrics".into());
    }
    let (out, err) = match &args.log {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("open {}: {e}", p.display()))?;
            let f2 = f.try_clone().map_err(|e| e.to_string())?;
            (Stdio::from(f), Stdio::from(f2))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    let machine0 = machine_ticks();
    let nats0 = args.nats_pid.and_then(proc_cpu);
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("NO_COLOR", "1");
    // The relay reads every OUTBOX_RELAY_* variable as a config override.
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOX_RELAY_") {
            cmd.env_remove(k);
        }
    }
    let spawned = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", args.command[0]))?;
    let pid = child.id();

    // A fine tick for the cheap checks (exit, walsender appearing); /proc and /metrics
    // every `interval_ms`.
    let tick = Duration::from_millis(5);
    let interval = Duration::from_millis(args.interval_ms.max(5));
    let deadline = spawned + Duration::from_secs(args.timeout);
    let mut samples: Vec<Sample> = Vec::new();
    let mut last_cpu = Cpu::default();
    let mut ctx_switches = 0u64;
    let mut hwm_kb = 0u64;
    let mut walsender: Option<u32> = None;
    let mut walsender_cpu: Option<Cpu> = None;
    let mut stream_start: Option<f64> = None;
    let mut first: Option<(f64, u64)> = None;
    let mut done_at: Option<f64> = None;
    let mut exit_code: Option<i32> = None;
    let mut timed_out = false;
    let mut prev: Option<(f64, u64)> = None;
    let mut next_sample = spawned;

    loop {
        let now = Instant::now();
        let t = now.duration_since(spawned).as_secs_f64();
        if let Some(pm) = args.postmaster_pid {
            if walsender.is_none() {
                walsender = find_walsender(pm);
                if walsender.is_some() {
                    stream_start = Some(t);
                }
            }
            if let Some(ws) = walsender
                && let Some(c) = proc_cpu(ws)
            {
                walsender_cpu = Some(c);
            }
        }
        if now >= next_sample {
            next_sample = now + interval;
            if let Some(c) = proc_cpu(pid) {
                last_cpu = c;
            }
            if let Some(c) = proc_ctx_switches(pid) {
                ctx_switches = c;
            }
            let (rss, hwm) = proc_mem(pid);
            hwm_kb = hwm_kb.max(hwm);
            let events = match &args.metrics {
                Some(addr) => published(addr).unwrap_or(0),
                None => 0,
            };
            samples.push(Sample {
                events,
                rss_kb: rss,
            });
            if events > 0 && first.is_none() {
                first = Some((t, events));
            }
            if let Some(target) = args.target
                && events >= target
            {
                // Interpolate the moment the target was reached between the two polls.
                let at = match prev {
                    Some((pt, pe)) if events > pe => {
                        pt + (t - pt) * ((target - pe) as f64 / (events - pe) as f64)
                    }
                    _ => t,
                };
                done_at = Some(at);
                break;
            }
            prev = Some((t, events));
        }
        if let Ok(Some(status)) = child.try_wait() {
            exit_code = status.code();
            if args.until_exit {
                done_at = Some(t);
            }
            break;
        }
        if now >= deadline {
            timed_out = true;
            break;
        }
        std::thread::sleep(tick);
    }
    let end = Instant::now();
    let window = end.duration_since(spawned).as_secs_f64();
    let machine1 = machine_ticks();
    let nats1 = args.nats_pid.and_then(proc_cpu);
    let (rss_end, hwm_end) = proc_mem(pid);
    hwm_kb = hwm_kb.max(hwm_end);

    let mut stop_s = None;
    if args.terminate && exit_code.is_none() {
        let t0 = Instant::now();
        exit_code = terminate(&mut child, Duration::from_secs(60));
        stop_s = Some(t0.elapsed().as_secs_f64());
    } else if exit_code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }

    let events = args
        .target
        .or(args.events)
        .unwrap_or_else(|| samples.last().map(|s| s.events).unwrap_or(0));
    let tck = args.clk_tck as f64;
    let per_event = |ticks: u64| {
        if events == 0 {
            serde_json::Value::Null
        } else {
            json!(ticks as f64 / tck * 1e6 / events as f64)
        }
    };
    let rate_active = match (first, done_at, args.target) {
        (Some((t0, e0)), Some(t1), Some(target)) if t1 > t0 && target > e0 => {
            json!((target - e0) as f64 / (t1 - t0))
        }
        _ => serde_json::Value::Null,
    };
    // From the moment the replication connection exists (its walsender appeared) to the
    // end: the same clock for pg_recvlogical and the relay, start-up excluded for both.
    let rate_stream = match (stream_start, done_at) {
        (Some(t0), Some(t1)) if t1 > t0 && events > 0 => json!(events as f64 / (t1 - t0)),
        _ => serde_json::Value::Null,
    };
    let rate_wall = match done_at {
        Some(t) if t > 0.0 && events > 0 => json!(events as f64 / t),
        _ => serde_json::Value::Null,
    };
    // Steady-state RSS: median while between 10% and 90% of the events were done.
    let steady = if let Some(target) = args.target {
        let mut v: Vec<u64> = samples
            .iter()
            .filter(|s| s.events * 10 >= target && s.events * 10 <= target * 9 && s.rss_kb > 0)
            .map(|s| s.rss_kb)
            .collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    } else {
        None
    };
    let rss_max = samples.iter().map(|s| s.rss_kb).max().unwrap_or(0);
    let (machine_busy, machine_total) = match (machine0, machine1) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0, t1 - t0),
        _ => (0, 0),
    };
    let nats_ticks = match (nats0, nats1) {
        (Some(a), Some(b)) => Some(b.ticks.saturating_sub(a.ticks)),
        _ => None,
    };
    Ok(json!({
        "label": args.label,
        "events": events,
        "timed_out": timed_out,
        "exit_code": exit_code,
        "wall_s": done_at,
        "first_event_s": first.map(|f| f.0),
        "rate_stream": rate_stream,
        "rate_active": rate_active,
        "stream_start_s": stream_start,
        "rate_wall": rate_wall,
        "window_s": window,
        "stop_s": stop_s,
        "cpu_s": last_cpu.ticks as f64 / tck,
        "cpu_us_per_event": per_event(last_cpu.ticks),
        "ctx_switches": ctx_switches,
        "ctx_switches_per_event": if events > 0 { json!(ctx_switches as f64 / events as f64) } else { serde_json::Value::Null },
        "vm_hwm_kb": hwm_kb,
        "vm_rss_end_kb": rss_end,
        "rss_steady_kb": steady,
        "rss_max_sampled_kb": rss_max,
        "walsender_pid": walsender,
        "walsender_cpu_s": walsender_cpu.map(|c| c.ticks as f64 / tck),
        "walsender_us_per_event": walsender_cpu.map(|c| per_event(c.ticks)),
        "nats_cpu_s": nats_ticks.map(|t| t as f64 / tck),
        "nats_us_per_event": nats_ticks.map(per_event),
        "machine_busy_pct": if machine_total > 0 {
            json!(100.0 * machine_busy as f64 / machine_total as f64)
        } else {
            serde_json::Value::Null
        },
        "samples": samples.len(),
    }))
}

/// SIGTERM, then wait up to `limit` (SIGKILL after that). Exit code, if any.
fn terminate(child: &mut Child, limit: Duration) -> Option<i32> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let t0 = Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s.code();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            return child.wait().ok().and_then(|s| s.code());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `utime + stime` of a process (all threads), in clock ticks.
fn proc_cpu(pid: u32) -> Option<Cpu> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(3) ppid(4) ... utime(14) stime(15), 1-based.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(Cpu {
        ticks: utime + stime,
    })
}

/// A child of `postmaster` whose process title says it is a walsender.
fn find_walsender(postmaster: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains("walsender")
        })
}

/// `outbox_relay_events_published_total` from the relay's `/metrics`.
fn published(addr: &str) -> Option<u64> {
    let sock = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    // The sum over every series: the counter may carry labels (stream, subject, tenant).
    let mut total = None;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("outbox_relay_events_published_total") else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *total.get_or_insert(0u64) += v as u64;
        }
    }
    total
}
