"""qcow2 against QEMU: random images built with qemu-img/qemu-io, mapped by both.

Every example builds a real image (writes, zero writes with and without unmap, discards,
compressed writes, internal snapshots, overlays on backing files, extended L2, several
cluster sizes and refcount widths), then checks that our map agrees with
``qemu-img map --output=json`` for every guest byte, and that ``Image.read`` returns what
QEMU reads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.imagetools import (
    KiB,
    MiB,
    assert_agrees_with_qemu,
    our_map,
    qemu_img_create,
    qemu_io,
    qemu_read,
    sh,
)
from vmreclaim.core.errors import UnsupportedImageError
from vmreclaim.core.extents import ExtentKind
from vmreclaim.core.opening import open_image
from vmreclaim.core.ranges import ByteRange
from vmreclaim.testing import require_tool

pytestmark = pytest.mark.qemu

#: Each example runs QEMU's tools a few times; the suite's profile is capped here, and
#: VMRECLAIM_ORACLE_EXAMPLES runs a longer hunt by hand.
EXAMPLES = int(os.environ.get("VMRECLAIM_ORACLE_EXAMPLES", min(settings.default.max_examples, 60)))


@st.composite
def image_plans(draw: st.DrawFn) -> dict[str, object]:
    version = draw(st.sampled_from([2, 3]))
    extended = version == 3 and draw(st.booleans())
    cluster = draw(
        st.sampled_from([32 * KiB, 64 * KiB, 128 * KiB] if extended else [512, 4 * KiB, 64 * KiB, 2 * MiB])
    )
    refbits = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64])) if version == 3 else 16
    size = draw(st.integers(1, 8)) * MiB + draw(st.sampled_from([0, 512, 4096, 65536 + 512]))
    ops = draw(st.lists(op_strategy(size, cluster, version, refbits), min_size=1, max_size=12))
    return {"version": version, "extended": extended, "cluster": cluster, "refbits": refbits,
            "size": size, "ops": ops}  # fmt: skip


def op_strategy(
    size: int, cluster: int, version: int, refbits: int
) -> st.SearchStrategy[tuple[str, int, int]]:
    sector = st.integers(0, size // 512 - 1).map(lambda s: s * 512)
    clusters = max(1, size // cluster)

    def ranged(kind: str) -> st.SearchStrategy[tuple[str, int, int]]:
        return sector.flatmap(
            lambda off: st.integers(1, min(256, (size - off) // 512)).map(lambda n: (kind, off, n * 512))
        )

    kinds = [ranged("write"), ranged("write -z"), ranged("discard")]
    if version == 3:
        kinds.append(ranged("write -z -u"))
    if size >= cluster:
        kinds.append(st.integers(0, clusters - 1).map(lambda c: ("write -c", c * cluster, cluster)))
    if refbits > 1:
        kinds.append(st.just(("snapshot", 0, 0)))
    kinds.append(st.just(("overlay", 0, 0)))
    return st.one_of(kinds)


def build(tmp: Path, plan: dict[str, object]) -> Path:
    """Carry out ``plan``: qemu-io batches, snapshots and overlays; return the top image."""
    opts: dict[str, object] = {"cluster_size": plan["cluster"]}
    if plan["version"] == 2:
        opts["compat"] = "0.10"
    else:
        opts.update(extended_l2=plan["extended"], refcount_bits=plan["refbits"])
    top = qemu_img_create(tmp / "base.qcow2", int(plan["size"]), **opts)  # type: ignore[call-overload]
    pending: list[str] = []
    layer = 0
    seed = 1
    for kind, off, length in plan["ops"]:  # type: ignore[attr-defined]
        if kind in ("snapshot", "overlay"):
            if pending:
                qemu_io(top, *pending)
                pending = []
            if kind == "snapshot":
                proc = sh("qemu-img", "snapshot", "-c", f"s{layer}-{seed}", top, check=False)
                # Narrow refcounts overflow after a few snapshots (2 bits: at most 3
                # references); QEMU then refuses the snapshot and changes nothing.
                overflow = plan["refbits"] in (1, 2, 4) and "Invalid argument" in proc.stderr
                assert proc.returncode == 0 or overflow, proc.stderr
            else:
                layer += 1
                top = qemu_img_create(tmp / f"layer{layer}.qcow2", int(plan["size"]),
                                      backing=top.name, **opts)  # type: ignore[arg-type]  # fmt: skip
            seed += 1
            continue
        if kind == "write -c":
            # QEMU compresses only into unallocated clusters; over an allocated one the
            # write fails cleanly and the image is unchanged, which is fine here.
            if pending:
                qemu_io(top, *pending)
                pending = []
            out = sh(
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                f"write -c -P {seed % 255 + 1} {off} {length}",
                top,
                check=False,
            ).stdout
            assert "wrote" in out or "write failed: Input/output error" in out, out
        elif kind == "write":
            pending.append(f"write -P {seed % 255 + 1} {off} {length}")
        else:
            pending.append(f"{kind} {off} {length}")
        seed += 1
    if pending:
        qemu_io(top, *pending)
    return top


@pytest.mark.slow
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=image_plans())
def test_map_agrees_with_qemu_img_map(
    tmp_path_factory: pytest.TempPathFactory, plan: dict[str, object]
) -> None:
    require_tool("qemu-img", "qemu-io")
    tmp = tmp_path_factory.mktemp("q")
    top = build(tmp, plan)
    ours = assert_agrees_with_qemu(top, "qcow2")
    if not any(op[0] == "snapshot" for op in plan["ops"]):  # type: ignore[attr-defined]
        # Nothing shares a cluster: every stored cluster is the guest's alone, whatever
        # the refcount width (a mis-decoded refcount would show up as "shared" here).
        assert ours.bytes_of(ExtentKind.SHARED) == 0
    with open_image(top, writing=False) as image:
        assert image.read(0, image.virtual_size) == qemu_read(top, "qcow2", 0, image.virtual_size)
        # A window inside the disk maps exactly as the same window of the whole map.
        lo, hi = image.virtual_size // 3 + 100, image.virtual_size // 2 + 7
        part = image.map(ByteRange(lo, hi - lo))
        assert part.to_json() == ours.clip(ByteRange(lo, hi - lo)).merged().to_json()


@pytest.mark.parametrize("cluster", [512, 2 * MiB])
def test_extreme_cluster_sizes(tmp_path: Path, cluster: int) -> None:
    img = qemu_img_create(tmp_path / "c.qcow2", 6 * MiB, cluster_size=cluster)
    qemu_io(
        img,
        "write -P 3 0 4k",
        f"write -P 4 {3 * MiB + 512} 1k",
        "write -z 1M 512k",
        f"write -c {4 * MiB} {cluster}",
    )
    assert_agrees_with_qemu(img, "qcow2")


def test_snapshot_makes_clusters_shared_and_cow_makes_them_data(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "s.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 1M")
    sh("qemu-img", "snapshot", "-c", "before", img)
    qemu_io(img, "write -P 2 0 64k")  # copy-on-write: a new cluster, the guest's alone
    m = assert_agrees_with_qemu(img, "qcow2")
    kinds = {(e.start, e.length): e.kind for e in m}
    assert kinds[(0, 64 * KiB)] is ExtentKind.DATA
    assert kinds[(64 * KiB, MiB - 64 * KiB)] is ExtentKind.SHARED
    sh("qemu-img", "snapshot", "-d", "before", img)
    assert our_map(img).bytes_of(ExtentKind.DATA) == MiB


def test_zstd_compressed_clusters_read_back(tmp_path: Path) -> None:
    pytest.importorskip("zstandard", reason="reading zstd clusters needs the zstandard module")
    img = qemu_img_create(tmp_path / "z.qcow2", 2 * MiB, compression_type="zstd")
    qemu_io(img, "write -c -P 9 0 64k", "write -c -P 10 64k 64k")
    m = assert_agrees_with_qemu(img, "qcow2")
    assert m.bytes_of(ExtentKind.COMPRESSED) == 128 * KiB
    with open_image(img, writing=False) as image:
        assert image.read(0, 128 * KiB) == b"\x09" * 65536 + b"\x0a" * 65536


def test_zstd_without_the_module_is_a_clear_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    img = qemu_img_create(tmp_path / "z.qcow2", 2 * MiB, compression_type="zstd")
    qemu_io(img, "write -c -P 9 0 64k")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import now raises ImportError
    with open_image(img, writing=False) as image, pytest.raises(UnsupportedImageError, match="zstandard"):
        image.read(0, 4096)


def test_external_data_file_maps_into_the_data_file(tmp_path: Path) -> None:
    # QEMU 7.2 resolves a relative data file name against its working directory; we
    # resolve it against the image's directory (where qemu-img create put it here).
    sh("sh", "-c", f"cd {tmp_path} && qemu-img create -q -f qcow2 -o data_file=x.raw x.qcow2 4M "
       "&& qemu-io -f qcow2 -c 'write -P 5 1M 128k' x.qcow2")  # fmt: skip
    img = qemu_img_create(tmp_path / "y.qcow2", 4 * MiB, data_file=str(tmp_path / "y.raw"))
    qemu_io(img, "write -P 5 1M 128k", "write -z 2M 64k")
    m = assert_agrees_with_qemu(img, "qcow2")
    with open_image(img, writing=False) as image:
        assert image.data_file.path.name == "y.raw"
        assert image.info()["data_file"].endswith("y.raw")
        assert image.read(MiB, 128 * KiB) == b"\x05" * 128 * KiB
        assert not image.metadata_ranges()  # the structures live in the .qcow2 file
    assert m.bytes_of(ExtentKind.DATA) == 128 * KiB
    with open_image(tmp_path / "x.qcow2", writing=False) as image:
        assert image.data_file.path == tmp_path / "x.raw"
        assert image.read(MiB, 4096) == b"\x05" * 4096


@pytest.mark.slow  # LUKS key derivation
def test_luks_image_maps_but_cannot_be_read(tmp_path: Path) -> None:
    img = tmp_path / "e.qcow2"
    for _ in range(5):
        # QEMU times its key derivation to pick an iteration count and, on a busy
        # machine, sometimes gives up ("Unable to get accurate CPU usage"): try again.
        proc = sh("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                  "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=200", img, "4M",
                  check=False)  # fmt: skip
        if proc.returncode == 0 or "accurate CPU usage" not in proc.stderr:
            break
        time.sleep(0.2)
    else:
        pytest.skip("qemu-img could not time LUKS key derivation on this busy machine (5 tries)")
    assert proc.returncode == 0, proc.stderr
    sh("qemu-io", "--object", "secret,id=s0,data=pw", "--image-opts",
       f"driver=qcow2,encrypt.key-secret=s0,file.filename={img}", "-c", "write -P 1 0 64k")  # fmt: skip
    with open_image(img, writing=False) as image:
        m = image.map(ByteRange(0, image.virtual_size))
        assert m.bytes_of(ExtentKind.DATA) == 64 * KiB
        luks = image.header.crypto_area  # type: ignore[attr-defined]
        assert image.metadata_ranges().contains(
            __import__("vmreclaim.core.ranges", fromlist=["RangeSet"]).RangeSet(
                [luks[0]], [luks[0] + luks[1]]
            )
        )
        assert image.info()["encrypted"] is True
        with pytest.raises(UnsupportedImageError, match="encrypted"):
            image.read(0, 512)


def test_bitmaps_and_snapshot_tables_are_metadata(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "b.qcow2", 64 * MiB)
    qemu_io(img, "write -P 1 0 8M")
    sh("qemu-img", "bitmap", "--add", img, "bm0")
    qemu_io(img, "write -P 2 16M 1M")  # dirties the bitmap: QEMU stores its data clusters
    sh("qemu-img", "snapshot", "-c", "snap", img)
    with open_image(img, writing=False) as image:
        meta = image.metadata_ranges()
        data = image.map(ByteRange(0, image.virtual_size)).select(ExtentKind.DATA, ExtentKind.SHARED)
        assert not data.host_ranges().intersect(meta)
        assert image.info()["bitmaps"] == ["bm0"] and image.info()["snapshots"] == ["snap"]
        cs = image.cluster_size
        # header, L1, refcount table and block, L2 tables, snapshot table and L1, bitmap
        # directory and table: at least this many clusters.
        assert meta.total >= 8 * cs
    sh("qemu-img", "check", img)


def test_info_reports_chain_and_sizes(tmp_path: Path) -> None:
    base = qemu_img_create(tmp_path / "base.qcow2", 8 * MiB, cluster_size=4096)
    mid = qemu_img_create(tmp_path / "mid.qcow2", 8 * MiB, backing="base.qcow2")
    top = qemu_img_create(tmp_path / "top.qcow2", 8 * MiB, backing="mid.qcow2")
    qemu_io(top, "write -P 1 0 1M")
    with open_image(top, writing=False) as image:
        info = image.info()
    assert info["format"] == "qcow2" and info["virtual_size"] == 8 * MiB
    assert info["cluster_size"] == 65536
    assert [Path(p).name for p in info["backing"]] == ["mid.qcow2", "base.qcow2"]
    assert info["allocated_bytes"] == top.stat().st_blocks * 512
    assert base.exists() and mid.exists()


def test_missing_backing_file_is_refused_with_its_name(tmp_path: Path) -> None:
    base = qemu_img_create(tmp_path / "base.qcow2", 8 * MiB)
    top = qemu_img_create(tmp_path / "top.qcow2", 8 * MiB, backing="base.qcow2")
    base.unlink()
    with pytest.raises(UnsupportedImageError, match=r"backing file 'base\.qcow2'"):
        open_image(top, writing=False)


def test_refresh_sees_what_qemu_wrote_since(tmp_path: Path) -> None:
    """A live caller refreshes after its fence: the map must then be current."""
    img = qemu_img_create(tmp_path / "r.qcow2", 4 * MiB)
    with open_image(img, writing=False) as image:
        assert image.map(ByteRange(0, 4 * MiB)).bytes_of(ExtentKind.DATA) == 0
        qemu_io(img, "write -P 1 1M 1M")
        sh("qemu-img", "snapshot", "-c", "s", img)
        image.refresh()
        m = image.map(ByteRange(0, 4 * MiB))
        assert m.bytes_of(ExtentKind.SHARED) == MiB
        assert image.info()["snapshots"] == ["s"]
