"""Replication: copy the points a destination repository lacks, proven before they appear there.

Points are copied parents first, file by file under temporary names (the store's atomic writer), each
file's bytes hashed as they are read from the source and hashed again as read back from the destination;
a point is published (its segments renamed, the one with the footer last) only when every file matched
and the source point verified. Interrupted, a replication leaves temporaries that the next run (holding
the destination chain's lock) removes; points already there are skipped, so running it again resumes,
and running it twice copies nothing. Files keep their names, so a replica is laid out like its source
and a chain copied to a remote site can be continued there by backups.

What the source merged away (consolidate, prune) the destination retires too, once the merged point has
arrived: from then on the destination's catalog hides those points behind it, so their files would only
take up room there, for ever."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field

import blake3

from .. import interrupts
from ..chain import Catalog, MapStream, chain_name, describe, merged_ids
from ..errors import ImagechainError, IntegrityError, LockedError
from ..format.reader import PointFiles
from ..identity import local_host
from ..lock import ChainLock
from ..repository import Repository
from ..stores import AtomicWriter
from .backup import recover_leftovers
from .consolidate import chain_of, retire_replaced
from .pipeline import default_threads
from .progress import Silent
from .verify import verify_point

COPY_CHUNK = 8 << 20


@dataclass
class ReplicateResult:
    copied: list[str] = field(default_factory=list)  # point ids
    skipped: int = 0
    bytes_copied: int = 0
    retired_files: list[str] = field(default_factory=list)  # in the destination: what the source merged away
    duration_s: float = 0.0
    notices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def replicate(src: Repository, dst: Repository, *, chains: tuple[str, ...] = (), src_cat: Catalog | None = None,
              check_source: bool = True) -> ReplicateResult:  # fmt: skip
    """Copy every point of `src` (of the named chains only, if any) that `dst` lacks."""
    t0 = time.monotonic()
    res = ReplicateResult()
    scat = src_cat or src.catalog()
    dcat = dst.catalog()
    have = set(dcat.points) | set(dcat.stand_ins)
    todo = [p for p in scat.points.values() if not chains or chain_name(p) in chains]
    todo.sort(key=lambda p: (p.header.chain_id.hex, p.header.sequence, p.header.created_us))
    me = local_host()
    for p in todo:
        if p.point_id in have:
            res.skipped += 1
            continue
        h = p.header
        host_id, source_id, chain = chain_of(p)  # the lock consolidation and backups take there
        lock = ChainLock(dst.store, dst.lock_name(host_id, source_id, chain), me,
                         f"chain {chain!r} of {h.metadata.get('source')} (replication)", dst.display)  # fmt: skip
        with lock:
            res.notices += lock.notices
            folder = p.name.rpartition("/")[0]
            if recover_leftovers(dst.store, dcat, folder, res.notices.append):
                dcat = dst.catalog()
            if p.point_id in dcat.points:
                res.skipped += 1
                continue
            if check_source:  # this point alone: its ancestors were checked when they were copied
                bad = verify_point(src, p, default_threads(), Silent()).problems
                if not bad and merged_ids(p) and not (h.encrypted and p.keys is None):
                    bad = _map_problem(src, scat, p)  # the destination retires what it replaced on its word
                if bad:
                    raise IntegrityError(f"{describe(p)} does not verify in the source ({bad[0]}); not copied")
            res.bytes_copied += _copy_point(src, dst, p, lock)
        res.copied.append(str(p.point_id))
    # merged points copied here were verified in the source and read back: the points they replaced go now;
    # a merged point that arrived otherwise (an earlier run stopped in between) is verified here first
    proven = {uuid.UUID(x) for x in res.copied} if check_source else set()
    dcat = dst.catalog()
    replaced = [*dcat.superseded.values(), *(dcat.stand_ins[pid] for pid in dcat.remnants)]
    for key in sorted({chain_of(o) for o in replaced if not chains or chain_name(o) in chains}):
        host_id, source_id, chain = key
        lock = ChainLock(dst.store, dst.lock_name(host_id, source_id, chain), me,
                         f"chain {chain!r} (replication)", dst.display)  # fmt: skip
        try:
            with lock:
                res.notices += lock.notices
                res.retired_files += retire_replaced(dst, dst.catalog(), key, res.notices, proven=proven)[0]
        except LockedError as e:  # the copies are done; what to retire waits for the next run
            res.notices.append(f"nothing retired in chain {chain!r} this time: {e}")
    res.duration_s = time.monotonic() - t0
    return res


def _map_problem(repo: Repository, cat: Catalog, p: PointFiles) -> list[str]:
    """A merged point's map must add up to the state it stands for, through its lineage (its consolidation
    checks that after publishing it, and may have been stopped before)."""
    try:
        with MapStream(repo.store, cat.lineage(p)) as ms:
            ms.prove()
    except ImagechainError as e:
        return [str(e)]
    return []


def _copy_point(src: Repository, dst: Repository, p: PointFiles, lock: ChainLock) -> int:
    writers: list[AtomicWriter] = []
    total = 0
    try:
        for seg in p.segments:
            w = dst.store.create(seg.name)
            writers.append(w)
            want = blake3.blake3()
            reader = src.store.open(seg.name)
            try:
                off = 0
                while off < seg.size:
                    data = reader.pread(off, min(COPY_CHUNK, seg.size - off))
                    if not data:
                        raise IntegrityError(f"{seg.name}: the source file ended at {off} of {seg.size} bytes")
                    want.update(data)
                    view = memoryview(data)
                    while len(view):
                        n = w.write(view)
                        if n == 0:
                            raise ImagechainError(f"{seg.name}: the destination refuses to grow the file")
                        view = view[n:]
                    off += len(data)
            finally:
                reader.close()
            w.flush()
            _check_copy(dst, w, seg.name, seg.size, want.digest())
            total += seg.size
        lock.check()
        with interrupts.deferred():  # all of the point's files, or none of them
            for w in writers:  # in order: the last segment, which holds the footer, last
                w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return total


def _check_copy(dst: Repository, w: AtomicWriter, name: str, size: int, digest: bytes) -> None:
    """Read the temporary copy back and compare: what the destination holds is what the source had."""
    got = blake3.blake3()
    off = 0
    while off < size:
        data = w.read_back(off, min(COPY_CHUNK, size - off))
        if data is None:
            return  # the store cannot read back before commit; it vouches for the upload itself
        if not data:
            break
        got.update(data)
        off += len(data)
    if off != size or got.digest() != digest:
        raise IntegrityError(f"{name}: the copy in {dst.display} does not read back as written; not published")
