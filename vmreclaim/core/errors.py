"""The one exception tree of vmreclaim.

Every error a user can meet is a :class:`VMReclaimError`; its class decides the process
exit code of the command-line tool (DESIGN.md section 8). Errors from libraries and the
kernel (``OSError``, libvirt, XenAPI, QMP) are mapped at the driver boundary with
``raise ... from exc`` so that callers only ever catch this tree::

    VMReclaimError                      exit 1  a bug or an unexpected failure
    ├── UsageError                      exit 2  bad command-line input
    │   ├── RangeError                          a guest range that is empty, negative,
    │   │                                       overflowing or outside the disk
    │   ├── ConfigError                         a configuration file that does not validate
    │   └── AgentSetupError                     the agent cannot start: a watched filesystem,
    │                                           its spool or its channel is unusable
    ├── DriverError                     exit 2  a plugin driver cannot be used
    │   ├── DriverNotFoundError                 no driver of that name is installed
    │   └── DriverLoadError                     the driver is installed but fails to import
    ├── ImageBusyError                  exit 3  another process holds the image for writing
    ├── ImageError                      exit 4  the image cannot be handled safely
    │   ├── UnsupportedImageError               a feature we refuse (unknown bits, encryption)
    │   ├── CorruptImageError                   a structure that breaks the format's rules
    │   └── PunchUnsupportedError               the host filesystem cannot punch holes
    ├── ChannelError                    exit 1  a guest/host channel failed (connect, I/O)
    │   └── ProtocolError                       a peer sent a message that breaks the protocol
    ├── FenceError                      exit 1  a fence (freeze, lease) could not be held
    └── HypervisorError                 exit 1  the hypervisor could not be asked
"""

from __future__ import annotations

from typing import ClassVar


class VMReclaimError(Exception):
    """Root of every error vmreclaim raises on purpose."""

    exit_code: ClassVar[int] = 1


class UsageError(VMReclaimError):
    """The caller asked for something that cannot be done as asked."""

    exit_code = 2


class RangeError(UsageError):
    """A byte range that is malformed or lies outside the disk it names."""


class ConfigError(UsageError):
    """A configuration file failed validation.

    ``problems`` holds one ``"FILE:LINE: key.path: problem"`` string per problem, so a
    user sees every mistake of a file at once.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class AgentSetupError(UsageError):
    """The agent cannot start: a configured filesystem, the spool or the channel is
    unusable (the message names which and why); nothing is watched."""


class DriverError(VMReclaimError):
    """A plugin driver cannot be used."""

    exit_code = 2


class DriverNotFoundError(DriverError):
    """No driver of the asked name is installed in the entry-point group."""

    def __init__(self, kind: str, name: str, installed: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.installed = installed
        names = ", ".join(sorted(installed)) or "none"
        super().__init__(f"no {kind} driver named {name!r} is installed (installed: {names})")


class DriverLoadError(DriverError):
    """A driver is installed but its module or class cannot be loaded."""


class ImageBusyError(VMReclaimError):
    """Another process (a running QEMU, say) holds the image open for writing."""

    exit_code = 3


class ImageError(VMReclaimError):
    """The image cannot be handled safely: nothing was changed."""

    exit_code = 4


class UnsupportedImageError(ImageError):
    """The image uses a feature vmreclaim refuses to touch."""


class CorruptImageError(ImageError):
    """A structure of the image breaks its format's rules (bounds, checksums, loops)."""


class PunchUnsupportedError(ImageError):
    """The host filesystem holding the image cannot punch holes (EOPNOTSUPP)."""


class ChannelError(VMReclaimError):
    """A guest/host channel could not be opened, read or written."""


class ProtocolError(ChannelError):
    """A peer sent a message that breaks the wire protocol (docs/protocol.md)."""


class FenceError(VMReclaimError):
    """A fence could not be raised or held until the punch was done."""


class HypervisorError(VMReclaimError):
    """The hypervisor could not be asked about a VM, its disks or its state."""
