"""``image sparsify --dry-run`` of an image in use: a read-only estimate, labelled as
one; without ``--dry-run`` the busy image is still refused (exit 3) and unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reconcile.test_parts import dumpe2fs_free
from vmreclaim.testing import require_root, require_tool, run
from vmreclaim.testing.linux import loop_device, make_filesystem, mounted, qemu_fuse_export

MiB = 1 << 20


def sparsify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmreclaim", "image", "sparsify", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.root
@pytest.mark.qemu
def test_dry_run_of_a_mounted_live_qcow2_is_an_estimate(tmp_path: Path) -> None:
    require_root()
    require_tool(
        "qemu-img", "qemu-storage-daemon", "mkfs.ext4", "dumpe2fs", "fsfreeze", "losetup", "fusermount3"
    )
    image = tmp_path / "vm1.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(256 * MiB)])
    with (
        qemu_fuse_export(image, tmp_path / "export"),
        loop_device(tmp_path / "export") as dev,
    ):
        make_filesystem(dev, "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0")
        with mounted(dev, tmp_path / "mnt") as mnt:
            for i in range(3):
                (mnt / f"f{i}").write_bytes(bytes([i + 1]) * 16 * MiB)
            run(["sync"])  # written out, so stored in the image, before the deletion
            os.unlink(mnt / "f1")
            # A freeze checkpoints ext4's journal: the bitmaps in place then show the
            # deletion (after a mere sync they may still not: that is why it is an estimate).
            run(["fsfreeze", "--freeze", str(mnt)])
            run(["fsfreeze", "--unfreeze", str(mnt)])
            before = hashlib.sha256(image.read_bytes()).hexdigest()
            refused = sparsify(str(image), "--format", "qcow2", "--json")
            assert refused.returncode == 3 and "busy" in refused.stderr, refused.stderr
            est = sparsify(str(image), "--format", "qcow2", "--json", "--dry-run")
            assert est.returncode == 0, est.stderr
            doc = json.loads(est.stdout)
            assert doc["estimate"] is True and doc["dry_run"] is True
            assert doc["punched_bytes"] >= 16 * MiB and doc["freed_bytes"] == 0, doc
            # The journal was just checkpointed: the on-disk bitmaps are current.
            assert doc["free_bytes"] == dumpe2fs_free(dev, 0).total
            human = sparsify(str(image), "--format", "qcow2", "--dry-run")
            assert human.returncode == 0 and "ESTIMATE" in human.stdout
            assert hashlib.sha256(image.read_bytes()).hexdigest() == before, "a dry run changes nothing"
