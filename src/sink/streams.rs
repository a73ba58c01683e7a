//! Target streams: create or update the `[[streams]]` of the config, and find which
//! subjects no stream captures.

use std::collections::HashMap;

use async_nats::jetstream::{self, stream};
use futures::StreamExt;

use crate::config::{Config, StreamConfig};
use crate::error::{Error, Result};

/// Create or update every declared stream. Existing streams not declared are used as
/// they are. `schedules`: some rules target is delayed, so every declared stream also
/// gets its schedule namespace and `allow_msg_schedules` (see [`super::schedule`];
/// the caller has checked that the server supports them).
pub async fn ensure(js: &jetstream::Context, cfg: &Config, schedules: bool) -> Result<()> {
    for s in &cfg.streams {
        let filter = super::schedule::stream_filter(&cfg.routing.schedule_prefix, &s.name);
        let with_schedules = |mut want: stream::Config| {
            if !want.subjects.iter().any(|f| pattern_covers(f, &filter)) {
                want.subjects.push(filter.clone());
            }
            want.allow_message_schedules = true;
            want
        };
        let mut want = stream_config(s);
        if schedules {
            want = with_schedules(want);
        }
        match js.get_stream(&s.name).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|e| Error::transient(format!("stream {}: {e}", s.name)))?;
                let have = &info.config;
                // Delays removed from the rules: definitions may still be pending, and
                // they fire only while the stream still captures their subjects.
                if have.allow_message_schedules && have.subjects.contains(&filter) {
                    want = with_schedules(want);
                }
                let differs = have.subjects != want.subjects
                    || have.num_replicas != want.num_replicas
                    || have.duplicate_window != want.duplicate_window
                    // Once allowed, schedules stay allowed (the server cannot turn
                    // them off, and pending definitions need them).
                    || (want.allow_message_schedules && !have.allow_message_schedules);
                if have.storage != want.storage {
                    return Err(Error::fatal(format!(
                        "stream {}: storage is {:?} on the server but {} in [[streams]]",
                        s.name, have.storage, s.storage
                    ))
                    .hint("JetStream cannot change a stream's storage; fix [[streams]] storage or recreate the stream"));
                }
                if differs {
                    let mut merged = have.clone();
                    merged.subjects = want.subjects.clone();
                    merged.num_replicas = want.num_replicas;
                    merged.duplicate_window = want.duplicate_window;
                    merged.allow_message_schedules |= want.allow_message_schedules;
                    js.update_stream(merged).await.map_err(|e| {
                        Error::fatal(format!("update stream {}: {e}", s.name))
                            .hint("check that no other stream captures the same subjects")
                    })?;
                    tracing::info!(stream = %s.name, "stream updated from [[streams]]");
                }
            }
            // Only "not found" means missing: another API error (no leader during an
            // election) must not lead to a create, which would then fail as fatal.
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                js.create_stream(want).await.map_err(|e| {
                    Error::fatal(format!("create stream {}: {e}", s.name))
                        .hint("check that no other stream captures the same subjects and JetStream has room")
                })?;
                tracing::info!(stream = %s.name, "stream created from [[streams]]");
            }
            Err(e) => {
                return Err(Error::transient(format!("look up stream {}: {e}", s.name))
                    .hint("check that nats-server runs with JetStream enabled (-js)"));
            }
        }
    }
    Ok(())
}

fn stream_config(s: &StreamConfig) -> stream::Config {
    stream::Config {
        name: s.name.clone(),
        subjects: s.subjects.clone(),
        storage: if s.storage == "memory" {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        num_replicas: s.replicas,
        duplicate_window: s.duplicate_window,
        ..Default::default()
    }
}

/// Which stream captures which subject, matched locally from the subject filters of the
/// streams this relay can reach, so routing decides "no stream: dead letter" before
/// publishing, with no round trip per message.
///
/// Only streams capturing a subject in [`reach`] are read (`STREAM.NAMES` filtered by
/// subject, then `STREAM.INFO` of each): another application's stream is never read,
/// so one that is down or forbidden changes nothing, and docs/security.md's narrowed
/// permissions (no `STREAM.LIST`, `INFO` on the relay's streams only) suffice.
#[derive(Debug, Default)]
pub struct StreamIndex {
    /// What this relay can publish to: the `STREAM.NAMES` filters.
    reach: Vec<String>,
    filters: Vec<(String, String)>,
    /// Streams in reach whose `INFO` failed (forbidden, or not answering): their
    /// subjects are unknown, so a subject no readable stream captures is checked
    /// against them by name before it is called uncaptured ([`StreamIndex::resolve`]).
    unreadable: std::collections::BTreeSet<String>,
    /// Streams that allow message schedules (`allow_msg_schedules`), with the limits
    /// that could remove a pending definition.
    schedules: HashMap<String, ScheduleLimits>,
    cache: HashMap<String, Option<String>>,
    loaded_at: Option<std::time::Instant>,
}

/// What could remove a pending schedule definition from a stream.
#[derive(Debug, Clone, Copy)]
struct ScheduleLimits {
    max_age: std::time::Duration,
    retention: stream::RetentionPolicy,
}

/// Bound on remembered subjects (subjects may carry ids: unbounded cardinality).
const CACHE_LIMIT: usize = 16_384;

/// Stream `INFO` requests in flight at once while loading the index.
const INFO_CONCURRENCY: usize = 16;

/// The subject patterns this relay can publish to: every routed subject (all of them,
/// `>`, unless `routing.subject_prefix` confines them), the dead letters and the
/// schedule definitions.
pub fn reach(cfg: &Config) -> Vec<String> {
    if cfg.routing.subject_prefix.is_empty() {
        return vec![">".into()];
    }
    let prefix = template_pattern(&cfg.routing.subject_prefix);
    vec![
        format!("{prefix}.>"),
        prefix,
        format!("{}.>", cfg.routing.dead_letter_prefix),
        format!("{}.>", cfg.routing.schedule_prefix),
    ]
}

/// One page of a `STREAM.NAMES` answer.
#[derive(Debug, serde::Deserialize)]
struct NamesPage {
    total: usize,
    streams: Option<Vec<String>>,
}

/// The names of the streams whose subjects overlap one of `filters`.
async fn stream_names(
    js: &jetstream::Context,
    filters: &[String],
) -> Result<std::collections::BTreeSet<String>> {
    use async_nats::jetstream::response::Response;
    let failed = |e: String| {
        Error::transient(format!("list streams: {e}")).hint(
            "check that nats-server runs with JetStream enabled (-js) and that the relay's nats user \
             may publish to $JS.API.STREAM.NAMES (docs/security.md)",
        )
    };
    let mut names = std::collections::BTreeSet::new();
    for filter in filters {
        let mut offset = 0;
        loop {
            let body = serde_json::json!({ "offset": offset, "subject": filter });
            let page: Response<NamesPage> = js
                .request("STREAM.NAMES", &body)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let page = match page {
                Response::Ok(page) => page,
                Response::Err { error } => return Err(failed(error.to_string())),
            };
            let got = page.streams.unwrap_or_default();
            offset += got.len();
            let done = got.is_empty() || offset >= page.total;
            names.extend(got);
            if done {
                break;
            }
        }
    }
    Ok(names)
}

impl StreamIndex {
    /// The index of the streams capturing `reach` (see [`reach`]).
    pub async fn load(js: &jetstream::Context, reach: Vec<String>) -> Result<StreamIndex> {
        let mut idx = StreamIndex {
            reach,
            ..Default::default()
        };
        idx.refresh(js).await?;
        Ok(idx)
    }

    /// Re-read the subjects of every stream in reach. A stream whose `INFO` fails is
    /// remembered as unreadable and not asked again by later refreshes (a forbidden
    /// `INFO` costs a request timeout); [`StreamIndex::resolve`] retries it when a
    /// subject might be its.
    pub async fn refresh(&mut self, js: &jetstream::Context) -> Result<()> {
        let names = stream_names(js, &self.reach).await?;
        let asked: Vec<String> = names
            .into_iter()
            .filter(|n| !self.unreadable.contains(n))
            .collect();
        let answers: Vec<(String, std::result::Result<stream::Info, String>)> =
            futures::stream::iter(asked)
                .map(|name| async move {
                    let info = js
                        .get_stream(&name)
                        .await
                        .map(|s| s.cached_info().clone())
                        .map_err(|e| e.to_string());
                    (name, info)
                })
                .buffer_unordered(INFO_CONCURRENCY)
                .collect()
                .await;
        let mut filters = Vec::new();
        let mut schedules = HashMap::new();
        for (name, info) in answers {
            let info = match info {
                Ok(info) => info,
                Err(e) => {
                    tracing::warn!(
                        stream = %name,
                        error = %e,
                        "cannot read a stream whose subjects overlap the relay's: \
                         grant the relay's nats user $JS.API.STREAM.INFO.{name} if it is meant to capture them"
                    );
                    self.unreadable.insert(name);
                    continue;
                }
            };
            for subject in &info.config.subjects {
                filters.push((subject.clone(), info.config.name.clone()));
            }
            if info.config.allow_message_schedules {
                schedules.insert(
                    info.config.name.clone(),
                    ScheduleLimits {
                        max_age: info.config.max_age,
                        retention: info.config.retention,
                    },
                );
            }
        }
        // Sorted, so two streams overlapping on a subject resolve the same way at
        // every load (the server stores such a subject in neither: it refuses the
        // overlap when the second stream is created).
        filters.sort();
        self.filters = filters;
        self.schedules = schedules;
        self.cache.clear();
        self.loaded_at = Some(std::time::Instant::now());
        Ok(())
    }

    /// The stream capturing `subject`, refreshing the index when it knows none (at
    /// most once per `min_age`). `None` is proof that no stream in reach captures it:
    /// when some stream's subjects could not be read, the server is asked which
    /// stream captures `subject`, and an unreadable one is an error (transient: the
    /// event waits until its `INFO` is granted), never a guess.
    pub async fn resolve(
        &mut self,
        js: &jetstream::Context,
        subject: &str,
        min_age: std::time::Duration,
    ) -> Result<Option<String>> {
        if let Some(found) = self.stream_of(subject) {
            return Ok(Some(found));
        }
        if self.refresh_if_older(js, min_age).await?
            && let Some(found) = self.stream_of(subject)
        {
            return Ok(Some(found));
        }
        if self.unreadable.is_empty() {
            return Ok(None);
        }
        let Some(name) = stream_for(js, subject).await? else {
            return Ok(None);
        };
        // Its INFO may be granted by now: read it again.
        self.unreadable.remove(&name);
        self.refresh(js).await?;
        if let Some(found) = self.stream_of(subject) {
            return Ok(Some(found));
        }
        Err(Error::transient(format!(
            "stream {name} captures subject {subject}, but the relay cannot read its configuration"
        ))
        .hint(format!(
            "grant the relay's nats user $JS.API.STREAM.INFO.{name}, or route the subject elsewhere; \
             the event waits until then"
        )))
    }

    /// Refresh unless that happened less than `min_age` ago.
    async fn refresh_if_older(
        &mut self,
        js: &jetstream::Context,
        min_age: std::time::Duration,
    ) -> Result<bool> {
        if self.loaded_at.is_some_and(|t| t.elapsed() < min_age) {
            return Ok(false);
        }
        self.refresh(js).await?;
        Ok(true)
    }

    /// Does `stream` allow message schedules?
    fn allows_schedules(&self, stream: &str) -> bool {
        self.schedules.contains_key(stream)
    }

    /// Can `stream` hold schedule definitions: `allow_msg_schedules`, and a subject
    /// filter covering its namespace `<prefix>.<stream>.>`? Matched against the filters
    /// (not [`StreamIndex::stream_of`]): every definition subject is unique, and caching
    /// each would evict the subjects worth caching.
    pub fn holds_schedules(&self, stream: &str, prefix: &str) -> bool {
        let namespace = super::schedule::stream_filter(prefix, stream);
        self.allows_schedules(stream)
            && self
                .filters
                .iter()
                .any(|(f, s)| s == stream && pattern_covers(f, &namespace))
    }

    /// Why `stream` could remove a definition delayed by `delay_seconds` before it
    /// fires, if it could: a definition's PubAck moves the slot on, so a definition
    /// the stream drops is a lost event. (A full stream with `discard = old` can drop
    /// one too; that is the operator's sizing, as for every message: docs/routing.md.)
    pub fn schedule_limit(&self, stream: &str, delay_seconds: u64) -> Option<String> {
        let limits = self.schedules.get(stream)?;
        if limits.retention != stream::RetentionPolicy::Limits {
            return Some(format!(
                "stream {stream} has {:?} retention, which can remove a pending schedule definition; \
                 delayed targets need limits retention",
                limits.retention
            ));
        }
        let delay = std::time::Duration::from_secs(delay_seconds);
        if !limits.max_age.is_zero() && limits.max_age <= delay {
            return Some(format!(
                "stream {stream} keeps messages for max_age {}, not longer than delay_seconds {delay_seconds}: \
                 the schedule definition would expire before it fires",
                humantime::format_duration(limits.max_age)
            ));
        }
        None
    }

    /// Every (subject filter, stream) pair.
    pub fn filters(&self) -> &[(String, String)] {
        &self.filters
    }

    /// The stream capturing `subject`, if any.
    pub fn stream_of(&mut self, subject: &str) -> Option<String> {
        if let Some(hit) = self.cache.get(subject) {
            return hit.clone();
        }
        let found = self
            .filters
            .iter()
            .find(|(pattern, _)| subject_matches(pattern, subject))
            .map(|(_, name)| name.clone());
        if self.cache.len() >= CACHE_LIMIT {
            self.cache.clear();
        }
        self.cache.insert(subject.to_string(), found.clone());
        found
    }

    #[cfg(test)]
    pub fn from_filters(filters: &[(&str, &str)]) -> StreamIndex {
        StreamIndex {
            filters: filters
                .iter()
                .map(|(p, n)| (p.to_string(), n.to_string()))
                .collect(),
            ..Default::default()
        }
    }
}

/// NATS subject matching: `*` matches one token, `>` the rest (at least one token).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Every subject a template can produce, as a NATS pattern: each token holding a
/// `{field}` becomes `*` (`outbox.{aggregate_type}.{event_topic}` → `outbox.*.*`).
pub fn template_pattern(template: &str) -> String {
    template
        .split('.')
        .map(|t| if t.contains('{') { "*" } else { t })
        .collect::<Vec<_>>()
        .join(".")
}

/// Does `filter` capture every subject that `pattern` matches?
pub fn pattern_covers(filter: &str, pattern: &str) -> bool {
    let mut f = filter.split('.');
    let mut p = pattern.split('.');
    loop {
        match (f.next(), p.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b && a != "*" && a != ">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Can a subject match both patterns?
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(s), Some(t)) if s == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A concrete subject standing for everything a template can produce.
pub fn probe_subject(template: &str) -> String {
    let mut out = String::new();
    let mut in_field = false;
    for c in template.chars() {
        match c {
            '{' => in_field = true,
            '}' => {
                in_field = false;
                out.push_str("probe");
            }
            c if !in_field => out.push(c),
            _ => {}
        }
    }
    out
}

/// Which stream captures `subject`, if any.
pub async fn stream_for(js: &jetstream::Context, subject: &str) -> Result<Option<String>> {
    match js.stream_by_subject(subject).await {
        Ok(name) => Ok(Some(name)),
        Err(e) => {
            let text = e.to_string();
            if text.contains("not found") || text.contains("no stream") {
                Ok(None)
            } else {
                Err(Error::transient(format!(
                    "look up stream for {subject}: {e}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        assert!(subject_matches("outbox.>", "outbox.a.b"));
        assert!(subject_matches("outbox.*.b", "outbox.a.b"));
        assert!(!subject_matches("outbox.*", "outbox.a.b"));
        assert!(!subject_matches("outbox.>", "outbox"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }

    #[test]
    fn index_finds_stream_and_caches_misses() {
        let mut idx = StreamIndex::from_filters(&[("outbox.>", "OUTBOX"), ("audit.*", "AUDIT")]);
        assert_eq!(
            idx.stream_of("outbox.order.created").as_deref(),
            Some("OUTBOX")
        );
        assert_eq!(idx.stream_of("audit.x").as_deref(), Some("AUDIT"));
        assert_eq!(idx.stream_of("audit.x.y"), None);
        assert_eq!(idx.stream_of("audit.x.y"), None);
    }

    #[test]
    fn probe_replaces_fields() {
        assert_eq!(
            super::probe_subject("outbox.{aggregate_type}.{event_topic}"),
            "outbox.probe.probe"
        );
    }
}

#[cfg(test)]
mod coverage_tests {
    use super::*;

    #[test]
    fn template_becomes_a_pattern() {
        assert_eq!(
            template_pattern("outbox.{aggregate_type}.{event_topic}"),
            "outbox.*.*"
        );
        assert_eq!(template_pattern("t.{tenant_id}_x.fixed"), "t.*.fixed");
    }

    #[test]
    fn covers_and_overlaps() {
        assert!(pattern_covers("outbox.>", "outbox.*.*"));
        assert!(pattern_covers("outbox.*.*", "outbox.*.*"));
        assert!(pattern_covers("outbox.*.*", "outbox.order.*"));
        assert!(!pattern_covers("outbox.order.>", "outbox.*.*"));
        assert!(!pattern_covers("outbox.*", "outbox.*.*"));
        assert!(!pattern_covers("outbox.*.*", "outbox.>"));
        assert!(pattern_covers("outbox.>", "outbox.dlq.>"));
        assert!(patterns_overlap("outbox.order.>", "outbox.*.*"));
        assert!(!patterns_overlap("other.>", "outbox.*.*"));
        assert!(!patterns_overlap("outbox.*", "outbox.*.*"));
    }
}
