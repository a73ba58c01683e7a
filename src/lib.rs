//! outbox-relay: streams outbox INSERTs from PostgreSQL logical replication (pgoutput) to
//! NATS JetStream, in commit order, exactly once.
//!
//! Map of the crate, in the order data flows (see `docs/architecture.md`):
//!
//! - [`config`]: typed TOML config, `OUTBOX_RELAY_*` env overrides, validation naming keys.
//! - [`error`]: transient vs fatal errors, each with a hint for the operator.
//! - [`secret`]: passwords, tokens and URLs that print as `***`.
//! - [`source`]: replication stream (transport: `pgwire-replication`) and SQL admin
//!   (slot, publication, migrations, environment checks).
//! - [`decode`]: pure pgoutput parser, relation cache, row → [`decode::OutboxEvent`].
//! - [`route`]: pure routing: subject template, rules file, `destination_topics`, headers,
//!   CloudEvents (`routing.cloudevents`).
//! - [`placement`]: per-event decisions: each copy's stream, or why it is dead-lettered
//!   (size, no stream, schedules, fallbacks, `all_or_nothing`), before publishing.
//! - [`sink`]: JetStream publishing with pipelined PubAcks, dead letters, streams.
//! - [`telemetry`]: OpenTelemetry: a PRODUCER span per message carrying a `traceparent`,
//!   the relay's span written back into that header, OTLP/HTTP export off the hot path.
//! - [`progress`]: in-order ack tracker → the position safe to confirm.
//! - [`checkpoint`]: persisted position (NATS KV), bound to the server, and the
//!   read-back of the streams that proves which replays are already stored;
//!   [`floors`]: where that read-back must start in each stream (pure).
//! - [`resume`]: where a session resumes: refuses other clusters and slot gaps, and
//!   handles promotions (pure).
//! - [`app`]: the supervisor loop and one streaming session (wires the above).
//! - [`cli`]: `check` and `status` reports.
//! - [`audit`]: `audit`: the outbox table against what the streams hold, row by row;
//!   [`replay`]: `replay --fill`, what the audit found missing, once.
//! - [`monitor`]: SQL-side watch beside a session: slot lag and the lag guard, lost
//!   slots, heartbeat, retention.
//! - [`http`], [`metrics`]: `/healthz`, `/readyz`, `/metrics` and the shared counters.
//! - `fuzzing` (hidden): the bodies of the fuzz targets in `fuzz/`, whose corpora
//!   `cargo test` replays.
pub mod app;
pub mod audit;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod decode;
pub mod error;
pub mod floors;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod metrics;
pub mod monitor;
pub mod placement;
pub mod progress;
pub mod replay;
pub mod resume;
pub mod route;
pub mod secret;
pub mod sink;
pub mod source;
pub mod telemetry;

/// Make `ring` the process's TLS crypto provider. rustls is built with two providers
/// here (a dependency enables `aws-lc-rs` by default), and then refuses to guess:
/// async-nats builds its TLS config from the process default, so without this a TLS
/// connection to NATS would panic. Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
