"""Random sequences of backups, consolidations, prunes and replications: after every step, every point
of both repositories restores bit for bit (a property test with seeded sequences), and a consolidation
that meets a full disk fails cleanly, losing nothing."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from imagechain.address import open_point
from imagechain.crypto import Passphrase
from imagechain.engine.backup import backup
from imagechain.engine.consolidate import consolidate
from imagechain.engine.prune import Policy, prune
from imagechain.engine.replicate import replicate
from imagechain.errors import NoSpaceError
from imagechain.keyring import Keyring
from imagechain.repository import Repository

from .conftest import need_root, need_tool, write_volume
from .test_consolidate import restorable

MiB = 1 << 20


def _check(tmp_path: Path, repo: Path, states: dict[int, str], ring: Keyring) -> set[int]:
    return restorable(tmp_path, repo, states, ring) if Repository.open(str(repo)).catalog().points else set()


@pytest.mark.parametrize(("seed", "encrypted"), [(1, False), (2, False), (3, True)])
def test_random_maintenance_sequences_keep_every_point_restorable(tmp_path: Path, seed: int, encrypted: bool) -> None:
    rng = random.Random(seed)
    pw = Passphrase(b"random maintenance") if encrypted else None
    ring = Keyring(pw)
    repo, replica = tmp_path / "repo", tmp_path / "replica"
    Repository.open(str(repo), create=True)
    Repository.open(str(replica), create=True)
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 4 * MiB, seed=seed))
    states: dict[int, str] = {}
    ops = []
    for _step in range(14):
        op = rng.choice(["backup", "backup", "backup", "consolidate", "prune", "replicate"])
        r = Repository.open(str(repo))
        cat = r.catalog()
        if op == "backup" or not cat.points:
            for _ in range(rng.randrange(1, 5)):
                at = rng.randrange(len(data) - 50_000)
                data[at : at + 50_000] = os.urandom(50_000) if rng.random() < 0.8 else bytes(50_000)
            vol.write_bytes(data)
            res = backup(str(vol), str(repo), cache_dir=None, keyring=ring, encrypt=None if cat.points else pw)
            states[res.sequence] = hashlib.sha256(data).hexdigest()
            op = "backup"
        elif op == "consolidate":
            tip = open_point(f"{repo}::default@latest")
            lin = tip.catalog.lineage(tip.point)
            if len(lin) >= 2:
                a = rng.randrange(0, len(lin) - 1)
                b = rng.randrange(a + 1, len(lin))
                consolidate(tip.repo, lin[b], cat=tip.catalog, from_address=lin[a].point_id.hex, keyring=ring)
        elif op == "prune":
            prune(r, list(cat.generations().values()), Policy(last=rng.randrange(1, 4)), cat=cat, keyring=ring)
        else:
            replicate(r, Repository.open(str(replica)))
        ops.append(op)
        _check(tmp_path, repo, states, ring)
        _check(tmp_path, replica, states, ring)
    assert "backup" in ops and len(set(ops)) >= 3, ops


def test_a_full_disk_during_consolidation_loses_nothing(tmp_path: Path) -> None:
    need_root()
    need_tool("mkfs.ext4")
    fs = tmp_path / "small.img"
    with open(fs, "wb") as f:
        f.truncate(48 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(fs)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], check=True)
    try:
        repo = mnt / "repo"
        Repository.open(str(repo), create=True)
        vol = tmp_path / "vol.img"
        vol.write_bytes(os.urandom(14 * MiB))  # incompressible: the merged point needs about as much again
        states = {0: hashlib.sha256(vol.read_bytes()).hexdigest()}
        backup(str(vol), str(repo), cache_dir=None)
        data = bytearray(vol.read_bytes())
        for seq in (1, 2):
            data[seq * MiB : seq * MiB + 6 * MiB] = os.urandom(6 * MiB)
            vol.write_bytes(data)
            backup(str(vol), str(repo), cache_dir=None)
            states[seq] = hashlib.sha256(data).hexdigest()
        filler = mnt / "filler"
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 8 * MiB))  # leave less than the merged point needs
        res = open_point(f"{repo}::default@latest")
        with pytest.raises(NoSpaceError):
            consolidate(res.repo, res.point, cat=res.catalog)
        assert not list(repo.rglob("*.tmp-*"))
        filler.unlink()
        assert restorable(tmp_path, repo, states) == {0, 1, 2}
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
