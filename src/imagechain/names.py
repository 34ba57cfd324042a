"""File and folder names that are valid on exFAT, FAT32, NTFS, APFS and ext4, on every OS.

User-given names (host, source, chain) appear in paths only sanitized and suffixed with a
short id, so two names never collide, even when they differ only in case; the verbatim names
live in image headers."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {f"{p}{i}" for p in ("COM", "LPT") for i in
                                                                  [*range(1, 10), "¹", "²", "³"]}  # fmt: skip
_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
MAX_COMPONENT = 255
MAX_RELATIVE_PATH = 200  # well under Windows' 260 with the repository's own location in front
LABEL_CHARS = 24


def sanitize(name: str) -> str:
    """A short, plain-ASCII rendering of a user-given name for use inside a path component."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    out = re.sub(r"_+", "_", out).strip("._ -")[:LABEL_CHARS].rstrip("._ -")
    return out or "x"


def component(label: str, ident: str) -> str:
    """`<sanitized label>-<id>`: portable, unique by id, never a reserved device name."""
    out = sanitize(label)
    if out.split(".")[0].upper() in _RESERVED:  # Windows reads "NUL.txt-1234abcd" as the device NUL
        out = f"_{out}"
    return f"{out}-{ident}"


def timestamp(created_us: int) -> str:
    return datetime.fromtimestamp(created_us / 1e6, UTC).strftime("%Y%m%dT%H%M%SZ")


def portability_problems(relpath: str) -> list[str]:
    """Why relpath would not survive on some common filesystem or OS; empty when it is fine."""
    problems = []
    if len(relpath) > MAX_RELATIVE_PATH:
        problems.append(f"path longer than {MAX_RELATIVE_PATH} characters")
    for comp in relpath.split("/"):
        if not comp:
            problems.append("empty component")
            continue
        if len(comp.encode("utf-16-le")) // 2 > MAX_COMPONENT or len(comp.encode()) > MAX_COMPONENT:
            problems.append(f"{comp!r}: longer than {MAX_COMPONENT}")
        if _FORBIDDEN.search(comp):
            problems.append(f"{comp!r}: forbidden character")
        if comp[-1] in ". ":
            problems.append(f"{comp!r}: trailing dot or space")
        if comp in (".", ".."):
            problems.append(f"{comp!r}: dot name")
        if comp.split(".")[0].upper().rstrip(" ") in _RESERVED:
            problems.append(f"{comp!r}: reserved device name")
    return problems


def case_collisions(relpaths: list[str]) -> list[tuple[str, str]]:
    """Pairs of paths that are the same on a case-insensitive filesystem."""
    seen: dict[str, str] = {}
    clashes = []
    for p in relpaths:
        key = p.casefold()
        if key in seen and seen[key] != p:
            clashes.append((seen[key], p))
        seen.setdefault(key, p)
    return clashes
