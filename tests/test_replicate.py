"""Replication: the points the destination lacks, proven before they appear; resumable after kill -9,
idempotent, and a replica chain can be continued by backups at the remote site."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from imagechain.engine.backup import backup
from imagechain.repository import Repository

from .conftest import exe, need_tool
from .test_consolidate import make_chain, restorable

MiB = 1 << 20


def ic(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


def test_replicate_copies_what_is_missing_and_the_replica_goes_on(tmp_path: Path, repo: Path) -> None:
    states = make_chain(tmp_path, repo, 4, seed=21)
    dst = tmp_path / "remote"
    r = ic("replicate", repo, dst, "--init", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["copied"]) == 4 and doc["skipped"] == 0
    assert restorable(tmp_path, dst, states) == {0, 1, 2, 3}
    again = json.loads(ic("replicate", repo, dst, "--json").stdout)
    assert again["copied"] == [] and again["skipped"] == 4
    # the remote site continues the chain: an incremental written there, on the replica
    res = backup(str(tmp_path / "vol.img"), str(dst), cache_dir=None)
    assert res.kind == "incremental" and res.sequence == 4
    states[4] = states[3]
    assert restorable(tmp_path, dst, states) == {0, 1, 2, 3, 4}
    # and a later replication from the source adds its new points beside it
    assert json.loads(ic("replicate", repo, dst, "--json").stdout)["copied"] == []


def test_a_killed_replication_resumes_and_publishes_only_whole_points(tmp_path: Path, repo: Path) -> None:
    need_tool("strace")
    states = make_chain(tmp_path, repo, 4, size=16 * MiB, seed=22)
    kills = 0
    for n in (3, 6, 10, 16):
        dst = tmp_path / f"dst{n}"
        Repository.open(str(dst), create=True)
        inject = ["strace", "-f", "-o", "/dev/null", "-e", "trace=write", "-e", f"inject=write:signal=KILL:when={n}"]
        killed = subprocess.run([*inject, exe(), "replicate", str(repo), str(dst)], capture_output=True, check=False)
        kills += killed.returncode != 0
        cat = Repository.open(str(dst)).catalog()
        assert not cat.incomplete and not cat.damaged, n  # nothing half-published
        if cat.points:
            restorable(tmp_path, dst, states)
        done = ic("replicate", repo, dst, "--json")
        assert done.returncode == 0, done.stderr
        assert restorable(tmp_path, dst, states) == {0, 1, 2, 3}
        assert not list(dst.rglob("*.tmp-*")), list(dst.rglob("*.tmp-*"))
        shutil.rmtree(dst)
    assert kills >= 3, "too few runs were killed part way"


def test_a_damaged_source_point_is_not_copied(tmp_path: Path, repo: Path) -> None:
    make_chain(tmp_path, repo, 2, seed=23)
    last = sorted(repo.rglob("*incr*.icimg"))[-1]
    data = bytearray(last.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the payloads
    last.write_bytes(data)
    dst = tmp_path / "remote"
    r = ic("replicate", repo, dst, "--init")
    assert r.returncode == 7, r.stderr
    assert "does not verify" in r.stderr.strip().splitlines()[-1]
    assert len(Repository.open(str(dst)).catalog().points) == 1  # the full point went; the damaged one did not
