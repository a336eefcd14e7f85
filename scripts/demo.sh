#!/usr/bin/env bash
# The README's first command: set up, build a Debian image locally, and run
# the example job in a fresh VM.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -q --release -p kiln-tests --bin kiln-fixture
IMG=target/demo/debian-bookworm
mkdir -p target/demo
./target/release/kiln-fixture debian "$IMG" >/dev/null
exec ./target/release/kiln run-job --image "$IMG" --script pipelines/examples/hello.sh
