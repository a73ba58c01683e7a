//! The `check` and `status` commands: read-only reports on both ends.

use serde::Serialize;

use crate::config::Config;
use crate::error::Result;
use crate::sink;
use crate::source::admin;

/// `check`: every problem with config and environment, each with its fix, and notes
/// on server settings.
pub async fn check(cfg: &Config) -> (Vec<admin::Problem>, Vec<String>) {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let rules = match cfg.routing.load_rules() {
        Ok(rules) => rules,
        Err(e) => {
            problems.push(problem(&e.message, e.hint.as_deref()));
            None
        }
    };
    let max_delay = rules.as_ref().map_or(0, |r| r.max_delay_seconds());
    match admin::connect(cfg).await {
        Ok(client) => {
            match admin::environment_problems(&client, cfg).await {
                Ok(p) => problems.extend(p),
                Err(e) => problems.push(problem(&e.message, e.hint.as_deref())),
            }
            match admin::settings_summary(&client).await {
                Ok(n) => notes.extend(n),
                Err(e) => problems.push(problem(&e.message, e.hint.as_deref())),
            }
            match admin::setting_notes(&client, cfg).await {
                Ok(n) => notes.extend(n),
                Err(e) => problems.push(problem(&e.message, e.hint.as_deref())),
            }
        }
        Err(e) => problems.push(problem(&e.message, e.hint.as_deref())),
    }
    match sink::connect(cfg).await {
        Ok(client) => {
            let version = client.server_info().version;
            if max_delay > 0 && !sink::schedule::supported(&version) {
                let e = sink::schedule::unsupported(&version, max_delay);
                problems.push(problem(&e.message, e.hint.as_deref()));
            }
            let js = sink::jetstream(client, cfg);
            // Listing streams needs JetStream and, unlike account info, parses on 2.9.
            let probe = futures::StreamExt::next(&mut js.stream_names()).await;
            if let Some(Err(e)) = probe {
                problems.push(problem(
                    &format!("nats at {} has no jetstream: {e}", cfg.nats.url.redacted()),
                    Some("start nats-server with -js (JetStream enabled)"),
                ));
            } else {
                if let Err(e) = slot_guard(cfg, &js).await {
                    problems.push(problem(&e.message, e.hint.as_deref()));
                }
                let partitions = crate::route::Template::parse(&cfg.routing.subject)
                    .ok()
                    .and_then(|t| t.partitions());
                if let Ok(origin) = crate::app::origin(cfg)
                    && let Ok(Some(r)) =
                        crate::checkpoint::Checkpoint::peek(&js, &cfg.checkpoint.bucket, &origin)
                            .await
                    && r.partitions.is_some()
                    && r.partitions != partitions
                {
                    notes.push(partitions_changed(r.partitions, partitions));
                }
                match sink::streams::StreamIndex::load(&js, sink::streams::reach(cfg)).await {
                    Ok(index) => {
                        capture_problems(cfg, &index, &mut problems, &mut notes);
                        if let Some(rules) = &rules {
                            schedule_problems(cfg, rules, &index, &mut problems);
                        }
                    }
                    Err(e) => problems.push(problem(&e.message, e.hint.as_deref())),
                }
            }
        }
        Err(e) => problems.push(problem(&e.message, e.hint.as_deref())),
    }
    // A note, not a problem: an unreachable collector loses spans, never events.
    notes.extend(crate::telemetry::check_note(&cfg.telemetry).await);
    (problems, notes)
}

/// What a change of `{partition:N}` between runs does, for `check` and `run`.
pub fn partitions_changed(before: Option<u32>, now: Option<u32>) -> String {
    let count =
        |n: Option<u32>| n.map_or("no partition".to_string(), |n| format!("{n} partitions"));
    format!(
        "routing.subject changed from {} to {}: aggregates move to other partition subjects, \
         so a consumer per partition may see an aggregate's later events before its earlier ones \
         still queued on the old partition; drain the consumers before the change",
        count(before),
        count(now)
    )
}

/// Would `run` stream from this slot? The checkpoint against the server (another
/// cluster?) and the slot (missing after delivery, or started after the checkpoint:
/// a gap). The same decision `run` makes ([`crate::resume::plan`]).
pub async fn slot_guard(cfg: &Config, js: &async_nats::jetstream::Context) -> Result<()> {
    let origin = crate::app::origin(cfg)?;
    let Some(record) =
        crate::checkpoint::Checkpoint::peek(js, &cfg.checkpoint.bucket, &origin).await?
    else {
        return Ok(());
    };
    let server = crate::source::Stream::identify(cfg, record.timeline).await?;
    let client = admin::connect(cfg).await?;
    let slot_confirmed = admin::slot_info(&client, &cfg.postgres.slot)
        .await?
        .map(|s| {
            s.confirmed_flush_lsn
                .as_deref()
                .and_then(crate::checkpoint::parse_lsn)
        });
    crate::resume::plan(&crate::resume::Facts {
        checkpoint: &record,
        confirmed: 0,
        server: &server,
        slot_confirmed,
        accept_gap: false,
        slot: &cfg.postgres.slot,
        bucket: &cfg.checkpoint.bucket,
    })
    .map(|_| ())
}

/// `migrate` creates the slot only where that skips nothing: never where a checkpoint
/// says this relay already delivered from a slot that is gone (docker-compose runs
/// `migrate` on every `up`; a silently recreated slot lost every event committed while
/// there was none). NATS unreachable: the slot is created, and `run` refuses the gap.
pub async fn may_create_slot(cfg: &Config) -> Result<()> {
    let origin = crate::app::origin(cfg)?;
    let connect = tokio::time::timeout(std::time::Duration::from_secs(5), sink::connect(cfg));
    let Ok(Ok(client)) = connect.await else {
        return Ok(());
    };
    let js = sink::jetstream(client, cfg);
    let record = crate::checkpoint::Checkpoint::peek(&js, &cfg.checkpoint.bucket, &origin)
        .await
        .ok()
        .flatten();
    match record {
        Some(r) if r.lsn > 0 => Err(crate::resume::missing_slot(&cfg.postgres.slot, r.lsn)
            .context("migrate: replication slot not created")),
        _ => Ok(()),
    }
}

/// Does a `[[streams]]` entry (created at `run`) capture `subject`?
/// Is every subject routing can produce captured by a stream (existing, or declared in
/// `[[streams]]` and created at start)? Partly captured is a note: the rest would be
/// dead-lettered; not captured at all is a problem.
fn capture_problems(
    cfg: &Config,
    index: &sink::streams::StreamIndex,
    problems: &mut Vec<admin::Problem>,
    notes: &mut Vec<String>,
) {
    use sink::streams::{pattern_covers, patterns_overlap, template_pattern};
    let filters: Vec<&str> = index
        .filters()
        .iter()
        .map(|(f, _)| f.as_str())
        .chain(
            cfg.streams
                .iter()
                .flat_map(|s| s.subjects.iter().map(String::as_str)),
        )
        .collect();
    let patterns = [
        ("routing.subject", template_pattern(&cfg.routing.subject)),
        (
            "routing.dead_letter_prefix",
            format!("{}.>", cfg.routing.dead_letter_prefix),
        ),
    ];
    for (key, pattern) in patterns {
        if filters.iter().any(|f| pattern_covers(f, &pattern)) {
            continue;
        }
        let partly: Vec<&str> = filters
            .iter()
            .copied()
            .filter(|f| patterns_overlap(f, &pattern))
            .collect();
        if partly.is_empty() {
            problems.push(problem(
                &format!("no jetstream stream captures {pattern} ({key})"),
                Some("create a stream for it, or declare one in [[streams]] (the relay creates it at start)"),
            ));
        } else {
            notes.push(format!(
                "subjects {pattern} ({key}) are only partly captured, by {}: events routed elsewhere go to the dead-letter subject",
                partly.join(", ")
            ));
        }
    }
}

/// A delayed target can reach a stream that will not hold its schedule definitions: one
/// not in `[[streams]]` (the relay sets up only those) that lacks `allow_msg_schedules`
/// or the schedule namespace. Its delayed copies would be dead-lettered.
fn schedule_problems(
    cfg: &Config,
    rules: &crate::route::rules::Rules,
    index: &sink::streams::StreamIndex,
    problems: &mut Vec<admin::Problem>,
) {
    use sink::streams::{patterns_overlap, template_pattern};
    let prefix = &cfg.routing.schedule_prefix;
    for (target, subject, delay) in rules.delayed_targets() {
        let pattern = template_pattern(subject);
        let mut streams: Vec<&str> = index
            .filters()
            .iter()
            .filter(|(f, _)| patterns_overlap(f, &pattern))
            .map(|(_, name)| name.as_str())
            .collect();
        streams.dedup();
        for stream in streams {
            if let Some(limit) = index.schedule_limit(stream, delay) {
                problems.push(problem(
                    &format!("{target} (delay_seconds {delay}) can route to stream {stream}: {limit}"),
                    Some("give delayed targets a limits-retention stream whose max_age exceeds the delay"),
                ));
                continue;
            }
            // `[[streams]]` entries get schedules at start.
            if cfg.streams.iter().any(|s| s.name == stream) {
                continue;
            }
            if !index.holds_schedules(stream, prefix) {
                let filter = sink::schedule::stream_filter(prefix, stream);
                problems.push(problem(
                    &format!(
                        "{target} (delay_seconds) can route to stream {stream}, which cannot hold \
                         schedule definitions: it needs allow_msg_schedules and the subjects {filter}"
                    ),
                    Some(&format!(
                        "declare stream {stream} in [[streams]] (the relay then sets both), or set them \
                         on the stream yourself; until then its delayed copies are dead-lettered"
                    )),
                ));
            }
        }
    }
}

fn problem(what: &str, fix: Option<&str>) -> admin::Problem {
    admin::Problem::new(what, fix.unwrap_or(""))
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub slot: String,
    pub slot_exists: bool,
    pub slot_info: Option<admin::SlotInfo>,
    pub publication: String,
    pub table: String,
    pub postgres: String,
    pub nats: String,
    /// This source's name in message headers and the checkpoint key.
    pub origin: String,
    /// Position persisted in the checkpoint bucket.
    pub checkpoint: Option<String>,
    /// What the running relay's `/readyz` says (`http.listen`): "ready", or why not,
    /// which carries its last error. `None` when it does not answer.
    pub relay: Option<String>,
    /// The running relay's last error, even if it recovered since, with its age
    /// (`/status` on `http.listen`).
    pub last_error: Option<String>,
    pub streams: Vec<StreamStatus>,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub subjects: Vec<String>,
    pub messages: u64,
    pub last_sequence: u64,
    /// Position (`lsn.index`) of the last message this source published to the stream.
    pub last_published: Option<String>,
}

/// `status`: slot position and lag, streams. Never prints a secret: URLs are redacted.
pub async fn status(cfg: &Config) -> Result<Status> {
    let mut st = Status {
        slot: cfg.postgres.slot.clone(),
        slot_exists: false,
        slot_info: None,
        publication: cfg.postgres.publication.clone(),
        table: cfg.outbox.table.clone(),
        postgres: cfg.postgres.url.redacted(),
        nats: cfg.nats.url.redacted(),
        origin: crate::app::origin(cfg)?,
        checkpoint: None,
        relay: relay_get(&cfg.http.listen, "/readyz").await,
        last_error: relay_last_error(&cfg.http.listen).await,
        streams: Vec::new(),
        errors: Vec::new(),
    };
    match admin::connect(cfg).await {
        Ok(client) => match admin::slot_info(&client, &cfg.postgres.slot).await {
            Ok(info) => {
                st.slot_exists = info.is_some();
                st.slot_info = info;
            }
            Err(e) => st.errors.push(e.message),
        },
        Err(e) => st.errors.push(e.message),
    }
    match sink::connect(cfg).await {
        Ok(client) => {
            let js = sink::jetstream(client, cfg);
            let mut names: Vec<String> = cfg.streams.iter().map(|s| s.name.clone()).collect();
            match crate::checkpoint::Checkpoint::peek(&js, &cfg.checkpoint.bucket, &st.origin).await
            {
                Ok(c) => {
                    st.checkpoint = c.as_ref().map(|r| crate::route::format_lsn(r.lsn));
                    for n in c.into_iter().flat_map(|r| r.streams) {
                        if !names.contains(&n) {
                            names.push(n);
                        }
                    }
                }
                Err(e) => st.errors.push(e.message),
            }
            for subject in [sink::streams::probe_subject(&cfg.routing.subject)] {
                if let Ok(Some(n)) = sink::streams::stream_for(&js, &subject).await
                    && !names.contains(&n)
                {
                    names.push(n);
                }
            }
            for name in names {
                match js.get_stream(&name).await {
                    Ok(mut s) => match s.info().await {
                        Ok(info) => st.streams.push(StreamStatus {
                            last_published: crate::checkpoint::last_published(
                                &js, &name, &st.origin,
                            )
                            .await
                            .map(|p| {
                                format!("{}.{}", crate::route::format_lsn(p.commit_lsn), p.index)
                            }),
                            name,
                            subjects: info.config.subjects.clone(),
                            messages: info.state.messages,
                            last_sequence: info.state.last_sequence,
                        }),
                        Err(e) => st.errors.push(format!("stream {name}: {e}")),
                    },
                    Err(e) => st.errors.push(format!("stream {name}: {e}")),
                }
            }
        }
        Err(e) => st.errors.push(e.message),
    }
    Ok(st)
}

/// The last error the running relay saw, from its `/status`.
async fn relay_last_error(listen: &str) -> Option<String> {
    let body = relay_get(listen, "/status").await?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let e = v.get("last_error")?.as_str()?;
    let age = v.get("last_error_age_seconds").and_then(|a| a.as_u64());
    Some(match age {
        Some(a) => format!("{e} ({a} s ago)"),
        None => e.to_string(),
    })
}

/// `GET path` of a relay listening on `listen` (plain HTTP/1.0, bounded by a
/// timeout): the body, trimmed, or `None`.
async fn relay_get(listen: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if listen.is_empty() {
        return None;
    }
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(listen).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        buf.split_once("\r\n\r\n")
            .map(|(_, body)| body.trim().to_string())
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
}

pub fn print_status(st: &Status) {
    println!("postgres     {}", st.postgres);
    println!("nats         {}", st.nats);
    println!("table        {} (publication {})", st.table, st.publication);
    match &st.slot_info {
        Some(s) => {
            println!(
                "slot         {} ({})",
                st.slot,
                match s.active_pid {
                    Some(pid) => format!("active, pid {pid}"),
                    None => "inactive".into(),
                }
            );
            println!(
                "confirmed    {}   current {}   lag {} bytes, {} s   wal_status {}",
                s.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                s.current_lsn.as_deref().unwrap_or("-"),
                s.lag_bytes.map_or("-".into(), |l| l.to_string()),
                s.lag_seconds.map_or("0".into(), |l| format!("{l:.3}")),
                s.wal_status.as_deref().unwrap_or("-")
            );
        }
        None => println!("slot         {} (missing: `run` creates it)", st.slot),
    }
    println!(
        "relay        {}",
        st.relay
            .as_deref()
            .unwrap_or("not answering on http.listen")
    );
    if let Some(e) = &st.last_error {
        println!("last error   {e}");
    }
    println!(
        "checkpoint   {} (origin {})",
        st.checkpoint.as_deref().unwrap_or("none"),
        st.origin
    );
    for s in &st.streams {
        println!(
            "stream       {} {:?}: {} messages, last seq {}, last published here {}",
            s.name,
            s.subjects,
            s.messages,
            s.last_sequence,
            s.last_published.as_deref().unwrap_or("-")
        );
    }
    for e in &st.errors {
        println!("error        {e}");
    }
}

/// One dead letter for `dlq list`.
#[derive(Debug, serde::Serialize)]
pub struct DeadLetterEntry {
    #[serde(flatten)]
    pub letter: crate::audit::DeadLetter,
    /// Its copy is stored in a stream by now (redriven or filled).
    pub redriven: bool,
    /// Seconds since it was stored.
    pub age_seconds: i64,
}

/// `dlq list`: this origin's dead letters, oldest first.
pub async fn dlq_list(cfg: &Config) -> Result<Vec<DeadLetterEntry>> {
    let audit = crate::audit::Audit::connect(cfg).await?;
    let stored = audit.stored(|_| {}).await?;
    let now = (crate::metrics::now_ms() / 1000) as i64;
    Ok(stored
        .dead_letters()
        .into_iter()
        .map(|(d, redriven)| DeadLetterEntry {
            letter: d.clone(),
            redriven,
            age_seconds: (now - d.stored_at).max(0),
        })
        .collect())
}

pub fn print_dlq(list: &[DeadLetterEntry]) {
    if list.is_empty() {
        println!("no dead letters");
        return;
    }
    for e in list {
        let age = humantime::format_duration(std::time::Duration::from_secs(e.age_seconds as u64));
        println!(
            "{} {}#{} {} -> {} ({} ago){}\n    reason: {}",
            e.letter.event_id,
            e.letter.stream,
            e.letter.seq,
            e.letter.msg_id,
            e.letter.subject,
            age,
            if e.redriven { " [redriven]" } else { "" },
            e.letter.reason
        );
    }
    let open = list.iter().filter(|e| !e.redriven).count();
    println!(
        "{} dead letters, {open} not redriven: `outbox-relay dlq redrive --ids <id>` (or --reason TEXT, --all) sends them again",
        list.len()
    );
}

/// `dlq show ID`: the dead letters of a row id or message id, with headers and payload.
pub async fn dlq_show(cfg: &Config, id: &str) -> Result<String> {
    let audit = crate::audit::Audit::connect(cfg).await?;
    let stored = audit.stored(|_| {}).await?;
    let mut out = String::new();
    for (d, redriven) in stored.dead_letters() {
        if d.event_id != id && d.msg_id != id {
            continue;
        }
        let stream = audit
            .js
            .get_stream(&d.stream)
            .await
            .map_err(|e| crate::error::Error::transient(format!("stream {}: {e}", d.stream)))?;
        let msg = stream.get_raw_message(d.seq).await.map_err(|e| {
            crate::error::Error::transient(format!("dead letter {}#{}: {e}", d.stream, d.seq))
        })?;
        out.push_str(&format!(
            "{}#{} subject {}{}\n",
            d.stream,
            d.seq,
            msg.subject,
            if redriven { " [redriven]" } else { "" }
        ));
        for (name, values) in msg.headers.iter() {
            for v in values {
                out.push_str(&format!("  {name}: {}\n", v.as_str()));
            }
        }
        let shown = &msg.payload[..msg.payload.len().min(64 * 1024)];
        out.push_str(&format!(
            "  payload ({} bytes): {}\n",
            msg.payload.len(),
            String::from_utf8_lossy(shown)
        ));
    }
    if out.is_empty() {
        return Err(crate::error::Error::fatal(format!(
            "no dead letter of row or message id {id}"
        ))
        .hint("`outbox-relay dlq list` lists them"));
    }
    Ok(out)
}
