#!/usr/bin/env bash
# The full Linux suite for hosts with hardware KVM (issue 15, part 5; docs/linux-boot.md, "The
# full suite on hardware KVM"): Linux + the agent (crates/linux-agent) on -smp 2 with an ext4
# qcow2 data disk and a tap NIC, moved by pre-copy, post-copy and auto-converge live migrations,
# savevm/loadvm and a cold migration, then powered off; under Godwit, then under QEMU
# (qemu-system-x86_64 from PATH) for the numbers. One table line per part: PASS, FAIL (why) or
# NOT RUN (why); exit status 1 if any part failed.
#
# On a host whose KVM cannot run Linux user space (the nested kvm_pvm of our CI, or no vmx/svm)
# nothing but the runner is built and every part is reported NOT RUN, with status 0.
#
# Usage: scripts/linux-e2e.sh [RUNNER ARGS...]   (e.g. --no-qemu, --work DIR, --kit DIR)
# Needs root (network namespaces, taps), iproute2, qemu-utils, e2fsprogs; the kit
# (scripts/linux-kit.sh, run by the runner into target/linux-kit) needs what it says it needs.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
cargo build -q --release -p linux-e2e
runner="$repo/target/release/godwit-linux-e2e"
if reason=$("$runner" --host-check); then
  echo "linux-e2e: $reason: building godwit" >&2
  cargo build -q --release -p godwit
  exec "$runner" --godwit "$repo/target/release/godwit" --kit "$repo/target/linux-kit" "$@"
fi
exec "$runner" "$@"
