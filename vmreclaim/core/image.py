"""Opening images: pick the format driver (by name or by probing) and parse the file.

An image may also be a *name* that no file holds, as QEMU's protocol prefixes are:
``rbd:pool/image`` is opened by the installed format driver ``rbd`` when that driver
has the ``named_images`` capability. A prefix is read only before the first ``/`` (a
path such as ``./rbd:x`` or ``/srv/rbd:x`` is always a file), and a prefix that names
no such driver leaves the argument a path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vmreclaim.core import loader
from vmreclaim.core.errors import CorruptImageError, DriverError, UnsupportedImageError, UsageError
from vmreclaim.core.formats import Image, ImageFile, ImageFormat
from vmreclaim.core.policies import StorageState

#: ``format: auto`` in configs and the CLI's default: probe every installed driver.
AUTO = "auto"
#: A backing chain deeper than this is treated as a loop (QEMU's limit is similar).
MAX_BACKING_DEPTH = 64


def detect_format(file: ImageFile) -> str:
    """The name of the installed format driver most sure that ``file`` is its format."""
    scores = {name: fmt.probe(file) for name, fmt in loader.load_all("formats", ImageFormat).items()}
    best = max(scores.items(), key=lambda kv: kv[1], default=(None, 0))
    if best[0] is None or best[1] <= 0:
        raise UnsupportedImageError(f"{file.path}: no installed format driver recognises this file")
    return best[0]


_SCHEME = re.compile(r"([a-z][a-z0-9_-]*):")


def named_format(name: str | os.PathLike[str]) -> ImageFormat | None:
    """The driver that opens ``name`` by name (``rbd:pool/image``), or ``None`` (a file)."""
    match = _SCHEME.match(os.fspath(name))
    if match is None or match.group(1) not in loader.names("formats"):
        return None
    try:
        driver = loader.load_driver("formats", match.group(1), ImageFormat)
    except DriverError:
        return None
    return driver if driver.capabilities.named_images else None


def open_image(path: str | os.PathLike[str], format: str = AUTO) -> Image:
    """Open ``path`` read-only as ``format`` (``auto``: probe), backing chain included.

    A name with a named-image driver's prefix (``rbd:...``) is opened by that driver.
    """
    driver = named_format(path)
    if driver is not None:
        name = os.fspath(path)
        wanted = name.split(":", 1)[0]
        if format not in (AUTO, wanted):
            raise UsageError(f"{name}: a {wanted} image cannot be opened as format {format!r}")
        image = driver.open_named(name)
        image.capabilities = driver.capabilities
        return image
    return _open(Path(path), format, chain=())


def _open(path: Path, format: str, chain: tuple[Path, ...]) -> Image:
    real = path.resolve()
    if real in chain:
        raise CorruptImageError(f"{chain[0]}: backing chain loops back to {path}")
    if len(chain) >= MAX_BACKING_DEPTH:
        raise CorruptImageError(f"{chain[0]}: backing chain deeper than {MAX_BACKING_DEPTH}")
    file = ImageFile(path)
    try:
        name = detect_format(file) if format == AUTO else format
        driver = loader.load_driver("formats", name, ImageFormat)

        def open_backing(backing: Path, backing_format: str) -> Image:
            return _open(backing, backing_format or AUTO, (*chain, real))

        image = driver.open(file, open_backing)
        image.capabilities = driver.capabilities
        return image
    except BaseException:
        file.close()
        raise


def storage_state(path: str | os.PathLike[str]) -> StorageState:
    """What the policy weighs for the storage that holds image ``path``.

    A named image whose driver reports its storage's usage (capability
    ``storage_usage``: an RBD pool shared by many hosts) gives that; a file gives the
    host filesystem's ``statvfs``.
    """
    driver = named_format(path)
    if driver is not None and driver.capabilities.storage_usage:
        used, total = driver.storage_usage(os.fspath(path))
        return StorageState(total_bytes=total, free_bytes=max(0, total - used))
    return StorageState.of(path)


def image_size(path: str | os.PathLike[str]) -> int:
    """The size the policy compares deletions with: a named image's virtual size (its
    driver asked), a file's ``st_size``. ``OSError`` or an error of the tree if unreadable."""
    if named_format(path) is not None:
        with open_image(path) as image:
            return image.virtual_size
    return os.stat(path).st_size
