#!/usr/bin/env bash
# The seed's live-migration scenario on one machine: a destination waits with
# `-incoming tcp:127.0.0.1:PORT`, a source runs the test guest dirtying memory, the source's
# monitor runs `migrate`, then we show the statistics and the guest's heartbeats continuing on
# the destination with its memory ledger verified.
#   usage: scripts/demo.sh [MEM_MIB] [SMP] [GUEST_ARGS]
set -euo pipefail
cd "$(dirname "$0")/.."
MEM=${1:-1024}
SMP=${2:-2}
GUEST=${3:-"mode=dirty mib=256 rate=100 hb_ms=250 cpus=$SMP"}
cargo build --release --workspace -q
G=target/release/godwit
K=target/release/godwit-guest
[ -r /dev/kvm ] || { echo "demo: /dev/kvm is not accessible" >&2; exit 1; }
DIR=$(mktemp -d)
PORT=$((20000 + RANDOM % 20000))
MON=$((PORT + 1))
cleanup() { kill "${SRC_PID:-}" "${DST_PID:-}" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT

mkfifo "$DIR/dst.in"
$G -m "$MEM" -smp "$SMP" -kernel $K -append "$GUEST" -incoming "tcp:127.0.0.1:$PORT" \
   < "$DIR/dst.in" > "$DIR/dst.out" 2> "$DIR/dst.err" &
DST_PID=$!
exec 3> "$DIR/dst.in"
until grep -q "waiting for an incoming migration" "$DIR/dst.err" 2>/dev/null; do sleep 0.05; done

$G -m "$MEM" -smp "$SMP" -kernel $K -append "$GUEST" -serial "file:$DIR/src.out" \
   -monitor "tcp:127.0.0.1:$MON,server,nowait" < /dev/null > /dev/null 2> "$DIR/src.err" &
SRC_PID=$!
until grep -q "GUEST READY" "$DIR/src.out" 2>/dev/null; do sleep 0.05; done
sleep 1.5
echo "== source (before migration)"; grep -E "READY|HEARTBEAT" "$DIR/src.out" | tail -3

hmp() { # run HMP commands over the TCP monitor, print the answers
  exec 4<>"/dev/tcp/127.0.0.1/$MON"
  for c in "$@"; do printf '%s\n' "$c" >&4; done
  sleep "${HMP_WAIT:-0.3}"; printf 'quit_monitor_session\n' >/dev/null
  timeout 1 cat <&4 | tr -d '\r' | grep -v '^(qemu) $' || true
  exec 4>&-
}
echo "== (qemu) migrate tcp:127.0.0.1:$PORT"
HMP_WAIT=5 hmp "migrate_set_parameter downtime-limit 30" "migrate tcp:127.0.0.1:$PORT" "info migrate" "info status" \
  | grep -vE "^Godwit .* monitor|^\(godwit\) (migrate_set|info)" 
echo "== destination"
cat "$DIR/dst.err"
sleep 1
printf v >&3
sleep 1
grep -E "HEARTBEAT|LEDGER" "$DIR/dst.out" | head -4
echo "..."
grep -E "LEDGER" "$DIR/dst.out" || echo "(no ledger line yet)"
printf q >&3
wait "$DST_PID" 2>/dev/null || true
