//! A `bytea` payload's text form (either `bytea_output` format, or anything else) decodes
//! to bytes or an error, never a panic, and what PostgreSQL would write for any bytes
//! decodes back to them. The body is `outbox_relay::fuzzing::bytea_one`, which
//! `cargo test` also runs on every file of `fuzz/corpus/bytea`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outbox_relay::fuzzing::bytea_one(data));
