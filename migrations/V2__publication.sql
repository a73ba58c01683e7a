-- Publication of INSERTs only: updates and deletes (retention pruning) are never streamed.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{publication}') THEN
        CREATE PUBLICATION "{publication}" FOR TABLE "{schema}"."{table}" WITH (publish = 'insert');
    ELSIF NOT EXISTS (
        SELECT 1 FROM pg_publication_tables
        WHERE pubname = '{publication}' AND schemaname = '{schema}' AND tablename = '{table}'
    ) THEN
        ALTER PUBLICATION "{publication}" ADD TABLE "{schema}"."{table}";
    END IF;
END
$$;
