#!/usr/bin/env bash
# The README's test command: installs what the tests need when it is missing (Debian packages
# with apt-get, the `qemu.qmp` Python package with pip), then builds the workspace and runs
# every test. It never downgrades or removes a package that is already there:
# packages are installed only when absent, with `--no-remove` (apt aborts rather than remove
# anything) and without `--allow-downgrades`. Whatever QEMU version the machine has (7.2 or
# newer) is used as it is.
#
#   scripts/test.sh                 install what is missing, build, run all tests
#   scripts/test.sh --no-install    only check: list what is missing, then build and test
#   scripts/test.sh -- ARGS         extra arguments for `cargo test` (e.g. -p qcow2)
#
# After the workspace tests, the qemu-img differential tests (crates qcow2, godwit-img) run a
# second time against the other QEMU generation, fetched privately (scripts/qemu-tools.sh);
# then the Linux boot-and-move tests (crates/godwit/tests/linux_moves.rs), which build the Linux
# kit (scripts/linux-kit.sh) under target/.
set -euo pipefail
cd "$(dirname "$0")/.."

install=1
cargo_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-install) install=0 ;;
    --) shift; cargo_args=("$@"); break ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) echo "scripts/test.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

have() { command -v "$1" >/dev/null 2>&1; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# Debian package -> how to tell it is there (a command, or the package itself).
need_apt=()
want_cmd() { have "$2" || need_apt+=("$1"); }
want_pkg() { installed "$1" || need_apt+=("$1"); }
want_cmd qemu-utils qemu-img            # qemu-img, qemu-io, qemu-nbd: the differential tests
want_cmd qemu-system-x86 qemu-system-x86_64   # the same guest under QEMU (boot and bench tests;
want_pkg qemu-block-extra               # QEMU's nfs:// driver    a private copy if these conflict)
want_cmd libnbd-bin nbdinfo             # nbdinfo / nbdcopy against our NBD server
want_cmd acpica-tools iasl              # our ACPI tables disassembled by iasl
want_cmd iproute2 ip                    # network namespaces, veth, bridges, tc
want_cmd iputils-ping ping
want_cmd lz4 lz4                        # the Linux initramfs
want_cmd cpio cpio
[ -x /bin/busybox ] || want_pkg busybox-static  # the initramfs (scripts/build-initramfs.sh checks it is static)
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || need_apt+=(linux-image-cloud-amd64)
want_cmd nfs-ganesha ganesha.nfsd       # the NFS server the storage tests start
want_pkg nfs-ganesha-vfs
want_pkg libnfs-dev                     # Godwit's nfs:// backend links libnfs
want_cmd libnfs-utils nfs-ls
want_cmd rpcbind rpcbind                # NFSv3 for QEMU's nfs:// driver
want_cmd libvirt-daemon libvirtd          # libvirt drives Godwit (crates/godwit/tests/libvirt_virsh.rs)
want_pkg libvirt-daemon-driver-qemu
want_cmd libvirt-clients virsh
want_cmd python3 python3
want_cmd python3-pip pip3
want_pkg python3-venv                   # scripts/linux-kit.sh: vmlinux-to-elf in a private venv
want_cmd binutils objdump               # scripts/linux-kit.sh: nm/objdump for the host profile
want_cmd pkg-config pkg-config

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ $install = 1 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    echo "scripts/test.sh: installing missing Debian packages: ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    if ! $SUDO apt-get install -y -qq --no-install-recommends --no-remove "${need_apt[@]}" >/dev/null; then
      # One package that cannot be installed without removing something must not keep the
      # others out: try them one by one and say which failed.
      for p in "${need_apt[@]}"; do
        $SUDO apt-get install -y -qq --no-install-recommends --no-remove "$p" >/dev/null 2>&1 \
          || echo "scripts/test.sh: could not install $p without removing or downgrading something; tests needing it will fail" >&2
      done
    fi
  else
    echo "scripts/test.sh: missing Debian packages (tests that need them will fail and say so): ${need_apt[*]}" >&2
  fi
fi

# QEMU's system emulator and block modules come in the same version as qemu-utils. When the
# machine's qemu-utils is newer than what Debian 12 ships (backports), installing Debian 12's
# qemu-system-x86 / qemu-block-extra would remove it, which --no-remove refuses: then a private
# copy is used instead (scripts/qemu-tools.sh; nothing installed or replaced): QEMU 7.2's
# system emulator appended to PATH (the machine's qemu-img stays first), and block modules of
# the installed qemu-utils' own version through QEMU_MODULE_DIR.
T=${CARGO_TARGET_DIR:-target}
if [ $install = 1 ] && ! have qemu-system-x86_64; then
  if scripts/qemu-tools.sh --system bookworm "$T/qemu-bookworm" > /dev/null; then
    export PATH="$PATH:$(cd "$T/qemu-bookworm/root/usr/bin" && pwd)"
    echo "scripts/test.sh: qemu-system-x86_64: a private QEMU 7.2 from $T/qemu-bookworm" >&2
  else
    echo "scripts/test.sh: no qemu-system-x86_64 (install qemu-system-x86): the tests that boot QEMU will fail and say so" >&2
  fi
fi
if [ $install = 1 ] && ! installed qemu-block-extra; then
  case "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null)" in
    *bpo12*) msuite=bookworm-backports ;;
    *) msuite=bookworm ;;
  esac
  if mod_env=$(scripts/qemu-tools.sh "$msuite" "$T/qemu-$msuite" | grep '^export QEMU_MODULE_DIR'); then
    eval "$mod_env"
    echo "scripts/test.sh: QEMU block modules (nfs://) from $QEMU_MODULE_DIR" >&2
  else
    echo "scripts/test.sh: no QEMU block modules (qemu-block-extra): qemu-img on nfs:// will fail and say so" >&2
  fi
fi

if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
  if [ $install = 1 ]; then
    echo "scripts/test.sh: installing the qemu.qmp Python package" >&2
    python3 -m pip install -q qemu.qmp 2>/dev/null \
      || python3 -m pip install -q --user --break-system-packages qemu.qmp
  else
    echo "scripts/test.sh: the qemu.qmp Python package is missing (pip install qemu.qmp)" >&2
  fi
fi

have cargo || { echo "scripts/test.sh: cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
[ -r /dev/kvm ] && [ -w /dev/kvm ] \
  || echo "scripts/test.sh: /dev/kvm is missing or not read/writable: the VM tests will fail and say so" >&2
echo "scripts/test.sh: qemu-img: $(qemu-img --version 2>/dev/null | head -1 || echo none)" >&2

# The tests write guest images and snapshots under the temporary directory (a few GiB at peak;
# each test removes its own when it passes). Say so up front when space is short, rather than
# leaving it to a test's "No space left on device".
tmp="${TMPDIR:-/tmp}"
free_kib=$(df -Pk "$tmp" 2>/dev/null | awk 'NR==2 {print $4}')
if [ -n "${free_kib:-}" ] && [ "$free_kib" -lt $((6 * 1024 * 1024)) ]; then
  echo "scripts/test.sh: warning: only $((free_kib / 1024)) MiB free in $tmp; the tests need about 6 GiB there (set TMPDIR to move them)" >&2
fi

cargo build --release --workspace
cargo test --release --workspace "${cargo_args[@]}"

# The reliability campaign's quick run: 20 migrations under seeded faults (a fixed seed, so
# the same faults every run); any invariant violation fails the tests.
if [ ${#cargo_args[@]} -eq 0 ]; then
  T=${CARGO_TARGET_DIR:-target}
  "$T/release/godwit-chaos" --quick --strict --seed 20261204 --out "$T/chaos" --bin-dir "$T/release"
fi

# The qemu-img differential tests once more against the other QEMU generation (7.2 <-> the
# newer one of bookworm-backports), from a private copy of Debian's qemu-utils unpacked under
# target/ by scripts/qemu-tools.sh: nothing is installed or replaced. GODWIT_SECOND_QEMU=0
# skips this step (and says so).
if [ ${#cargo_args[@]} -eq 0 ]; then
  if [ "${GODWIT_SECOND_QEMU:-1}" = 0 ]; then
    echo "scripts/test.sh: GODWIT_SECOND_QEMU=0: the differential tests ran against one QEMU only" >&2
  else
    if qemu-img --version | head -1 | grep -q "version 7\.2"; then suite=bookworm-backports; else suite=bookworm; fi
    env_lines=$(scripts/qemu-tools.sh "$suite" "target/qemu-$suite") \
      || { echo "scripts/test.sh: could not fetch the $suite QEMU tools for the second differential run" >&2; exit 1; }
    (
      eval "$env_lines"
      echo "scripts/test.sh: differential tests again, against $(qemu-img --version | head -1)" >&2
      cargo test --release -p qcow2 -p godwit-img
    )
  fi
fi

# Linux moved while it boots (issue 15): Debian's kernel from the Linux kit, power-on to
# `Run /init` on -smp 1 and -smp 2, live-migrated twice on the way, and a savevm in mid-boot
# loaded in another directory. Minutes of interpreted kernel code on a nested-KVM host, so a
# step of its own after the main suite (the two vCPU counts side by side).
# GODWIT_LINUX_TESTS=0 skips it (and says so).
if [ ${#cargo_args[@]} -eq 0 ]; then
  if [ "${GODWIT_LINUX_TESTS:-1}" = 0 ]; then
    echo "scripts/test.sh: GODWIT_LINUX_TESTS=0: the Linux boot-and-move tests did not run" >&2
  else
    cargo test --release -p godwit --test linux_moves -- --ignored --test-threads=4
  fi
fi
