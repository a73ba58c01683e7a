#!/usr/bin/env bash
# The demo, one command on a fresh Debian 12 machine:   bash scripts/demo.sh
#
#  1. scripts/setup.sh: PostgreSQL server binaries (apt) and nats-server (.tools/bin).
#  2. cargo build --release: the relay and the `tail` example.
#  3. A private PostgreSQL (wal_level=logical) and nats-server -js, on free ports,
#     with all their files under .tools/demo/. Services on 5432/4222 are not used.
#  4. outbox-relay migrate, check, then run in the background (log: .tools/demo/relay.log).
#  5. The tail example prints every message arriving in the OUTBOX stream, while a
#     producer commits one order + its outbox event every 200 ms for DEMO_SECONDS
#     (default 20) seconds.
#  6. outbox-relay status, then everything is stopped (also on Ctrl-C or error): the
#     relay with SIGTERM (graceful drain), PostgreSQL with pg_ctl -m fast, nats-server.
#
# Environment: DEMO_SECONDS (default 20). Works as root (PostgreSQL then runs as the
# `postgres` user) and as an ordinary user. Exit status 0 only if every produced event
# arrived in the stream.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEMO_SECONDS="${DEMO_SECONDS:-20}"
DEMO="$ROOT/.tools/demo"
STREAM=OUTBOX

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

case "$DEMO_SECONDS" in '' | *[!0-9]*) die "DEMO_SECONDS must be a whole number of seconds" ;; esac

# --- state for cleanup -----------------------------------------------------------
PG_BIN=""
PGROOT=""
PGROOT_TMP=""
AS_PG=()
NATS_PID=""
RELAY_PID=""
TAIL_PID=""
VIEW_PID=""
PRODUCER_PID=""

stop_pid() { # pid name seconds: SIGTERM, wait, SIGKILL if still there
    local pid="$1" name="$2" secs="$3" i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "  $name did not stop within ${secs}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    echo
    echo "==> cleaning up"
    stop_pid "$PRODUCER_PID" producer 5
    if [ -n "$RELAY_PID" ] && kill -0 "$RELAY_PID" 2>/dev/null; then
        kill -TERM "$RELAY_PID"
        local i status
        for ((i = 0; i < 300; i++)); do
            kill -0 "$RELAY_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$RELAY_PID" 2>/dev/null; then
            echo "  relay did not stop within 30s of SIGTERM: SIGKILL"
            kill -KILL "$RELAY_PID"
        fi
        wait "$RELAY_PID"
        status=$?
        echo "  relay stopped (SIGTERM, exit status $status); its log: $DEMO/relay.log"
    fi
    stop_pid "$TAIL_PID" tail 5
    stop_pid "$VIEW_PID" viewer 2
    if [ -n "$PGROOT" ] && [ -f "$PGROOT/data/postmaster.pid" ]; then
        "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PGROOT/data" -m fast -w -t 60 stop >/dev/null \
            && echo "  postgresql stopped (pg_ctl -m fast)"
    fi
    if [ -n "$NATS_PID" ]; then
        stop_pid "$NATS_PID" nats-server 10
        echo "  nats-server stopped"
    fi
    if [ -n "$PGROOT_TMP" ]; then
        rm -rf "$PGROOT_TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers -------------------------------------------------------------------------
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

port_free() {
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$1" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
    elif tcp_open "$1"; then
        return 1
    fi
}

pick_port() { # preferred port, or one the kernel hands out
    local want="$1" p
    if port_free "$want"; then
        echo "$want"
        return
    fi
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    for ((p = want + 1; p < want + 200; p++)); do
        if port_free "$p"; then
            echo "$p"
            return
        fi
    done
    die "no free port near $want"
}

wait_tcp() { # port name seconds
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        tcp_open "$1" && return 0
        sleep 0.1
    done
    die "$2 did not accept connections on 127.0.0.1:$1 within $3s"
}

http_get() { # path -> response body
    (
        exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT" || exit 1
        printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$1" >&3
        cat <&3
    ) 2>/dev/null | tr -d '\r' | sed '1,/^$/d'
}

http_status() { # path -> status code or nothing
    (
        exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT" || exit 1
        printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$1" >&3
        head -n 1 <&3
    ) 2>/dev/null | awk '{ print $2 }'
}

pg_bin_dir() { # same rule as scripts/setup.sh and tests/support/postgres.rs
    if [ -n "${OUTBOX_TEST_PG_BIN:-}" ] && [ -x "${OUTBOX_TEST_PG_BIN}/initdb" ]; then
        printf '%s' "$OUTBOX_TEST_PG_BIN"
        return
    fi
    local d best="" best_ver=-1 ver
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] || continue
        ver="$(basename "$(dirname "$d")")"
        ver="${ver%%.*}"
        if [[ "$ver" =~ ^[0-9]+$ ]] && [ "$ver" -gt "$best_ver" ]; then
            best_ver="$ver"
            best="$d"
        fi
    done
    printf '%s' "$best"
}

# The relay reads every OUTBOX_RELAY_* variable as a config override (and rejects
# unknown ones): the demo's config file alone decides, so run it without them.
RELAY_ENV=(env)
for v in $(compgen -e); do
    case "$v" in OUTBOX_RELAY_*) RELAY_ENV+=(-u "$v") ;; esac
done

# --- 1. tools ------------------------------------------------------------------------
log "scripts/setup.sh"
bash "$ROOT/scripts/setup.sh"
PG_BIN="$(pg_bin_dir)"
[ -n "$PG_BIN" ] || die "no PostgreSQL server binaries found under /usr/lib/postgresql/*/bin"
[ -x "$PG_BIN/psql" ] || die "$PG_BIN/psql missing (apt-get install postgresql-client)"
NATS_SERVER="$ROOT/.tools/bin/nats-server"
[ -x "$NATS_SERVER" ] || die "$NATS_SERVER missing: scripts/setup.sh should have installed it"

# --- 2. build ------------------------------------------------------------------------
log "cargo build --release (a few minutes the first time)"
cargo build --release
log "cargo build --release --example tail"
cargo build --release --example tail
RELAY="$ROOT/target/release/outbox-relay"
TAIL="$ROOT/target/release/examples/tail"

# --- 3. servers ------------------------------------------------------------------------
# Leftovers of an interrupted earlier demo: stop them before wiping the directory.
if [ -f "$DEMO/pg/data/postmaster.pid" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups \
            "$PG_BIN/pg_ctl" -D "$DEMO/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    else
        "$PG_BIN/pg_ctl" -D "$DEMO/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
fi
if [ -f "$DEMO/nats.pid" ]; then
    old="$(cat "$DEMO/nats.pid")"
    if [ -r "/proc/$old/cmdline" ] && tr '\0' ' ' <"/proc/$old/cmdline" | grep -qF -- "$DEMO/nats"; then
        kill -TERM "$old" 2>/dev/null || true
        sleep 1
    fi
fi
rm -rf "$DEMO"
mkdir -p "$DEMO"

PG_PORT="$(pick_port 55432)"
NATS_PORT="$(pick_port 54222)"
HTTP_PORT="$(pick_port 59187)"

log "PostgreSQL ($("$PG_BIN/postgres" --version)) on 127.0.0.1:$PG_PORT"
PGROOT="$DEMO/pg"
mkdir -p "$PGROOT"
if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses to run as root: its files and processes belong to `postgres`.
    id postgres >/dev/null 2>&1 || die "running as root but there is no postgres user (apt-get install postgresql creates it)"
    AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups)
    chown postgres:postgres "$PGROOT"
    if ! "${AS_PG[@]}" test -w "$PGROOT"; then
        # The checkout is not reachable for the postgres user (e.g. under /root).
        PGROOT_TMP="$(mktemp -d "${TMPDIR:-/tmp}/outbox-relay-demo-pg.XXXXXX")"
        chmod 0755 "$PGROOT_TMP"
        chown postgres:postgres "$PGROOT_TMP"
        rmdir "$PGROOT"
        PGROOT="$PGROOT_TMP"
        echo "  $DEMO is not accessible to the postgres user: using $PGROOT"
    fi
fi
(cd "$PGROOT" && "${AS_PG[@]}" "$PG_BIN/initdb" -D "$PGROOT/data" -A trust -U postgres \
    -E UTF8 --locale=C --no-sync >"$PGROOT/initdb.log" 2>&1) \
    || { cat "$PGROOT/initdb.log" >&2; die "initdb failed"; }
(cd "$PGROOT" && "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/postgres.log" -w -t 60 \
    -o "-c port=$PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='$PGROOT' -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10" \
    start >/dev/null) \
    || { tail -n 20 "$PGROOT/postgres.log" >&2; die "PostgreSQL did not start"; }
PSQL=("$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" "postgres://postgres@127.0.0.1:$PG_PORT/postgres" -c "CREATE DATABASE app"
PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/app"
"${PSQL[@]}" "$PG_URL" -f "$ROOT/deploy/demo-schema.sql"

log "nats-server ($("$NATS_SERVER" --version)) -js on 127.0.0.1:$NATS_PORT"
mkdir -p "$DEMO/nats"
"$NATS_SERVER" -js -sd "$DEMO/nats" -a 127.0.0.1 -p "$NATS_PORT" -l "$DEMO/nats.log" &
NATS_PID=$!
echo "$NATS_PID" >"$DEMO/nats.pid"
wait_tcp "$NATS_PORT" nats-server 30

# --- 4. relay --------------------------------------------------------------------------
CONF="$DEMO/relay.toml"
cat >"$CONF" <<EOF
# Written by scripts/demo.sh.
[postgres]
url = "$PG_URL"

[outbox]
table = "public.outbox_events"

[nats]
url = "nats://127.0.0.1:$NATS_PORT"

[routing]
subject = "outbox.{aggregate_type}.{event_topic}"

[http]
listen = "127.0.0.1:$HTTP_PORT"

[log]
# The relay's own lines at info; the client libraries' only from warn up.
level = "warn,outbox_relay=info"

# Created (or updated) by \`run\` at start. It also captures the dead-letter
# subjects (outbox.dlq.>).
[[streams]]
name = "$STREAM"
subjects = ["outbox.>"]
EOF
log "config $CONF"
cat "$CONF"

log "outbox-relay migrate"
"${RELAY_ENV[@]}" "$RELAY" --config "$CONF" migrate
log "outbox-relay check"
"${RELAY_ENV[@]}" "$RELAY" --config "$CONF" check

log "outbox-relay run (background, log $DEMO/relay.log)"
"${RELAY_ENV[@]}" NO_COLOR=1 "$RELAY" --config "$CONF" run >>"$DEMO/relay.log" 2>&1 &
RELAY_PID=$!
for ((i = 0; i < 600; i++)); do
    [ "$(http_status /readyz)" = "200" ] && break
    if ! kill -0 "$RELAY_PID" 2>/dev/null; then
        tail -n 30 "$DEMO/relay.log" >&2
        die "the relay exited during startup"
    fi
    sleep 0.1
done
[ "$(http_status /readyz)" = "200" ] || { tail -n 30 "$DEMO/relay.log" >&2; die "relay not ready after 60s"; }
echo "  ready: http://127.0.0.1:$HTTP_PORT/readyz says 200"

# --- 5. tail + producer ------------------------------------------------------------------
log "tail: every message of stream $STREAM as it arrives (seq, subject, Nats-Msg-Id, latency)"
: >"$DEMO/tail.out"
: >"$DEMO/tail.err"
"$TAIL" --nats "nats://127.0.0.1:$NATS_PORT" --stream "$STREAM" --all >"$DEMO/tail.out" 2>"$DEMO/tail.err" &
TAIL_PID=$!
tail -n +1 -f --pid="$TAIL_PID" "$DEMO/tail.out" &
VIEW_PID=$!
for ((i = 0; i < 100; i++)); do
    grep -q "following" "$DEMO/tail.err" 2>/dev/null && break
    kill -0 "$TAIL_PID" 2>/dev/null || { cat "$DEMO/tail.err" >&2; die "the tail example exited"; }
    sleep 0.1
done

log "producer: one order + one outbox event per transaction, every 200 ms, for ${DEMO_SECONDS}s"
end=$((SECONDS + DEMO_SECONDS))
{
    while [ "$SECONDS" -lt "$end" ]; do
        cat "$ROOT/deploy/producer.sql"
        sleep 0.2
    done
} | "${PSQL[@]}" "$PG_URL" >/dev/null &
PRODUCER_PID=$!
wait "$PRODUCER_PID" || die "the producer failed"
PRODUCER_PID=""

produced="$("${PSQL[@]}" -At "$PG_URL" -c "SELECT count(*) FROM outbox_events")"
orders="$("${PSQL[@]}" -At "$PG_URL" -c "SELECT count(*) FROM orders")"
received=0
for ((i = 0; i < 300; i++)); do
    received="$(grep -c '^seq=' "$DEMO/tail.out" || true)"
    [ "$received" -ge "$produced" ] && break
    sleep 0.1
done
sleep 0.5 # a duplicate, if there were one, would show up now
received="$(grep -c '^seq=' "$DEMO/tail.out" || true)"
distinct="$(grep -o ' id=[^ ]*' "$DEMO/tail.out" | sort -u | wc -l)"
stop_pid "$VIEW_PID" viewer 2
VIEW_PID=""

log "summary"
echo "  committed:        $orders orders, $produced outbox events"
echo "  received by tail: $received messages, $distinct distinct Nats-Msg-Id"
grep -o 'e2e=-\?[0-9]*' "$DEMO/tail.out" | cut -d= -f2 | sort -n | awk '
    { v[NR] = $1; s += $1 }
    END { if (NR) printf "  end-to-end latency (insert -> tail): avg %.1f ms, median %d ms, max %d ms\n", s / NR, v[int((NR + 1) / 2)], v[NR] }'
http_get /metrics | grep -E '^outbox_relay_(events_published|events_dead_lettered|transactions)_total ' | sed 's/^/  /' || true

log "outbox-relay status"
"${RELAY_ENV[@]}" "$RELAY" --config "$CONF" status || true

if [ "$received" -ne "$produced" ] || [ "$distinct" -ne "$produced" ]; then
    tail -n 30 "$DEMO/relay.log" >&2
    die "expected $produced events once each in stream $STREAM, the tail saw $received ($distinct distinct)"
fi
echo
echo "All $produced events arrived, each exactly once. Logs and data: $DEMO"
