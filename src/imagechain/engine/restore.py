"""Restore a point to a file or block device, every block's digest checked before it is written.

--delta is CBC in reverse: read the target, digest its blocks, write only those that differ. Zero and
unused blocks are never written as buffers of zeros: a new file gets holes, an existing file has them
punched, a device has them zeroed by the device (BLKZEROOUT) or, with --discard, unused ones discarded.
A partition of a whole-disk point restores on its own (`window`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import interrupts, libc, pending
from ..blockmap import BlockMap, read_breaks
from ..chain import Catalog, MapStream
from ..errors import ImagechainError, IntegrityError, NoSpaceError, TargetError
from ..format import spec
from ..format.reader import PointFiles, PointReader
from ..identity import local_host
from ..keyring import Keyring
from ..lock import running_sources
from ..mounts import in_use
from ..partitions import relocate_gpt_backup
from ..payload import BlockOpener
from ..repository import Repository
from ..sizes import human
from ..sources import device_size, pread_upto
from ..stores.local import fsync_folder, too_big_for_fat
from .pipeline import default_threads, ordered_map, prefetch
from .progress import Progress, Silent

CHUNK_BYTES = 8 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


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
    zeroed_bytes: int = 0  # of written_bytes: zero and unused ranges zeroed (or discarded) without writing buffers
    notices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class PayloadSource:
    """Fetches and proves payloads for windows of a resolved map, coalescing neighbours into one read."""

    def __init__(self, repo: Repository, points: list[PointFiles]) -> None:
        self.readers = [PointReader(repo.store, p) for p in points]
        self.points = points
        self.keys = points[-1].keys  # an encrypted chain's (every point of a lineage shares its digest key)
        self.opener = BlockOpener(self.keys)

    def fetch(self, bm: BlockMap, blocks: np.ndarray) -> list[memoryview]:
        """Payloads for DATA blocks (ascending block numbers inside the window bm); the blocks of one group
        share its payload."""
        assert bm.src is not None and bm.offset is not None and bm.length is not None
        if not len(blocks):
            return []
        rel = blocks - bm.start
        src, off, ln = bm.src[rel], bm.offset[rel].astype(np.int64), bm.length[rel].astype(np.int64)
        heads = [*np.flatnonzero(read_breaks(src, off, ln)).tolist(), len(blocks)]
        out: list[memoryview] = []
        for a, b in itertools.pairwise(heads):
            total = int(off[b - 1] + ln[b - 1] - off[a])
            data = memoryview(self.readers[int(src[a])].read(int(off[a]), total))
            base = int(off[a])
            out.extend(data[int(off[i]) - base : int(off[i] + ln[i]) - base] for i in range(a, b))
        return out

    def proven(self, bm: BlockMap, blocks: list[int],
               fetched: list[memoryview] | None = None) -> Iterator[list[tuple[int, bytes | memoryview]]]:  # fmt: skip
        """The blocks (ascending, inside the window bm) as (block, bytes), each decoded and proven against its
        digest, one payload at a time: the blocks of a group come together, in block order, from one
        decoding of it, as views into it. Blocks of an incremental lie between those of its parent's groups;
        in block order, each switch decoded a group again (up to 20 times on the benchmark volume). Each
        list keeps its group's decoded bytes alive: write it out before asking for the next, so that a
        piece's groups are not all held at once. `fetched`: the blocks' payloads, when read ahead."""
        assert bm.src is not None and bm.offset is not None and bm.codec is not None
        if fetched is None:
            fetched = self.fetch(bm, np.array(blocks, np.int64))
        rel = np.asarray(blocks, np.int64) - bm.start
        # per piece, not per block: numpy's scalars cost more than the Python ints of a list
        src, off, codec = bm.src[rel].tolist(), bm.offset[rel].tolist(), bm.codec[rel].tolist()
        key = bm.key[rel].tolist() if bm.key is not None else [0] * len(rel)
        member = bm.member[rel].tolist() if bm.member is not None else [0] * len(rel)
        digests = bm.digest[rel].tobytes()
        bs, opener = bm.block_size, self.opener
        by_payload: dict[tuple[int, int], list[int]] = {}
        for k, where in enumerate(zip(src, off, strict=True)):
            by_payload.setdefault(where, []).append(k)
        try:
            for ks in by_payload.values():
                out: list[tuple[int, bytes | memoryview]] = []
                for k in ks:
                    b, r = blocks[k], self.readers[src[k]]
                    try:
                        raw = opener.open(r, b, codec[k], key[k], member[k], off[k], fetched[k],
                                          bm.raw_length(b), bs, digests[32 * k : 32 * k + 32], borrow=True)  # fmt: skip
                    except IntegrityError as e:
                        raise IntegrityError(f"{r.segment_at(off[k])}: block {b} is corrupt ({e})") from e
                    out.append((b, raw))
                yield out
        finally:
            opener.forget()  # this thread's last group: no longer needed

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
    fetched: list[memoryview] | None = None  # their payloads, when read ahead


@dataclass
class _Done:
    """A piece written: the window bytes it covered, its blocks written or zeroed, its digests checked."""

    covered: int
    blocks: int
    checked: int


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
    overwrite_mounted: bool = False,
    window: tuple[int, int] | None = None,
    discard: bool = False,
    keyring: Keyring | None = None,
) -> RestoreResult:
    """Restore `point` to `target`; `window` = (offset, length) restores only those bytes of the volume (a
    partition of a disk point) as a volume of their own."""
    t0 = time.monotonic()
    progress = progress or Silent()
    threads = threads or default_threads()
    points = (cat or repo.catalog()).lineage(point)
    (keyring or Keyring()).unlock_all(points)  # an encrypted chain: wrong or missing keys stop here
    with MapStream(repo.store, points) as ms:
        ms.prove()  # the whole map against the point's state digest, before a byte is written
    h = point.header
    bs, vsize = h.block_size, h.volume_size
    base, size = window if window is not None else (0, vsize)
    if base < 0 or size <= 0 or base + size > vsize:
        raise TargetError(f"bytes {base}..{base + size} are not within the volume of {vsize} bytes")
    notes: list[str] = []
    tgt = Target.open(target, size, delta, force, repo, overwrite_mounted, notes)
    for n in notes:
        progress.notice(n)
    job = _Restore(tgt, bs, vsize, delta, discard, PayloadSource(repo, points), base, size,
                   read_ahead=not delta and not repo.store.remote)  # fmt: skip
    maps = MapStream(repo.store, points, locations=True)
    feed = prefetch(job.pieces(maps.windows()), 3)
    results = ordered_map(job.work, feed, threads, threads * 2)
    written_blocks = checked = 0
    try:
        progress.start("restore", size)
        for done in results:
            checked += done.checked
            written_blocks += done.blocks
            progress.advance(done.covered)
        grown = window is None and tgt.is_dev and tgt.capacity > size and h.metadata.get("layout")
        if grown and relocate_gpt_backup(tgt.fd, size, tgt.capacity, _sector_size(h.metadata["layout"])):
            notes.append(f"moved the backup GPT header to the end of {target} ({tgt.capacity} bytes)")
            progress.notice(notes[-1])
        tgt.finish()
    except BaseException as exc:
        results.close()  # stop the pipeline before the target goes
        feed.close()
        err = tgt.failed(exc, job.written)
        if err is exc:
            raise
        raise err from exc
    finally:
        results.close()
        feed.close()
        progress.stop()
        job.payloads.close()
        maps.close()
        tgt.close()
    return RestoreResult(str(point.point_id), target, size, job.written, written_blocks, checked, delta,
                         time.monotonic() - t0, point.footer.state_digest.hex(), job.zeroed, notes)  # fmt: skip


def partition_window(header: spec.PointHeader, number: int) -> tuple[int, int]:
    """(offset, length) of partition `number` of a whole-disk point, from the layout its backup recorded."""
    layout = header.metadata.get("layout")
    if not isinstance(layout, dict):
        raise TargetError(f"point {str(header.point_id)[:8]} is not of a disk with a partition table: "
                          f"it has no partition {number}")  # fmt: skip
    parts = layout.get("partitions")
    for p in parts if isinstance(parts, list) else []:
        if isinstance(p, dict) and p.get("number") == number:
            return int(p["start"]), int(p["size"])
    have = ", ".join(str(p.get("number")) for p in parts if isinstance(p, dict)) if isinstance(parts, list) else ""
    raise TargetError(f"point {str(header.point_id)[:8]} has no partition {number} (it has: {have or 'none'})")


def _sector_size(layout: object) -> int:
    size = layout.get("sector_size") if isinstance(layout, dict) else None
    return size if isinstance(size, int) and size in (512, 4096) else 512


@dataclass
class _Restore:
    """Each piece is proven and written by one worker (its payloads read by that worker, or ahead of it for
    a local repository), so a decoded group is written from where it was decoded (no copy, no hand-over
    between threads) and the target is written by all workers at once; the counts are shared, so a restore
    that fails says truthfully whether the target was touched."""

    tgt: Target
    bs: int
    size: int  # of the volume
    delta: bool
    discard: bool
    payloads: PayloadSource
    base: int = 0  # the window of the volume restored: its first byte lands at the target's offset 0
    length: int = 0
    read_ahead: bool = False  # the thread that cuts the pieces also reads their payloads (see pieces)
    written: int = 0  # bytes of the target written or zeroed so far, by all workers
    zeroed: int = 0  # of written: zeroed (or discarded) without writing buffers
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _count(self, n: int, zeroed: int = 0) -> None:
        with self.lock:
            self.written += n
            self.zeroed += zeroed

    def clip(self, off: int, n: int) -> tuple[int, int]:
        """Volume bytes [off, off + n) as (target offset, length) within the window."""
        a, b = max(off, self.base), min(off + n, self.base + self.length, self.size)
        return a - self.base, max(0, b - a)

    def place(self, off: int, bufs: list[bytes | memoryview]) -> None:
        """Write volume bytes (consecutive buffers) at volume offset off, the part inside the window."""
        total = sum(len(b) for b in bufs)
        t, n = self.clip(off, total)
        if n:
            self.tgt.reserve(t, n)
            skip = t + self.base - off
            _pwritev_full(self.tgt.fd, bufs if skip == 0 and n == total else _cut(bufs, skip, n), t)
            self._count(n)

    def put(self, writes: list[tuple[int, bytes | memoryview]]) -> None:
        """Write blocks (ascending), each run of consecutive ones in one call."""
        for off, bufs in _coalesce(writes, self.bs):
            self.place(off, bufs)

    def finish_piece(self, p: _Piece, covered: int, written: int, zeros: list[tuple[int, int, bool]],
                     checked: int) -> _Done:  # fmt: skip
        """Zero the piece's runs (first block, count, all unused) and start writing it to the disk."""
        if written:
            self.tgt.start_writeback(*self.clip(p.s * self.bs, (p.e - p.s) * self.bs))
        for first, count, unused in zeros:
            z = self.tgt.zero(*self.clip(first * self.bs, count * self.bs), self.discard and unused)
            self._count(z, z)
        return _Done(covered, written + sum(c for _, c, _ in zeros), checked)

    def pieces(self, windows: Iterator[BlockMap]) -> Iterator[_Piece]:
        """Chunks of each window; a run of chunks with nothing to write to a new (sparse) file is one piece.
        A chunk never ends inside a group: its blocks would be decoded twice, once by each piece. With
        read_ahead (a local repository), the payloads of each piece are read here, ahead of the workers: a
        worker that read its own waited for the disk with its CPU idle (2.54 against 2.69 s in-process on
        the benchmark volume). A remote repository is read by the workers, whose requests then overlap."""
        per_chunk = max(1, CHUNK_BYTES // self.bs)
        first, end = self.base // self.bs, -(-(self.base + self.length) // self.bs)
        for bm in windows:
            if bm.end <= first or bm.start >= end:
                continue
            data = np.flatnonzero(bm.kind == spec.BLOCK_DATA) + bm.start
            heads = np.flatnonzero(~_continues_group(bm)) + bm.start  # where a piece may end
            s, stop = max(bm.start, first), min(bm.end, end)
            while s < stop:
                e = min(stop, s + per_chunk)
                lo, hi = np.searchsorted(data, [s, e])
                if self.tgt.blank and not self.delta and lo == hi:  # nothing to write up to the next data block
                    e = min(stop, max(e, int(data[hi]) if hi < len(data) else stop))
                k = int(np.searchsorted(heads, e))
                e = min(stop, int(heads[k]) if k < len(heads) else stop)
                lo, hi = np.searchsorted(data, [s, e])
                piece = _Piece(bm, s, e, data[lo:hi].tolist())
                if self.read_ahead and piece.data:
                    piece.fetched = self.payloads.fetch(bm, np.array(piece.data, np.int64))
                yield piece
                s = e

    def work(self, p: _Piece) -> _Done:
        covered = sum(self.clip(p.s * self.bs, (p.e - p.s) * self.bs)[1:])
        if self.delta:
            return self._delta(p, covered)
        for got in self.payloads.proven(p.bm, p.data, p.fetched):
            self.put(got)
        zeros = [] if self.tgt.blank else _runs(p, set(p.data))  # a new file: holes already
        return self.finish_piece(p, covered, len(p.data), zeros, len(p.data))

    def _delta(self, p: _Piece, covered: int) -> _Done:
        """CBC in reverse: read the target, digest its blocks, fetch only payloads of blocks that differ.
        Unused blocks are neither read nor written: no filesystem needs what they hold."""
        bs, bm = self.bs, p.bm
        kind = bm.kind[p.s - bm.start : p.e - bm.start]
        if (kind == spec.BLOCK_UNUSED).all():
            return _Done(covered, 0, 0)
        t0, n = self.clip(p.s * bs, (p.e - p.s) * bs)
        lead = t0 + self.base - p.s * bs  # bytes of the first block before the window (partition restores)
        have = pread_upto(self.tgt.fd, n, t0)
        # past `valid` the target ended: what it holds there is not known to be anything (fusefat said EOF
        # inside a file it had extended), so those blocks are written, never taken for zeros
        valid = lead + len(have)
        current = memoryview(bytes(lead) + have + bytes(n - len(have)))

        def unread(b: int) -> bool:
            return min((b - p.s + 1) * bs, len(current)) > valid

        differ: list[int] = []
        zeros: list[int] = []
        for b in range(p.s, p.e):
            k = kind[b - p.s]
            if k == spec.BLOCK_UNUSED:
                continue
            cur = current[(b - p.s) * bs : min((b - p.s + 1) * bs, len(current))]
            if k != spec.BLOCK_DATA:
                if unread(b) or np.frombuffer(cur, np.uint8).any():
                    zeros.append(b)
            elif unread(b) or (lead and b == p.s) or len(cur) < bm.raw_length(b):
                differ.append(b)  # a block cut by the window's edges: compare what lies inside the window
            elif self.payloads.opener.digest(cur) != bm.digest[b - bm.start].tobytes():
                differ.append(b)
        cut = lead or len(current) < (p.e - p.s) * bs
        written = 0
        for got in self.payloads.proven(bm, differ):
            if cut:
                got = [(b, r) for b, r in got if unread(b) or not _same(current, (b - p.s) * bs, r)]
            self.put(got)
            written += len(got)
        return self.finish_piece(p, covered, written, [(b, 1, False) for b in zeros], len(differ))


def _continues_group(bm: BlockMap) -> np.ndarray:
    """Rows holding a block of a group other than its first (codec 3, member > 0)."""
    if bm.codec is None or bm.member is None:
        return np.zeros(len(bm.kind), bool)
    out: np.ndarray = (bm.kind == spec.BLOCK_DATA) & (bm.codec == spec.PAYLOAD_ZSTD_GROUP) & (bm.member > 0)
    return out


def _same(current: memoryview, at: int, raw: bytes | memoryview) -> bool:
    """Does the target already hold raw at `at` (compared over the part of it the target covers)?"""
    have = current[at : at + len(raw)]
    return bytes(have) == raw[: len(have)]


def _runs(p: _Piece, written: set[int]) -> list[tuple[int, int, bool]]:
    """Runs of the piece's blocks that are not written, as (first block, count, all unused)."""
    kind = p.bm.kind[p.s - p.bm.start : p.e - p.bm.start]
    out: list[tuple[int, int, bool]] = []
    for b in range(p.s, p.e):
        if b in written:
            continue
        unused = bool(kind[b - p.s] == spec.BLOCK_UNUSED)
        if out and out[-1][0] + out[-1][1] == b and out[-1][2] == unused:
            out[-1] = (out[-1][0], out[-1][1] + 1, unused)
        else:
            out.append((b, 1, unused))
    return out


@dataclass
class Target:
    """Where a restore writes. A new file is written under a temporary name beside it and appears under
    its own name only once every block is written, proven and flushed; an existing file or device is
    written in place, and an interruption says that it is now partial."""

    path: str
    fd: int
    is_dev: bool
    fresh: bool
    size: int
    tmp: str = ""
    capacity: int = 0  # bytes a device holds (a file: its size once restored)
    blank: bool = True  # every byte not written reads as zeros: a new file that ftruncate sized

    @classmethod
    def open(cls, path: str, size: int, delta: bool, force: bool, repo: Repository, overwrite_mounted: bool = False,
             notes: list[str] | None = None) -> Target:  # fmt: skip
        if not path or path.endswith("/"):
            raise TargetError(f"restore target {path!r} names no file: give a file or a block device")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):  # publishing beside it would find the name taken, after all the work
                raise TargetError(f"restore target {path} is a symbolic link to {os.readlink(path)}, which does "
                                  f"not exist: restore to that path, or remove the link") from None
            _refuse_device_folder(path)
            _refuse_too_big_for_fat(path, size)
            _refuse_repository_file(path, None, repo)
            _sweep(path, notes)
            try:
                fd, tmp = pending.create(path)
            except OSError as e:
                raise TargetError(f"cannot create restore target {path}: {e.strerror}") from e
            t = cls(path, fd, False, True, size, tmp, size)
            try:
                t.blank = _extend(fd, size)
            except BaseException as e:
                t.close()
                t.discard()
                if isinstance(e, OSError):
                    raise TargetError(f"cannot size restore target {path}: {e.strerror}") from e
                raise
            return t
        except OSError as e:
            raise TargetError(f"cannot use restore target {path}: {e.strerror}") from e
        if stat.S_ISDIR(st.st_mode):
            raise TargetError(f"restore target is a folder: {path}")
        is_dev = stat.S_ISBLK(st.st_mode)
        if not is_dev and not stat.S_ISREG(st.st_mode):
            raise TargetError(f"restore target is neither a file nor a block device: {path}")
        _refuse_repository_file(path, st, repo)
        _refuse_running_source(path, st, repo)
        if not is_dev:
            _refuse_too_big_for_fat(path, size)
        _refuse_mounted(path, overwrite_mounted, notes)
        if not (force or delta) and (is_dev or st.st_size > 0):
            raise TargetError(f"restore target {path} exists; add --force to overwrite it or --delta to update it")
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise TargetError(f"cannot open restore target {path}: {e.strerror}") from e
        if is_dev:
            have = device_size(fd)
            if have < size:
                os.close(fd)
                raise TargetError(f"restore target {path} holds {have} bytes; the volume needs {size}")
        else:
            _sweep(path, notes)
            if delta and st.st_size < size:
                try:
                    _extend(fd, size)
                except OSError as e:
                    os.close(fd)
                    raise TargetError(f"cannot extend restore target {path} to {size} bytes: {e.strerror}") from e
        return cls(path, fd, is_dev, False, size, "", have if is_dev else size, blank=False)

    def zero(self, offset: int, length: int, discard: bool = False) -> int:
        """Make [offset, offset + length) read as zeros without writing buffers of zeros: punch a hole in a
        file, have a device zero it (BLKZEROOUT); with discard, let a device discard it instead (unused
        blocks: what they read as is no filesystem's concern). Falls back to writing zeros."""
        if length <= 0:
            return 0
        rng = struct.pack("QQ", offset, length)
        if self.is_dev:
            for op in ((BLKDISCARD, BLKZEROOUT) if discard else (BLKZEROOUT,)):
                try:
                    fcntl.ioctl(self.fd, op, rng)
                    return length
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                        raise
        elif libc.punch_hole(self.fd, offset, length, self.path):
            return length
        zeros = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            n = min(len(zeros), length - done)
            _pwrite_full(self.fd, zeros[:n], offset + done)
            done += n
        return length

    def reserve(self, offset: int, length: int) -> None:
        """A new file: allocate these bytes in one go before they are written, not page by page as the
        writes dirty them (a sixth less kernel time). Only a hint: where the filesystem cannot, the write
        allocates as before, and a full disk is the write's to report."""
        if self.fresh:
            libc.preallocate(self.fd, offset, length)

    def start_writeback(self, offset: int, length: int) -> None:
        """Have the kernel start writing these bytes to the disk now: otherwise a restore smaller than the
        dirty-page limit (a tenth of memory) writes nothing until its final fsync, and then waits for all of
        it. Only a hint: that fsync still decides."""
        libc.start_writeback(self.fd, offset, length)

    def finish(self) -> None:
        """Flush; a new file is then published under its name (never over a file that appeared since)."""
        if not self.is_dev and os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)  # fusefat refuses even a no-op truncate: only when needed
        os.fsync(self.fd)
        if self.fresh:
            with interrupts.deferred():
                try:
                    pending.publish(self.tmp, self.path)
                except FileExistsError as e:
                    # out of the temporaries' pattern, or the next restore to this name would remove it
                    kept = f"{self.path}.restored-{os.urandom(4).hex()}"
                    try:
                        os.rename(self.tmp, kept)
                    except OSError:
                        kept = self.tmp
                    self.tmp = ""
                    raise TargetError(f"restore target {self.path} appeared while restoring; the restored "
                                      f"volume is left as {kept}") from e
                self.tmp = ""
            fsync_folder(os.path.dirname(os.path.abspath(self.path)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        if self.tmp:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = ""

    def failed(self, exc: BaseException, written: int) -> BaseException:
        """The error to report, saying truthfully what became of the target."""
        self.close()
        if self.fresh:
            self.discard()  # never leave a half-restored new file that looks like a volume
            state = f"nothing was written to {self.path}"
        elif written:
            state = f"{self.path} is now partial ({written} bytes rewritten): restore again to complete it"
        else:
            state = f"{self.path} was not changed"
        if isinstance(exc, KeyboardInterrupt):
            stop = interrupts.as_stopped(exc)
            stop.what = state
            return stop
        if isinstance(exc, OSError):
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return NoSpaceError(f"restore target {self.path} is full: {exc.strerror}; {state}")
            return TargetError(f"cannot write restore target {self.path}: {exc.strerror}; {state}")
        if isinstance(exc, ImagechainError) and not self.fresh and written:
            return type(exc)(f"{exc}; {state}")
        return exc


def _refuse_running_source(path: str, st: os.stat_result, repo: Repository) -> None:
    """Writing over what a running backup of this repository reads would tear that backup and lose the
    volume it is saving."""
    real = os.path.realpath(path)
    for src, holder in running_sources(repo.store, local_host()):
        same_file = (src.get("dev"), src.get("ino")) == (st.st_dev, st.st_ino)
        same_dev = stat.S_ISBLK(st.st_mode) and src.get("rdev") == st.st_rdev
        if src.get("path") == real or same_file or same_dev:
            raise TargetError(f"restore target {path} is the source of a backup running now ({holder})")


def _refuse_mounted(path: str, allow: bool, notes: list[str] | None) -> None:
    """Writing under a mounted filesystem corrupts it (and what it caches), read-only or not; --force does
    not override this, only --overwrite-mounted does."""
    evidence = in_use(path, writable_only=False)
    if not evidence:
        return
    if not allow:
        raise TargetError(f"restore target {path} is in use: {evidence}; unmount it first (--force does not "
                          f"override this; --overwrite-mounted does, and likely corrupts what is mounted)")
    if notes is not None:
        notes.append(f"{evidence}: overwriting it anyway (--overwrite-mounted)")


def _refuse_repository_file(path: str, st: os.stat_result | None, repo: Repository) -> None:
    """Restoring over the repository's own files would destroy the backup being read."""
    root = getattr(repo.store, "root", None)
    if root is None:
        return
    if repo.holds(path):
        raise TargetError(f"restore target {path} is inside the repository being read ({repo.display})")
    if st is None:
        return
    top = os.path.realpath(root)
    for entry in repo.store.list():
        try:
            other = os.stat(os.path.join(top, *entry.name.split("/")))
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            raise TargetError(f"restore target {path} is the repository file {entry.name} (the same file)")


def _refuse_device_folder(path: str) -> None:
    """A missing /dev/sdX is a disk that is not attached, not a new file to make: under /dev it would be
    written to memory (devtmpfs) and reported as restored."""
    if pending.in_dev(path):
        raise TargetError(f"restore target {path} does not exist: no such device is attached (a new file is "
                          f"never made under /dev)")  # fmt: skip


def _refuse_too_big_for_fat(path: str, size: int) -> None:
    """Said before a byte is written: the kernel's FAT driver stops such a file at 4 GiB with EFBIG, fusefat
    with a bare EPERM."""
    if too_big_for_fat(path, size):
        raise TargetError(f"restore target {path} is on a FAT filesystem, whose files hold at most 4 GiB - 1 byte; "
                          f"the volume is {human(size)}: restore to another filesystem (exFAT and NTFS have no "
                          f"such limit)")  # fmt: skip


def _sweep(path: str, notes: list[str] | None) -> None:
    """Remove what restores to this name that were killed left beside it (pending.py)."""
    for left, n in pending.sweep(path):
        if notes is not None:
            notes.append(f"removed {left} ({human(n)}), left by a restore that did not finish")


def _extend(fd: int, size: int) -> bool:
    """Make a file (shorter than that) size bytes long; whether the bytes added are sure to read as zeros.
    ftruncate promises that. fusefat refuses ftruncate (EPERM); a write of the last byte extends the file
    there, but that driver left a stale sector of deleted data at a new file's start, so such a file is
    written like an existing one: its zero runs written, not taken as holes."""
    try:
        os.ftruncate(fd, size)
        return True
    except OSError as e:
        if size == 0 or e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    _pwrite_full(fd, b"\0", size - 1)
    return False


def _pwrite_full(fd: int, buf: bytes | memoryview, offset: int) -> None:
    _pwritev_full(fd, [buf], offset)


def _pwritev_full(fd: int, bufs: list[bytes | memoryview], offset: int) -> None:
    """Write the buffers back to back from offset, in as few calls as the kernel takes (IOV_MAX each):
    the blocks of a run go out without first being joined into one buffer (a copy of all restored data)."""
    views = list(bufs)
    while views:
        n = os.pwritev(fd, views[:IOV_MAX], offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = memoryview(views[0])[n:]


def _cut(bufs: list[bytes | memoryview], skip: int, n: int) -> list[bytes | memoryview]:
    """Bytes [skip, skip + n) of the buffers taken back to back, as views (no copy)."""
    out: list[bytes | memoryview] = []
    for b in bufs:
        if n <= 0:
            break
        if skip >= len(b):
            skip -= len(b)
            continue
        part = memoryview(b)[skip : skip + n]
        out.append(part)
        n -= len(part)
        skip = 0
    return out


def _coalesce(writes: list[tuple[int, bytes | memoryview]], bs: int) -> Iterator[tuple[int, list[bytes | memoryview]]]:
    """Group writes of consecutive blocks into runs: (volume offset, the blocks' buffers)."""
    run: list[bytes | memoryview] = []
    first = prev = -2
    for b, data in writes:
        if b != prev + 1 and run:
            yield first * bs, run
            run = []
        if not run:
            first = b
        run.append(data)
        prev = b
    if run:
        yield first * bs, run
