"""The local block-map cache: the map of each chain tip this machine backed up, so the next incremental
compares against it without reading the chain's indexes.

One file per map, `<point id>-<state digest/16>.map`: magic, volume size, block size, block count, then
every kind (u8) and every digest (32 bytes). Maps are read a window at a time and proven against the
point's state digest before use; a map that does not prove is ignored and rebuilt from the indexes."""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Iterator

import numpy as np

from .blockmap import BlockMap, block_count
from .state import StateHasher

MAGIC = b"ICMAP001"
HEAD = struct.Struct("<8sQIQ")
KEEP_MAPS = 16  # maps of tips kept at most; older ones go (a missing map costs one pass over indexes)
STALE_TEMPORARY = 86400.0
PROVE_BLOCKS = 1 << 20


def default_cache_dir() -> str:
    env = os.environ.get("IMAGECHAIN_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "imagechain", "maps")


def cache_path(cache_dir: str, point_id: uuid.UUID, state: bytes) -> str:
    return os.path.join(cache_dir, f"{point_id.hex}-{state.hex()[:32]}.map")


class MapFile:
    """A map on local disk, read a window at a time (pread: memory follows the window, not the map)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            magic, self.volume_size, self.block_size, self.n = HEAD.unpack(os.pread(self.fd, HEAD.size, 0))
            if magic != MAGIC or os.fstat(self.fd).st_size != HEAD.size + 33 * self.n:
                raise ValueError("not a map file")
        except (struct.error, ValueError):
            os.close(self.fd)
            raise ValueError(f"{path}: not a complete map file") from None

    def window(self, start: int, end: int) -> BlockMap:
        end = min(end, self.n)
        k = np.frombuffer(os.pread(self.fd, end - start, HEAD.size + start), np.uint8)
        d = np.frombuffer(os.pread(self.fd, 32 * (end - start), HEAD.size + self.n + 32 * start), np.uint8)
        if len(k) != end - start or len(d) != 32 * (end - start):
            raise OSError(f"{self.path}: short read")
        return BlockMap(self.volume_size, self.block_size, k, d.reshape(-1, 32), start=start)

    def windows(self, size: int = PROVE_BLOCKS) -> Iterator[BlockMap]:
        for s in range(0, self.n, size):
            yield self.window(s, s + size)

    def proves(self, state: bytes) -> bool:
        h = StateHasher(self.volume_size, self.block_size)
        for w in self.windows():
            h.update(w.kind, w.digest)
        return h.digest() == state

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> MapFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MapWriter:
    """Streams a map into a temporary file of the cache folder; commit names it after its point."""

    def __init__(self, folder: str | None, volume_size: int, block_size: int) -> None:
        self.dir = folder
        self.n = block_count(volume_size, block_size)
        self.fd: int | None = None
        self.tmp = ""
        if folder is None:
            return
        try:
            os.makedirs(folder, exist_ok=True)
            _remove_old_temporaries(folder)
            self.tmp = os.path.join(folder, f".tmp-{os.urandom(6).hex()}.map")
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.pwrite(self.fd, HEAD.pack(MAGIC, volume_size, block_size, self.n), 0)
        except OSError:
            self.abort()  # the cache is an optimisation: no cache, no harm

    @property
    def active(self) -> bool:
        return self.fd is not None

    def write(self, start: int, kinds: np.ndarray, digests: np.ndarray) -> None:
        if self.fd is None:
            return
        try:
            os.pwrite(self.fd, np.ascontiguousarray(kinds).data, HEAD.size + start)
            os.pwrite(self.fd, np.ascontiguousarray(digests).data, HEAD.size + self.n + start * 32)
        except OSError:
            self.abort()

    def commit(self, path: str) -> bool:
        if self.fd is None:
            return False
        fd, self.fd = self.fd, None
        try:
            os.close(fd)
            os.replace(self.tmp, path)
            return True
        except OSError:
            self.abort()
            return False

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


def open_cached(cache_dir: str | None, point_id: uuid.UUID, state: bytes) -> MapFile | None:
    """The cached map of a point, only if it proves against the point's state digest."""
    if cache_dir is None:
        return None
    path = cache_path(cache_dir, point_id, state)
    try:
        mf = MapFile(path)
    except (OSError, ValueError):
        return None
    if mf.proves(state):
        try:
            os.utime(path)  # most recently used: kept longest
        except OSError:
            pass
        return mf
    mf.close()
    return None


def commit_tip(writer: MapWriter, cache_dir: str | None, point_id: uuid.UUID, state: bytes,
               parent: tuple[uuid.UUID, bytes] | None) -> None:  # fmt: skip
    """Publish a new tip's map; the parent is no longer a tip, so its map goes; then prune the cache."""
    if cache_dir is None or not writer.commit(cache_path(cache_dir, point_id, state)):
        return
    if parent is not None:
        try:
            os.unlink(cache_path(cache_dir, *parent))
        except OSError:
            pass
    prune(cache_dir)


def prune(cache_dir: str, keep: int = KEEP_MAPS) -> None:
    """Keep the `keep` most recently used maps."""
    try:
        maps = [e for e in os.scandir(cache_dir) if e.name.endswith(".map") and not e.name.startswith(".tmp-")]
        maps.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    except OSError:
        return
    for e in maps[keep:]:
        try:
            os.unlink(e.path)
        except OSError:
            pass


def _remove_old_temporaries(cache_dir: str, older_than: float = STALE_TEMPORARY) -> None:
    """Temporaries of killed backups; a day old is long dead (the cache is local, so mtimes are fine)."""
    now = time.time()
    for entry in os.scandir(cache_dir):
        if entry.name.startswith(".tmp-") and entry.name.endswith(".map"):
            try:
                if now - entry.stat().st_mtime > older_than:
                    os.unlink(entry.path)
            except OSError:
                pass
