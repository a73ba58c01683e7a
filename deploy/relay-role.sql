-- Least-privilege role for `outbox-relay run`, `check` and `status`.
--
-- Run once as a superuser (or a role with CREATEROLE), in the outbox's database, after
-- `outbox-relay migrate` created the table and the publication. `migrate` runs as the
-- table's owner, because CREATE PUBLICATION ... FOR TABLE needs ownership; the relay
-- itself then needs only what is granted here:
--
--   psql -v relay_role=outbox_relay -v relay_password='...' \
--        -v outbox_schema=public -v outbox_table=outbox_events \
--        -f deploy/relay-role.sql app
--
-- REPLICATION lets the role create its slot and stream from it; it gives no access to
-- table data. SELECT on the outbox table is what `check` and `status` read. The
-- password is stored as SCRAM-SHA-256 (the default password_encryption since
-- PostgreSQL 14); pg_hba.conf should accept the role only with `hostssl ...
-- scram-sha-256` (docs/security.md).
\set ON_ERROR_STOP on

CREATE ROLE :"relay_role" LOGIN REPLICATION PASSWORD :'relay_password';
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'relay_role') \gexec
GRANT USAGE ON SCHEMA :"outbox_schema" TO :"relay_role";
GRANT SELECT ON TABLE :"outbox_schema".:"outbox_table" TO :"relay_role";

-- Nothing for outbox_emit(): that function is for producers (docs/producers.md), runs
-- with the caller's rights, and the relay never calls it.
--
-- Only with retention.enabled = true (the relay deletes delivered rows):
--   GRANT DELETE ON TABLE <schema>.<table> TO <relay_role>;
-- Only with monitor.heartbeat_interval > 0, where the function is not executable by
-- PUBLIC:
--   GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO <relay_role>;
--   (PostgreSQL 17+: pg_logical_emit_message(boolean, text, text, boolean))
