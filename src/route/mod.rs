//! Routing: an [`OutboxEvent`] becomes one or more [`Envelope`]s (subject, headers,
//! payload). Pure: no I/O, deterministic (the same row always routes the same way, so a
//! replay after a crash is identical and `Nats-Msg-Id` dedup applies).
//!
//! Architecture invariant: routing never fails the pipeline. An event that cannot be
//! routed becomes an envelope marked with a dead-letter reason; the sink publishes it to
//! the dead-letter subject and the stream moves on.

pub mod cloudevents;
pub mod headers;
pub mod rules;
mod subject;
mod template;

pub use headers::{HeaderSet, format_lsn, header_names};
pub use subject::{sanitize_token, validate_subject};
pub use template::{Field, MAX_PARTITIONS, Template, TextTemplate, partition};

use bytes::Bytes;

use crate::decode::OutboxEvent;

/// Where in the WAL a message came from: the commit LSN of its transaction and the
/// message's index inside it (fan-out copies count). Totally ordered in commit order, then
/// insert order, and identical on every replay (routing is deterministic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub commit_lsn: u64,
    pub index: u32,
}

/// One message to publish.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub pos: Position,
    pub subject: String,
    pub headers: async_nats::HeaderMap,
    pub payload: Bytes,
    /// Set when the event cannot be published as routed; the sink sends it to the
    /// dead-letter subject with this reason.
    pub dead_letter: Option<String>,
    /// How many leading bytes of `Nats-Msg-Id` are the row's id. Every message id
    /// begins with the row id (`<id>`, `<id>:<subject>` for a fan-out copy, `<id>:dead
    /// letter <n>`, and `replay`'s renamed copies), so a dead letter names its row
    /// (`Outbox-Event-Id`, in every header profile) from its message id exactly, even
    /// when the id holds a `:`, and without a per-event copy of the id.
    pub event_id_len: usize,
    /// The stream that will store it (filled in by the pipeline, for metrics).
    pub stream: String,
    /// Commit time of its transaction, µs since the Unix epoch (0 = unknown), for the
    /// end-to-end latency metric.
    pub committed_at_us: i64,
    /// One of an `all_or_nothing` fan-out: if any copy of the event would be
    /// dead-lettered, all are (decided by the pipeline before publishing any).
    pub all_or_nothing: bool,
    /// Its part in a rules route's `fallback` (see [`Router::fallback_for`]).
    pub fallback: FallbackRole,
    /// The rules target's `delay_seconds` (0: publish now).
    pub delay_seconds: u64,
    /// The schedule definition subject of a delayed copy, filled in by the pipeline once
    /// it knows the stream ([`crate::sink::schedule`]); the sink then publishes the
    /// definition instead of the message.
    pub schedule: Option<String>,
}

/// The row id that message id `msg_id` begins with, `event_id_len` bytes long (see
/// [`Envelope::event_id_len`]); `None` when the length does not fit, which no message
/// id the relay wrote does: then nothing is named rather than a wrong id.
pub fn event_id_of(msg_id: &str, event_id_len: usize) -> Option<&str> {
    msg_id.get(..event_id_len)
}

/// How a message relates to its route's fallback target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FallbackRole {
    /// Not from a `best_effort` rules target, or its route has no fallback.
    #[default]
    None,
    /// A `best_effort` target of route `n`: if the pipeline finds it unpublishable
    /// (no stream captures the subject, over `max_payload`), the fallback replaces it.
    Available(usize),
    /// The fallback copy itself.
    Copy,
}

/// The default router: a subject template, overridden per row by `destination_topics`.
#[derive(Debug, Clone)]
pub struct Router {
    template: Template,
    headers: HeaderSet,
    rules: Option<rules::Rules>,
    prefix: Option<Template>,
    /// `routing.cloudevents`; `None` (`"off"`): messages are not CloudEvents, at the
    /// cost of one branch per event.
    cloudevents: Option<cloudevents::CloudEvents>,
}

impl Router {
    /// `origin` names the source (`<database>/<slot>`), written to every message so a
    /// restart can find its own last message in a stream shared with other publishers.
    pub fn new(template: Template, origin: &str) -> Self {
        Self {
            template,
            headers: HeaderSet::new(origin),
            rules: None,
            prefix: None,
            cloudevents: None,
        }
    }

    /// `routing.cloudevents`: every message published (not the dead letters) is also a
    /// CloudEvent, in the binary or structured content mode; `None` for `"off"`.
    pub fn with_cloudevents(mut self, cloudevents: Option<cloudevents::CloudEvents>) -> Self {
        self.headers = self.headers.cloudevents(cloudevents.is_some());
        self.cloudevents = cloudevents;
        self
    }

    /// The `{partition:N}` count of the subject template, if it has one.
    pub fn partitions(&self) -> Option<u32> {
        self.template.partitions()
    }

    /// The compact header profile (`routing.headers = "compact"`).
    pub fn with_compact_headers(mut self, compact: bool) -> Self {
        self.headers = self.headers.compact(compact);
        self
    }

    /// `outbox.content_type`: the `Content-Type` of rows that do not carry their own.
    pub fn with_content_type(mut self, content_type: Option<&str>) -> Self {
        self.headers = self.headers.with_content_type(content_type);
        self
    }

    /// Refuse (dead-letter) every subject outside `prefix`, rendered per event.
    pub fn with_prefix(mut self, prefix: Option<Template>) -> Self {
        self.prefix = prefix;
        self
    }

    /// Dead-letters the envelopes whose subject is outside the enforced prefix.
    fn enforce_prefix(&self, ev: &OutboxEvent, mut envs: Vec<Envelope>) -> Vec<Envelope> {
        let Some(prefix) = &self.prefix else {
            return envs;
        };
        let rendered = prefix.render_prefix(ev);
        for env in envs.iter_mut().filter(|e| e.dead_letter.is_none()) {
            let inside = match &rendered {
                Ok(p) => {
                    env.subject == *p
                        || env
                            .subject
                            .strip_prefix(p.as_str())
                            .is_some_and(|rest| rest.starts_with('.'))
                }
                Err(_) => false,
            };
            if !inside {
                env.dead_letter = Some(match &rendered {
                    Ok(p) => format!("subject {} is outside the enforced prefix {p}", env.subject),
                    Err(e) => format!("enforced subject prefix: {e}"),
                });
                env.subject = sanitize_subject_for_dlq(&env.subject);
            }
        }
        envs
    }

    /// The largest `delay_seconds` of the rules (0: nothing is delayed).
    pub fn max_delay_seconds(&self) -> u64 {
        self.rules
            .as_ref()
            .map_or(0, rules::Rules::max_delay_seconds)
    }

    /// Route by a rules file first; events no route matches use the template.
    pub fn with_rules(mut self, rules: Option<rules::Rules>) -> Self {
        self.rules = rules;
        self
    }

    /// Route one event of the transaction committed at `commit_lsn`; `next_index` is the
    /// transaction's message counter. Returns no envelope only when a rules file routed
    /// the event nowhere (every target's conditions false or sampled out, no fallback).
    pub fn route(&self, ev: &OutboxEvent, commit_lsn: u64, next_index: &mut u32) -> Vec<Envelope> {
        let envs = self.route_unchecked(ev, commit_lsn, next_index);
        let envs = self.enforce_prefix(ev, envs);
        self.cloudevents(ev, envs)
    }

    /// Makes each envelope a CloudEvent (after rules transforms and rule headers: the
    /// payload and headers are final), or a dead letter when a required attribute is
    /// missing.
    fn cloudevents(&self, ev: &OutboxEvent, mut envs: Vec<Envelope>) -> Vec<Envelope> {
        if let Some(ce) = &self.cloudevents {
            for env in &mut envs {
                ce.apply(ev, env);
            }
        }
        envs
    }

    fn route_unchecked(
        &self,
        ev: &OutboxEvent,
        commit_lsn: u64,
        next_index: &mut u32,
    ) -> Vec<Envelope> {
        let mut pos = move || {
            let p = Position {
                commit_lsn,
                index: *next_index,
            };
            *next_index += 1;
            p
        };
        let explicit = ev
            .destination_topics
            .as_ref()
            .is_some_and(|raw| !is_json_null(raw));
        if !explicit
            && let Some(rules) = &self.rules
            && let rules::Decision::Routed { targets, .. } = rules.decide(ev)
        {
            let targets = with_fallbacks(rules, ev, targets);
            return self.rule_envelopes(ev, targets, &mut pos);
        }
        let templated = !explicit;
        let targets = match &ev.destination_topics {
            Some(raw) if explicit => destination_subjects(raw),
            _ => self.template.render(ev).map(|subject| vec![Ok(subject)]),
        };
        let targets = match targets {
            Ok(t) => t,
            Err(reason) => {
                let subject = fallback_subject(ev);
                return vec![self.envelope(ev, pos(), subject, None, Some(reason))];
            }
        };
        let fan_out = targets.len() > 1;
        targets
            .into_iter()
            .enumerate()
            .map(|(n, t)| {
                let (subject, dead_letter) = match t {
                    Ok(subject) => (subject, None),
                    Err((subject, reason)) => (sanitize_subject_for_dlq(&subject), Some(reason)),
                };
                let msg_id = fan_out.then(|| copy_msg_id(ev, n, &subject, dead_letter.is_some()));
                let partition = (templated && dead_letter.is_none())
                    .then(|| self.template.partition_of(ev))
                    .flatten();
                let mut env = self.envelope(ev, pos(), subject, msg_id, dead_letter);
                set_partition(&mut env, partition);
                env
            })
            .collect()
    }

    /// Envelopes for the targets a rules file selected: each with its own payload
    /// (transformed or untouched) and extra headers; a target whose subject failed is a
    /// dead letter.
    fn rule_envelopes(
        &self,
        ev: &OutboxEvent,
        targets: Vec<rules::RoutedTarget>,
        pos: &mut impl FnMut() -> Position,
    ) -> Vec<Envelope> {
        let fan_out = targets.len() > 1;
        targets
            .into_iter()
            .enumerate()
            .map(|(n, t)| {
                let (subject, dead_letter) = match t.subject {
                    Ok(s) => match validate_subject(&s) {
                        Ok(()) => (s, None),
                        Err(e) => (
                            sanitize_subject_for_dlq(&s),
                            Some(format!("subject {}: {e}", quoted(&s))),
                        ),
                    },
                    Err(reason) => (fallback_subject(ev), Some(reason)),
                };
                let msg_id = fan_out.then(|| copy_msg_id(ev, n, &subject, dead_letter.is_some()));
                let ok = dead_letter.is_none();
                let mut env = self.envelope(ev, pos(), subject, msg_id, dead_letter);
                env.payload = t.payload;
                env.delay_seconds = t.delay_seconds;
                env.all_or_nothing = t.strategy == rules::Strategy::AllOrNothing && fan_out;
                env.fallback = match t.target {
                    rules::TargetRef::Fallback => FallbackRole::Copy,
                    _ if ok && t.strategy == rules::Strategy::BestEffort => {
                        FallbackRole::Available(t.route)
                    }
                    _ => FallbackRole::None,
                };
                for (name, value) in t.headers {
                    env.headers.insert(name.as_str(), headers::value(&value));
                }
                set_partition(&mut env, t.partition.filter(|_| ok));
                env
            })
            .collect()
    }

    fn envelope(
        &self,
        ev: &OutboxEvent,
        pos: Position,
        subject: String,
        msg_id: Option<String>,
        dead_letter: Option<String>,
    ) -> Envelope {
        Envelope {
            headers: self.headers.build(ev, pos, msg_id.as_deref()),
            pos,
            subject,
            payload: ev.payload.clone(),
            dead_letter,
            // `id_str`: what the message id starts with (see the field).
            event_id_len: ev.id_str().len(),
            ..Envelope::default()
        }
    }

    /// The fallback copy of `ev` for rules route `route`, at position `pos` (that of
    /// the copy it replaces, so a replay decides the same), or `None` when the route has
    /// no fallback or it cannot be published either (its subject does not render, is
    /// invalid, or leaves the enforced prefix). `fan_out`: the event has several copies
    /// (then `Nats-Msg-Id` is `<id>:<subject>`).
    pub fn fallback_for(
        &self,
        ev: &OutboxEvent,
        route: usize,
        pos: Position,
        fan_out: bool,
    ) -> Option<Envelope> {
        let t = self.rules.as_ref()?.fallback(route, ev)?;
        let subject = t.subject.ok()?;
        validate_subject(&subject).ok()?;
        let msg_id = fan_out.then(|| copy_msg_id(ev, 0, &subject, false));
        let mut env = self.envelope(ev, pos, subject, msg_id, None);
        env.payload = t.payload;
        env.delay_seconds = t.delay_seconds;
        env.fallback = FallbackRole::Copy;
        for (name, value) in t.headers {
            env.headers.insert(name.as_str(), headers::value(&value));
        }
        set_partition(&mut env, t.partition);
        let envs = self.enforce_prefix(ev, vec![env]);
        self.cloudevents(ev, envs)
            .pop()
            .filter(|e| e.dead_letter.is_none())
    }
}

/// `{partition:N}` in the subject a copy was routed to (`routing.subject` or a rules
/// target's): the partition also as a header, for consumers that bind to it.
fn set_partition(env: &mut Envelope, partition: Option<u32>) {
    if let Some(p) = partition {
        env.headers
            .insert(headers::PARTITION, headers::value(&p.to_string()));
    }
}

/// Under `best_effort`, a target whose subject or transform failed (permanently: a
/// replay fails the same way) is replaced by its route's fallback, when there is one and
/// the fallback itself works; otherwise it stays, to be dead-lettered.
fn with_fallbacks(
    rules: &rules::Rules,
    ev: &OutboxEvent,
    targets: Vec<rules::RoutedTarget>,
) -> Vec<rules::RoutedTarget> {
    let mut out: Vec<rules::RoutedTarget> = Vec::with_capacity(targets.len());
    for t in targets {
        let keep = t.subject.is_ok()
            || t.strategy != rules::Strategy::BestEffort
            || t.target == rules::TargetRef::Fallback;
        let t = match rules.fallback(t.route, ev) {
            Some(f) if !keep && f.subject.is_ok() => f,
            _ => t,
        };
        // Several failed targets share one fallback copy.
        if t.target == rules::TargetRef::Fallback
            && out.iter().any(|o| o.target == rules::TargetRef::Fallback)
        {
            continue;
        }
        out.push(t);
    }
    out
}

fn is_json_null(raw: &Bytes) -> bool {
    raw.as_ref().trim_ascii() == b"null"
}

type Target = Result<String, (String, String)>;

/// `Nats-Msg-Id` of copy `n` of a fan-out, so that copies in one stream do not dedup
/// each other: `<id>:<subject>` for a copy routed to `subject`, `<id>:dead letter <n>`
/// for one dead-lettered while routing. Distinct by construction (routed subjects are
/// distinct and have no spaces); keyed by the dead-letter subject instead, `outbox.>`
/// and `outbox.*` both became `<id>:outbox._`, as did a copy routed to `outbox._`, and
/// JetStream dropped the later ones as duplicates.
fn copy_msg_id(ev: &OutboxEvent, n: usize, subject: &str, dead_letter: bool) -> String {
    if dead_letter {
        format!("{}:dead letter {n}", ev.id_str())
    } else {
        format!("{}:{subject}", ev.id_str())
    }
}

/// `s` quoted for a dead-letter reason, cut to 128 bytes: a row can make an entry
/// megabytes long.
fn quoted(s: &str) -> String {
    let cut = truncate_at_char(s, 128);
    if cut.len() == s.len() {
        format!("{s:?}")
    } else {
        format!("{cut:?}… ({} bytes)", s.len())
    }
}

/// `destination_topics` is a JSON array of subject strings. Each is validated strictly
/// (no sanitising: an explicit subject is used as written or refused).
fn destination_subjects(raw: &Bytes) -> Result<Vec<Target>, String> {
    let list: Vec<String> = serde_json::from_slice(raw)
        .map_err(|_| "destination_topics must be a json array of subject strings".to_string())?;
    if list.is_empty() {
        return Err("destination_topics is an empty array".into());
    }
    let mut seen = std::collections::HashSet::new();
    Ok(list
        .into_iter()
        .filter(|s| seen.insert(s.clone()))
        .map(|s| match validate_subject(&s) {
            Ok(()) => Ok(s),
            Err(e) => Err((
                s.clone(),
                format!("destination_topics entry {}: {e}", quoted(&s)),
            )),
        })
        .collect())
}

/// The subject a routing failure is filed under (below the dead-letter prefix).
fn fallback_subject(ev: &OutboxEvent) -> String {
    sanitize_subject_for_dlq(ev.event_topic_str())
}

/// Make any string usable as the tail of a dead-letter subject.
fn sanitize_subject_for_dlq(s: &str) -> String {
    let tokens: Vec<String> = s
        .split('.')
        .filter(|t| !t.is_empty())
        .map(|t| sanitize_token(t).replace('$', "_"))
        .filter(|t| !t.is_empty())
        .take(16)
        .collect();
    if tokens.is_empty() {
        "unroutable".into()
    } else {
        let out = tokens.join(".");
        truncate_at_char(&out, 200)
            .trim_end_matches('.')
            .to_string()
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_at_char(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod tests;
