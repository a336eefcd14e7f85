#!/usr/bin/env bash
# Run kiln's fuzz targets for longer than CI does (docs/fuzzing.md).
#
#   scripts/fuzz.sh [FILTER]            the property tests (stable): every
#                                       harness for FUZZ_CASES cases
#                                       (default 20000; CI runs 150-1000)
#   scripts/fuzz.sh libfuzzer [TARGET]  the cargo-fuzz targets in fuzz/
#                                       (nightly; cargo-fuzz not needed), each for
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
    cd fuzz
    # What `cargo fuzz build` does (so cargo-fuzz need not be installed;
    # `cargo +nightly fuzz run TARGET` works as well): libFuzzer's coverage
    # instrumentation and AddressSanitizer, for the target only (--target
    # keeps build scripts out of it).
    triple=x86_64-unknown-linux-gnu
    export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks \
-Zsanitizer=address"
    features=()
    [ -n "${FUZZ_FEATURES:-}" ] && features=(--no-default-features --features "$FUZZ_FEATURES")
    # Every target (name, then the crate feature it needs), or those of
    # FUZZ_FEATURES.
    targets=$(awk -F'"' '/^name = / && $2 != "kiln-fuzz" { n = $2 } /^required-features/ { print n, $2 }' Cargo.toml |
        while read -r name feature; do
            case ",${FUZZ_FEATURES:-$feature}," in *",$feature,"*) echo "$name" ;; esac
        done)
    [ -n "$only" ] && targets=$only
    bins=()
    for t in $targets; do bins+=(--bin "$t"); done
    nice cargo +nightly build --release --target "$triple" "${features[@]}" "${bins[@]}"
    failed=0
    for t in $targets; do
        mkdir -p "corpus/$t" "artifacts/$t"
        start=$(date +%s)
        log=$(mktemp)
        status=ok
        nice "target/$triple/release/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
            -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || { status=FAILED; failed=1; }
        grep -E '^(#[0-9]+ +DONE|==[0-9]+==ERROR|SUMMARY|stat::number_of_executed_units|artifact_prefix|Test unit written)' "$log" || true
        rm -f "$log"
        echo "fuzz.sh: $t: $status, $(($(date +%s) - start)) s"
    done
    exit "$failed"
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
