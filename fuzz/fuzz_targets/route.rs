//! Routing never panics and is deterministic, whatever the rules file, subject
//! template, enforced prefix and event: the input is split at NUL bytes into
//! those parts (layout: `outbox_relay::fuzzing::RouteInput`). The body is
//! `outbox_relay::fuzzing::route_one`, which `cargo test` also runs on every
//! file of `fuzz/corpus/route`.
//!
//! Seeds: `cargo test --lib write_route_fuzz_seeds -- --ignored` in the main crate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outbox_relay::fuzzing::route_one(data));
