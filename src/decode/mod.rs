//! Pure pgoutput decoding: bytes in, typed messages and outbox events out.
//!
//! No I/O and no async, so everything here is unit-, property- and
//! fuzz-tested in isolation (`fuzz/`, target `decode`).
//!
//! - [`pgoutput`]: [`parse`] one pgoutput message (protocol 1 layout) into a
//!   [`PgMessage`]. Column values and message contents are [`bytes::Bytes`]
//!   slices of the input buffer, so the hot path never copies row data.
//! - [`relation`]: [`RelationCache`] remembers the latest Relation message per
//!   relation id and, for the configured outbox table, its [`RowMapping`].
//! - [`event`]: [`ColumnMap`] (config: which column holds which field),
//!   [`RowMapping`] (those names resolved to tuple positions) and
//!   [`OutboxEvent`] (one mapped row).
//! - [`bytea`]: a `bytea` payload's text form (hex or escape) back to its bytes.
//! - [`message`]: a transactional logical message (`pg_logical_emit_message`) as an
//!   [`OutboxEvent`], for table-less events.
//!
//! A row is relayed as: `parse` → `PgMessage::Insert` →
//! `RelationCache::mapping(relation_id)` → `RowMapping::event(&tuple)`.
//!
//! Only the table whose catalog namespace and name match is the outbox. With
//! a partitioned outbox table, rows arrive under each partition's name unless
//! the publication sets `publish_via_partition_root = true`.
//!
//! Nothing panics on any input: malformed bytes are a [`DecodeError`], rows
//! that do not fit the table's columns a [`MapError`].

pub mod bytea;
pub mod event;
pub mod message;
pub mod pgoutput;
pub mod relation;

#[cfg(test)]
mod encode;

pub use event::{ColumnMap, MapError, OutboxEvent, RowMapping};
pub use pgoutput::{DecodeError, PgMessage, Tuple, TupleValue, parse};
pub use relation::{RelColumn, Relation, RelationCache};
