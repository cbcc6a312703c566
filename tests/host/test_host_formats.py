"""A format once seen for a disk is kept across restarts (issue 11 item 1, host side): a
disk whose named format changes is refused until the operator confirms it."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hosttest import MiB, Site, running

from vmreclaim.core.errors import UsageError
from vmreclaim.host.formats import FormatChangedError, FormatLedger, confirm_format
from vmreclaim.testing.host import AgentPeer


def plant_qcow2_header(image: Path, tmp: Path) -> None:
    """What a guest can do to its own raw disk: write a valid qcow2 image at sector 0."""
    header = tmp / "planted.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(header), "8M"], check=True)
    data = header.read_bytes()
    with open(image, "r+b") as f:
        f.write(data)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_changed_format_is_refused_until_the_operator_confirms(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    image = site.raw_disk("vm1.raw")
    site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config()
    ch = site.channel("vm1")

    async def serve_once() -> None:
        async with running(config), AgentPeer(ch):
            pass

    asyncio.run(serve_once())
    plant_qcow2_header(image, site.root)
    # The hypervisor (here the configuration) now says qcow2 for the same path.
    site.vms[0]["disks"][0]["format"] = "qcow2"
    config = site.config()
    before = digest(image)

    async def refused() -> None:
        async with running(config) as daemon, AgentPeer(ch) as peer:
            seq = await peer.send_record([(4 * MiB, MiB)])
            await peer.wait_answered(seq)
            assert seq in peer.nacked  # its image is not read as qcow2: no size, no record
            disk = daemon.scheduler.disks["vm1/disk0"].disk
            with pytest.raises(FormatChangedError, match="confirms the change"):
                daemon.images.open(disk)
            await asyncio.sleep(1)

    with caplog.at_level(logging.ERROR, logger="vmreclaim.host"):
        asyncio.run(refused())
    assert any(r.getMessage() == "image.format_changed" for r in caplog.records)
    assert digest(image) == before  # nothing punched

    # The operator's word, the daemon stopped, through the CLI.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmreclaim",
            "host",
            "--config",
            str(site.root / "host.yaml"),
            "--confirm-format",
            f"{image}=qcow2",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "format qcow2 confirmed (was raw)" in out.stdout
    ledger = FormatLedger(config.database)
    try:
        assert ledger.known(image) == "qcow2"
        ledger.check(image, "vm1/disk0", "qcow2", "test")
        with pytest.raises(FormatChangedError):
            ledger.check(image, "vm1/disk0", "raw", "test")
    finally:
        ledger.close()


def test_confirming_needs_the_daemon_stopped(site: Site) -> None:
    image = site.raw_disk("vm1.raw")
    site.add_vm("vm1", [{"id": "disk0", "path": image, "format": "raw"}])
    config = site.config()

    async def main() -> None:
        async with running(config):
            with pytest.raises(UsageError, match="in use"):
                confirm_format(config.database, image, "qcow2")

    asyncio.run(main())
