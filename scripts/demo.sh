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
T=${CARGO_TARGET_DIR:-target}
G=$T/release/godwit
K=$T/release/godwit-guest
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

# A small HMP client over the TCP monitor: send one command, print its answer up to the next
# `(qemu) ` prompt (so each command shows once, with its own prompt, as a user would see it).
exec 4<>"/dev/tcp/127.0.0.1/$MON"
hmp_read() {
  local buf="" c
  while IFS= read -r -N1 -t 60 c <&4; do
    buf+="$c"
    [[ "$buf" == *"(qemu) " ]] && break
  done
  buf=${buf%"(qemu) "}
  printf '%s' "$buf" | tr -d '\r'
}
hmp() { # the monitor may echo the command line: drop that echo, keep the answer
  printf '%s\n' "$1" >&4; printf '(qemu) %s\n' "$1"
  hmp_read | awk -v c="$1" 'NR == 1 && $0 == c { next } { print }'
}
hmp_read > /dev/null   # banner and first prompt
echo "== source monitor"
hmp "migrate_set_parameter downtime-limit 30"
hmp "migrate tcp:127.0.0.1:$PORT"
hmp "info migrate"
hmp "info status"
exec 4>&-
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
