"""Which blocks of a volume hold data its filesystem uses, read from the volume's own structures
(the snapshot or device being imaged, never a live mount): blocks no file or metadata uses are
recorded as UNUSED and never read or stored.

Wrong answers here lose data silently (a used block recorded as unused restores as zeros), so every
parser is conservative: whatever it cannot account for counts as used, and anything unexpected
(a bad magic or checksum, a count that disagrees, a pointer past the volume, a feature it does not
know, a journal that needs replaying) raises `Unusable`, and the backup reads every block instead.

A parser is a function ``parse(area: Area) -> str``: it marks the byte ranges the filesystem uses
with ``area.used`` / ``area.used_units`` and returns a short description for notices ("ext4, 4 KiB
blocks"). Ranges are bytes relative to the start of the area (a partition of a disk, or the whole
volume); they need not be aligned to anything: a block counts as used when any byte of it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class Unusable(Exception):
    """The filesystem's structures cannot be trusted to say what is unused: read every block."""


class UsedMap:
    """Per block of a volume: does the filesystem use any byte of it? One byte per block."""

    def __init__(self, volume_size: int, block_size: int) -> None:
        self.volume_size, self.block_size = volume_size, block_size
        self.used = np.zeros(-(-volume_size // block_size), bool)

    def mark_runs(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """Mark byte ranges [offsets[i], offsets[i] + lengths[i]) used (clipped to the volume)."""
        off = np.asarray(offsets, np.int64)
        ln = np.asarray(lengths, np.int64)
        keep = (ln > 0) & (off < self.volume_size)
        off, ln = off[keep], ln[keep]
        if not len(off):
            return
        if (off < 0).any():
            raise ValueError("negative offset in a used range")
        end = np.minimum(off + ln, self.volume_size)
        first, last = off // self.block_size, (end - 1) // self.block_size
        # merge overlapping and touching runs (sorted by start, each reaching as far as any before it), then
        # mark each merged run with one slice assignment: no temporary as large as the map
        order = np.argsort(first, kind="stable")
        f, reach = first[order], np.maximum.accumulate(last[order])
        head = np.ones(len(f), bool)
        head[1:] = f[1:] > reach[:-1] + 1
        tails = np.append(np.flatnonzero(head)[1:] - 1, len(f) - 1)
        for a, z in zip(f[head].tolist(), reach[tails].tolist(), strict=True):
            self.used[a : z + 1] = True

    def mark(self, offset: int, length: int) -> None:
        self.mark_runs(np.array([offset]), np.array([length]))


@dataclass
class Area:
    """A byte range of the volume that holds one filesystem: what a parser reads and marks."""

    base: int  # byte offset of the area in the volume
    size: int  # bytes
    _read: Callable[[int, int], bytes]  # (volume offset, length) -> bytes
    _map: UsedMap

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the area; Unusable when that passes the area's end."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Unusable(f"a structure lies outside the volume (bytes {offset}..{offset + length} of {self.size})")
        data = self._read(self.base + offset, length)
        if len(data) != length:
            raise Unusable(f"short read at {offset}")
        return data

    def used(self, offset: int, length: int) -> None:
        """Bytes [offset, offset + length) of the area hold something the filesystem uses."""
        self.used_runs(np.array([offset], np.int64), np.array([length], np.int64))

    def used_runs(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        off = np.asarray(offsets, np.int64)
        ln = np.asarray(lengths, np.int64)
        if len(off) and ((off < 0).any() or (off + ln > self.size).any()):
            raise Unusable("a used range lies outside the volume")
        self._map.mark_runs(off + self.base, ln)

    def used_units(self, base: int, unit: int, bits: np.ndarray, first: int = 0) -> None:
        """Units (clusters, filesystem blocks) marked True in `bits` are used: unit `first + i` covers
        bytes [base + (first + i) * unit, + unit) of the area."""
        b = np.asarray(bits, bool)
        if not b.any():
            return
        edges = np.diff(np.concatenate(([0], b.view(np.int8), [0])))
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        self.used_runs(base + (first + starts) * unit, (ends - starts) * unit)


    def heap(self, start: int, unit: int, bits: np.ndarray) -> int:
        """A filesystem laid out as metadata and then a heap of allocation units (FAT, exFAT): everything
        before the heap and past its last unit is used, the heap's units as `bits` say. Returns the units
        in use."""
        self.used(0, start)
        self.used_units(start, unit, bits)
        end = start + len(bits) * unit
        self.used(end, self.size - end)
        return int(np.count_nonzero(bits))


def unit_text(n: int) -> str:
    """An allocation unit's size as a description shows it: 512 B, 4 KiB."""
    return f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


Parser = Callable[[Area], str]


# the module that parses each filesystem kind `fsprobe.probe` reports
_MODULES = {"ext4": "ext4", "xfs": "xfs", "ntfs": "ntfs", "vfat": "fat", "exfat": "exfat"}


def parser(kind: str) -> Parser | None:
    """The parser of a filesystem kind `fsprobe.probe` reports, or None. Only that one module is loaded:
    a backup pays the start-up of the parser it uses, not of all five."""
    name = _MODULES.get(kind)
    if name is None:
        return None
    module = importlib.import_module(f"{__name__}.{name}")
    parse: Parser = module.parse
    return parse
