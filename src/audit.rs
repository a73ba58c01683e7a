//! `outbox-relay audit`: did every outbox row arrive exactly once? The table is the
//! source of truth; the streams are compared with it row by row.
//!
//! Method (docs/operations.md, "After an incident"):
//! 1. One REPEATABLE READ snapshot of the table; `pg_current_wal_lsn()` taken in it is
//!    `S`, above the commit of every row the snapshot sees.
//! 2. The slot's confirmed position `C` is awaited up to `--wait`: once `C >= S`, every
//!    row of the snapshot was delivered or should have been. Rows not found while
//!    `C < S` are *in flight*, not missing (the relay may still deliver them).
//! 3. The streams this relay writes to (the checkpoint's list, `[[streams]]`, the
//!    dead-letter streams: the same set a session reads back) are read from start to
//!    end, keeping this origin's messages: each stream's `Nats-Msg-Id`s as sorted
//!    128-bit keys (16 bytes per message: 10,000,000 messages fit in 160 MB), positions
//!    checked for order on the way, dead letters with their reasons.
//! 4. The snapshot's rows in the window, in one query ordered by `(created_at, id)`, are routed by
//!    the same router as `run` (rules, subject prefix, fan-out): every copy's
//!    `Nats-Msg-Id` is looked up in the stream the index says captures it, else in the
//!    dead letters. Found once: delivered; more than once: duplicated (the dedup
//!    window did not cover it); nowhere: missing (or in flight).
//!
//! What proves "delivered" here is the exact message id of each copy in the stream
//! that captures its subject, from this origin: never a count or a later position.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde::Serialize;

use crate::config::Config;
use crate::decode::OutboxEvent;
use crate::error::{Error, Result};
use crate::route::{Envelope, Router, headers};
use crate::sink::streams::{StreamIndex, patterns_overlap, reach};
use crate::source::admin;

/// How many ids of each kind a report lists (the counts are always complete).
pub const LIST_LIMIT: usize = 20;

/// Which rows to audit.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// `created_at >= since` (a timestamp PostgreSQL understands).
    pub since: Option<String>,
    /// `created_at < until`.
    pub until: Option<String>,
    /// Only this tenant's rows (the mapped `tenant_id` column).
    pub tenant: Option<String>,
    /// Only these row ids.
    pub ids: Vec<String>,
    /// Only this aggregate type (the mapped `aggregate_type` column).
    pub aggregate: Option<String>,
    /// Only this event topic.
    pub topic: Option<String>,
}

/// Ids of one kind: how many, and the first [`LIST_LIMIT`].
#[derive(Debug, Default, Clone, Serialize)]
pub struct Ids {
    pub count: u64,
    pub first: Vec<String>,
}

impl Ids {
    fn add(&mut self, id: &str) {
        self.count += 1;
        if self.first.len() < LIST_LIMIT {
            self.first.push(id.to_string());
        }
    }
}

/// One stream's part of the report.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StreamReport {
    /// Copies routed to this stream and stored exactly once.
    pub delivered_once: u64,
    pub missing: Ids,
    pub in_flight: Ids,
    pub duplicated: Ids,
    /// Messages of this origin whose position is lower than the one before them.
    pub out_of_order: u64,
}

/// The whole report.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub origin: String,
    /// Rows in the window.
    pub rows: u64,
    /// `S`: the snapshot's WAL position.
    pub snapshot_lsn: String,
    /// `C`: the slot's confirmed position when the streams were read (None: no slot).
    pub confirmed_lsn: Option<String>,
    pub streams: BTreeMap<String, StreamReport>,
    /// Dead-lettered copies, by reason.
    pub dead_lettered: BTreeMap<String, Ids>,
    /// Rows the routing sends nowhere (rules with no matching target).
    pub routed_nowhere: Ids,
    /// Copies whose subject no stream captures and that are not in the dead letters
    /// either (a dead-letter stream missing, or the copy lost).
    pub unplaced: Ids,
}

impl Report {
    pub fn missing(&self) -> u64 {
        self.streams.values().map(|s| s.missing.count).sum::<u64>() + self.unplaced.count
    }
    pub fn duplicated(&self) -> u64 {
        self.streams.values().map(|s| s.duplicated.count).sum()
    }
    /// Clean: nothing missing, nothing doubled.
    pub fn clean(&self) -> bool {
        self.missing() == 0 && self.duplicated() == 0
    }

    /// The report for a terminal or a log.
    pub fn text(&self) -> String {
        let mut out = format!(
            "audit of {} rows from {} (snapshot at {}, slot confirmed at {})\n",
            self.rows,
            self.origin,
            self.snapshot_lsn,
            self.confirmed_lsn.as_deref().unwrap_or("- (no slot)")
        );
        let list = |ids: &Ids| {
            let more = ids.count.saturating_sub(ids.first.len() as u64);
            let mut s = ids.first.join(", ");
            if more > 0 {
                s.push_str(&format!(" and {more} more"));
            }
            s
        };
        for (name, s) in &self.streams {
            out.push_str(&format!(
                "stream {name}: {} delivered once, {} missing, {} duplicated, {} in flight, {} out of order\n",
                s.delivered_once, s.missing.count, s.duplicated.count, s.in_flight.count, s.out_of_order
            ));
            for (what, ids) in [
                ("missing", &s.missing),
                ("duplicated", &s.duplicated),
                ("in flight", &s.in_flight),
            ] {
                if ids.count > 0 {
                    out.push_str(&format!("  {what}: {}\n", list(ids)));
                }
            }
        }
        for (reason, ids) in &self.dead_lettered {
            out.push_str(&format!(
                "dead-lettered ({reason}): {}: {}\n",
                ids.count,
                list(ids)
            ));
        }
        if self.routed_nowhere.count > 0 {
            out.push_str(&format!(
                "routed nowhere (no rules target matches): {}: {}\n",
                self.routed_nowhere.count,
                list(&self.routed_nowhere)
            ));
        }
        if self.unplaced.count > 0 {
            out.push_str(&format!(
                "missing, and no stream captures their subject: {}: {}\n",
                self.unplaced.count,
                list(&self.unplaced)
            ));
        }
        out.push_str(&if self.clean() {
            "result: clean: every row in the window arrived exactly once (or is dead-lettered with its reason)\n".to_string()
        } else {
            format!(
                "result: {} missing, {} duplicated: `outbox-relay replay --fill` sends what is missing, once\n",
                self.missing(),
                self.duplicated()
            )
        });
        out
    }
}

/// A message id as 128 bits: a UUID's own value, anything else hashed (two SipHash
/// halves with different keys; a collision could only hide a missing row behind
/// another id, at odds of about n² / 2¹²⁹).
pub fn key(id: &str) -> u128 {
    if let Some(v) = uuid_bits(id) {
        return v;
    }
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        id.hash(&mut h);
        h.finish() as u128
    };
    (half(0x5eed) << 64) | half(0xbeef)
}

/// The 128 bits of a UUID in its text form (`8-4-4-4-12` hex digits), read in place:
/// the audit keys millions of ids, and an allocation each was measurable.
fn uuid_bits(id: &str) -> Option<u128> {
    let b = id.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut v: u128 = 0;
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        v = (v << 4) | u128::from(char::from(c).to_digit(16)?);
    }
    Some(v)
}

/// What the streams hold for this origin.
#[derive(Debug, Default)]
pub struct Stored {
    /// Per stream, its messages' keys, sorted (a key twice: stored twice).
    streams: BTreeMap<String, Vec<u128>>,
    /// Per stream, positions that went backwards.
    out_of_order: BTreeMap<String, u64>,
    /// Dead letters by key (the latest one of a key wins: a redrive refused again).
    dead: HashMap<u128, DeadLetter>,
}

/// One dead letter of this origin.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The row's id (`Outbox-Event-Id`).
    pub event_id: String,
    /// The copy's `Nats-Msg-Id` (or the id a redrive stood for).
    pub msg_id: String,
    /// Where it was going (`Outbox-Dlq-Original-Subject`).
    pub subject: String,
    pub reason: String,
    /// The reason without what differs per event, so reasons group.
    pub kind: String,
    /// JetStream's `err_code` when the server refused it.
    pub error_code: Option<u64>,
    pub stream: String,
    pub seq: u64,
    /// When it was stored, seconds since the Unix epoch.
    pub stored_at: i64,
}

impl Stored {
    /// The dead letters, with whether their copy is stored in a stream by now (redriven).
    pub fn dead_letters(&self) -> Vec<(&DeadLetter, bool)> {
        let mut out: Vec<(&DeadLetter, bool)> = self
            .dead
            .iter()
            .map(|(k, d)| (d, self.streams.keys().any(|s| self.count(s, *k) > 0)))
            .collect();
        out.sort_by(|a, b| (&a.0.stream, a.0.seq).cmp(&(&b.0.stream, b.0.seq)));
        out
    }

    fn count(&self, stream: &str, k: u128) -> usize {
        self.streams.get(stream).map_or(0, |keys| {
            let lo = keys.partition_point(|x| *x < k);
            let hi = keys.partition_point(|x| *x <= k);
            hi - lo
        })
    }
}

/// The streams a session reads back: the checkpoint's list, `[[streams]]`, and every
/// stream capturing the dead-letter subjects.
pub fn streams_written(
    cfg: &Config,
    listed: &BTreeSet<String>,
    index: &StreamIndex,
) -> BTreeSet<String> {
    let mut out = listed.clone();
    out.extend(cfg.streams.iter().map(|s| s.name.clone()));
    let dlq = format!("{}.>", cfg.routing.dead_letter_prefix);
    out.extend(
        index
            .filters()
            .iter()
            .filter(|(f, _)| patterns_overlap(f, &dlq))
            .map(|(_, s)| s.clone()),
    );
    out
}

/// Read every message of `origin` in `streams`.
pub async fn read_streams(
    js: &jetstream::Context,
    streams: &BTreeSet<String>,
    origin: &str,
    dlq_prefix: &str,
    mut progress: impl FnMut(u64),
) -> Result<Stored> {
    let mut stored = Stored::default();
    let dlq = format!("{dlq_prefix}.");
    let mut read = 0u64;
    for name in streams {
        let mut stream = match js.get_stream(name).await {
            Ok(s) => s,
            Err(e) if e.to_string().contains("not found") => continue,
            Err(e) => return Err(Error::transient(format!("stream {name}: {e}"))),
        };
        // Read up to what the stream holds now (the relay may append meanwhile): its
        // message count, or its last sequence when messages were deleted before it.
        let state = &stream
            .info()
            .await
            .map_err(|e| Error::transient(format!("stream {name}: {e}")))?
            .state;
        let (total, count) = (state.last_sequence, state.messages);
        let mut in_stream = 0u64;
        let keys = stored.streams.entry(name.clone()).or_default();
        // Exactly what the stream holds now: a doubling vector would take up to twice
        // the 16 bytes per message (10,000,000 messages: 160 MB, not 268).
        keys.reserve_exact(usize::try_from(count).unwrap_or(0));
        let mut last_pos = None;
        let mut backwards = 0u64;
        if count > 0 {
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    // The audit reads ids and positions, never payloads.
                    headers_only: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::transient(format!("read stream {name}: {e}")))?;
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| Error::transient(format!("read stream {name}: {e}")))?;
            loop {
                let next = tokio::time::timeout(Duration::from_secs(30), messages.next())
                    .await
                    .map_err(|_| {
                        Error::transient(format!("read stream {name}: no message within 30 s"))
                    })?;
                let Some(msg) = next else { break };
                let msg = msg.map_err(|e| Error::transient(format!("read stream {name}: {e}")))?;
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(total);
                read += 1;
                in_stream += 1;
                if read.is_multiple_of(10_000) {
                    progress(read);
                }
                if let Some(h) = &msg.headers
                    && h.get(headers::ORIGIN).is_some_and(|v| v.as_str() == origin)
                    && let Some(id) = h
                        .get(crate::replay::REPLAY_OF)
                        .or_else(|| h.get(headers::MSG_ID))
                {
                    let k = key(id.as_str());
                    if msg.subject.starts_with(&dlq) {
                        let text = |name: &str| h.get(name).map_or("", |v| v.as_str()).to_string();
                        let reason = text(headers::DLQ_REASON);
                        let stored_at = msg.info().map_or(0, |i| i.published.unix_timestamp());
                        stored.dead.insert(
                            k,
                            DeadLetter {
                                // Dead letters carry the event id in every profile;
                                // compact ones written before that did not: the
                                // message id less a fan-out copy's `:<suffix>`.
                                event_id: h.get(headers::EVENT_ID).map_or_else(
                                    || id.as_str().split(':').next().unwrap_or("").to_string(),
                                    |v| v.as_str().to_string(),
                                ),
                                msg_id: id.as_str().to_string(),
                                subject: text(headers::DLQ_SUBJECT),
                                kind: reason_kind(&reason),
                                reason,
                                error_code: text(headers::DLQ_ERROR_CODE).parse().ok(),
                                stream: name.clone(),
                                seq,
                                stored_at,
                            },
                        );
                    } else {
                        keys.push(k);
                        if let (Some(lsn), Some(index)) =
                            (h.get(headers::COMMIT_LSN), h.get(headers::TX_INDEX))
                            && let Some(lsn) = crate::checkpoint::parse_lsn(lsn.as_str())
                            && let Ok(index) = index.as_str().parse::<u32>()
                            && h.get(async_nats::header::NATS_SCHEDULER).is_none()
                        {
                            if last_pos.is_some_and(|p| (lsn, index) < p) {
                                backwards += 1;
                            }
                            last_pos = Some((lsn, index));
                        }
                    }
                }
                if seq >= total || in_stream >= count {
                    break;
                }
            }
        }
        keys.sort_unstable();
        stored.out_of_order.insert(name.clone(), backwards);
    }
    progress(read);
    Ok(stored)
}

/// A dead-letter reason without what differs per event (ids, sizes), so reasons group.
fn reason_kind(reason: &str) -> String {
    let cut = reason.find([':', '(']).unwrap_or(reason.len()).min(80);
    reason[..cut].trim().to_string()
}

/// The SQL of one page of the window: every mapped column as text, after `(created_at,
/// id)` of the previous page. Parameters: $1, $2 the last row's `(created_at, id)`, $3
/// the page size, $4 since, $5 until, $6 tenant, $7 ids, $8 aggregate type, $9 topic
/// (each NULL or empty: no filter).
fn page_sql(cfg: &Config, window: &Window) -> Result<String> {
    let c = &cfg.outbox.columns;
    if c.created_at.is_empty() {
        return Err(
            Error::fatal("audit: the outbox table has no created_at column mapped")
                .hint("set outbox.columns.created_at: the audit pages the table by it"),
        );
    }
    if window.tenant.is_some() && c.tenant_id.is_empty() {
        return Err(Error::fatal("audit: --tenant needs a tenant_id column")
            .hint("set outbox.columns.tenant_id"));
    }
    if window.aggregate.is_some() && c.aggregate_type.is_empty() {
        return Err(
            Error::fatal("audit: --aggregate needs an aggregate_type column")
                .hint("set outbox.columns.aggregate_type"),
        );
    }
    let (schema, table) = cfg.outbox.qualified();
    let table = format!(
        "{}.{}",
        admin::quote_ident(&schema),
        admin::quote_ident(&table)
    );
    let col = |name: &str| {
        if name.is_empty() {
            "NULL::text".to_string()
        } else {
            format!("{}::text", admin::quote_ident(name))
        }
    };
    let created = admin::quote_ident(&c.created_at);
    let id = admin::quote_ident(&c.id);
    let filter = |param: &str, column: &str| {
        if column.is_empty() {
            format!("{param}::text IS NULL")
        } else {
            format!(
                "({param}::text IS NULL OR {}::text = {param}::text)",
                admin::quote_ident(column)
            )
        }
    };
    let tenant = filter("$6", &c.tenant_id);
    let aggregate = filter("$8", &c.aggregate_type);
    let topic = filter("$9", &c.event_topic);
    let cols = [
        &c.id,
        &c.event_topic,
        &c.payload,
        &c.aggregate_type,
        &c.aggregate_id,
        &c.tenant_id,
        &c.source_bc,
        &c.destination_topics,
        &c.schema_id,
        &c.schema_version,
        &c.metadata,
        &c.occurred_at,
        &c.created_at,
        &c.content_type,
    ]
    .map(|n| col(n))
    .join(", ");
    // Whether the payload is bytea, whose text form `event_of` decodes back to bytes.
    let bytea = format!(
        "pg_typeof({}) = 'bytea'::regtype",
        admin::quote_ident(&c.payload)
    );
    Ok(format!(
        "SELECT {cols}, {bytea} FROM {table} \
         WHERE ({created}, {id}::text) > ($1::text::timestamptz, $2::text) \
           AND ($4::text IS NULL OR {created} >= $4::text::timestamptz) \
           AND ($5::text IS NULL OR {created} < $5::text::timestamptz) \
           AND {tenant} AND {aggregate} AND {topic} \
           AND (cardinality($7::text[]) = 0 OR {id}::text = ANY($7::text[])) \
         ORDER BY {created}, {id}::text LIMIT $3::bigint"
    ))
}

/// The parameters of [`page_sql`]: after `(created_at, id)`, at most `limit` rows.
fn page_params<'a>(
    window: &'a Window,
    after: &'a (String, String),
    limit: &'a i64,
) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 9] {
    [
        &after.0,
        &after.1,
        limit,
        &window.since,
        &window.until,
        &window.tenant,
        &window.ids,
        &window.aggregate,
        &window.topic,
    ]
}

fn event_of(row: &tokio_postgres::Row) -> OutboxEvent {
    let get = |i: usize| -> Option<bytes::Bytes> {
        row.get::<_, Option<String>>(i).map(bytes::Bytes::from)
    };
    let mut payload = get(2).unwrap_or_default();
    // The same bytes the relay published (`RowMapping::event`); text that is not bytea
    // cannot come from PostgreSQL, and is left as it is.
    if row.get::<_, Option<bool>>(14) == Some(true)
        && let Ok(bytes) = crate::decode::bytea::decode(&payload)
    {
        payload = bytes::Bytes::from(bytes);
    }
    OutboxEvent {
        id: get(0).unwrap_or_default(),
        event_topic: get(1).unwrap_or_default(),
        payload,
        aggregate_type: get(3),
        aggregate_id: get(4),
        tenant_id: get(5),
        source_bc: get(6),
        destination_topics: get(7),
        schema_id: get(8),
        schema_version: get(9),
        metadata: get(10),
        occurred_at: get(11),
        created_at: get(12),
        content_type: get(13),
    }
}

fn stream_entry<'a>(r: &'a mut Report, stream: &Option<String>) -> &'a mut StreamReport {
    r.streams
        .entry(stream.clone().unwrap_or_default())
        .or_default()
}

/// One row's copies as the relay would publish them (positions unknown: 0).
pub fn copies(router: &Router, event: &OutboxEvent) -> Vec<Envelope> {
    let mut index = 0;
    router.route(event, 0, &mut index)
}

/// The `Nats-Msg-Id` of a copy.
pub fn msg_id(env: &Envelope) -> &str {
    env.headers.get(headers::MSG_ID).map_or("", |v| v.as_str())
}

/// Where one copy is: what the audit concluded for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Once,
    Duplicated,
    DeadLettered(String),
    /// Not stored anywhere; `in_flight`: the relay has not confirmed past the snapshot.
    Missing {
        in_flight: bool,
    },
    /// No stream captures its subject and it is not in the dead letters.
    Unplaced,
}

/// The verdict for one copy.
pub fn verdict(
    env: &Envelope,
    index: &mut StreamIndex,
    stored: &Stored,
    settled: bool,
) -> (Option<String>, Verdict) {
    let k = key(msg_id(env));
    let stream = if env.dead_letter.is_none() {
        index.stream_of(&env.subject)
    } else {
        None
    };
    if let Some(s) = &stream {
        match stored.count(s, k) {
            0 => {}
            1 => return (stream, Verdict::Once),
            _ => return (stream, Verdict::Duplicated),
        }
    }
    if let Some(dead) = stored.dead.get(&k) {
        return (stream, Verdict::DeadLettered(dead.kind.clone()));
    }
    match stream {
        Some(s) => (
            Some(s),
            Verdict::Missing {
                in_flight: !settled,
            },
        ),
        None => (None, Verdict::Unplaced),
    }
}

/// Everything the audit needs, connected.
pub struct Audit {
    pub cfg: Config,
    pub origin: String,
    pub router: Router,
    pub js: jetstream::Context,
    pub index: StreamIndex,
    pub sql: tokio_postgres::Client,
}

impl Audit {
    pub async fn connect(cfg: &Config) -> Result<Audit> {
        let origin = crate::app::origin(cfg)?;
        let router = crate::app::router(cfg)?;
        let client = crate::sink::connect(cfg).await?;
        let js = crate::sink::jetstream(client, cfg);
        let index = StreamIndex::load(&js, reach(cfg)).await?;
        let sql = admin::connect(cfg).await?;
        // Like the relay (`RowMapping::resolve`), an optional field whose column the
        // table lacks is unset rather than an error: read as NULL.
        let mut cfg = cfg.clone();
        let (schema, table) = cfg.outbox.qualified();
        let present = admin::table_columns(&sql, &schema, &table).await?;
        let columns = &mut cfg.outbox.columns;
        let required: Vec<String> = columns
            .required_fields()
            .iter()
            .map(|(_, c)| c.to_string())
            .collect();
        for name in columns.optional_mut() {
            if !present.contains(name) && !required.contains(name) {
                name.clear();
            }
        }
        Ok(Audit {
            cfg,
            origin,
            router,
            js,
            index,
            sql,
        })
    }

    /// What the streams this relay writes to hold for its origin.
    pub async fn stored(&self, progress: impl FnMut(u64)) -> Result<Stored> {
        let listed = crate::checkpoint::Checkpoint::peek(
            &self.js,
            &self.cfg.checkpoint.bucket,
            &self.origin,
        )
        .await?
        .map(|r| r.streams)
        .unwrap_or_default();
        let streams = streams_written(&self.cfg, &listed, &self.index);
        read_streams(
            &self.js,
            &streams,
            &self.origin,
            &self.cfg.routing.dead_letter_prefix,
            progress,
        )
        .await
    }

    /// The rows of `window`, read now (no snapshot; for the few rows a replay sends).
    pub async fn rows(&self, window: &Window) -> Result<Vec<OutboxEvent>> {
        let sql = page_sql(&self.cfg, window)?;
        let first = ("-infinity".to_string(), String::new());
        let rows = self
            .sql
            .query(&sql, &page_params(window, &first, &i64::MAX))
            .await
            .map_err(|e| crate::error::from_pg(&e).context("replay"))?;
        Ok(rows.iter().map(event_of).collect())
    }

    /// Audit `window`; `each` sees every row's copies with their verdicts (replay uses
    /// it to pick what to send), `progress` a count of rows and messages read.
    pub async fn run(
        &mut self,
        window: &Window,
        wait: Duration,
        mut each: impl FnMut(&OutboxEvent, &[(Envelope, Option<String>, Verdict)]),
        mut progress: impl FnMut(&str, u64),
    ) -> Result<Report> {
        let sql_err = |e: tokio_postgres::Error| crate::error::from_pg(&e).context("audit");
        // One snapshot for the whole audit (plain statements, so the slot can be read
        // on the same connection: pg_replication_slots is live, not snapshotted).
        self.sql
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(sql_err)?;
        let tx = &self.sql;
        // The snapshot is taken by this first statement: every row it sees committed
        // before the WAL position it returns.
        let snapshot: String = tx
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(sql_err)?
            .get(0);
        let s = crate::checkpoint::parse_lsn(&snapshot).unwrap_or(u64::MAX);
        let deadline = tokio::time::Instant::now() + wait;
        // Waiting helps only while a relay streams from the slot: a slot nobody reads
        // does not move, and what it has not confirmed stays in flight until one does.
        let confirmed = loop {
            let slot = admin::slot_info(&self.sql, &self.cfg.postgres.slot).await?;
            let active = slot.as_ref().is_some_and(|i| i.active_pid.is_some());
            let c = slot
                .and_then(|i| i.confirmed_flush_lsn)
                .and_then(|l| crate::checkpoint::parse_lsn(&l));
            if c.is_none_or(|c| c >= s) || !active || tokio::time::Instant::now() >= deadline {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // No slot: nothing more will be delivered, so nothing is in flight.
        let settled = confirmed.is_none_or(|c| c >= s);
        let stored = self.stored(|n| progress("messages read", n)).await?;
        let mut report = Report {
            origin: self.origin.clone(),
            snapshot_lsn: snapshot,
            confirmed_lsn: confirmed.map(crate::route::format_lsn),
            ..Report::default()
        };
        for (name, n) in &stored.out_of_order {
            report.streams.entry(name.clone()).or_default().out_of_order = *n;
        }
        let sql = page_sql(&self.cfg, window)?;
        // One ordered query, streamed: tokio-postgres hands rows over as they arrive
        // and stops reading the socket while they are not taken, so memory stays
        // bounded; one sort on the server (a keyset page per query re-sorted the
        // whole window each time: 60 s for 1,000,000 rows).
        let statement = tx.prepare(&sql).await.map_err(sql_err)?;
        let from_start = ("-infinity".to_string(), String::new());
        let rows = tx
            .query_raw(&statement, page_params(window, &from_start, &i64::MAX))
            .await
            .map_err(sql_err)?;
        futures::pin_mut!(rows);
        while let Some(row) = rows.next().await {
            let row = row.map_err(sql_err)?;
            {
                let event = event_of(&row);
                let id = String::from_utf8_lossy(&event.id).into_owned();
                report.rows += 1;
                let envs = copies(&self.router, &event);
                if envs.is_empty() {
                    report.routed_nowhere.add(&id);
                }
                let mut judged = Vec::with_capacity(envs.len());
                for env in envs {
                    let (stream, v) = verdict(&env, &mut self.index, &stored, settled);
                    match &v {
                        Verdict::Once => stream_entry(&mut report, &stream).delivered_once += 1,
                        Verdict::Duplicated => {
                            stream_entry(&mut report, &stream).duplicated.add(&id)
                        }
                        Verdict::Missing { in_flight: true } => {
                            stream_entry(&mut report, &stream).in_flight.add(&id)
                        }
                        Verdict::Missing { in_flight: false } => {
                            stream_entry(&mut report, &stream).missing.add(&id)
                        }
                        Verdict::DeadLettered(reason) => report
                            .dead_lettered
                            .entry(reason.clone())
                            .or_default()
                            .add(&id),
                        Verdict::Unplaced => report.unplaced.add(&id),
                    }
                    judged.push((env, stream, v));
                }
                each(&event, &judged);
            }
            if report.rows.is_multiple_of(10_000) {
                progress("rows audited", report.rows);
            }
        }
        progress("rows audited", report.rows);
        self.sql.batch_execute("ROLLBACK").await.map_err(sql_err)?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_keys_are_their_value_and_others_are_hashed_stably() {
        assert_eq!(key("00000000-0000-0000-0000-00000000000a"), 10);
        assert_eq!(key("order-17"), key("order-17"));
        assert_ne!(key("order-17"), key("order-18"));
        assert_ne!(key("00000000-0000-0000-0000-00000000000a:1"), 10);
        assert_eq!(
            key("0b0c9d2e-1111-4000-8000-00000000000f"),
            0x0b0c9d2e_1111_4000_8000_00000000000f
        );
        // 32 hex digits and 4 dashes elsewhere is not a UUID: hashed, not read.
        assert_ne!(key("0000-0000000-0000-0000-00000000000a"), 10);
        assert_ne!(key("00000000-0000-0000-0000-00000000000g"), 0);
    }

    #[test]
    fn stored_counts_duplicates() {
        let mut s = Stored::default();
        s.streams.insert("S".into(), vec![1, 2, 2, 5]);
        assert_eq!(s.count("S", 2), 2);
        assert_eq!(s.count("S", 5), 1);
        assert_eq!(s.count("S", 3), 0);
        assert_eq!(s.count("T", 1), 0);
    }

    #[test]
    fn reasons_group_without_their_details() {
        assert_eq!(
            reason_kind(
                "jetstream refused the message (10054): message size exceeds maximum allowed"
            ),
            "jetstream refused the message"
        );
        assert_eq!(
            reason_kind("no stream captures subject a.b"),
            "no stream captures subject a.b"
        );
    }
}
