#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: `bash scripts/test.sh`.
# Installs what it needs (PostgreSQL server binaries, nats-server, prometheus) via
# setup.sh, then runs formatting and lint checks, unit tests, the integration suite
# against real servers (current nats-server, then the core suite again against
# Debian's 2.9), and the static validation of the Docker deploy path and of the
# monitoring files (validate-compose.py, promtool).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "setup: PostgreSQL server binaries, nats-server, prometheus"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "supply chain: cargo deny (licences, bans, sources; advisories when the database can be fetched)"
bash scripts/supply-chain.sh

step "cargo test (unit tests, integration suite against real servers)"
cargo test --locked

if [ -x /usr/sbin/nats-server ]; then
    step "compatibility: core suite against Debian's nats-server $(/usr/sbin/nats-server --version 2>/dev/null || true)"
    OUTBOX_TEST_NATS_SERVER=/usr/sbin/nats-server cargo test --locked --test main -- core:: faults::poison faults::terminated hostile:: routing::delay_seconds_needs
else
    step "compatibility: /usr/sbin/nats-server (Debian 2.9) not installed: skipped"
fi

PG18_BIN=".tools/pg18/bin"
if [ -x "$PG18_BIN/postgres" ]; then
    step "second PostgreSQL major: integration suite against $("$PG18_BIN/postgres" --version)"
    OUTBOX_TEST_PG_BIN="$PWD/$PG18_BIN" cargo test --locked --test main
else
    step "second PostgreSQL major: $PG18_BIN not installed (no npm?): skipped"
fi

# The other supported majors: everything that talks to PostgreSQL, without the long
# load and NATS fault runs (their PostgreSQL side is the same as on 15 and 18).
for major in 14 16 17; do
    bin=".tools/pg$major/bin"
    if [ -x "$bin/postgres" ]; then
        step "PostgreSQL $major: integration suite without the load-fault runs, against $("$bin/postgres" --version)"
        OUTBOX_TEST_PG_BIN="$PWD/$bin" cargo test --locked --test main -- \
            --skip faults::sigkill --skip faults::nats_outage --skip faults::quick_nats \
            --skip faults::puback --skip faults::million --skip faults::large \
            --skip ha::nats_cluster --skip hostile:: --skip chaos:: --skip monitoring::
    else
        step "PostgreSQL $major: $bin not installed (no npm?): skipped"
    fi
done

step "docker-compose.yml and Dockerfile: static validation"
python3 scripts/validate-compose.py "${CARGO_TARGET_DIR:-target}/debug/outbox-relay"

step "promtool: the alert rules and the Prometheus config of the monitoring profile"
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml

step "all green"
