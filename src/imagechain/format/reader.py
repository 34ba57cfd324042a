"""Read points back: find a file's segments, check the footer, read index, summary and payloads."""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field

import numpy as np
import zstandard

from ..errors import IntegrityError
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

    @property
    def data_end(self) -> int:
        return self.seg.logical_offset + self.size - spec.SEGMENT_HEADER_SIZE


def scan_file(store: Store, entry: StoreEntry) -> SegmentFile | None:
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
    try:
        seg = spec.SegmentHeader.unpack(head[: spec.SEGMENT_HEADER_SIZE], entry.name)
    except IntegrityError as e:
        return _unusable(entry, str(e))
    sf = SegmentFile(entry.name, entry.size, seg)
    try:
        if seg.number == 0:
            body = head[spec.SEGMENT_HEADER_SIZE :]
            if len(body) >= 16 and body[:8] == spec.HEADER_MAGIC:
                need = spec.PointHeader.length_from_prefix(body)
                if need > len(body) and need < 64 << 20:
                    body += store.read(entry.name, len(head), need - len(body))
            sf.header = spec.PointHeader.unpack(body, entry.name)
            if sf.header.point_id != seg.point_id:
                raise IntegrityError(f"{entry.name}: point header and segment header disagree on the point id")
        if entry.size >= spec.SEGMENT_HEADER_SIZE + spec.FOOTER_SIZE:
            tail = store.read(entry.name, entry.size - spec.FOOTER_SIZE, spec.FOOTER_SIZE)
            if tail[-8:] == spec.FOOTER_MAGIC:
                sf.footer = spec.Footer.unpack(tail, entry.name)
                if sf.footer.point_id != seg.point_id:
                    raise IntegrityError(f"{entry.name}: footer belongs to another point")
    except IntegrityError as e:
        sf.problem = str(e)
        sf.footer = None
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

    @property
    def point_id(self) -> uuid.UUID:
        return self.header.point_id

    @property
    def name(self) -> str:
        return self.segments[0].name


def assemble(point_id: uuid.UUID, files: list[SegmentFile]) -> tuple[PointFiles | None, str]:
    """Put a point together from the segment files found for it; (None, why) when it is not whole."""
    usable = [f for f in files if not f.problem]
    broken = [f for f in files if f.problem]
    footers = [f for f in usable if f.footer is not None]
    short = str(point_id)[:8]
    if not footers:
        why = broken[0].problem if broken else "no segment has a footer (interrupted or truncated write)"
        return None, f"point {short} is incomplete: {why} [{', '.join(sorted(f.name for f in files))}]"
    last = footers[0]
    assert last.footer is not None
    footer = last.footer
    count = footer.segment_count
    chosen: list[SegmentFile | None] = [None] * count
    folder = last.name.rpartition("/")[0]
    for f in sorted(usable, key=lambda f: f.name.rpartition("/")[0] != folder):
        n = f.seg.number
        if 0 <= n < count and chosen[n] is None and (n != count - 1 or f is last):
            chosen[n] = f
    missing = [i for i, f in enumerate(chosen) if f is None]
    if missing:
        base = split_segment_name(last.name)[0]
        names = ", ".join(f"segment {i} ({segment_name(base, i)})" for i in missing)
        return None, f"point {short} is missing {names} of {count}"
    segs = [f for f in chosen if f is not None]
    stated = {f.name: split_segment_name(f.name)[1] for f in segs}
    misnamed = [f for f in segs if stated[f.name] not in (None, f.seg.number)]
    if misnamed:
        which = "; ".join(f"{f.name} holds segment {f.seg.number}, not {stated[f.name]}" for f in misnamed)
        return None, f"point {short}: segment files swapped or misnamed: {which}"
    expect = 0
    for f in segs:
        if f.seg.logical_offset != expect:
            return None, (
                f"point {short}: {f.name} does not fit at segment {f.seg.number} "
                f"(starts at {f.seg.logical_offset}, expected {expect}; swapped, truncated or foreign segment)"
            )
        expect = f.data_end
    if expect != footer.logical_length:
        return None, f"point {short}: segments hold {expect} bytes, footer says {footer.logical_length}"
    header = segs[0].header
    if header is None:
        return None, f"point {short}: {segs[0].name} has no readable point header"
    if spec.b3(header.pack()) != footer.header_digest:
        return None, f"point {short}: {segs[0].name}: header does not match the footer (altered header)"
    return PointFiles(header, footer, segs), ""


def _decompress_frames(raw: bytes) -> bytes:
    """All zstd frames of raw, back to back (the index is written as one frame per 64 Ki entries)."""
    dctx = zstandard.ZstdDecompressor()
    parts = []
    rest = raw
    while rest:
        obj = dctx.decompressobj()
        parts.append(obj.decompress(rest))
        if not obj.eof:
            raise zstandard.ZstdError("truncated frame")
        rest = obj.unused_data
    return b"".join(parts)


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
                    h = self._handles[i] = self.store.open(self.files.segments[i].name)
        return h

    def read(self, offset: int, length: int) -> bytes:
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
            data = self._handle(i).pread(spec.SEGMENT_HEADER_SIZE + offset - f.seg.logical_offset, n)
            if len(data) != n:
                raise IntegrityError(f"{f.name}: truncated (short read at {offset})")
            parts.append(data)
            offset += n
            length -= n
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def index(self) -> np.ndarray:
        ft = self.footer
        raw = self.read(ft.index_offset, ft.index_length) if ft.index_length else b""
        if spec.b3(raw) != ft.index_digest:
            raise IntegrityError(f"{self.files.name}: index checksum mismatch")
        try:
            data = _decompress_frames(raw)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{self.files.name}: index does not decompress: {e}") from e
        if len(data) != ft.index_count * spec.INDEX_ENTRY.itemsize:
            raise IntegrityError(f"{self.files.name}: index holds {len(data)} bytes, footer says "
                                 f"{ft.index_count} entries")  # fmt: skip
        return np.frombuffer(data, dtype=spec.INDEX_ENTRY)

    def summary(self) -> dict[str, object]:
        if self.files._summary is None:
            ft = self.footer
            raw = self.read(ft.summary_offset, ft.summary_length)
            if spec.b3(raw) != ft.summary_digest:
                raise IntegrityError(f"{self.files.name}: summary checksum mismatch")
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
