"""Opening images: pick the format driver (by name or by probing) and parse the file."""

from __future__ import annotations

import os
from pathlib import Path

from vmreclaim.core import loader
from vmreclaim.core.driver import AUTO
from vmreclaim.core.errors import CorruptImageError, UnsupportedImageError
from vmreclaim.core.formats import Image, ImageFile, ImageFormat

#: A backing chain deeper than this is treated as a loop (QEMU's limit is similar).
MAX_BACKING_DEPTH = 64


def detect_format(file: ImageFile) -> str:
    """The name of the installed format driver most sure that ``file`` is its format."""
    scores = {name: fmt.probe(file) for name, fmt in loader.load_all("formats", ImageFormat).items()}
    best = max(scores.items(), key=lambda kv: kv[1], default=(None, 0))
    if best[0] is None or best[1] <= 0:
        raise UnsupportedImageError(f"{file.path}: no installed format driver recognises this file")
    return best[0]


def open_image(path: str | os.PathLike[str], format: str = AUTO) -> Image:
    """Open ``path`` read-only as ``format`` (``auto``: probe), backing chain included."""
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
