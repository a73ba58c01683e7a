//! CLI only: parse arguments, load config, set up logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use outbox_relay::config::Config;
use outbox_relay::error::Error;
use outbox_relay::{app, cli, http, metrics::Health, source::admin};

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Streams PostgreSQL outbox INSERTs to NATS JetStream, exactly once"
)]
struct Args {
    /// TOML config file; every key can also be set as OUTBOX_RELAY_<SECTION>_<KEY>.
    #[arg(long, short, env = "OUTBOX_RELAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream events (creates the replication slot if missing).
    Run {
        /// Decode and route only: publish nothing, confirm nothing (benchmarking).
        #[arg(long)]
        null_sink: bool,
        /// Stream from a slot that starts after this relay's checkpoint (it was dropped
        /// and recreated): the events committed in between are given up on here, to be
        /// refilled from the outbox table. Logged and counted; applies to this gap only.
        #[arg(long)]
        accept_slot_gap: bool,
    },
    /// Create the outbox table, its indexes and the publication (idempotent).
    Migrate,
    /// Validate config and environment; list every problem with its fix.
    Check,
    /// Slot position and lag, streams.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Compare the outbox rows with what the streams hold, row by row: delivered once,
    /// missing, duplicated, out of order, dead-lettered, in flight. Exit status 1 when
    /// anything is missing or duplicated, 2 when the audit could not run.
    Audit {
        #[command(flatten)]
        select: Select,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send outbox rows again through the same routing: by default only what `audit`
    /// finds missing, under the original message id (exactly once).
    Replay {
        #[command(flatten)]
        select: Select,
        /// Send every selected row again under a new message id `<id>:replay:<run>`,
        /// instead of only the missing ones (for consumers that rebuild state).
        #[arg(long, conflicts_with = "fill")]
        redeliver: bool,
        /// Only what the audit finds missing, with its original message id (default).
        #[arg(long)]
        fill: bool,
        /// Messages per second at most (0: no limit).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Print what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Dead letters of this relay: list them, show one, or send them again.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Every dead letter with its reason and age, and whether it was redriven since.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One dead letter (by row id or message id): headers and payload.
    Show { id: String },
    /// Send dead-lettered events again, from the outbox table, to where the routing
    /// sends them now, once; one refused again stays a dead letter with the new reason.
    Redrive {
        /// Only these row ids (comma-separated).
        #[arg(long, value_delimiter = ',', required_unless_present_any = ["reason", "all"])]
        ids: Vec<String>,
        /// Only dead letters whose reason contains this text.
        #[arg(long)]
        reason: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Messages per second at most (0: no limit).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Print what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which outbox rows `audit` and `replay` look at.
#[derive(clap::Args)]
struct Select {
    /// Rows created at or after this time (`created_at`; any timestamp PostgreSQL reads).
    #[arg(long)]
    since: Option<String>,
    /// Rows created before this time.
    #[arg(long)]
    until: Option<String>,
    /// Only this tenant's rows.
    #[arg(long)]
    tenant: Option<String>,
    /// Only this aggregate type.
    #[arg(long)]
    aggregate: Option<String>,
    /// Only this event topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only these row ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    ids: Vec<String>,
    /// How long to wait for the relay to confirm past the snapshot before rows not
    /// found count as in flight rather than missing.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    wait: std::time::Duration,
}

impl Select {
    fn window(&self) -> outbox_relay::audit::Window {
        outbox_relay::audit::Window {
            since: self.since.clone(),
            until: self.until.clone(),
            tenant: self.tenant.clone(),
            ids: self.ids.clone(),
            aggregate: self.aggregate.clone(),
            topic: self.topic.clone(),
        }
    }
}

/// mimalloc: see `Cargo.toml` for the measurement behind it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    outbox_relay::install_tls_provider();
    let args = Args::parse();
    let cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    init_tracing(&cfg, matches!(args.command, Command::Run { .. }));
    // One thread: the relay is one loop plus a few small tasks, and cross-thread
    // hand-offs cost more than a second worker gives (measured: -36% CPU per event,
    // context switches per event 9.1 -> 2.2; docs/benchmarks.md). nats-server and
    // PostgreSQL want the other cores.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(&Error::fatal(format!(
                "cannot start the async runtime: {e}"
            )));
        }
    };
    rt.block_on(async move {
        match args.command {
            Command::Run {
                null_sink,
                accept_slot_gap,
            } => {
                let opts = app::RunOptions {
                    null_sink,
                    accept_slot_gap,
                };
                run(cfg, opts).await
            }
            Command::Migrate => migrate(cfg).await,
            Command::Check => check(cfg).await,
            Command::Status { json } => status(cfg, json).await,
            Command::Audit { select, json } => audit(cfg, &select, json).await,
            Command::Replay {
                select,
                redeliver,
                fill: _,
                rate,
                dry_run,
            } => {
                let opts = outbox_relay::replay::Options {
                    mode: if redeliver {
                        outbox_relay::replay::Mode::Redeliver
                    } else {
                        outbox_relay::replay::Mode::Fill
                    },
                    window: select.window(),
                    rate,
                    dry_run,
                    wait: select.wait,
                };
                replay(cfg, &opts).await
            }
            Command::Dlq { command } => dlq(cfg, command).await,
        }
    })
}

fn fail(e: &Error) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

/// `run` logs at `log.level`; the one-shot commands print their report and log only
/// warnings, so library chatter does not bury the answer.
fn init_tracing(cfg: &Config, long_running: bool) {
    use std::io::IsTerminal;
    let level = if long_running {
        cfg.log.level.as_str()
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cfg: Config, opts: app::RunOptions) -> ExitCode {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: draining in-flight events");
        let _ = stop_tx.send(true);
    });
    let health = Arc::new(Health::default());
    health.set_stall_after(cfg.monitor.stall_after);
    let http_task = if cfg.http.listen.is_empty() {
        None
    } else {
        let addr = match cfg.http.listen.parse() {
            Ok(a) => a,
            Err(e) => return fail(&Error::fatal(format!("config key http.listen: {e}"))),
        };
        match http::serve(addr, health.clone(), stop_rx.clone()).await {
            Ok(t) => Some(t),
            Err(e) => return fail(&e),
        }
    };
    // A spawned task, not the `block_on` future itself: tokio's current-thread scheduler
    // answers every wake of the `block_on` future with an extra non-blocking
    // `epoll_wait` before polling it, which was two syscalls per event at live rates.
    let result = match tokio::spawn(app::run(cfg, health, stop_rx, opts)).await {
        Ok(result) => result,
        Err(e) => Err(Error::fatal(format!(
            "the session task ended abnormally: {e}"
        ))),
    };
    if let Some(t) = http_task {
        t.abort();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e.message, hint = e.hint.as_deref().unwrap_or(""), "stopped");
            fail(&e)
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn migrate(cfg: Config) -> ExitCode {
    let mut client = match admin::connect(&cfg).await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let slot_missing = matches!(
        admin::slot_info(&client, &cfg.postgres.slot).await,
        Ok(None)
    );
    if slot_missing && let Err(e) = cli::may_create_slot(&cfg).await {
        return fail(&e);
    }
    match admin::migrate(&mut client, &cfg).await {
        Ok(done) => {
            for line in done {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

async fn check(cfg: Config) -> ExitCode {
    let (problems, notes) = cli::check(&cfg).await;
    for n in &notes {
        println!("note: {n}");
    }
    if problems.is_empty() {
        println!("ok: config valid, postgresql and nats ready for outbox-relay");
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        println!("problem: {}", p.what);
        if !p.fix.is_empty() {
            println!("    fix: {}", p.fix);
        }
    }
    eprintln!("error: {} problem(s) found", problems.len());
    ExitCode::FAILURE
}

async fn status(cfg: Config, json: bool) -> ExitCode {
    match cli::status(&cfg).await {
        Ok(st) => {
            if json {
                match serde_json::to_string_pretty(&st) {
                    Ok(s) => println!("{s}"),
                    Err(e) => return fail(&Error::fatal(format!("status: {e}"))),
                }
            } else {
                cli::print_status(&st);
            }
            if st.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(&e),
    }
}

/// Progress on stderr: one line rewritten in place on a terminal, a plain line every
/// 100,000 otherwise (the report on stdout is what scripts read).
fn progress() -> impl FnMut(&str, u64) {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut last = 0u64;
    move |what: &str, n: u64| {
        if tty {
            eprint!("\r{what}: {n}        ");
            let _ = std::io::stderr().flush();
        } else if n / 100_000 > last / 100_000 {
            eprintln!("{what}: {n}");
        }
        last = n;
    }
}

async fn audit(cfg: Config, select: &Select, json: bool) -> ExitCode {
    let report = match outbox_relay::audit::Audit::connect(&cfg).await {
        Ok(mut a) => {
            a.run(&select.window(), select.wait, |_, _| {}, progress())
                .await
        }
        Err(e) => Err(e),
    };
    match report {
        Ok(r) => {
            if json {
                match serde_json::to_string_pretty(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => return fail_with(&Error::fatal(format!("audit: {e}")), 2),
                }
            } else {
                eprintln!();
                print!("{}", r.text());
            }
            if r.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail_with(&e, 2),
    }
}

async fn dlq(cfg: Config, command: DlqCommand) -> ExitCode {
    use outbox_relay::replay::{Mode, Options};
    match command {
        DlqCommand::List { json } => match cli::dlq_list(&cfg).await {
            Ok(list) => {
                if json {
                    match serde_json::to_string_pretty(&list) {
                        Ok(s) => println!("{s}"),
                        Err(e) => return fail(&Error::fatal(format!("dlq list: {e}"))),
                    }
                } else {
                    cli::print_dlq(&list);
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        DlqCommand::Show { id } => match cli::dlq_show(&cfg, &id).await {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        DlqCommand::Redrive {
            ids,
            reason,
            all: _,
            rate,
            dry_run,
        } => {
            let opts = Options {
                mode: Mode::Redrive { reason },
                window: outbox_relay::audit::Window {
                    ids,
                    ..Default::default()
                },
                rate,
                dry_run,
                wait: std::time::Duration::from_secs(30),
            };
            replay(cfg, &opts).await
        }
    }
}

async fn replay(cfg: Config, opts: &outbox_relay::replay::Options) -> ExitCode {
    match outbox_relay::replay::run(&cfg, opts, progress()).await {
        Ok(o) => {
            eprintln!();
            for line in &o.planned {
                println!("would send: {line}");
            }
            println!(
                "replay {}: {} {} ({} already stored in the duplicate window, {} refused again and dead-lettered), {} in flight left to the relay, {} with no stream",
                o.run,
                o.sent,
                if opts.dry_run { "to send" } else { "sent" },
                o.duplicates,
                o.dead_lettered,
                o.in_flight,
                o.unplaced
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail_with(e: &Error, code: u8) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}
