"""A small host written with vmreclaim.core.protocol: the agent tests' other end.

Not the real host daemon (that is issue 7's); it speaks the protocol exactly as
docs/protocol.md says and lets a test see every line the agent sends.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from vmreclaim.core import protocol as p
from vmreclaim.core.ranges import RangeSet


class Conn:
    """One accepted agent connection; a thread decodes every line into a queue."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.lines: list[bytes] = []
        self.records: dict[int, dict[str, Any]] = {}
        self.auto_ack = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        f = self.sock.makefile("rb")
        try:
            for line in f:
                self.lines.append(line)
                msg = p.decode_from_agent(line)
                if isinstance(msg, p.RecordMessage):
                    self.records[msg.record["seq"]] = msg.record
                    if self.auto_ack:
                        self.send(p.Ack(seq=msg.record["seq"]))
                self.inbox.put(msg)
        except (OSError, ValueError):
            pass
        self.inbox.put(None)

    def send(self, msg: Any) -> None:
        data = msg if isinstance(msg, bytes) else p.encode(msg)
        with self._lock:
            self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> Any:
        return self.inbox.get(timeout=timeout)

    def expect(self, kind: type, timeout: float = 20.0, where: Any = None) -> Any:
        """The next message of ``kind`` (others are kept in ``skipped``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} within {timeout}s")
            try:
                msg = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise AssertionError(f"connection closed while waiting for {kind.__name__}")
            if isinstance(msg, kind) and (where is None or where(msg)):
                return msg

    def handshake(self, vm: str = "vm1", mode: Literal["fence", "trim"] = "fence") -> p.Hello:
        hello: p.Hello = self.expect(p.Hello)
        disks = [p.WelcomeDisk(id=d.id, size=d.size, mode=mode) for d in hello.disks]
        self.send(p.Welcome(v=p.PROTOCOL_VERSION, vm=vm, disks=disks))
        return hello

    def ranges(self, disk: str | None = None) -> RangeSet:
        """Every range of every record received so far."""
        out = RangeSet()
        for rec in list(self.records.values()):
            if disk is None or rec["disk"] == disk:
                out = out.union(RangeSet.from_ranges([tuple(r) for r in rec["ranges"]]))
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class HostPeer:
    """Listens on a unix socket where the agent's ``unix`` transport connects."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)

    def accept(self, timeout: float = 20.0, agent: AgentProcess | None = None) -> Conn:
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise AssertionError(
                f"the agent did not connect within {timeout}s:\n{agent.log if agent else ''}"
            ) from None
        conn.settimeout(None)
        return Conn(conn)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class AgentProcess:
    """``vmreclaim agent --config FILE`` as a real process; its log in ``log_path``."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.config_path = tmp / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmreclaim", "agent", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited {self.proc.returncode} before logging {text!r}:\n{self.log}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not log {text!r} within {timeout}s:\n{self.log}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def running_agent(tmp: Path, config: dict[str, Any]) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp, config).start()
    try:
        yield agent
    finally:
        agent.stop()


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str)
