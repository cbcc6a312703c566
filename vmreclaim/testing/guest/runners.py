"""Running a guest: under QEMU with a QMP socket or as a transient libvirt domain, the
``xfer`` share as the mailbox with its script, and a system libvirtd for the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmreclaim.testing.guest.kit import GuestError
from vmreclaim.testing.guest.spec import GuestSpec
from vmreclaim.testing.helpers import require_root, require_tool, run

# -- running a guest -----------------------------------------------------------------------


@dataclass(frozen=True)
class GuestResult:
    """What the guest's script did."""

    returncode: int
    output: str
    console: str
    seconds: float


class Guest(ABC):
    """Common half of a running guest: the ``xfer`` share as a mailbox."""

    def __init__(self, spec: GuestSpec) -> None:
        self.spec = spec
        self.started = 0.0

    @property
    def xfer(self) -> Path:
        return self.spec.xfer

    @abstractmethod
    def is_running(self) -> bool:
        """True while the guest's QEMU process runs."""

    def signal(self, name: str, content: str = "") -> None:
        """Leave file ``name`` for the guest script (written atomically)."""
        tmp = self.xfer / f".{name}.tmp"
        tmp.write_text(content)
        tmp.rename(self.xfer / name)

    def wait_for(self, name: str, timeout: float) -> str:
        """Wait until the guest script writes file ``name``; return its content."""
        path = self.xfer / name
        deadline = time.monotonic() + timeout
        while not path.exists():
            if (self.xfer / "rc").exists() or not self.is_running():
                raise GuestError(f"guest ended before it wrote {name}:\n{self.describe()}")
            if time.monotonic() > deadline:
                raise GuestError(f"guest did not write {name} within {timeout:.0f}s:\n{self.describe()}")
            time.sleep(0.05)
        return path.read_text()

    def result(self) -> GuestResult:
        rc_file = self.xfer / "rc"
        rc = int(rc_file.read_text().strip()) if rc_file.exists() else -1
        return GuestResult(
            returncode=rc,
            output=_read(self.xfer / "output"),
            console=_read(self.spec.console_log),
            seconds=time.monotonic() - self.started,
        )

    def describe(self) -> str:
        res = self.result()
        return (
            f"script exit {res.returncode}\n--- output\n{res.output[-4000:]}\n"
            f"--- console\n{res.console[-3000:]}"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class QemuGuest(Guest):
    """The guest run by ``qemu-system-x86_64`` directly, with a QMP socket."""

    def __init__(self, spec: GuestSpec) -> None:
        super().__init__(spec)
        self.qmp_socket = spec.workdir / "qmp.sock"
        self.qemu_log = spec.workdir / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> QemuGuest:
        require_tool("qemu-system-x86_64")
        self.spec.prepare()
        self.qmp_socket.unlink(missing_ok=True)
        self.started = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self.proc = subprocess.Popen(
                self.spec.qemu_argv(self.qmp_socket),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self.qmp_socket.exists():
            if self.proc.poll() is not None:
                raise GuestError(f"qemu-system-x86_64 exited {self.proc.returncode}: {_read(self.qemu_log)}")
            if time.monotonic() > deadline:
                raise GuestError("qemu-system-x86_64 did not create its QMP socket within 30s")
            time.sleep(0.02)
        return self

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> GuestResult:
        """Wait for the guest to power off; kill it and raise after ``timeout``."""
        assert self.proc is not None, "start() first"
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestError(f"guest still running after {timeout:.0f}s; killed\n{self.describe()}") from None
        return self.result()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> QemuGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class LibvirtGuest(Guest):
    """The guest as a transient libvirt domain (QEMU started by libvirtd)."""

    def __init__(self, spec: GuestSpec, conn: object, name: str) -> None:
        super().__init__(spec)
        self.conn = conn
        self.name = name
        self.domain: object | None = None

    def start(self) -> LibvirtGuest:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
        self.spec.prepare()
        for p in self.spec.ports:
            p.socket.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.domain = self.conn.createXML(self.spec.libvirt_xml(self.name), 0)  # type: ignore[attr-defined]
        return self

    def is_running(self) -> bool:
        import libvirt

        try:
            return bool(self.domain is not None and self.domain.isActive())  # type: ignore[attr-defined]
        except libvirt.libvirtError:
            return False  # a transient domain is gone once it powers off

    def wait(self, timeout: float) -> GuestResult:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                self.kill()
                raise GuestError(f"guest still running after {timeout:.0f}s; destroyed\n{self.describe()}")
            time.sleep(0.1)
        return self.result()

    def kill(self) -> None:
        import libvirt

        if self.domain is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.domain.destroy()  # type: ignore[attr-defined]

    def __enter__(self) -> LibvirtGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# -- images for data disks -----------------------------------------------------------------


def make_ext4_image(path: str | os.PathLike[str], size: int, fmt: str = "qcow2", *, label: str = "") -> Path:
    """A ``fmt`` image (qcow2, raw, or dynamic VHD ``vpc``) of ``size`` bytes holding an
    empty ext4, made with mkfs.ext4 on a sparse raw file and converted by qemu-img."""
    require_tool("mkfs.ext4", "qemu-img")
    path = Path(path)
    raw = path if fmt == "raw" else path.with_suffix(".build.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    # Whole journal and inode tables written now, not lazily by the running guest: the
    # tests then see the guest's own writes and deletes, not mkfs's deferred ones.
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
         *(["-L", label] if label else []), str(raw)])  # fmt: skip
    if fmt != "raw":
        options = ["-o", "subformat=dynamic"] if fmt == "vpc" else []
        run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(raw), str(path)])
        raw.unlink()
    return path


@contextlib.contextmanager
def running_guest(spec: GuestSpec) -> Iterator[QemuGuest]:
    """A started :class:`QemuGuest`, killed on exit."""
    require_root()
    guest = QemuGuest(spec)
    try:
        yield guest.start()
    finally:
        guest.kill()


# -- libvirtd for tests --------------------------------------------------------------------


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _libvirt_answers(uri: str) -> bool:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        return False
    return True


@contextlib.contextmanager
def system_libvirtd(uri: str = "qemu:///system", timeout: float = 30.0) -> Iterator[str]:
    """A libvirtd answering ``uri``: the one already running, or ``virtlogd -d`` and
    ``libvirtd -d`` started here (no systemd) and stopped again on exit.

    Only daemons this call started are stopped, by the pid in their pid file.
    """
    require_root()
    require_tool("libvirtd", "virtlogd")
    if _libvirt_answers(uri):
        yield uri
        return
    started: list[int] = []
    try:
        if _pid_alive(Path("/run/virtlogd.pid")) is None:
            run(["virtlogd", "-d"])
            pid = _wait_pid(Path("/run/virtlogd.pid"), timeout)
            started.append(pid)
        run(["libvirtd", "-d"])
        started.append(_wait_pid(Path("/run/libvirtd.pid"), timeout))
        deadline = time.monotonic() + timeout
        while not _libvirt_answers(uri):
            if time.monotonic() > deadline:
                raise GuestError(f"libvirtd did not answer {uri} within {timeout:.0f}s")
            time.sleep(0.1)
        yield uri
    finally:
        for pid in reversed(started):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.05)


def _wait_pid(pidfile: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        pid = _pid_alive(pidfile)
        if pid is not None:
            return pid
        if time.monotonic() > deadline:
            raise GuestError(f"{pidfile} did not name a live process within {timeout:.0f}s")
        time.sleep(0.05)
