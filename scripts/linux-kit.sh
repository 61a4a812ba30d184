#!/usr/bin/env bash
# The Linux guest kit: one entry point for everything that needs a Linux guest.
#
#   scripts/linux-kit.sh DIR
#
# Builds into DIR (reusing what is already there and still matches):
#   - Debian's cloud kernel: the installed /boot/vmlinuz-*-cloud-amd64 with its modules, or, if
#     none is installed, the package `linux-image-cloud-amd64` depends on, fetched with
#     `apt-get download` and unpacked with `dpkg -x` into DIR/pkg (nothing is installed);
#   - DIR/vmlinux: the ELF inside the bzImage (PVH entry, no decompressor run);
#   - DIR/godwit-agent: the static agent (crates/linux-agent, stripped), and DIR/initramfs.cpio:
#     busybox + virtio modules + the agent, uncompressed (scripts/build-initramfs.sh -Z);
#   - on a host whose KVM is the nested, software-paged `kvm_pvm` (detected by its module, or
#     forced with GODWIT_HOST_PROFILE=pvm|none), the host profile: DIR/vmlinux-pvm, a copy of the
#     vmlinux with two instructions that KVM cannot interpret patched (after checking their
#     original bytes; refused otherwise), and the command line that avoids the others, with
#     this host's TSC frequency (docs/linux-boot.md, "Host profile").
# and prints, on stdout, one KEY=VALUE line each (the value runs to the end of the line):
#   profile=pvm|none  kernel=PATH  bzimage=PATH  vmlinux=PATH  initrd=PATH  append=STRING
#   kver=VERSION  tsc_khz=N (pvm only)
# Progress and reasons go to stderr. Exit 1 with a reason when something cannot be built.
set -euo pipefail
[ $# -eq 1 ] || { sed -n '2,24p' "$0" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
mkdir -p "$1"
dir="$(cd "$1" && pwd)"
say() { echo "linux-kit: $*" >&2; }
die() { echo "linux-kit: $*" >&2; exit 1; }
for t in python3 nm objdump cpio gzip; do
  command -v "$t" >/dev/null || die "$t is missing (Debian: python3, binutils, cpio, gzip; scripts/test.sh installs them)"
done

# --- the kernel ------------------------------------------------------------------------------
kver="" modroot="" bz="" config=""
for b in $(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V -r); do
  v="${b#/boot/vmlinuz-}"
  if [ -f "/lib/modules/$v/modules.dep" ] && [ -r "$b" ]; then kver="$v"; bz="$b"; config="/boot/config-$v"; break; fi
done
if [ -z "$kver" ]; then
  pkgdir="$dir/pkg"
  if ! ls "$pkgdir"/root/boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1; then
    say "no cloud kernel installed: fetching Debian's linux-image-cloud-amd64 (apt-get download, not installed)"
    rm -rf "$pkgdir"; mkdir -p "$pkgdir/root"
    dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\(-unsigned\)\?\)$/\1/p' | head -n1)
    [ -n "$dep" ] || die "apt-cache knows no linux-image-cloud-amd64 (run apt-get update?)"
    (cd "$pkgdir" && apt-get download -qq "$dep" >/dev/null) || die "apt-get download $dep failed"
    dpkg -x "$pkgdir"/*.deb "$pkgdir/root"
  fi
  bz=$(ls -1 "$pkgdir"/root/boot/vmlinuz-*-cloud-amd64 | sort -V | tail -n1)
  kver="${bz##*/vmlinuz-}"
  modroot="$pkgdir/root"
  config="$modroot/boot/config-$kver"
fi
say "kernel $kver ($bz)"

stamp() { # stamp NAME INPUTS...: true when DIR/NAME.stamp records the same inputs
  local want; want="$(stat -c '%n %s %Y' "${@:2}" 2>/dev/null | sha256sum | cut -d' ' -f1)"
  [ -f "$dir/$1.stamp" ] && [ "$(cat "$dir/$1.stamp")" = "$want" ] && [ -e "$dir/$1" ] && return 0
  echo "$want" > "$dir/$1.stamp.new"; return 1
}
commit_stamp() { mv "$dir/$1.stamp.new" "$dir/$1.stamp"; }

if ! stamp vmlinux "$bz"; then
  bash "$here/extract-vmlinux.sh" "$bz" "$dir/vmlinux" >&2
  commit_stamp vmlinux
fi

# --- the agent and the initramfs --------------------------------------------------------------
agent="$dir/godwit-agent"
if [ -d "$repo/crates/linux-agent" ]; then
  say "building the static agent (crates/linux-agent)"
  (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$repo/target/agent" \
     CARGO_PROFILE_RELEASE_DEBUG=0 cargo build -q --release -p linux-agent) >&2 || die "building the agent failed"
  # Stripped: every byte of the initramfs is copied by interpreted kernel code on kvm_pvm hosts.
  if ! cmp -s "$repo/target/agent/release/godwit-agent" "$dir/godwit-agent.unstripped" 2>/dev/null; then
    cp -p "$repo/target/agent/release/godwit-agent" "$dir/godwit-agent.unstripped"
    strip --strip-all -o "$agent.new" "$dir/godwit-agent.unstripped" && mv "$agent.new" "$agent"
  fi
  case "$(ldd "$agent" 2>&1 || true)" in *"not a dynamic"*|*"statically linked"*) ;; *) die "$agent is not static";; esac
  agent_args=(-a "$agent")
else
  say "no crates/linux-agent in this checkout: initramfs without the agent"
  agent_args=()
fi
# Uncompressed: inflating gzip is minutes of interpreted code on kvm_pvm hosts (and the
# unpack a boot waits for); any kernel takes a plain newc cpio.
rd="$dir/initramfs.cpio"
if ! stamp initramfs.cpio "$bz" "$here/build-initramfs.sh" ${agent_args[@]:+"$agent"}; then
  bash "$here/build-initramfs.sh" -Z -k "$kver" ${modroot:+-M "$modroot"} ${agent_args[@]:+"${agent_args[@]}"} -o "$rd" >&2
  commit_stamp initramfs.cpio
fi

# --- the host profile -------------------------------------------------------------------------
profile="${GODWIT_HOST_PROFILE:-}"
if [ -z "$profile" ]; then
  if [ -d /sys/module/kvm_pvm ]; then profile=pvm; else profile=none; fi
  say "host profile: $profile (detected: kvm_pvm module $([ "$profile" = pvm ] && echo present || echo absent))"
else
  say "host profile: $profile (GODWIT_HOST_PROFILE)"
fi
append="console=ttyS0 rdinit=/init godwit.workload=agent"
kernel="$dir/vmlinux"
case "$profile" in
  none) ;;
  pvm)
    # Symbols: the kernel's own kallsyms turned into an ELF symbol table by vmlinux-to-elf (PyPI),
    # installed into a private virtual environment under DIR.
    if [ ! -x "$dir/venv/bin/vmlinux-to-elf" ]; then
      say "installing vmlinux-to-elf (PyPI) into $dir/venv"
      python3 -m venv "$dir/venv" >&2 || die "python3 -m venv failed (Debian: python3-venv)"
      "$dir/venv/bin/pip" install -q vmlinux-to-elf >&2 || die "pip install vmlinux-to-elf failed"
    fi
    if ! stamp vmlinux.syms "$dir/vmlinux"; then
      say "recovering symbols from kallsyms (vmlinux-to-elf)"
      "$dir/venv/bin/vmlinux-to-elf" "$dir/vmlinux" "$dir/vmlinux.syms" >"$dir/vmlinux-to-elf.log" 2>&1 \
        || { cat "$dir/vmlinux-to-elf.log" >&2; die "vmlinux-to-elf failed"; }
      commit_stamp vmlinux.syms
    fi
    if ! stamp vmlinux-pvm "$dir/vmlinux" "$dir/vmlinux.syms" "$here/linux-kit/pvm-profile.py"; then
      python3 "$here/linux-kit/pvm-profile.py" patch "$dir/vmlinux" "$dir/vmlinux.syms" "$dir/vmlinux-pvm" >&2 \
        || die "the host profile cannot be applied to $kver (see above); refusing to boot an unpatched kernel here"
      commit_stamp vmlinux-pvm
    fi
    kernel="$dir/vmlinux-pvm"
    khz=$(python3 "$here/linux-kit/pvm-profile.py" tsc-khz) || die "cannot read the TSC frequency from /dev/kvm"
    hz=$(sed -n 's/^CONFIG_HZ=//p' "$config" 2>/dev/null)
    [ -n "$hz" ] || die "cannot read CONFIG_HZ from $config"
    append="console=ttyS0 earlyprintk=ttyS0 nokaslr rdinit=/init clearcpuid=cx16,popcnt,smap,ssse3 noxsave nopv tsc_early_khz=$khz lpj=$((khz * 1000 / hz)) tsc=unstable cryptomgr.notests watchdog_thresh=60 mitigations=off godwit.workload=agent"
    echo "tsc_khz=$khz"
    ;;
  *) die "unknown GODWIT_HOST_PROFILE=$profile (pvm or none)" ;;
esac
echo "profile=$profile"
echo "kver=$kver"
echo "kernel=$kernel"
echo "bzimage=$bz"
echo "vmlinux=$dir/vmlinux"
echo "initrd=$rd"
echo "append=$append"
