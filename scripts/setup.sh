#!/usr/bin/env bash
# Installs what kiln needs on a Debian/Ubuntu host and builds it.
# Idempotent: re-running only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PKGS=(qemu-system-x86 busybox-static e2fsprogs erofs-utils kmod cpio dpkg
      debootstrap skopeo umoci docker-registry acpica-tools git zstd xz-utils
      ca-certificates tar passt iptables iproute2)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The kernel package lists must be current for `kiln kernel fetch`.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi

# moto_server (PyPI `moto[server]`): the S3-compatible server the S3 cache
# tests start on 127.0.0.1 (runner/src/cache/s3/tests.rs, tests/gitlab.rs).
if ! command -v moto_server >/dev/null; then
  echo "setup: installing moto[server] (pip)"
  if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3 python3-pip
  fi
  # A distribution Python refuses installs outside a virtualenv (PEP 668).
  python3 -m pip install -q 'moto[server]' 2>/dev/null ||
    $SUDO python3 -m pip install -q --break-system-packages 'moto[server]'
  if command -v pyenv >/dev/null; then pyenv rehash; fi
fi

if ! command -v cargo >/dev/null; then
  echo "setup: Rust is missing; install it from https://rustup.rs" >&2
  exit 1
fi
for t in x86_64-unknown-linux-musl x86_64-unknown-none; do
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done

# The tests' own cache (target/kiln-tests, or $KILN_TEST_ROOT): tests never
# download, so the kernel is fetched for them here.
TEST_CACHE="${KILN_TEST_ROOT:-${CARGO_TARGET_DIR:-target}/kiln-tests}/cache"
cargo build -q -p kiln-agent --target x86_64-unknown-linux-musl --profile agent
if [ "${KILN_SETUP_FOR:-}" = tests ]; then
  # For the tests (scripts/test.sh) only the debug build they run is
  # needed: the same `cargo build` the test harness does, so nothing is
  # built twice, and no release build (minutes on a fresh clone).
  cargo build -q -p kiln --bin kiln -p kiln-vmm --bin kiln-vmm
  KILN_CACHE_DIR="$TEST_CACHE" "${CARGO_TARGET_DIR:-target}/debug/kiln" kernel fetch
  exit 0
fi
cargo build -q --release -p kiln -p kiln-vmm --bin kiln --bin kiln-vmm
./target/release/kiln kernel fetch
KILN_CACHE_DIR="$TEST_CACHE" ./target/release/kiln kernel fetch
