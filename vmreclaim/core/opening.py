"""Opening images: pick the format driver (by name or by probing) and parse the file.

Who may name a format decides which files a punch can reach (DESIGN.md section 4, rule
6, and section 8 "Formats for writing"). A format named by the operator (config,
``--format``) or by the hypervisor (libvirt XML, QEMU's block graph) makes the image's
header trusted: the guest cannot write it, so the backing and data files it names are
the hypervisor's. A *probed* format is read from bytes the guest may have written — a
raw disk whose first sector holds a qcow2 header naming the next VM's image as its
"external data file". So an image opened with a probed format follows no backing or
data file unless the caller only reads (``writing=False``: ``image info``, ``image
map``); every other caller gets a single file or an :class:`UnsupportedImageError` that
says how to name the format.

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
from vmreclaim.core.driver import AUTO
from vmreclaim.core.errors import CorruptImageError, DriverError, UnsupportedImageError, UsageError
from vmreclaim.core.formats import Image, ImageFile, ImageFormat
from vmreclaim.core.policies import StorageState

#: A backing chain deeper than this is treated as a loop (QEMU's limit is similar).
MAX_BACKING_DEPTH = 64


def detect_format(file: ImageFile) -> str:
    """The name of the installed format driver most sure that ``file`` is its format.

    Every installed driver must load: one that fails to import would silently hand its
    files to the catch-all raw driver (which punches a qcow2 header as "data"), so its
    import error is raised instead (:class:`~vmreclaim.core.errors.DriverLoadError`).
    """
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


def open_image(path: str | os.PathLike[str], format: str = AUTO, *, writing: bool = True) -> Image:
    """Open ``path`` read-only as ``format`` (``auto``: probe), backing chain included.

    ``writing`` (the default) says the caller may punch what it learns: then a probed
    format follows no file its header names. Only pure readers pass ``writing=False``.
    A name with a named-image driver's prefix (``rbd:...``) is opened by that driver:
    the operator named its format by naming it so, and it has no files to follow.
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
    path = Path(path)
    return _open(path, format, chain=(), follow=format != AUTO or not writing, top=path)


class _Opener:
    """The core's :class:`~vmreclaim.core.formats.ImageOpener` for one image."""

    def __init__(self, path: Path, name: str, chain: tuple[Path, ...], follow: bool, top: Path) -> None:
        self.path = path
        self.name = name
        self.chain = chain
        self.follow = follow
        self.top = top

    def _refuse(self, what: str, target: Path) -> UnsupportedImageError:
        return UnsupportedImageError(
            f"{self.top}: the format {self.name!r} was detected from the image's own bytes, which "
            f"a guest can write, and it names the {what} {str(target)!r}; a writing command follows "
            "no file named by guest-writable bytes. Name the format: --format raw (config "
            f"`format: raw`) if this is a raw disk, or --format {self.name} if you know it is a "
            f"{self.name} image with that {what}"
        )

    def __call__(self, path: Path, format: str) -> Image:
        if not self.follow:
            raise self._refuse("backing file", path)
        # A backing image's own format comes from the header of a trusted image (or is
        # probed, as QEMU does); it is only ever read, never punched.
        return _open(path, format or AUTO, (*self.chain, self.path.resolve()), True, self.top)

    def data_file(self, path: Path) -> ImageFile:
        if not self.follow:
            raise self._refuse("external data file", path)
        return ImageFile(path)


def _open(path: Path, format: str, chain: tuple[Path, ...], follow: bool, top: Path) -> Image:
    real = path.resolve()
    if real in chain:
        raise CorruptImageError(f"{chain[0]}: backing chain loops back to {path}")
    if len(chain) >= MAX_BACKING_DEPTH:
        raise CorruptImageError(f"{chain[0]}: backing chain deeper than {MAX_BACKING_DEPTH}")
    file = ImageFile(path)
    try:
        name = detect_format(file) if format == AUTO else format
        driver = loader.load_driver("formats", name, ImageFormat)
        image = driver.open(file, _Opener(path, name, chain, follow, top))
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


__all__ = [
    "AUTO",
    "MAX_BACKING_DEPTH",
    "detect_format",
    "image_size",
    "named_format",
    "open_image",
    "storage_state",
]
