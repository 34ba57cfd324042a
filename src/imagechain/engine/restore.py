"""Restore a point to a file or block device, every block's digest checked before it is written.

--delta is CBC in reverse: read the target, digest its blocks, write only those that differ."""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import blake3
import numpy as np

from ..blockmap import BlockMap
from ..chain import Catalog, MapStream
from ..codec import decode
from ..errors import IntegrityError, NoSpaceError, TargetError
from ..format import spec
from ..format.reader import PointFiles, PointReader
from ..repository import Repository
from ..sources import device_size
from .pipeline import default_threads, ordered_map, prefetch
from .progress import Progress, Silent

CHUNK_BYTES = 8 << 20


@dataclass
class RestoreResult:
    point_id: str
    target: str
    volume_size: int
    written_bytes: int
    written_blocks: int
    checked_blocks: int
    delta: bool
    duration_s: float
    state_digest: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class PayloadSource:
    """Fetches and proves payloads for windows of a resolved map, coalescing neighbours into one read."""

    def __init__(self, repo: Repository, points: list[PointFiles]) -> None:
        self.readers = [PointReader(repo.store, p) for p in points]
        self.points = points

    def fetch(self, bm: BlockMap, blocks: np.ndarray) -> list[bytes]:
        """Payloads for DATA blocks (ascending block numbers inside the window bm)."""
        assert bm.src is not None and bm.offset is not None and bm.length is not None
        if not len(blocks):
            return []
        rel = blocks - bm.start
        src, off, ln = bm.src[rel], bm.offset[rel].astype(np.int64), bm.length[rel].astype(np.int64)
        brk = np.ones(len(blocks), bool)
        brk[1:] = (src[1:] != src[:-1]) | (off[1:] != off[:-1] + ln[:-1])
        heads = [*np.flatnonzero(brk).tolist(), len(blocks)]
        out: list[bytes] = []
        for a, b in itertools.pairwise(heads):
            total = int(off[b - 1] + ln[b - 1] - off[a])
            data = memoryview(self.readers[int(src[a])].read(int(off[a]), total))
            base = int(off[a])
            out.extend(bytes(data[int(off[i]) - base : int(off[i] + ln[i]) - base]) for i in range(a, b))
        return out

    def check(self, bm: BlockMap, block: int, payload: bytes) -> bytes:
        """Decode one payload and prove it is the block that was backed up."""
        assert bm.codec is not None and bm.src is not None and bm.offset is not None
        i = block - bm.start
        r = self.readers[int(bm.src[i])]
        try:
            raw = decode(int(bm.codec[i]), payload, bm.raw_length(block))
        except IntegrityError as e:
            raise IntegrityError(f"{r.segment_at(int(bm.offset[i]))}: block {block} is corrupt ({e})") from e
        if blake3.blake3(raw).digest() != bm.digest[i].tobytes():
            raise IntegrityError(f"{r.segment_at(int(bm.offset[i]))}: block {block} is corrupt (digest mismatch)")
        return raw

    def verified(self, bm: BlockMap, blocks: list[int]) -> dict[int, bytes]:
        fetched = self.fetch(bm, np.array(blocks, np.int64))
        return {b: self.check(bm, b, p) for b, p in zip(blocks, fetched, strict=True)}

    def close(self) -> None:
        for r in self.readers:
            r.close()


@dataclass
class _Piece:
    """Blocks [s, e) of a window, and which of them hold data."""

    bm: BlockMap
    s: int
    e: int
    data: list[int]


def restore(
    repo: Repository,
    point: PointFiles,
    target: str,
    *,
    delta: bool = False,
    force: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    cat: Catalog | None = None,
) -> RestoreResult:
    t0 = time.monotonic()
    progress = progress or Silent()
    threads = threads or default_threads()
    points = (cat or repo.catalog()).lineage(point)
    with MapStream(repo.store, points) as ms:
        ms.prove()  # the whole map against the point's state digest, before a byte is written
    h = point.header
    bs, size = h.block_size, h.volume_size
    fd, is_dev, fresh = _open_target(target, size, delta, force)
    job = _Restore(fd, bs, size, fresh, delta, PayloadSource(repo, points))
    maps = MapStream(repo.store, points, locations=True)
    feed = prefetch(job.pieces(maps.windows()), 3)
    results = ordered_map(job.work, feed, threads, threads * 2)
    written = written_blocks = checked = 0
    try:
        progress.start("restore", size)
        for e_bytes, writes, nchecked in results:
            checked += nchecked
            for off, buf in _coalesce(writes, bs):
                _pwrite_full(fd, buf, off)
                written += len(buf)
            written_blocks += len(writes)
            progress.advance(e_bytes)
        if not is_dev:
            os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException as exc:
        results.close()  # stop the pipeline before the target goes
        feed.close()
        os.close(fd)
        fd = -1
        if fresh:  # never leave a half-restored new file that looks like a volume
            os.unlink(target)
        if isinstance(exc, OSError):
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(f"restore target {target} is full: {exc.strerror}") from exc
            raise TargetError(f"cannot write restore target {target}: {exc.strerror}") from exc
        raise
    finally:
        results.close()
        feed.close()
        progress.stop()
        job.payloads.close()
        maps.close()
        if fd >= 0:
            os.close(fd)
    return RestoreResult(str(point.point_id), target, size, written, written_blocks, checked, delta,
                         time.monotonic() - t0, point.footer.state_digest.hex())  # fmt: skip


@dataclass
class _Restore:
    fd: int
    bs: int
    size: int
    fresh: bool
    delta: bool
    payloads: PayloadSource

    def pieces(self, windows: Iterator[BlockMap]) -> Iterator[_Piece]:
        """Chunks of each window; a run of chunks with nothing to write to a new (sparse) file is one piece."""
        per_chunk = max(1, CHUNK_BYTES // self.bs)
        for bm in windows:
            data = np.flatnonzero(bm.kind == spec.BLOCK_DATA) + bm.start
            s = bm.start
            while s < bm.end:
                e = min(bm.end, s + per_chunk)
                lo, hi = np.searchsorted(data, [s, e])
                if self.fresh and not self.delta and lo == hi:  # nothing to write up to the next data block
                    e = max(e, int(data[hi]) if hi < len(data) else bm.end)
                yield _Piece(bm, s, e, data[lo:hi].tolist())
                s = e

    def work(self, p: _Piece) -> tuple[int, list[tuple[int, bytes]], int]:
        """(volume bytes covered, writes in block order, blocks checked)."""
        covered = min(self.size, p.e * self.bs) - p.s * self.bs
        if self.delta:
            return covered, *self._delta(p)
        raws = self.payloads.verified(p.bm, p.data)
        if self.fresh:
            return covered, sorted(raws.items()), len(p.data)
        return covered, [(b, raws.get(b) or bytes(p.bm.raw_length(b))) for b in range(p.s, p.e)], len(p.data)

    def _delta(self, p: _Piece) -> tuple[list[tuple[int, bytes]], int]:
        """CBC in reverse: read the target, digest its blocks, fetch only payloads of blocks that differ."""
        bs, bm = self.bs, p.bm
        start, end = p.s * bs, min(self.size, p.e * bs)
        current = memoryview(_pread_full(self.fd, end - start, start))
        differ: list[int] = []
        zeros: list[tuple[int, bytes]] = []
        for b in range(p.s, p.e):
            cur = current[(b - p.s) * bs : min((b - p.s + 1) * bs, end - start)]
            if bm.kind[b - bm.start] != spec.BLOCK_DATA:
                if np.frombuffer(cur, np.uint8).any():
                    zeros.append((b, bytes(len(cur))))
            elif blake3.blake3(cur).digest() != bm.digest[b - bm.start].tobytes():
                differ.append(b)
        raws = self.payloads.verified(bm, differ)
        return sorted(zeros + list(raws.items())), len(differ)


def _open_target(target: str, size: int, delta: bool, force: bool) -> tuple[int, bool, bool]:
    """(fd, is a device, is a new file)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        try:
            fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise TargetError(f"cannot create restore target {target}: {e.strerror}") from e
        try:
            os.ftruncate(fd, size)
        except BaseException as e:
            os.close(fd)
            os.unlink(target)
            if isinstance(e, OSError):
                raise TargetError(f"cannot size restore target {target}: {e.strerror}") from e
            raise
        return fd, False, True
    if stat.S_ISDIR(st.st_mode):
        raise TargetError(f"restore target is a folder: {target}")
    is_dev = stat.S_ISBLK(st.st_mode)
    if not is_dev and not stat.S_ISREG(st.st_mode):
        raise TargetError(f"restore target is neither a file nor a block device: {target}")
    if not (force or delta) and (is_dev or st.st_size > 0):
        raise TargetError(f"restore target {target} exists; add --force to overwrite it or --delta to update it")
    try:
        fd = os.open(target, os.O_RDWR)
    except OSError as e:
        raise TargetError(f"cannot open restore target {target}: {e.strerror}") from e
    if is_dev:
        have = device_size(fd)
        if have < size:
            os.close(fd)
            raise TargetError(f"restore target {target} holds {have} bytes; the volume needs {size}")
    elif delta and st.st_size < size:
        os.ftruncate(fd, size)
    return fd, is_dev, False


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) < length:
        data += bytes(length - len(data))
    return data


def _pwrite_full(fd: int, buf: bytes, offset: int) -> None:
    view = memoryview(buf)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _coalesce(writes: list[tuple[int, bytes]], bs: int) -> Iterator[tuple[int, bytes]]:
    """Join writes of consecutive blocks into one buffer each."""
    run: list[bytes] = []
    first = prev = -2
    for b, data in writes:
        if b != prev + 1 and run:
            yield first * bs, b"".join(run)
            run = []
        if not run:
            first = b
        run.append(data)
        prev = b
    if run:
        yield first * bs, b"".join(run)
