# syntax=docker/dockerfile:1
# outbox-relay image: `docker build -t outbox-relay .`
# Config: mount a TOML file and point OUTBOX_RELAY_CONFIG (or --config) at it, and/or
# set OUTBOX_RELAY_<SECTION>_<KEY> variables (docs/configuration.md). Inside a container
# set OUTBOX_RELAY_HTTP_LISTEN=0.0.0.0:9187, or /healthz, /readyz and /metrics are only
# reachable from inside it (the default listen address is 127.0.0.1:9187).
#
# No HEALTHCHECK: the runtime image has no curl/wget. Use the orchestrator's HTTP probes
# instead (Kubernetes: livenessProbe GET /healthz, readinessProbe GET /readyz, port 9187).

# --- build ------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, with placeholder sources, so this layer is reused until
# Cargo.toml or Cargo.lock change. The manifest names tests/main.rs explicitly, so
# cargo needs that file to exist too.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/main.rs \
    && cargo build --release --locked --bin outbox-relay \
    && rm -rf src tests

# The real sources. migrations/ is embedded with include_str!. `touch` makes the real
# files newer than the placeholder build, so cargo rebuilds the crate itself.
COPY src ./src
COPY migrations ./migrations
RUN mkdir -p tests && touch tests/main.rs \
    && touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin outbox-relay \
    && cp target/release/outbox-relay /usr/local/bin/outbox-relay

# --- runtime ------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin relay
COPY --from=builder /usr/local/bin/outbox-relay /usr/local/bin/outbox-relay
USER 10001:10001
EXPOSE 9187
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
