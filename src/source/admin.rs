//! Ordinary SQL against the source database: connection, environment checks, slot and
//! publication admin, migrations. Everything here is idempotent.

use tokio_postgres::{Client, GenericClient};

use super::settings::PgSettings;

use crate::config::Config;
use crate::error::{Error, Result, from_pg};

/// Connect for SQL; the connection task is spawned and logs its end at debug level.
pub async fn connect(cfg: &Config) -> Result<Client> {
    let settings = PgSettings::load(cfg)?;
    let (client, conn) = settings
        .pg
        .connect(settings.sql_tls()?)
        .await
        .map_err(|e| from_pg(&e).context(format!("connect to {}", cfg.postgres.url.redacted())))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %crate::error::from_pg(&e), "sql connection ended");
        }
    });
    Ok(client)
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Run the migrations in `migrations/` (embedded), for the configured table and
/// publication. Serialised by an advisory lock so two relays starting together are safe.
pub async fn migrate(client: &mut Client, cfg: &Config) -> Result<Vec<String>> {
    let (schema, table) = cfg.outbox.qualified();
    let publication = &cfg.postgres.publication;
    let fill = |sql: &str| {
        sql.replace("{schema}", &schema.replace('"', "\"\""))
            .replace("{table}", &table.replace('"', "\"\""))
            .replace("{publication}", publication)
    };
    let tx = client.transaction().await.map_err(|e| from_pg(&e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('outbox-relay migrate'))",
        &[],
    )
    .await
    .map_err(|e| from_pg(&e))?;
    let exists = table_exists(&tx, &schema, &table).await?;
    let mut done = Vec::new();
    if exists {
        done.push(format!("table {schema}.{table} exists: left unchanged"));
    } else {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};",
            quote_ident(&schema)
        ))
        .await
        .map_err(|e| from_pg(&e))?;
        tx.batch_execute(&fill(include_str!(
            "../../migrations/V1__outbox_events.sql"
        )))
        .await
        .map_err(|e| from_pg(&e).context("migration V1__outbox_events"))?;
        done.push(format!("created table {schema}.{table} and its indexes"));
        // The producer helper writes to V1's layout: created with the table, never
        // for a table migrate did not create (its columns may be mapped or missing).
        done.push(install_outbox_emit(&tx, &schema, &table, &fill).await?);
    }
    tx.batch_execute(&fill(include_str!("../../migrations/V2__publication.sql")))
        .await
        .map_err(|e| from_pg(&e).context("migration V2__publication"))?;
    done.push(format!(
        "publication {publication} publishes inserts of {schema}.{table}"
    ));
    tx.commit().await.map_err(|e| from_pg(&e))?;
    // The slot starts capturing at creation: creating it here, not at the first `run`,
    // means rows committed between `migrate` and the first `run` are not missed.
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| from_pg(&e))?
        .get(0);
    let slot = &cfg.postgres.slot;
    if wal_level == "logical" {
        if ensure_slot(client, slot).await? {
            done.push(format!(
                "created replication slot {slot}: events are captured from now on"
            ));
        } else {
            done.push(format!("replication slot {slot} exists"));
        }
    } else {
        done.push(format!(
            "warning: wal_level is {wal_level}: replication slot {slot} not created; set wal_level = logical and restart PostgreSQL"
        ));
    }
    Ok(done)
}

/// `migrations/V3__outbox_emit.sql`: the `outbox_emit` SQL function for producers.
const OUTBOX_EMIT_SQL: &str = include_str!("../../migrations/V3__outbox_emit.sql");

/// The comment V3 puts on the function (before filling in the placeholders): how a
/// later `migrate` tells its own `outbox_emit` from one that serves another table or
/// that someone else wrote.
const OUTBOX_EMIT_MARK: &str = r#"outbox-relay: inserts one event into "{schema}"."{table}""#;

/// Create (or replace) `<schema>.outbox_emit(topic, aggregate_type, aggregate_id,
/// payload, metadata)` for the table just created, unless a function of that
/// signature already exists there without this table's mark (another outbox table in
/// the same schema, or the user's own): that one is left as it is. Returns the line
/// `migrate` prints.
async fn install_outbox_emit(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    table: &str,
    fill: impl Fn(&str) -> String,
) -> Result<String> {
    let row = tx
        .query_one(
            "SELECT p IS NOT NULL, obj_description(p, 'pg_proc')
             FROM (SELECT to_regprocedure(format('%I.outbox_emit(text, text, text, jsonb, jsonb)', $1::text)) AS p) AS f",
            &[&schema],
        )
        .await
        .map_err(|e| from_pg(&e))?;
    let exists: bool = row.get(0);
    let comment: Option<String> = row.get(1);
    if exists && comment.as_deref() != Some(fill(OUTBOX_EMIT_MARK).as_str()) {
        return Ok(format!(
            "function {schema}.outbox_emit exists and does not write to {schema}.{table}: left unchanged"
        ));
    }
    tx.batch_execute(&fill(OUTBOX_EMIT_SQL))
        .await
        .map_err(|e| from_pg(&e).context("migration V3__outbox_emit"))?;
    Ok(format!(
        "created function {schema}.outbox_emit(topic, aggregate_type, aggregate_id, payload, metadata) for producers"
    ))
}

/// A problem found by [`environment_problems`], with its fix.
#[derive(Debug, Clone)]
pub struct Problem {
    pub what: String,
    pub fix: String,
    /// Set when the problem is only that another process streams from the slot: a
    /// standby situation, which `run` waits out instead of refusing to start.
    pub slot_holder: Option<i32>,
}

impl Problem {
    pub fn new(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            fix: fix.into(),
            slot_holder: None,
        }
    }
}

/// Everything wrong with the database for this config, all at once.
pub async fn environment_problems(client: &Client, cfg: &Config) -> Result<Vec<Problem>> {
    let mut problems = Vec::new();
    let (schema, table) = cfg.outbox.qualified();
    let q = |sql: &'static str| async move { client.query_one(sql, &[]).await.map_err(|e| from_pg(&e)) };

    let wal_level: String = q("SHOW wal_level").await?.get(0);
    if wal_level != "logical" {
        problems.push(Problem::new(
            format!("wal_level is {wal_level}, logical replication needs logical"),
            "set wal_level = logical in postgresql.conf (or -c wal_level=logical) and restart PostgreSQL",
        ));
    }
    let row = client
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| from_pg(&e))?;
    if !row.get::<_, bool>(0) {
        problems.push(Problem::new(
            "the relay's role has no REPLICATION privilege",
            "ALTER ROLE <relay user> REPLICATION",
        ));
    }
    let table_exists = table_exists(client, &schema, &table).await?;
    if table_exists {
        problems.extend(privilege_problems(client, cfg, &schema, &table).await?);
    }
    if !table_exists {
        problems.push(Problem::new(
            format!("outbox table {schema}.{table} does not exist"),
            "run `outbox-relay migrate`, or set [outbox] table to your table",
        ));
    } else {
        let cols = table_columns(client, &schema, &table).await?;
        for (field, column) in cfg.outbox.columns.required_fields() {
            if !cols.iter().any(|c| c == column) {
                problems.push(Problem::new(
                    format!(
                        "outbox table {schema}.{table} has no column {column:?} (field {field})"
                    ),
                    format!("set [outbox.columns] {field} = \"<column name>\""),
                ));
            }
        }
    }
    let publication = &cfg.postgres.publication;
    let pub_row = client
        .query_opt(
            "SELECT pubinsert FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(|e| from_pg(&e))?;
    if pub_row.is_some() && table_exists {
        let partitioned_without_root: bool = client
            .query_one(
                "SELECT c.relkind = 'p' AND NOT p.pubviaroot
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
                      pg_publication p
                 WHERE n.nspname = $1 AND c.relname = $2 AND p.pubname = $3",
                &[&schema, &table, publication],
            )
            .await
            .map_err(|e| from_pg(&e))?
            .get(0);
        if partitioned_without_root {
            // Rows would arrive under each partition's name, which is not the outbox
            // table's: the relay would never see them.
            problems.push(Problem::new(
                format!(
                    "{schema}.{table} is partitioned but publication {publication} publishes its partitions under their own names"
                ),
                format!("ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"),
            ));
        }
    }
    match pub_row {
        None => problems.push(Problem::new(
            format!("publication {publication} does not exist"),
            "run `outbox-relay migrate`, or CREATE PUBLICATION ... FOR TABLE <outbox> WITH (publish = 'insert')",
        )),
        Some(r) => {
            if !r.get::<_, bool>(0) {
                problems.push(Problem::new(
                    format!("publication {publication} does not publish inserts"),
                    format!("ALTER PUBLICATION {publication} SET (publish = 'insert')"),
                ));
            }
            let has_table: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                    &[publication, &schema, &table],
                )
                .await
                .map_err(|e| from_pg(&e))?
                .get(0);
            if table_exists && !has_table {
                problems.push(Problem::new(
                    format!("publication {publication} does not include {schema}.{table}"),
                    format!("ALTER PUBLICATION {publication} ADD TABLE {schema}.{table}"),
                ));
            }
        }
    }
    if let Some(slot) = slot_info(client, &cfg.postgres.slot).await? {
        if slot.plugin.as_deref() != Some("pgoutput") {
            problems.push(Problem::new(
                format!(
                    "slot {} uses plugin {:?}, the relay needs pgoutput",
                    cfg.postgres.slot, slot.plugin
                ),
                "drop the slot (events not yet relayed from it are lost) or set postgres.slot to another name",
            ));
        }
        if slot.database.as_deref() != Some(&current_database(client).await?) {
            problems.push(Problem::new(
                format!(
                    "slot {} belongs to another database ({:?})",
                    cfg.postgres.slot, slot.database
                ),
                "set postgres.slot to a name unique to this database",
            ));
        }
        if let Some(pid) = slot.active_pid {
            // PostgreSQL's own words, which the supervisor recognises as "slot busy".
            problems.push(Problem {
                slot_holder: Some(pid),
                ..Problem::new(
                    format!("replication slot \"{}\" is active for PID {pid}", cfg.postgres.slot),
                    "another relay (or pg_recvlogical) is streaming from it; stop it, or this one will wait as a standby",
                )
            });
        }
        if slot.wal_status.as_deref() == Some("lost") {
            problems.push(Problem::new(
                format!("slot {} is invalidated (wal_status = lost): WAL it needed was removed", cfg.postgres.slot),
                "events committed while it was behind are lost from the stream; drop the slot, recreate it, and replay the gap from the table (see docs/operations.md)",
            ));
        }
    }
    Ok(problems)
}

/// What the relay's role may not do that this config needs: the least-privilege role
/// of `deploy/relay-role.sql` has exactly these (REPLICATION is checked above).
async fn privilege_problems(
    client: &Client,
    cfg: &Config,
    schema: &str,
    table: &str,
) -> Result<Vec<Problem>> {
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    // By OID: resolving a qualified name already fails without USAGE on the schema.
    let Some(row) = client
        .query_opt(
            "SELECT current_user::text,
                    has_schema_privilege(n.oid, 'USAGE'),
                    has_table_privilege(c.oid, 'SELECT'),
                    has_table_privilege(c.oid, 'DELETE'),
                    coalesce(has_function_privilege(f.oid, 'EXECUTE'), true),
                    coalesce(f.oid::regprocedure::text, 'pg_logical_emit_message')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             -- The heartbeat's overload; PostgreSQL 17 added a fourth argument.
             LEFT JOIN pg_proc f ON f.proname = 'pg_logical_emit_message'
                  AND f.pronamespace = 'pg_catalog'::regnamespace
                  AND f.proargtypes[2] = 'text'::regtype
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await
        .map_err(|e| from_pg(&e))?
    else {
        return Ok(Vec::new());
    };
    let role: String = row.get(0);
    let role_sql = quote_ident(&role);
    let mut problems = Vec::new();
    let mut need = |ok: bool, what: String, fix: String| {
        if !ok {
            problems.push(Problem::new(what, fix));
        }
    };
    need(
        row.get(1),
        format!("role {role} has no USAGE on schema {schema}"),
        format!(
            "GRANT USAGE ON SCHEMA {} TO {role_sql}",
            quote_ident(schema)
        ),
    );
    need(
        row.get(2),
        format!("role {role} has no SELECT on {schema}.{table}"),
        format!("GRANT SELECT ON {qualified} TO {role_sql}"),
    );
    if cfg.retention.enabled {
        need(
            row.get(3),
            format!("retention is enabled but role {role} has no DELETE on {schema}.{table}"),
            format!("GRANT DELETE ON {qualified} TO {role_sql}, or set retention.enabled = false"),
        );
    }
    if !cfg.monitor.heartbeat_interval.is_zero() {
        need(
            row.get(4),
            format!(
                "monitor.heartbeat_interval is set but role {role} may not call pg_logical_emit_message"
            ),
            format!(
                "GRANT EXECUTE ON FUNCTION {} TO {role_sql}, or set monitor.heartbeat_interval = \"0s\"",
                row.get::<_, String>(5)
            ),
        );
    }
    Ok(problems)
}

async fn table_exists(client: &impl GenericClient, schema: &str, table: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2)",
            &[&schema, &table],
        )
        .await
        .map_err(|e| from_pg(&e))?
        .get(0))
}

/// Server settings that matter for this deployment, explained: not errors, but what an
/// operator should know (`check` prints them, `run` logs them at start).
/// What the server settings that bound the relay's safety mean for this deployment,
/// one line each, whatever their values (`check` prints them; `run` logs them once).
/// The names of `schema.table`'s columns (none when it does not exist).
pub async fn table_columns(client: &Client, schema: &str, table: &str) -> Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT a.attname::text FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &table],
        )
        .await
        .map_err(|e| from_pg(&e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

pub async fn settings_summary(client: &Client) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT name, setting, coalesce(unit, '') FROM pg_settings
             WHERE name IN ('max_slot_wal_keep_size', 'wal_sender_timeout', 'max_replication_slots')
             ORDER BY name",
            &[],
        )
        .await
        .map_err(|e| from_pg(&e))?;
    let used: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .map_err(|e| from_pg(&e))?
        .get(0);
    Ok(rows
        .iter()
        .map(|r| {
            let (name, value, unit): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let meaning = match (name.as_str(), value.as_str()) {
                ("max_slot_wal_keep_size", "-1") => "unlimited: the slot keeps WAL however long the relay is down; watch the disk and outbox_relay_slot_lag_bytes".to_string(),
                ("max_slot_wal_keep_size", _) => format!("{value} {unit}: a relay down or behind by more WAL than this has its slot invalidated, and events must be recovered from the table"),
                ("wal_sender_timeout", "0") => "0 (off): the slot of a relay that died without closing its connection stays busy until TCP notices".to_string(),
                ("wal_sender_timeout", _) => format!("{value} {unit}: the slot of a relay that died without closing its connection is free again after at most this"),
                (_, _) => format!("{value}, {used} in use: each relay needs one"),
            };
            format!("setting {name} = {meaning}")
        })
        .collect())
}

pub async fn setting_notes(client: &Client, cfg: &Config) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let setting = |name: &'static str| async move {
        client
            .query_opt("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
            .await
            .map_err(|e| from_pg(&e))
            .map(|r| r.map(|r| r.get::<_, String>(0)))
    };
    // In MB; -1 = unlimited.
    if let Some(v) = setting("max_slot_wal_keep_size").await? {
        let mb: i64 = v.parse().unwrap_or(-1);
        if mb < 0 {
            notes.push(
                "max_slot_wal_keep_size is unlimited: while the relay is down or behind, PostgreSQL keeps all WAL for its slot and the disk can fill; set a limit above the longest outage you accept and alert on outbox_relay_slot_lag_bytes"
                    .to_string(),
            );
        } else if (mb as u64) * 1024 * 1024 < cfg.monitor.lag_fail_bytes {
            notes.push(format!(
                "max_slot_wal_keep_size ({mb} MB) is below monitor.lag_fail_bytes ({} bytes): the slot can be invalidated (events lost from the stream) before readiness fails; raise it or lower lag_fail_bytes",
                cfg.monitor.lag_fail_bytes
            ));
        }
    }
    if setting("wal_sender_timeout").await?.as_deref() == Some("0") {
        notes.push(
            "wal_sender_timeout is 0: the connection of a relay that died without closing it keeps the slot busy until TCP notices; a value such as 60s frees it sooner"
                .to_string(),
        );
    }
    let max_slots: i64 = setting("max_replication_slots")
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let used: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .map_err(|e| from_pg(&e))?
        .get(0);
    if used >= max_slots && slot_info(client, &cfg.postgres.slot).await?.is_none() {
        notes.push(format!(
            "all {max_slots} replication slots are in use: the relay cannot create {}; raise max_replication_slots or drop an unused slot",
            cfg.postgres.slot
        ));
    }
    let orphans = client
        .query(
            "SELECT slot_name::text, (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots
             WHERE slot_name LIKE 'outbox\\_relay%' AND slot_name <> $1 AND NOT active",
            &[&cfg.postgres.slot],
        )
        .await
        .map_err(|e| from_pg(&e))?;
    for r in orphans {
        let name: String = r.get(0);
        let retained: Option<i64> = r.get(1);
        notes.push(format!(
            "slot {name} is inactive and retains {} bytes of WAL: if no relay uses it, SELECT pg_drop_replication_slot('{name}')",
            retained.unwrap_or(0)
        ));
    }
    Ok(notes)
}

pub async fn current_database(client: &Client) -> Result<String> {
    Ok(client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| from_pg(&e))?
        .get(0))
}

/// The server's current WAL position.
pub async fn current_wal_lsn(client: &Client) -> Result<u64> {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| from_pg(&e))?
        .get(0);
    crate::checkpoint::parse_lsn(&text)
        .ok_or_else(|| Error::transient(format!("unexpected pg_current_wal_lsn {text:?}")))
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<String>,
    pub wal_status: Option<String>,
    pub lag_bytes: Option<i64>,
    pub current_lsn: Option<String>,
    /// `pg_stat_replication.flush_lag` of the streaming connection, in seconds: how
    /// long ago the confirmed position was current (NULL when caught up or idle).
    pub lag_seconds: Option<f64>,
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>> {
    let row = client
        .query_opt(
            "SELECT s.plugin::text, s.database::text, s.active_pid, s.confirmed_flush_lsn::text, s.wal_status::text,
                    (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint, pg_current_wal_lsn()::text,
                    extract(epoch FROM r.flush_lag)::float8
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| from_pg(&e))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        confirmed_flush_lsn: r.get(3),
        wal_status: r.get(4),
        lag_bytes: r.get(5),
        current_lsn: r.get(6),
        lag_seconds: r.get(7),
    }))
}

/// Create the slot if it is missing. Returns whether it was created.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<bool> {
    if slot_info(client, slot).await?.is_some() {
        return Ok(false);
    }
    // PostgreSQL 17+: a failover slot is synchronised to standbys that have
    // `sync_replication_slots` on, so after a promotion the new primary still has it
    // at the position the relay confirmed, and the relay resumes there instead of
    // stopping on a missing slot. Harmless where no standby syncs it.
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| from_pg(&e))?
        .get(0);
    let sql = if version >= 170_000 {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    match client.execute(sql, &[&slot]).await {
        Ok(_) => Ok(true),
        // Another relay created it between our check and our create.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => Ok(false),
        Err(e) => Err(from_pg(&e).context(format!("create replication slot {slot}"))),
    }
}

/// Refuse to start when the environment cannot work; all problems in one error. A slot
/// that another process streams from, alone, is a transient error instead: the
/// supervisor waits (a standby looks again every second), so this one query is also a
/// standby's whole poll, before any NATS connection or checkpoint read.
pub async fn preflight(client: &Client, cfg: &Config) -> Result<()> {
    // A standby (a URL pointing at a node not yet promoted, during a failover) has no
    // slot of its own before promotion: judged now, the slot would look lost.
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(|e| crate::error::from_pg(&e).context("preflight"))?
        .get(0);
    if in_recovery {
        return Err(Error::transient(
            "postgresql is in recovery (a standby, not the primary): the relay streams from the primary",
        )
        .hint("point postgres.url at the primary; the relay retries and starts once this server is promoted"));
    }
    let (busy, problems): (Vec<Problem>, Vec<Problem>) = environment_problems(client, cfg)
        .await?
        .into_iter()
        .partition(|p| p.slot_holder.is_some());
    if problems.is_empty() {
        return match busy.into_iter().next() {
            Some(p) => Err(Error::transient(p.what).hint(
                "another relay is streaming from this slot; this one waits as a standby and takes over when it goes away",
            )),
            None => Ok(()),
        };
    }
    let what: Vec<String> = problems.iter().map(|p| p.what.clone()).collect();
    let fix: Vec<String> = problems.iter().map(|p| p.fix.clone()).collect();
    Err(Error::fatal(what.join("; ")).hint(fix.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `migrate` recognises its own `outbox_emit` by the comment V3 sets.
    #[test]
    fn outbox_emit_migration_sets_the_mark() {
        assert!(OUTBOX_EMIT_SQL.contains(&format!("IS '{OUTBOX_EMIT_MARK}';")));
        assert!(OUTBOX_EMIT_SQL.contains("CREATE OR REPLACE FUNCTION \"{schema}\".outbox_emit("));
    }
}
