//! Typed configuration: TOML file + `OUTBOX_RELAY_<SECTION>_<KEY>` environment overrides.
//!
//! Invariants kept here:
//! - Unknown keys (in the file or in the environment) are errors that name the key.
//! - Secrets (the password in `postgres.url`, a token in `nats.url`) live in
//!   [`SecretUrl`], whose `Debug`/`Display` redact them, so a config printed in a log or
//!   an error never leaks them.
//! - [`Config::validate`] checks every value that can be checked without I/O and names
//!   the key it rejects.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decode::ColumnMap;
use crate::error::{Error, Result};
pub use crate::secret::{Secret, SecretUrl, redact_url};

/// Upper bound of `nats.ack_timeout`.
pub const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(3600);

/// Upper bound of `nats.max_in_flight`: async-nats buffers 65,536 messages per
/// subscription, and every PubAck arrives on one (`sink::acks`); more would be dropped.
pub const MAX_IN_FLIGHT: usize = 65_536;

/// Environment variables with this prefix override config keys.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";
/// Not a config key: the CLI reads it as `--config`.
const ENV_CONFIG_FILE: &str = "OUTBOX_RELAY_CONFIG";

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub outbox: OutboxConfig,
    pub nats: NatsConfig,
    pub routing: RoutingConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub checkpoint: CheckpointConfig,
    pub monitor: MonitorConfig,
    pub retention: RetentionConfig,
    pub telemetry: TelemetryConfig,
    pub streams: Vec<StreamConfig>,
}

/// Upper bound of `telemetry.queue_size`.
pub const MAX_TELEMETRY_QUEUE: usize = 1 << 20;
/// Upper bound of `telemetry.export_timeout`.
pub const MAX_EXPORT_TIMEOUT: Duration = Duration::from_secs(300);

/// OpenTelemetry: a PRODUCER span per published event that carries a `traceparent`,
/// exported over OTLP/HTTP (protobuf). Off while `endpoint` is empty (the default).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces` (a URL without a
    /// path gets `/v1/traces`). `http://` or `https://`. Empty: telemetry is off.
    pub endpoint: String,
    /// Share of sampled traces whose spans are recorded, 0.0 to 1.0, decided on the
    /// trace id; a carried `traceparent` that is not sampled is never recorded.
    pub sampling_ratio: f64,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Finished spans waiting for export; when full, new spans are dropped (counted),
    /// never waited for.
    pub queue_size: usize,
    /// Longest one export request may take (connect, send, answer) before its spans
    /// count as failed.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    /// Extra HTTP headers of every export request, `name=value` pairs separated by
    /// commas (as `OTEL_EXPORTER_OTLP_HEADERS`), e.g. `authorization=Bearer …`. A
    /// secret: never printed.
    pub headers: Secret,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            sampling_ratio: 1.0,
            service_name: "outbox-relay".into(),
            queue_size: 4096,
            export_timeout: Duration::from_secs(10),
            headers: Secret::default(),
        }
    }
}

impl TelemetryConfig {
    pub fn enabled(&self) -> bool {
        !self.endpoint.is_empty()
    }

    /// The export URL: `endpoint`, with `/v1/traces` when it has no path.
    pub fn traces_url(&self) -> Result<url::Url> {
        let mut url = url::Url::parse(&self.endpoint).map_err(|e| {
            bad_key(
                "telemetry.endpoint",
                format!("not a url ({e})"),
                "e.g. \"http://127.0.0.1:4318/v1/traces\", or \"\" for no telemetry",
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(bad_key(
                "telemetry.endpoint",
                format!(
                    "scheme must be http:// or https:// with a host (got {}://)",
                    url.scheme()
                ),
                "the relay exports OTLP over HTTP (protobuf), e.g. \"http://127.0.0.1:4318/v1/traces\"; gRPC is not offered",
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad_key(
                "telemetry.endpoint",
                "has credentials in the url, which the relay does not send",
                "put them in telemetry.headers, e.g. \"authorization=Basic …\" (a secret, never printed)",
            ));
        }
        if url.path() == "/" || url.path().is_empty() {
            url.set_path("/v1/traces");
        }
        Ok(url)
    }

    /// `headers` as (name, value) pairs; errors never quote a value.
    pub fn header_pairs(&self) -> Result<Vec<(String, String)>> {
        let Some(text) = self.headers.expose() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (i, pair) in text.split(',').enumerate() {
            if pair.trim().is_empty() {
                continue;
            }
            let Some((name, value)) = pair.split_once('=') else {
                return Err(bad_key(
                    "telemetry.headers",
                    format!("entry {} has no '='", i + 1),
                    "name=value pairs separated by commas, e.g. \"authorization=Bearer TOKEN\"",
                ));
            };
            let name = name.trim();
            let value = value.trim();
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !name_ok {
                return Err(bad_key(
                    "telemetry.headers",
                    format!("entry {} has an invalid header name", i + 1),
                    "header names are letters, digits and -",
                ));
            }
            if value.bytes().any(|b| b.is_ascii_control()) {
                return Err(bad_key(
                    "telemetry.headers",
                    format!(
                        "entry {} ({name}) has a control character in its value",
                        i + 1
                    ),
                    "header values are printable text",
                ));
            }
            out.push((name.to_string(), value.to_string()));
        }
        Ok(out)
    }

    /// Check every key (whether or not `endpoint` switches telemetry on, so a
    /// mistake shows before it is switched on).
    pub fn validate(&self) -> Result<()> {
        if self.enabled() {
            self.traces_url()?;
        }
        if !self.sampling_ratio.is_finite() || !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(bad_key(
                "telemetry.sampling_ratio",
                format!("must be between 0.0 and 1.0 (got {})", self.sampling_ratio),
                "1.0 records every sampled trace, 0.1 one in ten",
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err(bad_key(
                "telemetry.service_name",
                "is empty",
                "e.g. \"outbox-relay\"",
            ));
        }
        if self.queue_size == 0 || self.queue_size > MAX_TELEMETRY_QUEUE {
            return Err(bad_key(
                "telemetry.queue_size",
                format!("must be 1..={MAX_TELEMETRY_QUEUE}"),
                "the default is 4096 spans",
            ));
        }
        if self.export_timeout.is_zero() || self.export_timeout > MAX_EXPORT_TIMEOUT {
            return Err(bad_key(
                "telemetry.export_timeout",
                "must be > 0 and at most 5m",
                "e.g. \"10s\"",
            ));
        }
        self.header_pairs()?;
        Ok(())
    }
}

/// The SQL-side watch: slot lag, lag guard, heartbeat.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// How often slot lag and slot health are read from PostgreSQL (also when idle).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Slot lag (bytes of WAL retained for the relay) that logs a warning.
    pub lag_warn_bytes: u64,
    /// Slot lag that makes `/readyz` fail, before the disk fills.
    pub lag_fail_bytes: u64,
    /// Write a transactional `pg_logical_emit_message` this often, so the slot advances
    /// on a database whose other tables are busy while the outbox is idle. `"0s"`: off.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// `/readyz` fails as stalled when, for this long, nothing was read, published or
    /// confirmed while the slot lags by at least 1 MiB. `"0s"`: never.
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            lag_warn_bytes: 1 << 30,
            lag_fail_bytes: 4 << 30,
            heartbeat_interval: Duration::ZERO,
            stall_after: Duration::from_secs(300),
        }
    }
}

/// Optional pruning of delivered rows.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub enabled: bool,
    /// Rows older than this are deleted, never rows newer than the last delivered
    /// transaction's commit time.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Rows per DELETE statement (each its own short transaction).
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_age: Duration::from_secs(7 * 24 * 3600),
            interval: Duration::from_secs(600),
            batch_size: 5000,
        }
    }
}

/// Where the relay persists its position (see `checkpoint.rs` for why NATS KV).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// JetStream KV bucket; one key per database/slot.
    pub bucket: String,
    /// How often the position is persisted while it moves (and always at shutdown).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            bucket: "outbox_relay".into(),
            interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db`.
    pub url: SecretUrl,
    /// Logical replication slot; created by `run` if missing.
    pub slot: String,
    /// Publication for the outbox table; created by `migrate`.
    pub publication: String,
    /// How often status feedback is sent while positions move.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// How long to keep retrying while another process holds the slot (a relay that
    /// just died, whose walsender has not noticed yet, holds it for a moment) before
    /// stopping with the holder's PID. `"0s"` waits forever (standby mode).
    #[serde(with = "humantime_serde")]
    pub slot_busy_timeout: Duration,
    /// libpq's `sslmode`: `disable`, `prefer`, `require`, `verify-ca`, `verify-full`.
    /// Empty: the URL's `sslmode` parameter, else `prefer`.
    pub sslmode: String,
    /// CA certificates (PEM) that the server's certificate must chain to. Empty: the
    /// URL's `sslrootcert`, else the Mozilla roots.
    pub sslrootcert: String,
    /// Client certificate (PEM) and its key, for `clientcert` authentication.
    pub sslcert: String,
    pub sslkey: String,
    /// The password, instead of putting it in the URL; usually given as
    /// `OUTBOX_RELAY_POSTGRES_PASSWORD`. Wins over `password_file` and the URL.
    pub password: Secret,
    /// A file holding the password (a mounted secret); trailing newlines are ignored.
    pub password_file: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("postgres://postgres@127.0.0.1:5432/postgres"),
            slot: "outbox_relay".into(),
            publication: "outbox_relay".into(),
            status_interval: Duration::from_secs(1),
            slot_busy_timeout: Duration::from_secs(60),
            sslmode: String::new(),
            sslrootcert: String::new(),
            sslcert: String::new(),
            sslkey: String::new(),
            password: Secret::default(),
            password_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// `schema.table` (schema defaults to `public`).
    pub table: String,
    /// Column names of the table, for layouts other than the default (e.g. Debezium's).
    pub columns: ColumnMap,
    /// Prefix of transactional `pg_logical_emit_message` calls that carry table-less
    /// events (routed like rows). Empty: logical messages are ignored.
    pub message_prefix: String,
    /// `Content-Type` header of every message whose row has no content type of its own
    /// (`outbox.columns.content_type` NULL or unmapped). Empty: no header.
    pub content_type: String,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            table: "public.outbox_events".into(),
            columns: ColumnMap::default(),
            message_prefix: "outbox".into(),
            content_type: String::new(),
        }
    }
}

impl OutboxConfig {
    /// `(schema, table)`; validated by [`Config::validate`].
    pub fn qualified(&self) -> (String, String) {
        match self.table.split_once('.') {
            Some((s, t)) => (s.to_string(), t.to_string()),
            None => ("public".to_string(), self.table.clone()),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: SecretUrl,
    /// Messages published whose PubAck has not arrived yet. Bounds memory and the
    /// replay after a fault.
    pub max_in_flight: usize,
    /// Payload bytes of the messages in flight: with large payloads, the message count
    /// alone would not bound memory. One message is always allowed, however large.
    pub max_in_flight_bytes: usize,
    /// How long to wait for one PubAck before the publish counts as failed (transient).
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Token authentication (or `nats://TOKEN@host` in the URL).
    pub token: Secret,
    /// User and password authentication (or `nats://user:password@host`).
    pub user: String,
    pub password: Secret,
    /// A file holding an NKey seed (`SU…`): the relay signs the server's nonce with it.
    pub nkey_seed_file: String,
    /// A `.creds` file (user JWT + NKey seed), for servers in operator/JWT mode.
    pub creds_file: String,
    /// CA certificates (PEM) the server's certificate must chain to.
    pub tls_ca_file: String,
    /// Client certificate (PEM) and its key, for servers that verify clients.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// Refuse to connect without TLS (implied by a `tls://` URL).
    pub tls_required: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("nats://127.0.0.1:4222"),
            max_in_flight: 4096,
            max_in_flight_bytes: 32 << 20,
            ack_timeout: Duration::from_secs(5),
            token: Secret::default(),
            user: String::new(),
            password: Secret::default(),
            nkey_seed_file: String::new(),
            creds_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_required: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Subject template over the event's fields.
    pub subject: String,
    /// Unpublishable events go to `<dead_letter_prefix>.<original subject>`.
    pub dead_letter_prefix: String,
    /// TOML file of routing rules (routes, targets, conditions, transforms, sampling);
    /// empty: the subject template alone. Relative paths are relative to the working
    /// directory.
    pub rules_file: String,
    /// Every published subject must be this prefix or below it: a template such as
    /// `"outbox"` (global) or `"tenants.{tenant_id}"` (per tenant), so no row can
    /// publish into another tenant's or the system's subjects. Empty: not enforced.
    pub subject_prefix: String,
    /// Delayed targets (`delay_seconds`): schedule definitions are published on
    /// `<schedule_prefix>.<stream>.…`, a namespace the relay adds to each `[[streams]]`
    /// entry (see `sink::schedule`).
    pub schedule_prefix: String,
    /// Which headers each message carries: `"full"` (every header of the README's
    /// table) or `"compact"` (`Nats-Msg-Id`, the position headers and `Outbox-Origin`,
    /// plus metadata and rule headers): what nats-server pays per message falls with
    /// the header bytes (docs/benchmarks.md, workload H); the rest is in the payload.
    pub headers: String,
    /// CloudEvents: `"off"`, `"binary"` (`ce-*` headers, payload untouched) or
    /// `"structured"` (the payload becomes the JSON event format).
    pub cloudevents: String,
    /// The `type` attribute: a template over the event's fields.
    pub cloudevents_type: String,
    /// The `source` attribute: a template over the event's fields.
    pub cloudevents_source: String,
    /// The `dataschema` attribute: a template; sent only when it renders an absolute
    /// URI. Empty: never sent.
    pub cloudevents_dataschema: String,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            subject: "outbox.{aggregate_type}.{event_topic}".into(),
            dead_letter_prefix: "outbox.dlq".into(),
            rules_file: String::new(),
            subject_prefix: String::new(),
            schedule_prefix: "outbox-relay.schedule".into(),
            headers: "full".into(),
            cloudevents: "off".into(),
            cloudevents_type: "{aggregate_type}.{event_topic}".into(),
            cloudevents_source: "{source_bc}".into(),
            cloudevents_dataschema: "{schema_id}".into(),
        }
    }
}

impl RoutingConfig {
    /// `routing.headers` is `"compact"` (validated: `"full"` or `"compact"`).
    pub fn compact_headers(&self) -> bool {
        self.headers == "compact"
    }

    /// `routing.cloudevents` and its templates, compiled (`None`: `"off"`);
    /// `content_type` is `outbox.content_type`. Errors name the key.
    pub fn cloudevents(
        &self,
        content_type: &str,
    ) -> Result<Option<crate::route::cloudevents::CloudEvents>> {
        use crate::route::cloudevents::{CloudEvents, Mode};
        let mode = Mode::parse(&self.cloudevents).map_err(|e| {
            bad_key(
                "routing.cloudevents",
                e,
                "\"off\" (the default), \"binary\" (ce-* headers) or \"structured\" (a CloudEvents JSON payload)",
            )
        })?;
        // The templates are checked in every mode, so switching it on cannot fail later.
        let ce = CloudEvents::new(
            mode.unwrap_or(Mode::Binary),
            &self.cloudevents_type,
            &self.cloudevents_source,
            &self.cloudevents_dataschema,
            Some(content_type),
        )
        .map_err(|e| {
            bad_key(
                e.key,
                e.problem,
                "a template over the event's fields, e.g. \"{aggregate_type}.{event_topic}\" or \"/orders/{source_bc}\"",
            )
        })?;
        Ok(mode.map(|_| ce))
    }

    /// The compiled rules file, if one is configured; errors name the key, the rule and
    /// the field.
    pub fn load_rules(&self) -> Result<Option<crate::route::rules::Rules>> {
        if self.rules_file.is_empty() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.rules_file).map_err(|e| {
            Error::fatal(format!(
                "config key routing.rules_file: cannot read {}: {e}",
                self.rules_file
            ))
            .hint("give the path of a readable TOML rules file, or \"\" for the subject template alone")
        })?;
        let rules = crate::route::rules::Rules::from_toml(&text).map_err(|e| {
            Error::fatal(format!(
                "config key routing.rules_file ({}): {e}",
                self.rules_file
            ))
            .hint("fix the rule and field named; `outbox-relay check` lists every problem")
        })?;
        Ok(Some(rules))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `/healthz`, `/readyz` (and `/metrics`). Empty string disables the listener.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter, e.g. `info` or `outbox_relay=debug`.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// A JetStream stream the relay creates or updates at start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    pub subjects: Vec<String>,
    /// `file` or `memory`.
    #[serde(default = "default_storage")]
    pub storage: String,
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Window in which JetStream drops a second message with the same `Nats-Msg-Id`.
    #[serde(default = "default_duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
}

fn default_storage() -> String {
    "file".into()
}
fn default_replicas() -> usize {
    1
}
fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

impl Config {
    /// Read the file (if any), apply environment overrides, validate.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| {
                Error::fatal(format!("cannot read config file {}: {e}", p.display()))
                    .hint("pass an existing file with --config, or omit it to use defaults and OUTBOX_RELAY_* variables")
            })?,
            None => String::new(),
        };
        let cfg = Self::from_sources(&text, &env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse TOML text and apply overrides from `env` (name, value) pairs.
    pub fn from_sources(text: &str, env: &[(String, String)]) -> Result<Config> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            Error::fatal(format!("config: {}", e.message().to_lowercase()))
                .hint(describe_span(text, e.span()))
        })?;
        apply_env(&mut table, env)?;
        Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            Error::fatal(format!("config: {}", e.message()))
                .hint("see docs/configuration.md for every key and its type")
        })
    }

    /// Check values that need no I/O; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let pg = url::Url::parse(self.postgres.url.expose()).map_err(|e| {
            bad_key(
                "postgres.url",
                format!("not a url ({e})"),
                "use postgres://user:password@host:5432/database",
            )
        })?;
        if !matches!(pg.scheme(), "postgres" | "postgresql") {
            return Err(bad_key(
                "postgres.url",
                format!("scheme must be postgres:// (got {}://)", pg.scheme()),
                "use postgres://user:password@host:5432/database",
            ));
        }
        crate::source::settings::PgSettings::parse(self)?;
        if !matches!(self.routing.headers.as_str(), "full" | "compact") {
            return Err(bad_key(
                "routing.headers",
                format!(
                    "must be \"full\" or \"compact\" (got {:?})",
                    self.routing.headers
                ),
                "\"full\" (the default) writes every header; \"compact\" only the message id, the position and the origin",
            ));
        }
        self.routing.cloudevents(&self.outbox.content_type)?;
        check_ident("postgres.slot", &self.postgres.slot)?;
        check_ident("postgres.publication", &self.postgres.publication)?;
        if self.postgres.status_interval.is_zero() {
            return Err(bad_key(
                "postgres.status_interval",
                "must be > 0",
                "e.g. \"1s\"",
            ));
        }
        let (schema, table) = self.outbox.qualified();
        if self.outbox.table.matches('.').count() > 1 {
            return Err(bad_key(
                "outbox.table",
                "expected schema.table",
                "e.g. \"public.outbox_events\"",
            ));
        }
        check_sql_name("outbox.table", &schema)?;
        check_sql_name("outbox.table", &table)?;
        if self.retention.enabled && self.outbox.columns.created_at.is_empty() {
            return Err(bad_key(
                "retention.enabled",
                "retention needs a creation-time column, but outbox.columns.created_at is empty",
                "map outbox.columns.created_at to a timestamptz column, or set retention.enabled = false",
            ));
        }
        let required: Vec<&str> = self
            .outbox
            .columns
            .required_fields()
            .iter()
            .map(|(f, _)| *f)
            .collect();
        for (field, column) in self.outbox.columns.fields() {
            // An empty name switches an optional field off.
            let bad_empty = column.is_empty() && required.contains(&field);
            if bad_empty || column.contains('"') || column.contains('\0') {
                return Err(bad_key(
                    &format!("outbox.columns.{field}"),
                    format!("invalid column name {column:?}"),
                    "name an existing column of the outbox table",
                ));
            }
        }
        if !self.outbox.content_type.is_empty()
            && !crate::route::headers::is_header_value(&self.outbox.content_type)
        {
            return Err(bad_key(
                "outbox.content_type",
                format!("{:?} cannot be a header value", self.outbox.content_type),
                "use a media type such as \"application/octet-stream\" or \"application/json\"",
            ));
        }
        // A cluster is given as a comma-separated list of URLs.
        for part in self.nats.url.expose().split(',').map(str::trim) {
            let nats = url::Url::parse(part).map_err(|e| {
                bad_key(
                    "nats.url",
                    format!("not a url ({e})"),
                    "use nats://host:4222, or a comma-separated list for a cluster",
                )
            })?;
            if !matches!(nats.scheme(), "nats" | "tls" | "ws" | "wss") {
                return Err(bad_key(
                    "nats.url",
                    format!(
                        "scheme must be nats:// or tls:// (got {}://)",
                        nats.scheme()
                    ),
                    "use nats://host:4222",
                ));
            }
        }
        if self.nats.max_in_flight == 0 {
            return Err(bad_key(
                "nats.max_in_flight",
                "must be at least 1",
                "the default is 4096",
            ));
        }
        if self.nats.max_in_flight > MAX_IN_FLIGHT {
            return Err(bad_key(
                "nats.max_in_flight",
                format!("must be at most {MAX_IN_FLIGHT}"),
                "the relay's PubAck subscription buffers that many replies; the default is 4096",
            ));
        }
        if self.nats.max_in_flight_bytes == 0 {
            return Err(bad_key(
                "nats.max_in_flight_bytes",
                "must be at least 1",
                "e.g. 33554432 (32 MiB)",
            ));
        }
        if self.nats.ack_timeout.is_zero() {
            return Err(bad_key("nats.ack_timeout", "must be > 0", "e.g. \"5s\""));
        }
        // Deadlines are `now + ack_timeout`: an absurd value would overflow the clock,
        // and no PubAck is worth waiting an hour for (the session replays instead).
        if self.nats.ack_timeout > MAX_ACK_TIMEOUT {
            return Err(bad_key(
                "nats.ack_timeout",
                "must be at most 1h",
                "e.g. \"5s\"; a PubAck that does not come within seconds will not come",
            ));
        }
        crate::route::Template::parse(&self.routing.subject).map_err(|e| {
            bad_key(
                "routing.subject",
                e,
                "e.g. \"outbox.{aggregate_type}.{event_topic}\"",
            )
        })?;
        if !self.routing.subject_prefix.is_empty() {
            crate::route::Template::parse(&self.routing.subject_prefix).map_err(|e| {
                bad_key(
                    "routing.subject_prefix",
                    e,
                    "e.g. \"outbox\" or \"tenants.{tenant_id}\"",
                )
            })?;
        }
        crate::route::validate_subject(&self.routing.dead_letter_prefix).map_err(|e| {
            bad_key(
                "routing.dead_letter_prefix",
                e,
                "a literal subject prefix, e.g. \"outbox.dlq\"",
            )
        })?;
        crate::route::validate_subject(&self.routing.schedule_prefix).map_err(|e| {
            bad_key(
                "routing.schedule_prefix",
                e,
                "a literal subject prefix outside the streams' subjects, e.g. \"outbox-relay.schedule\"",
            )
        })?;
        if self.checkpoint.bucket.is_empty()
            || !self
                .checkpoint
                .bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad_key(
                "checkpoint.bucket",
                format!("invalid bucket name {:?}", self.checkpoint.bucket),
                "letters, digits, - and _",
            ));
        }
        if self.checkpoint.interval.is_zero() {
            return Err(bad_key("checkpoint.interval", "must be > 0", "e.g. \"1s\""));
        }
        if self.monitor.interval.is_zero() {
            return Err(bad_key("monitor.interval", "must be > 0", "e.g. \"10s\""));
        }
        if self.monitor.lag_fail_bytes < self.monitor.lag_warn_bytes {
            return Err(bad_key(
                "monitor.lag_fail_bytes",
                "is below monitor.lag_warn_bytes",
                "warn first, fail later: lag_fail_bytes >= lag_warn_bytes",
            ));
        }
        if self.retention.enabled
            && (self.retention.interval.is_zero() || self.retention.batch_size == 0)
        {
            return Err(bad_key(
                "retention.interval",
                "interval and batch_size must be > 0",
                "e.g. interval = \"10m\", batch_size = 5000",
            ));
        }
        if !self.http.listen.is_empty() {
            self.http.listen.parse::<SocketAddr>().map_err(|e| {
                bad_key(
                    "http.listen",
                    format!("{e}"),
                    "host:port, e.g. \"127.0.0.1:9187\", or \"\" to disable",
                )
            })?;
        }
        self.telemetry.validate()?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(bad_key(
                "log.format",
                format!("unknown format {:?}", self.log.format),
                "text or json",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| bad_key("log.level", e, "e.g. \"info\" or \"outbox_relay=debug\""))?;
        for (i, s) in self.streams.iter().enumerate() {
            let key = format!("streams[{i}]");
            if s.name.is_empty() || s.name.contains(['.', '*', '>', ' ', '/', '\\']) {
                return Err(bad_key(
                    &format!("{key}.name"),
                    format!("invalid stream name {:?}", s.name),
                    "letters, digits, - and _",
                ));
            }
            if s.subjects.is_empty() {
                return Err(bad_key(
                    &format!("{key}.subjects"),
                    "empty",
                    "list the subjects the stream captures, e.g. [\"outbox.>\"]",
                ));
            }
            if !matches!(s.storage.as_str(), "file" | "memory") {
                return Err(bad_key(
                    &format!("{key}.storage"),
                    format!("unknown storage {:?}", s.storage),
                    "file or memory",
                ));
            }
            if s.replicas == 0 || s.replicas > 5 {
                return Err(bad_key(
                    &format!("{key}.replicas"),
                    "must be 1..=5",
                    "1 for a single server, 3 for a cluster",
                ));
            }
        }
        Ok(())
    }
}

pub fn bad_key(key: &str, problem: impl fmt::Display, hint: &str) -> Error {
    Error::fatal(format!("config key {key}: {problem}")).hint(hint.to_string())
}

/// Slot and publication names: PostgreSQL restricts slots to `[a-z0-9_]`, and we use
/// both unquoted in replication commands.
fn check_ident(key: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(bad_key(
            key,
            format!("invalid name {v:?}"),
            "lowercase letters, digits and _, at most 63 characters",
        ))
    }
}

/// Names are substituted into the migrations' SQL (quoted identifiers and string
/// literals inside a `DO $$` block), so quotes and `$` are refused outright.
fn check_sql_name(key: &str, v: &str) -> Result<()> {
    if v.is_empty() || v.len() > 63 || v.contains(['"', '\0', '\'', '$']) {
        return Err(bad_key(
            key,
            format!("invalid name {v:?}"),
            "e.g. \"public.outbox_events\"",
        ));
    }
    Ok(())
}

/// Say where in the file a parse error is.
fn describe_span(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!("see line {line} of the config file; docs/configuration.md lists every key")
        }
        None => "docs/configuration.md lists every key".into(),
    }
}

/// Apply `OUTBOX_RELAY_<SECTION>_<KEY>` overrides. The value's type follows the
/// default config's type for that key, so `OUTBOX_RELAY_POSTGRES_SLOT=123` stays a
/// string and `OUTBOX_RELAY_NATS_MAX_IN_FLIGHT=10` becomes an integer.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<()> {
    let defaults = toml::Table::try_from(Config::default())
        .map_err(|e| Error::fatal(format!("internal: default config does not serialise: {e}")))?;
    // Sections with nesting, longest first so `outbox_columns` wins over `outbox`.
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for (name, value) in &defaults {
        if let toml::Value::Table(t) = value {
            sections.push((name.clone(), vec![name.clone()]));
            for (sub, v) in t {
                if v.is_table() {
                    sections.push((format!("{name}_{sub}"), vec![name.clone(), sub.clone()]));
                }
            }
        }
    }
    sections.sort_by_key(|(flat, _)| std::cmp::Reverse(flat.len()));

    let mut sorted: BTreeMap<&str, &str> = BTreeMap::new();
    for (k, v) in env {
        if k.starts_with(ENV_PREFIX) && k != ENV_CONFIG_FILE {
            sorted.insert(k.as_str(), v.as_str());
        }
    }
    for (name, value) in sorted {
        let rest = name[ENV_PREFIX.len()..].to_ascii_lowercase();
        let Some((path, key)) = sections.iter().find_map(|(flat, path)| {
            rest.strip_prefix(flat.as_str())
                .and_then(|k| k.strip_prefix('_'))
                .map(|k| (path, k.to_string()))
        }) else {
            return Err(Error::fatal(format!("environment variable {name}: no such config section"))
                .hint("variables are OUTBOX_RELAY_<SECTION>_<KEY>, e.g. OUTBOX_RELAY_POSTGRES_URL; sections: postgres, outbox, nats, routing, http, log, checkpoint, monitor, retention, telemetry"));
        };
        let mut default_section = &defaults;
        for p in path {
            default_section = match default_section.get(p) {
                Some(toml::Value::Table(t)) => t,
                _ => {
                    return Err(Error::fatal(format!(
                        "environment variable {name}: no such config section"
                    )));
                }
            };
        }
        let dotted = format!("{}.{key}", path.join("."));
        let Some(default) = default_section.get(&key) else {
            return Err(Error::fatal(format!(
                "environment variable {name}: unknown config key {dotted}"
            ))
            .hint("docs/configuration.md lists every key"));
        };
        let typed = match default {
            toml::Value::String(_) => toml::Value::String(value.to_string()),
            toml::Value::Integer(_) => {
                toml::Value::Integer(value.trim().parse().map_err(|_| {
                    bad_key(
                        &dotted,
                        format!("{name}={value:?} is not an integer"),
                        "give a whole number",
                    )
                })?)
            }
            toml::Value::Boolean(_) => toml::Value::Boolean(match value.trim() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(bad_key(
                        &dotted,
                        format!("{name}={value:?} is not a boolean"),
                        "true or false",
                    ));
                }
            }),
            toml::Value::Float(_) => toml::Value::Float(value.trim().parse().map_err(|_| {
                bad_key(
                    &dotted,
                    format!("{name}={value:?} is not a number"),
                    "give a number",
                )
            })?),
            _ => {
                return Err(bad_key(
                    &dotted,
                    format!("{name} cannot override a list or table"),
                    "set it in the config file",
                ));
            }
        };
        let mut target = &mut *table;
        for p in path {
            let entry = target
                .entry(p.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            target = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(bad_key(p, "must be a table", "see docs/configuration.md")),
            };
        }
        target.insert(key, typed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn minimal_file_from_design_parses() {
        let text = r#"
[postgres]
url = "postgres://postgres@127.0.0.1:5432/app"
[outbox]
table = "public.outbox_events"
[nats]
url = "nats://127.0.0.1:4222"
[routing]
subject = "outbox.{aggregate_type}.{event_topic}"
[http]
listen = "127.0.0.1:9187"
"#;
        let cfg = Config::from_sources(text, &[]).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.postgres.slot, "outbox_relay");
        assert_eq!(
            cfg.outbox.qualified(),
            ("public".into(), "outbox_events".into())
        );
    }

    /// docs/configuration.md's complete file parses and equals the defaults: the doc
    /// cannot drift from the code.
    #[test]
    fn documented_complete_file_is_the_default() {
        let doc = include_str!("../docs/configuration.md");
        let start = doc
            .find("## A complete file with every key at its default")
            .and_then(|i| doc[i..].find("```toml").map(|j| i + j + "```toml".len()))
            .expect("complete file section");
        let end = start + doc[start..].find("```").expect("end of block");
        let cfg = Config::from_sources(&doc[start..end], &[]).unwrap();
        cfg.validate().unwrap();
        let mut parsed = toml::Table::try_from(&cfg).unwrap();
        let mut default = toml::Table::try_from(Config::default()).unwrap();
        // The documented file declares an example stream; defaults have none.
        parsed.remove("streams");
        default.remove("streams");
        assert_eq!(parsed, default);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_sources("[nats]\nurll = \"x\"\n", &[]).unwrap_err();
        assert!(err.message.contains("urll"), "{err}");
        let err = Config::from_sources("[natz]\n", &[]).unwrap_err();
        assert!(err.message.contains("natz"), "{err}");
    }

    #[test]
    fn env_overrides_with_types() {
        let cfg = Config::from_sources(
            "[postgres]\nslot = \"a\"\n",
            &env(&[
                ("OUTBOX_RELAY_POSTGRES_SLOT", "b"),
                ("OUTBOX_RELAY_NATS_MAX_IN_FLIGHT", "12"),
                ("OUTBOX_RELAY_OUTBOX_COLUMNS_EVENT_TOPIC", "type"),
                ("OUTBOX_RELAY_CONFIG", "/ignored.toml"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.postgres.slot, "b");
        assert_eq!(cfg.nats.max_in_flight, 12);
        assert_eq!(cfg.outbox.columns.event_topic, "type");
        let cfg = Config::from_sources(
            "",
            &env(&[
                ("OUTBOX_RELAY_ROUTING_CLOUDEVENTS", "structured"),
                (
                    "OUTBOX_RELAY_ROUTING_CLOUDEVENTS_SOURCE",
                    "/shop/{source_bc}",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.routing.cloudevents, "structured");
        assert_eq!(cfg.routing.cloudevents_source, "/shop/{source_bc}");
        assert_eq!(
            cfg.routing.cloudevents_type,
            "{aggregate_type}.{event_topic}"
        );
    }

    #[test]
    fn env_unknown_key_or_bad_value_is_named() {
        let err = Config::from_sources("", &env(&[("OUTBOX_RELAY_NATS_URLL", "x")])).unwrap_err();
        assert!(
            err.message.contains("OUTBOX_RELAY_NATS_URLL") && err.message.contains("nats.urll"),
            "{err}"
        );
        let err = Config::from_sources("", &env(&[("OUTBOX_RELAY_NATS_MAX_IN_FLIGHT", "many")]))
            .unwrap_err();
        assert!(err.message.contains("nats.max_in_flight"), "{err}");
        let err = Config::from_sources("", &env(&[("OUTBOX_RELAY_KAFKA_URL", "x")])).unwrap_err();
        assert!(err.message.contains("OUTBOX_RELAY_KAFKA_URL"), "{err}");
    }

    #[test]
    fn validate_names_the_key() {
        let mut cfg = Config::default();
        cfg.nats.max_in_flight = MAX_IN_FLIGHT + 1;
        assert!(
            cfg.validate()
                .unwrap_err()
                .message
                .contains("nats.max_in_flight: must be at most 65536")
        );
        let mut cfg = Config::default();
        cfg.nats.ack_timeout = Duration::from_secs(u64::MAX / 2);
        assert!(
            cfg.validate()
                .unwrap_err()
                .message
                .contains("nats.ack_timeout: must be at most 1h")
        );
        let mut cfg = Config::default();
        cfg.postgres.url = SecretUrl::new("mysql://x");
        assert!(cfg.validate().unwrap_err().message.contains("postgres.url"));
        let mut cfg = Config::default();
        cfg.nats.url = SecretUrl::new("not a url");
        assert!(cfg.validate().unwrap_err().message.contains("nats.url"));
        let mut cfg = Config::default();
        cfg.routing.subject = "outbox.{nope}".into();
        assert!(
            cfg.validate()
                .unwrap_err()
                .message
                .contains("routing.subject")
        );
        let mut cfg = Config::default();
        cfg.routing.headers = "minimal".into();
        assert!(
            cfg.validate()
                .unwrap_err()
                .message
                .contains("routing.headers: must be \"full\" or \"compact\"")
        );
        cfg.routing.headers = "compact".into();
        assert!(cfg.validate().is_ok() && cfg.routing.compact_headers());
        let mut cfg = Config::default();
        cfg.routing.cloudevents = "json".into();
        let err = cfg.validate().unwrap_err().message;
        assert!(
            err.contains("routing.cloudevents: must be \"off\", \"binary\" or \"structured\""),
            "{err}"
        );
        for mode in ["off", "binary", "structured"] {
            cfg.routing.cloudevents = mode.into();
            cfg.validate().unwrap();
        }
        for key in ["type", "source", "dataschema"] {
            let mut cfg = Config::default();
            let bad = "x.{nope}".to_string();
            match key {
                "type" => cfg.routing.cloudevents_type = bad,
                "source" => cfg.routing.cloudevents_source = bad,
                _ => cfg.routing.cloudevents_dataschema = bad,
            }
            let err = cfg.validate().unwrap_err().message;
            assert!(
                err.contains(&format!(
                    "routing.cloudevents_{key}: unknown field {{nope}}"
                )),
                "{err}"
            );
        }
        let mut cfg = Config::default();
        cfg.routing.cloudevents_source = String::new();
        let err = cfg.validate().unwrap_err().message;
        assert!(
            err.contains("routing.cloudevents_source: is empty"),
            "{err}"
        );
        let mut cfg = Config::default();
        cfg.postgres.slot = "Bad-Slot".into();
        assert!(
            cfg.validate()
                .unwrap_err()
                .message
                .contains("postgres.slot")
        );
        for bad in ["public.it's", "public.a$$b", "x\"y.z"] {
            let mut cfg = Config::default();
            cfg.outbox.table = bad.into();
            assert!(
                cfg.validate().unwrap_err().message.contains("outbox.table"),
                "{bad}"
            );
        }
        let mut cfg = Config::default();
        cfg.retention.enabled = true;
        cfg.outbox.columns.created_at = String::new();
        assert!(
            cfg.validate()
                .unwrap_err()
                .message
                .contains("retention.enabled")
        );
        let mut cfg = Config::default();
        cfg.http.listen = "nowhere".into();
        assert!(cfg.validate().unwrap_err().message.contains("http.listen"));
        Config::default().validate().unwrap();
    }

    #[test]
    fn telemetry_is_off_by_default_and_on_with_an_endpoint() {
        let cfg = Config::from_sources("", &[]).unwrap();
        assert!(!cfg.telemetry.enabled());
        let cfg = Config::from_sources(
            "[telemetry]\nendpoint = \"http://127.0.0.1:4318\"\nsampling_ratio = 0.25\n",
            &env(&[
                ("OUTBOX_RELAY_TELEMETRY_SERVICE_NAME", "relay-eu"),
                ("OUTBOX_RELAY_TELEMETRY_QUEUE_SIZE", "16"),
                ("OUTBOX_RELAY_TELEMETRY_EXPORT_TIMEOUT", "2s"),
                (
                    "OUTBOX_RELAY_TELEMETRY_HEADERS",
                    "authorization=Bearer s3cret, x-team = a",
                ),
            ]),
        )
        .unwrap();
        cfg.validate().unwrap();
        let t = &cfg.telemetry;
        assert!(t.enabled());
        assert_eq!(
            t.traces_url().unwrap().as_str(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(t.sampling_ratio, 0.25);
        assert_eq!(t.service_name, "relay-eu");
        assert_eq!(t.queue_size, 16);
        assert_eq!(t.export_timeout, Duration::from_secs(2));
        assert_eq!(
            t.header_pairs().unwrap(),
            vec![
                ("authorization".to_string(), "Bearer s3cret".to_string()),
                ("x-team".to_string(), "a".to_string())
            ]
        );
        // The token never prints.
        assert!(!format!("{cfg:?}").contains("s3cret"));
        assert!(!toml::to_string(&cfg).unwrap().contains("s3cret"));
        let cfg = Config::from_sources(
            "",
            &env(&[
                (
                    "OUTBOX_RELAY_TELEMETRY_ENDPOINT",
                    "https://otel.example.com/custom/path",
                ),
                ("OUTBOX_RELAY_TELEMETRY_SAMPLING_RATIO", "0.5"),
            ]),
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.telemetry.traces_url().unwrap().as_str(),
            "https://otel.example.com/custom/path"
        );
        assert_eq!(cfg.telemetry.sampling_ratio, 0.5);
    }

    #[test]
    fn telemetry_keys_are_validated_by_name() {
        let check = |edit: &dyn Fn(&mut TelemetryConfig), key: &str| {
            let mut cfg = Config::default();
            cfg.telemetry.endpoint = "http://127.0.0.1:4318".into();
            edit(&mut cfg.telemetry);
            let err = cfg.validate().unwrap_err();
            assert!(
                err.message.contains(&format!("config key {key}:")),
                "{key}: {err}"
            );
            assert!(err.hint.is_some(), "{key}");
            err
        };
        check(
            &|t| t.endpoint = "127.0.0.1:4318".into(),
            "telemetry.endpoint",
        );
        check(
            &|t| t.endpoint = "grpc://collector:4317".into(),
            "telemetry.endpoint",
        );
        check(&|t| t.endpoint = "not a url".into(), "telemetry.endpoint");
        let err = check(
            &|t| t.endpoint = "http://user:s3cret@collector:4318".into(),
            "telemetry.endpoint",
        );
        assert!(!err.to_string().contains("s3cret"), "{err}");
        check(&|t| t.sampling_ratio = 1.5, "telemetry.sampling_ratio");
        check(&|t| t.sampling_ratio = -0.1, "telemetry.sampling_ratio");
        check(&|t| t.sampling_ratio = f64::NAN, "telemetry.sampling_ratio");
        check(&|t| t.service_name = " ".into(), "telemetry.service_name");
        check(&|t| t.queue_size = 0, "telemetry.queue_size");
        check(
            &|t| t.queue_size = MAX_TELEMETRY_QUEUE + 1,
            "telemetry.queue_size",
        );
        check(
            &|t| t.export_timeout = Duration::ZERO,
            "telemetry.export_timeout",
        );
        check(
            &|t| t.export_timeout = Duration::from_secs(3600),
            "telemetry.export_timeout",
        );
        let err = check(
            &|t| t.headers = Secret::new("authorization: Bearer s3cret"),
            "telemetry.headers",
        );
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = check(
            &|t| t.headers = Secret::new("bad name=s3cret"),
            "telemetry.headers",
        );
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = Config::from_sources("[telemetry]\nendpiont = \"x\"\n", &[]).unwrap_err();
        assert!(err.message.contains("endpiont"), "{err}");
        let err = Config::from_sources(
            "",
            &env(&[("OUTBOX_RELAY_TELEMETRY_SAMPLING_RATIO", "half")]),
        )
        .unwrap_err();
        assert!(err.message.contains("telemetry.sampling_ratio"), "{err}");
    }
}
