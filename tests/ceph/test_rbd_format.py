"""The ``rbd`` format driver against a real cluster: map from librbd's diff, discard of
whole objects and tails only, snapshots and clones, busy images, hostile names and the
mapping of every librados/librbd error."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.ceph.conftest import cli, cli_json, qemu_io
from vmreclaim.core import errors
from vmreclaim.testing.ceph import CephCluster

K = 1024
OBJ = 64 * K


def rbd_diff(cluster: CephCluster, name: str) -> list[tuple[int, int]]:
    """The oracle: ``rbd diff --whole-object`` (objects that exist)."""
    doc = json.loads(cluster.rbd("diff", "--whole-object", "--format", "json", f"{cluster.pool}/{name}"))
    return [(int(e["offset"]), int(e["length"])) for e in doc if e["exists"] == "true" or e["exists"] is True]


def test_info_and_map_follow_the_objects_librbd_lists(
    cluster: CephCluster, new_image: Callable[..., str]
) -> None:
    name = new_image("1M", "64K")
    spec = cluster.spec(name)
    qemu_io(spec, "write -P 0xab 0 192K", "write -P 0xcd 320K 64K", "write -P 0x11 540K 4K")
    info = cli_json("image", "info", spec)
    assert info["format"] == "rbd" and info["virtual_size"] == 1 << 20 and info["cluster_size"] == OBJ
    assert info["allocated_bytes"] == 5 * OBJ == cluster.du(name)
    doc = cli_json("image", "map", spec)
    data = [(e["start"], e["length"]) for e in doc if e["kind"] == "data"]
    merged = rbd_diff(cluster, name)
    assert sum(n for _, n in data) == sum(n for _, n in merged) == 5 * OBJ
    assert data == [(0, 3 * OBJ), (5 * OBJ, OBJ), (8 * OBJ, OBJ)]
    assert all(e["offset"] == e["start"] for e in doc if e["kind"] == "data")
    assert {e["kind"] for e in doc} == {"data", "zero"}
    assert sum(e["length"] for e in doc) == 1 << 20


def test_reclaim_discards_whole_objects_and_tails_never_heads(
    cluster: CephCluster, new_image: Callable[..., str]
) -> None:
    name = new_image("1M", "64K")
    spec = cluster.spec(name)
    qemu_io(spec, "write -P 0xab 0 512K")
    before = cluster.du(name)
    # objects 1-2 whole; the tail of object 3; the head of object 4; the middle of object 6
    ranges = ["65536:131072", "229376:32768", "262144:16384", "409600:8192"]
    doc = cli_json("image", "reclaim", spec, *[a for r in ranges for a in ("--range", r)])
    assert doc["requested_bytes"] == 128 * K + 32 * K + 16 * K + 8 * K
    assert doc["punched_bytes"] == 128 * K + 32 * K
    assert sorted((s["start"], s["length"], s["reason"]) for s in doc["skipped"]) == [
        (262144, 16384, "partial-block"),
        (409600, 8192, "partial-block"),
    ]
    assert doc["freed_bytes"] == 2 * OBJ == before - cluster.du(name)
    # What was not free is intact; what was discarded reads as zeros.
    qemu_io(spec, "read -P 0xab 0 64K", "read -P 0 64K 128K", "read -P 0xab 192K 32K",
            "read -P 0 224K 32K", "read -P 0xab 256K 256K")


def test_dry_run_changes_nothing(
    cluster: CephCluster, new_image: Callable[..., str]
) -> None:
    name = new_image("1M", "64K")
    spec = cluster.spec(name)
    qemu_io(spec, "write -P 0xab 0 256K")
    doc = cli_json("image", "reclaim", spec, "--range", "0:262144", "--dry-run")
    assert doc["punched_bytes"] == 256 * K and doc["freed_bytes"] == 0
    assert cluster.du(name) == 256 * K
    qemu_io(spec, "read -P 0xab 0 256K")


def test_snapshot_data_is_shared_and_never_discarded(
    cluster: CephCluster, new_image: Callable[..., str]
) -> None:
    name = new_image("1M", "64K")
    spec = cluster.spec(name)
    qemu_io(spec, "write -P 0xab 0 256K")
    cluster.rbd("snap", "create", f"{cluster.pool}/{name}@s1")
    qemu_io(spec, "write -P 0xcd 64K 64K")
    kinds = {(e["start"], e["length"]): e["kind"] for e in cli_json("image", "map", spec)}
    assert kinds[(0, OBJ)] == "shared" and kinds[(OBJ, OBJ)] == "data"
    assert kinds[(2 * OBJ, 2 * OBJ)] == "shared"
    doc = cli_json("image", "reclaim", spec, "--range", "0:262144")
    assert doc["punched_bytes"] == OBJ
    assert {(s["start"], s["length"], s["reason"]) for s in doc["skipped"]} == {
        (0, OBJ, "shared"), (2 * OBJ, 2 * OBJ, "shared")
    }
    qemu_io(spec, "read -P 0xab 0 64K", "read -P 0 64K 64K", "read -P 0xab 128K 128K")
    # The snapshot still reads what it held; naming it is read-only (exit 4, nothing changed).
    snap = cluster.spec(name, "s1")
    qemu_io(snap, "read -P 0xab 0 256K", read_only=True)
    assert {e["kind"] for e in cli_json("image", "map", snap)} <= {"shared", "zero"}
    refused = cli("image", "reclaim", snap, "--range", "0:65536")
    assert refused.returncode == 4 and "snapshot is read-only" in refused.stderr


def test_clone_discards_only_its_own_objects(
    cluster: CephCluster, new_image: Callable[..., str]
) -> None:
    parent = new_image("1M", "64K")
    qemu_io(cluster.spec(parent), "write -P 0xab 0 256K")
    cluster.rbd("snap", "create", f"{cluster.pool}/{parent}@base")
    cluster.rbd("snap", "protect", f"{cluster.pool}/{parent}@base")
    child = f"{parent}-child"
    cluster.rbd("clone", f"{cluster.pool}/{parent}@base", f"{cluster.pool}/{child}")
    try:
        spec = cluster.spec(child)
        qemu_io(spec, "write -P 0xcd 128K 64K")
        doc = cli_json("image", "map", spec)
        kinds = {(e["start"], e["length"]): e["kind"] for e in doc}
        assert kinds[(2 * OBJ, OBJ)] == "data" and kinds[(0, 2 * OBJ)] == "unallocated"
        assert cli_json("image", "info", spec)["parent"] is True
        done = cli_json("image", "reclaim", spec, "--range", "0:262144")
        assert done["punched_bytes"] == OBJ
        # The clone still shows its parent where it had no object, zeros where it discarded.
        qemu_io(spec, "read -P 0xab 0 128K", "read -P 0 128K 64K", "read -P 0xab 192K 64K")
        qemu_io(cluster.spec(parent, "base"), "read -P 0xab 0 256K", read_only=True)
    finally:
        cluster.rbd("rm", f"{cluster.pool}/{child}")
        cluster.rbd("snap", "unprotect", f"{cluster.pool}/{parent}@base")


def test_an_image_another_client_holds_is_refused_and_unchanged(
    cluster: CephCluster, new_image: Callable[..., str]
) -> None:
    import rados
    import rbd

    name = new_image("1M", "64K")
    spec = cluster.spec(name)
    qemu_io(spec, "write -P 0xab 0 256K")
    with (
        rados.Rados(conffile=str(cluster.conf)) as client,
        client.open_ioctx(cluster.pool) as ioctx,
        rbd.Image(ioctx, name) as other,
    ):
        other.write(b"x", 0)  # the writer now owns the exclusive lock, and watches
        for command in (["reclaim", spec, "--range", "0:262144"], ["sparsify", spec]):
            done = cli("image", *command)
            assert done.returncode == 3, done.stderr
            assert "busy" in done.stderr and name in done.stderr
    assert cluster.du(name) == 256 * K
    qemu_io(spec, "read -P 0xab 64K 192K")


@pytest.mark.qemu
def test_an_image_a_running_qemu_holds_is_refused(
    cluster: CephCluster, new_image: Callable[..., str]
) -> None:
    name = new_image("1M", "64K")
    spec = cluster.spec(name)
    qemu_io(spec, "write -P 0xab 0 256K")
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-drive", f"file={spec},format=raw,if=none,id=d0,discard=unmap", "-monitor", "stdio"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and '"watchers": []' in cluster.rbd("status", "--format", "json",
                                                                             f"{cluster.pool}/{name}"):
            time.sleep(0.2)
        done = cli("image", "reclaim", spec, "--range", "0:262144")
        assert done.returncode == 3 and "watches it" in done.stderr, done.stderr
        assert cluster.du(name) == 256 * K
    finally:
        qemu.kill()
        qemu.wait(timeout=30)


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("rbd:{pool}/{image}:mon_host=10.0.0.1", "only conf=, id= are allowed"),
        ("rbd:{pool}/{image}:conf={conf}:conf={conf}", "given twice"),
        ("rbd:{pool}/../{image}:conf={conf}", "not an RBD name"),
        ("rbd:{pool}/{image}:conf=/nonexistent/ceph.conf", "does not exist"),
        ("rbd:nosuchpool/{image}:conf={conf}", "no such pool"),
        ("rbd:{pool}/nosuchimage:conf={conf}", "no such image"),
    ],
)
def test_hostile_or_wrong_names_are_refused(
    cluster: CephCluster, new_image: Callable[..., str], name: str, needle: str
) -> None:
    image = new_image("1M", "64K")
    spec = name.format(pool=cluster.pool, image=image, conf=cluster.conf)
    for command in (["info", spec], ["reclaim", spec, "--range", "0:65536"]):
        done = cli("image", *command)
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr


def test_every_library_error_is_mapped_to_the_tree() -> None:
    rados = pytest.importorskip("rados")
    rbd = pytest.importorskip("rbd")

    from vmreclaim.plugins.formats.rbd import ceph_errors

    classes = [
        obj
        for module in (rados, rbd)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, (rados.Error, rbd.Error))
    ]
    assert len(classes) > 30
    for cls in classes:
        with pytest.raises(errors.VMReclaimError) as caught, ceph_errors("rbd:p/i: test"):
            exc = cls.__new__(cls)  # constructors differ (message, errno, offset...)
            exc.args = ("boom",)
            exc.errno = 5
            raise exc
        assert type(caught.value) is not errors.VMReclaimError, cls  # a specific class, with its exit code
        assert caught.value.__cause__.__class__ is cls
        assert "rbd:p/i: test" in str(caught.value)


def test_pool_usage_is_the_policys_storage_state(
    cluster: CephCluster, new_image: Callable[..., str]
) -> None:
    from vmreclaim.core.opening import storage_state

    name = new_image("8M", "64K")
    qemu_io(cluster.spec(name), "write -P 0xab 0 4M")
    deadline = time.monotonic() + 60
    while cluster.pool_stored() < 4 << 20:  # the OSD reports its statistics every second
        assert time.monotonic() < deadline, "ceph df never showed the write"
        time.sleep(0.5)
    state = storage_state(cluster.spec(name))
    df = json.loads(cluster.ceph("df", "--format", "json"))
    pool = next(p for p in df["pools"] if p["name"] == cluster.pool)["stats"]
    assert state.total_bytes == pytest.approx(pool["bytes_used"] + pool["max_avail"], rel=0.05)
    assert state.total_bytes - state.free_bytes >= 4 << 20
    assert 0 < state.used_fraction < 1
