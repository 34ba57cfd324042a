"""The only module that knows how points relate: discovery of points in a store, linking by
identity (ids and state digests, never paths), and resolution of a point's block map."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .blockmap import BlockMap, block_count, expand_blocks
from .errors import ChainBrokenError, IntegrityError
from .format import spec
from .format.reader import PointFiles, PointReader, SegmentFile, assemble, scan_file
from .stores import TEMP_MARK, Store


@dataclass
class Catalog:
    """Everything found in a store. Incomplete points and temporaries are listed, never used."""

    points: dict[uuid.UUID, PointFiles] = field(default_factory=dict)
    problems: list[tuple[list[str], str]] = field(default_factory=list)  # (files, why)
    leftovers: list[str] = field(default_factory=list)  # temporaries of interrupted writes
    by_file: dict[str, uuid.UUID] = field(default_factory=dict)  # every image file -> its point id

    def chains(self) -> dict[uuid.UUID, list[PointFiles]]:
        out: dict[uuid.UUID, list[PointFiles]] = defaultdict(list)
        for p in self.points.values():
            out[p.header.chain_id].append(p)
        for pts in out.values():
            pts.sort(key=lambda p: p.header.sequence)
        return dict(out)

    def find_chain_line(self, host_id: bytes, source_id: bytes, chain_name: str) -> list[PointFiles]:
        """The newest generation of the named chain of a source: the chain a backup continues."""
        best: list[PointFiles] = []
        for pts in self.chains().values():
            h = pts[-1].header
            if h.host_id == host_id and h.source_id == source_id and h.metadata.get("chain") == chain_name:
                newest = max(p.header.created_us for p in pts)
                if not best or newest > max(p.header.created_us for p in best):
                    best = pts
        return best


def scan(store: Store, prefix: str = "") -> Catalog:
    cat = Catalog()
    groups: dict[uuid.UUID, list[SegmentFile]] = defaultdict(list)
    for entry in store.list(prefix):
        if TEMP_MARK in entry.name.rpartition("/")[2]:
            cat.leftovers.append(entry.name)
            continue
        sf = scan_file(store, entry)
        if sf is None:
            continue
        if sf.seg.number < 0:
            cat.problems.append(([sf.name], sf.problem))
            continue
        groups[sf.seg.point_id].append(sf)
        cat.by_file[sf.name] = sf.seg.point_id
    for pid, files in groups.items():
        pf, why = assemble(pid, files)
        if pf is None:
            cat.problems.append((sorted(f.name for f in files), why))
        else:
            cat.points[pid] = pf
    return cat


def describe(p: PointFiles) -> str:
    return f"point {str(p.point_id)[:8]} ({p.name})"


def lineage(cat: Catalog, point: PointFiles) -> list[PointFiles]:
    """The points from the chain's full point down to `point`, every link checked."""
    out = [point]
    while out[-1].header.parent_id is not None:
        child = out[-1]
        ch = child.header
        assert ch.parent_id is not None
        parent = cat.points.get(ch.parent_id)
        pname = str(ch.metadata.get("parent_file", "?"))
        if parent is None:
            folder = child.name.rpartition("/")[0]
            there = cat.by_file.get(f"{folder}/{pname}" if folder else pname)
            if there is not None and there != ch.parent_id:
                raise ChainBrokenError(
                    f"{describe(child)}: its parent file {pname} now holds point {str(there)[:8]}, not the "
                    f"point {str(ch.parent_id)[:8]} it was made from (replaced by another backup)"
                )
            broken = [w for _files, w in cat.problems if str(ch.parent_id)[:8] in w]
            extra = f"; {broken[0]}" if broken else ""
            raise ChainBrokenError(
                f"{describe(child)}: its parent point {str(ch.parent_id)[:8]} (written as {pname}) "
                f"is missing{extra}"
            )
        ph = parent.header
        if parent.footer.state_digest != ch.parent_state:
            raise ChainBrokenError(
                f"{describe(child)}: parent {describe(parent)} is not the state it was made from "
                f"(altered or replaced)"
            )
        if ph.chain_id != ch.chain_id or ph.sequence + 1 != ch.sequence or ph.block_size != ch.block_size:
            raise ChainBrokenError(f"{describe(child)}: parent {describe(parent)} is from another chain")
        out.append(parent)
        if len(out) > 1_000_000:
            raise ChainBrokenError(f"{describe(point)}: parent links form a loop")
    out.reverse()
    return out


def resolve(store: Store, points: list[PointFiles], locations: bool = True) -> BlockMap:
    """The block map of the last point of a lineage, proven against its state digest."""
    bm: BlockMap | None = None
    for i, pf in enumerate(points):
        bm = _apply(store, bm, pf, i, locations)
    assert bm is not None
    _prove(bm, points[-1])
    return bm


class MapProver:
    """Proves the block maps of many points; a point whose parent was the last one proven costs one
    index read, so a chain proven in order costs one pass over its indexes, not one per point."""

    def __init__(self, store: Store, cat: Catalog) -> None:
        self.store, self.cat = store, cat
        self._bm: BlockMap | None = None
        self._last: uuid.UUID | None = None

    def prove(self, point: PointFiles) -> None:
        points = lineage(self.cat, point)  # every link checked
        base, last = self._bm, self._last
        self._bm, self._last = None, None  # an exception leaves nothing half-applied behind
        if base is not None and len(points) > 1 and points[-2].point_id == last:
            bm = _apply(self.store, base, point, len(points) - 1, False)
        else:
            bm = None
            for i, pf in enumerate(points):
                bm = _apply(self.store, bm, pf, i, False)
        assert bm is not None
        _prove(bm, point)
        self._bm, self._last = bm, point.point_id


def _apply(store: Store, bm: BlockMap | None, pf: PointFiles, i: int, locations: bool) -> BlockMap:
    """Overlay one point's index on the map of its parent (None for a full point)."""
    h = pf.header
    n = block_count(h.volume_size, h.block_size)
    with PointReader(store, pf) as r:
        idx = r.index()
    if bm is None:
        bm = BlockMap(h.volume_size, h.block_size, np.zeros(n, np.uint8), np.zeros((n, 32), np.uint8))
        if locations:
            bm.src, bm.offset = np.zeros(n, np.uint16), np.zeros(n, np.uint64)
            bm.length, bm.codec = np.zeros(n, np.uint32), np.zeros(n, np.uint8)
    else:
        _resize(bm, n)
        bm.volume_size = h.volume_size
    blocks = expand_blocks(idx)
    if len(blocks) and (blocks.min() < 0 or blocks.max() >= n):
        raise IntegrityError(f"{describe(pf)}: index names blocks outside the volume")
    counts = idx["count"].astype(np.int64)
    kinds = np.repeat(idx["kind"], counts)
    if not np.isin(kinds, (spec.BLOCK_DATA, spec.BLOCK_ZERO, spec.BLOCK_UNUSED)).all():
        raise IntegrityError(f"{describe(pf)}: index holds an unknown block kind")
    bm.kind[blocks] = kinds
    bm.digest[blocks] = np.repeat(idx["digest"], counts, axis=0)
    if locations:
        assert bm.src is not None and bm.offset is not None
        assert bm.length is not None and bm.codec is not None
        bm.src[blocks] = i
        bm.offset[blocks] = np.repeat(idx["offset"], counts)
        bm.length[blocks] = np.repeat(idx["length"], counts)
        bm.codec[blocks] = np.repeat(idx["codec"], counts)
    return bm


def _prove(bm: BlockMap, point: PointFiles) -> None:
    if (bm.kind == 0).any():
        raise IntegrityError(f"{describe(point)}: blocks {_first_missing(bm)} are in no point of the chain")
    if bm.state_digest() != point.footer.state_digest:
        raise IntegrityError(f"{describe(point)}: the chain's indexes do not add up to the recorded state digest")


def _first_missing(bm: BlockMap) -> str:
    miss = np.flatnonzero(bm.kind == 0)
    return f"{miss[0]}..{miss[-1]} ({len(miss)} blocks)"


def _resize(bm: BlockMap, n: int) -> None:
    old = bm.count
    if n == old:
        return

    def fit(a: np.ndarray) -> np.ndarray:
        if n < old:
            return a[:n].copy()
        out = np.zeros((n, *a.shape[1:]), a.dtype)
        out[:old] = a
        return out

    bm.kind, bm.digest = fit(bm.kind), fit(bm.digest)
    if bm.src is not None:
        assert bm.offset is not None and bm.length is not None and bm.codec is not None
        bm.src, bm.offset, bm.length, bm.codec = fit(bm.src), fit(bm.offset), fit(bm.length), fit(bm.codec)
