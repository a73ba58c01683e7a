-- outbox_emit(): the producer helper. One call inserts one event into the outbox table,
-- inside the caller's transaction, and returns its id (the message's Nats-Msg-Id):
--
--   BEGIN;
--   INSERT INTO orders ...;
--   SET LOCAL outbox.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
--   SELECT outbox_emit('created', 'order', '42', '{"order_id": 42}');
--   COMMIT;
--
-- metadata.traceparent is taken from the session setting `outbox.traceparent` when that
-- setting is non-empty and `metadata` is NULL or a JSON object without a `traceparent`
-- key (a traceparent passed in `metadata` wins). Metadata keys become message headers.
--
-- `outbox-relay migrate` applies this file only when it creates the table itself (the
-- function writes to the default layout of V1__outbox_events.sql), and leaves alone an
-- `outbox_emit` of the same signature that it did not create for this table (the
-- COMMENT below is its mark). For a table you created yourself in the default layout,
-- apply it by hand after substituting {schema} and {table}.
--
-- SECURITY INVOKER (the default): the caller needs INSERT on the table, exactly as for
-- a plain INSERT; the function grants nothing, and the relay's role needs nothing for it.
-- The fixed search_path keeps the body from resolving names in the caller's schemas.
CREATE OR REPLACE FUNCTION "{schema}".outbox_emit(
    topic          text,
    aggregate_type text,
    aggregate_id   text,
    payload        jsonb,
    metadata       jsonb DEFAULT NULL
) RETURNS uuid
LANGUAGE sql
VOLATILE
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $outbox_emit$
    INSERT INTO "{schema}"."{table}" (event_topic, aggregate_type, aggregate_id, payload, metadata)
    SELECT $1, $2, $3, $4,
           CASE
               WHEN s.traceparent = '' THEN $5
               WHEN $5 IS NULL THEN jsonb_build_object('traceparent', s.traceparent)
               WHEN jsonb_typeof($5) = 'object' AND NOT ($5 ? 'traceparent')
                   THEN $5 || jsonb_build_object('traceparent', s.traceparent)
               ELSE $5
           END
    FROM (SELECT coalesce(current_setting('outbox.traceparent', true), '') AS traceparent) AS s
    RETURNING id
$outbox_emit$;

COMMENT ON FUNCTION "{schema}".outbox_emit(text, text, text, jsonb, jsonb)
    IS 'outbox-relay: inserts one event into "{schema}"."{table}"';
