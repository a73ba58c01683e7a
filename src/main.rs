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
}

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
    let result = app::run(cfg, health, stop_rx, opts).await;
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
