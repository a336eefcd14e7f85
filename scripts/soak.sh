#!/bin/sh
# Soak test, not run in CI: N jobs (default 10) through the fake GitLab with
# its faults injected, served by one `kiln daemon` (concurrent = 2, busybox
# image, tiny scripts). Prints kiln's RSS over time and the lost /
# duplicated / leaked-VM / leaked-file counts, ending with a one-line
# summary; exits non-zero if any count is not zero.
#
#   scripts/soak.sh 500
set -eu
n="${1:-10}"
cd "$(dirname "$0")/.."
cargo build -q -p kiln --bin kiln
exec cargo run -q -p kiln-tests --example soak -- "$n"
