"""Verify points: structure and checksums, chain links, state digests, and every block's digest."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..blockmap import BlockMap, expand_blocks
from ..chain import Catalog, MapStream, describe
from ..damage import DamageRecord
from ..errors import CredentialsError, ImagechainError, IntegrityError
from ..format import spec
from ..format.reader import PointFiles, PointReader
from ..keyring import Keyring
from ..payload import BlockOpener
from ..repository import Repository
from .pipeline import default_threads, ordered_map
from .progress import Progress, Silent

READ_BYTES = 8 << 20


@dataclass
class PointReport:
    point_id: str
    file: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    bad_blocks: list[int] = field(default_factory=list)
    checked_blocks: int = 0
    notices: list[str] = field(default_factory=list)  # damage to informational parts only (the summary)


@dataclass
class VerifyReport:
    points: list[PointReport] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # files that are not (whole, sound) points
    leftovers: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # forks, ignored copies, misnamed segments
    opened_none: str = ""  # the passphrase or identity given opened no encrypted chain checked: why

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.points) and not self.incomplete

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "points": [vars(p) for p in self.points],
            "incomplete": self.incomplete,
            "leftovers": self.leftovers,
            "notices": self.notices,
            "opened_none": self.opened_none,
        }


def fork_notices(cat: Catalog, points: list[PointFiles]) -> list[str]:
    out = []
    ids = {p.point_id for p in points}
    for pts in cat.generations().values():
        for parent, kids in cat.forks([p for p in pts if p.point_id in ids]):
            tips = cat.tips(pts)
            out.append(
                f"chain {parent.header.metadata.get('chain')!r} forks at {describe(parent)} into "
                f"{len(kids)} branches ({', '.join(str(k.point_id)[:8] for k in kids)}); its tips are "
                f"{', '.join(str(t.point_id)[:8] for t in tips)}"
            )
    return out


def verify(repo: Repository, only: PointFiles | None = None, *, threads: int | None = None,
           progress: Progress | None = None, cat: Catalog | None = None,
           keyring: Keyring | None = None) -> VerifyReport:  # fmt: skip
    """Every target point's structure, links, map and payloads. Encrypted points are checked as far as the
    keys given allow (docs/SECURITY.md): all of it with the passphrase or identity; maps but not payloads
    with only a recipient-mode writer's digest key; without keys, structure, links and checksums."""
    progress = progress or Silent()
    cat = cat or repo.catalog()
    report = VerifyReport(leftovers=list(cat.leftovers), notices=list(cat.notices))
    if only is None:
        report.incomplete = [f"{', '.join(files)}: {why}{_intact(repo, cat, pid, threads)}"
                             for pid, (files, why) in cat.damaged.items()]  # fmt: skip
        report.incomplete += [f"{', '.join(files)}: {why}" for files, why in cat.problems]
        targets = sorted(cat.points.values(), key=lambda p: (str(p.header.chain_id), p.header.sequence,
                                                              p.header.created_us))  # fmt: skip
    else:
        # a point is only as sound as the points it is restored from: check its whole lineage
        try:
            targets = cat.lineage(only)
        except ImagechainError:
            targets = cat.ancestry(only)  # the broken link is reported by the map proof
    report.notices += fork_notices(cat, targets)
    ring = keyring or Keyring()
    less = _unlock(ring, targets)
    report.notices += [f"encrypted chain {cid.hex[:8]}: {what}" for cid, what in less.items()]
    encrypted = {p.header.chain_id for p in targets if p.header.encrypted}
    if ring.given and encrypted and set(less) == encrypted:
        report.opened_none = (f"the {'identity' if ring.identity is not None else 'passphrase'} given opens "
                              f"none of the {len(encrypted)} encrypted chain(s) checked: their payloads were "
                              f"not checked")  # fmt: skip
    maps = _prove_maps(repo, cat, targets)
    progress.start("verify", max(1, sum(p.footer.index_offset for p in targets)))  # ~ payload bytes
    try:
        for p in targets:
            rep = verify_point(repo, p, threads or default_threads(), progress)
            if maps.get(p.point_id):
                rep.problems.append(maps[p.point_id])
            rep.ok = not rep.problems
            report.points.append(rep)
    finally:
        progress.stop()
    reports = {r.point_id: r for r in report.points}
    for p in targets:
        bad = reports[str(p.point_id)].bad_blocks
        if bad:
            blamed = _blame_descendants(repo, cat, p, p, np.array(bad, np.int64), reports)
            report.notices.append(_record_damage(repo, cat, p, bad, blamed))
    return report


def _record_damage(repo: Repository, cat: Catalog, p: PointFiles, bad: list[int], blamed: dict[str, str]) -> str:
    """Tell the next backup of the chain which blocks to store anew, and list which points are not
    restorable (damage.py)."""
    first = cat.ancestry(p)[0]
    rec = DamageRecord.of(repo.store, first)
    rec.add("damaged", p.point_id, bad)
    rec.unrestorable.update(blamed)
    if rec.save(repo.store):
        return (f"recorded the {len(bad)} damaged block(s) of {describe(p)} in {rec.name}: the next backup of "
                f"the chain stores them anew, so the chain restores again from that backup on")  # fmt: skip
    return f"could not record the damaged blocks of {describe(p)} for the next backup (is the repository writable?)"


def _blame_descendants(repo: Repository, cat: Catalog, damaged: PointFiles, parent: PointFiles,
                       bad: np.ndarray, reports: dict[str, PointReport]) -> dict[str, str]:  # fmt: skip
    """A point restores from its ancestors' payloads: each descendant that still takes one of the damaged
    blocks (no point in between stored it anew) cannot be restored either, and is reported so.
    Returns {point id hex: why} of those descendants."""
    blamed: dict[str, str] = {}
    for child in cat.children.get(parent.point_id, []):
        rep = reports.get(str(child.point_id))
        if rep is None:
            continue
        left = bad[bad < child.header.block_count]
        with PointReader(repo.store, child) as r:
            try:
                for ent in r.iter_index():
                    left = left[~np.isin(left, expand_blocks(ent))]
            except ImagechainError:
                continue  # the child's own index problem is reported by its own check
        if len(left):
            shown = ", ".join(map(str, left[:20].tolist())) + (" ..." if len(left) > 20 else "")
            rep.problems.append(f"cannot be restored: {len(left)} block(s) it takes from {describe(damaged)} "
                                f"are damaged: {shown}")  # fmt: skip
            rep.ok = False
            blamed[child.point_id.hex] = f"takes {len(left)} damaged block(s) from point {str(damaged.point_id)[:8]}"
            blamed.update(_blame_descendants(repo, cat, damaged, child, left, reports))
    return blamed


def _intact(repo: Repository, cat: Catalog, pid: uuid.UUID, threads: int | None) -> str:
    """For a point damaged only in its header: whether its data still proves out (then --salvage restores
    it). The state digest is the proof, with every block digest."""
    if pid not in cat.salvageable:
        return ""
    whole = cat.with_salvaged()
    p = whole.points[pid]
    try:
        lin = whole.lineage(p)
    except ImagechainError:
        return ""
    maps = _prove_maps(repo, whole, lin)
    reps = [verify_point(repo, q, threads or default_threads(), Silent()) for q in lin]
    if any(maps.get(q.point_id) for q in lin) or any(r.problems for r in reps):
        return ""
    return " (its data is intact: every block digest and its state digest check out; restore it with --salvage)"


def _prove_maps(repo: Repository, cat: Catalog, targets: list[PointFiles]) -> dict[uuid.UUID, str]:
    """Every target's map proven against its state digest: one pass over the indexes per branch."""
    ids = {p.point_id for p in targets}
    leaves = [p for p in targets if not any(k.point_id in ids for k in cat.children.get(p.point_id, ()))]
    out: dict[uuid.UUID, str] = {}
    for leaf in leaves:
        try:
            lin = cat.lineage(leaf)
        except ImagechainError as e:
            for p in cat.ancestry(leaf):
                out.setdefault(p.point_id, str(e))
            continue
        if any(p.header.encrypted and p.keys is None for p in lin):
            continue  # no keys: what the footers link is checked, not what the sealed indexes say
        with MapStream(repo.store, lin) as ms:
            out.update(ms.prove_all(skip=set(out)))
    return out


def _unlock(ring: Keyring, targets: list[PointFiles]) -> dict[uuid.UUID, str]:
    """Attach what keys there are to encrypted points; what was not checked of each chain checked less than
    fully."""
    less: dict[uuid.UUID, str] = {}
    for p in targets:
        if not p.header.encrypted:
            continue
        try:
            ring.unlock(p)
            continue
        except CredentialsError as e:
            why = str(e)
        try:
            ring.unlock(p, need_data=False)
            less.setdefault(p.header.chain_id, f"payloads not checked (only the chain's digest key is here; {why})")
        except CredentialsError:
            less.setdefault(p.header.chain_id, f"structure, links and checksums only ({why})")
    return less


def verify_point(repo: Repository, p: PointFiles, threads: int, progress: Progress) -> PointReport:
    rep = PointReport(str(p.point_id), p.name, True)
    sealed = p.header.encrypted and (p.keys is None or p.keys.data_key is None)
    with PointReader(repo.store, p) as r:
        try:
            if not (p.header.encrypted and p.keys is None):
                r.summary()
        except (ImagechainError, ValueError) as e:  # informational: the data is not affected
            rep.notices.append(f"{e} (statistics only; the point's data is not affected)")
        try:
            if p.header.encrypted and p.keys is None:
                r.check_stored()
                return rep
            r.check_index()
            if sealed:
                return rep
            bad, rep.checked_blocks = _check_payloads(r, p.header, threads, progress)
        except ImagechainError as e:
            rep.problems.append(str(e))
            return rep
    by_file: dict[str, list[int]] = {}
    for blk, where in bad:
        by_file.setdefault(where, []).append(blk)
    for where, blocks in by_file.items():
        shown = ", ".join(map(str, blocks[:20])) + (" ..." if len(blocks) > 20 else "")
        rep.problems.append(f"{where}: {len(blocks)} corrupt block(s): {shown}")
    rep.bad_blocks = sorted(b for b, _ in bad)
    return rep


def _batches(r: PointReader) -> Iterator[np.ndarray]:
    """DATA entries in batches of payloads that lie together in the file, ~READ_BYTES each."""
    for ent in r.iter_index():
        data = ent[ent["kind"] == spec.BLOCK_DATA]
        data = data[np.argsort(data["offset"], kind="stable")]
        start, acc, last = 0, 0, -1
        for i, (off, ln) in enumerate(zip(data["offset"].tolist(), data["length"].tolist(), strict=True)):
            if off == last:
                continue  # the next block of the same group: counted with it, and kept in its batch
            if acc >= READ_BYTES:  # a batch ends where a payload begins, never inside a group
                yield data[start:i]
                start, acc = i, 0
            last = off
            acc += ln
        if start < len(data):
            yield data[start:]


def _check_payloads(r: PointReader, h: spec.PointHeader, threads: int,
                    progress: Progress) -> tuple[list[tuple[int, str]], int]:  # fmt: skip
    """(bad blocks with the file holding each, DATA blocks checked)."""
    geometry = BlockMap(h.volume_size, h.block_size, np.zeros(0, np.uint8), np.zeros((0, 32), np.uint8))
    keys = r.keys() if h.encrypted else None
    opener = BlockOpener(keys)

    def work(batch: np.ndarray) -> tuple[int, int, list[tuple[int, str]]]:
        bad = []
        lo = int(batch["offset"][0])
        hi = int(batch["offset"][-1]) + int(batch["length"][-1])
        try:
            buf = memoryview(r.read(lo, hi - lo))
        except IntegrityError:
            return len(batch), hi - lo, [(int(e["block"]), r.segment_at(int(e["offset"]))) for e in batch]
        for e in batch:
            blk, off = int(e["block"]), int(e["offset"])
            try:
                opener.open(r, blk, int(e["codec"]), int(e["key"]), int(e["member"]), off,
                            buf[off - lo : off - lo + int(e["length"])], geometry.raw_length(blk), h.block_size,
                            e["digest"].tobytes())  # fmt: skip
            except IntegrityError:
                bad.append((blk, r.segment_at(off)))
        opener.forget()
        return len(batch), hi - lo, bad

    bad: list[tuple[int, str]] = []
    checked = 0
    results = ordered_map(work, _batches(r), threads, threads * 2)
    try:
        for n, nbytes, res in results:
            bad.extend(res)
            checked += n
            progress.advance(nbytes)
    finally:
        results.close()
    return bad, checked


__all__ = ["PointReport", "VerifyReport", "describe", "verify"]
