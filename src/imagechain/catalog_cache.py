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

import blake3

from .format import spec
from .format.reader import SegmentFile
from .mapcache import default_cache_dir
from .stores import Store, StoreEntry

CATALOG_ENV = "IMAGECHAIN_CATALOG_CACHE"


def default_catalog_dir() -> str:
    return os.environ.get(CATALOG_ENV) or os.path.join(os.path.dirname(default_cache_dir()), "catalog")


class Recorder:
    """A store's `read` as scan_file uses it: served from the cached head and tail when the entry is
    cached, else passed through and remembered (what scan_file reads of a file is its head and its tail)."""

    def __init__(self, store: Store, entry: StoreEntry, head: bytes | None, tail: bytes | None) -> None:
        self.store, self.entry = store, entry
        self.head, self.tail = head, tail
        self.hit = head is not None
        self._head = bytearray()

    def read(self, name: str, offset: int, length: int) -> bytes:
        size = self.entry.size
        if self.hit:
            assert self.head is not None and self.tail is not None
            if offset == 0:
                return self.head[:length]
            if offset == size - len(self.tail) and length == len(self.tail):
                return self.tail
            if offset < len(self.head):
                return self.head[offset : offset + length]
        data = self.store.read(name, offset, length)
        if offset == len(self._head) and offset < size - spec.FOOTER_SIZE:
            self._head += data
        elif offset + length >= size:
            self.tail = data
        return data

    def keep(self, sf: SegmentFile | None) -> tuple[bytes, bytes] | None:
        """What to cache of a file that scanned cleanly: its headers (not the 4 KiB read for them) and footer;
        for a file that is no image file at all (the marker, a lock, a damage record), that it is none."""
        if self.hit:
            return None
        if sf is None:
            return b"", b""  # its head does not start like a segment: read as such from the cache
        if sf.problem or sf.seg.number < 0 or self.tail is None:
            return None
        n = spec.SEGMENT_HEADER_SIZE
        if sf.seg.number == 0:
            if sf.header is None:
                return None
            n += spec.PointHeader.length_from_prefix(bytes(self._head[n:]))
        return bytes(self._head[:n]), self.tail


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
                       "head BLOB, tail BLOB)")  # fmt: skip
            db.execute("CREATE TABLE IF NOT EXISTS about (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT OR REPLACE INTO about VALUES ('url', ?)", (store.url,))
            db.commit()
            self._db = db

    def lookup(self, entries: Iterable[StoreEntry]) -> dict[str, tuple[bytes, bytes]]:
        if self._db is None:
            return {}
        want = {e.name: e for e in entries}
        out: dict[str, tuple[bytes, bytes]] = {}
        with self._lock, contextlib.suppress(sqlite3.Error):
            for name, size, tag, head, tail in self._db.execute("SELECT name, size, tag, head, tail FROM files"):
                e = want.get(name)
                if e is not None and e.size == size and e.tag == tag and e.tag:
                    out[name] = (bytes(head), bytes(tail))
        return out

    def update(self, fresh: dict[StoreEntry, tuple[bytes, bytes]], listed: Iterable[StoreEntry], prefix: str) -> None:
        """Remember fresh entries and forget the files below prefix that the listing no longer shows."""
        if self._db is None:
            return
        names = {e.name for e in listed}
        with self._lock, contextlib.suppress(sqlite3.Error):
            gone = [(n,) for (n,) in self._db.execute("SELECT name FROM files") if n.startswith(prefix)
                    and n not in names]  # fmt: skip
            self._db.executemany("DELETE FROM files WHERE name = ?", gone)
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                                 [(e.name, e.size, e.tag, h, t) for e, (h, t) in fresh.items()])  # fmt: skip
            self._db.commit()

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
