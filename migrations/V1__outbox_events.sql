-- The outbox table (ADR-004 without polling columns): delivery state lives in the
-- replication slot and the relay's checkpoint, not in the rows. Applications only INSERT.
-- `{schema}`, `{table}` and `{publication}` are filled in by `outbox-relay migrate` from
-- [outbox] table and [postgres] publication; with the defaults this file is plain SQL
-- for any migration tool after substituting public / outbox_events / outbox_relay.
-- gen_random_uuid() is built in from PostgreSQL 13; the relay supports 14 and later.
CREATE TABLE IF NOT EXISTS "{schema}"."{table}" (
    id                 uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    event_topic        text        NOT NULL,
    aggregate_type     text,
    aggregate_id       text,
    tenant_id          text        NOT NULL DEFAULT 'default',
    source_bc          text,
    destination_topics jsonb,
    schema_id          text,
    schema_version     int         NOT NULL DEFAULT 1,
    payload            jsonb       NOT NULL,
    metadata           jsonb,
    occurred_at        timestamptz NOT NULL DEFAULT now(),
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- For retention (prune by age) and for operators looking up events.
CREATE INDEX IF NOT EXISTS "{table}_created_at_idx" ON "{schema}"."{table}" (created_at);
CREATE INDEX IF NOT EXISTS "{table}_tenant_idx" ON "{schema}"."{table}" (tenant_id, created_at);
CREATE INDEX IF NOT EXISTS "{table}_aggregate_idx" ON "{schema}"."{table}" (aggregate_type, aggregate_id);
CREATE INDEX IF NOT EXISTS "{table}_topic_idx" ON "{schema}"."{table}" (event_topic, created_at);
