//! Relation (table schema) cache keyed by relation id.
//!
//! pgoutput sends a Relation message before the first row of each table in a
//! session and again after any schema change, always before the next row that
//! depends on it. Rows only carry the relation id and positional values, so
//! the latest Relation is what gives those positions their meaning.

use std::collections::HashMap;

use super::event::{ColumnMap, MapError, RowMapping};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    /// Bit 1 marks a replica identity (key) column.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

#[derive(Debug)]
enum Entry {
    /// A published table that is not the outbox; its rows are ignored.
    Other,
    /// The outbox table, with the mapping from its current columns or the
    /// reason they cannot be mapped.
    Outbox(Box<Result<RowMapping, MapError>>),
}

/// Latest known Relation per id, with the outbox table's [`RowMapping`]
/// computed once per Relation message rather than once per row.
#[derive(Debug)]
pub struct RelationCache {
    target_namespace: String,
    target_table: String,
    columns: ColumnMap,
    entries: HashMap<u32, Entry>,
}

impl RelationCache {
    /// `target_namespace`/`target_table` are compared byte for byte with the
    /// catalog names PostgreSQL sends, so an unquoted `Outbox` must be given
    /// as `outbox`.
    pub fn new(target_namespace: &str, target_table: &str, columns: ColumnMap) -> Self {
        Self {
            target_namespace: target_namespace.to_owned(),
            target_table: target_table.to_owned(),
            columns,
            entries: HashMap::new(),
        }
    }

    /// Store/replace a Relation (PostgreSQL re-sends Relation after ALTER
    /// TABLE, before the next row; column order may change). Recomputes the
    /// RowMapping for it if it is the target table; a target table whose
    /// columns do not satisfy the ColumnMap records the MapError so that rows
    /// for it produce that error (not failing here: the relation message may
    /// precede an ALTER that fixes it, and no row may ever need it).
    pub fn update(&mut self, rel: Relation) {
        let entry = if rel.namespace == self.target_namespace && rel.name == self.target_table {
            Entry::Outbox(Box::new(RowMapping::resolve(&rel.columns, &self.columns)))
        } else {
            // A rename away from the target lands here too, so rows of the
            // renamed table stop being relayed, as the config asks.
            Entry::Other
        };
        self.entries.insert(rel.id, entry);
    }

    /// Mapping for a relation id: Ok(None) = not the outbox table (row
    /// ignored), Ok(Some(mapping)) = outbox, Err = unknown relation id
    /// (protocol violation) or a mapping error.
    pub fn mapping(&self, relation_id: u32) -> Result<Option<&RowMapping>, MapError> {
        match self.entries.get(&relation_id) {
            None => Err(MapError::UnknownRelation(relation_id)),
            Some(Entry::Other) => Ok(None),
            Some(Entry::Outbox(m)) => match m.as_ref() {
                Ok(mapping) => Ok(Some(mapping)),
                Err(err) => Err(err.clone()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::decode::{Tuple, TupleValue};

    fn col(name: &str) -> RelColumn {
        RelColumn {
            flags: 0,
            name: name.to_owned(),
            type_oid: 25,
            type_modifier: -1,
        }
    }

    fn rel(id: u32, namespace: &str, name: &str, cols: &[&str]) -> Relation {
        Relation {
            id,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            replica_identity: b'd',
            columns: cols.iter().map(|c| col(c)).collect(),
        }
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn cache() -> RelationCache {
        RelationCache::new("public", "outbox_events", ColumnMap::default())
    }

    #[test]
    fn unknown_relation_is_an_error() {
        assert_eq!(cache().mapping(7), Err(MapError::UnknownRelation(7)));
    }

    #[test]
    fn other_tables_are_ignored() {
        let mut c = cache();
        c.update(rel(
            1,
            "public",
            "orders",
            &["id", "event_topic", "payload"],
        ));
        // Same name in another schema is not the outbox either.
        c.update(rel(
            2,
            "audit",
            "outbox_events",
            &["id", "event_topic", "payload"],
        ));
        assert_eq!(c.mapping(1), Ok(None));
        assert_eq!(c.mapping(2), Ok(None));
    }

    #[test]
    fn alter_table_with_new_column_order_is_followed() {
        let mut c = cache();
        c.update(rel(
            5,
            "public",
            "outbox_events",
            &["id", "event_topic", "payload"],
        ));
        let row = Tuple(vec![text("1"), text("t.a"), text("{}")]);
        let ev = c.mapping(5).unwrap().unwrap().event(&row).unwrap();
        assert_eq!(ev.id_str(), "1");
        assert_eq!(ev.tenant_id, None);

        // After ALTER TABLE ADD COLUMN tenant_id, and with the relation
        // re-sent in a different order (e.g. after a table rewrite).
        c.update(rel(
            5,
            "public",
            "outbox_events",
            &["payload", "tenant_id", "id", "event_topic"],
        ));
        let row = Tuple(vec![
            text("{\"a\":1}"),
            text("acme"),
            text("2"),
            text("t.b"),
        ]);
        let ev = c.mapping(5).unwrap().unwrap().event(&row).unwrap();
        assert_eq!(ev.id_str(), "2");
        assert_eq!(ev.event_topic_str(), "t.b");
        assert_eq!(ev.payload, Bytes::from_static(b"{\"a\":1}"));
        assert_eq!(ev.tenant_id, Some(Bytes::from_static(b"acme")));
    }

    #[test]
    fn missing_required_column_fails_rows_until_fixed() {
        let mut c = cache();
        c.update(rel(9, "public", "outbox_events", &["id", "payload"]));
        let expected = MapError::MissingColumn {
            column: "event_topic".to_owned(),
            field: "event_topic",
        };
        assert_eq!(c.mapping(9), Err(expected));

        c.update(rel(
            9,
            "public",
            "outbox_events",
            &["id", "payload", "event_topic"],
        ));
        assert!(c.mapping(9).unwrap().is_some());
    }

    #[test]
    fn renamed_away_target_is_ignored() {
        let mut c = cache();
        c.update(rel(
            3,
            "public",
            "outbox_events",
            &["id", "event_topic", "payload"],
        ));
        c.update(rel(
            3,
            "public",
            "outbox_old",
            &["id", "event_topic", "payload"],
        ));
        assert_eq!(c.mapping(3), Ok(None));
    }

    #[test]
    fn nulls_in_optional_and_required_columns() {
        let mut c = cache();
        c.update(rel(
            4,
            "public",
            "outbox_events",
            &["id", "event_topic", "payload", "aggregate_id", "metadata"],
        ));
        let m = c.mapping(4).unwrap().unwrap();
        let ok = Tuple(vec![
            text("1"),
            text("t"),
            text("{}"),
            TupleValue::Null,
            TupleValue::Null,
        ]);
        let ev = m.event(&ok).unwrap();
        assert_eq!(ev.aggregate_id, None);
        assert_eq!(ev.metadata, None);

        let bad = Tuple(vec![
            text("1"),
            TupleValue::Null,
            text("{}"),
            TupleValue::Null,
            TupleValue::Null,
        ]);
        assert_eq!(
            m.event(&bad),
            Err(MapError::NullRequired {
                field: "event_topic"
            })
        );
    }
}
