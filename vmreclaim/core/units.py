"""Byte counts for people (tables, logs); JSON always carries exact integers."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    """``n`` bytes with a binary prefix: ``512 B``, ``1.5 MiB``, ``2.0 TiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable: the loop returns at TiB")
