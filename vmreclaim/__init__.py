"""vmreclaim: give back to the host the space that files deleted inside VMs hold in their images.

Plugin authors need only ``from vmreclaim import hookimpl`` for hooks, and the base class
of their driver kind from :mod:`vmreclaim.core` for drivers.
"""

from vmreclaim.core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
