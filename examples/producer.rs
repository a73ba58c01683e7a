//! A producer: each order is one PostgreSQL transaction that INSERTs the business row
//! (`orders`) and its outbox event together. The event is published by the relay if and
//! only if the transaction commits. docs/producers.md walks through it.
//!
//! ```text
//! cargo run --example producer -- --postgres postgres://postgres@127.0.0.1:5432/app
//! cargo run --example producer -- --via emit --orders 3 \
//!     --traceparent 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
//! cargo run --example producer -- --rollback      # commits nothing, publishes nothing
//! ```
//!
//! `--via insert` (the default) writes the outbox row with a plain INSERT; `--via emit`
//! calls the `outbox_emit()` SQL function that `outbox-relay migrate` installs beside the
//! table it creates. Each order prints one line, `order=<id> event=<uuid> via=<how>`
//! (`rolled back: ...` with `--rollback`). Needs `outbox-relay migrate` first; creates the
//! `orders` table if it is missing.

use std::error::Error;

use clap::{Parser, ValueEnum};
use tokio_postgres::{Client, NoTls};

/// The business table (the same as deploy/demo-schema.sql).
const ORDERS_TABLE: &str = "CREATE TABLE IF NOT EXISTS orders (
    id          bigserial   PRIMARY KEY,
    customer    text        NOT NULL,
    total_cents int         NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
)";

#[derive(Clone, Copy, ValueEnum)]
enum Via {
    /// A plain `INSERT INTO outbox_events`.
    Insert,
    /// `SELECT outbox_emit(...)`.
    Emit,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Insert => "insert",
            Via::Emit => "emit",
        }
    }
}

#[derive(Parser)]
#[command(about = "Commit orders, each with its outbox event in the same transaction")]
struct Args {
    /// PostgreSQL URL of the database that holds the outbox table.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/app")]
    postgres: String,
    /// How the outbox row is written.
    #[arg(long, value_enum, default_value_t = Via::Insert)]
    via: Via,
    /// How many orders (one transaction each).
    #[arg(long, default_value_t = 1)]
    orders: u32,
    /// The orders' customer.
    #[arg(long, default_value = "ada")]
    customer: String,
    /// W3C trace context to carry to consumers as the `traceparent` header.
    #[arg(long)]
    traceparent: Option<String>,
    /// Roll each transaction back instead of committing it.
    #[arg(long)]
    rollback: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    // NoTls keeps the example short; production code connects with TLS
    // (e.g. tokio-postgres-rustls, as the relay does).
    let (mut client, connection) = tokio_postgres::connect(&args.postgres, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("producer: connection ended: {e}");
        }
    });
    client.batch_execute(ORDERS_TABLE).await?;

    for n in 0..args.orders {
        let total_cents = 1000 + i32::try_from(n % 9000)?;
        let (order_id, event_id) = place_order(&mut client, &args, total_cents).await?;
        let outcome = if args.rollback { "rolled back: " } else { "" };
        println!(
            "{outcome}order={order_id} event={event_id} via={}",
            args.via.name()
        );
    }
    Ok(())
}

/// One business transaction: the order and its event commit (or roll back) together.
/// Returns the order's id and the event's id (the message's `Nats-Msg-Id`).
async fn place_order(
    client: &mut Client,
    args: &Args,
    total_cents: i32,
) -> Result<(i64, String), Box<dyn Error>> {
    let tx = client.transaction().await?;
    let order_id: i64 = tx
        .query_one(
            "INSERT INTO orders (customer, total_cents) VALUES ($1, $2) RETURNING id",
            &[&args.customer, &total_cents],
        )
        .await?
        .get(0);
    // The message body. Without tokio-postgres' `with-serde_json-1` feature JSON is
    // passed as text and cast (`$2::text::jsonb`); with it, bind a serde_json::Value.
    let payload = serde_json::json!({
        "order_id": order_id,
        "customer": args.customer,
        "total_cents": total_cents,
    })
    .to_string();
    let aggregate_id = order_id.to_string();

    let event_id: String = match args.via {
        Via::Insert => {
            // metadata keys become message headers: traceparent travels as one.
            let metadata = args
                .traceparent
                .as_ref()
                .map(|tp| serde_json::json!({ "traceparent": tp }).to_string());
            tx.query_one(
                "INSERT INTO outbox_events (event_topic, aggregate_type, aggregate_id, payload, metadata)
                 VALUES ('created', 'order', $1, $2::text::jsonb, $3::text::jsonb)
                 RETURNING id::text",
                &[&aggregate_id, &payload, &metadata],
            )
            .await?
            .get(0)
        }
        Via::Emit => {
            if let Some(tp) = &args.traceparent {
                // `SET LOCAL outbox.traceparent = '...'` with a bind parameter: SET takes
                // none, set_config(..., true) is the same and lasts until COMMIT/ROLLBACK.
                tx.execute("SELECT set_config('outbox.traceparent', $1, true)", &[tp])
                    .await?;
            }
            tx.query_one(
                "SELECT outbox_emit('created', 'order', $1, $2::text::jsonb)::text",
                &[&aggregate_id, &payload],
            )
            .await?
            .get(0)
        }
    };

    if args.rollback {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok((order_id, event_id))
}
