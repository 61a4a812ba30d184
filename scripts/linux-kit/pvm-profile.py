#!/usr/bin/env python3
"""The host profile for nested, software-paged KVM (`kvm_pvm`): what Debian's kernel needs to
reach `Run /init` on such a host (see docs/linux-boot.md and ../shared/linux-on-pvm.md).

  pvm-profile.py tsc-khz
      print the TSC frequency KVM gives a vCPU here (KVM_GET_TSC_KHZ on a scratch vCPU)
  pvm-profile.py patch VMLINUX SYMBOLS_ELF OUT
      write a copy of VMLINUX with the two instructions this KVM cannot interpret replaced:
        int3_selftest_ip:  int3; nop x4  ->  call int3_magic   (what the self-test's #BP
                                                                 handler would have done)
        fpu__drop:         fwait         ->  nop
      SYMBOLS_ELF is the same kernel with its kallsyms turned into an ELF symbol table
      (vmlinux-to-elf). Each patch is applied only after the original bytes at the symbol's
      address are checked; if they differ, nothing is written and the exit status is 3.

Needs binutils (nm, objdump). Exit status: 0 done, 2 usage, 3 refused, 1 other error.
"""
import fcntl
import os
import re
import struct
import subprocess
import sys


class Refused(Exception):
    pass


def tsc_khz():
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
        try:
            vcpu = fcntl.ioctl(vm, 0xAE41, 0)  # KVM_CREATE_VCPU 0
            try:
                return fcntl.ioctl(vcpu, 0xAEA3, 0)  # KVM_GET_TSC_KHZ
            finally:
                os.close(vcpu)
        finally:
            os.close(vm)
    finally:
        os.close(kvm)


def load_segments(blob):
    """(vaddr, file offset, file size) of each PT_LOAD of an ELF64 little-endian file."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:
        raise Refused("not a 64-bit little-endian ELF vmlinux")
    phoff, = struct.unpack_from("<Q", blob, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", blob, 0x36)
    segs = []
    for i in range(phnum):
        p_type, _flags, off, vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", blob, phoff + i * phentsize)
        if p_type == 1:
            segs.append((vaddr, off, filesz))
    return segs


def file_offset(segs, addr, n, what):
    for vaddr, off, size in segs:
        if vaddr <= addr and addr + n <= vaddr + size:
            return off + (addr - vaddr)
    raise Refused(f"{what} at {addr:#x} is not inside a loaded segment of this vmlinux")


def symbols(elf):
    out = subprocess.run(["nm", "-n", elf], check=True, capture_output=True, text=True).stdout
    table, order = {}, []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and re.fullmatch(r"[0-9a-f]+", parts[0]):
            a = int(parts[0], 16)
            table.setdefault(parts[2], a)
            order.append(a)
    return table, sorted(set(order))


def need(table, name):
    if name not in table:
        raise Refused(f"symbol {name} is not in this kernel's kallsyms")
    return table[name]


def fwait_in(elf, start, stop):
    """Addresses of `fwait` instructions objdump decodes in [start, stop)."""
    out = subprocess.run(
        ["objdump", "-d", f"--start-address={start:#x}", f"--stop-address={stop:#x}", elf],
        check=True, capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+9b\s+(fwait|wait)\b", line)
        if m:
            found.append(int(m.group(1), 16))
    return found


def expect(blob, off, want, what, addr):
    got = bytes(blob[off:off + len(want)])
    if got != want:
        raise Refused(f"{what} at {addr:#x}: expected bytes {want.hex(' ')}, found {got.hex(' ')} "
                      "(this kernel is not the one the profile knows; nothing was written)")


def patch(vmlinux, syms_elf, out):
    blob = bytearray(open(vmlinux, "rb").read())
    segs = load_segments(blob)
    table, order = symbols(syms_elf)
    done = []

    ip = need(table, "int3_selftest_ip")
    magic = need(table, "int3_magic")
    off = file_offset(segs, ip, 5, "int3_selftest_ip")
    file_offset(segs, magic, 1, "int3_magic")
    expect(blob, off, b"\xcc\x90\x90\x90\x90", "int3_selftest_ip (int3; nop x4)", ip)
    rel = magic - (ip + 5)
    if not -(1 << 31) <= rel < (1 << 31):
        raise Refused("int3_magic is out of reach of a rel32 call from int3_selftest_ip")
    new = b"\xe8" + struct.pack("<i", rel)
    blob[off:off + 5] = new
    done.append(f"int3_selftest_ip {ip:#x}: cc 90 90 90 90 -> {new.hex(' ')} (call int3_magic {magic:#x})")

    fd = need(table, "fpu__drop")
    nxt = next((a for a in order if a > fd), None)
    if nxt is None or nxt - fd > 4096:
        raise Refused("cannot tell where fpu__drop ends")
    waits = fwait_in(syms_elf, fd, nxt)
    if len(waits) != 1:
        raise Refused(f"fpu__drop ({fd:#x}-{nxt:#x}) has {len(waits)} fwait instructions, expected 1")
    off = file_offset(segs, waits[0], 1, "fpu__drop's fwait")
    expect(blob, off, b"\x9b", "fpu__drop's fwait", waits[0])
    blob[off] = 0x90
    done.append(f"fpu__drop+{waits[0] - fd:#x} {waits[0]:#x}: 9b (fwait) -> 90 (nop)")

    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, out)
    for d in done:
        print("patched " + d)


def main(argv):
    try:
        if argv[1:2] == ["tsc-khz"] and len(argv) == 2:
            print(tsc_khz())
        elif argv[1:2] == ["patch"] and len(argv) == 5:
            patch(argv[2], argv[3], argv[4])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Refused as e:
        print(f"pvm-profile: refusing to patch: {e}", file=sys.stderr)
        return 3
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"pvm-profile: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
