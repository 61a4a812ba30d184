#!/usr/bin/env bash
# Extracts the uncompressed ELF vmlinux from an x86 bzImage, using the setup header's
# payload_offset/payload_length (boot protocol 2.08+) to cut the compressed payload exactly,
# then the Debian tool for its format (gzip, xz, lz4, zstd, bzip2, lzma). Debian's cloud kernel
# is LZ4-compressed; its vmlinux has a PVH entry note, so Godwit (and QEMU) can boot it directly
# without running the bzImage decompressor.
#
# Usage: scripts/extract-vmlinux.sh BZIMAGE OUTPUT
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BZIMAGE OUTPUT" >&2; exit 2; }
in="$1"
out="$2"
die() { echo "extract-vmlinux: $*" >&2; exit 1; }
[ -r "$in" ] || die "cannot read $in"

le() { # le OFFSET SIZE: little-endian unsigned integer from $in
  od -An -tu"$2" -j "$1" -N "$2" --endian=little "$in" | tr -d ' '
}
[ "$(le $((0x202)) 4)" = "$((0x53726448))" ] || die "$in is not a bzImage"
setup_sects=$(le $((0x1f1)) 1)
[ "$setup_sects" -eq 0 ] && setup_sects=4
payload_offset=$(le $((0x248)) 4)
payload_length=$(le $((0x24c)) 4)
[ "$payload_length" -gt 0 ] || die "$in has no payload information (boot protocol < 2.08)"
start=$(( (setup_sects + 1) * 512 + payload_offset ))

tmp="$(mktemp)"
trap 'rm -f "$tmp" "$out.tmp"' EXIT
dd if="$in" of="$tmp" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$payload_length" status=none
magic=$(od -An -tx1 -N 6 "$tmp" | tr -d ' \n')

# need TOOL PACKAGE: installs the Debian package when the tool is missing (root only).
need() {
  command -v "$1" >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "$1 is needed (Debian package $2)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq "$2"; } >/dev/null || die "apt-get install $2 failed"
}
# The payload carries a 4-byte size trailer some tools call garbage: trust the output's
# ELF magic rather than the tool's exit status.
case "$magic" in
  1f8b*) need gzip gzip; gzip -dc < "$tmp" > "$out.tmp" 2>/dev/null || true ;;
  fd377a585a00) need xz xz-utils; xz -dc --single-stream < "$tmp" > "$out.tmp" 2>/dev/null || true ;;
  02214c18*) need lz4 lz4; lz4 -dc < "$tmp" > "$out.tmp" 2>/dev/null || true ;;
  28b52ffd*) need zstd zstd; zstd -qdc < "$tmp" > "$out.tmp" 2>/dev/null || true ;;
  425a68*) need bzip2 bzip2; bzip2 -dc < "$tmp" > "$out.tmp" 2>/dev/null || true ;;
  5d0000*) need xz xz-utils; xz -dc --format=lzma < "$tmp" > "$out.tmp" 2>/dev/null || true ;;
  7f454c46*) cp "$tmp" "$out.tmp" ;;
  *) die "unknown payload compression (magic $magic)" ;;
esac
[ "$(head -c 4 "$out.tmp" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ] || die "decompressed payload is not an ELF file"
mv "$out.tmp" "$out"
echo "extract-vmlinux: $out ($(stat -c %s "$out") bytes)"
