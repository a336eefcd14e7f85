#!/usr/bin/env bash
# Run kiln's fuzz targets for longer than CI does (docs/fuzzing.md).
#
#   scripts/fuzz.sh [FILTER]            the property tests (stable): every
#                                       harness for FUZZ_CASES cases
#                                       (default 20000; CI runs 150-1000)
#   scripts/fuzz.sh libfuzzer [TARGET]  the cargo-fuzz targets in fuzz/
#                                       (nightly + cargo-fuzz), each for
#                                       FUZZ_SECONDS (default 60); FUZZ_FEATURES=agent
#                                       (vmm, images, pipelines, runner)
#                                       builds only that crate's targets
#
# Prints one line per crate or target with how long it ran. A failure
# prints the minimal input proptest (or libFuzzer, under
# fuzz/artifacts/TARGET/) found: turn it into a named regression test next
# to the parser, fix the parser, and add a row to docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-props}
case "$mode" in
libfuzzer)
    only=${2:-}
    seconds=${FUZZ_SECONDS:-60}
    if ! rustup toolchain list | grep -q '^nightly'; then
        echo "fuzz.sh: no nightly toolchain (rustup toolchain install nightly); the property tests run on stable: scripts/fuzz.sh" >&2
        exit 2
    fi
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
        exit 2
    fi
    cd fuzz
    for t in $(cargo +nightly fuzz list); do
        [ -n "$only" ] && [ "$t" != "$only" ] && continue
        mkdir -p "corpus/$t"
        start=$(date +%s)
        nice cargo +nightly fuzz run ${FUZZ_FEATURES:+--no-default-features --features "$FUZZ_FEATURES"} "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 |
            grep -E '^(#[0-9]+ +DONE|==[0-9]+==|SUMMARY|artifact_prefix)' || true
        echo "fuzz.sh: $t ran $(($(date +%s) - start)) s"
    done
    ;;
*)
    filter=${1:-}
    [ "$filter" = props ] && filter=
    export PROPTEST_CASES=${FUZZ_CASES:-20000}
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    failed=0
    for crate in kiln-agent kiln-vmm kiln-images kiln-pipelines kiln; do
        start=$(date +%s)
        status=ok
        nice cargo test -q -p "$crate" --lib "fuzzing::tests::$filter" >"$log" 2>&1 || { status=FAILED; failed=1; }
        grep -E 'test result|panicked|minimal failing input|Test failed' "$log" || true
        echo "fuzz.sh: $crate: $status, $PROPTEST_CASES cases per target in $(($(date +%s) - start)) s"
    done
    exit "$failed"
    ;;
esac
