#!/usr/bin/env bash
# The reliability campaign: live migrations of the test guest under random faults, with the
# survival table in bench/results/chaos.md (--quick: 20 cases, bench/results/chaos-quick.md).
#   bench/chaos.sh [--quick] [--cases N] [--seed S] [--only KIND] [--strict]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace -q
T=${CARGO_TARGET_DIR:-target}
exec "$T/release/godwit-chaos" --bin-dir "$T/release" "$@"
