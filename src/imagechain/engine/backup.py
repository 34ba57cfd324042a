"""CBC backup: read the volume once, digest every block, store only blocks whose digest differs
from the parent point's block map."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import blake3
import numpy as np

from .. import __version__
from ..blockmap import BlockMap, CacheWriter, StateHasher, block_count, default_cache_dir, load_cached
from ..chain import lineage, resolve
from ..codec import CodecParams, encode
from ..errors import ChainBrokenError, UsageError
from ..format import spec
from ..format.writer import ImageWriter
from ..identity import HostIdentity, local_host
from ..lock import ChainLock
from ..repository import Repository
from ..sources import Source, open_source
from .pipeline import default_threads, ordered_map, prefetch
from .progress import Progress, Silent

DEFAULT_BLOCK_SIZE = 64 << 10
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 4 << 10, 16 << 20
CHUNK_BYTES = 8 << 20
FAT_SPLIT = 4000 << 20  # below FAT32's 4 GiB - 1 file size limit
MIN_SPLIT = 1 << 20
DEFAULT_CODEC = CodecParams(spec.COMPRESSION_ZSTD, 3)


def check_block_size(bs: int) -> int:
    if bs & (bs - 1) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise UsageError(f"block size must be a power of two between 4K and 16M, not {bs}")
    return bs


def check_split_size(size: int) -> int:
    if size and size < MIN_SPLIT:
        raise UsageError(f"split size must be at least 1M (or 0 for none), not {size}")
    return size


@dataclass
class BackupResult:
    point_id: str
    chain_id: str
    chain: str
    host: str
    source: str
    kind: str
    sequence: int
    files: list[str]
    volume_size: int
    block_size: int
    read_bytes: int
    changed_blocks: int
    changed_bytes: int
    stored_bytes: int
    file_bytes: int
    duration_s: float
    state_digest: str
    notices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _Stats:
    """What one pass over the volume found; becomes the point's summary."""

    blocks: int
    volume_size: int
    read_bytes: int = 0
    changed_blocks: int = 0
    changed_bytes: int = 0
    stored_blocks: int = 0
    stored_bytes: int = 0
    data_blocks: int = 0
    zero_blocks: int = 0
    state: bytes = b""

    def summary(self, duration_s: float) -> dict[str, object]:
        out: dict[str, object] = {k: v for k, v in asdict(self).items() if k != "state"}
        return {**out, "duration_s": round(duration_s, 3),
                "finished": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip


@dataclass
class _Chunk:
    start: int
    kinds: np.ndarray
    digests: np.ndarray
    changed: np.ndarray  # indices (within the chunk) of blocks that differ from the parent
    payloads: list[tuple[int, bytes | memoryview]]  # for changed DATA blocks, in order
    raw_changed: int


def backup(
    source_path: str,
    repo_path: str,
    *,
    chain: str = "default",
    full: bool = False,
    block_size: int | None = None,
    codec: CodecParams | None = None,
    split_size: int | None = None,
    host: HostIdentity | None = None,
    source_name: str | None = None,
    cache_dir: str | None = "",
    threads: int | None = None,
    progress: Progress | None = None,
) -> BackupResult:
    """Make the next point of `chain` for the source: incremental when the chain exists, else full."""
    if block_size is not None:
        check_block_size(block_size)
    if split_size is not None:
        check_split_size(split_size)
    if not chain or len(chain) > 1024:
        raise UsageError("chain name must be 1 to 1024 characters")
    host = host or local_host()
    progress = progress or Silent()
    cache = default_cache_dir() if cache_dir == "" else cache_dir
    with open_source(source_path, source_name) as src:
        repo = Repository.open(repo_path, create=True)
        what = f"chain {chain!r} of {src.name} on {host.name}"
        with ChainLock(repo.store, repo.lock_name(host.host_id, src.source_id, chain), host, what, repo_path):
            return _backup_locked(src, repo, host, chain, full, block_size, codec, split_size, cache,
                                  threads or default_threads(), progress)  # fmt: skip


def _backup_locked(
    src: Source, repo: Repository, host: HostIdentity, chain: str, full: bool, block_size: int | None,
    codec: CodecParams | None, split_size: int | None, cache: str | None, threads: int, progress: Progress,
) -> BackupResult:  # fmt: skip
    t0 = time.monotonic()
    notices: list[str] = []
    cat = repo.catalog()
    chain_dir = repo.chain_dir(host.name, host.host_id, src.name, src.source_id, chain)
    for name in cat.leftovers:
        if name.startswith(chain_dir + "/"):
            repo.store.delete(name)
            notices.append(f"removed {name}, left by an interrupted backup")
    for files, why in cat.problems:
        # not ours to delete: a damaged point may still be wanted for inspection or recovery
        if any(f.startswith(chain_dir + "/") for f in files):
            notices.append(f"ignored (not a point): {why}")

    line = [] if full else cat.find_chain_line(host.host_id, src.source_id, chain)
    parent = line[-1] if line else None
    pmap: BlockMap | None = None
    fs = repo.store.filesystem()
    if parent is not None:
        ph = parent.header
        try:
            lin = lineage(cat, parent)
        except ChainBrokenError as e:
            raise ChainBrokenError(f"{e}; use --full to start a new chain") from e
        if block_size is not None and block_size != ph.block_size:
            raise UsageError(f"chain {chain!r} uses block size {ph.block_size}; use --full to change it")
        bs = ph.block_size
        codec = codec or CodecParams(ph.compression, ph.compression_level)
        split = ph.split_size if split_size is None else split_size
        pmap = load_cached(cache, parent.point_id, parent.footer.state_digest)
        if pmap is None:
            pmap = resolve(repo.store, lin, locations=False)
        chain_id, sequence = ph.chain_id, ph.sequence + 1
        if ph.metadata.get("source_identity") != src.identity:
            notices.append(f"source identity changed from {ph.metadata.get('source_identity')} to {src.identity}")
    else:
        bs = block_size or DEFAULT_BLOCK_SIZE
        codec = codec or DEFAULT_CODEC
        split = split_size or 0
        chain_id, sequence = uuid.uuid4(), 0
    if fs == "vfat" and (split == 0 or split > FAT_SPLIT):
        split = FAT_SPLIT
    point_id = uuid.uuid4()
    created = time.time_ns() // 1000
    header = spec.PointHeader(
        point_id=point_id, chain_id=chain_id, parent_id=parent.point_id if parent else None,
        parent_state=parent.footer.state_digest if parent else bytes(32),
        host_id=host.host_id, source_id=src.source_id, sequence=sequence, block_size=bs,
        volume_size=src.size, created_us=created,
        kind=spec.KIND_INCREMENTAL if parent else spec.KIND_FULL,
        compression=codec.compression, compression_level=codec.level, split_size=split,
        metadata={
            "host": host.name, "source": src.name, "source_path": os.path.abspath(src.path),
            "source_identity": src.identity, "chain": chain, "tool": f"imagechain {__version__}",
            **({"parent_file": parent.name.rpartition("/")[2]} if parent else {}),
        },
    )  # fmt: skip
    base = repo.point_base(chain_dir, created, sequence, parent is None, point_id.hex)
    writer = ImageWriter(repo.store, base, header, split)
    cachew = CacheWriter(cache, src.size, bs)
    try:
        stats = _run(src, bs, codec, pmap, writer, cachew, threads, progress)
        files = writer.finish(stats.state, stats.summary(time.monotonic() - t0))
    except BaseException:
        writer.abort()
        cachew.abort()
        raise
    cachew.commit(point_id, stats.state)
    for n in notices:
        progress.notice(n)
    return BackupResult(
        point_id=str(point_id), chain_id=str(chain_id), chain=chain, host=host.name, source=src.name,
        kind="incremental" if parent else "full", sequence=sequence, files=files, volume_size=src.size,
        block_size=bs, read_bytes=stats.read_bytes, changed_blocks=stats.changed_blocks,
        changed_bytes=stats.changed_bytes, stored_bytes=stats.stored_bytes,
        file_bytes=sum(repo.store.size(f) for f in files), duration_s=time.monotonic() - t0,
        state_digest=stats.state.hex(), notices=notices,
    )  # fmt: skip


def _run(
    src: Source, bs: int, codec: CodecParams, pmap: BlockMap | None, writer: ImageWriter,
    cachew: CacheWriter, threads: int, progress: Progress,
) -> _Stats:  # fmt: skip
    size = src.size
    n_total = block_count(size, bs)
    per_chunk = max(1, CHUNK_BYTES // bs)
    pn = pmap.count if pmap is not None else 0
    pdig = pmap.digest.view("<u8").reshape(-1, 4) if pmap is not None else None
    pkind = pmap.kind if pmap is not None else None
    try:
        os.posix_fadvise(src.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (OSError, AttributeError):
        pass

    def chunks() -> object:
        for start in range(0, n_total, per_chunk):
            off = start * bs
            yield start, src.read(off, min(per_chunk * bs, size - off))

    def work(item: tuple[int, bytes]) -> _Chunk:
        start, data = item
        n = -(-len(data) // bs)
        mv = memoryview(data)
        kinds = np.full(n, spec.BLOCK_DATA, np.uint8)
        nfull = len(data) // bs
        if nfull:
            words = np.frombuffer(data, np.uint64, count=nfull * bs // 8).reshape(nfull, -1)
            kinds[:nfull][~words.any(axis=1)] = spec.BLOCK_ZERO
        if nfull < n and not np.frombuffer(data, np.uint8, offset=nfull * bs).any():
            kinds[nfull] = spec.BLOCK_ZERO
        dbuf = bytearray(32 * n)
        for j in np.flatnonzero(kinds == spec.BLOCK_DATA).tolist():
            dbuf[32 * j : 32 * j + 32] = blake3.blake3(mv[j * bs : (j + 1) * bs]).digest()
        digests = np.frombuffer(dbuf, np.uint8).reshape(n, 32)
        if pdig is not None and pkind is not None:
            m = max(0, min(n, pn - start))
            changed = np.ones(n, bool)
            cur = digests.view("<u8").reshape(n, 4)
            changed[:m] = (cur[:m] != pdig[start : start + m]).any(axis=1) | (kinds[:m] != pkind[start : start + m])
            idx = np.flatnonzero(changed)
        else:
            idx = np.arange(n)
        payloads = []
        raw = 0
        for j in idx.tolist():
            ln = min(bs, len(data) - j * bs)
            raw += ln
            if kinds[j] == spec.BLOCK_DATA:
                payloads.append(encode(codec, mv[j * bs : j * bs + ln]))
        return _Chunk(start, kinds, digests, idx, payloads, raw)

    state = StateHasher(size, bs)
    st = _Stats(n_total, size)
    progress.start("backup", size)
    try:
        for ch in ordered_map(work, prefetch(chunks(), 3), threads, threads * 2):  # type: ignore[arg-type]
            n = len(ch.kinds)
            state.update(ch.kinds, ch.digests)
            cachew.write(ch.start, ch.kinds, ch.digests)
            k = len(ch.changed)
            if k:
                ent = np.zeros(k, spec.INDEX_ENTRY)
                ent["block"] = ch.changed + ch.start
                ent["count"] = 1
                ent["kind"] = ch.kinds[ch.changed]
                ent["digest"] = ch.digests[ch.changed]
                rows = np.flatnonzero(ent["kind"] == spec.BLOCK_DATA)
                if len(rows) != len(ch.payloads):
                    raise AssertionError("payload count does not match changed data blocks")
                ent["codec"][rows] = [c for c, _ in ch.payloads]
                ent["offset"][rows] = [writer.append(p) for _, p in ch.payloads]
                lengths = [len(p) for _, p in ch.payloads]
                ent["length"][rows] = lengths
                st.stored_bytes += sum(lengths)
                st.stored_blocks += len(rows)
                writer.add_entries(_merge_zero_runs(ent))
            st.changed_blocks += k
            st.changed_bytes += ch.raw_changed
            z = int(np.count_nonzero(ch.kinds == spec.BLOCK_ZERO))
            st.zero_blocks += z
            st.data_blocks += n - z
            nbytes = min(n * bs, size - ch.start * bs)
            st.read_bytes += nbytes
            progress.advance(nbytes)
    finally:
        progress.stop()
    st.state = state.digest()
    return st


def _merge_zero_runs(ent: np.ndarray) -> np.ndarray:
    """Collapse consecutive ZERO entries into runs (count > 1): a zeroed area costs one entry."""
    zero = ent["kind"] == spec.BLOCK_ZERO
    if zero.sum() < 2:
        return ent
    blocks = ent["block"].astype(np.int64)
    # a row starts a new entry unless it is a zero block right after a zero block
    cont = np.zeros(len(ent), bool)
    cont[1:] = zero[1:] & zero[:-1] & (blocks[1:] == blocks[:-1] + 1)
    heads = np.flatnonzero(~cont)
    out = ent[heads].copy()
    ends = np.append(heads[1:], len(ent))
    out["count"] = ends - heads
    return out
