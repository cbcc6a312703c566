#!/bin/sh
# Set up a fresh Debian 12 machine to run and test vmreclaim: system packages with
# apt-get (QEMU tools, e2fsprogs, xfsprogs, FUSE, libvirt, a kernel for guest tests),
# then the project itself with its test and development extras.
#
#   scripts/setup.sh            everything the test suite needs
#   scripts/setup.sh --bench    also the reference tools the benchmarks compare against
set -eu
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PACKAGES="
  qemu-utils qemu-system-x86 qemu-block-extra
  e2fsprogs xfsprogs btrfs-progs dosfstools mtools ntfs-3g lvm2 fdisk util-linux kmod
  fuse3 busybox-static cpio linux-image-amd64
  libvirt-daemon-system libvirt-dev pkg-config gcc python3-dev
  ceph-mon ceph-mgr ceph-osd ceph-common python3-rbd python3-rados
  debootstrap
"
if [ "${1:-}" = "--bench" ]; then
  PACKAGES="$PACKAGES libguestfs-tools hyperfine"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends $PACKAGES

PYTHON="${PYTHON:-python3}"
# Where python3 is Debian's own interpreter, pip refuses to install into it (PEP 668);
# this machine is set up for vmreclaim, so allow it. Other interpreters ignore this.
export PIP_BREAK_SYSTEM_PACKAGES=1
"$PYTHON" -m pip install -q --upgrade pip
"$PYTHON" -m pip install -q -e '.[test,dev]'
echo "vmreclaim set up: $("$PYTHON" -m vmreclaim --version)"
