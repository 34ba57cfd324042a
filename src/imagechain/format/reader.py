"""Read points back: find a file's segments, check the footer, read index, summary and payloads."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import blake3
import numpy as np
import zstandard

from ..crypto import N_DIRECTORY, N_FRAME, N_SUMMARY, TRAILER, PointKeys
from ..errors import CredentialsError, IntegrityError, RepositoryError
from ..stores import RandomReader, Store, StoreEntry
from . import spec
from .writer import EXTENSION, segment_name, split_segment_name

HEAD_READ = 4096


@dataclass
class SegmentFile:
    """One file of the store that starts with a valid segment header."""

    name: str
    size: int
    seg: spec.SegmentHeader
    header: spec.PointHeader | None = None  # parsed point header, segment 0 only
    footer: spec.Footer | None = None  # valid footer at the tail, last segment only
    problem: str = ""  # why the header or the footer could not be used
    claim: tuple[uuid.UUID, uuid.UUID | None, int] | None = None  # unproven (chain, parent, seq) of a bad header
    unchecked: spec.PointHeader | None = None  # a header whose checksum failed, parsed anyway (salvage)
    seg_checked: bool = True  # False: the segment header's checksum failed, its fields were read anyway
    summary_raw: bytes | None = None  # last segment: the stored summary, when a scan read it on the way

    @property
    def data_end(self) -> int:
        return self.seg.logical_offset + self.size - spec.SEGMENT_HEADER_SIZE


class Reads(Protocol):
    def read(self, name: str, offset: int, length: int) -> bytes: ...


def scan_file(store: Reads, entry: StoreEntry) -> SegmentFile | None:
    """Parse what identifies a file as part of a point; None when it is not an image file at all.

    A file named like an image file (.icimg) that does not start with a segment header is reported
    (segment number -1 and a problem), never silently ignored: it is a damaged or truncated point."""
    named_image = entry.name.endswith(EXTENSION)
    if entry.size < spec.SEGMENT_HEADER_SIZE:
        return _unusable(entry, f"{entry.name}: truncated to {entry.size} bytes") if named_image else None
    try:
        head = store.read(entry.name, 0, HEAD_READ)
    except OSError as e:
        return _unusable(entry, f"{entry.name}: unreadable ({e.strerror or e})") if named_image else None
    if head[:8] != spec.SEGMENT_MAGIC:
        return _unusable(entry, f"{entry.name}: segment header damaged (bad magic)") if named_image else None
    problems: list[str] = []
    try:
        seg = spec.SegmentHeader.unpack(head[: spec.SEGMENT_HEADER_SIZE], entry.name)
    except IntegrityError as e:
        try:  # damage in bytes that carry nothing (flags, reserved) must not make the point unfindable
            seg = spec.SegmentHeader.unpack(head[: spec.SEGMENT_HEADER_SIZE], entry.name, check=False)
        except IntegrityError:
            return _unusable(entry, str(e))
        problems.append(str(e))
    sf = SegmentFile(entry.name, entry.size, seg, seg_checked=not problems)
    if seg.number == 0:
        body = head[spec.SEGMENT_HEADER_SIZE :]
        try:
            if len(body) >= 16 and body[:8] == spec.HEADER_MAGIC:
                need = spec.PointHeader.length_from_prefix(body)
                if need > len(body) and need < 64 << 20:
                    body += store.read(entry.name, len(head), need - len(body))
            sf.claim = spec.PointHeader.peek(body)
            sf.header = spec.PointHeader.unpack(body, entry.name)
            if sf.header.point_id != seg.point_id:
                sf.header = None
                raise IntegrityError(f"{entry.name}: point header and segment header disagree on the point id")
        except IntegrityError as e:
            problems.append(str(e))
            with contextlib.suppress(IntegrityError, ValueError, struct.error):
                sf.unchecked = spec.PointHeader.unpack(body, entry.name, check=False)
    try:
        if entry.size >= spec.SEGMENT_HEADER_SIZE + spec.FOOTER_SIZE:
            tail = store.read(entry.name, entry.size - spec.FOOTER_SIZE, spec.FOOTER_SIZE)
            if tail[-8:] == spec.FOOTER_MAGIC:
                footer = spec.Footer.unpack(tail, entry.name)
                if footer.point_id != seg.point_id:
                    raise IntegrityError(f"{entry.name}: footer belongs to another point")
                sf.footer = footer
    except IntegrityError as e:
        problems.append(str(e))
    sf.problem = "; ".join(problems)
    return sf


def _unusable(entry: StoreEntry, problem: str) -> SegmentFile:
    """A file that belongs to no point we can identify (segment number -1)."""
    return SegmentFile(entry.name, entry.size, spec.SegmentHeader(-1, uuid.UUID(int=0), 0), problem=problem)


@dataclass
class PointFiles:
    """A complete point: its header, footer and every segment in order."""

    header: spec.PointHeader
    footer: spec.Footer
    segments: list[SegmentFile]
    _summary: dict[str, object] | None = field(default=None, repr=False)
    keys: PointKeys | None = field(default=None, repr=False)  # an encrypted point's, once unlocked (keyring)

    @property
    def point_id(self) -> uuid.UUID:
        return self.header.point_id

    @property
    def name(self) -> str:
        return self.segments[0].name


@dataclass
class Assembly:
    """What the files found for one point id amount to (docs/FORMAT.md section 1, "existence")."""

    point: PointFiles | None = None
    damaged: str = ""  # a footer is there, but the point cannot be proven whole: why
    salvage: PointFiles | None = None  # damaged only in its header: the point with the unchecked header
    incomplete: str = ""  # no footer at all: an unfinished write, not a point
    notices: list[str] = field(default_factory=list)  # ignored copies, misnamed segment files


def assemble(point_id: uuid.UUID, files: list[SegmentFile]) -> Assembly:
    """Put a point together from the segment files found for it, by their headers alone."""
    # a segment 0 whose header alone fails still tiles the stream; the header is judged below
    usable = [f for f in files if not f.problem or f.footer is not None or f.unchecked is not None
              or not f.seg_checked]  # fmt: skip
    broken = [f for f in files if f.problem]
    footers = [f for f in usable if f.footer is not None]
    short = str(point_id)[:8]
    listing = ", ".join(sorted(f.name for f in files))
    if not footers:
        footer_damage = [f for f in broken if "footer" in f.problem or "header" in f.problem]
        if footer_damage:
            return Assembly(damaged=f"point {short} is damaged: {footer_damage[0].problem} [{listing}]")
        return Assembly(incomplete=f"point {short} is incomplete: no segment ends with a footer "
                                   f"(an interrupted or truncated write) [{listing}]")  # fmt: skip
    last = footers[0]
    assert last.footer is not None
    footer = last.footer
    count = footer.segment_count
    chosen: list[SegmentFile | None] = [None] * count
    folder = last.name.rpartition("/")[0]
    for f in sorted(usable, key=lambda f: (f.name.rpartition("/")[0] != folder, f.name)):
        n = f.seg.number
        if 0 <= n < count and chosen[n] is None and (n != count - 1 or f is last):
            chosen[n] = f
    missing = [i for i, f in enumerate(chosen) if f is None]
    if missing:
        base = split_segment_name(last.name)[0]
        names = ", ".join(f"segment {i} ({segment_name(base, i)})" for i in missing)
        why = f"; {broken[0].problem}" if broken else ""
        return Assembly(damaged=f"point {short} is damaged: missing {names} of {count}{why}")
    segs = [f for f in chosen if f is not None]
    expect = 0
    for f in segs:
        if f.seg.logical_offset != expect:
            return Assembly(damaged=(
                f"point {short} is damaged: {f.name} does not fit at segment {f.seg.number} "
                f"(starts at {f.seg.logical_offset}, expected {expect}; truncated or foreign segment)"
            ))  # fmt: skip
        expect = f.data_end
    if expect != footer.logical_length:
        return Assembly(damaged=f"point {short} is damaged: segments hold {expect} bytes, "
                                f"the footer says {footer.logical_length}")  # fmt: skip
    header = segs[0].header
    unchecked = [f.name for f in segs if not f.seg_checked]
    if unchecked and header is not None and header.digest() == footer.header_digest:
        return Assembly(damaged=f"point {short} is damaged: segment header checksum mismatch in "
                                f"{', '.join(unchecked)}", salvage=PointFiles(header, footer, segs))  # fmt: skip
    if header is None:
        why = segs[0].problem or "no readable point header"
        rough = segs[0].unchecked
        return Assembly(damaged=f"point {short} is damaged: {segs[0].name}: {why}",
                        salvage=PointFiles(rough, footer, segs) if rough and rough.point_id == point_id else None)
    if header.digest() != footer.header_digest:
        return Assembly(damaged=f"point {short} is damaged: {segs[0].name}: the header does not match the "
                                f"footer (altered header)", salvage=PointFiles(header, footer, segs))  # fmt: skip
    out = Assembly(PointFiles(header, footer, segs))
    used = {id(f) for f in segs}
    for f in files:
        if id(f) in used:
            continue
        what = f"segment {f.seg.number}" if not f.problem else f"a damaged copy of a segment ({f.problem})"
        out.notices.append(f"{f.name}: ignored copy of {what} of point {short}; the point uses "
                           f"{segs[f.seg.number].name if 0 <= f.seg.number < count else 'other files'}")  # fmt: skip
    for f in segs:
        stated = split_segment_name(f.name)[1]
        if stated is not None and stated != f.seg.number:
            out.notices.append(f"{f.name} holds segment {f.seg.number} of point {short}, not {stated}: "
                               f"misnamed (the point is assembled by its headers)")  # fmt: skip
    return out


class _RegionReader(io.RawIOBase):
    """A file-like view of a logical byte range of a point, read in large pieces."""

    def __init__(self, reader: PointReader, offset: int, length: int) -> None:
        self._r, self._pos, self._end = reader, offset, offset + length

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._end - self._pos, 8 << 20)
        if n <= 0:
            return 0
        data = self._r.read(self._pos, n)
        buf[:n] = data
        self._pos += n
        return n


class PointReader:
    """Random access to one point's logical stream across its segments."""

    def __init__(self, store: Store, files: PointFiles) -> None:
        self.store, self.files = store, files
        self.header, self.footer = files.header, files.footer
        self._handles: dict[int, RandomReader] = {}
        self._lock = threading.Lock()
        self._starts = [f.seg.logical_offset for f in files.segments]

    def _handle(self, i: int) -> RandomReader:
        h = self._handles.get(i)
        if h is None:
            with self._lock:
                h = self._handles.get(i)
                if h is None:
                    h = self._handles[i] = self._open(self.files.segments[i].name)
        return h

    def _open(self, name: str) -> RandomReader:
        """A segment; if a consolidation retired it since the repository was listed, its retired copy
        (kept a while under retired/), so that a reader started before never fails for it."""
        try:
            return self.store.open(name)
        except FileNotFoundError:
            for e in self.store.list("retired/"):
                if e.name.endswith("/" + name):
                    return self.store.open(e.name)
            raise

    def segment_at(self, offset: int) -> str:
        """The file that holds a logical offset (for messages that name the damaged file)."""
        i = max(0, int(np.searchsorted(self._starts, offset, side="right")) - 1)
        return self.files.segments[i].name

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self._read(offset, length)
        except OSError as e:
            raise RepositoryError(f"cannot read {self.segment_at(offset)}: {e.strerror or e}") from e

    def _read(self, offset: int, length: int) -> bytes:
        parts = []
        segs = self.files.segments
        i = max(0, int(np.searchsorted(self._starts, offset, side="right")) - 1)
        while length > 0:
            if i >= len(segs):
                raise IntegrityError(f"{self.files.name}: read beyond the end of the point")
            f = segs[i]
            if offset >= f.data_end:
                i += 1
                continue
            n = min(length, f.data_end - offset)
            at = spec.SEGMENT_HEADER_SIZE + offset - f.seg.logical_offset
            handle = self._handle(i)
            try:
                data = handle.pread(at, n)
            except FileNotFoundError:  # a remote file moved to retired/ after it was opened: read it there
                with self._lock:
                    if self._handles.get(i) is handle:
                        del self._handles[i]
                with contextlib.suppress(OSError):
                    handle.close()
                data = self._handle(i).pread(at, n)
            if len(data) != n:
                raise IntegrityError(f"{f.name}: truncated (short read at {offset})")
            parts.append(data)
            offset += n
            length -= n
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def index(self) -> np.ndarray:
        """The whole index (small points and tests; large ones use iter_index)."""
        parts = list(self.iter_index())
        return np.concatenate(parts) if parts else np.zeros(0, spec.INDEX_ENTRY)

    def keys(self) -> PointKeys:
        """An encrypted point's keys (attached by a keyring: keyring.Keyring.unlock)."""
        if self.files.keys is None:
            raise CredentialsError(f"point {str(self.header.point_id)[:8]} ({self.files.name}) is encrypted: "
                                   f"give its passphrase or identity")  # fmt: skip
        return self.files.keys

    def directory(self) -> np.ndarray | None:
        """The frame directory (format 1.1), checked against the footer; None for 1.0 points. An encrypted
        point's directory is sealed with a trailer that binds the footer's state digest, header digest and
        entry count to the keys: a footer altered to match altered data is found out here."""
        ft = self.footer
        if self.header.minor < 1:
            return None
        raw = self.read(ft.directory_offset, ft.directory_length) if ft.directory_length else b""
        if spec.b3(raw)[: spec.DIRECTORY_DIGEST_SIZE] != ft.directory_digest:
            raise IntegrityError(f"{self.segment_at(ft.directory_offset)}: index frame directory checksum "
                                 f"mismatch")  # fmt: skip
        if self.header.encrypted:
            plain = self.keys().open_meta(0, N_DIRECTORY, raw, f"{self.files.name}: index frame directory")
            raw, trailer = plain[: len(plain) - TRAILER.size], plain[len(plain) - TRAILER.size :]
            if len(trailer) != TRAILER.size or TRAILER.unpack(trailer) != (ft.state_digest, ft.header_digest,
                                                                            ft.index_count):  # fmt: skip
                raise IntegrityError(f"{self.files.name}: footer does not match what the point's keys sealed "
                                     f"(state digest, header digest or index size altered)")  # fmt: skip
        if len(raw) % spec.FRAME_ENTRY.itemsize:
            raise IntegrityError(f"{self.files.name}: index frame directory has a partial entry")
        d = np.frombuffer(raw, spec.FRAME_ENTRY)
        ends = d["offset"].astype(np.int64) + d["length"]
        if (int(d["entries"].astype(np.int64).sum()) != ft.index_count
                or (len(d) and (int(d["offset"][0]) != ft.index_offset or int(ends[-1]) != ft.directory_offset))
                or (ends[:-1] != d["offset"][1:].astype(np.int64)).any()):  # fmt: skip
            raise IntegrityError(f"{self.files.name}: index frame directory does not match the index")
        return d

    def iter_index(self, from_block: int = 0) -> Iterator[np.ndarray]:
        """Index entries in block order, one frame at a time (memory: one frame). Entries ending at or
        before from_block may be skipped (whole frames are, through the frame directory)."""
        d = self.directory()
        if d is None:
            yield from self._iter_index_v10()
            return
        dctx = zstandard.ZstdDecompressor()
        keys = self.keys() if self.header.encrypted else None
        for i in np.flatnonzero(d["end_block"] > from_block).tolist() if from_block else range(len(d)):
            fr = d[i]
            off, ln, n = int(fr["offset"]), int(fr["length"]), int(fr["entries"])
            raw = self.read(off, ln)
            where = self.segment_at(off)
            if spec.b3(raw) != fr["digest"].tobytes():
                raise IntegrityError(f"{where}: index checksum mismatch (frame at {off})")
            if keys is not None:
                raw = keys.open_meta(i, N_FRAME, raw, f"{where}: index frame {i}")
            try:
                data = dctx.decompress(raw, max_output_size=n * spec.INDEX_ENTRY.itemsize)
            except zstandard.ZstdError as e:
                raise IntegrityError(f"{where}: index does not decompress: {e}") from e
            if len(data) != n * spec.INDEX_ENTRY.itemsize:
                raise IntegrityError(f"{where}: index frame holds {len(data)} bytes, the directory says {n} "
                                     f"entries")  # fmt: skip
            yield np.frombuffer(data, spec.INDEX_ENTRY)

    def _iter_index_v10(self) -> Iterator[np.ndarray]:
        """1.0 points have no frame directory: prove the index digest first, then decode every frame in
        one streaming pass."""
        self.check_index()
        ft = self.footer
        if not ft.index_length:
            if ft.index_count:
                raise IntegrityError(f"{self.files.name}: empty index, but the footer says {ft.index_count} entries")
            return
        region = _RegionReader(self, ft.index_offset, ft.index_length)
        stream = zstandard.ZstdDecompressor().stream_reader(region, read_across_frames=True)  # type: ignore[arg-type]
        piece = spec.INDEX_ENTRY.itemsize * 16384
        total = 0
        try:
            while True:
                data = stream.read(piece)
                while data and len(data) % spec.INDEX_ENTRY.itemsize:
                    more = stream.read(spec.INDEX_ENTRY.itemsize - len(data) % spec.INDEX_ENTRY.itemsize)
                    if not more:
                        break
                    data += more
                if not data:
                    break
                total += len(data)
                if total > ft.index_count * spec.INDEX_ENTRY.itemsize or len(data) % spec.INDEX_ENTRY.itemsize:
                    break
                yield np.frombuffer(data, spec.INDEX_ENTRY)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{self.files.name}: index does not decompress: {e}") from e
        if total != ft.index_count * spec.INDEX_ENTRY.itemsize:
            raise IntegrityError(f"{self.files.name}: index holds {total} bytes or more, the footer says "
                                 f"{ft.index_count} entries")  # fmt: skip

    def check_index(self) -> None:
        """Prove the stored index bytes (and the frame directory) against the footer without decoding."""
        self.check_stored()
        self.directory()

    def check_stored(self) -> None:
        """The stored index and frame directory bytes against the footer's digests: what can be proven of an
        encrypted point without its keys."""
        ft = self.footer
        h = blake3.blake3()
        pos, end = ft.index_offset, ft.index_offset + ft.index_length
        while pos < end:
            n = min(8 << 20, end - pos)
            h.update(self.read(pos, n))
            pos += n
        if h.digest() != ft.index_digest:
            raise IntegrityError(f"{self.segment_at(ft.index_offset)}: index checksum mismatch")
        raw = self.read(ft.directory_offset, ft.directory_length) if ft.directory_length else b""
        if self.header.minor >= 1 and spec.b3(raw)[: spec.DIRECTORY_DIGEST_SIZE] != ft.directory_digest:
            raise IntegrityError(f"{self.segment_at(ft.directory_offset)}: index frame directory checksum "
                                 f"mismatch")  # fmt: skip

    def summary(self) -> dict[str, object]:
        if self.files._summary is None:
            ft = self.footer
            raw = self.files.segments[-1].summary_raw  # from the catalog cache: proven below like a read
            if raw is None or len(raw) != ft.summary_length:
                raw = self.read(ft.summary_offset, ft.summary_length)
            if spec.b3(raw) != ft.summary_digest:
                raise IntegrityError(f"{self.files.name}: summary checksum mismatch")
            if self.header.encrypted:
                raw = self.keys().open_meta(0, N_SUMMARY, raw, f"{self.files.name}: summary")
            self.files._summary = json.loads(raw)
        return self.files._summary

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __enter__(self) -> PointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
