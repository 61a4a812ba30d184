#!/usr/bin/env bash
# Fetches QEMU's tools of one Debian suite into a private directory, without installing
# anything: `apt-get download` of qemu-utils (qemu-img, qemu-io, qemu-nbd) and qemu-block-extra
# (QEMU's nfs:// driver, a module), unpacked with `dpkg -x`. The machine's own packages are
# untouched, so the tests and benches can run against QEMU 7.2 (Debian 12, `bookworm`) and
# against the newer QEMU of `bookworm-backports` side by side, whatever is installed.
#
#   scripts/qemu-tools.sh SUITE DIR     SUITE: bookworm (QEMU 7.2) | bookworm-backports (10.x)
#
# Prints the environment to use them, e.g.
#   eval "$(scripts/qemu-tools.sh bookworm /tmp/qemu72)"; qemu-img --version
set -euo pipefail
suite=${1:?usage: qemu-tools.sh SUITE DIR}
dir=${2:?usage: qemu-tools.sh SUITE DIR}
mkdir -p "$dir/apt/lists/partial" "$dir/apt/archives/partial" "$dir/deb"
dir=$(cd "$dir" && pwd)
if [ ! -x "$dir/root/usr/bin/qemu-img" ]; then
  echo "deb http://deb.debian.org/debian $suite main" > "$dir/apt/sources.list"
  opts=(-o "Dir::Etc::sourcelist=$dir/apt/sources.list" -o Dir::Etc::sourceparts=-
        -o "Dir::State::lists=$dir/apt/lists" -o "Dir::Cache::archives=$dir/apt/archives"
        -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq >&2
  (cd "$dir/deb" && apt-get "${opts[@]}" download "qemu-utils/$suite" "qemu-block-extra/$suite" >&2)
  for d in "$dir"/deb/*.deb; do dpkg -x "$d" "$dir/root"; done
fi
"$dir/root/usr/bin/qemu-img" --version >/dev/null \
  || { echo "qemu-tools.sh: the $suite qemu-img does not run here (missing libraries?)" >&2; exit 1; }
echo "export PATH=$dir/root/usr/bin:\$PATH"
echo "export QEMU_MODULE_DIR=$dir/root/usr/lib/x86_64-linux-gnu/qemu"
