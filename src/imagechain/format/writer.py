"""Stream one point into a store: payloads, index, summary, footer, split into segments.

All segments stay under temporary names until the footer is written and flushed; then they are
published, the segment holding the footer last, so no reader ever sees a footer without its data.

Payloads are written by a thread of their own behind a short queue: a slow repository disk then
holds up only that thread, while reading, hashing and compression go on until the queue is full."""

from __future__ import annotations

import json
import queue
import re
import tempfile
import threading
from collections.abc import Callable, Sequence

import blake3
import numpy as np
import zstandard

from .. import interrupts
from ..crypto import N_DIRECTORY, N_FRAME, N_SUMMARY, TRAILER, PointKeys
from ..errors import NoSpaceError
from ..limits import RateLimiter
from ..stores import AtomicWriter, Store
from . import spec

EXTENSION = ".icimg"
INDEX_FRAME_ENTRIES = 16384  # 1 MiB decoded: the unit of random access into an index
WRITE_BUFFER = 4 << 20
INDEX_SPILL = 16 << 20  # index frames beyond this wait in a temporary file, not in memory
WRITE_QUEUE = 4  # batches of payloads (a pipeline chunk each, 8 MiB of volume) waiting to be written


def segment_name(base: str, number: int) -> str:
    return f"{base}{EXTENSION}" if number == 0 else f"{base}.s{number:03d}{EXTENSION}"


_SEGMENT_SUFFIX = re.compile(r"(?<=.)\.s(\d{3,})$")


def split_segment_name(name: str) -> tuple[str, int | None]:
    """(base, the segment number the file name states, or None) for a name made by segment_name."""
    base = name.rpartition("/")[2].removesuffix(EXTENSION)
    m = _SEGMENT_SUFFIX.search(base)
    return (base[: m.start()], int(m.group(1))) if m else (base, None)


class ImageWriter:
    """keys: an encrypted point's; index frames, the frame directory and the summary are then sealed
    (payloads come sealed already) and the header is MAC'd with the chain's header key."""

    def __init__(self, store: Store, base: str, header: spec.PointHeader, split_size: int = 0,
                 write_rate: RateLimiter | None = None, thread_init: Callable[[], None] | None = None,
                 queued: int = WRITE_QUEUE, keys: PointKeys | None = None) -> None:  # fmt: skip
        if split_size and split_size < 1 << 20:
            raise ValueError("split size below 1 MiB")
        self.store, self.base, self.header = store, base, header
        self.split_size = split_size
        self.segments: list[AtomicWriter] = []
        self.logical = 0
        self._buf = bytearray()
        self._frames = tempfile.SpooledTemporaryFile(max_size=INDEX_SPILL)  # noqa: SIM115 (closed in finish/abort)
        self._directory: list[tuple[int, int, int, int, bytes]] = []  # first, end, length, entries, digest
        self._index_pending: list[np.ndarray] = []
        self._index_pending_n = 0
        self.index_count = 0
        self.size_limits: list[tuple[str, int]] = []  # segments cut short by the filesystem (EFBIG)
        self._zc = zstandard.ZstdCompressor(level=3)
        self._queue: queue.Queue[Sequence[bytes | memoryview] | None] = queue.Queue(queued)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._rate, self._thread_init = write_rate, thread_init
        self.keys = keys
        if header.encrypted and keys is None:
            raise ValueError("an encrypted point needs its keys")
        self._open_segment()
        self.header_bytes = header.pack(keys.header_mac_key if keys is not None else None)
        self.append(self.header_bytes)
        self._next = self.logical + len(self._buf)  # logical offset of the next payload appended

    # -- segments ---------------------------------------------------------------------------------
    def _open_segment(self) -> None:
        seg = self.store.create(segment_name(self.base, len(self.segments)))
        self.segments.append(seg)
        head = spec.SegmentHeader(len(self.segments) - 1, self.header.point_id, self.logical).pack()
        if seg.write(head) != len(head):
            raise NoSpaceError(f"{seg.name}: the filesystem refuses even a segment header")

    def _room(self) -> int:
        if not self.split_size:
            return 1 << 62
        return self.split_size - self.segments[-1].tell()

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            room = self._room()
            if room <= 0:
                self._open_segment()
                continue
            if self._rate is not None:  # smooth: a slice at a time, each when the rate allows it
                room = min(room, RateLimiter.SLICE)
                self._rate.take(min(room, len(view)))
            n = self.segments[-1].write(view[:room])
            if n < min(room, len(view)):
                # the filesystem's own size limit (EFBIG, e.g. FAT32's 4 GiB): remember it and roll over
                self.split_size = self.segments[-1].tell()
                if n == 0 and self.segments[-1].tell() <= spec.SEGMENT_HEADER_SIZE:
                    raise NoSpaceError(f"{self.segments[-1].name}: the filesystem refuses to grow the file")
                self.size_limits.append((self.segments[-1].name, self.split_size))
            view = view[n:]
            self.logical += n

    def _drain(self) -> None:
        if self._buf:
            self._emit(self._buf)
            self._buf = bytearray()

    # -- content ----------------------------------------------------------------------------------
    def append(self, data: bytes | memoryview) -> int:
        """Add bytes to the logical stream, in this thread; returns their logical offset."""
        self._sync()
        off = self.logical + len(self._buf)
        self._buf += data
        if len(self._buf) >= WRITE_BUFFER:
            self._drain()
        self._next = self.logical + len(self._buf)
        return off

    def append_payloads(self, payloads: Sequence[bytes | memoryview]) -> list[int]:
        """Queue payloads for the writer thread; returns their logical offsets at once. An error of the
        thread (a full disk) is raised by the next call, or by finish."""
        if self._error is not None:
            raise self._error
        offsets = []
        for p in payloads:
            offsets.append(self._next)
            self._next += len(p)
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_queued, name="image-writer", daemon=True)
            self._thread.start()
        while True:
            try:
                self._queue.put(payloads, timeout=0.2)
                return offsets
            except queue.Full:
                if self._error is not None:
                    raise self._error from None

    def _write_queued(self) -> None:
        if self._thread_init is not None:
            try:
                self._thread_init()
            except BaseException as e:
                self._error = e
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep taking batches so that the producer never waits on a dead writer
            try:
                for p in batch:
                    self._buf += p
                    if len(self._buf) >= WRITE_BUFFER:
                        self._drain()
            except BaseException as e:
                self._error = e

    def _sync(self) -> None:
        """Wait until the writer thread has written everything queued; raise its error, if any."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def add_entries(self, entries: np.ndarray) -> None:
        """Index entries in ascending block order; frames of INDEX_FRAME_ENTRIES are cut as they fill."""
        while len(entries):
            take = INDEX_FRAME_ENTRIES - self._index_pending_n
            self._index_pending.append(entries[:take])
            self._index_pending_n += len(entries[:take])
            self.index_count += len(entries[:take])
            entries = entries[take:]
            if self._index_pending_n >= INDEX_FRAME_ENTRIES:
                self._flush_index_frame()

    def _flush_index_frame(self) -> None:
        if self._index_pending:
            ent = np.concatenate(self._index_pending)
            frame = self._zc.compress(ent.tobytes())
            if self.keys is not None:
                frame = self.keys.seal_meta(len(self._directory), N_FRAME, frame)
            self._frames.write(frame)
            first = int(ent["block"][0])
            end = int(ent["block"][-1]) + int(ent["count"][-1])
            self._directory.append((first, end, len(frame), len(ent), spec.b3(frame)))
            self._index_pending, self._index_pending_n = [], 0

    def _write_index(self, state_digest: bytes) -> tuple[int, int, bytes, bytes]:
        """Copy the spilled frames into the stream, then the frame directory. (offset, length, index
        digest, directory bytes)"""
        self._flush_index_frame()
        index_offset = self.append(b"")
        index_digest = blake3.blake3()
        directory = np.zeros(len(self._directory), spec.FRAME_ENTRY)
        self._frames.seek(0)
        for i, (first, end, length, count, digest) in enumerate(self._directory):
            frame = self._frames.read(length)
            directory[i] = (first, end, self.append(frame), length, count, np.frombuffer(digest, np.uint8))
            index_digest.update(frame)
        self._frames.close()
        index_length = self.append(b"") - index_offset
        raw_dir = directory.tobytes() if self.header.minor >= 1 else b""  # 1.0 files have none
        if self.keys is not None:
            trailer = TRAILER.pack(state_digest, self.header.digest(), self.index_count)
            raw_dir = self.keys.seal_meta(0, N_DIRECTORY, raw_dir + trailer)
        self.append(raw_dir)
        return index_offset, index_length, index_digest.digest(), raw_dir

    def finish(self, state_digest: bytes, summary: dict[str, object]) -> list[str]:
        """Write index, frame directory, summary and footer; publish every segment. Returns the segment
        names."""
        index_offset, index_length, index_digest, raw_dir = self._write_index(state_digest)
        summary_bytes = json.dumps(summary, sort_keys=True).encode()
        if self.keys is not None:
            summary_bytes = self.keys.seal_meta(0, N_SUMMARY, summary_bytes)
        summary_offset = self.append(summary_bytes)
        self._drain()
        while True:
            if self._room() < spec.FOOTER_SIZE:
                self._open_segment()
            footer = spec.Footer(
                self.header.point_id, index_offset, index_length, self.index_count, index_digest,
                summary_offset, len(summary_bytes), spec.b3(summary_bytes), len(self.segments),
                state_digest, self.header.digest(), self.logical + spec.FOOTER_SIZE,
                spec.b3(raw_dir)[: spec.DIRECTORY_DIGEST_SIZE] if self.header.minor >= 1 else bytes(24),
            ).pack()  # fmt: skip
            nsegs = len(self.segments)
            self._emit(footer)
            if len(self.segments) == nsegs:
                break
            # EFBIG cut the footer: its bytes stay in the stream (the head at the end of the full segment,
            # the rest at the start of the new one) and are never read; the footer is written again, whole
        for seg in self.segments:
            seg.flush()
        # publish: every segment but the footer's first, then the footer's; a crash in between leaves
        # segments without a footer (the next writer of the chain publishes the rest). A stop signal
        # waits until all are renamed, so an interrupted backup has published all or nothing.
        names = [s.name for s in self.segments]
        try:
            with interrupts.deferred():
                for seg in self.segments:
                    seg.commit()
        except interrupts.Stopped as e:
            e.what = f"the point had been written whole and was published first ({names[0]})"
            raise
        return names

    def abort(self) -> None:
        if self._thread is not None:
            self._error = self._error or RuntimeError("aborted")  # the thread drops what is still queued
            self._queue.put(None)
            interrupts.join_started(self._thread)
            self._thread = None
        self._frames.close()
        for seg in self.segments:
            seg.abort()

