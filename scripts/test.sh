#!/usr/bin/env bash
# The README's second command: set up, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --no-fail-fast
