"""Partition tables read through the format layer, with ``sfdisk`` as the oracle.

Valid tables (MBR with logical partitions, GPT) must give exactly the partitions sfdisk
reports; damaged or hostile ones must either be read safely (backup GPT, partitions
past the disk end skipped) or refused with a :class:`CorruptImageError` — never a
traceback, never a volume outside the disk.
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmreclaim.core.errors import CorruptImageError, VMReclaimError
from vmreclaim.core.opening import open_image
from vmreclaim.core.volumes import Volume, scan_volumes
from vmreclaim.testing import require_root, require_tool, run

from .disks import MIB, sfdisk_json, write_table

DISK = 256 * MIB


def volumes(path: Path) -> list[Volume]:
    with open_image(path, "raw") as image:
        return scan_volumes(image)


def as_sfdisk(vols: list[Volume]) -> list[tuple[int, int, int]]:
    return sorted((v.number or 0, v.start // 512, v.length // 512) for v in vols)


def sfdisk_parts(disk: Path) -> list[tuple[int, int, int]]:
    parts = []
    for p in sfdisk_json(disk):
        if str(p["type"]) in ("5", "f", "85"):
            continue  # the extended container is not a volume
        number = int(str(p["node"]).rsplit("img", 1)[1])
        parts.append((number, int(p["start"]), int(p["size"])))  # type: ignore[call-overload]
    return sorted(parts)


layouts = st.tuples(
    st.sampled_from(["dos", "gpt"]),
    st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=7),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts)
def test_tables_match_sfdisk(tmp_path: Path, layout: tuple[str, list[int]]) -> None:
    require_tool("sfdisk")
    label, sizes = layout
    lines = [f"label: {label}"]
    if label == "dos" and len(sizes) > 4:
        # Three primaries, then an extended partition holding the rest as logicals.
        lines += [f"size={s}MiB, type=83" for s in sizes[:3]]
        lines.append("type=5")
        lines += [f"size={s}MiB, type=83" for s in sizes[3:]]
    else:
        lines += [f"size={s}MiB, type={'83' if label == 'dos' else 'linux'}" for s in sizes]
    disk = tmp_path / "t.img"
    write_table(disk, DISK, "\n".join(lines) + "\n")
    found = volumes(disk)
    assert as_sfdisk(found) == sfdisk_parts(disk)
    assert all(v.scheme == ("mbr" if label == "dos" else "gpt") for v in found)
    assert all(v.end <= DISK and v.skip_reason is None for v in found)


def test_damaged_primary_gpt_falls_back_to_backup(tmp_path: Path) -> None:
    disk = tmp_path / "t.img"
    write_table(disk, DISK, "label: gpt\nsize=10MiB\nsize=20MiB\n")
    expected = as_sfdisk(volumes(disk))
    with open(disk, "r+b") as f:
        f.seek(512 + 100)
        f.write(b"\xff" * 8)  # inside the header's CRC range
    assert as_sfdisk(volumes(disk)) == expected


def test_both_gpt_headers_damaged_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "t.img"
    write_table(disk, DISK, "label: gpt\nsize=10MiB\n")
    with open(disk, "r+b") as f:
        for lba in (1, DISK // 512 - 1):
            f.seek(lba * 512 + 24)
            f.write(b"\x01" * 8)
    with pytest.raises(CorruptImageError, match="no valid GPT header"):
        volumes(disk)


def test_gpt_entry_array_crc_is_checked(tmp_path: Path) -> None:
    disk = tmp_path / "t.img"
    write_table(disk, DISK, "label: gpt\nsize=10MiB\n")
    expected = as_sfdisk(volumes(disk))
    with open(disk, "r+b") as f:
        f.seek(2 * 512 + 32)  # first entry's starting LBA, in the primary array only
        f.write(struct.pack("<Q", 4096))
    # The primary array fails its CRC: the backup header and array are used.
    assert as_sfdisk(volumes(disk)) == expected
    with open(disk, "r+b") as f:
        f.seek(DISK - 33 * 512 + 32)  # the same field in the backup array
        f.write(struct.pack("<Q", 4096))
    with pytest.raises(CorruptImageError, match="entry array at LBA 2 fails its CRC32"):
        volumes(disk)


def mbr(entries: list[tuple[int, int, int]], size: int = DISK) -> bytes:
    """A disk image's first sector with ``(type, lba, sectors)`` entries."""
    sector = bytearray(512)
    for i, (ptype, lba, count) in enumerate(entries):
        struct.pack_into("<B3xB3xII", sector, 446 + 16 * i, 0, ptype, lba, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def write_disk(path: Path, chunks: dict[int, bytes], size: int = DISK) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
    return path


def test_overlapping_partitions_are_refused(tmp_path: Path) -> None:
    disk = write_disk(tmp_path / "t.img", {0: mbr([(0x83, 2048, 8192), (0x83, 8192, 8192)])})
    with pytest.raises(CorruptImageError, match="overlap"):
        volumes(disk)


def test_partition_past_the_disk_end_is_skipped(tmp_path: Path) -> None:
    disk = write_disk(tmp_path / "t.img", {0: mbr([(0x83, 2048, 8192), (0x83, 16384, DISK // 512)])})
    first, second = volumes(disk)
    assert first.skip_reason is None and first.number == 1
    assert second.number == 2 and "past the end" in (second.skip_reason or "")


def test_looping_extended_chain_is_refused(tmp_path: Path) -> None:
    ebr_at = 2048 * 512
    ebr = bytearray(mbr([(0x83, 2048, 2048), (0x05, 0, 8192)]))  # the link points at itself
    disk = write_disk(tmp_path / "t.img", {0: mbr([(0x05, 2048, 65536)]), ebr_at: bytes(ebr)})
    with pytest.raises(CorruptImageError, match="loops"):
        volumes(disk)


def test_boot_sector_filesystem_is_not_a_table(tmp_path: Path) -> None:
    require_tool("mkfs.vfat")
    disk = tmp_path / "fat.img"
    write_disk(disk, {}, 64 * MIB)
    run(["mkfs.vfat", str(disk)])
    [whole] = volumes(disk)
    assert whole.number is None and whole.length == 64 * MIB


def test_mbr_without_entries_is_the_whole_disk(tmp_path: Path) -> None:
    disk = write_disk(tmp_path / "t.img", {0: mbr([])})
    [whole] = volumes(disk)
    assert whole.number is None and whole.scheme == "none"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    head=st.binary(min_size=446, max_size=446),
    entries=st.binary(min_size=64, max_size=64),
    gpt=st.booleans(),
    tail=st.binary(min_size=0, max_size=1024),
)
def test_hostile_tables_never_escape_the_disk(
    tmp_path: Path, head: bytes, entries: bytes, gpt: bool, tail: bytes
) -> None:
    sector0 = head + entries + b"\x55\xaa"
    chunks = {0: sector0, 512: (b"EFI PART" + tail) if gpt else tail}
    size = 8 * MIB
    disk = write_disk(tmp_path / "h.img", chunks, size)
    try:
        found = volumes(disk)
    except VMReclaimError:
        return  # refused with a message: fine
    for v in found:
        assert v.start >= 0 and v.length >= 0
        assert v.skip_reason is not None or v.end <= size


def test_gpt_header_fields_are_bounded(tmp_path: Path) -> None:
    """A valid-CRC header announcing a huge entry array is refused before reading it."""
    header = bytearray(92)
    struct.pack_into(
        "<8sIIIIQQQQ16sQIII",
        header,
        0,
        b"EFI PART",
        0x10000,
        92,
        0,
        0,
        1,
        DISK // 512 - 1,
        34,
        DISK // 512 - 34,
        b"\0" * 16,
        2,
        10**7,
        128,
        0,
    )
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header)))
    disk = write_disk(tmp_path / "t.img", {0: mbr([(0xEE, 1, DISK // 512 - 1)]), 512: bytes(header)})
    with pytest.raises(CorruptImageError, match="not a valid entry array"):
        volumes(disk)


@pytest.mark.root
def test_lvm_physical_volume_is_detected_and_skipped(tmp_path: Path) -> None:
    require_root()
    require_tool("pvcreate")
    from vmreclaim.testing.linux import loop_device

    disk = tmp_path / "t.img"
    write_table(disk, 64 * MIB, "label: dos\nstart=2048, type=8e\n")
    start = int(sfdisk_json(disk)[0]["start"]) * 512  # type: ignore[call-overload]
    pv = tmp_path / "pv.img"
    write_disk(pv, {}, 64 * MIB - start)
    with loop_device(pv) as dev:
        # No udev, no lvmetad, no device filter state kept: this PV exists only here.
        run(["pvcreate", "-q", "--config", "devices { use_devicesfile = 0 }", str(dev)])
    run(
        [
            "dd",
            f"if={pv}",
            f"of={disk}",
            "bs=1M",
            f"seek={start // MIB}",
            "conv=notrunc,sparse",
            "status=none",
        ]
    )
    [vol] = volumes(disk)
    assert vol.content == "LVM2_member"
    assert vol.skip_reason is not None and "LVM2 physical volume" in vol.skip_reason
    proc = subprocess.run(
        ["vmreclaim", "image", "sparsify", str(disk), "--json", "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "LVM2_member" in proc.stdout
