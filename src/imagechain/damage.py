"""The damage record of a chain: which blocks verify found damaged in which point, and which later point
stored them anew. It lets the next backup heal the chain: blocks that its parent would still take from a
damaged point are read and stored again as if changed, so the chain restores again from then on.

One small JSON file per generation, beside its full point: `damaged-<chain id, 8 hex>.json`:
{"chain_id": ..., "damaged": {point id: [blocks]}, "healed": {point id: [blocks]},
"unrestorable": {point id: why}}. Writing it is best
effort (a read-only repository can still be verified); it only ever adds blocks to re-store."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import numpy as np

from .format.reader import PointFiles
from .stores import Store


@dataclass
class DamageRecord:
    name: str
    chain_id: uuid.UUID
    damaged: dict[str, list[int]] = field(default_factory=dict)
    healed: dict[str, list[int]] = field(default_factory=dict)
    unrestorable: dict[str, str] = field(default_factory=dict)  # later points that take damaged blocks: why

    @classmethod
    def of(cls, store: Store, first: PointFiles, listed: set[str] | None = None) -> DamageRecord:
        """The record of the generation whose full point is `first` (empty when there is none). listed: the
        files a scan found, when known (it saves a remote store a request per generation)."""
        folder = first.name.rpartition("/")[0]
        cid = first.header.chain_id
        name = f"{folder}/damaged-{cid.hex[:8]}.json" if folder else f"damaged-{cid.hex[:8]}.json"
        rec = cls(name, cid)
        if listed is not None and name not in listed:
            return rec
        try:
            doc = json.loads(store.read(name, 0, 16 << 20))
        except (OSError, ValueError):
            return rec
        if isinstance(doc, dict) and doc.get("chain_id") == cid.hex:
            for key in ("damaged", "healed"):
                part = doc.get(key)
                if isinstance(part, dict):
                    lists = {str(k): [int(b) for b in v] for k, v in part.items() if isinstance(v, list)}
                    getattr(rec, key).update(lists)
            why = doc.get("unrestorable")
            if isinstance(why, dict):
                rec.unrestorable.update({str(k): str(v) for k, v in why.items()})
        return rec

    def add(self, key: str, point: uuid.UUID, blocks: list[int]) -> None:
        merged = set(getattr(self, key).get(point.hex, [])) | set(blocks)
        getattr(self, key)[point.hex] = sorted(merged)

    def save(self, store: Store) -> bool:
        doc = {"chain_id": self.chain_id.hex, "damaged": self.damaged, "healed": self.healed,
               "unrestorable": self.unrestorable}
        try:
            store.replace(self.name, json.dumps(doc, indent=1, sort_keys=True).encode())
            return True
        except Exception:  # best effort: a read-only repository is still verified
            return False

    def why_not_restorable(self, point: uuid.UUID) -> str:
        """'' unless verify found the point damaged or taking damaged blocks from an earlier one."""
        if point.hex in self.damaged:
            return f"{len(self.damaged[point.hex])} damaged block(s), found by verify"
        return self.unrestorable.get(point.hex, "")

    def to_restore(self, lineage: list[PointFiles]) -> tuple[np.ndarray, list[str]]:
        """Blocks a backup on top of lineage must store anew (damaged in a point of the lineage and not
        healed by a later one), and the damaged points they come from."""
        out: set[int] = set()
        sources = []
        for i, p in enumerate(lineage):
            bad = set(self.damaged.get(p.point_id.hex, []))
            for later in lineage[i + 1 :]:
                bad -= set(self.healed.get(later.point_id.hex, []))
            if bad:
                out |= bad
                sources.append(str(p.point_id)[:8])
        return np.array(sorted(out), np.int64), sources
