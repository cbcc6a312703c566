"""Reading compressed qcow2 clusters (deflate or zstd), for offline readers only:
compressed clusters are never punched, but ``image sparsify`` reads the guest
filesystems stored in them."""

from __future__ import annotations

import zlib
from pathlib import Path

from vmreclaim.core.errors import CorruptImageError, UnsupportedImageError
from vmreclaim.core.formats import ImageFile
from vmreclaim.plugins.formats.qcow2.header import Header


def decompress(file: ImageFile, header: Header, entry: int, cluster: int) -> bytes:
    """The guest bytes of compressed guest ``cluster`` from its L2 ``entry``."""
    cs, cb = header.cluster_size, header.cluster_bits
    nb_bits = cb - 8
    shift = 62 - nb_bits
    coff = entry & ((1 << shift) - 1)
    nsec = ((entry >> shift) & ((1 << nb_bits) - 1)) + 1
    end = min((coff & ~511) + nsec * 512, file.size)
    where = f"compressed guest cluster {cluster} (host {coff:#x})"
    if coff >= end:
        raise CorruptImageError(f"{file.path}: qcow2 {where} lies past end of file")
    raw = file.read(coff, end - coff, f"qcow2 {where}")
    if header.compression_type == 1:
        data = _zstd_decompress(raw, cs, file.path, where)
    else:
        try:
            d = zlib.decompressobj(-15)
            data = d.decompress(raw, cs)
        except zlib.error as exc:
            raise CorruptImageError(f"{file.path}: qcow2 {where}: bad deflate data: {exc}") from exc
    if len(data) != cs:
        raise CorruptImageError(f"{file.path}: qcow2 {where} decompresses to {len(data)} bytes, not {cs}")
    return data


def _zstd_decompress(raw: bytes, size: int, path: Path, where: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise UnsupportedImageError(
            f"{path}: qcow2 {where} is zstd-compressed; reading it needs the Python module "
            "'zstandard' (pip install zstandard)"
        ) from None
    import io

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=False)
        return bytes(reader.read(size))
    except zstandard.ZstdError as exc:
        raise CorruptImageError(f"{path}: qcow2 {where}: bad zstd data: {exc}") from exc
