#!/bin/bash
# Boot the test guest under QEMU (microvm, KVM) and check its serial contract: READY, heartbeats
# (no gap, no repeat), `v` -> LEDGER OK, the `c` verifier self-test -> LEDGER BAD, `s`, and `q`
# -> GUEST EXIT + exit status through isa-debug-exit. Also prints the measurements (boot time,
# dirty rate, 2 ms heartbeats, host CPU time while idle). Not part of `cargo test`.
#
# Usage: crates/guest/tests-qemu.sh [--quick] [path/to/godwit-guest]   (build it first:
#        cargo build --release -p godwit-guest)
set -uo pipefail
QUICK=0
if [[ ${1:-} == --quick ]]; then QUICK=1; shift; fi
HERE=$(cd "$(dirname "$0")" && pwd)
ELF=${1:-$HERE/../../target/release/godwit-guest}
[[ -e /dev/kvm ]] || { echo "FAIL: /dev/kvm is missing: these tests need KVM"; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "FAIL: qemu-system-x86_64 not installed"; exit 1; }
[[ -f $ELF ]] || { echo "FAIL: $ELF not built"; exit 1; }
WORK=$(mktemp -d); trap 'kill $QPID 2>/dev/null; rm -rf "$WORK"' EXIT
QPID=
failures=0
fail() { echo "FAIL [$NAME]: $*"; failures=$((failures + 1)); }
ok() { echo "ok   [$NAME]: $*"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# start NAME SMP APPEND [extra qemu args...]
start() {
    NAME=$1; local smp=$2 append=$3; shift 3
    OUT=$WORK/$NAME.out; rm -f "$WORK/in"; mkfifo "$WORK/in"
    T0=$(now_ms)
    qemu-system-x86_64 -enable-kvm -M microvm -nodefaults -no-user-config -nographic \
        -serial stdio -m 1024 -smp "$smp" -kernel "$ELF" -append "$append" \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 "$@" <"$WORK/in" >"$OUT" 2>"$WORK/$NAME.err" &
    QPID=$!
    exec 3>"$WORK/in"
}
# wait_for REGEX TIMEOUT_S: wait until a line matches; sets LINE and T_MS (ms since start)
wait_for() {
    local deadline=$(( $(now_ms) + $2 * 1000 ))
    while (( $(now_ms) < deadline )); do
        # only complete lines: drop a last line that has no newline yet
        if [[ -s $OUT && $(tail -c1 "$OUT" | od -An -tx1) != *0a* ]]; then
            LINE=$(sed '$d' "$OUT" | grep -aE -m1 "$1")
        else
            LINE=$(grep -aE -m1 "$1" "$OUT" 2>/dev/null)
        fi
        [[ -n $LINE ]] && { T_MS=$(( $(now_ms) - T0 )); return 0; }
        kill -0 $QPID 2>/dev/null || break
        sleep 0.01
    done
    LINE=; return 1
}
send() { printf '%s' "$1" >&3; }
# finish: send q and wait for QEMU to exit; sets RC
finish() {
    send q
    local i; for i in $(seq 100); do kill -0 $QPID 2>/dev/null || break; sleep 0.05; done
    if kill -0 $QPID 2>/dev/null; then kill $QPID; fail "QEMU did not exit after q"; fi
    wait $QPID; RC=$?; exec 3>&-; QPID=
}
field() { sed -nE "s/.*[ ^]$1=([0-9]+).*/\1/p" <<<"$2" | head -1; }
# check_seq: heartbeat seq numbers (full or compact) run 1,2,3,... with no gap or repeat
check_seq() {
    local seqs; seqs=$(grep -aE '^(HEARTBEAT seq=|H )' "$OUT" | sed -E 's/^HEARTBEAT seq=([0-9]+).*/\1/; s/^H ([0-9]+)$/\1/')
    local n; n=$(grep -c . <<<"$seqs")
    if awk 'NR != $1 { exit 1 }' <<<"$seqs"; then ok "$n heartbeats, seq 1..$n without gap or repeat"
    else fail "heartbeat seq not consecutive: $(tr '\n' ' ' <<<"$seqs" | head -c 300)"; fi
}

"$HERE/check-ktext.sh" "$ELF" || failures=$((failures + 1))

for smp in 1 4; do
  for mode in idle dirty; do
    [[ $QUICK == 1 && $smp$mode != 4dirty ]] && continue
    start "smp$smp-$mode" $smp "mode=$mode mib=32 hb_ms=200 qstatus=7"
    if wait_for '^GUEST READY' 10; then
        ok "$LINE after ${T_MS} ms"
        [[ $(field cpus "$LINE") == $smp ]] || fail "expected cpus=$smp"
        [[ $(field mem "$LINE") == 1024 ]] || fail "expected mem=1024"
    else fail "no GUEST READY"; cat "$WORK/$NAME.err"; fi
    wait_for '^HEARTBEAT seq=3 ' 5 || fail "no third heartbeat"
    send v
    if wait_for '^LEDGER ' 10 && [[ $LINE == "LEDGER OK pages=8192 "* ]]; then ok "$LINE"
    else fail "verify: '$LINE'"; fi
    g=$(field gen "$LINE")
    if [[ $mode == dirty ]]; then (( g >= 1 )) || fail "dirty mode but gen=$g"; else [[ $g == 0 ]] || fail "idle mode but gen=$g"; fi
    send c
    if wait_for '^LEDGER BAD page=4096 ' 10; then ok "self-test: $LINE"; else fail "corrupted page not detected"; fi
    send s
    wait_for '^STATUS ' 5 && ok "$LINE" || fail "no STATUS line"
    wait_for '^HEARTBEAT seq=6 ' 5 || fail "heartbeats stopped after v/c/s"
    finish
    grep -aq '^GUEST EXIT status=7$' "$OUT" && ok "GUEST EXIT status=7" || fail "no GUEST EXIT line"
    [[ $RC == 15 ]] && ok "QEMU exit code 15 = (7<<1)|1" || fail "QEMU exit code $RC, expected 15"
    check_seq
    if grep -aq 'GUEST FAULT\|GUEST PANIC' "$OUT"; then fail "$(grep -a 'GUEST FAULT\|GUEST PANIC' "$OUT")"; fi
  done
done

# Phase 2: virtio-blk disk ledger.
DISKARGS=(-global virtio-mmio.force-legacy=false -drive "if=none,id=d0,file=$WORK/disk.raw,format=raw"
          -device virtio-blk-device,drive=d0)
truncate -s 16M "$WORK/disk.raw"
start "disk" 2 "mode=dirty mib=16 rate=20 disk=on disk_mib=4 hb_ms=200" "${DISKARGS[@]}"
wait_for '^GUEST READY cpus=2 ' 10 && ok "$LINE" || fail "no GUEST READY"
if wait_for '^HEARTBEAT seq=5 .* disk=[0-9]+$' 10; then ok "$LINE"; else fail "no disk= in heartbeats"; fi
w=$(field disk "$LINE"); (( w > 0 )) || fail "no sectors written"
send v
wait_for '^LEDGER ' 10 && [[ $LINE == "LEDGER OK pages=4096 "* ]] && ok "$LINE" || fail "verify: '$LINE'"
wait_for '^DISK ' 20 && [[ $LINE == "DISK OK sectors=8192 "* ]] && ok "$LINE" || fail "disk verify: '$LINE'"
send c
wait_for '^DISK BAD sector=4096 ' 20 && ok "self-test: $LINE" || fail "lost disk write not detected"
send v
for i in $(seq 100); do n=$(grep -ac '^DISK OK' "$OUT"); (( n >= 2 )) && break; sleep 0.1; done
(( n == 2 )) && ok "DISK OK again after the self-test" || fail "second v: $n DISK OK lines"
finish; check_seq
grep -aq 'GUEST WARN\|GUEST FAULT' "$OUT" && fail "$(grep -a 'GUEST WARN\|GUEST FAULT' "$OUT")"

# Cold migration through QEMU (stop, migrate to a file, restore in a new QEMU, cont): heartbeats
# continue with no gap or repeat, both ledgers verify; restored onto a disk that lost writes,
# the disk ledger says BAD.
# The HMP monitor is on two FIFOs (-monitor pipe:): hmp CMD sends, mon.log collects answers.
rm -f "$WORK/mon.in" "$WORK/mon.out"; mkfifo "$WORK/mon.in" "$WORK/mon.out"
mon_reader() { : >"$WORK/mon.log"; cat "$WORK/mon.out" >>"$WORK/mon.log" & }
hmp() { printf '%s\n' "$1" >"$WORK/mon.in"; }
hmp_wait() { # hmp_wait REGEX TRIES (50 ms each)
    local i; for i in $(seq "$2"); do grep -aqE "$1" "$WORK/mon.log" && return 0; sleep 0.05; done; return 1
}
MIGARGS="mode=dirty mib=64 rate=50 disk=on disk_mib=4 hb_ms=100"
truncate -s 0 "$WORK/disk.raw"; truncate -s 16M "$WORK/disk.raw"
mon_reader
start "mig-src" 2 "$MIGARGS" "${DISKARGS[@]}" -monitor "pipe:$WORK/mon"
wait_for '^HEARTBEAT seq=15 ' 10 || fail "no heartbeats before migration"
hmp stop; hmp "migrate \"exec:cat > $WORK/state\""
for i in $(seq 100); do hmp "info migrate"; hmp_wait 'Migration status: completed' 2 && break; done
hmp_wait 'Migration status: completed' 1 && ok "migrated to a file ($(du -k "$WORK/state" | cut -f1) KiB)" || fail "migration did not complete"
cp "$WORK/disk.raw" "$WORK/disk.snap"
hmp quit; wait $QPID; exec 3>&-; QPID=
SRC_OUT=$OUT
mon_reader
start "mig-dst" 2 "$MIGARGS" "${DISKARGS[@]}" -monitor "pipe:$WORK/mon" -incoming "exec:cat $WORK/state"
sleep 0.5; hmp cont
last=$(grep -aE '^HEARTBEAT seq=' "$SRC_OUT" | tail -1 | sed -E 's/^HEARTBEAT seq=([0-9]+).*/\1/')
wait_for "^HEARTBEAT seq=$((last + 10)) " 10 && ok "heartbeats continue after restore (source stopped at seq=$last)" || fail "no heartbeats after restore"
send v
wait_for '^LEDGER ' 10 && [[ $LINE == "LEDGER OK pages=16384 "* ]] && ok "after restore: $LINE" || fail "after restore: '$LINE'"
wait_for '^DISK ' 20 && [[ $LINE == "DISK OK sectors=8192 "* ]] && ok "after restore: $LINE" || fail "after restore: '$LINE'"
finish
cat "$SRC_OUT" "$OUT" >"$WORK/mig-all.out"; OUT=$WORK/mig-all.out; NAME=mig; check_seq
# Restore the same state onto the disk as it was at the stop, minus the first 1 MiB (zeroed).
cp "$WORK/disk.snap" "$WORK/disk.raw"
dd if=/dev/zero of="$WORK/disk.raw" bs=1M count=1 conv=notrunc status=none
mon_reader
start "mig-lost" 2 "$MIGARGS" "${DISKARGS[@]}" -monitor "pipe:$WORK/mon" -incoming "exec:cat $WORK/state"
sleep 0.5; hmp cont
wait_for '^HEARTBEAT ' 10
send v
wait_for '^DISK ' 20 && [[ $LINE == "DISK BAD "* ]] && ok "disk that lost writes: $LINE" || fail "lost writes not detected: '$LINE'"
finish

# Live migration over loopback TCP while dirtying 100 MiB/s: the ledger verifies on the
# destination, heartbeats (10 ms, compact) run on without gap or repeat across the two outputs.
PORT=$((40000 + RANDOM % 20000))
LIVEARGS="mode=dirty mib=128 rate=100 hb_ms=10 hb=compact"
mon_reader
start "live-src" 2 "$LIVEARGS" -monitor "pipe:$WORK/mon"
SRC_OUT=$OUT; SRC_PID=$QPID; exec 5>&3; exec 3>&-
start "live-dst" 2 "$LIVEARGS" -incoming "tcp:127.0.0.1:$PORT"
wait_for '^GUEST READY' 1 && fail "destination booted instead of waiting for the migration"
OUT=$SRC_OUT; wait_for '^H 100$' 10 || fail "no heartbeats on the source"
hmp "migrate_set_parameter max-bandwidth 4G"; hmp "migrate_set_parameter downtime-limit 50"
hmp "migrate -d tcp:127.0.0.1:$PORT"
for i in $(seq 120); do hmp "info migrate"; hmp_wait 'Migration status: (completed|failed)' 5 && break; done
if hmp_wait 'Migration status: completed' 1; then
    ok "live migration: $(grep -aE '^(total time|downtime|dirty sync count):' "$WORK/mon.log" | tail -3 | tr '\n' ' ')"
else fail "live migration: $(grep -a 'Migration status' "$WORK/mon.log" | tail -1)"; fi
hmp quit; exec 5>&-; wait $SRC_PID
OUT=$WORK/live-dst.out; NAME=live-dst
send v
wait_for '^LEDGER ' 15 && [[ $LINE == "LEDGER OK pages=32768 "* ]] && ok "after live migration: $LINE" || fail "after live migration: '$LINE'"
finish
cat "$SRC_OUT" "$OUT" >"$WORK/live-all.out"; OUT=$WORK/live-all.out; NAME=live; check_seq

# Measurement: mode=dirty mib=256 rate=100 on 4 vCPUs, rate from the dirtied counter.
start "rate" 4 "mode=dirty mib=256 rate=100 hb_ms=500"
wait_for '^HEARTBEAT seq=2 ' 10; a=$LINE
wait_for '^HEARTBEAT seq=8 ' 10; b=$LINE
if [[ -n $a && -n $b ]]; then
    d=$(( $(field dirtied "$b") - $(field dirtied "$a") ))
    mibs=$(awk -v d=$d 'BEGIN { printf "%.1f", d / 256 / 3.0 }')
    echo "measure [rate]: $d pages in 6 heartbeats of 500 ms = $mibs MiB/s (asked 100)"
    awk -v m=$mibs 'BEGIN { exit !(m > 80 && m < 120) }' && ok "rate within 20% of 100 MiB/s" || fail "rate $mibs MiB/s"
else fail "no heartbeats"; fi
send v; wait_for '^LEDGER ' 10; [[ $LINE == "LEDGER OK pages=65536 "* ]] && ok "$LINE" || fail "verify: '$LINE'"
finish; check_seq

# Measurement: 2 ms compact heartbeats for ~2 s.
start "hb2ms" 2 "hb_ms=2 hb=compact mode=dirty mib=16 rate=50"
wait_for '^GUEST INFO' 10; boot=$(field boot_ms "$LINE")
sleep 2
send s; wait_for '^STATUS ' 5; st=$LINE
finish
up=$(field uptime_ms "$st"); seq=$(field seq "$st")
echo "measure [hb2ms]: seq=$seq after $((up - boot)) ms of guest time since READY (expected ~$(( (up - boot) / 2 )))"
awk -v s=$seq -v t=$((up - boot)) 'BEGIN { exit !(s > 0.9 * t / 2 && s <= t / 2 + 1) }' \
    && ok "2 ms heartbeats keep time" || fail "2 ms heartbeats: seq=$seq in $((up - boot)) ms"
check_seq

# Measurement: host CPU time of an idle 4-vCPU guest over 3 s.
start "idlecpu" 4 "mode=idle"
wait_for '^GUEST READY' 10; sleep 1
c1=$(awk '{print $14 + $15}' /proc/$QPID/stat); sleep 3; c2=$(awk '{print $14 + $15}' /proc/$QPID/stat)
echo "measure [idlecpu]: QEMU used $(( (c2 - c1) * 1000 / $(getconf CLK_TCK) )) ms of CPU in 3000 ms (4 vCPUs, hz=100)"
finish

if (( failures )); then echo "$failures FAILED"; exit 1; fi
echo "ALL OK"
