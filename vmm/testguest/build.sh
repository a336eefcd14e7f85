#!/bin/sh
# Build the bare-metal test guest: an ELF with a PVH note, loaded at 1 MiB.
# Prints the path of the built guest.
set -eu
cd "$(dirname "$0")"
rustup target list --installed 2>/dev/null | grep -q '^x86_64-unknown-none$' \
    || rustup target add x86_64-unknown-none >&2
cargo build --release --target x86_64-unknown-none >&2
echo "$(pwd)/target/x86_64-unknown-none/release/kiln-testguest"
