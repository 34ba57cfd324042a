"""Verify points: structure and checksums, chain links, state digests, and every block's digest."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..blockmap import BlockMap
from ..chain import Catalog, MapProver, describe, lineage
from ..codec import decode
from ..errors import ImagechainError, IntegrityError
from ..format import spec
from ..format.reader import PointFiles, PointReader
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


@dataclass
class VerifyReport:
    points: list[PointReport] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # files that are not (whole) points
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.points) and not self.incomplete

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "points": [vars(p) for p in self.points],
            "incomplete": self.incomplete,
            "leftovers": self.leftovers,
        }


def verify(repo: Repository, only: PointFiles | None = None, *, threads: int | None = None,
           progress: Progress | None = None, cat: Catalog | None = None) -> VerifyReport:  # fmt: skip
    progress = progress or Silent()
    cat = cat or repo.catalog()
    report = VerifyReport(leftovers=list(cat.leftovers))
    if only is None:
        report.incomplete = [f"{', '.join(files)}: {why}" for files, why in cat.problems]
        targets = sorted(cat.points.values(), key=lambda p: (str(p.header.chain_id), p.header.sequence))
    else:
        # a point is only as sound as the points it is restored from: check its whole lineage
        try:
            targets = lineage(cat, only)
        except ImagechainError:
            targets = [only]  # the broken link is reported by the point's own check
    total = sum(p.footer.index_count for p in targets)
    progress.start("verify", max(total, 1))
    try:
        maps = MapProver(repo.store, cat)
        for p in targets:
            report.points.append(_verify_point(repo, maps, p, threads or default_threads(), progress))
    finally:
        progress.stop()
    return report


def _verify_point(repo: Repository, maps: MapProver, p: PointFiles, threads: int, progress: Progress) -> PointReport:
    rep = PointReport(str(p.point_id), p.name, True)
    try:
        with PointReader(repo.store, p) as r:
            r.summary()
            idx = r.index()
            rep.bad_blocks, rep.checked_blocks = _check_payloads(r, p.header, idx, threads, progress)
        if rep.bad_blocks:
            shown = ", ".join(map(str, rep.bad_blocks[:20])) + (" ..." if len(rep.bad_blocks) > 20 else "")
            rep.problems.append(f"{p.name}: {len(rep.bad_blocks)} corrupt block(s): {shown}")
        maps.prove(p)
    except ImagechainError as e:
        rep.problems.append(str(e))
    rep.ok = not rep.problems
    return rep


def _check_payloads(r: PointReader, h: spec.PointHeader, idx: np.ndarray, threads: int,
                    progress: Progress) -> tuple[list[int], int]:  # fmt: skip
    data = idx[idx["kind"] == spec.BLOCK_DATA]
    data = data[np.argsort(data["offset"], kind="stable")]
    geometry = BlockMap(h.volume_size, h.block_size, np.zeros(0, np.uint8), np.zeros((0, 32), np.uint8))
    # batches of payloads that are contiguous in the file, ~READ_BYTES each
    batches: list[np.ndarray] = []
    start, acc = 0, 0
    for i, ln in enumerate(data["length"].tolist()):
        acc += ln
        if acc >= READ_BYTES:
            batches.append(data[start : i + 1])
            start, acc = i + 1, 0
    if start < len(data):
        batches.append(data[start:])

    def work(batch: np.ndarray) -> list[int]:
        bad = []
        lo = int(batch["offset"][0])
        hi = int(batch["offset"][-1]) + int(batch["length"][-1])
        try:
            buf = memoryview(r.read(lo, hi - lo))
        except IntegrityError:
            return [int(b) for b in batch["block"]]
        for e in batch:
            blk = int(e["block"])
            o = int(e["offset"]) - lo
            try:
                raw = decode(int(e["codec"]), bytes(buf[o : o + int(e["length"])]), geometry.raw_length(blk))
                if spec.b3(raw) != e["digest"].tobytes():
                    bad.append(blk)
            except IntegrityError:
                bad.append(blk)
        return bad

    bad: list[int] = []
    for batch, res in zip(batches, ordered_map(work, batches, threads, threads * 2), strict=True):
        bad.extend(res)
        progress.advance(len(batch))
    progress.advance(int(len(idx) - len(data)))
    return sorted(bad), len(data)



__all__ = ["PointReport", "VerifyReport", "describe", "verify"]
