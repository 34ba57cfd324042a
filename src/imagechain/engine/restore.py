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
from ..chain import lineage, resolve
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
    """Fetches payloads for a resolved map, coalescing neighbouring payloads into one read."""

    def __init__(self, repo: Repository, points: list[PointFiles], bm: BlockMap) -> None:
        self.readers = [PointReader(repo.store, p) for p in points]
        self.points = points
        self.bm = bm

    def fetch(self, blocks: np.ndarray) -> list[bytes]:
        """Payloads for DATA blocks (sorted block numbers)."""
        bm = self.bm
        assert bm.src is not None and bm.offset is not None and bm.length is not None
        if not len(blocks):
            return []
        src, off, ln = bm.src[blocks], bm.offset[blocks].astype(np.int64), bm.length[blocks].astype(np.int64)
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

    def check(self, block: int, payload: bytes) -> bytes:
        """Decode one payload and prove it is the block that was backed up."""
        bm = self.bm
        assert bm.codec is not None and bm.src is not None
        where = self.points[int(bm.src[block])].name
        try:
            raw = decode(int(bm.codec[block]), payload, bm.raw_length(block))
        except IntegrityError as e:
            raise IntegrityError(f"{where}: block {block} is corrupt ({e})") from e
        if blake3.blake3(raw).digest() != bm.digest[block].tobytes():
            raise IntegrityError(f"{where}: block {block} is corrupt (digest mismatch)")
        return raw

    def close(self) -> None:
        for r in self.readers:
            r.close()


def restore(
    repo: Repository,
    point: PointFiles,
    target: str,
    *,
    delta: bool = False,
    force: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
) -> RestoreResult:
    t0 = time.monotonic()
    progress = progress or Silent()
    threads = threads or default_threads()
    cat = repo.catalog()
    points = lineage(cat, point)
    bm = resolve(repo.store, points)  # proves the map against the point's state digest
    payloads = PayloadSource(repo, points, bm)
    bs, size = bm.block_size, bm.volume_size
    per_chunk = max(1, CHUNK_BYTES // bs)
    written = written_blocks = checked = 0

    def data_blocks(s: int, e: int) -> list[int]:
        return (np.flatnonzero(bm.kind[s:e] == spec.BLOCK_DATA) + s).tolist()

    def plan() -> Iterator[tuple[int, int, list[int], list[bytes] | None]]:
        for s in range(0, bm.count, per_chunk):
            e = min(bm.count, s + per_chunk)
            if delta:  # fetches only the payloads of blocks that differ, once it knows which
                yield s, e, [], None
            else:
                blocks = data_blocks(s, e)
                yield s, e, blocks, payloads.fetch(np.array(blocks, np.int64))

    def verified(blocks: list[int], fetched: list[bytes]) -> dict[int, bytes]:
        return {b: payloads.check(b, p) for b, p in zip(blocks, fetched, strict=True)}

    def delta_chunk(s: int, e: int) -> tuple[int, int, list[tuple[int, bytes]], int]:
        start, end = s * bs, min(size, e * bs)
        current = memoryview(_pread_full(fd, end - start, start))
        differ: list[int] = []
        zeros: list[tuple[int, bytes]] = []
        for b in range(s, e):
            cur = current[(b - s) * bs : min((b - s + 1) * bs, end - start)]
            if bm.kind[b] != spec.BLOCK_DATA:
                if np.frombuffer(cur, np.uint8).any():
                    zeros.append((b, bytes(len(cur))))
            elif blake3.blake3(cur).digest() != bm.digest[b].tobytes():
                differ.append(b)
        raws = verified(differ, payloads.fetch(np.array(differ, np.int64)))
        return s, e, sorted(zeros + list(raws.items())), len(differ)

    def work(item: tuple[int, int, list[int], list[bytes] | None]) -> tuple[int, int, list[tuple[int, bytes]], int]:
        s, e, blocks, fetched = item
        if fetched is None:
            return delta_chunk(s, e)
        raws = verified(blocks, fetched)
        if fresh:
            return s, e, sorted(raws.items()), len(blocks)
        return s, e, [(b, raws.get(b) or bytes(bm.raw_length(b))) for b in range(s, e)], len(blocks)

    fd, is_dev, fresh = _open_target(target, bm.volume_size, delta, force)
    try:
        progress.start("restore", size)
        for s, e, writes, nchecked in ordered_map(work, prefetch(plan(), 3), threads, threads * 2):
            checked += nchecked
            for off, buf in _coalesce(writes, bs):
                _pwrite_full(fd, buf, off)
                written += len(buf)
            written_blocks += len(writes)
            progress.advance(min(size, e * bs) - s * bs)
        if not is_dev:
            os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException as exc:
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
        progress.stop()
        payloads.close()
        if fd >= 0:
            os.close(fd)
    return RestoreResult(str(point.point_id), target, size, written, written_blocks, checked, delta,
                         time.monotonic() - t0, point.footer.state_digest.hex())  # fmt: skip


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
