"""The guest's kit: Debian's installed kernel and an initramfs made here (busybox and the
kernel's own virtio, 9p, overlay, ext4 and xfs modules)."""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: and xfs ask the crypto layer for it by name and there is no modprobe helper).
GUEST_MODULES = (
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "overlay",
    "ext4",
    "xfs",
)
#: The 9p tags of the two shares.

_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod "/modules/$m" || echo "init: insmod $m failed"; done
mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \
  || { echo "init: cannot mount the host root"; poweroff -f; }
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot \
  || { echo "init: cannot mount the overlay"; poweroff -f; }
mkdir -p /newroot/xfer
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=512000 xfer /newroot/xfer
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/dev/virtio-ports
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
# /tmp is left to the overlay (writes land in its tmpfs upper layer): a checkout or a
# tox environment under the host's /tmp must stay visible to the guest.
mount -t tmpfs tmpfs /newroot/run
mount -t tmpfs tmpfs /newroot/mnt
# No udev: make the stable names of virtio-serial ports by hand.
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && ln -sf "/dev/${p##*/}" "/newroot/dev/virtio-ports/$(cat "$p/name")"
done
echo "init: up $(cut -d' ' -f1 /proc/uptime)s" > /newroot/xfer/boot
chroot /newroot /bin/sh -c '. /xfer/env; cd /; exec /bin/sh /xfer/run.sh' \
  > /newroot/xfer/output 2>&1 < /dev/null
echo $? > /newroot/xfer/rc.tmp
mv /newroot/xfer/rc.tmp /newroot/xfer/rc
sync
umount -a -r 2>/dev/null
poweroff -f
"""


class GuestError(AssertionError):
    """The guest could not be built, booted, or did not finish in time."""


# -- the kit: kernel + initramfs -----------------------------------------------------------


@dataclass(frozen=True)
class GuestKit:
    """A bootable kernel and initramfs made from the host's installed kernel package."""

    kernel: Path
    initramfs: Path
    kernel_version: str


def installed_kernel() -> str:
    """The newest installed kernel that has its modules: its version string."""
    versions = [
        p.name.removeprefix("vmlinuz-")
        for p in Path("/boot").glob("vmlinuz-*")
        if (Path("/lib/modules") / p.name.removeprefix("vmlinuz-") / "modules.dep").exists()
    ]
    if not versions:
        raise GuestError("no /boot/vmlinuz-* with modules in /lib/modules (install linux-image-amd64)")
    return sorted(versions, key=_version_key)[-1]


def _version_key(v: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", v)]


def build_kit(dest: str | os.PathLike[str], kernel_version: str | None = None) -> GuestKit:
    """Make (or reuse from ``dest``) the kernel and initramfs of the test guest."""
    version = kernel_version or installed_kernel()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    modules = _module_order(version, GUEST_MODULES)
    tag = hashlib.sha256((_INIT + version + " ".join(modules)).encode()).hexdigest()[:12]
    kernel = dest / f"vmlinux-{version}"
    initramfs = dest / f"initramfs-{version}-{tag}.cpio"
    if not kernel.exists():
        _extract_vmlinux(Path(f"/boot/vmlinuz-{version}"), kernel)
    if not initramfs.exists():
        _write_initramfs(initramfs, version, modules)
    return GuestKit(kernel=kernel, initramfs=initramfs, kernel_version=version)


def _extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """Decompress the ELF kernel out of a bzImage so QEMU boots it through PVH."""
    data = vmlinuz.read_bytes()
    for magic, fmt in ((b"\xfd7zXZ\x00", lzma.FORMAT_XZ), (b"\x5d\x00\x00", lzma.FORMAT_ALONE)):
        at = data.find(magic)
        while at >= 0:
            with contextlib.suppress(lzma.LZMAError):
                elf = lzma.LZMADecompressor(format=fmt).decompress(data[at:])
                if elf[:4] == b"\x7fELF":
                    tmp = out.with_suffix(".tmp")
                    tmp.write_bytes(elf)
                    tmp.rename(out)
                    return
            at = data.find(magic, at + 1)
    # Not an xz/lzma kernel: boot the bzImage itself (slower, through the firmware).
    shutil.copyfile(vmlinuz, out)


def _module_order(version: str, wanted: Sequence[str]) -> list[str]:
    """Module files (relative to /lib/modules/VERSION) to insmod, dependencies first."""
    root = Path("/lib/modules") / version
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps.get(mod, []):
            visit(dep)
        order.append(mod)

    for name in wanted:
        found = by_name.get(name.replace("-", "_"))
        if found is None:
            if _builtin(root, name):
                continue
            raise GuestError(f"kernel {version} has no module {name!r} (and it is not built in)")
        visit(found)
    return order


def _builtin(root: Path, name: str) -> bool:
    builtin = root / "modules.builtin"
    return builtin.exists() and any(
        Path(line).name.split(".ko")[0].replace("-", "_") == name.replace("-", "_")
        for line in builtin.read_text().splitlines()
    )


def _write_initramfs(out: Path, version: str, modules: list[str]) -> None:
    busybox = shutil.which("busybox") or ""
    if not busybox:
        raise GuestError("busybox not found (install busybox-static)")
    root = Path("/lib/modules") / version
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        cpio = _Cpio(f)
        for d in ("bin", "dev", "proc", "sys", "modules", "host", "rw", "newroot"):
            cpio.directory(d)
        cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
        cpio.file("init", _INIT.encode(), 0o755)
        names = []
        for mod in modules:
            name = Path(mod).name
            data = (root / mod).read_bytes()
            if name.endswith(".xz"):
                data, name = lzma.decompress(data), name[:-3]
            elif name.endswith(".zst"):
                raise GuestError(f"{root / mod}: zstd-compressed modules are not supported here")
            cpio.file(f"modules/{name}", data, 0o644)
            names.append(name)
        cpio.file("modules.order", ("\n".join(names) + "\n").encode(), 0o644)
        cpio.trailer()
    tmp.rename(out)


class _Cpio:
    """The ``newc`` cpio format the kernel unpacks as its initramfs."""

    def __init__(self, f: object) -> None:
        self.f = f
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.ino += 1
        write = self.f.write  # type: ignore[attr-defined]
        write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, 0o100000 | perm, data)

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0)
