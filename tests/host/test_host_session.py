"""A session talks to the daemon only through :class:`SessionHost`: any object with
those seven methods serves it, and the reclaimer's questions are answered by the session
itself (``mode_of``, ``mismatch``, ``can_fence``) — over a real unix socket here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from hosttest import MiB, eventually

from vmreclaim.core.hypervisors import VMInfo
from vmreclaim.core.model import DeletionRecord, Disk, VMIdentity
from vmreclaim.core.protocol import HelloDisk
from vmreclaim.host.session import AgentSession, SessionHost
from vmreclaim.testing import make_raw_image
from vmreclaim.testing.host import AgentPeer


class NotebookHost:
    """A SessionHost that writes down what the session asks and stores nothing."""

    def __init__(self, sizes: dict[str, int], backlog_full: bool = False) -> None:
        self.sizes = sizes
        self.backlog_full = backlog_full
        self.calls: list[str] = []
        self.sessions: list[AgentSession] = []
        self.records: list[DeletionRecord] = []

    async def disk_sizes(self, vm: VMInfo) -> dict[str, int]:
        self.calls.append("disk_sizes")
        return dict(self.sizes)

    def attach(self, session: AgentSession) -> None:
        self.calls.append("attach")
        self.sessions.append(session)

    def detach(self, session: AgentSession) -> None:
        self.calls.append("detach")

    def rejected(self, vm: str, reason: str, kind: str) -> None:
        self.calls.append(f"rejected:{kind}")

    def admit(self, disk: Disk, record: DeletionRecord) -> str | None:
        self.calls.append("admit")
        return "backlog full" if self.backlog_full else None

    def ingest(
        self, disk: Disk, record: DeletionRecord, done: Callable[[int | None, BaseException | None], None]
    ) -> None:
        self.calls.append("ingest")
        self.records.append(record)
        done(len(self.records), None)

    async def room(self) -> None:
        return None


async def serve(path: Path, host: SessionHost, vm: VMInfo) -> asyncio.Server:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await AgentSession(host, vm, reader, writer, "test").run()

    return await asyncio.start_unix_server(handler, str(path))


def test_a_session_needs_only_its_session_host(tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "d.raw", 8 * MiB, [(0, 8 * MiB)])
    data = make_raw_image(tmp_path / "e.raw", 8 * MiB, [(0, 8 * MiB)])
    disks = (
        Disk(vm="vm1", id="disk0", path=image, format="raw", passes_discards=True),
        Disk(vm="vm1", id="data", path=data, format="raw"),
    )
    vm = VMInfo(VMIdentity("vm1"), running=True, disks=disks)
    # The agent's "data" disk is bigger than the image: not this VM's disk of that name.
    host = NotebookHost({"disk0": 8 * MiB, "data": 8 * MiB})

    async def main() -> None:
        server = await serve(tmp_path / "ch.sock", host, vm)
        peer = AgentPeer(
            tmp_path / "ch.sock",
            disks=(HelloDisk(id="disk0", size=8 * MiB, discard=True), HelloDisk(id="data", size=16 * MiB)),
            capabilities=("records", "trim"),
        )
        try:
            welcome = await peer.connect()
            assert welcome is not None
            await eventually(lambda: host.sessions)
            (session,) = host.sessions
            assert session.live
            assert session.mode_of("disk0") == "trim" and session.mode_of("data") == "fence"
            assert session.mode_of("nope") is None
            assert session.mismatch("disk0") is None
            assert "16777216 bytes" in (session.mismatch("data") or "")
            assert not session.can_fence() and session.capability_names() == ["records", "trim"]
            session.stop_trimming("disk0")
            assert session.mode_of("disk0") == "fence"

            good = await peer.send_record([(0, MiB)])
            await peer.wait_answered(good)
            assert good in peer.acked and len(host.records) == 1
            wrong = await peer.send_record([(0, MiB)], disk="data")
            await peer.wait_answered(wrong)
            assert "bytes but the image" in peer.nacked[wrong]
            host.backlog_full = True
            full = await peer.send_record([(MiB, MiB)])
            await peer.wait_answered(full)
            assert "backlog full" in peer.nacked[full] and len(host.records) == 1
        finally:
            await peer.close()
            server.close()
            await server.wait_closed()
        await eventually(lambda: "detach" in host.calls)
        assert not session.live

    asyncio.run(main())
    assert host.calls == [
        "disk_sizes",
        "attach",
        "admit",
        "ingest",
        "rejected:disk_mismatch",
        "admit",
        "rejected:backlog",
        "detach",
    ]
