"""`key change-passphrase`: re-seal the keys of every file of an encrypted chain under a new passphrase,
in place, without touching any data.

Each file has two key slots (docs/FORMAT.md section 11). Pass 1 writes the keys sealed under the new
passphrase into the slot the old one does not use, file by file, each write flushed; pass 2 then clears
the old slots. Until pass 2 starts every file opens with the old passphrase, and from the end of pass 1
every file opens with the new one: a kill at any moment leaves one of them working for every file, and
running the command again (with both passphrases) finishes the job."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..crypto import (
    ARGON2_LANES,
    ARGON2_MEMORY_KIB,
    ARGON2_TIME,
    SLOT_PASSPHRASE,
    SLOT_SIZE,
    Passphrase,
    open_slot,
    seal_slot_passphrase,
    slot_kind,
    slots,
)
from ..errors import CredentialsError, UsageError
from ..format import spec
from ..format.reader import PointFiles
from ..identity import local_host
from ..lock import ChainLock
from ..repository import Repository

SLOTS_AT = spec.SEGMENT_HEADER_SIZE + spec.HEADER_FIXED_SIZE  # file offset of slot 0 in a point's first segment


@dataclass
class RekeyResult:
    points: int = 0
    sealed: int = 0  # slots written under the new passphrase
    cleared: int = 0  # old slots cleared
    notices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"points": self.points, "sealed": self.sealed, "cleared": self.cleared, "notices": self.notices}


def change_passphrase(repo: Repository, points: list[PointFiles], old: Passphrase, new: Passphrase) -> RekeyResult:
    if old.secret == new.secret:
        raise UsageError("the new passphrase is the old one")
    enc = [p for p in points if p.header.encrypted]
    if not enc:
        raise UsageError("nothing to do: no encrypted point was named")
    if any(SLOT_PASSPHRASE not in {slot_kind(s) for s in slots(p.header.key_material)} for p in enc):
        raise UsageError("a recipient-mode chain has no passphrase to change")
    res = RekeyResult(len(enc))
    salt = os.urandom(16)
    me = local_host()
    chains = {(p.header.host_id, p.header.source_id, str(p.header.metadata.get("chain", ""))) for p in enc}
    locks = [ChainLock(repo.store, repo.lock_name(h, s, c), me, f"key change of chain {c!r}", repo.display)
             for h, s, c in sorted(chains)]  # fmt: skip
    taken: list[ChainLock] = []
    try:
        for lk in locks:  # no backup may seal a new point under the old passphrase meanwhile
            lk.__enter__()
            taken.append(lk)
        plans = [_plan(p, old, new) for p in enc]
        for p, (old_at, new_at, keys) in zip(enc, plans, strict=True):  # pass 1: the new passphrase too
            if new_at is None:
                assert old_at is not None and keys is not None
                h = p.header
                slot = seal_slot_passphrase(h.chain_id, h.point_id, keys, new, salt, ARGON2_TIME, ARGON2_MEMORY_KIB,
                                            ARGON2_LANES)  # fmt: skip
                repo.store.patch(p.segments[0].name, SLOTS_AT + (1 - old_at) * SLOT_SIZE, slot)
                res.sealed += 1
        for p, (old_at, _new, _k) in zip(enc, plans, strict=True):  # pass 2: the old one no more
            if old_at is not None:
                repo.store.patch(p.segments[0].name, SLOTS_AT + old_at * SLOT_SIZE, bytes(SLOT_SIZE))
                res.cleared += 1
    finally:
        for lk in reversed(taken):
            lk.__exit__(None, None, None)
    return res


def _plan(p: PointFiles, old: Passphrase, new: Passphrase) -> tuple[int | None, int | None, bytes | None]:
    """(slot the old passphrase opens, slot the new one opens, the keys) of one file."""
    h = p.header
    old_at = new_at = None
    keys = None
    for i, slot in enumerate(slots(h.key_material)):
        if slot_kind(slot) != SLOT_PASSPHRASE:
            continue
        if (k := open_slot(h.chain_id, h.point_id, slot, new, None)) is not None:
            new_at, keys = i, k
        elif (k := open_slot(h.chain_id, h.point_id, slot, old, None)) is not None:
            old_at, keys = i, k
    if keys is None:
        raise CredentialsError(f"{p.name} opens with neither passphrase given: wrong old passphrase")
    return old_at, new_at, keys
