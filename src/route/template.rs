//! Subject templates such as `outbox.{aggregate_type}.{event_topic}`.

use super::subject::{is_single_token, sanitize_token, validate_subject};
use crate::decode::OutboxEvent;

/// Event fields a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    EventTopic,
    AggregateType,
    AggregateId,
    TenantId,
    SourceBc,
    SchemaId,
    SchemaVersion,
}

impl Field {
    pub const ALL: [(&'static str, Field); 7] = [
        ("event_topic", Field::EventTopic),
        ("aggregate_type", Field::AggregateType),
        ("aggregate_id", Field::AggregateId),
        ("tenant_id", Field::TenantId),
        ("source_bc", Field::SourceBc),
        ("schema_id", Field::SchemaId),
        ("schema_version", Field::SchemaVersion),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("?", |(n, _)| n)
    }

    /// The field's text, `None` when the column is NULL or not in the table.
    pub fn value(self, ev: &OutboxEvent) -> Option<&str> {
        let bytes = match self {
            Field::EventTopic => Some(&ev.event_topic),
            Field::AggregateType => ev.aggregate_type.as_ref(),
            Field::AggregateId => ev.aggregate_id.as_ref(),
            Field::TenantId => ev.tenant_id.as_ref(),
            Field::SourceBc => ev.source_bc.as_ref(),
            Field::SchemaId => ev.schema_id.as_ref(),
            Field::SchemaVersion => ev.schema_version.as_ref(),
        }?;
        std::str::from_utf8(bytes).ok()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Field(Field),
    /// `{partition:N}`: [`partition`] of the aggregate id.
    Partition(u32),
}

/// Most partitions a `{partition:N}` placeholder may name.
pub const MAX_PARTITIONS: u32 = 1_000_000;

/// The partition of `key` among `n`: FNV-1a (32-bit) of its bytes, modulo `n`. The same
/// function as nats-server's subject-mapping `partition(n, k)` over one token (its
/// `getHashPartition`), so a consumer may compute it either way: `{partition:N}` in a
/// subject equals the server's `{{partition(N,k)}}` where token `k` is the aggregate id.
pub fn partition(key: &[u8], n: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % n.max(1)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The `{field}` placeholders and literal text of a template.
fn parse_parts(text: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Literal(rest[..open].to_string()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("unclosed {{ in {text:?}"));
        };
        let name = &rest[open + 1..open + close];
        if let Some(n) = name.strip_prefix("partition:") {
            let n = n
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_PARTITIONS).contains(n))
                    .ok_or_else(|| {
                        format!("{{{name}}}: the partition count must be a whole number from 1 to {MAX_PARTITIONS}")
                    })?;
            parts.push(Part::Partition(n));
            rest = &rest[open + close + 1..];
            continue;
        }
        let field = Field::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                let known: Vec<&str> = Field::ALL.iter().map(|(n, _)| *n).collect();
                format!("unknown field {{{name}}}; known: {}", known.join(", "))
            })?;
        parts.push(Part::Field(field));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_string()));
    }
    for p in &parts {
        if let Part::Literal(l) = p
            && l.contains('}')
        {
            return Err(format!("unmatched }} in {text:?}"));
        }
    }
    Ok(parts)
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let parts = parse_parts(text)?;
        // A template must be a valid subject with every field filled in.
        let probe: String = parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.as_str(),
                Part::Field(_) | Part::Partition(_) => "x",
            })
            .collect();
        validate_subject(&probe)?;
        Ok(Template { parts })
    }

    /// The partition count of a `{partition:N}` placeholder, if the template has one.
    pub fn partitions(&self) -> Option<u32> {
        self.parts.iter().find_map(|p| match p {
            Part::Partition(n) => Some(*n),
            _ => None,
        })
    }

    /// `ev`'s partition under this template's `{partition:N}` (none without one, or
    /// without an aggregate id, when the subject does not render either).
    pub fn partition_of(&self, ev: &OutboxEvent) -> Option<u32> {
        let n = self.partitions()?;
        Some(partition(Field::AggregateId.value(ev)?.as_bytes(), n))
    }

    /// The subject for `ev`; an error (a dead-letter reason) when a field it needs is NULL
    /// or the result is not a valid subject.
    pub fn render(&self, ev: &OutboxEvent) -> Result<String, String> {
        self.render_with(ev, false)
    }

    /// The enforced prefix (`routing.subject_prefix`) for `ev`: as [`Template::render`],
    /// but every field value must be one subject token as written. Otherwise tenant
    /// `acme.x` would get a prefix inside tenant `acme`'s, and tenant `a b` would share
    /// tenant `a_b`'s.
    pub fn render_prefix(&self, ev: &OutboxEvent) -> Result<String, String> {
        self.render_with(ev, true)
    }

    fn render_with(&self, ev: &OutboxEvent, single_tokens: bool) -> Result<String, String> {
        let mut out = String::with_capacity(64);
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Partition(n) => {
                    let id = Field::AggregateId
                        .value(ev)
                        .filter(|v| !v.is_empty())
                        .ok_or("field aggregate_id is null or empty but {partition:N} hashes it")?;
                    use std::fmt::Write;
                    let _ = write!(out, "{}", partition(id.as_bytes(), *n));
                }
                Part::Field(f) => {
                    let v = f.value(ev).filter(|v| !v.is_empty()).ok_or_else(|| {
                        format!(
                            "field {} is null or empty but routing.subject uses it",
                            f.name()
                        )
                    })?;
                    if single_tokens && !is_single_token(v) {
                        return Err(format!(
                            "field {} is {}, not one subject token (a prefix field may not contain '.', '*', '>', whitespace or control characters)",
                            f.name(),
                            super::quoted(v)
                        ));
                    }
                    if v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                    {
                        out.push_str(v);
                    } else {
                        out.push_str(&sanitize_token(v));
                    }
                }
            }
        }
        validate_subject(&out)
            .map_err(|e| format!("routed subject {}: {e}", super::quoted(&out)))?;
        Ok(out)
    }
}

/// A template of free text over the event's fields (the CloudEvents `type`, `source`
/// and `dataschema`): the same placeholders as a subject template, values inserted as
/// written (no subject sanitising), any literal text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextTemplate {
    parts: Vec<Part>,
}

impl TextTemplate {
    /// Parses `text`; an empty template is refused (it would render nothing).
    pub fn parse(text: &str) -> Result<TextTemplate, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        Ok(TextTemplate {
            parts: parse_parts(text)?,
        })
    }

    /// The text for `ev`, or the first field it needs that is NULL, empty or not UTF-8.
    pub fn render(&self, ev: &OutboxEvent) -> Result<String, Field> {
        let mut out = String::with_capacity(64);
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Field(f) => out.push_str(f.value(ev).filter(|v| !v.is_empty()).ok_or(*f)?),
                Part::Partition(n) => {
                    let id = Field::AggregateId
                        .value(ev)
                        .filter(|v| !v.is_empty())
                        .ok_or(Field::AggregateId)?;
                    use std::fmt::Write;
                    let _ = write!(out, "{}", partition(id.as_bytes(), *n));
                }
            }
        }
        Ok(out)
    }
}
