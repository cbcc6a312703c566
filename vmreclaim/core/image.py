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
"""

from __future__ import annotations

import os
from pathlib import Path

from vmreclaim.core import loader
from vmreclaim.core.errors import CorruptImageError, UnsupportedImageError
from vmreclaim.core.formats import Image, ImageFile, ImageFormat

#: ``format: auto`` / no ``--format``: probe every installed driver (reading only).
AUTO = "auto"
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


def open_image(path: str | os.PathLike[str], format: str = AUTO, *, writing: bool = True) -> Image:
    """Open ``path`` read-only as ``format`` (``auto``: probe), backing chain included.

    ``writing`` (the default) says the caller may punch what it learns: then a probed
    format follows no file its header names. Only pure readers pass ``writing=False``.
    """
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


__all__ = ["AUTO", "MAX_BACKING_DEPTH", "detect_format", "open_image"]
