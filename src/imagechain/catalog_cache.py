"""The catalog cache: what `scan` read of each file of a remote repository (its segment and point header,
its footer), kept on this machine so that the next command finds every chain from one listing instead of
two ranged reads per file.

It is a cache and nothing more: the image files stay the only truth. An entry is used only for a file of
the same name, size and tag (ETag or mtime, which any rewrite changes), a file that scanned with a problem
is never cached, and deleting the cache costs one slow scan. One SQLite file per store URL, shared by
concurrent commands (WAL); any failure to use it falls back to reading the files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import blake3

from .format import spec
from .format.reader import SegmentFile
from .mapcache import default_cache_dir
from .stores import Store, StoreEntry

CATALOG_ENV = "IMAGECHAIN_CATALOG_CACHE"


def default_catalog_dir() -> str:
    return os.environ.get(CATALOG_ENV) or os.path.join(os.path.dirname(default_cache_dir()), "catalog")


TAIL_READ = 4096  # a cold scan reads this much of each file's end: its footer and, mostly, its summary


@dataclass
class Cached:
    head: bytes  # the segment header and, in segment 0, the point header
    tail: bytes  # the footer (empty for a file that is no image file)
    summary: bytes | None  # the stored summary, for `list`


class Recorder:
    """A store's `read` as scan_file uses it: served from the cache when the entry is there, else passed
    through and remembered (what scan_file reads of a file is its head and its tail; the tail is read
    TAIL_READ long, in the same request, so that the summary comes along)."""

    def __init__(self, store: Store, entry: StoreEntry, cached: Cached | None) -> None:
        self.store, self.entry, self.cached = store, entry, cached
        self._head = bytearray()
        self._end: tuple[int, bytes] | None = None  # (file offset, bytes) of the last TAIL_READ bytes

    @property
    def hit(self) -> bool:
        return self.cached is not None

    def read(self, name: str, offset: int, length: int) -> bytes:
        size, c = self.entry.size, self.cached
        if c is not None:
            if offset == 0:
                return c.head[:length]
            if offset == size - len(c.tail) and length == len(c.tail):
                return c.tail
            if offset < len(c.head):
                return c.head[offset : offset + length]
        if offset + length >= size and offset >= size - spec.FOOTER_SIZE:  # the footer: take the file's end
            start = max(0, size - TAIL_READ)
            end = self.store.read(name, start, size - start)
            self._end = (start, end)
            return end[offset - start : offset - start + length]
        data = self.store.read(name, offset, length)
        if offset == len(self._head):
            self._head += data
        return data

    def summary_of(self, sf: SegmentFile) -> bytes | None:
        """The stored summary of a last segment, if the cache or the tail read holds it (unproven: the
        reader checks it against the footer's digest as it would a read)."""
        if self.cached is not None:
            return self.cached.summary
        ft = sf.footer
        if ft is None or self._end is None:
            return None
        start, end = self._end
        at = spec.SEGMENT_HEADER_SIZE + ft.summary_offset - sf.seg.logical_offset - start
        if at < 0 or at + ft.summary_length > len(end):
            return None
        return end[at : at + ft.summary_length]

    def keep(self, sf: SegmentFile | None) -> Cached | None:
        """What to cache of a file that scanned cleanly: its headers (not the 4 KiB read for them), footer
        and summary; for a file that is no image file at all (the marker, a lock, a damage record), that it
        is none."""
        if self.hit:
            return None
        if sf is None:
            return Cached(b"", b"", None)  # its head does not start like a segment: read as such from the cache
        if sf.problem or sf.seg.number < 0 or self._end is None:
            return None
        n = spec.SEGMENT_HEADER_SIZE
        if sf.seg.number == 0:
            if sf.header is None:
                return None
            n += spec.PointHeader.length_from_prefix(bytes(self._head[n:]))
        start, end = self._end
        head = bytes(self._head[:n]) if len(self._head) >= n else end[:n] if start == 0 else None
        if head is None:
            return None
        return Cached(head, end[-spec.FOOTER_SIZE :], self.summary_of(sf))


class CatalogCache:
    def __init__(self, store: Store, folder: str | None = None) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        key = blake3.blake3(store.url.encode()).hexdigest()[:32]
        path = os.path.join(folder or default_catalog_dir(), f"{key}.sqlite")
        with contextlib.suppress(OSError, sqlite3.Error):
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            db = sqlite3.connect(path, timeout=10, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, size INTEGER, tag TEXT, "
                       "head BLOB, tail BLOB, summary BLOB)")  # fmt: skip
            db.execute("CREATE TABLE IF NOT EXISTS about (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT OR REPLACE INTO about VALUES ('url', ?)", (store.url,))
            db.commit()
            self._db = db

    def lookup(self, entries: Iterable[StoreEntry]) -> dict[str, Cached]:
        if self._db is None:
            return {}
        want = {e.name: e for e in entries}
        out: dict[str, Cached] = {}
        with self._lock, contextlib.suppress(sqlite3.Error):
            rows = self._db.execute("SELECT name, size, tag, head, tail, summary FROM files")
            for name, size, tag, head, tail, summary in rows:
                e = want.get(name)
                if e is not None and e.size == size and e.tag == tag and e.tag:
                    out[name] = Cached(bytes(head), bytes(tail), None if summary is None else bytes(summary))
        return out

    def update(self, fresh: dict[StoreEntry, Cached], listed: Iterable[StoreEntry], prefix: str) -> None:
        """Remember fresh entries and forget the files below prefix that the listing no longer shows."""
        if self._db is None:
            return
        names = {e.name for e in listed}
        with self._lock, contextlib.suppress(sqlite3.Error):
            gone = [(n,) for (n,) in self._db.execute("SELECT name FROM files") if n.startswith(prefix)
                    and n not in names]  # fmt: skip
            self._db.executemany("DELETE FROM files WHERE name = ?", gone)
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                                 [(e.name, e.size, e.tag, c.head, c.tail, c.summary) for e, c in fresh.items()])
            self._db.commit()

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
