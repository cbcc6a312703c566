"""End to end with the real ``vmreclaim host`` and ``vmreclaim agent`` processes.

The delayed-allocation gap of issue 13: a file written, synced and deleted at once is
free at both looks of the capture, so no record ever names it. Reconciliation must
bring ≥ 99 % of it back anyway, within 60 s of the last deletion, on a raw image (loop
device) and on a live qcow2 served by qemu-storage-daemon — with the default
``reconcile`` settings. Then ``reclaim VM --wait`` and ``report`` through the CLI, their
numbers checked against ``qemu-img map`` and ``dumpe2fs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hosttest import AgentProcess, MiB, data_ranges, extents

from tests.reconcile.test_parts import dumpe2fs_free
from vmreclaim.agent import linux
from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.opening import open_image
from vmreclaim.core.ranges import RangeSet
from vmreclaim.testing import require_root, require_tool, run
from vmreclaim.testing.host import HostProcess, static_vm
from vmreclaim.testing.linux import loop_device, make_filesystem, mounted, qemu_fuse_export

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROUNDS = 10
ROUND_BYTES = 32 * MiB
REPEATS = 3
HOLD = {"driver": "watermark", "batch_bytes": 2**60, "high_watermark": 1.0}


def free_now(mnt: Path) -> RangeSet:
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        linux.syncfs(fd)
        return linux.free_space(fd, os.fstat(fd).st_dev, 0, 2**62)
    finally:
        os.close(fd)


def churn(top: Path, rounds: int = ROUNDS) -> RangeSet:
    """Ten files of 32 MiB, each written, synced and deleted at once; their blocks."""
    top.mkdir(exist_ok=True)
    gone = RangeSet()
    for i in range(rounds):
        path = top / f"tmp{i}"
        with open(path, "wb") as f:
            f.write(bytes([i % 250 + 1]) * ROUND_BYTES)
            f.flush()
            os.fsync(f.fileno())
        gone = gone.union(extents(path))
        path.unlink()
    return gone


def back(gone: RangeSet, mnt: Path, held: Callable[[RangeSet], RangeSet]) -> float:
    """The share of the deleted blocks that the image no longer holds (blocks the
    filesystem gave to something else since are not counted)."""
    still_free = gone.intersect(free_now(mnt))
    if not still_free:
        return 1.0
    return 1 - held(still_free).total / still_free.total


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, diagnose: Callable[[], str]) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s\n{diagnose()}")
        time.sleep(0.2)
    return time.monotonic() - started


@contextmanager
def agent_running(tmp_path: Path, channel: Path, mnt: Path, host: HostProcess) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path, channel, mnt).start()
    try:
        host.wait_for(lambda doc: bool(doc["vms"][0]["agent"]["connected"]), 60, "agent connected")
        yield agent
    finally:
        code = agent.stop()
        assert code == 0, agent.logs()[-4000:]


def explain(host: HostProcess, agent: AgentProcess) -> str:
    return f"status: {host.status()}\n--- agent:\n{agent.logs()[-5000:]}\n--- host:\n{host.logs()[-8000:]}"


def repeat_churn(
    mnt: Path, host: HostProcess, agent: AgentProcess, held: Callable[[RangeSet], RangeSet]
) -> list[float]:
    took = []
    for _ in range(REPEATS):
        gone = churn(mnt / "churn")
        assert gone.total >= ROUND_BYTES  # ext4 may give the next file the same blocks
        took.append(
            wait_for(
                lambda g=gone: back(g, mnt, held) >= 0.99,  # type: ignore[misc]
                60,
                "99 % of ten write-sync-delete rounds back",
                lambda: explain(host, agent),
            )
        )
    return took


def test_write_sync_delete_rounds_come_back_raw(
    tmp_path: Path, host_daemon: Callable[..., HostProcess]
) -> None:
    require_root()
    require_tool("mkfs.ext4", "e2fsck", "losetup")
    image = tmp_path / "vm1.raw"
    with open(image, "wb") as f:
        f.truncate(1024 * MiB)
    make_filesystem(image, "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0")
    channel = tmp_path / "vm1.sock"
    # Default reconcile settings: growth 16 MiB, at most every 15 s.
    host = host_daemon([static_vm("vm1", channel, [{"id": "disk0", "path": image, "format": "raw"}])])
    with (
        loop_device(image) as dev,
        mounted(dev, tmp_path / "mnt") as mnt,
        agent_running(tmp_path, channel, mnt, host) as agent,
    ):
        took = repeat_churn(mnt, host, agent, lambda r: data_ranges(image).intersect(r))
        assert "reconcile.done" in host.logs()
    with loop_device(image) as dev, mounted(dev, tmp_path / "mnt") as mnt:
        # The churn while no agent runs, and an agent that does not report the space
        # free at its start: no record can ever name those blocks. Reconciliation after
        # the (re)connection must bring them back on its own.
        gone = churn(mnt / "churn")
        assert data_ranges(image).intersect(gone).total >= ROUND_BYTES
        agent = AgentProcess(tmp_path, channel, mnt, report_existing_free_space=False).start()
        try:
            wait_for(
                lambda: back(gone, mnt, lambda r: data_ranges(image).intersect(r)) >= 0.99,
                60,
                "99 % back through reconciliation alone",
                lambda: explain(host, agent),
            )
        finally:
            assert agent.stop() == 0, agent.logs()[-4000:]
        assert "reason=connect" in host.logs()
    assert host.stop() == 0
    run(["e2fsck", "-fn", str(image)])
    print(f"raw: ten 32 MiB write-sync-delete rounds, 99 % back after {', '.join(f'{t:.1f}s' for t in took)}")


@pytest.mark.qemu
def test_write_sync_delete_rounds_come_back_live_qcow2(
    tmp_path: Path, host_daemon: Callable[..., HostProcess]
) -> None:
    require_root()
    require_tool("qemu-img", "qemu-storage-daemon", "mkfs.ext4", "losetup", "fusermount3")
    image = tmp_path / "vm1.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(1024 * MiB)])
    channel, qmp = tmp_path / "vm1.sock", tmp_path / "qmp.sock"

    def held(guest: RangeSet) -> RangeSet:
        with open_image(image, "qcow2") as img:
            data = img.map(guest.bounds).restrict(guest).select(ExtentKind.DATA)
            stored = data_ranges(image)
            # Guest ranges whose cluster bytes the file still stores.
            out = []
            for e in data:
                if stored.intersect(RangeSet([e.offset], [e.offset + e.length])):
                    out.append((e.start, e.length))
            return RangeSet.from_ranges(out)

    with qemu_fuse_export(image, tmp_path / "export", qmp=qmp), loop_device(tmp_path / "export") as dev:
        make_filesystem(dev, "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0")
        hypervisor = {
            "driver": "qemu",
            "vms": [
                {
                    "name": "vm1",
                    "qmp": str(qmp),
                    "channel": {"driver": "unix", "path": str(channel)},
                    "disks": [{"id": "disk0", "discard": False}],
                }
            ],
        }
        host = host_daemon([], hypervisor=hypervisor)
        with mounted(dev, tmp_path / "mnt") as mnt, agent_running(tmp_path, channel, mnt, host) as agent:
            took = repeat_churn(mnt, host, agent, held)
        assert host.stop() == 0
    run(["qemu-img", "check", str(image)])
    print(
        f"qcow2: ten 32 MiB write-sync-delete rounds, 99 % back after {', '.join(f'{t:.1f}s' for t in took)}"
    )


def cli(
    *args: str, uid: int | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmreclaim", *args],
        capture_output=True,
        text=True,
        timeout=600,
        user=uid,
        env={**os.environ, **(env or {})},
    )


def as_nobody(control: Path) -> str:
    """Ask for a report over ``control`` as uid 65534; the answer or the error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, connect, say what happened, and exit at once
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(str(control))
                with contextlib.suppress(BrokenPipeError):  # it may answer before we ask
                    sock.sendall(b'{"op": "report"}\n')
                out = sock.recv(1 << 16)
        except OSError as exc:
            out = str(exc).encode()
        os.write(w, out)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


def qemu_img_data(image: Path) -> RangeSet:
    rows = json.loads(run(["qemu-img", "map", "-U", "--output=json", "-f", "raw", str(image)]))
    return RangeSet.from_ranges((r["start"], r["length"]) for r in rows if r["data"] and not r["zero"])


def report_disk(config: Path) -> dict[str, Any]:
    done = cli("report", "--json", "--config", str(config))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    (vm,) = doc["vms"]
    (disk,) = vm["disks"]
    assert vm["name"] == "vm1"
    return dict(disk)


@pytest.mark.qemu
def test_reclaim_wait_and_report(tmp_path: Path, host_daemon: Callable[..., HostProcess]) -> None:
    require_root()
    require_tool("mkfs.ext4", "dumpe2fs", "losetup", "qemu-img")
    image = tmp_path / "vm1.raw"
    size = 256 * MiB
    with open(image, "wb") as f:
        f.truncate(size)
    make_filesystem(image, "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0")
    channel = tmp_path / "vm1.sock"
    # The policy holds everything and nothing reconciles on its own: only the operator acts.
    host = host_daemon(
        [static_vm("vm1", channel, [{"id": "disk0", "path": image, "format": "raw"}])],
        policy=HOLD,
        reconcile={"enabled": False},
    )
    config = host.config
    control = host.status_socket.with_name("control.sock")
    assert (os.stat(control).st_mode & 0o777) == 0o600
    with loop_device(image) as dev, mounted(dev, tmp_path / "mnt") as mnt:
        for i in range(3):
            (mnt / f"v{i}").write_bytes(bytes([i + 1]) * 16 * MiB)
        (mnt / "keep").write_bytes(b"k" * 8 * MiB)
        run(["sync"])
        keep = extents(mnt / "keep")
        with agent_running(tmp_path, channel, mnt, host) as agent:
            before = report_disk(config)
            assert before["reclaimable_bytes"] is None and before["reclaimable_as_of"] is None
            for i in range(3):
                (mnt / f"v{i}").unlink()
            run(["sync"])

            # Dry run: what is reclaimable, nothing punched; the oracles agree exactly.
            allocated_before = os.stat(image).st_blocks * 512
            dry = cli("reclaim", "vm1", "--dry-run", "--json", "--config", str(config))
            assert dry.returncode == 0, dry.stderr + explain(host, agent)
            doc = json.loads(dry.stdout)
            assert doc["vm"] == "vm1" and [d["id"] for d in doc["disks"]] == ["disk0"]
            expected = dumpe2fs_free(dev, 0).intersect(qemu_img_data(image))
            assert doc["disks"][0]["reclaimable_bytes"] == expected.total >= 48 * MiB
            assert doc["disks"][0]["punched_bytes"] == 0 and doc["disks"][0]["mode"] == "fence"
            assert os.stat(image).st_blocks * 512 == allocated_before
            rep = report_disk(config)
            assert rep["reclaimable_bytes"] == expected.total
            assert rep["virtual_bytes"] == size and rep["allocated_bytes"] == allocated_before
            assert rep["reclaimable_as_of"] is not None and rep["mode"] == "fence"

            # The real thing, waited for.
            done = cli("reclaim", "vm1", "--wait", "--json", "--config", str(config))
            assert done.returncode == 0, done.stderr + explain(host, agent)
            (disk,) = json.loads(done.stdout)["disks"]
            assert disk["reclaimable_bytes"] == expected.total
            assert disk["punched_bytes"] >= 0.99 * expected.total
            freed = allocated_before - os.stat(image).st_blocks * 512
            assert disk["freed_bytes"] >= 0.99 * expected.total and freed >= 0.99 * expected.total
            after = report_disk(config)
            left = dumpe2fs_free(dev, 0).intersect(qemu_img_data(image))
            assert left.total <= 0.01 * expected.total
            assert (
                after["reclaimable_bytes"] is not None and after["reclaimable_bytes"] <= 0.01 * expected.total
            )
            assert after["allocated_bytes"] == os.stat(image).st_blocks * 512
            assert after["freed_bytes"] >= disk["freed_bytes"]
            assert not keep.intersect(left) and (mnt / "keep").read_bytes() == b"k" * 8 * MiB

            # Clear errors, exit 2.
            for args, words in (
                (("reclaim", "vm9"), "vm9"),
                (("reclaim", "vm1", "--disk", "nope"), "no disk 'nope'"),
            ):
                bad = cli(*args, "--config", str(config))
                assert bad.returncode == 2 and words in bad.stderr, bad.stderr
            # Only root: the socket's mode, and (should the mode be loosened) its peer check.
            # (pytest's own temporary directories are opened for traversal meanwhile.)
            dirs = [tmp_path, tmp_path.parent, tmp_path.parent.parent]
            modes = [os.stat(d).st_mode & 0o777 for d in dirs]
            try:
                for d in dirs:
                    os.chmod(d, 0o711)
                assert "Permission denied" in as_nobody(control)
                os.chmod(control, 0o666)
                assert "uid 65534 may not control this daemon" in as_nobody(control)
            finally:
                os.chmod(control, 0o600)
                for d, mode in zip(dirs, modes, strict=True):
                    os.chmod(d, mode)
        bad = cli("reclaim", "vm1", "--config", str(config))
        assert bad.returncode == 2 and "no agent connected" in bad.stderr, bad.stderr
    assert host.stop() == 0
