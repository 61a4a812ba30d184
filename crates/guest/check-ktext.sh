#!/bin/bash
# Static check of the guest's CPL0 code (section .ktext), which this project's host interprets:
# no SSE/AVX registers, none of the instructions the interpreter rejects, and every call lands
# in .ktext (direct, or through a GOT slot that points into .ktext). Register-indirect calls are
# listed for review. Usage: check-ktext.sh [path/to/godwit-guest]
set -euo pipefail
ELF=${1:-$(dirname "$0")/../../target/release/godwit-guest}
dis=$(objdump -d --no-show-raw-insn -j .ktext "$ELF")
read -r start size < <(objdump -h "$ELF" | awk '$2==".ktext"{print $4, $3}')
lo=$((16#$start)); hi=$((16#$start + 16#$size))
fail=0
if grep -nE '%(x|y|z)mm' <<<"$dis"; then echo "FAIL: SSE/AVX register use in .ktext"; fail=1; fi
if grep -nE '\b(xgetbv|xsave\w*|xrstor\w*|rdtscp|cmpxchg16b|stac|clac|lar|lsl|verr|verw|vmcall|v[a-z]+ps|v[a-z]+pd)\b' <<<"$dis"; then
    echo "FAIL: instruction the CPL0 interpreter rejects"; fail=1
fi
if grep -nE 'rep.*(movs|stos)' <<<"$dis"; then echo "FAIL: rep movs/stos in .ktext (slow when interpreted)"; fail=1; fi
while read -r tgt; do
    t=$((16#$tgt))
    if (( t < lo || t >= hi )); then echo "FAIL: call to 0x$tgt outside .ktext"; fail=1; fi
done < <(grep -E '\scall\s+[0-9a-f]+ <' <<<"$dis" | awk '{print $3}')
while read -r slot; do
    val=$(objdump -s --start-address=0x$slot --stop-address=$((16#$slot + 8)) "$ELF" | awk 'NR>4 && NF>=3 {print $2 $3; exit}')
    le=""; for i in 14 12 10 8 6 4 2 0; do le+=${val:$i:2}; done
    t=$((16#$le))
    if (( t < lo || t >= hi )); then echo "FAIL: call through GOT slot 0x$slot to 0x$le outside .ktext"; fail=1; fi
done < <(grep -E 'call\s+\*0x[0-9a-f]+\(%rip\)' <<<"$dis" | sed -E 's/.*# ([0-9a-f]+).*/\1/')
grep -E 'call\s+\*%' <<<"$dis" | sed 's/^/note: register-indirect call: /' || true
if (( fail )); then exit 1; fi
echo "ktext OK: $(grep -c . <<<"$dis") lines, no SSE/AVX, calls stay in .ktext"
