#!/usr/bin/env bash
# The README's second command: set up, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# Set-up for the tests: packages, the agent, the debug build the tests use
# and the kernel in the tests' cache (no release build: see setup.sh).
KILN_SETUP_FOR=tests scripts/setup.sh
cargo test --workspace --no-fail-fast
