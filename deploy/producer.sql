-- One demo business transaction: an order row and its outbox event, committed together.
-- Either both are stored or neither; the relay publishes the event only if the order
-- committed. Run repeatedly by scripts/demo.sh and by the `producer` service of
-- docker-compose.yml (needs deploy/demo-schema.sql and `outbox-relay migrate` first).
--
-- `sent_at_ms` is the producer's clock when the event row was written (unix ms); the
-- tail example (examples/tail.rs) prints the end-to-end latency from it.
BEGIN;
INSERT INTO orders (customer, total_cents)
VALUES ('customer-' || (1 + floor(random() * 50))::int, (100 + floor(random() * 9900))::int);
INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, source_bc, payload, metadata)
SELECT 'created', 'order', o.id::text, 'demo-shop',
       jsonb_build_object(
           'order_id', o.id,
           'customer', o.customer,
           'total_cents', o.total_cents,
           'sent_at_ms', (extract(epoch FROM clock_timestamp()) * 1000)::bigint),
       jsonb_build_object('producer', 'demo')
FROM orders o
WHERE o.id = currval(pg_get_serial_sequence('orders', 'id'));
COMMIT;
