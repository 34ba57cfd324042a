"""A copy-on-write overlay: a point served writable (to boot a VM from it, to repair a filesystem in it)
while the repository is never written.

Writes go to FILE, a sparse file the size of the volume, at their own offsets; which 4 KiB granules FILE
holds is recorded in FILE.imagechain-overlay: a JSON header (the point it belongs to, the volume size,
the granule) padded to 4 KiB, then one bit per granule. Reads take written granules from FILE and the
rest from the point. A write that covers a granule only in part first copies the point's granule into
FILE, so a granule is always whole in FILE once its bit is set.

Durability: bits are written to the record only by flush(), after FILE was fsynced, so a bit on disk
always means its granule's data is on disk too. A crash loses unflushed writes (as with any disk whose
cache was not flushed) and nothing else; reopening continues where the last flush left off."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import uuid
from datetime import UTC, datetime

import numpy as np

from .. import libc
from ..errors import MountError, TargetError, UsageError
from ..format import spec
from ..repository import within
from ..sources import pread_upto
from ..stores import temporary_name
from ..stores.local import filesystem_of, fsync_folder
from ..view import Extent
from .server import Disk

GRANULE = 4096
HEADER_BYTES = 4096  # the JSON header's room; the bitmap follows it
PAGE = 4096  # bitmap bytes written back at a time (one page covers 128 MiB of volume)
SUFFIX = ".imagechain-overlay"
FORMAT = "imagechain-overlay 1"
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int64)


def record_path(path: str) -> str:
    return path + SUFFIX


class Overlay:
    """Writable view of `base` whose writes land in `path` (see the module's docstring). Thread-safe:
    every connection of the server shares one overlay, so a write is visible to all of them at once."""

    def __init__(self, path: str, base: Disk, point_id: uuid.UUID, fd: int, rfd: int, bits: np.ndarray,
                 created: bool) -> None:  # fmt: skip
        self.path, self.base, self.point_id = path, base, point_id
        self.size, self.block_size = base.size, base.block_size
        self.granules = -(-self.size // GRANULE)
        self.created = created
        self._fd, self._rfd, self._bits = fd, rfd, bits
        self._dirty: set[int] = set()  # bitmap pages changed since the last flush
        self._lock = threading.Lock()  # writes and the bitmap
        self._flush_lock = threading.Lock()  # flushes in order: a later one never writes older bits

    # -- opening

    @classmethod
    def open(cls, path: str, base: Disk, point_id: uuid.UUID, repo_root: str | None = None) -> Overlay:
        """Continue the overlay at path, or start one when neither path nor its record exists. An overlay
        of another point (or volume size) is refused: its writes would land on the wrong data."""
        rec = record_path(path)
        if repo_root is not None and within(path, repo_root):
            raise UsageError(f"overlay {path} is inside the repository; writes must never touch it")
        if filesystem_of(os.path.dirname(os.path.abspath(path))) == "vfat":
            raise TargetError(f"overlay {path} is on a FAT filesystem, which has no sparse files (fusefat cannot even "
                              f"size one) and holds at most 4 GiB in a file: put the overlay on another "
                              f"filesystem")  # fmt: skip
        granules = -(-base.size // GRANULE)
        nbytes = -(-granules // 8)  # one bit per granule
        created = False
        if not os.path.exists(rec):
            if os.path.lexists(path):
                raise UsageError(f"{path} exists and is not an imagechain overlay (there is no {rec}); give a new "
                                 f"file name to start an overlay")  # fmt: skip
            _create_record(rec, base.size, point_id, nbytes)
            created = True
        try:
            rfd = os.open(rec, os.O_RDWR)
        except OSError as e:
            raise TargetError(f"cannot open overlay record {rec}: {e.strerror}") from e
        fd = -1
        try:
            try:
                fcntl.flock(rfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MountError(f"overlay {path} is in use by another imagechain server") from None
            head = _read_header(rec, rfd)
            if head.get("point_id") != str(point_id):
                other = str(head.get("point_id", "?"))
                raise UsageError(f"overlay {path} belongs to point {other[:8]}, not to point {str(point_id)[:8]}; "
                                 f"give another overlay file for this point")  # fmt: skip
            if head.get("volume_size") != base.size or head.get("granule") != GRANULE:
                raise UsageError(f"overlay {path} was made for a volume of {head.get('volume_size')} bytes, "
                                 f"granule {head.get('granule')}; this one has {base.size} bytes")  # fmt: skip
            raw = os.pread(rfd, nbytes, HEADER_BYTES)
            if len(raw) != nbytes:
                raise UsageError(f"overlay record {rec} is truncated ({len(raw)} of {nbytes} bitmap bytes)")
            bits = np.frombuffer(raw, np.uint8).copy()
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                if bits.any():
                    raise UsageError(f"overlay data file {path} is missing; its record {rec} says it held "
                                     f"writes") from None  # fmt: skip
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                fsync_folder(os.path.dirname(os.path.abspath(path)))
            st = os.fstat(fd)
            if st.st_size < base.size:
                os.ftruncate(fd, base.size)  # sparse: only what is written takes space
            elif st.st_size > base.size:
                raise UsageError(f"overlay data file {path} is larger than the volume ({st.st_size} bytes)")
            return cls(path, base, point_id, fd, rfd, bits, created)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            os.close(rfd)
            if isinstance(e, OSError):
                raise TargetError(f"cannot {'create' if created else 'open'} overlay {path}: {e.strerror or e}") from e
            raise

    # -- the bitmap

    def _written(self, g0: int, g1: int) -> np.ndarray:
        """Booleans: which granules of [g0, g1) the overlay holds."""
        raw = self._bits[g0 // 8 : (g1 + 7) // 8]
        return np.unpackbits(raw, bitorder="little")[g0 % 8 : g0 % 8 + g1 - g0].astype(bool)

    def _mark(self, g0: int, g1: int) -> None:
        b0, b1 = g0 // 8, (g1 - 1) // 8
        lo, hi = g0 % 8, (g1 - 1) % 8 + 1
        if b0 == b1:
            self._bits[b0] |= ((1 << hi) - 1) & ~((1 << lo) - 1)
        else:
            self._bits[b0] |= 0xFF & ~((1 << lo) - 1)
            self._bits[b0 + 1 : b1] = 0xFF
            self._bits[b1] |= (1 << hi) - 1
        self._dirty.update(range(b0 // PAGE, b1 // PAGE + 1))

    @property
    def written_bytes(self) -> int:
        return min(self.size, int(_POPCOUNT[self._bits].sum()) * GRANULE)

    # -- reading

    def _runs(self, offset: int, end: int) -> list[tuple[int, int, bool]]:
        """[offset, end) as runs of (start, stop, written?) on granule edges (clipped to the range)."""
        g0, g1 = offset // GRANULE, -(-end // GRANULE)
        w = self._written(g0, g1)
        edges = (np.flatnonzero(np.diff(w.astype(np.int8))) + 1).tolist()
        out = []
        for a, z in zip([0, *edges], [*edges, len(w)], strict=True):
            out.append((max(offset, (g0 + a) * GRANULE), min(end, (g0 + z) * GRANULE), bool(w[a])))
        return out

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        parts = []
        for a, z, written in self._runs(offset, end):
            parts.append(_pread_full(self._fd, z - a, a) if written else self.base.read(a, z - a))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Written granules are data; the rest is what the point says."""
        end = min(self.size, offset + length)
        out: list[Extent] = []
        if offset >= end:
            return out
        for a, z, written in self._runs(offset, end):
            if written:
                pieces = [Extent(a, z - a, spec.BLOCK_DATA)]
            else:
                pieces = [Extent(max(a, e.offset), min(z, e.offset + e.length) - max(a, e.offset), e.kind)
                          for e in self.base.extents(a, z - a) if min(z, e.offset + e.length) > max(a, e.offset)]
            for e in pieces:
                if out and out[-1].kind == e.kind and out[-1].offset + out[-1].length == e.offset:
                    out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.kind)
                else:
                    out.append(e)
        return out

    # -- writing

    def _copy_edges(self, offset: int, end: int) -> None:
        """Copy-on-write: the granules [offset, end) covers only in part, not held yet, get the point's
        data first, so that the granule is whole in FILE once its bit is set."""
        for g in sorted({offset // GRANULE, (end - 1) // GRANULE}):
            gs, ge = g * GRANULE, min(self.size, (g + 1) * GRANULE)
            if (offset > gs or end < ge) and not self._written(g, g + 1)[0]:
                _pwrite_full(self._fd, self.base.read(gs, ge - gs), gs)

    def write(self, offset: int, data: bytes | bytearray) -> None:
        if not data:
            return
        end = offset + len(data)
        with self._lock:
            self._copy_edges(offset, end)
            _pwrite_full(self._fd, data, offset)
            self._mark(offset // GRANULE, -(-end // GRANULE))

    def zero(self, offset: int, length: int, punch: bool = True) -> None:
        """Make the range read as zeros: a hole punched in FILE (or zeros written, for NO_HOLE)."""
        if length <= 0:
            return
        end = offset + length
        with self._lock:
            self._copy_edges(offset, end)
            if not (punch and self._punch(offset, length)):
                zeros = bytes(min(length, 1 << 20))
                for pos in range(offset, end, len(zeros)):
                    _pwrite_full(self._fd, memoryview(zeros)[: min(len(zeros), end - pos)], pos)
            self._mark(offset // GRANULE, -(-end // GRANULE))

    def trim(self, offset: int, length: int) -> None:
        """The client no longer needs the range: whole granules in it become holes in FILE (their content
        is unspecified after a trim; zeros are a fine answer); partial ones are left as they are."""
        a = -(-offset // GRANULE) * GRANULE
        z = min(offset + length, self.size)
        z = z if z == self.size else z // GRANULE * GRANULE
        if z > a:
            self.zero(a, z - a)

    def _punch(self, offset: int, length: int) -> bool:
        return libc.punch_hole(self._fd, offset, length, self.path)

    def flush(self) -> None:
        """Make every write done so far durable: FILE first, then the bits that point into it."""
        with self._flush_lock:
            with self._lock:
                pages = {p: bytes(self._bits[p * PAGE : (p + 1) * PAGE]) for p in sorted(self._dirty)}
                self._dirty.clear()
            os.fsync(self._fd)
            try:
                for p, raw in pages.items():
                    _pwrite_full(self._rfd, raw, HEADER_BYTES + p * PAGE)
                os.fsync(self._rfd)
            except BaseException:
                with self._lock:
                    self._dirty.update(pages)  # written again by the next flush
                raise

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            os.close(self._rfd)  # releases the lock
            self._fd = self._rfd = -1


def _create_record(rec: str, size: int, point_id: uuid.UUID, nbytes: int) -> None:
    """The record appears whole, by rename, or not at all."""
    head = json.dumps({"format": FORMAT, "point_id": str(point_id), "volume_size": size, "granule": GRANULE,
                       "created": datetime.now(UTC).isoformat(timespec="seconds")}).encode()  # fmt: skip
    tmp = temporary_name(rec)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise TargetError(f"cannot create overlay record {rec}: {e.strerror}") from e
    try:
        try:
            _pwrite_full(fd, head.ljust(HEADER_BYTES - 1) + b"\n", 0)
            os.ftruncate(fd, HEADER_BYTES + nbytes)  # the bitmap starts as zeros (a hole)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, rec)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise TargetError(f"cannot create overlay record {rec}: {e.strerror or e}") from e
        raise
    fsync_folder(os.path.dirname(os.path.abspath(rec)))


def _read_header(rec: str, rfd: int) -> dict[str, object]:
    raw = os.pread(rfd, HEADER_BYTES, 0)
    try:
        head = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise UsageError(f"{rec} is not an imagechain overlay record (or is damaged)")
    return head


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """length bytes; zeros only past the file's end (never for a read that returned less before it)."""
    data = pread_upto(fd, length, offset)
    return data if len(data) == length else data + bytes(length - len(data))


def _pwrite_full(fd: int, buf: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(buf)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
