"""CBC backup: read the volume once, digest every block, store only blocks whose digest differs
from the parent point's block map."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__, interrupts
from ..address import select
from ..blockmap import block_count
from ..chain import FOLLOWS, Catalog, MapStream, describe, newest_generation
from ..codec import CodecParams, encode, encode_group
from ..crypto import Passphrase, PointKeys
from ..damage import DamageRecord
from ..errors import AmbiguousPointError, ChainBrokenError, ImagechainError, SourceError, UsageError
from ..format import spec
from ..format.reader import PointFiles, PointReader, SegmentFile, assemble, scan_file
from ..format.writer import WRITE_QUEUE, ImageWriter
from ..identity import HostIdentity, local_host
from ..keyring import Keyring, keys_for_new_point
from ..limits import Limits, RateLimiter, pieces
from ..lock import ChainLock
from ..mapcache import MapFile, MapWriter, cache_path, commit_tip, default_cache_dir, open_cached
from ..payload import block_digest
from ..repository import Repository
from ..snapshots import Capture, Plan, SnapshotOptions, plan_snapshot
from ..sources import Source, check_name, open_source, path_text, same_source
from ..state import StateHasher
from ..stores import Store, StoreEntry, is_remote, local_path, temporary_of
from ..usage import Usage, volume_usage
from .pipeline import default_threads, ordered_map, prefetch
from .progress import Progress, Silent

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

DEFAULT_BLOCK_SIZE = 64 << 10
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 4 << 10, 16 << 20
CHUNK_BYTES = 8 << 20
# consecutive changed blocks of a chunk are stored as one group (zstd only, docs/FORMAT.md section 4): on the
# benchmark volume, 64 KiB blocks one by one store 6% more than partclone+zstd, 2 MiB groups 0.2% more and
# 8 MiB groups 0.3% less (docs/ARCHITECTURE.md); a view's random read decodes up to this much
GROUP_BYTES = CHUNK_BYTES
HOLE_SPAN = 128  # chunks a hole of an image-file source may cover in one pipeline item (1 GiB)
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
    if size >= 1 << 64:  # the point header's u64 (FORMAT.md section 3); no file comes near it
        raise UsageError(f"split size must be below 2^64 bytes (or 0 for none), not {size}")
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
    unused_blocks: int = 0
    used_map: str = ""  # how the blocks to read were chosen (metadata used_map)
    parent_id: str | None = None
    lineage_check_s: float = 0.0  # proving the stored indexes of the lineage built on
    repository_read_bytes: int = 0  # read from the repository (headers, footers, indexes; never payloads)
    notices: list[str] = field(default_factory=list)
    snapshot: dict[str, object] = field(default_factory=dict)  # how the source was read (summary "snapshot")
    snapshot_text: str = ""

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
    unused_blocks: int = 0
    state: bytes = b""

    def summary(self, duration_s: float, warnings: list[str]) -> dict[str, object]:
        out: dict[str, object] = {k: v for k, v in asdict(self).items() if k != "state"}
        return {**out, "duration_s": round(duration_s, 3), **({"warnings": warnings} if warnings else {}),
                "finished": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip


@dataclass
class _Item:
    """A run of blocks for the pipeline, planned but not yet read; the parent's map of the run."""

    start: int
    blocks: int
    hole: bool  # nothing to read: a hole of an image file, or blocks no filesystem uses
    used: np.ndarray | None  # bool per block of the run: the filesystem uses it (None: all are read)
    pkind: np.ndarray | None
    pdigest: np.ndarray | None
    force: np.ndarray  # blocks (relative) to store anew whatever the comparison says: healing


@dataclass
class _Chunk:
    start: int
    kinds: np.ndarray
    digests: np.ndarray
    changed: np.ndarray  # indices (within the chunk) of blocks that differ from the parent
    # for changed DATA blocks, in order: (codec, payload, blocks it holds: more than 1 for a group); never
    # views of the read buffer
    payloads: list[tuple[int, bytes, int]]
    raw_changed: int
    read: int  # bytes read from the source


def backup(
    source_path: str,
    repo_path: str,
    *,
    chain: str = "default",
    full: bool = False,
    parent: str | None = None,
    block_size: int | None = None,
    codec: CodecParams | None = None,
    split_size: int | None = None,
    host: HostIdentity | None = None,
    source_name: str | None = None,
    source_moved: bool = False,
    allow_mounted: bool = False,
    all_blocks: bool = False,
    init: bool = False,
    cache_dir: str | None = "",
    threads: int | None = None,
    limits: Limits | None = None,
    encrypt: Passphrase | X25519PublicKey | None = None,
    keyring: Keyring | None = None,
    snapshot: SnapshotOptions | None = None,
    progress: Progress | None = None,
) -> BackupResult:
    """Make the next point of `chain` for the source: incremental when the chain exists, else full.

    `parent` (an address within the repository: a point id prefix or CHAIN@SEL) picks the point to
    continue when the chain has forked. `all_blocks` reads every block even where the filesystem's
    used-block map would skip the unused ones. `limits` says what the backup may take from the machine
    (priorities, rates, threads, buffer memory); `threads` is a shortcut for its thread count. `encrypt`
    starts an encrypted chain (a passphrase, or a recipient's public key); `keyring` opens an encrypted
    chain's parent (its passphrase, identity, or the local key store of a recipient-mode writer).
    `snapshot` says how a live source is read (provider, freeze limit, hooks, database recipe); by
    default the best snapshot that applies, and a source mounted read-write with none is refused unless
    `allow_mounted`."""
    limits = limits or Limits()
    limits.check()
    threads = threads or limits.threads or default_threads()
    if block_size is not None:
        check_block_size(block_size)
    if split_size is not None:
        check_split_size(split_size)
    check_name("chain", chain)
    if source_name is not None:
        check_name("source", source_name)
    if host is not None:
        check_name("host", host.name)
    if full and parent:
        raise UsageError("--full starts a new chain; it takes no --parent")
    host = host or local_host()
    progress = progress or Silent()
    cache = default_cache_dir() if cache_dir == "" else cache_dir
    snap = snapshot or SnapshotOptions()
    snap.check()
    with open_source(source_path, source_name) as src:
        writes = () if is_remote(repo_path) else (local_path(repo_path),)  # a remote store is no local filesystem
        plan = plan_snapshot(src.path, src.is_device, snap, allow_mounted, writes=writes, cache=cache)
        if plan.mounted:
            progress.notice(f"{plan.mounted}: the point may not be consistent (--allow-mounted)")
        if plan.keep_cache_off:
            progress.notice(f"the block-map cache {cache} is on a filesystem that is frozen while the source is "
                            f"read: not used this time")  # fmt: skip
            cache = None
        repo = Repository.open(repo_path, create=init)
        what = f"chain {chain!r} of {src.name} on {host.name}"
        lock = ChainLock(repo.store, repo.lock_name(host.host_id, src.source_id, chain), host, what, repo_path,
                         src.lock_record())  # fmt: skip
        with lock:
            job = _Job(src, repo, host, chain, full, parent, block_size, codec, split_size, cache,
                       threads, progress, lock, source_moved, all_blocks, limits, encrypt,
                       keyring or Keyring(), plan, snap)  # fmt: skip
            for n in lock.notices:
                job.note(n)
            return job.run()


@dataclass
class _Job:
    src: Source
    repo: Repository
    host: HostIdentity
    chain: str
    full: bool
    parent_address: str | None
    block_size: int | None
    codec: CodecParams | None
    split_size: int | None
    cache: str | None
    threads: int
    progress: Progress
    lock: ChainLock
    source_moved: bool = False
    all_blocks: bool = False
    limits: Limits = field(default_factory=Limits)
    encrypt: Passphrase | X25519PublicKey | None = None
    ring: Keyring = field(default_factory=Keyring)
    plan: Plan = field(default_factory=lambda: Plan("none", "not mounted read-write"))
    snap: SnapshotOptions = field(default_factory=SnapshotOptions)
    notices: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        self.notices.append(message)
        self.progress.notice(message)

    def run(self) -> BackupResult:
        t0 = time.monotonic()
        src, repo, host = self.src, self.repo, self.host
        chain_dir = repo.chain_dir(host.name, host.host_id, src.name, src.source_id, self.chain)
        cat = repo.catalog()
        self.lock.check()  # recovery publishes points too: only while the lock is ours
        if recover_leftovers(repo.store, cat, chain_dir, self.note):
            cat = repo.catalog()
        for files, why in [*cat.problems, *cat.damaged.values()]:
            # not ours to delete: a damaged point may still be wanted for inspection or recovery
            if any(f.startswith(chain_dir + "/") for f in files):
                self.note(f"ignored (not a usable point): {why}")
        gen = cat.find_generation(host.host_id, src.source_id, self.chain)
        parent = None if self.full else self._parent(cat, gen)
        if parent is None and not gen and not self.full:
            self._note_elsewhere(cat)
        lin: list[PointFiles] = []
        tc = time.monotonic()
        if parent is not None:
            try:
                lin = cat.lineage(parent)
            except ChainBrokenError as e:
                raise ChainBrokenError(f"{e}; use --full to start a new chain") from e
            self.ring.unlock_all(lin, need_data=False)  # an encrypted chain's block maps need its digest key
            prove_stored(repo.store, lin)
        check_s = time.monotonic() - tc
        with contextlib.ExitStack() as stack:
            pmap = self._parent_map(stack, lin) if parent is not None else None
            res = self._write(cat, gen, lin, pmap, chain_dir, t0)
        res.lineage_check_s = check_s
        res.repository_read_bytes = repo.store.bytes_read
        return res

    def _parent(self, cat: Catalog, gen: list[PointFiles]) -> PointFiles | None:
        if self.parent_address:
            p = select(cat, self.parent_address, self.repo.display)
            h = p.header
            if h.source_id != self.src.source_id:
                raise UsageError(f"--parent {describe(p)} is a point of source {h.metadata.get('source')!r}, "
                                 f"not of {self.src.name!r}")  # fmt: skip
            if str(h.metadata.get("chain")) != self.chain:
                raise UsageError(f"--parent {describe(p)} belongs to chain {h.metadata.get('chain')!r}, "
                                 f"not {self.chain!r}")  # fmt: skip
            return p
        tips = cat.tips(gen)
        if len(tips) > 1:
            listed = "; ".join(f"{str(t.point_id)[:8]} (#{t.header.sequence}, {t.name}"
                               f"{', its lineage is broken' if cat.ancestry(t)[0].header.parent_id else ''})"
                               for t in tips)  # fmt: skip
            raise AmbiguousPointError(
                f"chain {self.chain!r} has {len(tips)} branches whose tips are {listed}; "
                f"choose the one to continue with --parent POINT (or start anew with --full)"
            )
        return tips[0] if tips else None

    def _note_elsewhere(self, cat: Catalog) -> None:
        """A first backup here of a chain that another host has made of this very source (a reinstalled
        PC, a disk moved to a new machine): never a silent new full; say how to continue that chain."""
        for (host_id, source_id, name), gens in cat.named_chains().items():
            if source_id != self.src.source_id or name != self.chain or host_id == self.host.host_id:
                continue
            tip = max(newest_generation(gens), key=lambda p: p.header.created_us)
            self.note(f"chain {self.chain!r} of this source exists under host {tip.header.metadata.get('host')!r} "
                      f"({host_id.hex()[:8]}), newest point {str(tip.point_id)[:8]}; this backup starts a new chain "
                      f"for {self.host.name!r}; to continue that chain instead, back up with --parent "
                      f"{str(tip.point_id)[:8]}")  # fmt: skip

    def _parent_map(self, stack: contextlib.ExitStack, lin: list[PointFiles]) -> MapFile:
        """The parent's map as a proven local file: from the cache, else rebuilt from the indexes."""
        parent = lin[-1]
        state = parent.footer.state_digest
        mf = open_cached(self.cache, parent.point_id, state)
        if mf is None:
            folder = self.cache if self.cache is not None else stack.enter_context(tempfile.TemporaryDirectory())
            w = MapWriter(folder, parent.header.volume_size, parent.header.block_size)
            if not w.active:  # no room for the cache: a private temporary folder does
                folder = stack.enter_context(tempfile.TemporaryDirectory())
                w = MapWriter(folder, parent.header.volume_size, parent.header.block_size)
            try:
                with MapStream(self.repo.store, lin) as ms:
                    for bm in ms.windows():  # proven against the state digest at the end
                        w.write(bm.start, bm.kind, bm.digest)
            except BaseException:
                w.abort()
                raise
            path = cache_path(folder, parent.point_id, state)
            if not w.commit(path):
                raise OSError(f"cannot write a block map in {folder}")
            mf = MapFile(path)
        stack.callback(mf.close)
        return mf

    def _write(self, cat: Catalog, gen: list[PointFiles], lin: list[PointFiles], pmap: MapFile | None,
               chain_dir: str, t0: float) -> BackupResult:  # fmt: skip
        src, repo, host = self.src, self.repo, self.host
        parent = lin[-1] if lin else None
        fs = repo.store.filesystem()
        if parent is not None:
            ph, first = parent.header, lin[0].header
            if self.block_size is not None and self.block_size != ph.block_size:
                raise UsageError(f"chain {self.chain!r} uses block size {ph.block_size}; use --full to change it")
            bs = ph.block_size
            codec = self.codec or CodecParams(first.compression, first.compression_level)  # the chain's setting
            split = ph.split_size if self.split_size is None else self.split_size
            chain_id, sequence = ph.chain_id, ph.sequence + 1
            if ph.metadata.get("source_identity") != src.identity:
                self.note(f"source identity changed from {ph.metadata.get('source_identity')} to {src.identity}")
            recorded = str(ph.metadata.get("device_identity", ""))
            if same_source(recorded, src.device_identity) is False and not self.source_moved:
                raise SourceError(
                    f"{src.path} holds the volume of chain {self.chain!r} ({src.identity}) but is another "
                    f"device or file ({src.device_identity}; the chain's is {recorded}): a clone? Back it up as "
                    f"a source of its own with --source-name NAME, or, if it is the same volume moved or "
                    f"copied into place, continue its chain with --source-moved"
                )
        else:
            bs = self.block_size or DEFAULT_BLOCK_SIZE
            codec = self.codec or DEFAULT_CODEC
            split = self.split_size or 0
            chain_id, sequence = uuid.uuid4(), 0
        if fs == "vfat" and (split == 0 or split > FAT_SPLIT):
            split = FAT_SPLIT
        point_id = uuid.uuid4()
        sealing = keys_for_new_point(self.ring, chain_id, point_id, parent, self.encrypt)
        keys = sealing.keys if sealing else None
        record = DamageRecord.of(repo.store, lin[0]) if lin else None
        heal, heal_from = record.to_restore(lin) if record else (np.zeros(0, np.int64), [])
        heal = heal[heal < block_count(src.size, bs)]
        lim = self.limits
        read_rate, write_rate = RateLimiter(lim.max_read_rate), RateLimiter(lim.max_write_rate)
        writer: ImageWriter | None = None
        cachew: MapWriter | None = None

        def abort() -> None:
            read_rate.stop()
            write_rate.stop()
            if writer is not None:
                writer.abort()
            if cachew is not None:
                cachew.abort()

        try:
            # the snapshot is taken as late as possible (the parent's map is loaded) and let go as soon as
            # the volume is read: a freeze blocks the host's writers all along
            with Capture(self.plan, self.snap, src.path, self.chain, self.note) as shot, src.view(shot.fd):
                if shot.fd is None and self.plan.provider == "fsfreeze" and src.is_device:
                    src.drop_cache(0, src.size)  # the device's own cache may hold what the filesystem rewrote since
                # the holes of an image file before anything is read (the used-block map's reads too)
                data = src.data_chunks(_chunk_blocks(bs) * bs)
                usage = self._usage(bs)
                created = time.time_ns() // 1000
                header = spec.PointHeader(
                    point_id=point_id, chain_id=chain_id, parent_id=parent.point_id if parent else None,
                    parent_state=parent.footer.state_digest if parent else bytes(32),
                    host_id=host.host_id, source_id=src.source_id, sequence=sequence, block_size=bs,
                    volume_size=src.size, created_us=created,
                    kind=spec.KIND_INCREMENTAL if parent else spec.KIND_FULL,
                    compression=codec.compression, compression_level=codec.level, split_size=split,
                    metadata={
                        "host": host.name, "source": src.name, "source_path": path_text(os.path.abspath(src.path)),
                        "source_identity": src.identity, "device_identity": src.device_identity,
                        "chain": self.chain, "tool": f"imagechain {__version__}",
                        **({"parent_file": parent.name.rpartition("/")[2]} if parent else {}),
                        **({FOLLOWS: gen[0].header.chain_id.hex} if parent is None and gen else {}),
                        **({"mounted_while_read": self.plan.mounted} if self.plan.mounted else {}),
                        "snapshot": self.plan.provider,
                        "used_map": usage.method, **({"layout": usage.layout} if usage.layout else {}),
                        **(sealing.metadata if sealing else {}),
                    },
                )  # fmt: skip
                if sealing is not None:
                    header.encryption, header.digest_algorithm = spec.ENCRYPTION_AES256GCM, spec.DIGEST_BLAKE3_KEYED
                    header.key_material = sealing.key_material
                base = repo.point_base(chain_dir, created, sequence, parent is None, point_id.hex)
                total = lim.buffer_memory // (2 * CHUNK_BYTES) if lim.buffer_memory else 0  # chunks: data + payloads
                queued = max(1, min(WRITE_QUEUE, total // 4)) if total else WRITE_QUEUE
                writer = ImageWriter(repo.store, base, header, split, write_rate if lim.max_write_rate else None,
                                     lim.apply, queued, keys)  # fmt: skip
                cachew = MapWriter(self.cache, src.size, bs)
                pipe = _Pipe(self.threads, max(1, total - queued) if total else 0, lim.apply,
                             read_rate if lim.max_read_rate else None, keys, shot.check)  # fmt: skip
                stats = _run(src, bs, codec, pmap, writer, cachew, pipe, self.progress, heal, usage.used, data)
                warnings = src.check_unchanged()  # a size change is an error: nothing is published
                snapshot = shot.finish()  # the moment held all along the read (else: an error)
            for w in warnings:
                self.note(w)
            self.lock.check()  # the lock is still ours: nobody else wrote this chain meanwhile
            if sealing is not None:  # before publishing: a point this machine could not continue is no use
                sealing.remember()
            summary = stats.summary(time.monotonic() - t0, [*warnings, *snapshot.get("warnings", [])])
            files = writer.finish(stats.state, {**summary, "snapshot": snapshot})
        except BaseException:
            abort()
            raise
        if record is not None and len(heal):
            record.add("healed", point_id, heal.tolist())
            record.save(repo.store)
            self.note(f"stored {len(heal)} block(s) anew that verify found damaged in point(s) "
                      f"{', '.join(heal_from)}: the chain restores again from this point on")  # fmt: skip
        for name, size in writer.size_limits:
            self.note(f"the filesystem refused to grow {name} past {size} bytes (file too large); "
                      f"the point continues in a new segment")  # fmt: skip
        commit_tip(cachew, self.cache, point_id, stats.state,
                   (parent.point_id, parent.footer.state_digest) if parent else None)  # fmt: skip
        return BackupResult(
            point_id=str(point_id), chain_id=str(chain_id), chain=self.chain, host=host.name, source=src.name,
            kind="incremental" if parent else "full", sequence=sequence, files=files, volume_size=src.size,
            block_size=bs, read_bytes=stats.read_bytes, changed_blocks=stats.changed_blocks,
            changed_bytes=stats.changed_bytes, stored_bytes=stats.stored_bytes,
            file_bytes=sum(repo.store.size(f) for f in files), duration_s=time.monotonic() - t0,
            state_digest=stats.state.hex(), unused_blocks=stats.unused_blocks, used_map=usage.method,
            parent_id=str(parent.point_id) if parent else None, notices=self.notices, snapshot=snapshot,
            snapshot_text=shot.summary(),
        )  # fmt: skip


    def _usage(self, bs: int) -> Usage:
        """Which blocks to read: the used-block map of the source's filesystem(s), from the source itself."""
        src = self.src
        usage = volume_usage(src.read, src.size, bs, self.all_blocks)
        for n in usage.notices:
            self.note(n)
        return usage


def prove_stored(store: Store, lin: list[PointFiles]) -> None:
    """Before building on a lineage, prove what its restores will read besides payloads: every index
    against its footer (headers and footers were proven when the repository was scanned)."""
    for p in lin:
        with PointReader(store, p) as r:
            try:
                r.check_index()
            except ImagechainError as e:
                raise type(e)(f"{e}; the chain cannot be continued from {describe(lin[-1])}: "
                              f"use --full to start a new chain") from e


def recover_leftovers(store: Store, cat: Catalog, folder: str, note: Callable[[str], None]) -> bool:
    """What a dead writer left in a chain folder (the caller holds the chain's lock): temporaries, and
    segments renamed before their point's footer segment was. A set that makes a whole point (its
    footer checks out) lacked only renames, so it is published; a point with no footer anywhere is
    provably incomplete and its files are removed; anything else is reported and kept."""
    def mine(name: str) -> bool:
        return name.startswith(folder + "/")

    def published(pid: uuid.UUID) -> list[SegmentFile]:
        found = (scan_file(store, StoreEntry(n, store.size(n))) for n, p in cat.by_file.items() if p == pid)
        return [f for f in found if f is not None]

    groups: dict[uuid.UUID, tuple[list[SegmentFile], list[SegmentFile]]] = {}  # point: (published, temps)
    for pid, names in cat.incomplete.items():
        if all(map(mine, names)):
            files = published(pid)
            if _cut_off(files):
                groups[pid] = (files, [])
    strays: list[str] = []  # temporaries that name no point
    for name in filter(mine, cat.leftovers):
        sf = scan_file(store, StoreEntry(name, store.size(name)))
        if sf is None or sf.seg.number < 0:
            strays.append(name)
        else:
            pid = sf.seg.point_id
            if pid not in groups:
                groups[pid] = (published(pid), [])
            groups[pid][1].append(sf)
    changed = False
    with interrupts.deferred():  # a stop signal waits until this point's files are put right
        for pid, (done, temps) in groups.items():
            files = done + temps
            whole = assemble(pid, files).point
            if whole is not None:
                for f in whole.segments:
                    final = temporary_of(f.name)
                    if final is not None:
                        store.rename(f.name, final)
                for f in temps:
                    if f not in whole.segments:
                        store.delete(f.name)
                first = temporary_of(whole.segments[0].name) or whole.segments[0].name
                note(f"published point {str(pid)[:8]} ({first}): a backup had written it whole and was stopped "
                     f"before its last rename")  # fmt: skip
            elif not any(f.footer is not None or "footer" in f.problem for f in files):
                for f in files:
                    store.delete(f.name)
                note(f"removed {', '.join(f.name for f in files)}: point {str(pid)[:8]} of an interrupted backup, "
                     f"never finished (no footer)")  # fmt: skip
            else:
                note(f"kept {', '.join(f.name for f in files)}: it has a footer but is not a whole point; check "
                     f"it with imagechain verify")  # fmt: skip
                continue
            changed = True
        for name in strays:
            store.delete(name)
            note(f"removed {name}, left by an interrupted backup")
            changed = True
        aborted = store.abort_uploads(folder + "/")
        if aborted:
            note(f"aborted {aborted} unfinished upload(s) of an interrupted writer in {folder}")
    return changed


def _cut_off(files: list[SegmentFile]) -> bool:
    """Published segments of a point whose footer segment never was: segment 0 among them and every one
    exactly the split size, i.e. all of them middle segments, as a writer killed between its renames
    leaves them once its temporary is lost. A finished point whose footer was damaged or cut (its last
    segment is shorter, or the only one) does not look like this, and is kept for a person to inspect."""
    first = next((f for f in files if f.header is not None and f.seg.number == 0), None)
    if first is None or first.header is None or not first.header.split_size:
        return False
    return all(f.size == first.header.split_size for f in files)


def _chunk_blocks(bs: int) -> int:
    return max(1, CHUNK_BYTES // bs)


def _items(src: Source, bs: int, pmap: MapFile | None, forced: np.ndarray, used: np.ndarray | None,
           data: bytearray | None) -> Iterator[_Item]:  # fmt: skip
    """The volume in chunks, in order, planned without reading: a run of chunks with nothing to read (holes
    of image files as `data` says, blocks no filesystem uses) is one item."""
    size = src.size
    n_total = block_count(size, bs)
    per_chunk = _chunk_blocks(bs)

    def empty(s: int, n: int) -> bool:  # s starts a chunk, n is at most one
        return (used is not None and not used[s : s + n].any()) or (data is not None and not data[s // per_chunk])

    start = 0
    while start < n_total:
        n = min(per_chunk, n_total - start)
        hole = empty(start, n)
        if hole:
            while start + n < n_total and n < per_chunk * HOLE_SPAN:
                more = min(per_chunk, n_total - start - n)
                if not empty(start + n, more):
                    break
                n += more
        pk = pd = None
        if pmap is not None and start < pmap.n:
            w = pmap.window(start, start + n)
            pk, pd = w.kind, w.digest
        force = forced[(forced >= start) & (forced < start + n)] - start
        yield _Item(start, n, hole, None if used is None else used[start : start + n], pk, pd, force)
        start += n


@dataclass
class _Pipe:
    """How the pipeline runs: workers, chunks in flight, what each thread does first, the read rate."""

    threads: int
    depth: int  # chunks in memory at most; 0: two per worker and six more (read ahead, waiting)
    init: Callable[[], None] | None = None
    read_rate: RateLimiter | None = None
    keys: PointKeys | None = None  # an encrypted point's: keyed digests, sealed payloads
    guard: Callable[[], None] | None = None  # raises once the snapshot being read no longer holds


class _Closed(Exception):
    """The backup ended while the reader waited for a buffer."""


class _Buffers:
    """Chunk buffers, at most `limit` of them (the bound on chunks in memory), kept for reuse: a fresh 8 MiB
    buffer per chunk costs its page faults and zeroing, which on a fast disk is a good part of the kernel
    time of a backup. Nothing may keep a view of a buffer once its chunk is done (raw payloads are copied
    out)."""

    def __init__(self, limit: int) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(limit)
        self._closed = False

    def take(self, size: int) -> bytearray:
        while not self._slots.acquire(timeout=0.1):
            if self._closed:
                raise _Closed
        with self._lock:
            if self._free and len(self._free[-1]) >= size:
                return self._free.pop()
        return bytearray(max(size, CHUNK_BYTES))

    def give(self, buf: bytearray) -> None:
        with self._lock:
            self._free.append(buf)
        self._slots.release()

    def close(self) -> None:
        self._closed = True


def _read(src: Source, bs: int, item: _Item, buf: bytearray, rate: RateLimiter | None = None) -> int:
    """The item's blocks that the filesystem uses, read in runs into buf (what lies between them there is
    stale and never looked at: those blocks are UNUSED); then dropped from the page cache, so a backup does
    not evict what the host keeps cached. Returns the bytes read."""
    off = item.start * bs
    length = min(item.blocks * bs, src.size - off)
    view = memoryview(buf)[:length]
    if item.used is None or item.used.all():
        runs = [(0, length)]
    else:
        edges = np.diff(np.concatenate(([0], item.used.view(np.int8), [0])))
        firsts, ends = np.flatnonzero(edges == 1) * bs, np.flatnonzero(edges == -1) * bs
        runs = [(a, min(b, length) - a) for a, b in zip(firsts.tolist(), ends.tolist(), strict=True)]
    for a0, n0 in runs:
        for a, n in pieces(a0, n0, rate):
            if rate is not None:
                rate.take(n)
            src.read_into(off + a, view[a : a + n])
    src.drop_cache(off, length)
    return sum(n for _, n in runs)


def _run(
    src: Source, bs: int, codec: CodecParams, pmap: MapFile | None, writer: ImageWriter,
    cachew: MapWriter, pipe: _Pipe, progress: Progress, forced: np.ndarray, used: np.ndarray | None = None,
    data: bytearray | None = None,
) -> _Stats:  # fmt: skip
    size = src.size
    n_total = block_count(size, bs)
    try:
        os.posix_fadvise(src.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (OSError, AttributeError):
        pass

    keys = pipe.keys
    digest = block_digest(keys)

    depth = pipe.depth or pipe.threads * 2 + 6
    buffers = _Buffers(depth)
    group = max(1, GROUP_BYTES // bs) if codec.compression == spec.COMPRESSION_ZSTD else 1

    def loaded(items: Iterator[_Item]) -> Iterator[tuple[_Item, bytearray | None, int]]:
        """Read in one thread, in volume order: one sequential stream lets the kernel's readahead keep the
        device busy, where workers reading chunks side by side made it seek between them (on the benchmark
        volume's used data, hashed: as fast or up to 20% faster, with half the kernel time)."""
        for item in items:
            if item.hole:
                # nothing to read, but the kernel may have read ahead into it from the chunk before: what
                # the backup skips is of no more use to the host than what it read
                src.drop_cache(item.start * bs, min(item.blocks * bs, size - item.start * bs))
                yield item, None, 0
                continue
            buf = buffers.take(min(item.blocks * bs, size - item.start * bs))
            yield item, buf, _read(src, bs, item, buf, pipe.read_rate)

    def work(job: tuple[_Item, bytearray | None, int]) -> _Chunk:
        """Find zero blocks, digest the rest, compare with the parent map and compress what changed."""
        item, buf, nread = job
        start, n = item.start, item.blocks
        vol_bytes = min(n * bs, size - start * bs)
        kinds = np.full(n, spec.BLOCK_DATA, np.uint8)
        data: memoryview | None = None
        if buf is None:
            kinds[:] = spec.BLOCK_ZERO
            digests = np.zeros((n, 32), np.uint8)
        else:
            data = mv = memoryview(buf)[:vol_bytes]
            nfull = len(data) // bs
            if nfull:
                # a block with data in its first or last word is not zero: only the others (few, unless the
                # area is zeroed) are scanned whole, and only where the filesystem uses the block
                words = np.frombuffer(data, np.uint64, count=nfull * bs // 8).reshape(nfull, -1)
                maybe = (words[:, 0] == 0) & (words[:, -1] == 0)
                if item.used is not None:
                    maybe &= item.used[:nfull]
                for j in np.flatnonzero(maybe).tolist():
                    if not words[j].any():
                        kinds[j] = spec.BLOCK_ZERO
            if nfull < n and not np.frombuffer(data, np.uint8, offset=nfull * bs).any():
                kinds[nfull] = spec.BLOCK_ZERO
            if item.used is not None:
                kinds[~item.used] = spec.BLOCK_UNUSED
            dbuf = bytearray(32 * n)
            for j in np.flatnonzero(kinds == spec.BLOCK_DATA).tolist():
                dbuf[32 * j : 32 * j + 32] = digest(mv[j * bs : (j + 1) * bs])
            digests = np.frombuffer(dbuf, np.uint8).reshape(n, 32)
        if item.hole and item.used is not None:
            kinds[~item.used] = spec.BLOCK_UNUSED
        if item.pkind is not None and item.pdigest is not None:
            m = len(item.pkind)
            changed = np.ones(n, bool)
            cur = digests.view("<u8").reshape(n, 4)
            pdig = item.pdigest.view("<u8").reshape(m, 4)
            changed[:m] = (cur[:m] != pdig).any(axis=1) | (kinds[:m] != item.pkind)
            changed[item.force] = True
            idx = np.flatnonzero(changed)
        else:
            idx = np.arange(n)
        raw = int(np.minimum(bs, vol_bytes - idx * bs).sum())
        payloads: list[tuple[int, bytes, int]] = []
        for a, b in _group_runs(idx[kinds[idx] == spec.BLOCK_DATA], group):
            assert data is not None
            blob = data[a * bs : min(b * bs, vol_bytes)]
            packed = encode_group(codec, blob) if b - a > 1 else None
            if packed is not None:
                if keys is not None:  # sealed once, under its first block's nonce
                    packed = keys.seal_payload(start + a, spec.PAYLOAD_ZSTD_GROUP, packed)
                payloads.append((spec.PAYLOAD_ZSTD_GROUP, packed, b - a))
                continue
            for j in range(a, b):  # alone, or a group that would not shrink (stored raw, block by block)
                c, payload = (spec.PAYLOAD_RAW, blob[(j - a) * bs : (j - a + 1) * bs]) if b - a > 1 else \
                    encode(codec, blob)  # fmt: skip
                if keys is not None:
                    payload = keys.seal_payload(start + j, c, payload)
                elif isinstance(payload, memoryview):
                    payload = bytes(payload)  # the buffer is read into again once this chunk is done
                payloads.append((c, payload, 1))
        if buf is not None:
            del data, mv
            buffers.give(buf)
        return _Chunk(start, kinds, digests, idx, payloads, raw, nread)

    state = StateHasher(size, bs)
    st = _Stats(n_total, size)
    progress.start("backup", size)
    # every thread of the pipeline is stopped and joined before this returns or raises, so none of them
    # outlives the backup or touches the source after it is closed; one worker more than there are cores,
    # so that a worker waiting for the disk leaves none of them idle; at most two chunks per worker in flight
    # unless the buffer memory is bounded tighter
    # read ahead of the workers by a few chunks (the disk never waits for a hash), within the bound on chunks
    # in memory: measured on the benchmark volume, 4 chunks ahead read the used data 8% faster than 1
    ahead = min(4, max(1, depth // 3))
    feed = prefetch(loaded(_items(src, bs, pmap, forced, used, data)), ahead, pipe.init)
    results = ordered_map(work, feed, min(pipe.threads, depth), max(1, depth - ahead - 1), pipe.init)
    try:
        for ch in results:
            if pipe.guard is not None:
                pipe.guard()
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
                held = np.asarray([m for _, _, m in ch.payloads], np.int64)
                if len(rows) != int(held.sum()):
                    raise AssertionError("payloads do not hold the changed data blocks")
                ent["codec"][rows] = np.repeat(np.asarray([c for c, _, _ in ch.payloads], np.uint8), held)
                ent["offset"][rows] = np.repeat(np.asarray(writer.append_payloads([p for _, p, _ in ch.payloads]),
                                                           np.uint64), held)  # fmt: skip
                lengths = np.asarray([len(p) for _, p, _ in ch.payloads], np.int64)
                ent["length"][rows] = np.repeat(lengths, held)
                # position in the group: 0, 1, ... within each payload
                ent["member"][rows] = np.arange(len(rows)) - np.repeat(np.cumsum(held) - held, held)
                st.stored_bytes += int(lengths.sum())
                st.stored_blocks += len(rows)
                writer.add_entries(_merge_runs(ent))
            st.changed_blocks += k
            st.changed_bytes += ch.raw_changed
            z = int(np.count_nonzero(ch.kinds == spec.BLOCK_ZERO))
            u = int(np.count_nonzero(ch.kinds == spec.BLOCK_UNUSED))
            st.zero_blocks += z
            st.unused_blocks += u
            st.data_blocks += n - z - u
            st.read_bytes += ch.read
            progress.advance(min(n * bs, size - ch.start * bs))
    finally:
        buffers.close()
        results.close()
        feed.close()
        progress.stop()
    st.state = state.digest()
    return st


def _group_runs(blocks: np.ndarray, most: int) -> Iterator[tuple[int, int]]:
    """Runs [a, b) of consecutive block numbers among ascending `blocks`, at most `most` long."""
    if not len(blocks):
        return
    cuts = np.flatnonzero(np.diff(blocks) != 1) + 1
    for first, end in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [len(blocks)])).tolist(),
                          strict=True):  # fmt: skip
        a, b = int(blocks[first]), int(blocks[end - 1]) + 1
        for x in range(a, b, most):
            yield x, min(b, x + most)


def _merge_runs(ent: np.ndarray) -> np.ndarray:
    """Collapse consecutive ZERO entries, and consecutive UNUSED ones, into runs (count > 1): a zeroed or
    unused area costs one entry."""
    run = (ent["kind"] == spec.BLOCK_ZERO) | (ent["kind"] == spec.BLOCK_UNUSED)
    if run.sum() < 2:
        return ent
    blocks = ent["block"].astype(np.int64)
    kinds = ent["kind"]
    # a row starts a new entry unless it continues a run of the same kind on the very next block
    cont = np.zeros(len(ent), bool)
    cont[1:] = run[1:] & (kinds[1:] == kinds[:-1]) & (blocks[1:] == blocks[:-1] + 1)
    heads = np.flatnonzero(~cont)
    out = ent[heads].copy()
    ends = np.append(heads[1:], len(ent))
    out["count"] = ends - heads
    return out
