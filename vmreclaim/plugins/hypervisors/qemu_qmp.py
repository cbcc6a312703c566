"""What the ``qemu`` hypervisor driver asks a QEMU process, and how it reads the answers.

The QMP queries (``query-block``, ``query-named-block-nodes``, the exports of a storage
daemon, a device's serial, the chardev of the channel port), the disk each block device
is (``Device``: drive, qdev and node names of its chain), and what only the process's
own command line says (``discard=unmap``, a FUSE export's mount point). The driver
(:mod:`vmreclaim.plugins.hypervisors.qemu`) asks; this module answers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from qemu.qmp import ExecuteError, QMPClient

from vmreclaim.core.config import StrictModel
from vmreclaim.core.errors import HypervisorError, VMReclaimError
from vmreclaim.core.model import Disk
from vmreclaim.core.ranges import RangeSet

#: QEMU's block driver names → vmreclaim format driver names.
FORMAT_NAMES = {"vpc": "vhd"}
#: Block drivers that are protocols (the bytes of a file), not image formats.
PROTOCOL_DRIVERS = {"file", "host_device", "host_cdrom"}


class QemuDisk(StrictModel):
    """Overrides for one disk of a QEMU VM, matched by the id QMP gives it."""

    id: str = Field(min_length=1, max_length=256)
    #: Whether QEMU passes this disk's discards to the image; ``auto``: read it from
    #: the QEMU command line.
    discard: bool | Literal["auto"] = "auto"


class QemuVM(StrictModel):
    name: str = Field(min_length=1, max_length=256)
    uuid: str | None = None
    #: QEMU's QMP socket (``-qmp unix:PATH,server=on,wait=off``).
    qmp: Path
    #: The channel, when it cannot be read from QEMU (no virtserialport, a tcp channel).
    channel: dict[str, Any] | None = None
    disks: list[QemuDisk] = Field(default_factory=list)


@dataclass(frozen=True)
class Device:
    """One disk as QEMU names it: for jobs, deep discard and logs."""

    disk: Disk
    names: frozenset[str]  # drive id, qdev id and path, node names of its chain
    qdev: str | None  # QOM path of the device (None for a storage daemon's export)
    node: str  # the top (format) node


@dataclass(frozen=True)
class State:
    status: str
    pid: int | None
    devices: list[Device]
    chardev: str | None


# -- QMP queries -------------------------------------------------------------------------------


async def execute(client: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """``execute`` typed as what QMP returns: JSON of a shape each caller knows."""
    return await client.execute(command, arguments)


async def hmp(client: QMPClient, command: str, disk: Disk) -> None:
    reply = await execute(client, "human-monitor-command", {"command-line": command})
    # HMP reports failures as text, not as QMP errors: any output is a failure.
    if str(reply).strip():
        raise HypervisorError(f"QEMU refused {command!r} on {disk.key}: {str(reply).strip()}")


async def query_devices(client: QMPClient, vm: QemuVM, argv: list[str]) -> list[Device]:
    """Every disk of a QEMU VM (``query-block``) or storage daemon (exported nodes)."""
    nodes = {n["node-name"]: n for n in await execute(client, "query-named-block-nodes", {"flat": True})}
    overrides = {d.id: d.discard for d in vm.disks}
    devices = []
    for dev in await execute(client, "query-block"):
        inserted = dev.get("inserted")
        if not inserted or dev.get("type") == "cdrom" or (dev.get("removable") and not inserted.get("file")):
            continue
        qdev = dev.get("qdev") or None
        drive = str(dev.get("device") or "")
        serial = await _serial(client, qdev) if qdev else None
        qdev_id = _qdev_id(qdev)
        disk_id = serial or qdev_id or drive or str(inserted.get("node-name"))
        devices.append(
            _device(vm, disk_id, serial, qdev_id or drive, inserted, nodes, qdev, drive, argv, overrides)
        )
    if devices:
        return devices
    # A storage daemon: no devices; its exports are its disks.
    for export in await _exports(client):
        node = nodes.get(export.get("node-name", ""))
        if node is None:
            continue
        disk_id = str(export.get("id") or node["node-name"])
        devices.append(_device(vm, disk_id, None, None, node, nodes, None, "", argv, overrides))
    return devices


def _device(
    vm: QemuVM,
    disk_id: str,
    serial: str | None,
    target: str | None,
    top: dict[str, Any],
    nodes: dict[str, dict[str, Any]],
    qdev: str | None,
    drive: str,
    argv: list[str],
    overrides: dict[str, bool | Literal["auto"]],
) -> Device:
    image = top.get("image") or {}
    path = str(image.get("filename") or top.get("file") or "")
    drv = str(top.get("drv", "raw"))
    fmt = "raw" if drv in PROTOCOL_DRIVERS else FORMAT_NAMES.get(drv, drv)
    chain = _chain(top, nodes)
    override = overrides.get(disk_id, "auto")
    discard = discard_from_cmdline(argv, drive, chain) if override == "auto" else override
    names = {disk_id, drive, path, *chain}
    if qdev:
        names |= {qdev, _qdev_id(qdev) or ""}
    names.discard("")
    return Device(
        disk=Disk(
            vm=vm.name,
            id=disk_id,
            path=Path(path),
            format=fmt,
            passes_discards=discard,
            serial=serial,
            target=target,
        ),
        names=frozenset(names),
        qdev=qdev,
        node=str(top.get("node-name", "")),
    )


def _chain(top: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> list[str]:
    """Node names of the top node and the protocol node(s) holding the same file."""
    name = str(top.get("node-name", ""))
    path = top.get("file")
    found = [name] if name else []
    found += [
        n
        for n, node in nodes.items()
        if n != name and node.get("file") == path and node.get("drv") in PROTOCOL_DRIVERS
    ]
    return found


async def _serial(client: QMPClient, qdev: str) -> str | None:
    # The serial is a property of the virtio-blk device, whose QOM path is the
    # backend's parent (``/machine/peripheral/blk0/virtio-backend``).
    for path in (qdev, qdev.rsplit("/", 1)[0]):
        with contextlib.suppress(ExecuteError):
            value = await execute(client, "qom-get", {"path": path, "property": "serial"})
            if isinstance(value, str) and value:
                return value
    return None


def _qdev_id(qdev: str | None) -> str | None:
    """``/machine/peripheral/blk0/virtio-backend`` → ``blk0`` (anonymous devices: None)."""
    if not qdev:
        return None
    parts = qdev.strip("/").split("/")
    if len(parts) >= 3 and parts[1] == "peripheral":
        return parts[2]
    return None


async def _exports(client: QMPClient) -> list[dict[str, Any]]:
    try:
        result: list[dict[str, Any]] = await execute(client, "query-block-exports")
    except ExecuteError:
        return []
    return result


async def channel_chardev(client: QMPClient, name: str) -> str | None:
    """The ``query-chardev`` filename of the virtserialport named ``name``, if any."""
    label = None
    for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            children = await execute(client, "qom-list", {"path": parent})
        except ExecuteError:
            continue
        for child in children:
            if child.get("type") != "child<virtserialport>":
                continue
            path = f"{parent}/{child['name']}"
            if await execute(client, "qom-get", {"path": path, "property": "name"}) == name:
                label = await execute(client, "qom-get", {"path": path, "property": "chardev"})
                break
        if label is not None:
            break
    if label is None:
        return None
    for chardev in await execute(client, "query-chardev"):
        if chardev.get("label") == label:
            return str(chardev.get("filename", ""))
    return None


def fuse_mountpoint(argv: list[str], export_id: str) -> Path | None:
    """The mount point of ``--export type=fuse,id=EXPORT_ID`` on a storage daemon's
    command line (QMP does not tell where a FUSE export is mounted)."""
    for opt, value in itertools.pairwise(argv):
        if opt in ("--export", "-export"):
            props = _options(value)
            if props.get("type") == "fuse" and props.get("id") == export_id and props.get("mountpoint"):
                return Path(str(props["mountpoint"]))
    return None


def discard_through_fuse(mountpoint: Path, disk: Disk, ranges: RangeSet) -> None:
    """QEMU's FUSE export turns ``fallocate(PUNCH_HOLE)`` on its file into a discard of
    the node, so the qcow2 layer releases the clusters itself."""
    from vmreclaim.core.punch import punch_holes

    try:
        fd = os.open(mountpoint, os.O_WRONLY | os.O_CLOEXEC)
        try:
            punch_holes(fd, ranges, path=f"{mountpoint} (FUSE export of {disk.key})")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise HypervisorError(f"discard through FUSE export {mountpoint} of {disk.key}: {exc}") from exc
    except VMReclaimError as exc:
        raise HypervisorError(f"discard through FUSE export of {disk.key}: {exc}") from exc


# -- the QEMU command line (for discard=) --------------------------------------------------------


def as_qemu_opens(path: Path, pid: int, what: str) -> Path:
    """``path`` as QEMU opened it: QEMU resolves a relative file name against its own
    working directory, not ours, and punching the wrong file would destroy data."""
    if path.is_absolute() or not str(path) or str(path) == ".":
        return path
    try:
        if not pid:
            raise OSError("QEMU's process is unknown")
        return Path(os.readlink(f"/proc/{pid}/cwd")) / path
    except OSError as exc:
        raise HypervisorError(
            f"{what}: relative path {str(path)!r} cannot be resolved against QEMU's working "
            f"directory ({exc.strerror or exc})"
        ) from exc


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def discard_from_cmdline(argv: list[str], drive: str, chain: list[str]) -> bool:
    """Whether ``-drive id=DRIVE`` says ``discard=unmap``, or every ``-blockdev`` node of
    ``chain`` does (QEMU needs it on both the format and the protocol node)."""
    blockdevs: dict[str, dict[str, Any]] = {}
    for opt, value in itertools.pairwise(argv):
        if opt in ("-drive", "--drive"):
            props = _options(value)
            if drive and props.get("id") == drive:
                return _unmap(props.get("discard"))
        elif opt in ("-blockdev", "--blockdev"):
            props = _options(value)
            _flatten_blockdev(props, blockdevs)
    if chain and all(n in blockdevs for n in chain):
        return all(_unmap(blockdevs[n].get("discard")) for n in chain)
    return False


def _unmap(value: Any) -> bool:
    return str(value) in ("unmap", "on")


def _options(text: str) -> dict[str, Any]:
    """QEMU's ``key=value,...`` (``,,`` escapes a comma) or JSON option syntax."""
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return doc if isinstance(doc, dict) else {}
    props: dict[str, Any] = {}
    for part in text.replace(",,", "\0").split(","):
        key, _, value = part.partition("=")
        props[key.replace("\0", ",")] = value.replace("\0", ",")
    return props


def _flatten_blockdev(props: dict[str, Any], out: dict[str, dict[str, Any]]) -> None:
    """Node name → options, nested JSON ``file`` nodes included."""
    name = props.get("node-name")
    if isinstance(name, str):
        out[name] = props
    child = props.get("file")
    if isinstance(child, dict):
        _flatten_blockdev(child, out)
