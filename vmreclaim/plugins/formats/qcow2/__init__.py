"""The qcow2 format (versions 2 and 3); the driver lives in :mod:`.image` for now."""

from vmreclaim.plugins.formats.qcow2.image import Qcow2Format

__all__ = ["Qcow2Format"]
