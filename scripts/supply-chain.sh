#!/usr/bin/env bash
# Supply-chain checks of the dependency graph with cargo-deny, policy in deny.toml:
# licences (an allow-list), bans (duplicate versions are warnings), sources (only the
# default public registry), and security advisories (RustSec: vulnerable, unmaintained,
# unsound, yanked).
# Installs cargo-deny when it is missing (from source: about 4 minutes on 2 cores).
#
#   bash scripts/supply-chain.sh
#
# The advisory database is a git repository on GitHub. When it cannot be fetched, the
# advisories are checked against a copy fetched earlier if there is one, and otherwise
# NOT checked: the script says so loudly and still passes, unless
# SUPPLY_CHAIN_REQUIRE_ADVISORIES=1, which makes that a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO_DENY_VERSION=0.20.2

step() { printf '\n==> %s\n' "$*"; }

if ! cargo deny --version >/dev/null 2>&1; then
    step "installing cargo-deny $CARGO_DENY_VERSION (not found)"
    start=$SECONDS
    cargo install --locked cargo-deny --version "$CARGO_DENY_VERSION"
    echo "installed in $((SECONDS - start)) s"
fi

step "cargo deny check licenses bans sources ($(cargo deny --version))"
cargo deny --locked check --hide-inclusion-graph licenses bans sources

step "cargo deny check advisories"
db_root="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if fetch_log=$(cargo deny fetch db 2>&1); then
    cargo deny --locked check --hide-inclusion-graph advisories
    exit 0
fi
reason=$(printf '%s\n' "$fetch_log" | grep -m1 'fatal:' ||
    printf '%s\n' "$fetch_log" | grep -m1 -i 'error' ||
    printf '%s\n' "$fetch_log" | tail -n 1)
cached=$(find "$db_root" -mindepth 1 -maxdepth 1 -type d -name 'advisory-db-*' 2>/dev/null | head -n 1)
if [ -n "$cached" ] && [ -d "$cached/crates" ]; then
    when=$(git -C "$cached" log -1 --format=%cs 2>/dev/null || echo "unknown date")
    echo "WARNING: the advisory database could not be fetched ($reason)."
    echo "WARNING: checking against the copy fetched earlier, as of $when: newer advisories are not known."
    cargo deny --locked --offline check --hide-inclusion-graph advisories
    exit 0
fi
cat <<EOF

!!! ADVISORIES NOT CHECKED !!!
The RustSec advisory database could not be fetched and no earlier copy exists, so no
dependency was checked for known vulnerabilities, unmaintained or yanked crates.
Reason: $reason
Run \`cargo deny check advisories\` on a machine that reaches the database.

EOF
if [ "${SUPPLY_CHAIN_REQUIRE_ADVISORIES:-0}" = 1 ]; then
    echo "SUPPLY_CHAIN_REQUIRE_ADVISORIES=1: failing"
    exit 1
fi
