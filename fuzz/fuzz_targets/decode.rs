//! Any bytes must decode to a message or an error, never a panic, both for a
//! single pgoutput message and for a sequence that drives the relation cache
//! the way the relay does (Relation, then rows mapped to outbox events).
//!
//! Input: parsed whole as one message, then also as frames of
//! `[u16 big-endian length][message]` (a short last frame takes what is left).
//! Seeds: `cargo test --lib write_fuzz_seeds -- --ignored` in the main crate.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use outbox_relay::decode::{ColumnMap, PgMessage, RelationCache, parse};

fuzz_target!(|data: &[u8]| {
    let data = Bytes::copy_from_slice(data);
    let _ = parse(&data);

    // Both layouts, so a Debezium-shaped relation in the input can map too.
    let mut caches = [
        RelationCache::new("public", "outbox_events", ColumnMap::default()),
        RelationCache::new("public", "outbox_events", ColumnMap::debezium()),
    ];
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
                    }
                }
            }
            _ => {}
        }
    }
});
