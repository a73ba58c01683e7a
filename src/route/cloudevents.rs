//! CloudEvents 1.0 (`routing.cloudevents`): each message is also a CloudEvent, in the
//! binary or the structured content mode of the CloudEvents NATS protocol binding.
//!
//! - **binary**: the payload is untouched; the attributes are `ce-*` headers, and the
//!   data's media type is `content-type` (what CloudEvents SDKs read, sdk-go's NATS
//!   bindings among them) and `ce-datacontenttype` (the binding's own rule: every
//!   attribute as a `ce-` header).
//! - **structured**: the payload is the JSON event format, the routed payload embedded
//!   byte for byte as `data` when it is JSON, else as `data_base64`;
//!   `content-type: application/cloudevents+json`.
//!
//! The relay's own headers (`Nats-Msg-Id`, the position, `Outbox-Origin`) stay on every
//! message in both modes: restarts read them back to prove what is stored.
//!
//! Attributes (docs/configuration.md, "CloudEvents"): `id` the event id; `type` and
//! `source` from templates; `subject` the aggregate id; `time` the RFC 3339 form of
//! `occurred_at`; `dataschema` from a template, only when it renders an absolute URI.
//! A required attribute (`id`, `type`, `source`) that cannot be made dead-letters the
//! event with a reason naming the attribute and the key to change; an optional one that
//! cannot be made is left out. Pure and deterministic, like all of routing.

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine;
use percent_encoding::{AsciiSet, CONTROLS};

use super::Envelope;
use super::headers;
use super::template::TextTemplate;
use crate::decode::OutboxEvent;

/// The CloudEvents version written to `specversion`.
pub const SPECVERSION: &str = "1.0";
/// The media type of a structured-mode message (the JSON event format).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// The header carrying the data's media type in CloudEvents modes (lowercase, as
/// CloudEvents SDKs look it up; NATS header names are case-sensitive in most clients).
pub const CONTENT_TYPE: &str = "content-type";

pub const CE_SPECVERSION: &str = "ce-specversion";
pub const CE_ID: &str = "ce-id";
pub const CE_SOURCE: &str = "ce-source";
pub const CE_TYPE: &str = "ce-type";
pub const CE_SUBJECT: &str = "ce-subject";
pub const CE_TIME: &str = "ce-time";
pub const CE_DATASCHEMA: &str = "ce-dataschema";
pub const CE_DATACONTENTTYPE: &str = "ce-datacontenttype";

/// The content mode (`routing.cloudevents`; `"off"` is no [`CloudEvents`] at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Binary,
    Structured,
}

impl Mode {
    /// `"off"` → `None`; an unknown value is an error (the config names the key).
    pub fn parse(text: &str) -> Result<Option<Mode>, String> {
        match text {
            "off" => Ok(None),
            "binary" => Ok(Some(Mode::Binary)),
            "structured" => Ok(Some(Mode::Structured)),
            other => Err(format!(
                "must be \"off\", \"binary\" or \"structured\" (got {other:?})"
            )),
        }
    }
}

/// How events become CloudEvents.
#[derive(Debug, Clone)]
pub struct CloudEvents {
    mode: Mode,
    ty: TextTemplate,
    ty_text: String,
    source: TextTemplate,
    source_text: String,
    /// `None`: no `dataschema` (the template is empty).
    dataschema: Option<TextTemplate>,
    /// `outbox.content_type`: the data's media type for rows without their own.
    content_type: Option<String>,
}

/// The attributes of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes<'a> {
    pub id: &'a str,
    pub ty: String,
    pub source: String,
    pub subject: Option<&'a str>,
    pub time: Option<String>,
    pub dataschema: Option<String>,
    pub datacontenttype: Option<String>,
}

/// A template key of [`CloudEvents::new`] that does not parse: the key and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadKey {
    pub key: &'static str,
    pub problem: String,
}

impl CloudEvents {
    /// `ty`, `source`, `dataschema`: the templates of `routing.cloudevents_type`,
    /// `routing.cloudevents_source` and `routing.cloudevents_dataschema` (empty: none);
    /// `content_type`: `outbox.content_type` (empty: none).
    pub fn new(
        mode: Mode,
        ty: &str,
        source: &str,
        dataschema: &str,
        content_type: Option<&str>,
    ) -> Result<CloudEvents, BadKey> {
        let bad = |key| move |problem| BadKey { key, problem };
        Ok(CloudEvents {
            mode,
            ty: TextTemplate::parse(ty).map_err(bad("routing.cloudevents_type"))?,
            ty_text: ty.to_string(),
            source: TextTemplate::parse(source).map_err(bad("routing.cloudevents_source"))?,
            source_text: source.to_string(),
            dataschema: if dataschema.is_empty() {
                None
            } else {
                Some(
                    TextTemplate::parse(dataschema)
                        .map_err(bad("routing.cloudevents_dataschema"))?,
                )
            },
            content_type: content_type.filter(|c| !c.is_empty()).map(str::to_string),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The attributes of `ev` whose (routed) payload is `payload`, or the dead-letter
    /// reason: a required attribute that cannot be made.
    pub fn attributes<'a>(
        &self,
        ev: &'a OutboxEvent,
        payload: &[u8],
    ) -> Result<Attributes<'a>, String> {
        let id = ev.id_str();
        if id.is_empty() {
            return Err(
                "cloudevents attribute id is missing: the row's id is empty; give every row a non-empty id (outbox.columns.id)"
                    .into(),
            );
        }
        let required = |t: &TextTemplate, attr: &str, key: &str, text: &str| {
            t.render(ev).map_err(|f| {
                format!(
                    "cloudevents attribute {attr} is missing: field {} is null or empty but {key} ({text:?}) uses it; set the column or change {key}",
                    f.name()
                )
            })
        };
        let ty = required(&self.ty, "type", "routing.cloudevents_type", &self.ty_text)?;
        let source = required(
            &self.source,
            "source",
            "routing.cloudevents_source",
            &self.source_text,
        )?;
        let subject = super::Field::AggregateId
            .value(ev)
            .filter(|s| !s.is_empty());
        let time = ev
            .occurred_at
            .as_ref()
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(rfc3339);
        let dataschema = self
            .dataschema
            .as_ref()
            .and_then(|t| t.render(ev).ok())
            .filter(|s| is_absolute_uri(s));
        let datacontenttype = ev
            .content_type
            .as_ref()
            .and_then(|c| std::str::from_utf8(c).ok())
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .or_else(|| self.content_type.clone())
            .or_else(|| is_json(payload).then(|| "application/json".to_string()));
        Ok(Attributes {
            id,
            ty,
            source,
            subject,
            time,
            dataschema,
            datacontenttype,
        })
    }

    /// Makes `env` (routed from `ev`, its payload final) a CloudEvent, or a dead letter
    /// when a required attribute is missing. Dead letters are left as they are.
    pub fn apply(&self, ev: &OutboxEvent, env: &mut Envelope) {
        if env.dead_letter.is_some() {
            return;
        }
        let attrs = match self.attributes(ev, &env.payload) {
            Ok(a) => a,
            Err(reason) => {
                env.dead_letter = Some(reason);
                return;
            }
        };
        match self.mode {
            Mode::Binary => binary_headers(&mut env.headers, &attrs),
            Mode::Structured => {
                env.payload = structured(&attrs, &env.payload).into();
                env.headers.insert(
                    HeaderName::from_static(CONTENT_TYPE),
                    headers::value(STRUCTURED_CONTENT_TYPE),
                );
            }
        }
    }
}

/// The `ce-*` headers and `content-type` of the binary content mode.
pub fn binary_headers(h: &mut HeaderMap, a: &Attributes) {
    let mut put = |name: &'static str, value: &str| {
        h.insert(HeaderName::from_static(name), header_value(value));
    };
    put(CE_SPECVERSION, SPECVERSION);
    put(CE_ID, a.id);
    put(CE_SOURCE, &a.source);
    put(CE_TYPE, &a.ty);
    if let Some(s) = a.subject {
        put(CE_SUBJECT, s);
    }
    if let Some(t) = &a.time {
        put(CE_TIME, t);
    }
    if let Some(d) = &a.dataschema {
        put(CE_DATASCHEMA, d);
    }
    if let Some(c) = &a.datacontenttype {
        put(CE_DATACONTENTTYPE, c);
        h.insert(HeaderName::from_static(CONTENT_TYPE), headers::value(c));
    }
}

/// Characters the NATS binding requires percent-encoded in a header value: space,
/// `"`, `%`, and everything outside printable ASCII (controls included, as it
/// recommends); non-ASCII is encoded as its UTF-8 bytes, upper-case hex.
const HEADER_ENCODE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// An attribute value as a NATS header value: percent-encoded as the binding requires,
/// and with the `-`s of any `Nats-Msg-Id` in it written `%2D` (decodes to the same
/// value, and a NATS server cannot mistake it for the message id: see
/// `headers::sanitize`).
pub fn encode_header(value: &str) -> String {
    let mut out = percent_encoding::utf8_percent_encode(value, HEADER_ENCODE).to_string();
    while let Some(at) = headers::find_msg_id(out.as_bytes()) {
        // "nats-msg-id" is ASCII: these one-byte ranges are character boundaries.
        out.replace_range(at + 8..at + 9, "%2D");
        out.replace_range(at + 4..at + 5, "%2D");
    }
    out
}

fn header_value(value: &str) -> HeaderValue {
    encode_header(value).parse().unwrap_or_default()
}

/// `payload` is one JSON value (what a `json`/`jsonb` column holds).
pub fn is_json(payload: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

/// A JSON media type: `application/json`, `text/json` or any `…+json`, parameters
/// ignored, in any case.
pub fn is_json_type(media_type: &str) -> bool {
    let essence = media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// The structured content mode's payload: the JSON event format, `data` the payload's
/// own bytes when it is JSON (and its media type, if any, is a JSON one), else
/// `data_base64`.
pub fn structured(a: &Attributes, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 256);
    let field = |out: &mut Vec<u8>, name: &str, value: &str| {
        out.extend_from_slice(if out.is_empty() { b"{\"" } else { b",\"" });
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    };
    field(&mut out, "specversion", SPECVERSION);
    field(&mut out, "id", a.id);
    field(&mut out, "source", &a.source);
    field(&mut out, "type", &a.ty);
    if let Some(s) = a.subject {
        field(&mut out, "subject", s);
    }
    if let Some(t) = &a.time {
        field(&mut out, "time", t);
    }
    if let Some(c) = &a.datacontenttype {
        field(&mut out, "datacontenttype", c);
    }
    if let Some(d) = &a.dataschema {
        field(&mut out, "dataschema", d);
    }
    let json_type = a.datacontenttype.as_deref().is_none_or(is_json_type);
    if json_type && is_json(payload) {
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(payload);
    } else {
        field(
            &mut out,
            "data_base64",
            &base64::engine::general_purpose::STANDARD.encode(payload),
        );
    }
    out.push(b'}');
    out
}

/// An absolute URI (RFC 3986: a scheme, then anything): printable ASCII without spaces
/// (no IRI), and parsed by the WHATWG URL parser with no base.
pub fn is_absolute_uri(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()) && url::Url::parse(s).is_ok()
}

/// PostgreSQL's text form of a `timestamptz` (DateStyle ISO: `2026-12-05
/// 03:19:56.123456+00`, `… +05:30`, no fraction when it is zero) as RFC 3339
/// (`2026-12-05T03:19:56.123456+00:00`). `None` for what RFC 3339 cannot say: BC dates,
/// years beyond 9999, `infinity`, offsets with seconds (local mean time before 1900),
/// and anything else that is not that form (another DateStyle). RFC 3339 text (`T`,
/// `Z`), as a table-less event may carry, is accepted too.
pub fn rfc3339(pg: &str) -> Option<String> {
    let b = pg.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .filter(|d| d.iter().all(u8::is_ascii_digit))
            .map(|d| d.iter().fold(0u32, |n, c| n * 10 + u32::from(c - b'0')))
    };
    // YYYY-MM-DD HH:MM:SS (or already RFC 3339's `T`: a table-less event's own text)
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b' ' | b'T')
        || b[13] != b':'
    {
        return None;
    }
    if b[16] != b':' {
        return None;
    }
    let (_year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut i = 19;
    let frac_start = i;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let frac = &pg[frac_start..i];
    if b.get(i) == Some(&b'Z') && i + 1 == b.len() {
        return Some(format!("{}T{}{frac}+00:00", &pg[0..10], &pg[11..19]));
    }
    // Offset: +HH, +HH:MM or +HH:MM:SS (the last only with :00 seconds).
    let sign = *b.get(i)?;
    if sign != b'+' && sign != b'-' {
        return None;
    }
    let oh = digits(i + 1..i + 3)?;
    let mut om = 0;
    let mut end = i + 3;
    if b.get(end) == Some(&b':') {
        om = digits(end + 1..end + 3)?;
        end += 3;
        if b.get(end) == Some(&b':') {
            if digits(end + 1..end + 3)? != 0 {
                return None;
            }
            end += 3;
        }
    }
    if end != b.len() || oh > 23 || om > 59 {
        return None;
    }
    Some(format!(
        "{}T{}{frac}{}{oh:02}:{om:02}",
        &pg[0..10],
        &pg[11..19],
        sign as char
    ))
}

#[cfg(test)]
mod tests;
