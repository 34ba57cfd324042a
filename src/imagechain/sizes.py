"""Human sizes in and out (64K, 4GiB, 1.5 MB/s)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable

from .errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Parse a size with an optional binary unit (K, M, G, T; KiB and KB mean the same)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 65536, 64K, 4G)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value != int(value):
        raise UsageError(f"not a whole number of bytes: {text!r}")
    return int(value)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def env_number(var: str, default: float, ok: Callable[[float], bool], expected: str) -> float:
    """A number from the environment variable var, or default when it is unset; a value `ok` refuses (or
    no number at all) is a usage error saying what was expected."""
    text = os.environ.get(var, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not ok(value):
        raise UsageError(f"{var} must be {expected}, not {text!r}")
    return value


def env_seconds(var: str, default: float) -> float:
    """A positive number of seconds from the environment variable var (tests shorten waits so)."""
    return env_number(var, default, lambda v: math.isfinite(v) and v > 0, "a positive number of seconds")


_SECONDS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "500ms", "2m", "1.5h"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?\s*", text.lower())
    if not m:
        raise UsageError(f"not a duration: {text!r} (examples: 30s, 500ms, 2m)")
    return float(m.group(1)) * _SECONDS[m.group(2) or ""]
