"""The guest infrastructure itself: boot, run the checkout's Python, disks, a channel."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vmreclaim.testing.guest import (
    CHANNEL_NAME,
    GuestDisk,
    GuestKit,
    GuestPort,
    GuestSpec,
    make_ext4_image,
    running_guest,
)

pytestmark = [pytest.mark.guest, pytest.mark.root, pytest.mark.qemu]

MiB = 1024 * 1024


def test_guest_runs_the_checkouts_python_with_disk_and_channel(guest_kit: GuestKit, tmp_path: Path) -> None:
    image = make_ext4_image(tmp_path / "d0.qcow2", 64 * MiB, "qcow2")
    port = GuestPort(tmp_path / "ch.sock")
    script = f"""
set -e
$PYTHON -c 'import vmreclaim, pathlib; print("pkg", pathlib.Path(vmreclaim.__file__).parent)'
echo "serial $(cat /sys/block/vda/serial)"
mkdir /mnt/d0 && mount /dev/vda /mnt/d0
echo hello > /mnt/d0/f && sync && umount /mnt/d0
# One open of the port for both ways: a port the guest has closed is not read by QEMU.
exec 3<>/dev/virtio-ports/{CHANNEL_NAME}
printf 'ping\\n' >&3
read -r reply <&3
echo "reply $reply"
"""
    spec = GuestSpec(guest_kit, tmp_path, script, disks=[GuestDisk(image, "qcow2", "disk0")], ports=[port])
    # QEMU binds the port's socket; the host end connects, as the host daemon does.
    with running_guest(spec) as guest, socket.socket(socket.AF_UNIX) as s:
        s.connect(str(port.socket))
        s.settimeout(60)
        got = s.makefile("rb").readline()
        assert got == b"ping\n", guest.describe()
        s.sendall(b"pong\n")
        result = guest.wait(90)
    assert result.returncode == 0, guest.describe()
    checkout = Path(__file__).resolve().parents[2] / "vmreclaim"
    assert f"pkg {checkout}" in result.output
    assert "serial disk0" in result.output
    assert "reply pong" in result.output
    # The guest's write reached the image: ext4 on it is clean and holds the file.
    from vmreclaim.testing import run

    raw = tmp_path / "d0.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)])
    run(["e2fsck", "-fn", str(raw)])
    assert "hello" in run(["debugfs", "-R", "cat /f", str(raw)])


def test_guest_script_failure_is_reported(guest_kit: GuestKit, tmp_path: Path) -> None:
    spec = GuestSpec(guest_kit, tmp_path, "echo about to fail; exit 7\n")
    with running_guest(spec) as guest:
        result = guest.wait(60)
    assert result.returncode == 7
    assert "about to fail" in result.output
