//! The event as rules see it: field paths (a column, `payload.…`, `metadata.…`), columns
//! as text, payload and metadata JSON parsed on first use.

use std::cell::OnceCell;

use serde_json::Value;

use crate::decode::OutboxEvent;
use crate::route::template::Field;

pub(super) struct View<'a> {
    pub(super) ev: &'a OutboxEvent,
    payload: OnceCell<Option<Value>>,
    metadata: OnceCell<Option<Value>>,
}

impl<'a> View<'a> {
    pub(super) fn new(ev: &'a OutboxEvent) -> Self {
        Self {
            ev,
            payload: OnceCell::new(),
            metadata: OnceCell::new(),
        }
    }

    pub(super) fn payload(&self) -> Option<&Value> {
        self.payload
            .get_or_init(|| serde_json::from_slice(&self.ev.payload).ok())
            .as_ref()
    }

    fn metadata(&self) -> Option<&Value> {
        self.metadata
            .get_or_init(|| {
                self.ev
                    .metadata
                    .as_ref()
                    .and_then(|m| serde_json::from_slice(m).ok())
            })
            .as_ref()
    }

    pub(super) fn resolve(&self, path: &FieldPath) -> Option<Val<'_>> {
        match path {
            FieldPath::Column(c) => c.value(self.ev).map(Val::Text),
            FieldPath::Payload(segs) => walk(self.payload()?, segs).map(Val::Json),
            FieldPath::Metadata(segs) => walk(self.metadata()?, segs).map(Val::Json),
        }
    }
}

fn walk<'v>(mut v: &'v Value, segs: &[String]) -> Option<&'v Value> {
    for s in segs {
        v = match v {
            Value::Object(m) => m.get(s)?,
            Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// A resolved field: a column's text or a JSON value.
#[derive(Debug, Clone, Copy)]
pub(super) enum Val<'a> {
    Text(&'a str),
    Json(&'a Value),
}

impl Val<'_> {
    pub(super) fn to_text(self) -> Option<String> {
        match self {
            Val::Text(s) => Some(s.to_owned()),
            Val::Json(Value::String(s)) => Some(s.clone()),
            Val::Json(Value::Null) => None,
            Val::Json(v) => serde_json::to_string(v).ok(),
        }
    }
}

/// A column a condition can name: the subject template's fields, plus three a subject
/// has no use for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Column {
    Id,
    Field(Field),
    OccurredAt,
    CreatedAt,
}

/// Every column a condition can name, in table order.
fn columns() -> impl Iterator<Item = (&'static str, Column)> {
    std::iter::once(("id", Column::Id))
        .chain(Field::ALL.iter().map(|&(n, f)| (n, Column::Field(f))))
        .chain([
            ("occurred_at", Column::OccurredAt),
            ("created_at", Column::CreatedAt),
        ])
}

impl Column {
    fn value(self, ev: &OutboxEvent) -> Option<&str> {
        let bytes = match self {
            Column::Field(f) => return f.value(ev),
            Column::Id => &ev.id,
            Column::OccurredAt => ev.occurred_at.as_ref()?,
            Column::CreatedAt => ev.created_at.as_ref()?,
        };
        std::str::from_utf8(bytes).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FieldPath {
    Column(Column),
    Payload(Vec<String>),
    Metadata(Vec<String>),
}

impl FieldPath {
    pub(super) fn parse(text: &str) -> Result<FieldPath, String> {
        let (head, rest) = match text.split_once('.') {
            Some((h, r)) => (h, Some(r)),
            None => (text, None),
        };
        let segments = || -> Result<Vec<String>, String> {
            match rest {
                None => Ok(Vec::new()),
                Some(r) => split_path(r).map_err(|e| format!("field path {text:?}: {e}")),
            }
        };
        match head {
            "payload" => Ok(FieldPath::Payload(segments()?)),
            "metadata" => Ok(FieldPath::Metadata(segments()?)),
            _ => match columns().find(|(n, _)| *n == head) {
                Some((_, c)) if rest.is_none() => Ok(FieldPath::Column(c)),
                Some(_) => Err(format!(
                    "field path {text:?}: column {head} is text and has no sub-fields"
                )),
                None => {
                    let known: Vec<&str> = columns().map(|(n, _)| n).collect();
                    Err(format!(
                        "unknown field {text:?}: use a column ({}), payload.<path> or metadata.<path>",
                        known.join(", ")
                    ))
                }
            },
        }
    }
}

/// `a.b.c` → segments; no empty segment.
pub(super) fn split_path(text: &str) -> Result<Vec<String>, String> {
    if text.is_empty() {
        return Err("path is empty".into());
    }
    let segs: Vec<String> = text.split('.').map(str::to_owned).collect();
    if segs.iter().any(String::is_empty) {
        return Err(format!("path {text:?} has an empty segment"));
    }
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::route::rules::testkit::{PAYLOAD, b, event, holds_on};

    #[test]
    fn payload_or_metadata_not_json_is_missing() {
        for bad in ["not json", "", "[1, 2]", "42"] {
            let ev = event(bad);
            assert!(!holds_on(r#"{ "payload.price" = 1 }"#, &ev), "{bad}");
            assert!(
                holds_on(r#"{ "payload.price" = { "$ne" = 1 } }"#, &ev),
                "{bad}"
            );
            assert!(
                holds_on(r#"{ "payload.price" = { "$exists" = false } }"#, &ev),
                "{bad}"
            );
            assert!(
                !holds_on(r#"{ "payload.price" = { "$gt" = 0 } }"#, &ev),
                "{bad}"
            );
        }
        // The whole payload is comparable when it is JSON.
        assert!(holds_on(
            r#"{ payload = { "$eq" = [1, 2] } }"#,
            &event("[1, 2]")
        ));
        assert!(holds_on(r#"{ payload = { "$gt" = 41 } }"#, &event("42")));

        let mut ev = event(PAYLOAD);
        ev.metadata = None;
        assert!(!holds_on(r#"{ "metadata.region" = "eu" }"#, &ev));
        assert!(holds_on(r#"{ "metadata" = { "$exists" = false } }"#, &ev));
        ev.metadata = Some(b("{broken"));
        assert!(holds_on(r#"{ "metadata.region" = { "$ne" = "eu" } }"#, &ev));
    }

    #[test]
    fn column_bool_and_non_utf8() {
        let mut ev = event(PAYLOAD);
        ev.source_bc = Some(b("t"));
        assert!(holds_on(r#"{ source_bc = true }"#, &ev));
        assert!(!holds_on(r#"{ source_bc = false }"#, &ev));
        ev.source_bc = Some(Bytes::from_static(b"\xff"));
        assert!(holds_on(r#"{ source_bc = { "$exists" = false } }"#, &ev));
    }
}
