#!/usr/bin/env bash
# Soak of the real llmd (issue 9): `scripts/soak.sh SECS` (default 60). Builds the
# binaries, then runs tests/src/bin/llmd-soak.rs, which prints the figures and exits
# non-zero on any invalid_grant, failed agent call or leaked secret.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: scripts/soak.sh SECS" >&2; exit 2 ;;
esac
cargo build --workspace --bins --quiet
target="${CARGO_TARGET_DIR:-target}"
exec "$target/debug/llmd-soak" "$secs"
