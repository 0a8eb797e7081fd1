#!/usr/bin/env bash
# The test command the README gives: every crate's unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_BACKTRACE=1
cargo test --workspace --locked "$@"
# The README's "Your own data" commands, run as written on the bundled world models.
./scripts/own-data.sh target/debug/retort
