"""A real Linux guest built from this machine's own parts, for end-to-end tests.

The guest is QEMU booting Debian's installed kernel (``linux-image-amd64``) directly,
with a small initramfs made here: busybox plus the kernel's own virtio, 9p, overlay,
ext4 and xfs modules (:mod:`~vmreclaim.testing.guest.kit`). Its init mounts the host's
root filesystem read-only over 9p under a tmpfs overlay and runs a shell script in it,
so the guest runs the host's Python and the host's vmreclaim (the checkout or the
installed package, whichever this one is) — nothing is installed into an image. A
second, writable 9p share (``xfer``) carries the script in, and the script's output,
exit status and any files the test and the guest pass each other
(:mod:`~vmreclaim.testing.guest.spec`).

TCG is used (``-accel tcg``): on the reference machine ``/dev/kvm`` is a nested,
paravirtual KVM under which a Linux guest hangs early in boot. Booting the uncompressed
``vmlinux`` (PVH entry) skips the firmware and decompression: a guest runs a Python
one-liner and powers off in about 3 s.

The same guest can be started by QEMU directly (:class:`QemuGuest`, with a QMP socket)
or as a transient libvirt domain (:class:`LibvirtGuest`), so hypervisor drivers are
tested against the real thing (:mod:`~vmreclaim.testing.guest.runners`). The end-to-end
scenario and benchmark that drive a workload in such a guest live in
``bench/guest_scenario.py``.
"""

from vmreclaim.core.punch import allocated_bytes
from vmreclaim.testing.guest.kit import GUEST_MODULES, GuestError, GuestKit, build_kit, installed_kernel
from vmreclaim.testing.guest.runners import (
    Guest,
    GuestResult,
    LibvirtGuest,
    QemuGuest,
    make_ext4_image,
    running_guest,
    system_libvirtd,
)
from vmreclaim.testing.guest.spec import (
    CHANNEL_NAME,
    HOSTROOT_TAG,
    PACKAGE_ROOT,
    XFER_TAG,
    GuestDisk,
    GuestPort,
    GuestSpec,
)

__all__ = [
    "CHANNEL_NAME",
    "GUEST_MODULES",
    "HOSTROOT_TAG",
    "PACKAGE_ROOT",
    "XFER_TAG",
    "Guest",
    "GuestDisk",
    "GuestError",
    "GuestKit",
    "GuestPort",
    "GuestResult",
    "GuestSpec",
    "LibvirtGuest",
    "QemuGuest",
    "allocated_bytes",
    "build_kit",
    "installed_kernel",
    "make_ext4_image",
    "running_guest",
    "system_libvirtd",
]
