"""Load drivers by name from entry points, with stevedore.

Each plugin kind is an entry-point group ``vmreclaim.<kind>``; the entry point's name is
the value users write in YAML (``policy: {driver: threshold}``). Built-in drivers are
registered in vmreclaim's own ``pyproject.toml`` exactly as a third-party package would
register its own, so every test run proves the plugin path.

A name that is not installed is a :class:`DriverNotFoundError` listing what is; a
driver that fails to import is a :class:`DriverLoadError` naming its package and the
reason. There is no silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from stevedore import DriverManager
from stevedore.exception import NoMatches

from vmreclaim.core.driver import Driver
from vmreclaim.core.errors import DriverLoadError, DriverNotFoundError

if TYPE_CHECKING:
    from vmreclaim.core.options import DriverOptions

#: Every plugin kind, in pipeline order; the folder names under ``vmreclaim/plugins/``.
KINDS = ("captures", "filesystems", "transports", "hypervisors", "policies", "formats")

D = TypeVar("D", bound=Driver)

#: The abstract base class every driver of a kind must subclass, as ``module:Class``;
#: imported on first use so that loading one kind does not import the others.
BASE_CLASSES = {
    "captures": "vmreclaim.core.captures:Capture",
    "filesystems": "vmreclaim.core.filesystems:FilesystemReader",
    "transports": "vmreclaim.core.transports:Transport",
    "hypervisors": "vmreclaim.core.hypervisors:Hypervisor",
    "policies": "vmreclaim.core.policies:Policy",
    "formats": "vmreclaim.core.formats:ImageFormat",
}


def base_class(kind: str) -> type[Driver]:
    """The abstract base class of a plugin kind."""
    module, _, name = BASE_CLASSES[kind].partition(":")
    cls: type[Driver] = getattr(importlib.import_module(module), name)
    return cls


def group(kind: str) -> str:
    """The entry-point group of a plugin kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
    return f"vmreclaim.{kind}"


@dataclass(frozen=True)
class InstalledDriver:
    """One entry point of a plugin kind, as ``vmreclaim plugins`` shows it."""

    kind: str
    name: str
    target: str
    distribution: str
    version: str
    error: str | None = None


def installed(kind: str) -> list[InstalledDriver]:
    """Every driver registered for ``kind``, sorted by name, import errors included."""
    found = []
    for ep in importlib.metadata.entry_points(group=group(kind)):
        dist = ep.dist
        found.append(
            InstalledDriver(
                kind=kind,
                name=ep.name,
                target=ep.value,
                distribution=dist.metadata["Name"] if dist is not None else "?",
                version=dist.version if dist is not None else "?",
                error=_import_error(ep),
            )
        )
    return sorted(found, key=lambda d: d.name)


def _import_error(ep: importlib.metadata.EntryPoint) -> str | None:
    try:
        ep.load()
    except Exception as exc:  # any import-time failure is reported, not raised
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.cache
def names(kind: str) -> tuple[str, ...]:
    """Names of the drivers registered for ``kind``, without importing any of them.

    Scanned once per process: entry points do not change while a process runs, and a
    short command should not pay for the scan twice.
    """
    return tuple(sorted({ep.name for ep in importlib.metadata.entry_points(group=group(kind))}))


def driver_class(kind: str, name: str, base: type[Driver] | None = None) -> type[Driver]:
    """The class registered as ``name`` for ``kind``, checked to subclass ``base``
    (by default the kind's base class)."""
    base = base or base_class(kind)
    manager = _manager(kind, name)
    cls = manager.driver
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise DriverLoadError(
            f"{kind} driver {name!r} ({manager.extensions[0].entry_point.value}) is not a "
            f"subclass of {base.__module__}.{base.__qualname__}"
        )
    return cls


def load_driver(kind: str, name: str, base: type[D], options: DriverOptions | None = None) -> D:
    """An instance of driver ``name`` of ``kind``, built with its validated options."""
    cls = driver_class(kind, name, base)
    assert issubclass(cls, base)
    if options is not None and not isinstance(options, cls.Options):
        raise DriverLoadError(
            f"{kind} driver {name!r} expects options {cls.Options.__name__}, got {type(options).__name__}"
        )
    try:
        return cls(options)
    except DriverLoadError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise DriverLoadError(f"{kind} driver {name!r} failed to start: {exc}") from exc


def load_all(kind: str, base: type[D]) -> dict[str, D]:
    """One default-configured instance of every driver of ``kind`` (format probing,
    filesystem detection).

    Every installed driver must load. Skipping one that fails to import would change
    decisions silently: without the qcow2 driver the catch-all raw driver claims a
    qcow2 file and its header is punched as data; without the ext reader a volume's
    free space is judged by whatever else answers. So the first failure is raised as
    :class:`DriverLoadError` (exit 2), naming the driver, its package and the error.
    """
    return {name: load_driver(kind, name, base) for name in names(kind)}


@functools.cache
def _manager(kind: str, name: str) -> Any:
    def fail(_manager: Any, entry_point: Any, exc: BaseException) -> None:
        dist = getattr(entry_point, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "?"
        raise DriverLoadError(
            f"{kind} driver {name!r} from package {package} ({entry_point.value}) failed to "
            f"load: {type(exc).__name__}: {exc}"
        ) from exc

    try:
        return DriverManager(
            namespace=group(kind),
            name=name,
            invoke_on_load=False,
            on_load_failure_callback=fail,
        )
    except NoMatches as exc:
        raise DriverNotFoundError(kind, name, list(names(kind))) from exc


__all__ = [
    "KINDS",
    "InstalledDriver",
    "driver_class",
    "group",
    "installed",
    "load_all",
    "load_driver",
    "names",
]
