"""The qcow2 format (versions 2 and 3), one idea per module.

* :mod:`.header` — the header, its extensions, snapshots and bitmaps, validated;
* :mod:`.tables` — the L1/L2 tables and the guest → host rows they describe;
* :mod:`.refcounts` — stored refcounts and the census of every reference;
* :mod:`.check` — the ``qemu-img check``-like consistency check before a punch;
* :mod:`.compress` — reading compressed clusters (deflate, zstd);
* :mod:`.deep` — deep discard through ``qemu-io``;
* :mod:`.image` — :class:`Qcow2Image`, the map and the punch checks built from those;
* :mod:`.driver` — :class:`Qcow2Format`, the driver the entry point names.
"""

from vmreclaim.plugins.formats.qcow2.driver import Qcow2Format
from vmreclaim.plugins.formats.qcow2.image import Qcow2Image

__all__ = ["Qcow2Format", "Qcow2Image"]
