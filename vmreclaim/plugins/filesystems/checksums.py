"""The checksums ext4 keeps on its metadata, computed for many blocks at once.

ext4 checks its superblock, group descriptors and bitmaps with CRC32C (Castagnoli) when
``metadata_csum`` is on, and its group descriptors with the kernel's CRC16 (the
reflected 0x8005 polynomial, ``lib/crc16.c``) under the older ``uninit_bg``. Both are
the kernel's *raw* forms: the caller passes the initial value and no final inversion
is applied.

Python's standard library has neither. A byte-at-a-time loop in Python would take
seconds on the bitmaps of a large filesystem, so :func:`crc32c_rows` runs one CRC per
row of a 2-D array in parallel, one numpy table lookup per column: a 4 KiB bitmap costs
4096 vector steps however many groups there are.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U32 = npt.NDArray[np.uint32]


def _table(poly: int) -> U32:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(poly), t >> 1).astype(np.uint32)
    return t


_CRC32C = _table(0x82F63B78)
_CRC16 = _table(0xA001)


def _rows(table: U32, seeds: int | U32, rows: npt.NDArray[np.uint8]) -> U32:
    data = np.asarray(rows, dtype=np.uint8)
    if data.ndim == 1:
        data = data.reshape(1, -1)
    crc = np.empty(data.shape[0], dtype=np.uint32)
    crc[:] = seeds
    columns = np.ascontiguousarray(data.T)
    for col in columns:
        crc = table[(crc ^ col) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c_rows(seeds: int | U32, rows: npt.NDArray[np.uint8]) -> U32:
    """Raw CRC32C of each row of ``rows`` (``n × L`` bytes), each from its seed."""
    return _rows(_CRC32C, seeds, rows)


def crc16_rows(seeds: int | U32, rows: npt.NDArray[np.uint8]) -> U32:
    """Raw kernel CRC16 of each row of ``rows``, each from its seed (low 16 bits used)."""
    return _rows(_CRC16, seeds, rows) & np.uint32(0xFFFF)


def crc32c(seed: int, data: bytes) -> int:
    """Raw CRC32C of ``data`` from ``seed`` (the kernel's ``ext4_chksum``)."""
    return int(crc32c_rows(seed, np.frombuffer(data, dtype=np.uint8))[0])


def crc16(seed: int, data: bytes) -> int:
    """Raw kernel CRC16 of ``data`` from ``seed``."""
    return int(crc16_rows(seed, np.frombuffer(data, dtype=np.uint8))[0])
