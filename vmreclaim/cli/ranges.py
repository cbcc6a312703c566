"""Guest byte ranges as the operator writes them: ``--range START:LENGTH`` or a ranges file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vmreclaim.core.errors import RangeError, UsageError

if TYPE_CHECKING:
    from vmreclaim.core.ranges import RangeSet


def requested_ranges(args: argparse.Namespace) -> RangeSet:
    """The ranges of ``image reclaim``: every one non-empty, at least one."""
    from vmreclaim.core.ranges import RangeSet

    if args.ranges_file is not None:
        pairs = read_ranges_file(args.ranges_file)
    else:
        pairs = [parse_range(text) for text in args.range]
    if not pairs:
        raise RangeError("no ranges given: use --range START:LENGTH or --ranges-file")
    for start, length in pairs:
        if length <= 0:
            raise RangeError(f"range {start}:{length} is empty or negative")
    return RangeSet.from_ranges(pairs)


def parse_int(text: str, what: str) -> int:
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise RangeError(f"{what} {text!r} is not an integer number of bytes") from None


def parse_range(text: str) -> tuple[int, int]:
    start, sep, length = text.partition(":")
    if not sep:
        raise RangeError(f"range {text!r} is not START:LENGTH")
    return parse_int(start, "range start"), parse_int(length, "range length")


def non_negative(text: str) -> int:
    """``argparse`` type of ``--start`` and ``--length``."""
    value = parse_int(text, "value")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def read_ranges_file(path: Path) -> list[tuple[int, int]]:
    """``[[start, length], ...]`` as JSON, or one ``START:LENGTH`` / ``START LENGTH`` per line."""
    try:
        text = path.read_text(encoding="utf-8") if str(path) != "-" else sys.stdin.read()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ranges file: {exc.strerror}") from exc
    if text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RangeError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        pairs = []
        for i, item in enumerate(doc):
            if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
                raise RangeError(f"{path}: item #{i} is not [start, length] of two integers")
            pairs.append((item[0], item[1]))
        return pairs
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(":", " ").split()
        if len(parts) != 2:
            raise RangeError(f"{path}:{lineno}: expected START:LENGTH, got {line!r}")
        pairs.append(
            (
                parse_int(parts[0], f"{path}:{lineno}: start"),
                parse_int(parts[1], f"{path}:{lineno}: length"),
            )
        )
    return pairs
