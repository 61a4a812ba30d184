#!/usr/bin/env bash
# Fetches QEMU of one Debian suite into a private directory instead of installing it:
# `apt-get download` of qemu-utils (qemu-img, qemu-io, qemu-nbd) and qemu-block-extra (QEMU's
# block modules, nfs:// among them), and with --system also qemu-system-x86 and its data
# (qemu-system-common, qemu-system-data, seabios), unpacked with `dpkg -x`. The machine's QEMU
# packages are untouched, so the tests and benches can use QEMU 7.2 (Debian 12, `bookworm`)
# and the newer QEMU of `bookworm-backports` side by side, whichever one is installed. Shared
# libraries the unpacked programs need and the machine lacks are installed from Debian (only
# when absent, with --no-remove: nothing is removed or downgraded).
#
#   scripts/qemu-tools.sh [--system] SUITE DIR     SUITE: bookworm (QEMU 7.2) | bookworm-backports
#
# Prints the environment to use them, e.g.
#   eval "$(scripts/qemu-tools.sh bookworm /tmp/qemu72)"; qemu-img --version
# (PATH first, then QEMU_MODULE_DIR, which makes qemu-img load the private block modules).
set -euo pipefail
system=0
if [ "${1:-}" = --system ]; then system=1; shift; fi
suite=${1:?usage: qemu-tools.sh [--system] SUITE DIR}
dir=${2:?usage: qemu-tools.sh [--system] SUITE DIR}
mkdir -p "$dir/apt/lists/partial" "$dir/apt/archives/partial" "$dir/deb"
dir=$(cd "$dir" && pwd)
pkgs=(qemu-utils qemu-block-extra)
[ $system = 1 ] && pkgs+=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
want=()
for p in "${pkgs[@]}"; do ls "$dir/deb/${p}_"*.deb >/dev/null 2>&1 || want+=("$p/$suite"); done
if [ ${#want[@]} -gt 0 ]; then
  # Both the suite and plain bookworm: a backports package's other parts (seabios...) may only
  # be in bookworm.
  printf 'deb http://deb.debian.org/debian %s main\n' "$suite" bookworm | sort -u > "$dir/apt/sources.list"
  opts=(-o "Dir::Etc::sourcelist=$dir/apt/sources.list" -o Dir::Etc::sourceparts=-
        -o "Dir::State::lists=$dir/apt/lists" -o "Dir::Cache::archives=$dir/apt/archives"
        -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq >&2
  for w in "${want[@]}"; do
    (cd "$dir/deb" && apt-get "${opts[@]}" download "$w" >&2 2>/dev/null \
       || apt-get "${opts[@]}" download "${w%/*}" >&2)
  done
fi
rm -rf "$dir/root"
for d in "$dir"/deb/*.deb; do dpkg -x "$d" "$dir/root"; done

# Shared libraries the unpacked programs depend on (first alternative of each lib* dependency).
libs=()
for d in "$dir"/deb/*.deb; do
  deps=$(dpkg-deb -f "$d" Depends 2>/dev/null || true)
  IFS=',' read -ra items <<< "$deps"
  for it in "${items[@]}"; do
    name=$(echo "${it%%|*}" | sed 's/(.*//; s/:any//' | tr -d ' ')
    case "$name" in
      lib*) dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q "install ok installed" || libs+=("$name") ;;
    esac
  done
done
if [ ${#libs[@]} -gt 0 ]; then
  echo "qemu-tools.sh: installing libraries QEMU needs: ${libs[*]}" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends --no-remove \
    $(printf '%s\n' "${libs[@]}" | sort -u) >&2 \
    || echo "qemu-tools.sh: some libraries could not be installed; programs needing them will say so" >&2
fi
"$dir/root/usr/bin/qemu-img" --version >/dev/null \
  || { echo "qemu-tools.sh: the $suite qemu-img does not run here (missing libraries?)" >&2; exit 1; }
echo "export PATH=$dir/root/usr/bin:\$PATH"
echo "export QEMU_MODULE_DIR=$dir/root/usr/lib/x86_64-linux-gnu/qemu"
