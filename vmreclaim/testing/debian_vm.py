"""A Debian 12 guest built the way an operator builds one, for tests that need a real VM.

Unlike the guest kit (:mod:`vmreclaim.testing.guest`: the host's root over 9p), this
guest has its own root filesystem on its own virtual disk — ext4 on ``/dev/vda1`` of a
partitioned qcow2 — so freezing the filesystem the agent itself runs from, journald,
systemd and a real boot are all exercised. It is built with:

1. ``debootstrap`` (Debian's mirror, the one apt uses) into a directory: systemd, udev,
   Debian's ``linux-image-amd64``, ``python3-venv`` and ``qemu-guest-agent`` (the test
   drives the guest through qemu-ga, as an operator's tooling would);
2. the agent installed as ``docs/deploy.md`` says: the vmreclaim wheel and its
   dependencies downloaded on the host (``pip download``), installed offline in a chroot
   into the venv ``/opt/vmreclaim``, ``/usr/local/bin/vmreclaim`` linked to it, the
   shipped agent config and systemd unit, the unit enabled;
3. ``mkfs.ext4 -d`` of that tree into the partition (no loop device or mount needed),
   an MBR written by ``sfdisk``, and ``qemu-img convert`` to a 4 GiB qcow2.

The kernel and initramfs are copied out of the image's own ``/boot`` and booted
directly by libvirt (``<kernel>``/``<initrd>``): no boot loader, which the host daemon
never sees anyway.

Building takes minutes (the download and the initramfs), so results are cached in a
directory, keyed on every input: the debootstrap stage on the suite, mirror and package
list; the image on that plus the bytes of every wheel, the agent config, the unit and
this module's build recipe version. A test copies the cached qcow2 before booting it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmreclaim.testing.helpers import require_root, require_tool

#: Bump when the recipe below changes in a way the inputs do not show.
RECIPE_VERSION = 1
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "kmod",
    "e2fsprogs",
    "procps",
    "python3",
    "python3-venv",
    "qemu-guest-agent",
)
DISK_SIZE = 4 * 1024**3
PARTITION_START = 1024 * 1024
#: The agent's venv in the guest (docs/deploy.md).
AGENT_VENV = "/opt/vmreclaim"
GUEST_PYTHON = ("3.11", "cp311")  # Debian 12's python3
DEFAULT_CACHE = Path(os.environ.get("VMRECLAIM_IMAGE_CACHE", "/var/tmp/vmreclaim-images"))


class ImageBuildError(AssertionError):
    """A step of the image build failed; the message names the step and its output."""


@dataclass(frozen=True)
class DebianImage:
    """A built guest: its qcow2 (copy it before use), kernel and initramfs."""

    qcow2: Path
    kernel: Path
    initrd: Path
    #: Seconds the build took (0 when it came from the cache).
    build_seconds: float
    cached: bool


def _run(argv: Sequence[str], what: str, *, cwd: Path | None = None, timeout: float = 1800) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{what}: {' '.join(argv)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def _wheel_digest(wheel: Path) -> str:
    """A wheel's name and member contents: a wheel rebuilt from the same tree has new zip
    timestamps but the same digest, so the cache still hits."""
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(zf.namelist())
        return _digest(wheel.name.encode(), *(m.encode() + zf.read(m) for m in members))


def build_wheelhouse(project: Path, dest: Path) -> Path:
    """The vmreclaim wheel and every dependency, for Debian 12's Python (``pip download``
    for another interpreter and platform: binary wheels only), in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(project)],
        "build wheel",
    )
    (wheel,) = dest.glob("vmreclaim-*.whl")
    version, abi = GUEST_PYTHON
    platforms = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"]
    _run(
        [sys.executable, "-m", "pip", "download", "-q", "-d", str(dest), "--only-binary=:all:"]
        + [arg for p in platforms for arg in ("--platform", p)]
        + ["--python-version", version, "--implementation", "cp", "--abi", abi, str(wheel)],
        "download dependencies",
    )
    return dest


@contextlib.contextmanager
def _scratch(cache: Path, name: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _debootstrap(cache: Path) -> Path:
    """The debootstrapped tree as a tarball (ownership kept), cached on its inputs."""
    key = _digest(SUITE.encode(), MIRROR.encode(), ",".join(PACKAGES).encode(), b"minbase")
    tarball = cache / f"debootstrap-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    require_tool("debootstrap")
    with _scratch(cache, "debootstrap") as work:
        root = work / "root"
        _run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
            "debootstrap",
        )
        partial = tarball.with_suffix(".partial")
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."], "tar rootfs")
        partial.rename(tarball)
    return tarball


def _chroot(root: Path, *argv: str, what: str) -> str:
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env_argv = ["env", "-i", path, "LC_ALL=C.UTF-8"]
    return _run(["chroot", str(root), *env_argv, *argv], what)


def install_agent(root: Path, wheelhouse: Path, agent_config: Path, agent_unit: Path) -> None:
    """Install the agent into the guest tree ``root`` as docs/deploy.md says (offline)."""
    wheels = root / "tmp" / "vmreclaim-wheels"
    shutil.copytree(wheelhouse, wheels)
    try:
        # A venv: Debian's python3 is externally managed (PEP 668), and a venv keeps the
        # agent's dependencies from replacing the python3-* packages apt owns.
        _chroot(root, "python3", "-m", "venv", AGENT_VENV, what="create the agent's venv")
        _chroot(
            root,
            f"{AGENT_VENV}/bin/pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            "/tmp/vmreclaim-wheels",
            "vmreclaim",
            what="install the agent",
        )
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    link = root / "usr/local/bin/vmreclaim"
    link.unlink(missing_ok=True)
    link.symlink_to(f"{AGENT_VENV}/bin/vmreclaim")
    (root / "etc/vmreclaim").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(agent_config, root / "etc/vmreclaim/agent.yaml")
    shutil.copyfile(agent_unit, root / "etc/systemd/system/vmreclaim-agent.service")
    _chroot(root, "vmreclaim", "config", "check", "/etc/vmreclaim/agent.yaml", what="check the agent config")
    _chroot(root, "systemctl", "enable", "vmreclaim-agent.service", what="enable the agent unit")


def _configure_system(root: Path) -> None:
    """What an installer would do: fstab, hostname, a serial console, no password prompts."""
    (root / "etc/fstab").write_text("/dev/vda1 / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("vmreclaim-guest\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 vmreclaim-guest\n")
    _chroot(root, "passwd", "-d", "root", what="root without password (console login in a test VM)")
    # getty on ttyS0 comes from systemd's generator for console=ttyS0 on the command line.
    (root / "etc/systemd/journald.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/journald.conf.d/console.conf").write_text("[Journal]\nForwardToConsole=no\n")


def _make_disk(root: Path, out: Path, work: Path) -> None:
    part_size = DISK_SIZE - PARTITION_START
    part = work / "part.ext4"
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(part), f"{part_size // 1024}k"],
        "mkfs.ext4 -d",
    )
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    table = f"label: dos\nstart={PARTITION_START // 512}, type=83, bootable\n"
    proc = subprocess.run(
        ["sfdisk", "-q", str(disk)], input=table, text=True, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise ImageBuildError(f"sfdisk {disk}: {proc.stderr}")
    _run(
        ["dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={PARTITION_START // (1024 * 1024)}",
         "conv=sparse,notrunc", "status=none"],
        "place the partition",
    )  # fmt: skip
    part.unlink()
    _run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(out)], "convert to qcow2")


def build_image(
    wheelhouse: Path,
    agent_config: Path,
    agent_unit: Path,
    cache: Path = DEFAULT_CACHE,
) -> DebianImage:
    """The guest image for these inputs: from ``cache`` if built before, else built now."""
    require_root()
    require_tool("qemu-img", "mkfs.ext4", "sfdisk", "chroot", "tar")
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tarball = _debootstrap(cache)
    wheels = sorted(wheelhouse.glob("*.whl"))
    key = _digest(
        str(RECIPE_VERSION).encode(),
        tarball.name.encode(),
        *(_wheel_digest(w).encode() for w in wheels),
        agent_config.read_bytes(),
        agent_unit.read_bytes(),
    )
    final = cache / f"debian-{SUITE}-{key}"
    image = DebianImage(final / "root.qcow2", final / "vmlinuz", final / "initrd.img", 0.0, True)
    if (final / "done.json").exists():
        return image
    with _scratch(cache, "image") as work:
        root = work / "root"
        root.mkdir()
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-xf", str(tarball)], "unpack rootfs")
        _configure_system(root)
        install_agent(root, wheelhouse, agent_config, agent_unit)
        staged = work / "out"
        staged.mkdir()
        (vmlinuz,) = sorted((root / "boot").glob("vmlinuz-*"))[-1:]
        (initrd,) = sorted((root / "boot").glob("initrd.img-*"))[-1:]
        shutil.copyfile(vmlinuz, staged / "vmlinuz")
        shutil.copyfile(initrd, staged / "initrd.img")
        _make_disk(root, staged / "root.qcow2", work)
        seconds = time.monotonic() - started
        (staged / "done.json").write_text(
            json.dumps({"build_seconds": round(seconds, 1), "kernel": vmlinuz.name})
        )
        shutil.rmtree(final, ignore_errors=True)
        staged.rename(final)
    return DebianImage(image.qcow2, image.kernel, image.initrd, seconds, False)


def domain_xml(
    name: str,
    image: DebianImage,
    disk: Path,
    console_log: Path,
    qga_socket: Path,
    *,
    memory_mib: int = 1024,
    cpus: int = 2,
) -> str:
    """A libvirt TCG domain for the guest: the root qcow2 with libvirt's default
    ``discard='ignore'`` (so the host punches inside a fence), a serial console logged to
    a file, a qemu-ga channel; no vmreclaim channel (``vmreclaim libvirt enable`` adds it)."""
    from xml.sax.saxutils import escape, quoteattr

    emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>root=/dev/vda1 ro console=ttyS0 panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum' check='none'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path={quoteattr(str(qga_socket))}/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


class GuestShell:
    """Commands in the running guest through qemu-ga (``guest-exec``), via libvirt —
    how an operator's tooling reaches a VM without a network."""

    def __init__(self, domain: Any) -> None:
        self.domain = domain

    def command(self, execute: str, arguments: dict[str, Any] | None = None, timeout: int = 10) -> Any:
        import libvirt_qemu

        doc: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            doc["arguments"] = arguments
        return json.loads(libvirt_qemu.qemuAgentCommand(self.domain, json.dumps(doc), timeout, 0))["return"]

    def wait_ready(self, timeout: float) -> float:
        """Wait until qemu-ga answers; return the seconds waited."""
        import libvirt

        started = time.monotonic()
        while True:
            try:
                self.command("guest-ping", timeout=2)
                return time.monotonic() - started
            except libvirt.libvirtError:
                if time.monotonic() - started > timeout:
                    raise
                time.sleep(0.5)

    def spawn(self, script: str) -> int:
        """Start ``sh -c script`` in the guest; its pid (for :meth:`wait`)."""
        ret = self.command("guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True})
        return int(ret["pid"])

    def wait(self, pid: int, timeout: float = 300.0) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.command("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                return int(st.get("exitcode", -1)), out, err
            if time.monotonic() > deadline:
                raise ImageBuildError(f"guest command {pid} still running after {timeout:.0f}s")
            time.sleep(0.1)

    def run(self, script: str, timeout: float = 300.0) -> str:
        """Run ``sh -c script``; its stdout. Raises when it fails."""
        code, out, err = self.wait(self.spawn(script), timeout)
        if code != 0:
            raise ImageBuildError(f"guest: {script!r} exited {code}\n{out[-2000:]}\n{err[-2000:]}")
        return out


__all__ = [
    "AGENT_VENV",
    "DEFAULT_CACHE",
    "DebianImage",
    "GuestShell",
    "ImageBuildError",
    "build_image",
    "build_wheelhouse",
    "domain_xml",
    "install_agent",
]
