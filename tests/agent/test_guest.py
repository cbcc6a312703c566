"""The agent inside a real QEMU guest, over a real virtio-serial port.

The guest (``vmreclaim.testing.guest``: Debian's kernel under TCG, the host's Python
and this checkout over 9p) mounts its virtio-blk disk, whose serial is ``disk0``, and
runs ``vmreclaim agent`` with no disk name configured and the ``virtio-serial``
transport. The test is the host: it connects to the socket QEMU binds for the port and
speaks the protocol with ``vmreclaim.core.protocol``. It checks the disk identity from
the serial, the record of a delete against FIEMAP taken in the guest, a fence (the
guest's filesystem frozen, re-verified, thawed), and guest-trim mode through QEMU's
``discard=unmap`` all the way to holes in the raw image file.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.agent.peer import Conn
from tests.agent.test_fence import holes
from vmreclaim.core import protocol as p
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing.guest import (
    GuestDisk,
    GuestKit,
    GuestPort,
    GuestSpec,
    make_ext4_image,
    running_guest,
)

pytestmark = [pytest.mark.guest, pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

MiB = 1024 * 1024

SCRIPT = r"""
set -e
mkdir -p /mnt/d0 && mount /dev/vda /mnt/d0
head -c 8388608 /dev/urandom > /mnt/d0/victim
head -c 2097152 /dev/urandom > /mnt/d0/keep
sync
cat > /tmp/agent.yaml <<EOF
transport: {driver: virtio-serial}
filesystems: [{mount: /mnt/d0}]
spool: /tmp/spool
capture: {driver: fsmap, debounce_seconds: 0.3}
log_level: debug
EOF
$PYTHON -m vmreclaim agent --config /tmp/agent.yaml > /xfer/agent.log 2>&1 &
AGENT=$!
while [ ! -e /xfer/delete ]; do sleep 0.1; done
$PYTHON -c '
import json, os
from vmreclaim.agent import linux
out = {}
for name in ("victim", "keep"):
    fd = os.open("/mnt/d0/" + name, os.O_RDONLY)
    out[name] = linux.fiemap(fd).ranges.to_pairs()
    os.close(fd)
json.dump(out, open("/xfer/extents.tmp", "w"))
os.rename("/xfer/extents.tmp", "/xfer/extents")
'
rm /mnt/d0/victim
while [ ! -e /xfer/probe ]; do sleep 0.1; done
# The host holds a fence now: this write must wait for the thaw.
date +%s.%N > /xfer/probe-start
echo x > /mnt/d0/probe && sync /mnt/d0/probe
date +%s.%N > /xfer/probe-end
while [ ! -e /xfer/done ]; do sleep 0.1; done
kill $AGENT
wait $AGENT || true
echo guest-ok
"""


def test_agent_in_a_real_guest_over_virtio_serial(guest_kit: GuestKit, tmp_path: Path) -> None:
    image = make_ext4_image(tmp_path / "d0.raw", 64 * MiB, "raw")
    port = GuestPort(tmp_path / "vm1.agent.sock")
    spec = GuestSpec(
        guest_kit, tmp_path, SCRIPT, disks=[GuestDisk(image, "raw", "disk0", discard=True)], ports=[port]
    )
    with running_guest(spec) as guest:
        sock = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                sock.connect(str(port.socket))
                break
            except OSError:
                time.sleep(0.05)
        conn = Conn(sock)
        try:
            hello = conn.expect(p.Hello, timeout=120)
            # No disk name in the guest's config: the identity is the virtio serial.
            assert [d.id for d in hello.disks] == ["disk0"], guest.describe()
            assert hello.disks[0].size == 64 * MiB and hello.disks[0].discard
            assert {"records", "fence", "trim"} <= set(hello.capabilities)
            conn.send(p.Welcome(v=1, vm="vm1", disks=[p.WelcomeDisk(id="disk0", size=64 * MiB, mode="trim")]))
            conn.auto_ack = True
            conn.expect(p.RecordMessage, timeout=60)  # the free space at start
            seq = max(conn.records)

            guest.signal("delete")
            extents = json.loads(guest.wait_for("extents", timeout=60))
            victim = RangeSet.from_ranges([tuple(r) for r in extents["victim"]])
            keep = RangeSet.from_ranges([tuple(r) for r in extents["keep"]])
            deadline = time.monotonic() + 60
            while True:
                got = RangeSet()
                for s, rec in list(conn.records.items()):
                    if s > seq:
                        got = got.union(RangeSet.from_ranges([tuple(r) for r in rec["ranges"]]))
                if got.contains(victim):
                    break
                assert time.monotonic() < deadline, f"no record of the delete:\n{guest.describe()}"
                time.sleep(0.1)
            assert got == victim, f"extra {got.subtract(victim)}"

            # Fence: frozen inside the guest, re-verified, the live file's blocks excluded.
            asked = victim.union(keep)
            conn.send(p.Fence(fence=1, disk="disk0", ranges=p.ranges_to_pairs(asked), lease_ms=8000))
            ready = conn.expect(p.FenceReady, timeout=30)
            assert p.pairs_to_ranges(ready.ranges) == victim
            guest.signal("probe")
            guest.wait_for("probe-start", timeout=30)
            time.sleep(1.5)
            assert not (guest.xfer / "probe-end").exists(), "the guest wrote through a frozen filesystem"
            conn.send(p.Release(fence=1))
            assert conn.expect(p.Released, timeout=30).why == "release"
            guest.wait_for("probe-end", timeout=30)

            # Guest-trim: FITRIM in the guest, QEMU's discard=unmap, a hole in the image.
            before = holes(image)
            conn.send(p.Trim(fence=2, disk="disk0", ranges=p.ranges_to_pairs(victim)))
            done = conn.expect(p.TrimDone, timeout=60)
            assert done.error is None, done.error
            new = holes(image).subtract(before)
            assert new.intersect(victim).total >= 0.9 * victim.total
            assert not new.intersect(keep)
        finally:
            guest.signal("done")
            result = guest.wait(120)
            conn.close()
        assert result.returncode == 0, guest.describe()
        assert "guest-ok" in result.output
