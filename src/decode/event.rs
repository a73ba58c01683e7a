//! Turning an outbox row (a positional [`Tuple`]) into an [`OutboxEvent`].
//!
//! Column names are resolved to tuple positions once per Relation message
//! ([`RowMapping::resolve`]); each row is then mapped by index only, with the
//! values shared (not copied) from the replication buffer.

use bytes::Bytes;
use serde::Deserialize;

use super::pgoutput::{Tuple, TupleValue};
use super::relation::RelColumn;

/// Names of the outbox table's columns, one per [`OutboxEvent`] field
/// (`[outbox.columns]` in the config). Defaults are the ADR-004 table.
///
/// `id`, `event_topic` and `payload` must exist. The others are optional: a
/// name the table lacks yields `None`, and an empty name never maps, for a
/// table whose column of that name means something else.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnMap {
    pub id: String,
    pub event_topic: String,
    pub payload: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub tenant_id: String,
    pub source_bc: String,
    pub destination_topics: String,
    pub schema_id: String,
    pub schema_version: String,
    pub metadata: String,
    pub occurred_at: String,
    pub created_at: String,
    /// The payload's media type, written as the `Content-Type` header (optional; the
    /// default table has no such column, and `outbox.content_type` can name one type
    /// for every row instead).
    pub content_type: String,
}

impl Default for ColumnMap {
    fn default() -> Self {
        Self {
            id: "id".to_owned(),
            event_topic: "event_topic".to_owned(),
            payload: "payload".to_owned(),
            aggregate_type: "aggregate_type".to_owned(),
            aggregate_id: "aggregate_id".to_owned(),
            tenant_id: "tenant_id".to_owned(),
            source_bc: "source_bc".to_owned(),
            destination_topics: "destination_topics".to_owned(),
            schema_id: "schema_id".to_owned(),
            schema_version: "schema_version".to_owned(),
            metadata: "metadata".to_owned(),
            occurred_at: "occurred_at".to_owned(),
            created_at: "created_at".to_owned(),
            content_type: "content_type".to_owned(),
        }
    }
}

impl ColumnMap {
    /// The Debezium outbox layout (`id, aggregatetype, aggregateid, type,
    /// payload`), so tables built for Debezium's outbox router work as is.
    pub fn debezium() -> ColumnMap {
        ColumnMap {
            aggregate_type: "aggregatetype".to_owned(),
            aggregate_id: "aggregateid".to_owned(),
            event_topic: "type".to_owned(),
            ..ColumnMap::default()
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error(
        "outbox table has no column \"{column}\" for field {field}: set [outbox.columns] {field} to the column's name"
    )]
    MissingColumn { column: String, field: &'static str },
    #[error(
        "row for relation id {0} arrived before any relation message for it: replication protocol violation"
    )]
    UnknownRelation(u32),
    #[error("outbox row has null {field}: make its column NOT NULL")]
    NullRequired { field: &'static str },
    #[error(
        "outbox row has {got} values but its relation has {expected} columns: replication protocol violation"
    )]
    ShortTuple { expected: usize, got: usize },
    #[error(
        "outbox row has {got} values but its relation has {expected} columns: replication protocol violation"
    )]
    LongTuple { expected: usize, got: usize },
    #[error(
        "outbox row has an unchanged-toast placeholder for {field}: only inserts, which carry every value, can be relayed"
    )]
    UnchangedToast { field: &'static str },
    #[error(
        "outbox row's {field} is not valid utf-8: use a text, varchar or uuid column in a UTF8 database"
    )]
    NotUtf8 { field: &'static str },
    #[error(
        "outbox row's {field} arrived in binary format: the slot must stream pgoutput text format (no binary option)"
    )]
    BinaryValue { field: &'static str },
    #[error("outbox row's bytea payload is not valid bytea text: {0}")]
    BadBytea(#[from] super::bytea::ByteaError),
}

/// Tuple position of each [`OutboxEvent`] field for one version of the
/// outbox table's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowMapping {
    /// Column count of the relation, which every row must match.
    width: usize,
    id: usize,
    event_topic: usize,
    payload: usize,
    /// The payload column is `bytea`: its text form (`\\x…` hex) is decoded back to
    /// the bytes, which are what gets published.
    payload_bytea: bool,
    aggregate_type: Option<usize>,
    aggregate_id: Option<usize>,
    tenant_id: Option<usize>,
    source_bc: Option<usize>,
    destination_topics: Option<usize>,
    schema_id: Option<usize>,
    schema_version: Option<usize>,
    metadata: Option<usize>,
    occurred_at: Option<usize>,
    created_at: Option<usize>,
    content_type: Option<usize>,
}

impl RowMapping {
    pub fn resolve(columns: &[RelColumn], map: &ColumnMap) -> Result<RowMapping, MapError> {
        let find = |name: &str| {
            if name.is_empty() {
                None
            } else {
                columns.iter().position(|c| c.name == name)
            }
        };
        let required = |name: &String, field: &'static str| {
            find(name).ok_or_else(|| MapError::MissingColumn {
                column: name.clone(),
                field,
            })
        };
        let payload = required(&map.payload, "payload")?;
        Ok(RowMapping {
            width: columns.len(),
            id: required(&map.id, "id")?,
            event_topic: required(&map.event_topic, "event_topic")?,
            payload,
            payload_bytea: columns
                .get(payload)
                .is_some_and(|c| c.type_oid == super::bytea::BYTEA_OID),
            aggregate_type: find(&map.aggregate_type),
            aggregate_id: find(&map.aggregate_id),
            tenant_id: find(&map.tenant_id),
            source_bc: find(&map.source_bc),
            destination_topics: find(&map.destination_topics),
            schema_id: find(&map.schema_id),
            schema_version: find(&map.schema_version),
            metadata: find(&map.metadata),
            occurred_at: find(&map.occurred_at),
            created_at: find(&map.created_at),
            content_type: find(&map.content_type),
        })
    }

    pub fn event(&self, tuple: &Tuple) -> Result<OutboxEvent, MapError> {
        let values = tuple.0.as_slice();
        // A width mismatch means positions no longer mean what the Relation
        // said; mapping anyway could publish one column's value as another.
        if values.len() != self.width {
            let (expected, got) = (self.width, values.len());
            return Err(if got < expected {
                MapError::ShortTuple { expected, got }
            } else {
                MapError::LongTuple { expected, got }
            });
        }
        let id = required(values, self.id, "id")?;
        let event_topic = required(values, self.event_topic, "event_topic")?;
        for (value, field) in [(&id, "id"), (&event_topic, "event_topic")] {
            if std::str::from_utf8(value).is_err() {
                return Err(MapError::NotUtf8 { field });
            }
        }
        let mut payload = required(values, self.payload, "payload")?;
        if self.payload_bytea {
            payload = Bytes::from(super::bytea::decode(&payload)?);
        }
        Ok(OutboxEvent {
            id,
            event_topic,
            payload,
            aggregate_type: optional(values, self.aggregate_type, "aggregate_type")?,
            aggregate_id: optional(values, self.aggregate_id, "aggregate_id")?,
            tenant_id: optional(values, self.tenant_id, "tenant_id")?,
            source_bc: optional(values, self.source_bc, "source_bc")?,
            destination_topics: optional(values, self.destination_topics, "destination_topics")?,
            schema_id: optional(values, self.schema_id, "schema_id")?,
            schema_version: optional(values, self.schema_version, "schema_version")?,
            metadata: optional(values, self.metadata, "metadata")?,
            occurred_at: optional(values, self.occurred_at, "occurred_at")?,
            created_at: optional(values, self.created_at, "created_at")?,
            content_type: optional(values, self.content_type, "content_type")?,
        })
    }
}

impl RowMapping {
    /// A row [`RowMapping::event`] refused for what the row holds (a NULL required
    /// column, a value that is not UTF-8, an unchanged-toast placeholder), as an event
    /// to dead-letter: the row is already in the WAL, so stopping on it would stop
    /// every event after it. Named by its `id` when that is readable, else by its
    /// position; its topic and payload when present, so the dead letter shows them.
    pub fn unmappable_event(&self, tuple: &Tuple, commit_lsn: u64, index: u32) -> OutboxEvent {
        let values = tuple.0.as_slice();
        let text = |idx: Option<usize>| match idx.and_then(|i| values.get(i)) {
            Some(TupleValue::Text(b)) if std::str::from_utf8(b).is_ok() => Some(b.clone()),
            _ => None,
        };
        let id = text(Some(self.id)).unwrap_or_else(|| {
            Bytes::from(format!(
                "row-{}-{index}",
                crate::route::format_lsn(commit_lsn)
            ))
        });
        let topic =
            text(Some(self.event_topic)).unwrap_or_else(|| Bytes::from_static(b"unmappable_row"));
        let mut ev = OutboxEvent::new(id, topic, text(Some(self.payload)).unwrap_or_default());
        ev.aggregate_type = text(self.aggregate_type);
        ev.aggregate_id = text(self.aggregate_id);
        ev.tenant_id = text(self.tenant_id);
        ev
    }
}

impl MapError {
    /// Is the problem in this one row (dead-letter it) rather than in the mapping or
    /// the protocol (stop and say what to fix)?
    pub fn is_row_problem(&self) -> bool {
        matches!(
            self,
            MapError::NullRequired { .. }
                | MapError::UnchangedToast { .. }
                | MapError::NotUtf8 { .. }
                | MapError::BinaryValue { .. }
                | MapError::BadBytea(_)
        )
    }
}

fn required(values: &[TupleValue], idx: usize, field: &'static str) -> Result<Bytes, MapError> {
    optional(values, Some(idx), field)?.ok_or(MapError::NullRequired { field })
}

fn optional(
    values: &[TupleValue],
    idx: Option<usize>,
    field: &'static str,
) -> Result<Option<Bytes>, MapError> {
    let Some(idx) = idx else {
        return Ok(None);
    };
    match values.get(idx) {
        // Unreachable after the width check; kept as an error, not a panic.
        None => Err(MapError::ShortTuple {
            expected: idx.saturating_add(1),
            got: values.len(),
        }),
        Some(TupleValue::Null) => Ok(None),
        Some(TupleValue::Text(bytes)) => Ok(Some(bytes.clone())),
        Some(TupleValue::UnchangedToast) => Err(MapError::UnchangedToast { field }),
        Some(TupleValue::Binary(_)) => Err(MapError::BinaryValue { field }),
    }
}

/// One outbox row. Every value is the text-format bytes pgoutput sent,
/// sharing the replication buffer (zero-copy); `payload` is the JSON text
/// byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub id: Bytes,
    pub event_topic: Bytes,
    pub payload: Bytes,
    pub aggregate_type: Option<Bytes>,
    pub aggregate_id: Option<Bytes>,
    pub tenant_id: Option<Bytes>,
    pub source_bc: Option<Bytes>,
    pub destination_topics: Option<Bytes>,
    pub schema_id: Option<Bytes>,
    pub schema_version: Option<Bytes>,
    pub metadata: Option<Bytes>,
    pub occurred_at: Option<Bytes>,
    pub created_at: Option<Bytes>,
    /// The payload's media type (`Content-Type`), from its column when mapped.
    pub content_type: Option<Bytes>,
}

impl OutboxEvent {
    /// An event with only the required fields set.
    pub fn new(id: Bytes, event_topic: Bytes, payload: Bytes) -> OutboxEvent {
        OutboxEvent {
            id,
            event_topic,
            payload,
            aggregate_type: None,
            aggregate_id: None,
            tenant_id: None,
            source_bc: None,
            destination_topics: None,
            schema_id: None,
            schema_version: None,
            metadata: None,
            occurred_at: None,
            created_at: None,
            content_type: None,
        }
    }

    /// `id` as text. [`RowMapping::event`] rejects non-UTF-8 ids, so this is
    /// empty only for an event built by hand with invalid bytes (the fields
    /// are public, hence the re-check rather than an unchecked conversion).
    pub fn id_str(&self) -> &str {
        std::str::from_utf8(&self.id).unwrap_or_default()
    }

    /// `event_topic` as text; same guarantee as [`OutboxEvent::id_str`].
    pub fn event_topic_str(&self) -> &str {
        std::str::from_utf8(&self.event_topic).unwrap_or_default()
    }
}

/// Writes `fields` and `fields_mut` from one list of the fields, so the two cannot
/// disagree and a new column cannot be left out of one of them.
macro_rules! column_fields {
    ($($field:ident),* $(,)?) => {
        /// `(field, column)` for every mapped field, the required ones first.
        pub fn fields(&self) -> [(&'static str, &str); FIELDS] {
            [$((stringify!($field), &self.$field)),*]
        }

        fn fields_mut(&mut self) -> [(&'static str, &mut String); FIELDS] {
            [$((stringify!($field), &mut self.$field)),*]
        }
    };
}

/// How many fields an outbox row maps.
const FIELDS: usize = 14;
/// The fields a row cannot do without: the first ones of [`ColumnMap::fields`].
const REQUIRED: usize = 3;

impl ColumnMap {
    column_fields!(
        id,
        event_topic,
        payload,
        aggregate_type,
        aggregate_id,
        tenant_id,
        source_bc,
        destination_topics,
        schema_id,
        schema_version,
        metadata,
        occurred_at,
        created_at,
        content_type,
    );

    /// The column names of the optional fields, to blank those a table lacks.
    pub fn optional_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.fields_mut()
            .into_iter()
            .skip(REQUIRED)
            .map(|(_, column)| column)
    }

    /// The fields a row cannot do without.
    pub fn required_fields(&self) -> [(&'static str, &str); REQUIRED] {
        let all = self.fields();
        std::array::from_fn(|i| all[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[&str]) -> Vec<RelColumn> {
        names
            .iter()
            .map(|n| RelColumn {
                flags: 0,
                name: (*n).to_owned(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect()
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn required_and_optional_fields_partition_the_mapped_fields() {
        let mut map = ColumnMap::default();
        let required: Vec<&str> = map.required_fields().iter().map(|(f, _)| *f).collect();
        assert_eq!(required, ["id", "event_topic", "payload"]);
        for column in map.optional_mut() {
            column.clear();
        }
        let (blank, set): (Vec<_>, Vec<_>) =
            map.fields().into_iter().partition(|(_, c)| c.is_empty());
        assert_eq!(
            blank.len(),
            11,
            "every optional field is blanked: {blank:?}"
        );
        let set: Vec<&str> = set.iter().map(|(f, _)| *f).collect();
        assert_eq!(set, required, "and no required one");
    }

    #[test]
    fn default_names_are_adr_004() {
        let m = ColumnMap::default();
        assert_eq!(
            [
                m.id.as_str(),
                &m.event_topic,
                &m.payload,
                &m.aggregate_type,
                &m.aggregate_id,
                &m.tenant_id,
                &m.source_bc,
                &m.destination_topics,
                &m.schema_id,
                &m.schema_version,
                &m.metadata,
                &m.occurred_at,
                &m.created_at,
                &m.content_type,
            ],
            [
                "id",
                "event_topic",
                "payload",
                "aggregate_type",
                "aggregate_id",
                "tenant_id",
                "source_bc",
                "destination_topics",
                "schema_id",
                "schema_version",
                "metadata",
                "occurred_at",
                "created_at",
                "content_type",
            ]
        );
    }

    /// A `bytea` payload column (type oid 17) is published as the bytes its text form
    /// stands for; a `text` one as its bytes; a row whose bytea text is broken is a row
    /// problem (dead-lettered), not a stop.
    #[test]
    fn bytea_payloads_become_their_bytes_and_text_payloads_stay() {
        let mut columns = cols(&["id", "event_topic", "payload", "content_type"]);
        let row = |payload: &str| {
            Tuple(vec![
                text("e1"),
                text("stored"),
                text(payload),
                text("image/png"),
            ])
        };
        let as_text = RowMapping::resolve(&columns, &ColumnMap::default()).unwrap();
        let ev = as_text.event(&row("\\x00ff")).unwrap();
        assert_eq!(ev.payload.as_ref(), b"\\x00ff");
        assert_eq!(ev.content_type.as_deref(), Some(&b"image/png"[..]));

        columns[2].type_oid = super::super::bytea::BYTEA_OID;
        let bytea = RowMapping::resolve(&columns, &ColumnMap::default()).unwrap();
        assert_eq!(
            bytea.event(&row("\\x00ff7b")).unwrap().payload.as_ref(),
            [0, 0xff, b'{']
        );
        assert_eq!(
            bytea.event(&row("\\000\\\\")).unwrap().payload.as_ref(),
            [0, b'\\']
        );
        let err = bytea.event(&row("\\x0")).unwrap_err();
        assert!(err.is_row_problem());
        assert_eq!(
            err.to_string(),
            "outbox row's bytea payload is not valid bytea text: odd number of hexadecimal digits in the bytea text"
        );
        // The dead letter shows the text as it came.
        let dead = bytea.unmappable_event(&row("\\x0"), 1, 0);
        assert_eq!(dead.payload.as_ref(), b"\\x0");
    }

    #[test]
    fn config_overrides_some_names_and_rejects_unknown_keys() {
        let m: ColumnMap = serde_json::from_str(r#"{"event_topic":"type"}"#).unwrap();
        assert_eq!(m.event_topic, "type");
        assert_eq!(m.id, "id");
        assert!(serde_json::from_str::<ColumnMap>(r#"{"topic":"type"}"#).is_err());
    }

    #[test]
    fn debezium_layout_maps() {
        let m = ColumnMap::debezium();
        let columns = cols(&["id", "aggregatetype", "aggregateid", "type", "payload"]);
        let mapping = RowMapping::resolve(&columns, &m).unwrap();
        let row = Tuple(vec![
            text("9f1c"),
            text("order"),
            text("42"),
            text("OrderCreated"),
            text(r#"{"total": 10}"#),
        ]);
        let ev = mapping.event(&row).unwrap();
        assert_eq!(ev.id_str(), "9f1c");
        assert_eq!(ev.event_topic_str(), "OrderCreated");
        assert_eq!(ev.aggregate_type.as_deref(), Some(&b"order"[..]));
        assert_eq!(ev.aggregate_id.as_deref(), Some(&b"42"[..]));
        assert_eq!(ev.payload.as_ref(), br#"{"total": 10}"#);
        assert_eq!(ev.tenant_id, None);
        assert_eq!(ev.created_at, None);

        // The default map does not fit a Debezium table: it says what to set.
        let err = RowMapping::resolve(&columns, &ColumnMap::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "outbox table has no column \"event_topic\" for field event_topic: \
             set [outbox.columns] event_topic to the column's name"
        );
    }

    #[test]
    fn empty_name_disables_optional_field() {
        let m = ColumnMap {
            metadata: String::new(),
            ..ColumnMap::default()
        };
        let mapping =
            RowMapping::resolve(&cols(&["id", "event_topic", "payload", "metadata"]), &m).unwrap();
        let row = Tuple(vec![text("1"), text("t"), text("{}"), text("x")]);
        assert_eq!(mapping.event(&row).unwrap().metadata, None);
    }

    #[test]
    fn every_optional_field_maps_from_its_column() {
        let names = [
            "created_at",
            "occurred_at",
            "metadata",
            "schema_version",
            "schema_id",
            "destination_topics",
            "source_bc",
            "tenant_id",
            "aggregate_id",
            "aggregate_type",
            "payload",
            "event_topic",
            "id",
        ];
        let mapping = RowMapping::resolve(&cols(&names), &ColumnMap::default()).unwrap();
        // Each value is its column's name, so a crossed wire shows up.
        let row = Tuple(names.iter().map(|n| text(n)).collect());
        let ev = mapping.event(&row).unwrap();
        let got = [
            ev.created_at,
            ev.occurred_at,
            ev.metadata,
            ev.schema_version,
            ev.schema_id,
            ev.destination_topics,
            ev.source_bc,
            ev.tenant_id,
            ev.aggregate_id,
            ev.aggregate_type,
            Some(ev.payload),
            Some(ev.event_topic),
            Some(ev.id),
        ];
        for (name, value) in names.iter().zip(got) {
            assert_eq!(value.as_deref(), Some(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn row_errors() {
        let mapping = RowMapping::resolve(
            &cols(&["id", "event_topic", "payload", "aggregate_id"]),
            &ColumnMap::default(),
        )
        .unwrap();
        let row = |v: Vec<TupleValue>| mapping.event(&Tuple(v));

        assert_eq!(
            row(vec![text("1"), text("t"), text("{}")]),
            Err(MapError::ShortTuple {
                expected: 4,
                got: 3
            })
        );
        assert_eq!(
            row(vec![text("1"), text("t"), text("{}"), text("a"), text("b")]),
            Err(MapError::LongTuple {
                expected: 4,
                got: 5
            })
        );
        assert_eq!(
            row(vec![TupleValue::Null, text("t"), text("{}"), text("a")]),
            Err(MapError::NullRequired { field: "id" })
        );
        assert_eq!(
            row(vec![text("1"), text("t"), TupleValue::Null, text("a")]),
            Err(MapError::NullRequired { field: "payload" })
        );
        assert_eq!(
            row(vec![
                text("1"),
                text("t"),
                text("{}"),
                TupleValue::UnchangedToast
            ]),
            Err(MapError::UnchangedToast {
                field: "aggregate_id"
            })
        );
        assert_eq!(
            row(vec![
                text("1"),
                TupleValue::Text(Bytes::from_static(b"\xff")),
                text("{}"),
                TupleValue::Null
            ]),
            Err(MapError::NotUtf8 {
                field: "event_topic"
            })
        );
        assert_eq!(
            row(vec![
                TupleValue::Binary(Bytes::from_static(b"1")),
                text("t"),
                text("{}"),
                TupleValue::Null
            ]),
            Err(MapError::BinaryValue { field: "id" })
        );
    }

    #[test]
    fn hand_built_invalid_event_does_not_panic() {
        let ev = OutboxEvent::new(
            Bytes::from_static(b"\xff"),
            Bytes::from_static(b"t"),
            Bytes::new(),
        );
        assert_eq!(ev.id_str(), "");
        assert_eq!(ev.event_topic_str(), "t");
    }
}
