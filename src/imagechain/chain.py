"""The only module that knows how points relate: discovery of points in a store, the tree their parent
links make (forks, tips, generations), and the block maps of points, streamed a window at a time."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from .blockmap import BlockMap, block_count, expand_blocks
from .errors import ChainBrokenError, IntegrityError
from .format import spec
from .format.reader import PointFiles, PointReader, SegmentFile, assemble, scan_file
from .state import StateHasher
from .stores import Store, StoreEntry, temporary_of

RETIRED = "retired"  # folder of a repository where consolidation moves the files it replaced (docs/CLI.md)
WINDOW_BLOCKS = 1 << 16  # 64 Ki blocks (4 GiB of volume at 64 KiB): ~2 MiB of map, ~3 MiB with locations
FOLLOWS = "follows_chain"  # metadata of a --full point: the chain id of the generation it replaces


def chain_name(p: PointFiles) -> str:
    return str(p.header.metadata.get("chain", ""))


def describe(p: PointFiles) -> str:
    return f"point {str(p.point_id)[:8]} ({p.name})"


@dataclass
class Catalog:
    """Everything found in a store. Only `points` are ever read for data."""

    points: dict[uuid.UUID, PointFiles] = field(default_factory=dict)
    damaged: dict[uuid.UUID, tuple[list[str], str]] = field(default_factory=dict)  # footer there, not provable
    claims: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID | None, int]] = field(default_factory=dict)  # of damaged
    salvageable: dict[uuid.UUID, PointFiles] = field(default_factory=dict)  # damaged only in the header
    problems: list[tuple[list[str], str]] = field(default_factory=list)  # (files, why): not points at all
    leftovers: list[str] = field(default_factory=list)  # temporaries of interrupted writes
    incomplete: dict[uuid.UUID, list[str]] = field(default_factory=dict)  # published files of unfinished points
    notices: list[str] = field(default_factory=list)  # ignored copies, misnamed segments
    by_file: dict[str, uuid.UUID] = field(default_factory=dict)  # every image file -> its point id
    listed: set[str] = field(default_factory=set)  # every file the scan listed (a remote exists() costs a trip)
    # consolidation (format 1.4): a point id that a merged point replaced -> the merged point, and the
    # replaced points whose files are still there (a consolidation stopped before retiring them)
    stand_ins: dict[uuid.UUID, PointFiles] = field(default_factory=dict)
    superseded: dict[uuid.UUID, PointFiles] = field(default_factory=dict)
    # files left of a replaced point whose retiring was stopped part-way (some segments moved, some not)
    remnants: dict[uuid.UUID, list[str]] = field(default_factory=dict)

    def resolve(self, point_id: uuid.UUID) -> PointFiles | None:
        """The point with this id, or the merged point that stands in for it."""
        return self.points.get(point_id) or self.stand_ins.get(point_id)

    def with_salvaged(self) -> Catalog:
        """This catalog with the points damaged only in their header taken as points (restore --salvage):
        what is restored from them is still proven by every block digest and the state digest."""
        return replace(self, points={**self.points, **self.salvageable},
                       damaged={k: v for k, v in self.damaged.items() if k not in self.salvageable})  # fmt: skip

    # -- the tree -------------------------------------------------------------------------------------
    @cached_property
    def children(self) -> dict[uuid.UUID, list[PointFiles]]:
        out: dict[uuid.UUID, list[PointFiles]] = defaultdict(list)
        for p in self.points.values():
            pid = p.header.parent_id
            parent = self.resolve(pid) if pid is not None else None
            if parent is not None and parent.header.chain_id == p.header.chain_id:
                out[parent.point_id].append(p)
        for kids in out.values():
            kids.sort(key=_order)
        return dict(out)

    def generations(self) -> dict[uuid.UUID, list[PointFiles]]:
        """Points by chain id (one generation of a named chain), in sequence order."""
        out: dict[uuid.UUID, list[PointFiles]] = defaultdict(list)
        for p in self.points.values():
            out[p.header.chain_id].append(p)
        for pts in out.values():
            pts.sort(key=_order)
        return dict(out)

    def tips(self, pts: list[PointFiles]) -> list[PointFiles]:
        """Points of a generation that nothing continues: the ends of its branches."""
        return [p for p in pts if p.point_id not in self.children]

    def forks(self, pts: list[PointFiles]) -> list[tuple[PointFiles, list[PointFiles]]]:
        """(parent, children) for every point of a generation continued more than once."""
        return [(p, self.children[p.point_id]) for p in pts if len(self.children.get(p.point_id, ())) > 1]

    def named_chains(self) -> dict[tuple[bytes, bytes, str], list[list[PointFiles]]]:
        """Generations grouped by (host id, source id, chain name), each under the host of its newest point:
        a chain continued by another machine (backup --parent) is that machine's from then on."""
        out: dict[tuple[bytes, bytes, str], list[list[PointFiles]]] = defaultdict(list)
        for pts in self.generations().values():
            h = pts[-1].header
            out[(h.host_id, h.source_id, chain_name(pts[-1]))].append(pts)
        return dict(out)

    def damaged_after(self, tip: PointFiles) -> list[tuple[str, str]]:
        """Damaged points that claim to continue the lineage ending at tip: (first file, why). A selector
        of the newest point must not silently fall back to tip when the newest file is one of these."""
        out = []
        for pid, (chain_id, parent_id, seq) in self.claims.items():
            if pid not in self.damaged:
                continue  # taken as a point after all (--salvage)
            if chain_id == tip.header.chain_id and (parent_id == tip.point_id or seq > tip.header.sequence):
                files, why = self.damaged[pid]
                out.append((files[0], why))
        return out

    def find_generation(self, host_id: bytes, source_id: bytes, name: str) -> list[PointFiles]:
        """The newest generation of the named chain of a source: the one a backup continues."""
        return newest_generation(self.named_chains().get((host_id, source_id, name), []))

    # -- lineages -------------------------------------------------------------------------------------
    def ancestry(self, point: PointFiles) -> list[PointFiles]:
        """The points from the oldest reachable ancestor down to `point`, following parent links as far as
        they lead (no check beyond the link itself; see lineage)."""
        out = [point]
        seen = {point.point_id}
        while out[-1].header.parent_id is not None:
            parent = self.resolve(out[-1].header.parent_id)
            if parent is None or parent.point_id in seen or not _links(out[-1], parent):
                break
            out.append(parent)
            seen.add(parent.point_id)
        out.reverse()
        return out

    def lineage(self, point: PointFiles) -> list[PointFiles]:
        """The points from the chain's full point down to `point`, every link checked."""
        out = self.ancestry(point)
        top = out[0]
        ch = top.header
        if ch.parent_id is None:
            return out
        parent = self.resolve(ch.parent_id)
        pname = str(ch.metadata.get("parent_file", "?"))
        if parent is not None:
            if parent.footer.state_digest != ch.parent_state:
                raise ChainBrokenError(f"{describe(top)}: parent {describe(parent)} is not the state it was made "
                                       f"from (altered or replaced)")  # fmt: skip
            if any(p.point_id == parent.point_id for p in out):
                raise ChainBrokenError(f"{describe(point)}: parent links form a loop")
            raise ChainBrokenError(f"{describe(top)}: parent {describe(parent)} is from another chain")
        if ch.parent_id in self.damaged:
            raise ChainBrokenError(f"{describe(top)}: its parent is damaged: {self.damaged[ch.parent_id][1]}")
        folder = top.name.rpartition("/")[0]
        there = self.by_file.get(f"{folder}/{pname}" if folder else pname)
        if there is not None and there != ch.parent_id:
            raise ChainBrokenError(
                f"{describe(top)}: its parent file {pname} now holds point {str(there)[:8]}, not the "
                f"point {str(ch.parent_id)[:8]} it was made from (replaced by another backup)"
            )
        broken = [w for _files, w in self.problems if str(ch.parent_id)[:8] in w]
        extra = f"; {broken[0]}" if broken else ""
        raise ChainBrokenError(
            f"{describe(top)}: its parent point {str(ch.parent_id)[:8]} (written as {pname}) is missing{extra}"
        )


def _order(p: PointFiles) -> tuple[int, int, str]:
    return (p.header.sequence, p.header.created_us, p.point_id.hex)


def merged_ids(p: PointFiles) -> set[uuid.UUID]:
    """The points a merged point replaced (metadata `merged`, format 1.4); empty for any other point."""
    ids = p.header.metadata.get("merged")
    out = set()
    for x in ids if isinstance(ids, list) else []:
        try:
            out.add(uuid.UUID(hex=str(x)))
        except ValueError:
            continue
    return out


def _links(child: PointFiles, parent: PointFiles) -> bool:
    """A child links to the point it was made from, or to the merged point that replaced it: the same
    chain, block size and state, one sequence number on (a merged point keeps its last point's)."""
    ch, ph = child.header, parent.header
    named = ch.parent_id == parent.point_id or (ch.parent_id is not None and ch.parent_id in merged_ids(parent))
    first = ch.metadata.get("merged_first_sequence", ch.sequence)  # a merged child: its run's first point's
    return (named and parent.footer.state_digest == ch.parent_state and ph.chain_id == ch.chain_id
            and ph.sequence + 1 == first and ph.block_size == ch.block_size)  # fmt: skip


def newest_generation(gens: list[list[PointFiles]]) -> list[PointFiles]:
    """The generation no other one follows. A --full point records the generation it replaces, so a
    clock set back cannot hide it; only unrelated generations (merged repositories) fall back to time."""
    if not gens:
        return []
    followed = {str(p.header.metadata.get(FOLLOWS)) for pts in gens for p in pts if p.header.metadata.get(FOLLOWS)}
    heads = [pts for pts in gens if pts[0].header.chain_id.hex not in followed] or gens
    return max(heads, key=lambda pts: (max(p.header.created_us for p in pts), pts[0].header.chain_id.hex))


SCAN_THREADS = 16  # concurrent header reads of a remote store's files the catalog cache lacks


def scan(store: Store, prefix: str = "") -> Catalog:
    cat = Catalog()
    groups: dict[uuid.UUID, list[SegmentFile]] = defaultdict(list)
    entries = []
    for entry in store.list(prefix):
        if entry.name.startswith(RETIRED + "/"):
            continue  # files of merged-away points, kept a while for readers that had listed them
        cat.listed.add(entry.name)
        if temporary_of(entry.name.rpartition("/")[2]) is not None:
            cat.leftovers.append(entry.name)
            continue
        entries.append(entry)
    for sf in _scan_files(store, entries, prefix):
        if sf is None:
            continue
        if sf.seg.number < 0:
            cat.problems.append(([sf.name], sf.problem))
            continue
        groups[sf.seg.point_id].append(sf)
        cat.by_file[sf.name] = sf.seg.point_id
    for pid, files in groups.items():
        a = assemble(pid, files)
        cat.notices.extend(a.notices)
        names = sorted(f.name for f in files)
        if a.point is not None:
            cat.points[pid] = a.point
        elif a.damaged:
            cat.damaged[pid] = (names, a.damaged)
            if a.salvage is not None:
                cat.salvageable[pid] = a.salvage
            for f in files:  # which chain it claims to continue, from its header, proven or not
                claim = (f.header.chain_id, f.header.parent_id, f.header.sequence) if f.header else f.claim
                if claim is not None:
                    cat.claims[pid] = claim
                    break
        else:
            cat.problems.append((names, a.incomplete))
            cat.incomplete[pid] = names
    _merge_stand_ins(cat)
    return cat


def _scan_files(store: Store, entries: list[StoreEntry], prefix: str) -> list[SegmentFile | None]:
    """scan_file of every entry: directly for a local store; for a remote one, from the catalog cache where
    it holds the file, the rest read concurrently and then remembered."""
    if not store.remote:
        return [scan_file(store, e) for e in entries]
    from .catalog_cache import CatalogCache, Recorder

    cache = CatalogCache(store)
    try:
        known = cache.lookup(entries)
        recorders = [Recorder(store, e, known.get(e.name)) for e in entries]
        with ThreadPoolExecutor(SCAN_THREADS) as pool:
            files = list(pool.map(lambda r: scan_file(r, r.entry), recorders))
        fresh = {}
        for r, sf in zip(recorders, files, strict=True):
            if sf is not None:
                sf.summary_raw = r.summary_of(sf)
            kept = r.keep(sf)
            if kept is not None:
                fresh[r.entry] = kept
        cache.update(fresh, entries, prefix)
        return files
    finally:
        cache.close()


def _merge_stand_ins(cat: Catalog) -> None:
    """Merged points stand in for the points they replaced; replaced points still present (their
    consolidation was stopped before it retired them) leave the tree, so that the chain shows no fork,
    and wait in `superseded` for the next consolidation to retire them."""
    for p in list(cat.points.values()):
        for old in merged_ids(p):
            have = cat.stand_ins.get(old)
            if have is None or len(merged_ids(have)) < len(merged_ids(p)):  # a later merge replaces more
                cat.stand_ins[old] = p
    for old in list(cat.stand_ins):
        if old in cat.points and cat.points[old].point_id != cat.stand_ins[old].point_id:
            cat.superseded[old] = cat.points.pop(old)
    # a replaced point that is no longer whole lost segments to retired/ (moved first to last): not damage
    # to report, but files the next consolidation retires with the rest
    for old in [d for d in [*cat.damaged, *cat.incomplete] if d in cat.stand_ins]:
        files = cat.damaged.pop(old)[0] if old in cat.damaged else cat.incomplete.pop(old)
        cat.problems = [(f, why) for f, why in cat.problems if f != files]
        cat.claims.pop(old, None)
        cat.salvageable.pop(old, None)
        cat.remnants[old] = files
        cat.notices.append(f"{len(files)} file(s) left of point {str(old)[:8]}, which merged point "
                           f"{str(cat.stand_ins[old].point_id)[:8]} replaced (its retiring was stopped part-way); "
                           f"the next consolidation of the chain retires them")  # fmt: skip


# -- block maps, a window at a time ------------------------------------------------------------------
class _Cursor:
    """One point's index entries in block order, handed out window by window (runs split at the edge).
    Holds the frames that reach into the current window and at most one frame beyond it."""

    def __init__(self, reader: PointReader, point: PointFiles, from_block: int = 0) -> None:
        self._it = reader.iter_index(from_block)
        self._frames: list[np.ndarray] = []
        self._end = 0  # end of the last entry seen: entries must ascend without overlap
        self.point = point

    def _more(self) -> bool:
        nxt = next(self._it, None)
        if nxt is None:
            return False
        if len(nxt):
            start = nxt["block"].astype(np.int64)
            ends = start + nxt["count"]
            if start[0] < self._end or (start[1:] < ends[:-1]).any() or (nxt["count"] == 0).any():
                raise IntegrityError(f"{describe(self.point)}: index entries are out of order or overlap")
            self._end = int(ends[-1])
            self._frames.append(nxt)
        return True

    def take(self, s: int, e: int) -> np.ndarray:
        """Entries covering blocks in [s, e), clipped to it; windows must be asked for in order."""
        while self._end < e and self._more():
            pass
        if not self._frames:
            return np.zeros(0, spec.INDEX_ENTRY)
        b = self._frames[0] if len(self._frames) == 1 else np.concatenate(self._frames)
        start = b["block"].astype(np.int64)
        k = int(np.searchsorted(start, e))
        part = b[:k].copy()
        rest = b[k:]
        if k:
            last_end = int(start[k - 1]) + int(part["count"][-1])
            if last_end > e:  # a run that goes on into the next window
                tail = part[-1:].copy()
                tail["block"], tail["count"] = e, last_end - e
                part[-1]["count"] = e - int(start[k - 1])
                rest = np.concatenate([tail, rest])
        self._frames = [rest] if len(rest) else []
        if len(part) and int(part["block"][0]) < s:
            ends = part["block"].astype(np.int64) + part["count"]
            part = part[ends > s]
            if len(part) and int(part["block"][0]) < s:
                part[0]["count"] -= s - int(part["block"][0])
                part[0]["block"] = s
        return part


class MapStream:
    """The block maps of a lineage's points, built window by window from their indexes: memory follows
    the window and one index frame per point, never the volume.

    `windows()` yields the map of the last point (with payload locations if asked) and proves it against
    the point's state digest at the end; `prove_all()` proves every point of the lineage in one pass."""

    def __init__(self, store: Store, points: list[PointFiles], *, locations: bool = False,
                 window: int | None = None) -> None:  # fmt: skip
        self.points, self.locations, self.window = points, locations, window or WINDOW_BLOCKS
        self.readers = [PointReader(store, p) for p in points]
        self.counts = [block_count(p.header.volume_size, p.header.block_size) for p in points]

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> MapStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _empty(self, s: int, e: int) -> BlockMap:
        last = self.points[-1].header
        n = e - s
        bm = BlockMap(last.volume_size, last.block_size, np.zeros(n, np.uint8), np.zeros((n, 32), np.uint8), start=s)
        if self.locations:
            bm.src, bm.offset = np.zeros(n, np.uint16), np.zeros(n, np.uint64)
            bm.length, bm.codec = np.zeros(n, np.uint32), np.zeros(n, np.uint8)
            bm.key, bm.member = np.zeros(n, np.uint16), np.zeros(n, np.uint32)
        return bm

    def _apply(self, bm: BlockMap, i: int, cur: _Cursor) -> None:
        """Overlay point i (cut to its own block count first) on the window."""
        s, e, ni = bm.start, bm.end, self.counts[i]
        if ni < e:
            cut = max(0, ni - s)
            bm.kind[cut:] = 0
            bm.digest[cut:] = 0
        ent = cur.take(s, e)
        if not len(ent):
            return
        p = self.points[i]
        if int(ent["block"][-1]) + int(ent["count"][-1]) > ni:
            raise IntegrityError(f"{describe(p)}: index names blocks outside the volume")
        counts = ent["count"].astype(np.int64)
        kinds = np.repeat(ent["kind"], counts)
        if not np.isin(kinds, (spec.BLOCK_DATA, spec.BLOCK_ZERO, spec.BLOCK_UNUSED)).all():
            raise IntegrityError(f"{describe(p)}: index holds an unknown block kind")
        rel = expand_blocks(ent) - s
        bm.kind[rel] = kinds
        bm.digest[rel] = np.repeat(ent["digest"], counts, axis=0)
        if bm.src is not None:
            assert bm.offset is not None and bm.length is not None and bm.codec is not None
            bm.src[rel] = i
            bm.offset[rel] = np.repeat(ent["offset"], counts)
            bm.length[rel] = np.repeat(ent["length"], counts)
            bm.codec[rel] = np.repeat(ent["codec"], counts)
            assert bm.key is not None and bm.member is not None
            bm.key[rel] = np.repeat(ent["key"], counts)
            bm.member[rel] = np.repeat(ent["member"], counts)

    def windows(self) -> Iterator[BlockMap]:
        cursors = [_Cursor(r, p) for r, p in zip(self.readers, self.points, strict=True)]
        last = self.points[-1]
        hasher = StateHasher(last.header.volume_size, last.header.block_size)
        n = self.counts[-1]
        for s in range(0, n, self.window):
            bm = self._empty(s, min(n, s + self.window))
            for i, cur in enumerate(cursors):
                self._apply(bm, i, cur)
            _check_defined(bm, last)
            hasher.update(bm.kind, bm.digest)
            yield bm
        if hasher.digest() != last.footer.state_digest:
            raise IntegrityError(f"{describe(last)}: the chain's indexes do not add up to the recorded state digest")

    def prove(self) -> None:
        for _ in self.windows():
            pass

    def overlay_windows(self) -> Iterator[BlockMap]:
        """The points overlaid in order (the newest entry of a block wins), window by window, with no
        block required to be defined and no state proven: a run of points that does not start at the
        full point defines only the blocks it changed (consolidation)."""
        cursors = [_Cursor(r, p) for r, p in zip(self.readers, self.points, strict=True)]
        n = self.counts[-1]
        for s in range(0, n, self.window):
            bm = self._empty(s, min(n, s + self.window))
            for i, cur in enumerate(cursors):
                self._apply(bm, i, cur)
            yield bm

    def window_at(self, s: int, e: int) -> BlockMap:
        """The last point's map of blocks [s, e), read from the index frames that cover them only (random
        access: a point view of a multi-TiB chain reads what is looked at). Frames are proven against
        their directory as they are read; the state digest needs the whole map, which this never reads."""
        e = min(e, self.counts[-1])
        bm = self._empty(s, e)
        for i, (r, p) in enumerate(zip(self.readers, self.points, strict=True)):
            self._apply(bm, i, _Cursor(r, p, s))
        _check_defined(bm, self.points[-1])
        return bm

    def prove_all(self, skip: set[uuid.UUID] | frozenset[uuid.UUID] = frozenset()) -> dict[uuid.UUID, str]:
        """Prove the map of every point of the lineage not in skip: {point id: problem, '' when proven}.
        A point whose own map fails takes its descendants with it: they are built on it."""
        cursors = [_Cursor(r, p) for r, p in zip(self.readers, self.points, strict=True)]
        hashers = [StateHasher(p.header.volume_size, p.header.block_size) for p in self.points]
        failed: dict[int, str] = {}
        alive = len(self.points)
        for s in range(0, max(self.counts), self.window):
            bm = self._empty(s, min(max(self.counts), s + self.window))
            for i in range(alive):
                try:
                    self._apply(bm, i, cursors[i])
                    upto = max(0, min(bm.end, self.counts[i]) - s)
                    if upto:
                        _check_defined(BlockMap(0, 0, bm.kind[:upto], bm.digest[:upto], start=s), self.points[i])
                except IntegrityError as e:
                    failed[i] = str(e)
                    alive = i
                    break
                hashers[i].update(bm.kind[:upto], bm.digest[:upto])
        out: dict[uuid.UUID, str] = {}
        for i, p in enumerate(self.points):
            if p.point_id in skip:
                continue
            if i in failed:
                out[p.point_id] = failed[i]
            elif i > alive:
                out[p.point_id] = f"builds on {describe(self.points[alive])}, which is damaged"
            elif hashers[i].digest() != p.footer.state_digest:
                out[p.point_id] = f"{describe(p)}: the chain's indexes do not add up to the recorded state digest"
            else:
                out[p.point_id] = ""
        return out


def _check_defined(bm: BlockMap, point: PointFiles) -> None:
    miss = np.flatnonzero(bm.kind == 0)
    if len(miss):
        raise IntegrityError(f"{describe(point)}: blocks {bm.start + miss[0]}..{bm.start + miss[-1]} "
                             f"({len(miss)} in this range) are in no point of the chain")  # fmt: skip
