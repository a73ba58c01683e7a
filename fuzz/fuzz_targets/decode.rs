//! Any bytes must decode to a message or an error, never a panic, both for a
//! single pgoutput message and for a sequence that drives the relation cache
//! the way the relay does; every decoded event is routed and checked. The body
//! is `outbox_relay::fuzzing::decode_one`, which `cargo test` also runs on every
//! file of `fuzz/corpus/decode`.
//!
//! Seeds: `cargo test --lib write_fuzz_seeds -- --ignored` in the main crate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outbox_relay::fuzzing::decode_one(data));
