"""Configuration files: YAML read with line numbers, validated with pydantic.

One file per side (DESIGN.md section 6): :class:`HostConfig` for ``vmreclaim host`` and
:class:`AgentConfig` for ``vmreclaim agent``. Every driver is chosen by name in a block
such as ``policy: {driver: threshold, ceiling: 0.4}``; the rest of the block is
validated against that driver's own options model (``Driver.Options``). Unknown keys are
errors everywhere. Every problem is reported as ``FILE:LINE: key.path: problem``, all
problems of a file at once, as a :class:`~vmreclaim.core.errors.ConfigError` (exit 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from vmreclaim.core import loader
from vmreclaim.core.driver import DriverOptions
from vmreclaim.core.errors import ConfigError, DriverError

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of config models: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class DriverConfig(BaseModel):
    """A ``{driver: NAME, ...options}`` block; subclasses name the plugin kind.

    After the whole file validates, :func:`resolve_drivers` loads each named driver
    class and validates the block's other keys against its ``Options`` model; the
    result is :attr:`options`.
    """

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[str] = ""

    driver: str = Field(min_length=1)
    _options: DriverOptions | None = PrivateAttr(default=None)

    @property
    def options(self) -> DriverOptions:
        if self._options is None:
            raise RuntimeError(f"{self.kind} driver block {self.driver!r} was not resolved")
        return self._options

    def raw_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class HypervisorConfig(DriverConfig):
    """``hypervisor:`` — how VMs, their disks and channels are found."""

    kind = "hypervisors"


class PolicyConfig(DriverConfig):
    """``policy:`` — whether and when to reclaim."""

    kind = "policies"


class TransportConfig(DriverConfig):
    """``transport:`` / ``channel:`` — the guest/host channel."""

    kind = "transports"


class CaptureConfig(DriverConfig):
    """``capture:`` — how the agent notices deletions."""

    kind = "captures"


class MetricsConfig(StrictModel):
    """The optional Prometheus endpoint of the host daemon."""

    port: int = Field(ge=0, le=65535)
    address: str = "127.0.0.1"


class FenceConfig(StrictModel):
    """How long a guest filesystem may stay frozen for a host punch."""

    lease_seconds: float = Field(default=5.0, gt=0, le=60)
    #: The host stops punching this long before the lease ends (it counts the lease
    #: from when it sent the request; the agent from when it received it).
    margin_seconds: float = Field(default=0.5, ge=0, le=30)

    @model_validator(mode="after")
    def _margin_below_lease(self) -> FenceConfig:
        if self.margin_seconds >= self.lease_seconds:
            raise ValueError(
                f"margin_seconds {self.margin_seconds} leaves nothing of lease_seconds {self.lease_seconds}"
            )
        return self


class ReclaimConfig(StrictModel):
    """When and how much the host daemon reclaims at once."""

    #: Every disk with pending bytes is put to the policy at least this often.
    tick_seconds: float = Field(default=2.0, gt=0, le=3600)
    #: Reclaims running at the same time (each on a different disk).
    parallel: int = Field(default=4, ge=1, le=64)
    #: After a failed or refused reclaim a disk waits 1 s, 2 s, 4 s ... up to this.
    retry_max_seconds: float = Field(default=300.0, gt=0)
    #: How long guest-trim mode may take before the host gives up waiting.
    trim_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    #: VMs are listed again this often, to follow VMs that appear and go.
    rescan_seconds: float = Field(default=30.0, gt=0)


class ReconcileConfig(StrictModel):
    """When the host asks an agent for its disks' whole free space (issue 13)."""

    enabled: bool = True
    #: A disk is reconciled at least this often while its agent is connected.
    interval_seconds: float = Field(default=3600.0, gt=0)
    #: ... and as soon as its image's allocated bytes grew by more than this since then.
    growth_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    #: ... but never more often than this (the operator's request excepted).
    min_gap_seconds: float = Field(default=15.0, ge=0)
    #: How long the host waits for the whole answer (and ``reclaim --wait`` for the punch).
    timeout_seconds: float = Field(default=300.0, gt=0, le=3600)


class HostConfig(StrictModel):
    """``vmreclaim host --config FILE`` (DESIGN.md section 6)."""

    hypervisor: HypervisorConfig
    policy: PolicyConfig = Field(default_factory=lambda: PolicyConfig(driver="threshold"))
    database: Path
    status_socket: Path
    metrics: MetricsConfig | None = None
    fence: FenceConfig = Field(default_factory=FenceConfig)
    reclaim: ReclaimConfig = Field(default_factory=ReclaimConfig)
    reconcile: ReconcileConfig = Field(default_factory=ReconcileConfig)
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    #: ``text``: one ``key=value`` line per event; ``json``: one JSON object per line.
    log_format: str = Field(default="text", pattern="^(text|json)$")


class FilesystemEntry(StrictModel):
    """One guest filesystem the agent watches, and the disk identity it reports."""

    mount: Path
    #: The disk identity records carry; default: the virtual disk's serial number.
    disk: str | None = Field(default=None, min_length=1, max_length=256)


class AgentConfig(StrictModel):
    """``vmreclaim agent --config FILE`` (DESIGN.md section 6)."""

    transport: TransportConfig
    filesystems: list[FilesystemEntry] = Field(min_length=1)
    spool: Path
    capture: CaptureConfig = Field(default_factory=lambda: CaptureConfig(driver="fsmap"))
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    #: At start, report the space that is already free (reclaims existing garbage).
    report_existing_free_space: bool = True
    #: The agent keeps a fence's freeze at most this long, whatever the host asks.
    fence_max_lease_seconds: float = Field(default=10.0, gt=0, le=60)
    #: Unacknowledged records kept in the spool; the oldest are dropped beyond this.
    spool_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)


CONFIG_KINDS: dict[str, type[StrictModel]] = {"host": HostConfig, "agent": AgentConfig}


# -- loading ---------------------------------------------------------------------------------


def load_config(path: str | Path, model: type[M]) -> M:
    """Read, validate and resolve the drivers of a config file, or raise ConfigError."""
    path = Path(path)
    data, lines = read_yaml(path)
    return validate(data, lines, path, model)


def detect_kind(path: str | Path) -> str:
    """``host`` or ``agent``, from the top-level keys of the file."""
    path = Path(path)
    data, _ = read_yaml(path)
    if isinstance(data, dict):
        if "hypervisor" in data:
            return "host"
        if "transport" in data:
            return "agent"
    raise ConfigError(
        [
            f"{path}:1: (top level): neither a host config (it needs 'hypervisor') nor an "
            "agent config (it needs 'transport')"
        ]
    )


def validate(data: Any, lines: dict[Loc, int], path: Path, model: type[M]) -> M:
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(path, lines, (), err) for err in exc.errors()]
        problems += _problems_in_valid_fields(data, lines, path, model)
        raise ConfigError(sorted(set(problems), key=problems.index)) from None
    problems = list(resolve_drivers(config, (), path, lines))
    if problems:
        raise ConfigError(problems)
    return config


def _problems_in_valid_fields(
    data: Any, lines: dict[Loc, int], path: Path, model: type[BaseModel]
) -> list[str]:
    """Driver problems inside the top-level fields that did validate, so that a file
    with one bad top-level key still gets every other problem reported at once."""
    if not isinstance(data, dict):
        return []
    found: list[str] = []
    for name, field in model.model_fields.items():
        if name not in data or field.annotation is None:
            continue
        try:
            value: Any = TypeAdapter(field.annotation).validate_python(data[name])
        except ValidationError:
            continue  # already reported by the whole-model validation
        found += resolve_drivers(value, (name,), path, lines)
    return found


def resolve_drivers(node: Any, loc: Loc, path: Path, lines: dict[Loc, int]) -> Iterator[str]:
    """Load every driver block under ``node`` and validate its options; yield problems."""
    if isinstance(node, DriverConfig):
        try:
            cls = loader.driver_class(node.kind, node.driver)
        except DriverError as exc:
            yield _format(path, lines, (*loc, "driver"), str(exc))
            return
        try:
            node._options = cls.Options.model_validate(node.raw_options())
        except ValidationError as exc:
            for err in exc.errors():
                yield _problem(path, lines, loc, err)
            return
        yield from resolve_drivers(node._options, loc, path, lines)
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from resolve_drivers(getattr(node, name), (*loc, name), path, lines)
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            yield from resolve_drivers(item, (*loc, i), path, lines)
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from resolve_drivers(item, (*loc, str(key)), path, lines)


def _problem(path: Path, lines: dict[Loc, int], prefix: Loc, err: Any) -> str:
    loc = prefix + tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "missing required key"
    else:
        message = err["msg"]
        if "input" in err and not isinstance(err["input"], dict | list):
            message += f" (got {err['input']!r})"
    return _format(path, lines, loc, message)


def _format(path: Path, lines: dict[Loc, int], loc: Loc, message: str) -> str:
    key = ".".join(str(p) for p in loc) or "(top level)"
    return f"{path}:{_line_of(lines, loc)}: {key}: {message}"


def _line_of(lines: dict[Loc, int], loc: Loc) -> int:
    """The line of ``loc``, or of its nearest ancestor that appears in the file."""
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get((), 1)


# -- YAML with line numbers --------------------------------------------------------------------


def read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Parse ``path`` with PyYAML's safe loader and return (data, line of each key path)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}:1: (file): no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}:1: (file): cannot read: {exc}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}:{line}: (syntax): {problem}"]) from None
    if node is None:
        raise ConfigError([f"{path}:1: (top level): the file is empty"])
    lines: dict[Loc, int] = {(): node.start_mark.line + 1}
    _record_lines(node, (), lines)
    data = yaml.safe_load(text)
    return data, lines


def _record_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*loc, str(key_node.value))
            lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = (*loc, i)
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, lines)
