"""Retention: the policy picks what stays, the rest is merged into the point after it; every kept point
restores as before, --dry-run changes nothing and says what it would free."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from imagechain.engine import backup as backup_mod
from imagechain.engine.backup import backup
from imagechain.engine.prune import Policy, keep
from imagechain.errors import UsageError
from imagechain.repository import Repository

from .conftest import exe, write_volume
from .test_consolidate import restorable

MiB = 1 << 20
HOUR = 3600 * 10**9


def chain_over_time(tmp_path: Path, repo: Path, hours: list[int]) -> dict[int, str]:
    """One backup at each of the given hours after a fixed start (the clock the backup reads is moved)."""
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 4 * MiB, seed=11))
    rng = random.Random(2)
    start = 1_780_012_800 * 10**9  # 2026-05-29T00:00:00Z
    states = {}
    with pytest.MonkeyPatch.context() as mp:  # its own: monkeypatch.undo() would undo conftest's isolation too
        for seq, h in enumerate(hours):
            if seq:
                at = rng.randrange(len(data) - 100_000)
                data[at : at + 100_000] = os.urandom(100_000)
                vol.write_bytes(data)
            mp.setattr(backup_mod.time, "time_ns", lambda h=h: start + h * HOUR)
            backup(str(vol), str(repo), cache_dir=None)
            states[seq] = hashlib.sha256(data).hexdigest()
    return states


def test_the_policy_keeps_the_newest_of_each_period(tmp_path: Path, repo: Path, utc_local: None) -> None:
    hours = [0, 1, 2, 26, 27, 50, 51, 52]  # three days
    chain_over_time(tmp_path, repo, hours)
    cat = Repository.open(str(repo)).catalog()
    (pts,) = cat.generations().values()
    lin = cat.lineage(cat.tips(pts)[0])
    seqs = {p.point_id.hex: p.header.sequence for p in lin}
    assert sorted(seqs[i] for i in keep(lin, Policy(last=2))) == [6, 7]
    assert sorted(seqs[i] for i in keep(lin, Policy(daily=2))) == [4, 7]  # newest of today and of yesterday
    assert sorted(seqs[i] for i in keep(lin, Policy(hourly=3, daily=3))) == [2, 4, 5, 6, 7]
    assert sorted(seqs[i] for i in keep(lin, Policy(monthly=1))) == [7]  # the tip is kept anyway
    with pytest.raises(UsageError):
        Policy().check()


def test_periods_are_of_the_local_clock(tmp_path: Path, repo: Path, berlin: None) -> None:
    # 21:00, 23:00 and 01:00 UTC on the night to 2026-05-30 are 23:00 on the 29th, 01:00 and 03:00 on the 30th
    # in Berlin (summer time): by the local days the newest of the 29th is the first point, by UTC's the second
    chain_over_time(tmp_path, repo, [21, 23, 25])
    cat = Repository.open(str(repo)).catalog()
    (pts,) = cat.generations().values()
    lin = cat.lineage(cat.tips(pts)[0])
    seqs = {p.point_id.hex: p.header.sequence for p in lin}
    assert sorted(seqs[i] for i in keep(lin, Policy(daily=2))) == [0, 2]


def test_the_hour_the_clock_passes_twice_is_two_hours(tmp_path: Path, repo: Path, berlin: None) -> None:
    # 2026-10-25 00:10 and 00:50 UTC are 02:10 and 02:50 summer time, 01:10 and 01:50 UTC 02:10 and 02:50
    # winter time: the same wall-clock hour twice
    start = 1_792_886_400  # 2026-10-25T00:00:00Z
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 4 * MiB, seed=12))
    with pytest.MonkeyPatch.context() as mp:
        for seq, minute in enumerate([10, 50, 70, 110]):
            if seq:
                data[seq * MiB : seq * MiB + 4096] = os.urandom(4096)
                vol.write_bytes(data)
            mp.setattr(backup_mod.time, "time_ns", lambda m=minute: (start + m * 60) * 10**9)
            backup(str(vol), str(repo), cache_dir=None)
    cat = Repository.open(str(repo)).catalog()
    (pts,) = cat.generations().values()
    lin = cat.lineage(cat.tips(pts)[0])
    seqs = {p.point_id.hex: p.header.sequence for p in lin}
    assert sorted(seqs[i] for i in keep(lin, Policy(hourly=2))) == [1, 3]


def test_prune_merges_what_goes_and_every_kept_point_restores(tmp_path: Path, repo: Path) -> None:
    states = chain_over_time(tmp_path, repo, [0, 1, 2, 26, 27, 50, 51, 52])
    files = sorted(p.name for p in repo.rglob("*.icimg"))
    dry = subprocess.run([exe(), "prune", str(repo), "--keep-daily", "2", "--dry-run", "--json"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and plan["kept"] == 2 and plan["freed_bytes"] > 0
    assert sorted(p.name for p in repo.rglob("*.icimg")) == files  # nothing changed
    done = subprocess.run([exe(), "prune", str(repo), "--keep-daily", "2", "--json"], capture_output=True, text=True,
                          check=True)  # fmt: skip
    r = json.loads(done.stdout)
    assert len(r["merges"]) == 2 and sum(len(m["remove"]) for m in r["merges"]) == 6
    assert restorable(tmp_path, repo, states) == {4, 7}
    # again: nothing more to do
    again = json.loads(subprocess.run([exe(), "prune", str(repo), "--keep-daily", "2", "--json"],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert again["merges"] == []


def test_a_forked_chain_is_pruned_per_branch_and_a_shared_point_stays(tmp_path: Path, repo: Path) -> None:
    from imagechain.engine.prune import prune

    states = {}
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 2 * MiB, seed=31))
    for seq in range(3):
        data[seq * 4096 : seq * 4096 + 100] = os.urandom(100)
        vol.write_bytes(data)
        backup(str(vol), str(repo), cache_dir=None)
        states[seq] = hashlib.sha256(data).hexdigest()
    cat = Repository.open(str(repo)).catalog()
    (pts,) = cat.generations().values()
    one = next(p for p in pts if p.header.sequence == 1)
    data[9000:9100] = os.urandom(100)
    vol.write_bytes(data)
    backup(str(vol), str(repo), parent=one.point_id.hex, cache_dir=None)  # a second branch from point 1
    branch_b = hashlib.sha256(data).hexdigest()
    r = Repository.open(str(repo))
    cat = r.catalog()
    (pts,) = cat.generations().values()
    assert len(cat.tips(pts)) == 2
    res = prune(r, [pts], Policy(last=1), cat=cat)
    assert res.merges == [] and any("more than one branch" in n for n in res.notices), res.notices
    cat = Repository.open(str(repo)).catalog()
    (pts,) = cat.generations().values()
    assert len(pts) == 4 and len(cat.tips(pts)) == 2
    tips = {p.header.sequence for p in cat.tips(pts)}
    assert tips == {2}  # both branches' tips carry sequence 2
    assert branch_b != states[2]
