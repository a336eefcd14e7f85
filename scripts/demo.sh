#!/usr/bin/env bash
# The README's first command: set up, build a Debian image locally, and run
# the example pipeline's `test` job (and the `build` job it needs), each in a
# fresh VM, with this checkout as the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -q --release -p kiln-tests --bin kiln-fixture
IMG=target/demo/debian-bookworm
mkdir -p target/demo
./target/release/kiln-fixture debian "$IMG" >/dev/null
exec ./target/release/kiln run-job pipelines/examples/.gitlab-ci.yml test --image "$IMG" \
  --artifacts-dir target/demo/artifacts
