-- Publication of INSERTs only: updates and deletes (retention pruning) are never streamed.
-- publish_via_partition_root: a partitioned outbox is published as its root table, so
-- rows in every partition (present and future) reach the relay under the one name it
-- knows; for a plain table it changes nothing.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{publication}') THEN
        CREATE PUBLICATION "{publication}" FOR TABLE "{schema}"."{table}" WITH (publish = 'insert', publish_via_partition_root = true);
    ELSIF NOT EXISTS (
        SELECT 1 FROM pg_publication_tables
        WHERE pubname = '{publication}' AND schemaname = '{schema}' AND tablename = '{table}'
    ) THEN
        ALTER PUBLICATION "{publication}" ADD TABLE "{schema}"."{table}";
    END IF;
END
$$;
