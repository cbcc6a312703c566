"""The ``qcow2`` format driver: recognise a qcow2 file and open it with the files it names.

The header names a backing file and perhaps an external data file; both are resolved
here as QEMU resolves them (relative to the image's directory), and refused when they
are not local files, name the image itself or name each other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vmreclaim.core.errors import (
    CorruptImageError,
    DriverError,
    ImageError,
    UnsupportedImageError,
    UsageError,
)
from vmreclaim.core.formats import FormatCapabilities, Image, ImageFile, ImageFormat, ImageOpener
from vmreclaim.plugins.formats.qcow2 import header as hdr
from vmreclaim.plugins.formats.qcow2.image import Qcow2Image


class Qcow2Format(ImageFormat):
    """Driver ``qcow2``: QEMU's copy-on-write format, versions 2 and 3."""

    capabilities = FormatCapabilities(backing_files=True, deep_reclaim=True)

    def probe(self, file: ImageFile) -> int:
        if file.size < 4:
            return 0
        return 100 if file.read(0, 4, "qcow2 magic") == hdr.MAGIC else 0

    def open(self, file: ImageFile, opener: ImageOpener) -> Image:
        h = hdr.parse_header(file)
        directory = file.path.parent
        data_file = None
        if h.data_file is not None:
            data_path = _resolve(directory, h.data_file, file.path, "external data file")
            if data_path.resolve() == file.path.resolve():
                raise CorruptImageError(f"{file.path}: qcow2 external data file names the image itself")
            try:
                data_file = opener.data_file(data_path)
            except UsageError as exc:
                raise UnsupportedImageError(
                    f"{file.path}: qcow2 external data file {h.data_file!r} cannot be opened: {exc}"
                ) from exc
        try:
            image = Qcow2Image(file, h, data_file)
            if h.backing_file is not None:
                backing_path = _resolve(directory, h.backing_file, file.path, "backing file")
                if data_file is not None and backing_path.resolve() == data_file.path.resolve():
                    raise CorruptImageError(
                        f"{file.path}: qcow2 backing file and external data file are the same file"
                    )
                try:
                    image.backing = opener(backing_path, h.backing_format or "")
                except (UsageError, ImageError, DriverError) as exc:
                    raise UnsupportedImageError(
                        f"{file.path}: qcow2 backing file {h.backing_file!r} cannot be opened: {exc}"
                    ) from exc
            return image
        except BaseException:
            if data_file is not None:
                data_file.close()
            raise


def _resolve(directory: Path, name: str, image: Path, what: str) -> Path:
    """A file named in an image header, relative to the image's directory as QEMU does."""
    if "\0" in name or not name:
        raise CorruptImageError(f"{image}: qcow2 {what} name {name!r} is empty or has a NUL byte")
    protocol = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", name) is not None and not os.path.exists(name)
    if name.startswith("json:") or protocol:
        raise UnsupportedImageError(f"{image}: qcow2 {what} {name!r} is not a local file")
    path = Path(name)
    return path if path.is_absolute() else directory / path
