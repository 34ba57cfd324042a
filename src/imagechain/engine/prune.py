"""Retention: keep the points a policy names, merge the others away (removing a point merges it into its
child, so every kept point restores as before).

The policy is the usual one: the newest N points (`last`), and for each of the newest N hours, days,
ISO weeks and months that have points, the newest point of that period. The tip of every branch is
always kept (the next backup continues from it). Each branch of a forked chain is pruned along its own
lineage: a point goes only when no branch keeps it, and a point two branches continue is never merged
into one of them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np

from ..chain import Catalog, MapStream, describe
from ..errors import CredentialsError, UsageError
from ..format import spec
from ..format.reader import PointFiles
from ..keyring import Keyring
from ..repository import Repository
from .consolidate import consolidate

# of the local wall clock, as `list` shows the points' times; an hour the clock passes twice is two hours
PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour, t.fold),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
}


@dataclass
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def check(self) -> None:
        if min(asdict(self).values()) < 0:
            raise UsageError("--keep-* values cannot be negative")
        if not any(asdict(self).values()):
            raise UsageError("say what to keep: --keep-last, --keep-hourly, --keep-daily, --keep-weekly or "
                             "--keep-monthly")  # fmt: skip


def keep(points: list[PointFiles], policy: Policy) -> dict[str, str]:
    """Which points of one lineage (oldest first) the policy keeps: {point id hex: why}."""
    out: dict[str, str] = {}
    newest_first = sorted(points, key=lambda p: p.header.created_us, reverse=True)
    for p in newest_first[: policy.last]:
        out.setdefault(p.point_id.hex, "last")
    for name, period in PERIODS.items():
        n = getattr(policy, name)
        seen: list[tuple[int, ...]] = []
        for p in newest_first:
            if len(seen) >= n:
                break
            key = period(datetime.fromtimestamp(p.header.created_us / 1e6))
            if key not in seen:
                seen.append(key)
                out.setdefault(p.point_id.hex, name)
    if points:
        out.setdefault(points[-1].point_id.hex, "tip")
    return out


@dataclass
class Merge:
    """Points to remove, merged into the kept point after them."""

    into: PointFiles
    remove: list[PointFiles]
    freed_bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"into": str(self.into.point_id), "remove": [str(p.point_id) for p in self.remove],
                "remove_files": [s.name for p in self.remove for s in p.segments],
                "freed_bytes": self.freed_bytes}  # fmt: skip


@dataclass
class PruneResult:
    merges: list[Merge]
    kept: int
    dry_run: bool
    duration_s: float
    notices: list[str] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(m.freed_bytes for m in self.merges)

    def as_dict(self) -> dict[str, object]:
        return {"merges": [m.as_dict() for m in self.merges], "kept": self.kept, "dry_run": self.dry_run,
                "freed_bytes": self.freed_bytes, "duration_s": round(self.duration_s, 3),
                "notices": self.notices}  # fmt: skip


def plan(repo: Repository, cat: Catalog, generations: list[list[PointFiles]], policy: Policy,
         notices: list[str], keyring: Keyring | None = None) -> tuple[list[Merge], int]:  # fmt: skip
    """The merges that carry out the policy, and how many points stay."""
    policy.check()
    merges: list[Merge] = []
    kept_total = 0
    for pts in generations:
        if any(p.header.encrypted for p in pts):
            try:  # merging carries the data keys over: it needs them, and the maps need the digest key
                (keyring or Keyring()).unlock_all([q for t in cat.tips(pts) for q in cat.lineage(t)], need_data=True)
            except CredentialsError as e:
                notices.append(f"skipped the encrypted chain of {describe(pts[-1])}: {e}")
                kept_total += len(pts)
                continue
        lineages = [cat.lineage(t) for t in cat.tips(pts)]
        kept: set[str] = set()
        for lin in lineages:
            kept |= set(keep(lin, policy))
        kept_total += sum(1 for p in pts if p.point_id.hex in kept)
        planned: set[str] = set()
        for lin in lineages:
            run: list[PointFiles] = []
            for p in lin:
                if p.point_id.hex not in kept:
                    run.append(p)
                    continue
                if run and p.point_id.hex not in planned:
                    if any(len(cat.children.get(r.point_id, [])) > 1 for r in run):
                        notices.append(f"kept {', '.join(describe(r) for r in run)}: more than one branch "
                                       f"continues from there")  # fmt: skip
                    else:
                        merges.append(Merge(p, run, _freed(repo, [*run, p])))
                        planned.add(p.point_id.hex)
                run = []
    return merges, kept_total


def _freed(repo: Repository, run: list[PointFiles]) -> int:
    """Bytes a merge frees: the files of the run and its kept point, less the merged point's expected
    size (the kept point's own overhead plus every payload the merged point still needs)."""
    files = sum(s.size for p in run for s in p.segments)
    last = run[-1]
    merged, own = _payload_bytes(repo, run), _payload_bytes(repo, [last])
    expected = sum(s.size for s in last.segments) - own + merged
    return max(0, files - expected)


def _payload_bytes(repo: Repository, run: list[PointFiles]) -> int:
    total = 0
    with MapStream(repo.store, run, locations=True) as ms:
        for bm in ms.overlay_windows():
            assert bm.length is not None and bm.src is not None and bm.offset is not None
            data = bm.kind == spec.BLOCK_DATA
            # a group's payload counts once, however many of its blocks the map still names
            where = np.unique(np.stack([bm.src[data].astype(np.uint64), bm.offset[data]]), axis=1, return_index=True)[1]
            total += int(bm.length[data][where].astype(np.int64).sum())
    return total


def prune(repo: Repository, generations: list[list[PointFiles]], policy: Policy, *, cat: Catalog | None = None,
          dry_run: bool = False, keyring: Keyring | None = None) -> PruneResult:  # fmt: skip
    t0 = time.monotonic()
    cat = cat or repo.catalog()
    notices: list[str] = []
    ring = keyring or Keyring()
    merges, kept = plan(repo, cat, generations, policy, notices, ring)
    if not dry_run:
        for m in merges:
            fresh = repo.catalog()
            into = fresh.resolve(m.into.point_id) or m.into
            first = fresh.resolve(m.remove[0].point_id) or m.remove[0]
            r = consolidate(repo, into, cat=fresh, from_address=first.point_id.hex, keyring=ring)
            notices += r.notices
    return PruneResult(merges, kept, dry_run, time.monotonic() - t0, notices)
