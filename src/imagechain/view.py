"""A read-only point view: random access to any byte of a point's volume, through its chain.

FUSE mounts, the NBD server and exports are thin adapters over this. Opening a view reads headers and
footers only; the block map is resolved a window at a time from the index frames that cover what is
read (the frame directory finds them), and kept in a small LRU. Blocks are fetched (neighbours in one
read), decrypted, decoded and proven against their digest on worker threads, kept in an LRU of decoded
blocks, and read ahead when access is sequential. A grouped payload (format 1.5) is decoded once for the
blocks of it that are read together; those decoded along but not asked for are proven when first read. A
block that fails its proof is never served: the read raises IntegrityError naming the block and file (FUSE
and NBD answer EIO for that range only)."""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .blockmap import BlockMap, block_count, read_breaks
from .chain import Catalog, MapStream
from .errors import ImagechainError, IntegrityError, RepositoryError, UsageError
from .format import spec
from .format.reader import PointFiles, PointReader
from .keyring import Keyring
from .payload import BlockOpener
from .repository import Repository

WINDOW_BLOCKS = 1 << 14  # map windows resolved at a time: 1 GiB of volume at 64 KiB blocks, ~0.8 MiB of map
MAP_WINDOWS = 16  # windows kept
CACHE_BYTES = 128 << 20  # decoded blocks kept
RUN_BLOCKS = 8  # neighbouring blocks fetched and decoded as one job (a large read becomes several, in parallel)
STREAMS = 16  # sequential readers followed at once (NBD clients open several connections)
TOUCHED_GROUPS = 8  # grouped payloads remembered as read lately: the second read of one decodes all of it
ERRORS_KEPT = 100
READ_AHEAD_MAX = 16 << 20  # bytes read ahead of a sequential reader, at most
DATA, ZERO, UNUSED = spec.BLOCK_DATA, spec.BLOCK_ZERO, spec.BLOCK_UNUSED


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    kind: int  # spec.BLOCK_DATA, BLOCK_ZERO or BLOCK_UNUSED


class _Bad:
    """A block that could not be served: what to say when it is read. A transient failure (the
    repository could not be read) is not kept: the next read tries again."""

    def __init__(self, message: str, transient: bool = False) -> None:
        self.message, self.transient = message, transient


class _Unproven:
    """A block decoded with its group for a later read, not yet proven: proving costs a digest of the block,
    paid only if it is read (a random read decodes a whole group, but hashes only what it asked for)."""

    def __init__(self, raw: bytes, digest: bytes, where: str) -> None:
        self.raw, self.digest, self.where = raw, digest, where


_Got = bytes | _Bad | _Unproven


class PointView:
    """Random read access to one point's volume. Thread-safe: FUSE and NBD serve many readers at once."""

    def __init__(self, repo: Repository, point: PointFiles, *, cat: Catalog | None = None,
                 keyring: Keyring | None = None, threads: int = 4, cache_bytes: int = CACHE_BYTES,
                 on_error: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.repo, self.point = repo, point
        self.points = (cat or repo.catalog()).lineage(point)
        (keyring or Keyring()).unlock_all(self.points)
        h = point.header
        self.size, self.block_size = h.volume_size, h.block_size
        self.blocks = block_count(self.size, self.block_size)
        self.keys = self.points[-1].keys
        self._maps = MapStream(repo.store, self.points, locations=True)
        self._readers = [PointReader(repo.store, p) for p in self.points]
        self._map_lru: OrderedDict[int, BlockMap] = OrderedDict()
        self._map_locks: dict[int, threading.Lock] = {}
        self._cache: OrderedDict[int, Future[_Got]] = OrderedDict()
        self._cache_cap = max(64, cache_bytes // self.block_size)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="view")
        # sequential readers, by where their last read ended: (blocks to keep ahead, scheduled up to)
        self._streams: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._touched: OrderedDict[tuple[int, int], None] = OrderedDict()  # groups read lately: (src, offset)
        self._zero = bytes(self.block_size)
        self.on_error = on_error
        self.errors: list[str] = []
        self._opener = BlockOpener(self.keys)

    # -- the map

    def _window(self, w: int) -> BlockMap:
        with self._lock:
            bm = self._map_lru.get(w)
            if bm is not None:
                self._map_lru.move_to_end(w)
                return bm
            lock = self._map_locks.setdefault(w, threading.Lock())
        with lock:  # one resolution per window, however many readers want it
            with self._lock:
                bm = self._map_lru.get(w)
            if bm is None:
                bm = self._maps.window_at(w * WINDOW_BLOCKS, (w + 1) * WINDOW_BLOCKS)
                with self._lock:
                    self._map_lru[w] = bm
                    while len(self._map_lru) > MAP_WINDOWS:
                        self._map_lru.popitem(last=False)
            return bm

    def extents(self, offset: int, length: int) -> list[Extent]:
        """What [offset, offset + length) holds, as runs of DATA, ZERO and UNUSED (for NBD block status
        and sparse exports); the last run may end past the range, at a block edge."""
        end = min(self.size, offset + length)
        out: list[Extent] = []
        b = offset // self.block_size
        bs = self.block_size
        while b * bs < end:
            bm = self._window(b // WINDOW_BLOCKS)
            last = min(bm.end, -(-end // bs))
            kinds = bm.kind[b - bm.start : last - bm.start]
            edges = np.flatnonzero(np.diff(kinds)) + 1
            for a, z in zip(np.concatenate(([0], edges)).tolist(), np.concatenate((edges, [len(kinds)])).tolist(),
                            strict=True):  # fmt: skip
                k = int(kinds[a])
                start, stop = (b + a) * bs, min(self.size, (b + z) * bs)
                if out and out[-1].kind == k and out[-1].offset + out[-1].length == start:
                    out[-1] = Extent(out[-1].offset, stop - out[-1].offset, k)
                else:
                    out.append(Extent(start, stop - start, k))
            b = last
        return out

    # -- blocks

    def _job(self, bm: BlockMap, blocks: list[int], asked: set[int]) -> dict[int, _Got]:
        """Fetch neighbouring DATA blocks of one window in as few reads as their payloads allow, then
        decrypt, decode and prove each one on its own: one bad block does not take its neighbours. Blocks
        not asked for (the rest of a group) are kept unproven until they are read."""
        assert bm.src is not None and bm.offset is not None and bm.length is not None and bm.codec is not None
        rel = np.array(blocks, np.int64) - bm.start
        src, off, ln = bm.src[rel], bm.offset[rel].astype(np.int64), bm.length[rel].astype(np.int64)
        out: dict[int, _Got] = {}
        heads = [*np.flatnonzero(read_breaks(src, off, ln)).tolist(), len(blocks)]
        # a group is decoded as far as the last of its blocks in this job (all of it for a whole group)
        last_member = {(int(p), int(o)): bm.member_at(int(r))
                       for p, o, r in zip(src.tolist(), off.tolist(), rel.tolist(), strict=True)}  # fmt: skip
        for i, j in itertools.pairwise(heads):
            reader = self._readers[int(src[i])]
            try:
                data = memoryview(reader.read(int(off[i]), int(off[j - 1] + ln[j - 1] - off[i])))
            except (ImagechainError, OSError) as e:
                transient = not isinstance(e, IntegrityError)  # a disk that went away may come back
                for k in range(i, j):
                    out[blocks[k]] = self._bad(blocks[k], f"block {blocks[k]}: {e}", transient)
                continue
            for k in range(i, j):
                b = blocks[k]
                payload = data[int(off[k] - off[i]) : int(off[k] - off[i] + ln[k])]
                out[b] = self._prove(bm, b, reader, payload, b in asked, last_member[int(src[k]), int(off[k])])
        self._opener.forget()
        return out

    def _prove(self, bm: BlockMap, b: int, reader: PointReader, payload: memoryview, now: bool,
               upto: int) -> _Got:  # fmt: skip
        assert bm.codec is not None and bm.offset is not None
        r = b - bm.start
        where = f"{reader.segment_at(int(bm.offset[r]))}: block {b} is corrupt"
        digest = bm.digest[r].tobytes()
        try:
            raw = self._opener.open(reader, b, int(bm.codec[r]), bm.key_at(r), bm.member_at(r), int(bm.offset[r]),
                                    payload, bm.raw_length(b), self.block_size, digest if now else None,
                                    upto)  # fmt: skip
        except IntegrityError as e:
            return self._bad(b, f"{where} ({e})")
        return raw if now else _Unproven(raw, digest, where)

    def _settle(self, b: int, got: _Unproven) -> bytes | _Bad:
        """Prove a block decoded earlier with its group, and keep the outcome in its place."""
        out: bytes | _Bad = got.raw if self._opener.proves(got.raw, got.digest) else \
            self._bad(b, f"{got.where} (digest mismatch)")  # fmt: skip
        done: Future[_Got] = Future()
        done.set_result(out)
        with self._lock:
            if b in self._cache:
                self._cache[b] = done
        return out

    def _bad(self, block: int, message: str, transient: bool = False) -> _Bad:
        with self._lock:
            self.errors.append(message)
            del self.errors[:-ERRORS_KEPT]
        if self.on_error is not None:
            self.on_error(message)
        return _Bad(message, transient)

    def _schedule(self, first: int, last: int, sequential: bool = True) -> list[Future[_Got]]:
        """Futures of blocks [first, last): cached ones as they are, the others submitted in runs."""
        futs: list[Future[_Got] | None] = []
        missing: list[int] = []
        with self._lock:
            for b in range(first, last):
                cached = self._cache.get(b)
                if cached is not None:
                    self._cache.move_to_end(b)
                else:
                    missing.append(b)
                futs.append(cached)
        new: dict[int, Future[_Got]] = {}
        for w_first, w_blocks in _by_window(missing):
            bm = self._window(w_first // WINDOW_BLOCKS)
            kinds = bm.kind[np.array(w_blocks, np.int64) - bm.start]
            data = [b for b, k in zip(w_blocks, kinds.tolist(), strict=True) if k == DATA]
            for b, k in zip(w_blocks, kinds.tolist(), strict=True):
                if k != DATA:
                    done: Future[_Got] = Future()
                    done.set_result(self._zero if bm.raw_length(b) == self.block_size else bytes(bm.raw_length(b)))
                    new[b] = done
            asked = set(data)
            for run in _runs(self._units(bm, data, asked, sequential), RUN_BLOCKS):
                job = self._pool.submit(self._job, bm, run, asked)
                for b in run:
                    new[b] = _pick(job, b)
        with self._lock:
            for b, f in new.items():
                self._cache.setdefault(b, f)
            while len(self._cache) > self._cache_cap:
                self._cache.popitem(last=False)
        return [f if f is not None else new[first + i] for i, f in enumerate(futs)]

    def _units(self, bm: BlockMap, data: list[int], asked: set[int], sequential: bool) -> list[list[int]]:
        """The DATA blocks to fetch, as units a job never splits. A block of a group read in sequence, or of
        a group read lately, brings the rest of its group (within the window) that is not cached yet: the
        group is decoded once for all of them. A random read of a group not read lately takes only its
        block, and decodes the group no further: a random 4 KiB read costs part of a group, not all."""
        assert bm.codec is not None and bm.src is not None and bm.offset is not None
        units: list[list[int]] = []
        for b in data:
            if units and b <= units[-1][-1]:
                continue  # brought by the group before
            i = b - bm.start
            if bm.codec[i] != spec.PAYLOAD_ZSTD_GROUP:
                units.append([b])
                continue
            key = (int(bm.src[i]), int(bm.offset[i]))
            with self._lock:
                again = key in self._touched
                self._touched[key] = None
                self._touched.move_to_end(key)
                while len(self._touched) > TOUCHED_GROUPS:
                    self._touched.popitem(last=False)
            if not (sequential or again):
                units.append([b])
                continue
            lo = max(0, i - bm.member_at(i))
            hi = min(len(bm.kind), i + spec.GROUP_MAX_BYTES // self.block_size)
            same = ((bm.kind[lo:hi] == DATA) & (bm.src[lo:hi] == bm.src[i]) & (bm.offset[lo:hi] == bm.offset[i])
                    & (bm.codec[lo:hi] == spec.PAYLOAD_ZSTD_GROUP))  # fmt: skip
            a, z = i - lo, i - lo + 1
            while a > 0 and same[a - 1]:
                a -= 1
            while z < len(same) and same[z]:
                z += 1
            with self._lock:
                unit = [c for c in range(lo + bm.start + a, lo + bm.start + z) if c in asked or c not in self._cache]
            units.append(unit)
        return units

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the volume (shorter at its end); IntegrityError when a block
        in the range failed its proof."""
        if offset < 0 or length < 0:
            raise UsageError("negative offset or length")
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, -(-end // bs)
        with self._lock:
            sequential = first in self._streams  # it starts where an earlier read ended
        futs = self._schedule(first, last, sequential)
        self._read_ahead(first, last)
        parts = []
        for i, f in enumerate(futs):
            got = f.result()
            if isinstance(got, _Unproven):
                got = self._settle(first + i, got)
            if isinstance(got, _Bad):
                if got.transient:
                    with self._lock:
                        for b in range(first, last):
                            cached = self._cache.get(b)
                            if cached is not None and cached.done() and isinstance(cached.result(), _Bad):
                                del self._cache[b]
                    raise RepositoryError(got.message)
                raise IntegrityError(got.message)
            b = first + i
            lo = offset - b * bs if b == first else 0
            hi = end - b * bs if b == last - 1 else len(got)
            parts.append(got[lo:hi] if (lo, hi) != (0, len(got)) else got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_ahead(self, first: int, last: int) -> None:
        """A read that starts where an earlier one ended continues a sequential stream: keep blocks coming
        ahead of it, doubling the distance up to READ_AHEAD_MAX. Several streams are followed at once."""
        with self._lock:
            ahead, scheduled = self._streams.pop(first, (-1, 0))
            if ahead < 0:
                self._streams[last] = (0, last)
                while len(self._streams) > STREAMS:
                    self._streams.popitem(last=False)
                return
            want = min(max(2 * ahead, 2 * (last - first), 4), READ_AHEAD_MAX // self.block_size)
            stop = min(self.blocks, last + want)
            begin = max(last, scheduled)  # what earlier reads of this stream scheduled already is on its way
            self._streams[last] = (want, max(stop, scheduled))
        if begin < stop:
            self._schedule(begin, stop)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._maps.close()
        for r in self._readers:
            r.close()

    def __enter__(self) -> PointView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _by_window(blocks: list[int]) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    for b in blocks:
        if out and out[-1][0] // WINDOW_BLOCKS == b // WINDOW_BLOCKS:
            out[-1][1].append(b)
        else:
            out.append((b, [b]))
    return out


def _runs(units: list[list[int]], most: int) -> list[list[int]]:
    """Units of neighbouring blocks joined into jobs of up to `most` blocks (a group is never split)."""
    out: list[list[int]] = []
    for u in units:
        if out and out[-1][-1] == u[0] - 1 and len(out[-1]) + len(u) <= most:
            out[-1].extend(u)
        else:
            out.append(list(u))
    return out


def _pick(job: Future[dict[int, _Got]], block: int) -> Future[_Got]:
    """A future of one block of a run's job."""
    out: Future[_Got] = Future()

    def done(j: Future[dict[int, _Got]]) -> None:
        if j.cancelled():  # the view was closed before the job ran
            out.set_result(_Bad(f"block {block}: the point view was closed", transient=True))
            return
        exc = j.exception()
        if exc is not None:
            out.set_result(_Bad(f"block {block}: {exc}", transient=not isinstance(exc, IntegrityError)))
        else:
            out.set_result(j.result()[block])

    job.add_done_callback(done)
    return out
