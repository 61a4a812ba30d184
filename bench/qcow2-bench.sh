#!/usr/bin/env bash
# qcow2 benchmark: godwit's qcow2 crate vs qemu-img/qemu-io on the same file system, one table.
#   bench/qcow2-bench.sh [DIR] [GIB] [N_RANDOM]     (defaults: a scratch dir under /var/tmp, 1, 20000)
# Rows: a 1 GiB VM-state stream (ours: vmstate_writer/vmstate_reader; QEMU's savevm writes its
# state through the same qcow2 guest-write path, measured here with `qemu-img bench` sequential
# 4 MiB requests), sequential guest I/O, random 4 KiB writes into unallocated and allocated
# clusters (qemu-io). Reads start with the file evicted from the page cache (fadvise DONTNEED on
# that file only); writes end with an fsync in both tools.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-$(mktemp -d /var/tmp/qcow2-bench.XXXXXX)}
GIB=${2:-1}
NRAND=${3:-20000}
mkdir -p "$DIR"
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || { echo "qemu-img/qemu-io missing (apt-get install qemu-utils)" >&2; exit 1; }

cargo build --release -q -p qcow2 --example qcow2_bench
BIN=target/release/examples/qcow2_bench
declare -A OURS QEMU
while read -r k v; do OURS[$k]=$v; done < <("$BIN" "$DIR" "$GIB" "$NRAND")

now() { date +%s.%N; }
evict() { python3 -c "import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED)" "$1"; }
el() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.3f}')" "$1" "$2"; }

Q="$DIR/qemu.qcow2"
COUNT=$((GIB * 256))
qemu-img create -q -f qcow2 "$Q" "${GIB}G"
t0=$(now); qemu-img bench -q -w -t writeback -f qcow2 -s 4M -S 4M -c "$COUNT" -d 1 "$Q" >/dev/null; t1=$(now)
QEMU[seq_write]=$(el "$t0" "$t1")
evict "$Q"
t0=$(now); qemu-img bench -q -t writeback -f qcow2 -s 4M -S 4M -c "$COUNT" -d 1 "$Q" >/dev/null; t1=$(now)
QEMU[seq_read]=$(el "$t0" "$t1")
rm -f "$Q"

qemu-img create -q -f qcow2 "$Q" 1G
CMDS="$DIR/qemu-io.cmds"
python3 - "$NRAND" > "$CMDS" <<'PY'
import sys
n = int(sys.argv[1]); x = 1; M = (1 << 64) - 1
for _ in range(n):
    x ^= (x << 13) & M; x ^= x >> 7; x ^= (x << 17) & M
    print(f"write -P 0x5a {(x % ((1 << 30) // 4096)) * 4096} 4k")
print("flush")
PY
for k in rand_alloc rand_overwrite; do
  t0=$(now); qemu-io -f qcow2 -t writeback "$Q" < "$CMDS" >/dev/null; t1=$(now)
  QEMU[$k]=$(el "$t0" "$t1")
done
rm -f "$Q" "$CMDS"

mibs() { python3 -c "import sys; print(f'{float(sys.argv[1])*1024/float(sys.argv[2]):8.0f} MiB/s')" "$GIB" "$1"; }
iops() { python3 -c "import sys; print(f'{int(sys.argv[1])/float(sys.argv[2]):8.0f} IOPS ')" "$NRAND" "$1"; }
echo
echo "qcow2 benchmark on $(df -T "$DIR" | awk 'NR==2{print $2" ("$1")"}'), ${GIB} GiB streams, ${NRAND} random writes, 64 KiB clusters"
printf '%-44s %22s %22s\n' "operation" "godwit qcow2" "qemu 7.2 ($(qemu-img --version | head -1 | awk '{print $3}'))"
printf '%-44s %13s (%5ss) %13s (%5ss)\n' "VM-state stream write ${GIB} GiB (+fsync)" "$(mibs "${OURS[vmstate_write]}")" "${OURS[vmstate_write]}" "$(mibs "${QEMU[seq_write]}")" "${QEMU[seq_write]}"
printf '%-44s %22s %22s\n' "  snapshot create capturing it" "${OURS[snapshot]} s" "-"
printf '%-44s %13s (%5ss) %13s (%5ss)\n' "VM-state stream read ${GIB} GiB (cold)" "$(mibs "${OURS[vmstate_read]}")" "${OURS[vmstate_read]}" "$(mibs "${QEMU[seq_read]}")" "${QEMU[seq_read]}"
printf '%-44s %13s (%5ss) %13s (%5ss)\n' "guest seq write ${GIB} GiB, 4 MiB I/O (+fsync)" "$(mibs "${OURS[seq_write]}")" "${OURS[seq_write]}" "$(mibs "${QEMU[seq_write]}")" "${QEMU[seq_write]}"
printf '%-44s %13s (%5ss) %13s (%5ss)\n' "guest seq read ${GIB} GiB, 4 MiB I/O (cold)" "$(mibs "${OURS[seq_read]}")" "${OURS[seq_read]}" "$(mibs "${QEMU[seq_read]}")" "${QEMU[seq_read]}"
printf '%-44s %13s (%5ss) %13s (%5ss)\n' "random 4 KiB writes, allocating (+fsync)" "$(iops "${OURS[rand_alloc]}")" "${OURS[rand_alloc]}" "$(iops "${QEMU[rand_alloc]}")" "${QEMU[rand_alloc]}"
printf '%-44s %13s (%5ss) %13s (%5ss)\n' "random 4 KiB writes, overwriting (+fsync)" "$(iops "${OURS[rand_overwrite]}")" "${OURS[rand_overwrite]}" "$(iops "${QEMU[rand_overwrite]}")" "${QEMU[rand_overwrite]}"
echo "(QEMU has no standalone VM-state writer; its savevm streams through the same qcow2 write path"
echo " as guest writes, so its column repeats the sequential 4 MiB guest-write/read figures.)"
[ -z "${1:-}" ] && rm -rf "$DIR"
exit 0
