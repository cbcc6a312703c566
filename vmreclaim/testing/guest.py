"""A real Linux guest built from this machine's own parts, for end-to-end tests.

The guest is QEMU booting Debian's installed kernel (``linux-image-amd64``) directly,
with a small initramfs made here: busybox plus the kernel's own virtio, 9p, overlay,
ext4 and xfs modules. Its init mounts the host's root filesystem read-only over 9p under
a tmpfs overlay and runs a shell script in it, so the guest runs the host's Python and
*this checkout* of vmreclaim — nothing is installed into an image. A second, writable
9p share (``xfer``) carries the script in, and the script's output, exit status and any
files the test and the guest pass each other.

TCG is used (``-accel tcg``): on the reference machine ``/dev/kvm`` is a nested,
paravirtual KVM under which a Linux guest hangs early in boot. Booting the uncompressed
``vmlinux`` (PVH entry) skips the firmware and decompression: a guest runs a Python
one-liner and powers off in about 3 s.

The same guest can be started by QEMU directly (:class:`QemuGuest`, with a QMP socket)
or as a transient libvirt domain (:class:`GuestSpec.libvirt_xml`), so hypervisor drivers
are tested against the real thing.
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

from vmreclaim.core.punch import allocated_bytes
from vmreclaim.testing.helpers import require_root, require_tool, run

if TYPE_CHECKING:
    from vmreclaim.testing.host import HostProcess

#: Modules the guest loads, in this order after their dependencies (crc32c first: ext4
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
HOSTROOT_TAG = "hostroot"
XFER_TAG = "xfer"
#: The virtio-serial port name the vmreclaim agent uses by default.
CHANNEL_NAME = "org.vmreclaim.0"
#: The host root spans several filesystems (/proc, /sys, ...): remap their inode numbers
#: or the guest sees one directory where another should be.
_VIRTFS_OPTIONS = "security_model=none,multidevs=remap"
#: Where the project checkout lives: the guest puts it first on ``PYTHONPATH``.
CHECKOUT = Path(__file__).resolve().parents[2]

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


# -- what a guest has ----------------------------------------------------------------------


@dataclass(frozen=True)
class GuestDisk:
    """A data disk: an image file on a virtio-blk device with a serial."""

    path: Path
    format: str = "qcow2"
    serial: str = "disk0"
    #: discard=unmap: QEMU passes the guest's discards down to the image file.
    discard: bool = False

    def __post_init__(self) -> None:
        if self.format not in ("qcow2", "raw", "vpc"):
            raise ValueError(f"guest disk format {self.format!r} is not qcow2, raw or vpc")


@dataclass(frozen=True)
class GuestPort:
    """A virtio-serial port whose host end is a Unix socket QEMU binds (listens on)."""

    socket: Path
    name: str = CHANNEL_NAME


@dataclass
class GuestSpec:
    """Everything about one guest: kit, shares, disks, channels, size."""

    kit: GuestKit
    workdir: Path
    script: str
    disks: Sequence[GuestDisk] = ()
    ports: Sequence[GuestPort] = ()
    memory_mib: int = 768
    cpus: int = 2
    env: dict[str, str] = field(default_factory=dict)

    @property
    def xfer(self) -> Path:
        return self.workdir / "xfer"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def cmdline(self) -> str:
        return "console=ttyS0 panic=-1 quiet loglevel=4 random.trust_cpu=on"

    def prepare(self) -> None:
        """Write the script and its environment into a fresh ``xfer`` share."""
        if self.xfer.exists():
            shutil.rmtree(self.xfer)
        self.xfer.mkdir(parents=True)
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",  # noqa: E501
            "HOME": "/root",
            "PYTHONPATH": str(CHECKOUT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHON": sys.executable,
            "LANG": "C.UTF-8",
            **self.env,
        }
        (self.xfer / "env").write_text("".join(f"export {k}={_sh_quote(v)}\n" for k, v in env.items()))
        (self.xfer / "run.sh").write_text(self.script)
        self.console_log.unlink(missing_ok=True)

    def qemu_argv(self, qmp_socket: Path | None = None) -> list[str]:
        argv = [
            "qemu-system-x86_64",
            "-machine", "q35",
            "-accel", "tcg,thread=multi",
            "-cpu", "max",
            "-m", str(self.memory_mib),
            "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(self.kit.kernel),
            "-initrd", str(self.kit.initramfs),
            "-append", self.cmdline,
            "-chardev", f"file,id=console0,path={self.console_log}",
            "-serial", "chardev:console0",
            "-device", "virtio-rng-pci",
            "-virtfs", f"local,path=/,mount_tag={HOSTROOT_TAG},readonly=on,{_VIRTFS_OPTIONS}",
            "-virtfs", f"local,path={self.xfer},mount_tag={XFER_TAG},{_VIRTFS_OPTIONS}",
        ]  # fmt: skip
        for i, disk in enumerate(self.disks):
            discard = "unmap" if disk.discard else "ignore"
            argv += [
                "-drive",
                f"file={disk.path},format={disk.format},if=none,id=drive{i},discard={discard},cache=writeback",
                "-device",
                f"virtio-blk-pci,drive=drive{i},id=blk{i},serial={disk.serial}",
            ]
        if self.ports:
            argv += ["-device", "virtio-serial-pci,id=vser0"]
            for i, port in enumerate(self.ports):
                argv += [
                    "-chardev", f"socket,id=port{i},path={port.socket},server=on,wait=off",
                    "-device", f"virtserialport,bus=vser0.0,chardev=port{i},name={port.name}",
                ]  # fmt: skip
        if qmp_socket is not None:
            argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
        return argv

    def libvirt_xml(self, name: str) -> str:
        """The same guest as a libvirt ``type='qemu'`` (TCG) domain, QEMU running as root
        (a static DAC label) so that it can read the host root it exports."""
        disks = "".join(
            f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{d.format}' discard='{"unmap" if d.discard else "ignore"}' cache='writeback'/>
      <source file={quoteattr(str(d.path))}/>
      <target dev='vd{chr(ord("a") + i)}' bus='virtio'/>
      <serial>{escape(d.serial)}</serial>
    </disk>"""
            for i, d in enumerate(self.disks)
        )
        ports = "".join(
            f"""
    <channel type='unix'>
      <source mode='bind' path={quoteattr(str(p.socket))}/>
      <target type='virtio' name={quoteattr(p.name)}/>
    </channel>"""
            for p in self.ports
        )
        return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <vcpu>{self.cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(self.kit.kernel))}</kernel>
    <initrd>{escape(str(self.kit.initramfs))}</initrd>
    <cmdline>{escape(self.cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum' check='none'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")}</emulator>{disks}
    <filesystem type='mount' accessmode='squash' multidevs='remap'>
      <source dir='/'/>
      <target dir='{HOSTROOT_TAG}'/>
      <readonly/>
    </filesystem>
    <filesystem type='mount' accessmode='squash'>
      <source dir={quoteattr(str(self.xfer))}/>
      <target dir='{XFER_TAG}'/>
    </filesystem>{ports}
    <serial type='file'>
      <source path={quoteattr(str(self.console_log))}/>
      <target port='0'/>
    </serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


# -- running a guest -----------------------------------------------------------------------


@dataclass(frozen=True)
class GuestResult:
    """What the guest's script did."""

    returncode: int
    output: str
    console: str
    seconds: float


class Guest(ABC):
    """Common half of a running guest: the ``xfer`` share as a mailbox."""

    def __init__(self, spec: GuestSpec) -> None:
        self.spec = spec
        self.started = 0.0

    @property
    def xfer(self) -> Path:
        return self.spec.xfer

    @abstractmethod
    def is_running(self) -> bool:
        """True while the guest's QEMU process runs."""

    def signal(self, name: str, content: str = "") -> None:
        """Leave file ``name`` for the guest script (written atomically)."""
        tmp = self.xfer / f".{name}.tmp"
        tmp.write_text(content)
        tmp.rename(self.xfer / name)

    def wait_for(self, name: str, timeout: float) -> str:
        """Wait until the guest script writes file ``name``; return its content."""
        path = self.xfer / name
        deadline = time.monotonic() + timeout
        while not path.exists():
            if (self.xfer / "rc").exists() or not self.is_running():
                raise GuestError(f"guest ended before it wrote {name}:\n{self.describe()}")
            if time.monotonic() > deadline:
                raise GuestError(f"guest did not write {name} within {timeout:.0f}s:\n{self.describe()}")
            time.sleep(0.05)
        return path.read_text()

    def result(self) -> GuestResult:
        rc_file = self.xfer / "rc"
        rc = int(rc_file.read_text().strip()) if rc_file.exists() else -1
        return GuestResult(
            returncode=rc,
            output=_read(self.xfer / "output"),
            console=_read(self.spec.console_log),
            seconds=time.monotonic() - self.started,
        )

    def describe(self) -> str:
        res = self.result()
        return (
            f"script exit {res.returncode}\n--- output\n{res.output[-4000:]}\n"
            f"--- console\n{res.console[-3000:]}"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class QemuGuest(Guest):
    """The guest run by ``qemu-system-x86_64`` directly, with a QMP socket."""

    def __init__(self, spec: GuestSpec) -> None:
        super().__init__(spec)
        self.qmp_socket = spec.workdir / "qmp.sock"
        self.qemu_log = spec.workdir / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> QemuGuest:
        require_tool("qemu-system-x86_64")
        self.spec.prepare()
        self.qmp_socket.unlink(missing_ok=True)
        self.started = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self.proc = subprocess.Popen(
                self.spec.qemu_argv(self.qmp_socket),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self.qmp_socket.exists():
            if self.proc.poll() is not None:
                raise GuestError(f"qemu-system-x86_64 exited {self.proc.returncode}: {_read(self.qemu_log)}")
            if time.monotonic() > deadline:
                raise GuestError("qemu-system-x86_64 did not create its QMP socket within 30s")
            time.sleep(0.02)
        return self

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> GuestResult:
        """Wait for the guest to power off; kill it and raise after ``timeout``."""
        assert self.proc is not None, "start() first"
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestError(f"guest still running after {timeout:.0f}s; killed\n{self.describe()}") from None
        return self.result()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> QemuGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class LibvirtGuest(Guest):
    """The guest as a transient libvirt domain (QEMU started by libvirtd)."""

    def __init__(self, spec: GuestSpec, conn: object, name: str) -> None:
        super().__init__(spec)
        self.conn = conn
        self.name = name
        self.domain: object | None = None

    def start(self) -> LibvirtGuest:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
        self.spec.prepare()
        for p in self.spec.ports:
            p.socket.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.domain = self.conn.createXML(self.spec.libvirt_xml(self.name), 0)  # type: ignore[attr-defined]
        return self

    def is_running(self) -> bool:
        import libvirt

        try:
            return bool(self.domain is not None and self.domain.isActive())  # type: ignore[attr-defined]
        except libvirt.libvirtError:
            return False  # a transient domain is gone once it powers off

    def wait(self, timeout: float) -> GuestResult:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                self.kill()
                raise GuestError(f"guest still running after {timeout:.0f}s; destroyed\n{self.describe()}")
            time.sleep(0.1)
        return self.result()

    def kill(self) -> None:
        import libvirt

        if self.domain is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.domain.destroy()  # type: ignore[attr-defined]

    def __enter__(self) -> LibvirtGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# -- images for data disks -----------------------------------------------------------------


def make_ext4_image(path: str | os.PathLike[str], size: int, fmt: str = "qcow2", *, label: str = "") -> Path:
    """A ``fmt`` image (qcow2, raw, or dynamic VHD ``vpc``) of ``size`` bytes holding an
    empty ext4, made with mkfs.ext4 on a sparse raw file and converted by qemu-img."""
    require_tool("mkfs.ext4", "qemu-img")
    path = Path(path)
    raw = path if fmt == "raw" else path.with_suffix(".build.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    # Whole journal and inode tables written now, not lazily by the running guest: the
    # tests then see the guest's own writes and deletes, not mkfs's deferred ones.
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
         *(["-L", label] if label else []), str(raw)])  # fmt: skip
    if fmt != "raw":
        options = ["-o", "subformat=dynamic"] if fmt == "vpc" else []
        run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(raw), str(path)])
        raw.unlink()
    return path


@contextlib.contextmanager
def running_guest(spec: GuestSpec) -> Iterator[QemuGuest]:
    """A started :class:`QemuGuest`, killed on exit."""
    require_root()
    guest = QemuGuest(spec)
    try:
        yield guest.start()
    finally:
        guest.kill()


# -- the end-to-end scenario -------------------------------------------------------------------

#: The guest side of the scenario (a file of the checkout, run by the guest's Python).
WORKLOAD = CHECKOUT / "tests" / "guest" / "workload.py"
#: How the guest gives space back: vmreclaim's agent and host daemon, one ``fstrim``
#: after the workload, or ``mount -o discard`` (the last two need discard=unmap).
MODES = ("vmreclaim", "fstrim", "discard-mount")
MiB = 1024 * 1024


@dataclass
class ScenarioResult:
    """What one run of the scenario measured (bytes, seconds)."""

    mode: str
    format: str
    backend: str
    image: Path
    deleted_bytes: int
    allocated_before: int
    allocated_after: int
    #: Seconds from the guest's ``sync`` after the deletions to the image giving back
    #: ``target`` of them; ``None`` if it never did within the bound.
    latency_seconds: float | None
    write_seconds: float
    delete_seconds: float
    trim_seconds: float | None
    checker: dict[str, object]
    guest: GuestResult
    host_log: str = ""

    @property
    def freed_bytes(self) -> int:
        return self.allocated_before - self.allocated_after


def run_scenario(
    kit: GuestKit,
    workdir: Path,
    *,
    fmt: str = "qcow2",
    backend: str = "qemu",
    mode: str = "vmreclaim",
    n_files: int = 6,
    file_mib: int = 16,
    disk_mib: int = 256,
    target: float = 0.99,
    bound_seconds: float = 90.0,
    discard: bool | None = None,
    libvirt_uri: str = "qemu:///system",
    checker_interval: float = 0.05,
    settle_seconds: float = 0.0,
) -> ScenarioResult:
    """Boot a guest with one ext4 data disk of ``fmt``, write ``n_files`` files of
    ``file_mib`` MiB while a checker process rewrites and verifies files of its own,
    delete them, and measure how soon and how much the image file shrinks.

    ``mode`` is ``vmreclaim`` (the checkout's agent in the guest, ``vmreclaim host``
    with the ``backend`` hypervisor driver on the host), ``fstrim`` or
    ``discard-mount``. ``discard`` (default: on for qcow2 and the two guest-side
    modes) sets the disk's discard=unmap. Waiting stops once ``target`` of the deleted
    bytes are freed or after ``bound_seconds``.
    """
    import json

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if backend not in ("qemu", "libvirt"):
        raise ValueError(f"backend {backend!r} is not qemu or libvirt")
    workdir.mkdir(parents=True, exist_ok=True)
    suffix = {"qcow2": "qcow2", "raw": "raw", "vpc": "vhd"}[fmt]
    image = make_ext4_image(workdir / f"disk0.{suffix}", disk_mib * MiB, fmt)
    if discard is None:
        discard = mode != "vmreclaim" or fmt == "qcow2"
    port = GuestPort(workdir / "channel.sock")
    mount_opts = "-o discard" if mode == "discard-mount" else ""
    agent = mode == "vmreclaim"
    script = f"""
mkdir -p /mnt/d0 /var/lib/vmreclaim-agent
mount -t ext4 {mount_opts} /dev/vda /mnt/d0 || exit 10
{"$PYTHON -m vmreclaim agent --config /xfer/agent.yaml > /xfer/agent.log 2>&1 & AGENT=$!" if agent else ""}
$PYTHON {WORKLOAD} /mnt/d0 /xfer {n_files} {file_mib} {"--fstrim" if mode == "fstrim" else ""}
rc=$?
{'kill -TERM "$AGENT"; wait "$AGENT" || echo "agent exited $?"' if agent else ""}
umount /mnt/d0 || rc=11
exit $rc
"""
    spec = GuestSpec(
        kit,
        workdir,
        script,
        disks=[GuestDisk(image, fmt, "disk0", discard)],
        ports=[port] if agent else [],
        env={"CHECKER_INTERVAL": str(checker_interval)},
    )
    name = f"vmr-e2e-{fmt}-{uuidlib.uuid4().hex[:8]}"
    guest: Guest
    conn = None
    if backend == "libvirt":
        import libvirt

        conn = libvirt.open(libvirt_uri)
        guest = LibvirtGuest(spec, conn, name)
    else:
        guest = QemuGuest(spec)
    host = None
    try:
        guest.start()
        if agent:
            (spec.xfer / "agent.yaml").write_text(
                f"transport: {{driver: virtio-serial, name: {CHANNEL_NAME}}}\n"
                "filesystems: [{mount: /mnt/d0, disk: disk0}]\n"
                "spool: /var/lib/vmreclaim-agent/spool\n"
                "report_existing_free_space: false\n"
            )
            host = _start_host(workdir, backend, name, guest, libvirt_uri)
            # "connected" alone is the host's end of the port; the agent has spoken (and
            # taken its baseline of free space) once its hello named it.
            host.wait_for(
                lambda doc: any(
                    (vm.get("agent") or {}).get("connected") and (vm.get("agent") or {}).get("agent")
                    for vm in doc["vms"]
                ),
                timeout=120,
                what="the guest agent's hello",
            )
        guest.wait_for("checker-ready", timeout=120)
        guest.signal("go")
        written = json.loads(guest.wait_for("written", timeout=300))
        before = allocated_bytes(image)
        guest.signal("delete")
        deleted = json.loads(guest.wait_for("deleted", timeout=300))
        # Counted from the end of the deletions' sync: an fstrim run after it is part of
        # the wait (the guest reports how long it took).
        synced_at = time.monotonic() - float(deleted.get("trim_seconds") or 0.0)
        goal = target * deleted["bytes"]
        latency = None
        while time.monotonic() - synced_at < bound_seconds:
            if before - allocated_bytes(image) >= goal:
                latency = time.monotonic() - synced_at
                break
            time.sleep(0.05)
        # Bytes freed are read ``settle_seconds`` later (or at the bound): what is
        # still given back after the goal counts too.
        time.sleep(settle_seconds if latency is not None else 0.0)
        after = allocated_bytes(image)
        guest.signal("stop")
        checker = json.loads(guest.wait_for("checker", timeout=120))
        result = guest.wait(120)
        return ScenarioResult(
            mode=mode,
            format=fmt,
            backend=backend if agent else "-",
            image=image,
            deleted_bytes=int(deleted["bytes"]),
            allocated_before=before,
            allocated_after=after,
            latency_seconds=latency,
            write_seconds=float(written["seconds"]),
            delete_seconds=float(deleted["seconds"]),
            trim_seconds=deleted.get("trim_seconds"),
            checker=checker,
            guest=result,
            host_log=host.logs() if host is not None else "",
        )
    finally:
        guest.kill()
        if host is not None:
            host.stop()
        if conn is not None:
            conn.close()


def _start_host(workdir: Path, backend: str, name: str, guest: Guest, libvirt_uri: str) -> HostProcess:
    import yaml

    from vmreclaim.testing.host import HostProcess

    if backend == "libvirt":
        hypervisor: dict[str, object] = {"driver": "libvirt", "uri": libvirt_uri, "domains": [name]}
    else:
        assert isinstance(guest, QemuGuest)
        hypervisor = {"driver": "qemu", "vms": [{"name": name, "qmp": str(guest.qmp_socket)}]}
    config = workdir / "host.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "hypervisor": hypervisor,
                "policy": {"driver": "always"},
                "database": str(workdir / "host.sqlite"),
                "status_socket": str(workdir / "status.sock"),
                "reclaim": {"tick_seconds": 0.5, "rescan_seconds": 2},
                "log_level": "debug",
            },
            sort_keys=False,
        )
    )
    return HostProcess(config, log_path=workdir / "host.log").start()


# -- libvirtd for tests --------------------------------------------------------------------


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _libvirt_answers(uri: str) -> bool:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        return False
    return True


@contextlib.contextmanager
def system_libvirtd(uri: str = "qemu:///system", timeout: float = 30.0) -> Iterator[str]:
    """A libvirtd answering ``uri``: the one already running, or ``virtlogd -d`` and
    ``libvirtd -d`` started here (no systemd) and stopped again on exit.

    Only daemons this call started are stopped, by the pid in their pid file.
    """
    require_root()
    require_tool("libvirtd", "virtlogd")
    if _libvirt_answers(uri):
        yield uri
        return
    started: list[int] = []
    try:
        if _pid_alive(Path("/run/virtlogd.pid")) is None:
            run(["virtlogd", "-d"])
            pid = _wait_pid(Path("/run/virtlogd.pid"), timeout)
            started.append(pid)
        run(["libvirtd", "-d"])
        started.append(_wait_pid(Path("/run/libvirtd.pid"), timeout))
        deadline = time.monotonic() + timeout
        while not _libvirt_answers(uri):
            if time.monotonic() > deadline:
                raise GuestError(f"libvirtd did not answer {uri} within {timeout:.0f}s")
            time.sleep(0.1)
        yield uri
    finally:
        for pid in reversed(started):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.05)


def _wait_pid(pidfile: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        pid = _pid_alive(pidfile)
        if pid is not None:
            return pid
        if time.monotonic() > deadline:
            raise GuestError(f"{pidfile} did not name a live process within {timeout:.0f}s")
        time.sleep(0.05)


__all__ = [
    "CHANNEL_NAME",
    "MODES",
    "Guest",
    "GuestDisk",
    "GuestError",
    "GuestKit",
    "GuestPort",
    "GuestResult",
    "GuestSpec",
    "LibvirtGuest",
    "QemuGuest",
    "ScenarioResult",
    "allocated_bytes",
    "build_kit",
    "installed_kernel",
    "make_ext4_image",
    "run_scenario",
    "running_guest",
    "system_libvirtd",
]
