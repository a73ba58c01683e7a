//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, shared with `cargo test`: the
//! unit test below replays every file of `fuzz/corpus/decode` and `fuzz/corpus/route`
//! through the same functions on every run (stable, no libFuzzer), so an input that once
//! crashed stays fixed.
//!
//! Not part of the relay's API. Each function panics exactly when the code under test
//! breaks a promise: a panic of its own, a routing that differs between two runs on the
//! same event, a subject that is not valid, positions out of order, a subject outside the
//! enforced prefix that was not dead-lettered.

use bytes::Bytes;

use crate::decode::message::{event_from_message, invalid_message_event};
use crate::decode::{ColumnMap, OutboxEvent, PgMessage, RelationCache, parse};
use crate::route::rules::Rules;
use crate::route::{Envelope, Position, Router, Template, headers, validate_subject};

/// The relay's default `routing.subject`.
pub const DEFAULT_TEMPLATE: &str = "outbox.{aggregate_type}.{event_topic}";
const ORIGIN: &str = "app/outbox_relay";
const COMMIT_LSN: u64 = 0x1_6B37_4D48;

/// Target `decode`: any bytes decode to a message or an error, never a panic, both as one
/// pgoutput message and as a sequence that drives the relation cache the way the relay
/// does (Relation, then rows mapped to outbox events; logical messages to table-less
/// events). Every event decoded is routed by the default template and checked like in
/// [`route_one`].
///
/// Input: parsed whole as one message, then also as frames of
/// `[u16 big-endian length][message]` (a short last frame takes what is left).
pub fn decode_one(data: &[u8]) {
    let data = Bytes::copy_from_slice(data);
    let _ = parse(&data);

    let Some(template) = default_template() else {
        return;
    };
    let router = Router::new(template, ORIGIN);
    // Both layouts, so a Debezium-shaped relation in the input can map too.
    let mut caches = [
        RelationCache::new("public", "outbox_events", ColumnMap::default()),
        RelationCache::new("public", "outbox_events", ColumnMap::debezium()),
    ];
    let mut index = 0;
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let _ = rest.split_to(2);
        let frame = rest.split_to(len.min(rest.len()));
        match parse(&frame) {
            Ok(PgMessage::Relation(rel)) => {
                for cache in &mut caches {
                    cache.update(rel.clone());
                }
            }
            Ok(PgMessage::Insert { relation_id, tuple }) => {
                for cache in &caches {
                    if let Ok(Some(mapping)) = cache.mapping(relation_id)
                        && let Ok(event) = mapping.event(&tuple)
                    {
                        // Construction validated these as UTF-8.
                        assert_eq!(event.id_str().len(), event.id.len());
                        assert_eq!(event.event_topic_str().len(), event.event_topic.len());
                        route_checked(&router, None, &event, &mut index);
                    }
                }
            }
            Ok(PgMessage::Message { lsn, content, .. }) => {
                let event = match event_from_message(&content, lsn) {
                    Ok(event) => {
                        assert!(!event.event_topic.is_empty());
                        event
                    }
                    Err(_) => invalid_message_event(&content, lsn),
                };
                assert_eq!(event.id_str().len(), event.id.len());
                route_checked(&router, None, &event, &mut index);
            }
            _ => {}
        }
    }
}

/// Target `bytea`: any bytes, read as a `bytea` payload's text form, decode to bytes or
/// an error, never a panic; whatever they decode to, written back by PostgreSQL in
/// either `bytea_output` format, decodes to the same bytes; and the input itself, as
/// raw bytes stored in a `bytea` column, comes back exactly from both formats.
pub fn bytea_one(data: &[u8]) {
    use crate::decode::bytea::decode;
    if let Ok(bytes) = decode(data) {
        assert_eq!(decode(&bytea_hex_out(&bytes)).as_ref(), Ok(&bytes));
        assert_eq!(decode(&bytea_escape_out(&bytes)).as_ref(), Ok(&bytes));
    }
    assert_eq!(decode(&bytea_hex_out(data)).as_deref(), Ok(data));
    assert_eq!(decode(&bytea_escape_out(data)).as_deref(), Ok(data));
}

/// PostgreSQL's `byteaout` with `bytea_output = hex`.
pub fn bytea_hex_out(bytes: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = Vec::with_capacity(2 + 2 * bytes.len());
    s.extend_from_slice(b"\\x");
    for &b in bytes {
        s.push(HEX[usize::from(b >> 4)]);
        s.push(HEX[usize::from(b & 0xf)]);
    }
    s
}

/// PostgreSQL's `byteaout` with `bytea_output = escape`: a backslash doubled, bytes
/// outside 0x20..=0x7e as `\ooo`.
pub fn bytea_escape_out(bytes: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => s.extend_from_slice(b"\\\\"),
            0x20..=0x7e => s.push(b),
            _ => {
                s.extend_from_slice(&[b'\\', b'0' + (b >> 6), b'0' + (b >> 3 & 7), b'0' + (b & 7)])
            }
        }
    }
    s
}

/// Target `route`: a rules file, a subject template, an enforced prefix and an event, all
/// arbitrary (see [`RouteInput`]). The rules are compiled when they compile, the event is
/// routed; routing it again, and routing it with the rules compiled a second time (a
/// restart), must give identical envelopes, and every envelope must be well formed.
pub fn route_one(data: &[u8]) {
    let input = RouteInput::parse(data);
    let rules_text = std::str::from_utf8(input.rules)
        .ok()
        .filter(|t| !t.trim().is_empty());
    let compiled = rules_text.map(Rules::from_toml);
    let template = std::str::from_utf8(input.template)
        .ok()
        .and_then(|t| Template::parse(t).ok())
        .or_else(default_template);
    let Some(template) = template else {
        return;
    };
    let prefix = std::str::from_utf8(input.prefix)
        .ok()
        .filter(|p| !p.is_empty())
        .and_then(|p| Template::parse(p).ok());
    let ev = input.event;
    let rules = compiled.as_ref().and_then(|r| r.as_ref().ok()).cloned();

    if let Some(rules) = &rules {
        assert_eq!(rules.decide(&ev), rules.decide(&ev), "rules decide alike");
    }
    let router = Router::new(template.clone(), ORIGIN)
        .with_rules(rules)
        .with_prefix(prefix.clone());
    let mut index = 0;
    let first = route_checked(&router, prefix.as_ref(), &ev, &mut index);

    // A restart compiles the same file again: same outcome, same errors, same routing.
    if let (Some(text), Some(compiled)) = (rules_text, &compiled) {
        let again = Rules::from_toml(text);
        assert_eq!(
            compiled.as_ref().err(),
            again.as_ref().err(),
            "a rules file compiles alike twice"
        );
        let router = Router::new(template, ORIGIN)
            .with_rules(again.ok())
            .with_prefix(prefix.clone());
        let mut index = 0;
        let second = route_checked(&router, prefix.as_ref(), &ev, &mut index);
        assert_same(&first, &second);
    }
}

/// Route `ev` twice, assert both results are identical and well formed; `next_index`
/// advances as in the relay.
fn route_checked(
    router: &Router,
    prefix: Option<&Template>,
    ev: &OutboxEvent,
    next_index: &mut u32,
) -> Vec<Envelope> {
    let start = *next_index;
    let envs = router.route(ev, COMMIT_LSN, next_index);
    let mut replay_index = start;
    let replay = router.route(ev, COMMIT_LSN, &mut replay_index);
    assert_eq!(*next_index, replay_index);
    assert_same(&envs, &replay);

    assert_eq!(
        u64::from(*next_index - start),
        envs.len() as u64,
        "one position per envelope"
    );
    let rendered_prefix = prefix.map(|p| p.render(ev));
    for (i, env) in envs.iter().enumerate() {
        assert_eq!(
            env.pos,
            Position {
                commit_lsn: COMMIT_LSN,
                index: start + i as u32,
            }
        );
        // Dead letters too: their subject becomes the tail of the dead-letter subject.
        if let Err(e) = validate_subject(&env.subject) {
            panic!("invalid subject {:?} ({e}) in {env:?}", env.subject);
        }
        if env.dead_letter.is_none()
            && let Some(p) = &rendered_prefix
        {
            let p = p.as_ref().unwrap_or_else(|e| {
                panic!("published although the prefix does not render ({e}): {env:?}")
            });
            let inside = env
                .subject
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
            assert!(inside, "{:?} is outside the prefix {p:?}", env.subject);
        }
        assert!(env.headers.get(headers::MSG_ID).is_some(), "{env:?}");
    }
    envs
}

fn assert_same(a: &[Envelope], b: &[Envelope]) {
    let key = |e: &Envelope| {
        (
            e.pos,
            e.subject.clone(),
            e.headers.clone(),
            e.payload.clone(),
            e.dead_letter.clone(),
            e.stream.clone(),
            e.committed_at_us,
            e.all_or_nothing,
        )
    };
    let a: Vec<_> = a.iter().map(key).collect();
    let b: Vec<_> = b.iter().map(key).collect();
    assert_eq!(a, b, "routing the same event twice differs");
}

/// The default `routing.subject`, which `Config::validate` checks parses.
fn default_template() -> Option<Template> {
    Template::parse(DEFAULT_TEMPLATE).ok()
}

/// The input of target `route`: sections separated by NUL bytes (which neither TOML, JSON
/// nor PostgreSQL text can hold):
///
/// 0. the rules file (TOML; empty or not UTF-8 = no rules file);
/// 1. the subject template (empty or invalid = [`DEFAULT_TEMPLATE`]);
/// 2. the enforced prefix template (empty or invalid = none);
/// 3. … 15. the event's columns in the order of [`crate::decode::ColumnMap::fields`]: `id`, `event_topic`,
///    `payload` (missing = empty), then the optional ones (missing or `\N` = NULL).
///
/// Sections after the last column are ignored.
pub struct RouteInput<'a> {
    pub rules: &'a [u8],
    pub template: &'a [u8],
    pub prefix: &'a [u8],
    pub event: OutboxEvent,
}

const NULL: &[u8] = b"\\N";

impl<'a> RouteInput<'a> {
    pub fn parse(data: &'a [u8]) -> RouteInput<'a> {
        let mut sections = data.split(|b| *b == 0);
        let mut next = || sections.next();
        let rules = next().unwrap_or_default();
        let template = next().unwrap_or_default();
        let prefix = next().unwrap_or_default();
        let mut required = || Bytes::copy_from_slice(next().unwrap_or_default());
        let mut event = OutboxEvent::new(required(), required(), required());
        let mut optional = || next().filter(|s| *s != NULL).map(Bytes::copy_from_slice);
        event.aggregate_type = optional();
        event.aggregate_id = optional();
        event.tenant_id = optional();
        event.source_bc = optional();
        event.destination_topics = optional();
        event.schema_id = optional();
        event.schema_version = optional();
        event.metadata = optional();
        event.occurred_at = optional();
        event.created_at = optional();
        RouteInput {
            rules,
            template,
            prefix,
            event,
        }
    }

    /// The bytes that [`RouteInput::parse`] reads back as these parts (for seeds and
    /// regression tests). A column holding a NUL byte or exactly `\N` cannot be written.
    pub fn encode(rules: &str, template: &str, prefix: &str, ev: &OutboxEvent) -> Vec<u8> {
        let optional = |v: &Option<Bytes>| v.as_deref().unwrap_or(NULL).to_vec();
        let sections: [Vec<u8>; 16] = [
            rules.as_bytes().to_vec(),
            template.as_bytes().to_vec(),
            prefix.as_bytes().to_vec(),
            ev.id.to_vec(),
            ev.event_topic.to_vec(),
            ev.payload.to_vec(),
            optional(&ev.aggregate_type),
            optional(&ev.aggregate_id),
            optional(&ev.tenant_id),
            optional(&ev.source_bc),
            optional(&ev.destination_topics),
            optional(&ev.schema_id),
            optional(&ev.schema_version),
            optional(&ev.metadata),
            optional(&ev.occurred_at),
            optional(&ev.created_at),
        ];
        sections.join(&0u8)
    }
}

#[cfg(test)]
mod tests;
