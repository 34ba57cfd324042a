"""The block map: for every block of a volume at one point, its kind and digest (and, once resolved
against a chain, where its payload lives). Compact numpy arrays, never per-block Python objects; held
a window at a time, so a map costs memory in proportion to the window, not to the volume."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockMap:
    """Blocks [start, start + count) of a point's map."""

    volume_size: int
    block_size: int
    kind: np.ndarray  # u1[n]
    digest: np.ndarray  # u1[n, 32]; zero for ZERO/UNUSED blocks
    src: np.ndarray | None = None  # u2[n]: position of the payload's point in the lineage
    offset: np.ndarray | None = None  # u8[n]: logical offset of the payload in that point
    length: np.ndarray | None = None  # u4[n]
    codec: np.ndarray | None = None  # u1[n]
    key: np.ndarray | None = None  # u2[n]: which data key of that point sealed the payload (0: its own)
    member: np.ndarray | None = None  # u4[n]: the block's position in its grouped payload (codec 3)
    start: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.kind)

    def key_at(self, i: int) -> int:
        """The data key that sealed row i's payload (an encrypted merged point holds several)."""
        return 0 if self.key is None else int(self.key[i])

    def member_at(self, i: int) -> int:
        return 0 if self.member is None else int(self.member[i])

    def raw_length(self, block: int) -> int:
        return min(self.block_size, self.volume_size - block * self.block_size)


def block_count(volume_size: int, block_size: int) -> int:
    return -(-volume_size // block_size)


def expand_blocks(entries: np.ndarray) -> np.ndarray:
    """Block numbers covered by index entries, runs expanded, in entry order."""
    counts = entries["count"].astype(np.int64)
    if len(counts) and (counts == 1).all():
        return entries["block"].astype(np.int64)
    starts = np.repeat(entries["block"].astype(np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return starts + (np.arange(int(counts.sum()), dtype=np.int64) - first)


def read_breaks(src: np.ndarray, off: np.ndarray, ln: np.ndarray) -> np.ndarray:
    """Where a new read starts among payloads listed in block order (src: which point, off and ln: where in
    it): neighbours in one point whose payloads touch, or that share a grouped payload, are read together."""
    brk = np.ones(len(src), bool)
    brk[1:] = (src[1:] != src[:-1]) | ((off[1:] != off[:-1] + ln[:-1]) & (off[1:] != off[:-1]))
    return brk
