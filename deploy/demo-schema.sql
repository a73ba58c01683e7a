-- The demo's business table. Not part of the relay: the outbox table itself is created
-- by `outbox-relay migrate`. Idempotent.
CREATE TABLE IF NOT EXISTS orders (
    id          bigserial   PRIMARY KEY,
    customer    text        NOT NULL,
    total_cents int         NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
