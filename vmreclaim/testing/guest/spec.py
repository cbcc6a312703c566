"""What a guest is made of: its disks, its virtio-serial ports, its script, and the
QEMU command line or libvirt domain XML that runs it."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import vmreclaim
from vmreclaim.testing.guest.kit import GuestKit

#: The 9p tags of the two shares.
HOSTROOT_TAG = "hostroot"
XFER_TAG = "xfer"
#: The virtio-serial port name the vmreclaim agent uses by default.
CHANNEL_NAME = "org.vmreclaim.0"
#: The host root spans several filesystems (/proc, /sys, ...): remap their inode numbers
#: or the guest sees one directory where another should be.
_VIRTFS_OPTIONS = "security_model=none,multidevs=remap"
#: Where the project checkout lives: the guest puts it first on ``PYTHONPATH``.
#: The directory holding the ``vmreclaim`` package (a checkout or site-packages): the
#: guest puts it first on ``PYTHONPATH``, so it runs the same vmreclaim as the host.
PACKAGE_ROOT = Path(vmreclaim.__file__).resolve().parents[1]

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
            "PYTHONPATH": str(PACKAGE_ROOT),
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
