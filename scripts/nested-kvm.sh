#!/usr/bin/env bash
# The nested-KVM tier: boot an L1 VM under QEMU TCG with emulated AMD-V
# (-cpu max), load kvm/kvm-amd in it, and run a command inside against its
# real /dev/kvm. Output streams out; the command's exit status is ours
# (77: this host cannot run L1, or L1 got no /dev/kvm).
#
#   scripts/nested-kvm.sh [kiln-nested options] -- PROGRAM [ARGS...]
#   scripts/nested-kvm.sh --suite      # the kvm backend's Linux suite in L1
#   scripts/nested-kvm.sh --doctor     # `kiln doctor` inside L1
#
# PROGRAM runs from an in-memory copy of itself (and its shared libraries)
# inside L1; pass --include PATH for more files. See tests/src/nested.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q -p kiln-agent --target x86_64-unknown-linux-musl --profile agent
export KILN_AGENT="${KILN_AGENT:-$PWD/target/x86_64-unknown-linux-musl/agent/kiln-agent}"

case "${1:-}" in
  --suite)
    shift
    exec cargo test -q -p kiln-tests --test kvm_nested -- --nocapture "$@"
    ;;
  --doctor)
    shift
    cargo build -q -p kiln --bin kiln -p kiln-vmm --bin kiln-vmm -p kiln-tests --bin kiln-nested
    exec target/debug/kiln-nested "$@" -- "$PWD/target/debug/kiln" doctor
    ;;
esac
cargo build -q -p kiln-tests --bin kiln-nested
exec target/debug/kiln-nested "$@"
