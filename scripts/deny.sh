#!/usr/bin/env bash
# Supply-chain check: RUSTSEC advisories, licenses, duplicate versions and crate
# sources for everything in Cargo.lock, as configured in deny.toml.
#
#   scripts/deny.sh            # installs cargo-deny (from crates.io) if missing
#   DENY_OFFLINE=1 scripts/deny.sh   # licenses, bans and sources only (no advisory db)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deny >/dev/null 2>&1; then
    cargo install --locked cargo-deny
fi
if [ "${DENY_OFFLINE:-0}" = 1 ]; then
    exec cargo deny --locked check licenses bans sources
fi
exec cargo deny --locked check
