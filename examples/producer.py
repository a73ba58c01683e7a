#!/usr/bin/env python3
"""A producer with psycopg 3: each order is one PostgreSQL transaction that INSERTs the
business row (`orders`) and its outbox event together. The relay publishes the event if
and only if the transaction commits. docs/producers.md walks through it.

    python3 examples/producer.py --postgres postgres://postgres@127.0.0.1:5432/app
    python3 examples/producer.py --via emit --orders 3 \\
        --traceparent 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
    python3 examples/producer.py --rollback      # commits nothing, publishes nothing

`--via insert` (the default) writes the outbox row with a plain INSERT; `--via emit`
calls the `outbox_emit()` SQL function that `outbox-relay migrate` installs beside the
table it creates. Each order prints one line, `order=<id> event=<uuid> via=<how>`
(`rolled back: ...` with `--rollback`). Needs `pip install "psycopg[binary]"`
(scripts/setup.sh installs it into .tools/python: run with PYTHONPATH=.tools/python)
and `outbox-relay migrate` first; creates the `orders` table if it is missing.
"""

import argparse

import psycopg
from psycopg.types.json import Jsonb

# The business table (the same as deploy/demo-schema.sql).
ORDERS_TABLE = """
CREATE TABLE IF NOT EXISTS orders (
    id          bigserial   PRIMARY KEY,
    customer    text        NOT NULL,
    total_cents int         NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
)
"""


def place_order(conn, args, total_cents):
    """One business transaction: the order and its event commit (or roll back)
    together. Returns the order's id and the event's id (the message's Nats-Msg-Id)."""
    order_id = event_id = None
    # On an autocommit connection, `transaction()` is BEGIN ... COMMIT, or ROLLBACK when
    # the block raises (psycopg.Rollback rolls back without propagating).
    with conn.transaction():
        order_id = conn.execute(
            "INSERT INTO orders (customer, total_cents) VALUES (%s, %s) RETURNING id",
            (args.customer, total_cents),
        ).fetchone()[0]
        payload = Jsonb(
            {"order_id": order_id, "customer": args.customer, "total_cents": total_cents}
        )
        if args.via == "insert":
            # metadata keys become message headers: traceparent travels as one.
            metadata = Jsonb({"traceparent": args.traceparent}) if args.traceparent else None
            event_id = conn.execute(
                "INSERT INTO outbox_events"
                " (event_topic, aggregate_type, aggregate_id, payload, metadata)"
                " VALUES ('created', 'order', %s, %s, %s) RETURNING id::text",
                (str(order_id), payload, metadata),
            ).fetchone()[0]
        else:
            if args.traceparent:
                # SET LOCAL outbox.traceparent = '...', with a bind parameter.
                conn.execute(
                    "SELECT set_config('outbox.traceparent', %s, true)", (args.traceparent,)
                )
            event_id = conn.execute(
                "SELECT outbox_emit('created', 'order', %s, %s)::text",
                (str(order_id), payload),
            ).fetchone()[0]
        if args.rollback:
            raise psycopg.Rollback()
    return order_id, event_id


def main():
    parser = argparse.ArgumentParser(
        description="Commit orders, each with its outbox event in the same transaction"
    )
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/app")
    parser.add_argument("--via", choices=["insert", "emit"], default="insert")
    parser.add_argument("--orders", type=int, default=1)
    parser.add_argument("--customer", default="ada")
    parser.add_argument("--traceparent")
    parser.add_argument("--rollback", action="store_true")
    args = parser.parse_args()

    with psycopg.connect(args.postgres, autocommit=True) as conn:
        conn.execute(ORDERS_TABLE)
        for n in range(args.orders):
            order_id, event_id = place_order(conn, args, 1000 + n % 9000)
            outcome = "rolled back: " if args.rollback else ""
            print(f"{outcome}order={order_id} event={event_id} via={args.via}", flush=True)


if __name__ == "__main__":
    main()
