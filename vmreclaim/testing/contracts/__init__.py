"""Contract test suites, one per plugin kind (STYLE.md point 17).

Each is a class whose ``test_*`` methods pytest runs once it is subclassed as
``Test<Something>`` in a test module, with the driver's entry-point name set. The
project runs its own drivers through the same classes a third-party author uses.
"""

from vmreclaim.testing.contracts.captures import CaptureContract
from vmreclaim.testing.contracts.filesystems import FilesystemContract
from vmreclaim.testing.contracts.formats import FormatContract
from vmreclaim.testing.contracts.hypervisors import HypervisorContract
from vmreclaim.testing.contracts.policies import PolicyContract
from vmreclaim.testing.contracts.transports import TransportContract

__all__ = [
    "CaptureContract",
    "FilesystemContract",
    "FormatContract",
    "HypervisorContract",
    "PolicyContract",
    "TransportContract",
]
