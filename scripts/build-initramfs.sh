#!/usr/bin/env bash
# Builds a small Linux initramfs (gzip'ed newc cpio) from Debian packages only:
#   - busybox from `busybox-static` (the shell, insmod, mount, dd, poweroff...);
#   - the virtio modules of the installed `linux-image-cloud-amd64` kernel, decompressed when
#     the package ships them compressed, plus everything they depend on, in dependency order
#     (a post-order walk of that kernel's modules.dep).
# Missing packages are installed with apt-get (root needed then).
#
# Its /init mounts proc/sys/devtmpfs, prints "GODWIT-INITRAMFS: init started", loads the
# modules, prints what it found (CPUs, virtio devices, disks, NICs) and "BOOT-OK uptime=<s>",
# then runs the workload chosen on the kernel command line and powers off:
#   godwit.workload=info    (default) nothing more
#   godwit.workload=disk    read the first 64 MiB of /dev/vda, print "DISK-READ-OK <bytes>"
#   godwit.workload=shell   start a shell on the console instead of powering off
#   godwit.workload=agent   bring up lo (and eth0 with godwit.ip=ADDR/PREFIX if given), then
#                           exec the Godwit agent (-a) as PID 1 (crates/linux-agent)
#
# Usage: scripts/build-initramfs.sh [-k KERNEL_VERSION] [-M MODULES_ROOT] [-a AGENT] [-Z]
#                                   [-o OUTPUT] [-m "mod1 mod2 ..."]
# -Z writes the cpio uncompressed (a kernel whose code is interpreted, as on kvm_pvm hosts,
# spends minutes inflating a gzip'ed one).
# Defaults: the newest installed *-cloud-amd64 kernel, ./initramfs-godwit.cpio.gz, and the
# modules virtio_mmio virtio_blk virtio_net virtio_console virtio-rng. -M names the folder that
# holds lib/modules/KERNEL_VERSION (a kernel package unpacked with dpkg -x; default /).
set -euo pipefail

out="initramfs-godwit.cpio.gz"
kver=""
modules="virtio_mmio virtio_blk virtio_net virtio_console virtio-rng"
modroot=""
agent=""
compress=1
while getopts "k:M:a:Zo:m:h" opt; do
  case "$opt" in
    k) kver="$OPTARG" ;;
    M) modroot="$OPTARG" ;;
    a) agent="$OPTARG" ;;
    Z) compress=0 ;;
    o) out="$OPTARG" ;;
    m) modules="$OPTARG" ;;
    *) sed -n '2,26p' "$0"; exit 2 ;;
  esac
done

die() { echo "build-initramfs: $*" >&2; exit 1; }

apt_install() {
  [ "$(id -u)" = 0 ] || die "missing Debian packages ($*) and not root: apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

# A static busybox (what busybox-static ships) runs in the initramfs without any library.
is_static() { case "$(ldd "$1" 2>&1 || true)" in *"not a dynamic"*) return 0 ;; *) return 1 ;; esac; }

need=()
{ [ -x /bin/busybox ] && is_static /bin/busybox; } || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ -z "$kver" ]; then
  kver=$(ls -1 "$modroot/lib/modules" 2>/dev/null | grep -- '-cloud-amd64$' | sort -V | tail -n1 || true)
  [ -n "$kver" ] || [ -n "$modroot" ] || need+=(linux-image-cloud-amd64)
fi
[ -z "$agent" ] || [ -x "$agent" ] || die "agent $agent is not an executable file"
if [ ${#need[@]} -gt 0 ]; then
  apt_install "${need[@]}"
fi
if [ -z "$kver" ]; then
  kver=$(ls -1 "$modroot/lib/modules" | grep -- '-cloud-amd64$' | sort -V | tail -n1 || true)
fi
[ -n "$kver" ] || die "no *-cloud-amd64 kernel modules under $modroot/lib/modules"
moddir="$modroot/lib/modules/$kver"
[ -f "$moddir/modules.dep" ] || die "$moddir/modules.dep is missing"
busybox=/bin/busybox
is_static "$busybox" || die "$busybox is not the static busybox (install busybox-static)"

# --- module order: post-order walk of modules.dep ---------------------------------------------
declare -A dep_of path_of seen
while IFS= read -r line; do
  file="${line%%:*}"
  name="$(basename "$file")"
  name="${name%%.ko*}"
  name="${name//-/_}"
  path_of[$name]="$file"
  dep_of[$name]="${line#*:}"
done < "$moddir/modules.dep"

order=()
visit() {
  local n="${1//-/_}"
  [ -n "${seen[$n]:-}" ] && return 0
  seen[$n]=1
  [ -n "${path_of[$n]:-}" ] || die "module $1 is not in $moddir/modules.dep"
  local d
  for d in ${dep_of[$n]}; do
    d="$(basename "$d")"; d="${d%%.ko*}"
    visit "$d"
  done
  order+=("$n")
}
for m in $modules; do visit "$m"; done

# --- the tree ----------------------------------------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules}
cp "$busybox" "$root/bin/busybox"
[ -z "$agent" ] || cp "$agent" "$root/bin/godwit-agent"
for app in $("$busybox" --list); do
  [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"
done

: > "$root/lib/modules/order"
for n in "${order[@]}"; do
  src="$moddir/${path_of[$n]}"
  dst="$root/lib/modules/$n.ko"
  case "$src" in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" > "$dst" ;;
    *.ko.zst) zstd -qdc "$src" > "$dst" ;;
    *.ko.gz) gzip -dc "$src" > "$dst" ;;
    *) die "unknown module compression: $src" ;;
  esac
  echo "$n" >> "$root/lib/modules/order"
done

cat > "$root/init" <<'INIT'
#!/bin/sh
# Godwit test initramfs /init (generated by scripts/build-initramfs.sh).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "GODWIT-INITRAMFS: init started"
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "GODWIT-INITRAMFS: insmod $m failed"
done
workload=info
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    godwit.workload=*) workload="${arg#godwit.workload=}" ;;
    godwit.ip=*) ipaddr="${arg#godwit.ip=}" ;;
  esac
done
echo "cpus: $(grep -c ^processor /proc/cpuinfo)"
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d" ] || continue
  drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
  parent=$(basename "$(dirname "$(readlink -f "$d")")")
  echo "virtio: $(basename "$d") device=$(cat "$d/device") driver=${drv:-none} parent=$parent"
done
grep -E ' (vd|sd)[a-z]+$' /proc/partitions | sed 's/^/disk: /'
for n in /sys/class/net/*; do [ "$(basename "$n")" = lo ] || echo "nic: $(basename "$n")"; done
echo "BOOT-OK uptime=$(cut -d' ' -f1 /proc/uptime) workload=$workload"
case "$workload" in
  disk)
    if [ -b /dev/vda ]; then
      if out=$(dd if=/dev/vda of=/dev/null bs=1M count=64 2>&1); then
        recs=$(echo "$out" | sed -n 's/^\([0-9]*\)+[0-9]* records out.*/\1/p')
        echo "DISK-READ-OK bytes=$((${recs:-0} * 1048576))"
      else
        echo "DISK-READ-FAILED $out"
      fi
    else
      echo "DISK-READ-FAILED no /dev/vda"
    fi ;;
  shell)
    exec sh ;;
  agent)
    ip link set lo up
    if [ -n "${ipaddr:-}" ]; then
      ip link set eth0 up && ip addr add "$ipaddr" dev eth0 || echo "GODWIT-INITRAMFS: eth0 $ipaddr failed"
    fi
    [ -x /bin/godwit-agent ] && exec /bin/godwit-agent
    echo "GODWIT-INITRAMFS: no agent in this initramfs (build it with -a)" ;;
esac
echo "GODWIT-INITRAMFS: powering off"
poweroff -f
INIT
chmod 755 "$root/init"

mkdir -p "$(dirname "$out")"
if [ $compress = 1 ]; then
  (cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -9 > "$out.tmp"
else
  (cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) > "$out.tmp"
fi
mv "$out.tmp" "$out"
echo "build-initramfs: $out ($(stat -c %s "$out") bytes) for $kver: modules ${order[*]}"
