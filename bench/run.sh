#!/usr/bin/env bash
# The side-by-side benchmark suite: Godwit vs QEMU on the same test guest.
#   bench/run.sh [--runs N] [--only boot,mig-idle,...] [--help]
# Builds the workspace (nothing is installed), then runs target/release/godwit-bench, which
# prints the table and writes bench/results/latest.{md,json} and the migration charts.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-system-x86_64 >/dev/null && [[ " $* " != *" --qemu "* ]]; then
    echo "bench: qemu-system-x86_64 not found: install it with 'apt-get install qemu-system-x86' (or pass --qemu PATH)" >&2
    exit 2
fi
cargo build --release --workspace
exec "${CARGO_TARGET_DIR:-target}/release/godwit-bench" "$@"
