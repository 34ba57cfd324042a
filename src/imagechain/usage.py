"""What of a volume a backup must read: the blocks its filesystem uses (usedmap), or for a disk with a
partition table, the table, boot code and gaps as they are plus each partition's used blocks.

Anything unknown or untrustworthy is read whole, with a notice that says why: a used-block map may
only ever save work, never decide that data is not worth keeping."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .fsprobe import PROBE_BYTES, probe
from .partitions import TableError, read_table, to_json
from .usedmap import Area, Unusable, UsedMap, parser

Read = Callable[[int, int], bytes]


@dataclass
class Usage:
    used: np.ndarray | None  # bool per block; None: every block is read
    method: str  # how the map was made, for the point's metadata and `info`
    layout: dict[str, object] | None = None  # the partition table (partitions.to_json), partitions annotated
    notices: list[str] = field(default_factory=list)


def _filesystem(read: Read, base: int, size: int, umap: UsedMap, what: str,
                notices: list[str]) -> tuple[str, str, bool]:  # fmt: skip
    """Mark the used bytes of one filesystem of [base, base + size); (kind, method, whether a used-block map
    was made). Unknown, unusable or malformed filesystems are marked used whole."""
    head = read(base, min(size, PROBE_BYTES))
    p = probe(head)
    kind = p.kind if p else ""
    parse = parser(kind)
    if parse is None:
        umap.mark(base, size)
        why = f"no used-block map for {kind}" if kind else "no filesystem recognised"
        notices.append(f"{what}: {why}; every block of it is read")
        return kind, f"all blocks ({why})", False
    try:
        return kind, parse(Area(base, size, read, umap)), True
    except (Unusable, struct.error, ValueError, IndexError, OverflowError) as e:
        # hostile or damaged structures a parser did not foresee fail like the ones it did: read everything
        why = str(e) if isinstance(e, Unusable) else f"malformed structures: {e}"
        umap.mark(base, size)
        notices.append(f"{what}: {kind} used-block map not used ({why}); every block of it is read")
        return kind, f"all blocks ({kind}: {why})", False


def volume_usage(read: Read, size: int, block_size: int, all_blocks: bool = False) -> Usage:
    """The used-block map of a volume read through `read(offset, length)`."""
    notices: list[str] = []
    try:
        table = read_table(read, size)
    except (TableError, struct.error, ValueError, IndexError, OverflowError) as e:  # TableError is a ValueError
        notices.append(f"partition table not used ({e}); every block is read")
        return Usage(None, f"all blocks (partition table: {e})", None, notices)
    if all_blocks:
        layout = to_json(table) if table is not None else None
        return Usage(None, "all blocks (--all-blocks)", layout, notices)
    umap = UsedMap(size, block_size)
    if table is None:
        _kind, method, mapped = _filesystem(read, 0, size, umap, "volume", notices)
        return Usage(umap.used if mapped else None, method, None, notices)
    notices.extend(table.notes)
    layout = to_json(table)
    parts = [p for p in table.partitions if not p.container]
    shown: list[dict[str, object]] = []
    for part in parts:
        kind, method, _mapped = _filesystem(read, part.start, part.size, umap, f"partition {part.number}", notices)
        shown.append({"number": part.number, "fs": kind, "used_map": method})
    _mark_outside(umap, [(p.start, p.size) for p in parts], size)  # table, boot code and gaps: raw
    layout["volumes"] = shown
    return Usage(umap.used, f"{table.kind} partition table, {len(parts)} partition(s)", layout, notices)


def _mark_outside(umap: UsedMap, ranges: list[tuple[int, int]], size: int) -> None:
    """Every byte of the disk outside the given ranges is used: tables, boot code, gaps."""
    pos = 0
    for start, length in sorted(ranges):
        if start > pos:
            umap.mark(pos, start - pos)
        pos = max(pos, start + length)
    if pos < size:
        umap.mark(pos, size - pos)
