"""The block map: for every block of a volume at one point, its kind and digest (and, once resolved
against a chain, where its payload lives). Compact numpy arrays, never per-block Python objects."""

from __future__ import annotations

import os
import secrets
import struct
import time
import uuid
from dataclasses import dataclass

import blake3
import numpy as np

STATE_PREFIX = b"imagechain-state-v1\0"


def state_digest(volume_size: int, block_size: int, kinds_hash: bytes, digests_hash: bytes) -> bytes:
    """The state digest: BLAKE3 over sizes and the BLAKE3 of the kind and digest arrays."""
    return blake3.blake3(
        STATE_PREFIX + struct.pack("<QI", volume_size, block_size) + kinds_hash + digests_hash
    ).digest()


class StateHasher:
    """Computes the state digest from the map streamed in block order."""

    def __init__(self, volume_size: int, block_size: int) -> None:
        self.volume_size, self.block_size = volume_size, block_size
        self._k, self._d = blake3.blake3(), blake3.blake3()

    def update(self, kinds: np.ndarray, digests: np.ndarray) -> None:
        self._k.update(np.ascontiguousarray(kinds).data)
        self._d.update(np.ascontiguousarray(digests).data)

    def digest(self) -> bytes:
        return state_digest(self.volume_size, self.block_size, self._k.digest(), self._d.digest())


@dataclass
class BlockMap:
    volume_size: int
    block_size: int
    kind: np.ndarray  # u1[n]
    digest: np.ndarray  # u1[n, 32]; zero for ZERO/UNUSED blocks
    src: np.ndarray | None = None  # u2[n]: position of the payload's point in the lineage
    offset: np.ndarray | None = None  # u8[n]: logical offset of the payload in that point
    length: np.ndarray | None = None  # u4[n]
    codec: np.ndarray | None = None  # u1[n]

    @property
    def count(self) -> int:
        return len(self.kind)

    def state_digest(self) -> bytes:
        h = StateHasher(self.volume_size, self.block_size)
        h.update(self.kind, self.digest)
        return h.digest()

    def raw_length(self, block: int) -> int:
        return min(self.block_size, self.volume_size - block * self.block_size)


def block_count(volume_size: int, block_size: int) -> int:
    return -(-volume_size // block_size)


def expand_blocks(entries: np.ndarray) -> np.ndarray:
    """Block numbers covered by index entries, runs expanded, in entry order."""
    counts = entries["count"].astype(np.int64)
    if len(counts) and (counts == 1).all():
        return entries["block"].astype(np.int64)
    starts = np.repeat(entries["block"].astype(np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return starts + (np.arange(int(counts.sum()), dtype=np.int64) - first)


# -- local cache ---------------------------------------------------------------------------------
CACHE_MAGIC = b"ICMAP001"


def default_cache_dir() -> str:
    env = os.environ.get("IMAGECHAIN_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "imagechain", "maps")


def cache_path(cache_dir: str, point_id: uuid.UUID, state: bytes) -> str:
    return os.path.join(cache_dir, f"{point_id.hex}-{state.hex()[:32]}.map")


class CacheWriter:
    """Streams a new point's map (kinds, then digests) into the cache as the backup reads the volume."""

    def __init__(self, cache_dir: str | None, volume_size: int, block_size: int) -> None:
        self.dir = cache_dir
        self.n = block_count(volume_size, block_size)
        self.volume_size, self.block_size = volume_size, block_size
        self.fd: int | None = None
        if cache_dir is None:
            return
        try:
            os.makedirs(cache_dir, exist_ok=True)
            _remove_old_temporaries(cache_dir)
            self.tmp = os.path.join(cache_dir, f".tmp-{secrets.token_hex(6)}.map")
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.pwrite(self.fd, CACHE_MAGIC + struct.pack("<QIQ", volume_size, block_size, self.n), 0)
        except OSError:
            self.fd = None  # the cache is an optimisation: no cache, no harm

    def write(self, start: int, kinds: np.ndarray, digests: np.ndarray) -> None:
        if self.fd is None:
            return
        try:
            os.pwrite(self.fd, np.ascontiguousarray(kinds).data, 28 + start)
            os.pwrite(self.fd, np.ascontiguousarray(digests).data, 28 + self.n + start * 32)
        except OSError:
            self.abort()

    def commit(self, point_id: uuid.UUID, state: bytes) -> None:
        if self.fd is None or self.dir is None:
            return
        os.close(self.fd)
        self.fd = None
        try:
            os.replace(self.tmp, cache_path(self.dir, point_id, state))
        except OSError:
            self.abort()

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.dir is not None:
            try:
                os.unlink(self.tmp)
            except (OSError, AttributeError):
                pass


def _remove_old_temporaries(cache_dir: str, older_than: float = 86400.0) -> None:
    """Temporaries of killed backups; a day old is long dead (the cache is local, so mtimes are fine)."""
    now = time.time()
    for entry in os.scandir(cache_dir):
        if entry.name.startswith(".tmp-") and entry.name.endswith(".map"):
            try:
                if now - entry.stat().st_mtime > older_than:
                    os.unlink(entry.path)
            except OSError:
                pass


def load_cached(cache_dir: str | None, point_id: uuid.UUID, state: bytes) -> BlockMap | None:
    """The cached map for a point, only if it still hashes to the point's state digest."""
    if cache_dir is None:
        return None
    path = cache_path(cache_dir, point_id, state)
    try:
        with open(path, "rb") as f:
            head = f.read(28)
            if len(head) != 28 or head[:8] != CACHE_MAGIC:
                return None
            vsize, bsize, n = struct.unpack("<QIQ", head[8:])
            kinds = np.fromfile(f, dtype=np.uint8, count=n)
            digests = np.fromfile(f, dtype=np.uint8, count=n * 32).reshape(-1, 32)
    except (OSError, ValueError):
        return None
    if len(kinds) != n or len(digests) != n:
        return None
    bm = BlockMap(vsize, bsize, kinds, digests)
    return bm if bm.state_digest() == state else None
