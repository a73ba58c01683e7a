//! Errors the operator can act on.
//!
//! Every error is either **transient** (retry with backoff, the process keeps running:
//! NATS down, PubAck timeout, PostgreSQL restarting) or **fatal** (stop with a message:
//! bad config, missing publication, wal_level wrong). Each carries a hint that says what
//! to do. Messages are lowercase and never contain secrets: URLs are redacted before they
//! reach an error (see [`crate::config::redact_url`]).

use std::fmt;

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The condition may clear by itself; the supervisor retries with backoff, forever.
    Transient,
    /// Retrying cannot help; the process stops and says what to fix.
    Fatal,
}

/// An error with its kind, what happened and what to do about it.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    /// What happened, lowercase, no secrets.
    pub message: String,
    /// What the operator should do.
    pub hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            kind: Kind::Transient,
            message: message.into(),
            hint: None,
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            kind: Kind::Fatal,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn is_transient(&self) -> bool {
        self.kind == Kind::Transient
    }

    /// Prefix the message with where it happened, keeping kind and hint.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// Classify a tokio-postgres error. Connection-level failures are transient; a server
/// error with an SQLSTATE is fatal unless its class says the server is going away.
/// Server answers that pass by themselves: a restart or shutdown in progress, a standby
/// not yet promoted (a URL pointing at it during a failover), no free connection or
/// walsender slot, an administrator's terminate. Matched on the words, because the
/// replication transport does not expose the SQLSTATE.
pub fn server_busy_or_restarting(lc: &str) -> bool {
    [
        "terminating",
        "shutdown",
        "shutting down",
        "starting up",
        "not yet accepting connections",
        "recovery",
        "too many clients",
        "max_wal_senders",
        "remaining connection slots are reserved",
        "too many connections",
    ]
    .iter()
    .any(|w| lc.contains(w))
}

pub fn from_pg(err: &tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    if let Some(db) = err.as_db_error() {
        let code = db.code();
        let msg = format!(
            "postgresql: {} (sqlstate {})",
            db.message().to_lowercase(),
            code.code()
        );
        let transient = code.code().starts_with("08") // connection exception
            || code.code().starts_with("57") // operator intervention: shutdown, terminate
            || code.code().starts_with("53") // insufficient resources
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            // 55000 "recovery is in progress": a standby not promoted yet.
            || (*code == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE
                && db.message().to_lowercase().contains("recovery"))
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION;
        let e = if transient {
            Error::transient(msg)
        } else {
            Error::fatal(msg)
        };
        return match code.code() {
            "42501" => e.hint("grant the relay's role the privilege named above (see docs/configuration.md, least privilege)"),
            "3D000" => e.hint("create the database or fix the database name in postgres.url"),
            "28P01" | "28000" => e.hint("check the user and password in postgres.url and pg_hba.conf"),
            _ => e,
        };
    }
    // No SQLSTATE: the connection failed or closed. The Display of tokio-postgres
    // errors never includes the password.
    let text = lower(&with_causes(err));
    if let Some(e) = pg_tls_problem("postgresql connection", &text) {
        return e;
    }
    Error::transient(format!("postgresql connection: {text}"))
        .hint("check that PostgreSQL is running and reachable at postgres.url")
}

/// Classify an error of the replication transport.
pub fn from_repl(err: &pgwire_replication::PgWireError) -> Error {
    let text = lower(&err.to_string());
    // Match on a lowercased copy; show the server's words as they are.
    let lc = text.to_lowercase();
    if err.is_server() {
        let text = &text;
        // The server refused something: slot in use, slot missing, publication missing.
        if lc.contains("is active for pid") {
            return Error::transient(format!("replication: {text}")).hint(
                "another process is streaming from this slot; stop it, or wait: the relay retries (standby mode)",
            );
        }
        if lc.contains("does not exist") && lc.contains("replication slot") {
            return Error::fatal(format!("replication: {text}")).hint(
                "the slot vanished after the relay created it: events committed since may be lost; \
                 investigate who dropped it, then restart the relay to create a new one",
            );
        }
        if lc.contains("publication") && lc.contains("does not exist") {
            return Error::fatal(format!("replication: {text}"))
                .hint("run `outbox-relay migrate` or create the publication named in postgres.publication");
        }
        if server_busy_or_restarting(&lc) {
            return Error::transient(format!("replication: {text}")).hint(
                "postgresql is restarting, promoting or out of connections (max_connections, \
                 max_wal_senders); the relay retries with backoff",
            );
        }
        if lc.contains("permission") || lc.contains("must be superuser or replication") {
            return Error::fatal(format!("replication: {text}"))
                .hint("grant the role REPLICATION: ALTER ROLE <user> REPLICATION");
        }
        return Error::fatal(format!("replication: {text}"));
    }
    if err.is_auth() || lc.contains("password authentication") {
        return Error::fatal(format!("replication: {text}"))
            .hint("check the user and password in postgres.url and pg_hba.conf (a `replication` line may be needed)");
    }
    if let Some(e) = pg_tls_problem("replication connection", &text) {
        return e;
    }
    Error::transient(format!("replication connection: {text}"))
        .hint("check that PostgreSQL is running and reachable at postgres.url")
}

/// A certificate the relay refuses, or a server without the TLS the config demands, is
/// a setting to fix, not an outage to wait out: fatal, with the keys that decide it.
/// (A connection reset during a handshake says neither, and stays transient.)
fn pg_tls_problem(what: &str, text: &str) -> Option<Error> {
    let lc = text.to_lowercase();
    let cert = lc.contains("certificate");
    let no_tls = lc.contains("does not support tls") || lc.contains("tls config error");
    if !(cert || no_tls) {
        return None;
    }
    let hint = if cert {
        "the server's certificate must chain to a CA in postgres.sslrootcert (and, under \
         sslmode=verify-full, name the host of postgres.url); see docs/security.md"
    } else {
        "enable ssl on the server, or lower postgres.sslmode (see docs/security.md)"
    };
    Some(Error::fatal(format!("{what}: {text}")).hint(hint))
}

/// An error's text followed by each cause its Display leaves out (tokio-postgres shows
/// "error performing TLS handshake" but keeps the certificate problem in `source()`).
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// PostgreSQL and NATS error texts start with capitals; ours are lowercase throughout.
fn lower(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_includes_hint() {
        let e = Error::fatal("wal_level is replica").hint("set wal_level = logical and restart");
        assert_eq!(
            e.to_string(),
            "wal_level is replica\n  hint: set wal_level = logical and restart"
        );
        assert!(!e.is_transient());
    }

    /// Issue 14's error classes: each of these passes by itself and must not stop the
    /// relay; a privilege or a missing object must.
    #[test]
    fn restarts_and_exhausted_connections_are_transient() {
        for text in [
            "fatal: the database system is shutting down",
            "fatal: the database system is starting up",
            "fatal: the database system is not yet accepting connections",
            "fatal: sorry, too many clients already",
            "fatal: number of requested standby connections exceeds max_wal_senders (currently 1)",
            "error: recovery is in progress",
            "fatal: terminating connection due to administrator command",
            "fatal: remaining connection slots are reserved for roles with the superuser attribute",
        ] {
            assert!(server_busy_or_restarting(text), "{text}");
        }
        for text in [
            "error: permission denied to start WAL sender",
            "error: replication slot \"x\" does not exist",
            "error: publication \"p\" does not exist",
        ] {
            assert!(!server_busy_or_restarting(&text.to_lowercase()), "{text}");
        }
    }

    #[test]
    fn context_keeps_kind() {
        let e = Error::transient("timeout").context("publish");
        assert_eq!(e.message, "publish: timeout");
        assert!(e.is_transient());
    }
}
