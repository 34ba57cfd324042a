"""Consolidation: merge a run of points of a lineage into one point, copying stored payloads as they are.

The merged point M stands for the run's last point B: B's state digest and sequence number, the run's
first point's parent (none when the run starts at the full point: M is then a synthetic full). Its
metadata `merged` lists the ids it replaced, so children made from B link to M (docs/FORMAT.md, 1.4).

Crash-safe in this order: M is written under temporary names and published (ImageWriter), proven
(its map adds up to B's state digest through its new lineage, and every payload it holds decodes to
its digest), and only then are the run's files deleted. Stopped before that, the catalog takes the
replaced points out of the tree (M stands in for them) and the next consolidation deletes them."""

from __future__ import annotations

import base64
import calendar
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import interrupts
from ..address import select
from ..blockmap import BlockMap, block_count
from ..chain import RETIRED, Catalog, MapStream, describe, merged_ids
from ..errors import ImagechainError, PointNotFoundError, UsageError
from ..format import spec
from ..format.reader import PointFiles
from ..format.writer import ImageWriter
from ..identity import local_host
from ..keyring import KEY_TABLE, Keyring, keys_for_new_point
from ..lock import ChainLock
from ..repository import Repository
from .backup import _merge_runs, recover_leftovers
from .restore import PayloadSource
from .verify import verify

COPY_BLOCKS = 128  # payloads copied per read (8 MiB of volume at 64 KiB blocks)
RETIRED_GRACE_S = 3600  # how long replaced files stay readable for readers that listed them before
STAMP = "%Y%m%dT%H%M%SZ"  # retired/<time>/: UTC, when the files were moved there


@dataclass
class ConsolidateResult:
    point_id: str  # the merged point
    replaced: list[str]
    files: list[str]
    retired_files: list[str]
    kind: str
    stored_bytes: int
    copied_payloads: int
    duration_s: float
    notices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def consolidate(repo: Repository, point: PointFiles, *, cat: Catalog | None = None,
                from_address: str | None = None, keyring: Keyring | None = None) -> ConsolidateResult:  # fmt: skip
    """Merge the lineage of `point` from its full point (or from `from_address`) down to `point`. An
    encrypted chain needs its passphrase or identity: the merged point carries every data key its
    payloads were sealed with, in a key table only those open."""
    t0 = time.monotonic()
    cat = cat or repo.catalog()
    run, first = _run_of(repo, cat, point, from_address)
    ring = keyring or Keyring()
    h = point.header
    chain = chain_of(point)[2]
    me = local_host()
    lock = ChainLock(repo.store, repo.lock_name(h.host_id, h.source_id, chain), me,
                     f"chain {chain!r} of {h.metadata.get('source')} (consolidation)", repo.display)  # fmt: skip
    notices: list[str] = []
    with lock:
        notices += lock.notices
        if recover_leftovers(repo.store, cat, point.name.rpartition("/")[0], notices.append):
            cat = repo.catalog()  # a killed consolidation's merged point may have been published just now
            lin = cat.lineage(cat.resolve(point.point_id) or point)
            run = lin[first:] if first < len(lin) else lin[-1:]
        retired, withdrawn = retire_replaced(repo, cat, chain_of(point), notices, keyring=ring)
        if withdrawn:  # a stopped consolidation's merged point that does not verify: the old points stand again
            cat = repo.catalog()
            point = _stood_for(cat, point)
            h = point.header
            run, first = _run_of(repo, cat, point, from_address)
        if len(run) < 2:
            if retired:  # a re-run that only finished an interrupted consolidation
                return ConsolidateResult(str(point.point_id), [], [s.name for s in point.segments], retired,
                                         "full" if h.parent_id is None else "incremental", 0, 0,
                                         time.monotonic() - t0, notices)  # fmt: skip
            raise UsageError(f"{describe(point)}: nothing to merge (the run from {describe(run[0])} is one point)")
        if h.encrypted:
            ring.unlock_all(run, need_data=True)
        merged, stored, copied = _write_merged(repo, run, lock, ring)
        fresh = repo.catalog()
        m = fresh.points.get(merged.point_id)
        if m is None:
            raise ImagechainError(f"the merged point {str(merged.point_id)[:8]} is not readable after publishing")
        why = _withdrawn_unless_sound(repo, m, fresh, ring)
        if why:
            raise ImagechainError(f"the merged point {describe(m)} does not verify ({why}); it was withdrawn to "
                                  f"{RETIRED}/, and the points it was made from stand as before")  # fmt: skip
        retired += retire_replaced(repo, repo.catalog(), chain_of(point), notices, proven={m.point_id},
                                   keyring=ring)[0]  # fmt: skip
    return ConsolidateResult(str(merged.point_id), [str(p.point_id) for p in run], [s.name for s in m.segments],
                             retired, "full" if run[0].header.parent_id is None else "incremental", stored,
                             copied, time.monotonic() - t0, notices)  # fmt: skip


def _run_of(repo: Repository, cat: Catalog, point: PointFiles,
            from_address: str | None) -> tuple[list[PointFiles], int]:  # fmt: skip
    """The points to merge (the lineage of `point` from its full point or from `from_address`), and where
    the run starts in that lineage."""
    lin = cat.lineage(point)
    first = 0
    if from_address:
        start = select(cat, from_address, repo.display)
        ids = [p.point_id for p in lin]
        if start.point_id not in ids:
            raise UsageError(f"--from {describe(start)} is not in the lineage of {describe(point)}")
        first = ids.index(start.point_id)
    return lin[first:], first


def _stood_for(cat: Catalog, p: PointFiles) -> PointFiles:
    """`p`, or, once p was a merged point and has been withdrawn, the point it stood for (the last of those
    it replaced: the same sequence number)."""
    if p.point_id in cat.points:
        return p
    for pid in merged_ids(p):
        q = cat.points.get(pid)
        if q is not None and q.header.sequence == p.header.sequence:
            return q
    raise PointNotFoundError(f"{describe(p)} was withdrawn, and the point it stood for is not in the repository")


def chain_of(p: PointFiles) -> tuple[bytes, bytes, str]:
    """What a chain lock covers: host, source and chain name."""
    return p.header.host_id, p.header.source_id, str(p.header.metadata.get("chain", "default"))


def retire_replaced(repo: Repository, cat: Catalog, chain: tuple[bytes, bytes, str], notices: list[str],
                    *, proven: set[uuid.UUID] | frozenset[uuid.UUID] = frozenset(),
                    keyring: Keyring | None = None) -> tuple[list[str], list[PointFiles]]:  # fmt: skip
    """Move the files of this chain's points that a merged point replaced (the catalog put them in
    `superseded`) into retired/<time>/, where readers that listed them before can still open them; delete
    what was retired longer than RETIRED_GRACE_S ago. The caller holds the chain's lock: another chain's
    consolidation may have published its merged point and not yet verified it.

    A merged point not in `proven` (verified by this run) is verified first: its consolidation may have
    been stopped between publishing and verifying it, or it came from elsewhere. One that fails is
    withdrawn instead, so the points it replaced stand again. Returns the files retired and the merged
    points withdrawn."""
    gone: list[str] = []
    withdrawn: list[PointFiles] = []
    now = time.time()
    stamp = time.strftime(STAMP, time.gmtime(now))
    sound: dict[uuid.UUID, bool] = {m: True for m in proven}
    replaced = [(o.point_id, [seg.name for seg in o.segments], describe(o)) for o in cat.superseded.values()]
    replaced += [(pid, files, f"the rest of point {str(pid)[:8]}") for pid, files in cat.remnants.items()]
    for pid, files, what in replaced:
        m = cat.stand_ins[pid]
        if chain_of(m) != chain:
            continue
        if m.point_id not in sound:
            why = _withdrawn_unless_sound(repo, m, cat, keyring)
            sound[m.point_id] = not why
            if why:
                withdrawn.append(m)
                notices.append(f"withdrew {describe(m)} to {RETIRED}/: the merged point does not verify ({why}); "
                               f"the points it was made from stand as before")  # fmt: skip
        if not sound[m.point_id]:
            continue
        with interrupts.deferred():
            for name in files:
                repo.store.rename(name, f"{RETIRED}/{stamp}/{name}")
                gone.append(name)
        notices.append(f"retired {what}: merged into point {str(m.point_id)[:8]}")
    for e in list(repo.store.list(RETIRED + "/")):
        when = e.name.split("/")[1]
        try:
            age = now - calendar.timegm(time.strptime(when, STAMP))
        except ValueError:
            continue  # not ours: left alone
        if age > RETIRED_GRACE_S:
            repo.store.delete(e.name)
    return gone, withdrawn


def _withdrawn_unless_sound(repo: Repository, m: PointFiles, cat: Catalog, keyring: Keyring | None) -> str:
    """Verify merged point m (its lineage's maps and every payload it holds). One that fails is taken out of
    the repository into retired/<time>/ (kept there for a look until the grace period ends), its last
    segment, which holds the footer, first: from then on the point does not exist, and the catalog shows
    the points it replaced again. Returns why it failed, "" when it is sound."""
    report = verify(repo, m, cat=cat, keyring=keyring)
    if report.ok:
        return ""
    stamp = time.strftime(STAMP, time.gmtime())
    with interrupts.deferred():
        for seg in reversed(m.segments):
            repo.store.rename(seg.name, f"{RETIRED}/{stamp}/{seg.name}")
    return "; ".join(([q for p in report.points for q in p.problems] + report.incomplete)[:2])


def _key_table(run: list[PointFiles]) -> tuple[list[tuple[uuid.UUID, bytes]], np.ndarray]:
    """The merged point's inherited data keys, and where each (run point, key field) maps in them: lut[i, k]
    is the new key field of a payload that run[i] holds under key field k."""
    table: dict[uuid.UUID, bytes] = {}
    for p in run:
        assert p.keys is not None
        table.update(p.keys.all_data_keys())
    order = list(table)
    if len(order) >= 0xFFFF:
        raise UsageError(f"a merged point can hold at most {0xFFFF - 1} data keys; merge a shorter run (--from)")
    lut = np.zeros((len(run), 1 + max(len(p.keys.inherited) for p in run if p.keys)), np.uint16)
    for i, p in enumerate(run):
        assert p.keys is not None
        for k, sealer in enumerate([p.point_id, *(pid for pid, _k in p.keys.inherited)]):
            lut[i, k] = 1 + order.index(sealer)
    return [(pid, table[pid]) for pid in order], lut


def _write_merged(repo: Repository, run: list[PointFiles], lock: ChainLock,
                  ring: Keyring) -> tuple[spec.PointHeader, int, int]:  # fmt: skip
    first, last = run[0], run[-1]
    fh, lh = first.header, last.header
    point_id = uuid.uuid4()
    replaced = sorted({p.point_id.hex for p in run} | {i.hex for p in run for i in merged_ids(p)})
    drop = ("parent_file", "merged", "merged_first_sequence", KEY_TABLE)
    meta = {k: v for k, v in lh.metadata.items() if k not in drop}
    if "parent_file" in fh.metadata:
        meta["parent_file"] = fh.metadata["parent_file"]
    meta["merged"] = replaced
    meta["merged_first_sequence"] = fh.metadata.get("merged_first_sequence", fh.sequence)
    meta["consolidated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    header = spec.PointHeader(
        point_id=point_id, chain_id=lh.chain_id, parent_id=fh.parent_id, parent_state=fh.parent_state,
        host_id=lh.host_id, source_id=lh.source_id, sequence=lh.sequence, block_size=lh.block_size,
        volume_size=lh.volume_size, created_us=lh.created_us,
        kind=spec.KIND_FULL if fh.parent_id is None else spec.KIND_INCREMENTAL,
        compression=lh.compression, compression_level=lh.compression_level, split_size=lh.split_size,
        metadata=meta,
    )  # fmt: skip
    keys, lut, remember = None, None, None
    if lh.encrypted:  # payloads stay sealed as they are; the merged point's own data key seals the key table
        sealing = keys_for_new_point(ring, lh.chain_id, point_id, last, None)
        assert sealing is not None
        keys, remember = sealing.keys, sealing.remember
        table, lut = _key_table(run)
        meta.update(sealing.metadata)
        meta[KEY_TABLE] = base64.b64encode(keys.seal_key_table(table)).decode()
        header.encryption, header.digest_algorithm = spec.ENCRYPTION_AES256GCM, spec.DIGEST_BLAKE3_KEYED
        header.key_material = sealing.key_material
    chain_dir = last.name.rpartition("/")[0]
    base = repo.point_base(chain_dir, lh.created_us, lh.sequence, fh.parent_id is None, point_id.hex)
    writer = ImageWriter(repo.store, base, header, lh.split_size, keys=keys)
    stored = copied = 0
    counts = {"data_blocks": 0, "zero_blocks": 0, "unused_blocks": 0}
    try:
        source = PayloadSource(repo, run)  # `src` in a window indexes `run`, as PayloadSource's readers do
        with MapStream(repo.store, run, locations=True) as ms, contextlib.closing(source):
            for bm in ms.overlay_windows():
                assert bm.src is not None and bm.offset is not None and bm.length is not None
                assert bm.codec is not None and bm.member is not None
                defined = np.flatnonzero(bm.kind != 0)
                if not len(defined):
                    continue
                ent = np.zeros(len(defined), spec.INDEX_ENTRY)
                ent["block"] = defined + bm.start
                ent["count"] = 1
                ent["kind"] = bm.kind[defined]
                ent["digest"] = bm.digest[defined]
                data = np.flatnonzero(ent["kind"] == spec.BLOCK_DATA)
                ent["codec"][data] = bm.codec[defined[data]]
                if lut is not None:
                    assert bm.key is not None
                    ent["key"][data] = lut[bm.src[defined[data]], bm.key[defined[data]]]
                ent["member"][data] = bm.member[defined[data]]
                groups: dict[tuple[int, int], int] = {}  # grouped payloads of this window copied: their new offset
                for rows in _slices(bm, defined[data], data):  # memory: a slice of payloads, not a window's
                    ent["offset"][rows], ent["length"][rows], fresh = _copy(bm, defined[rows], source, writer, groups)
                    stored, copied = stored + sum(len(p) for p in fresh), copied + len(fresh)
                for k, name in ((spec.BLOCK_DATA, "data_blocks"), (spec.BLOCK_ZERO, "zero_blocks"),
                                (spec.BLOCK_UNUSED, "unused_blocks")):  # fmt: skip
                    counts[name] += int(np.count_nonzero(ent["kind"] == k))
                writer.add_entries(_merge_runs(ent))
        lock.check()
        summary: dict[str, object] = {"blocks": block_count(lh.volume_size, lh.block_size), "stored_blocks": copied,
                   "stored_bytes": stored, "volume_size": lh.volume_size, "read_bytes": 0,
                   "changed_blocks": sum(counts.values()), "merged_points": len(run), **counts}  # fmt: skip
        writer.finish(last.footer.state_digest, summary)
    except BaseException:
        writer.abort()
        raise
    if remember is not None:
        remember()
    return header, stored, copied


def _slices(bm: BlockMap, rel: np.ndarray, rows: np.ndarray) -> Iterator[np.ndarray]:
    """`rows` in slices of about COPY_BLOCKS payloads; a slice does not end inside a group, which is then
    read once (rel: the rows' positions in the window)."""
    assert bm.src is not None and bm.offset is not None
    src, off = bm.src[rel], bm.offset[rel]
    at = 0
    while at < len(rows):
        end = min(len(rows), at + COPY_BLOCKS)
        while end < len(rows) and src[end] == src[end - 1] and off[end] == off[end - 1]:
            end += 1
        yield rows[at:end]
        at = end


def _copy(bm: BlockMap, rel: np.ndarray, source: PayloadSource, writer: ImageWriter,
          groups: dict[tuple[int, int], int]) -> tuple[np.ndarray, np.ndarray, list[memoryview]]:  # fmt: skip
    """Copy the payloads of the blocks at window positions `rel` as they are; a group shared by several
    blocks is copied once. Returns the blocks' new offsets and lengths, and the payloads copied."""
    assert bm.src is not None and bm.offset is not None and bm.codec is not None
    payloads = source.fetch(bm, rel + bm.start)
    offsets = np.zeros(len(rel), np.uint64)
    lengths = np.asarray([len(p) for p in payloads], np.uint32)
    fresh: list[memoryview] = []
    slot = np.full(len(rel), -1, np.int64)  # row -> position in `fresh`, or -1 when copied by an earlier slice
    seen: dict[tuple[int, int], int] = {}
    for k, i in enumerate(rel.tolist()):
        if bm.codec[i] == spec.PAYLOAD_ZSTD_GROUP:
            where = (int(bm.src[i]), int(bm.offset[i]))
            if where in groups:
                offsets[k] = groups[where]
                continue
            if where in seen:
                slot[k] = seen[where]
                continue
            seen[where] = len(fresh)
        slot[k] = len(fresh)
        fresh.append(payloads[k])
    at = writer.append_payloads(fresh)
    for where, j in seen.items():
        groups[where] = at[j]
    put = slot >= 0
    offsets[put] = np.asarray(at, np.uint64)[slot[put]]
    return offsets, lengths, fresh
