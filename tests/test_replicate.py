"""Replication: the points the destination lacks, proven before they appear; resumable after kill -9,
idempotent, and a replica chain can be continued by backups at the remote site."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from imagechain.address import open_point
from imagechain.engine.backup import backup
from imagechain.engine.consolidate import consolidate
from imagechain.engine.replicate import replicate
from imagechain.identity import local_host
from imagechain.lock import ChainLock
from imagechain.repository import Repository

from .conftest import exe, need_tool
from .test_consolidate import flip_in_payloads, live_files, make_chain, restorable

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


def test_what_the_source_merged_away_the_replica_retires(tmp_path: Path, repo: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Once the merged point arrives, the replica's catalog hides the points it replaced: their files were
    kept there for ever (a nightly prune and replication grew the remote site without bound)."""
    import imagechain.engine.replicate as mod

    states = make_chain(tmp_path, repo, 4, seed=24)
    dst = tmp_path / "remote"
    assert ic("replicate", repo, dst, "--init").returncode == 0
    res = open_point(f"{repo}::default@latest")
    merged = consolidate(res.repo, res.point, cat=res.catalog)
    r = ic("replicate", repo, dst, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["copied"] == [merged.point_id] and len(doc["retired_files"]) == 4
    assert live_files(dst) == live_files(repo) and len(live_files(dst)) == 1
    assert restorable(tmp_path, dst, {3: states[3]}) == {3}
    assert json.loads(ic("replicate", repo, dst, "--json").stdout)["retired_files"] == []

    # stopped after copying the merged point, before retiring: the next run verifies it in the replica first;
    # damaged there, it is withdrawn (the old points stand again), and the run after copies it anew
    repo2 = tmp_path / "repo2"
    Repository.open(str(repo2), create=True)
    states = make_chain(tmp_path, repo2, 3, seed=25)
    dst2 = tmp_path / "remote2"
    replicate(Repository.open(str(repo2)), Repository.open(str(dst2), create=True))
    res = open_point(f"{repo2}::default@latest")
    merged = consolidate(res.repo, res.point, cat=res.catalog)
    real = mod.retire_replaced

    def stopped(*a: object, **k: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "retire_replaced", stopped)
    with pytest.raises(KeyboardInterrupt):
        replicate(Repository.open(str(repo2)), Repository.open(str(dst2)))
    monkeypatch.setattr(mod, "retire_replaced", real)
    # a backup at the remote site holds the chain's lock there: nothing to copy, the retiring waits
    h = res.point.header
    replica = Repository.open(str(dst2))
    with ChainLock(replica.store, replica.lock_name(h.host_id, h.source_id, "default"), local_host(),
                   "a backup at the remote site", replica.display):  # fmt: skip
        r = replicate(Repository.open(str(repo2)), Repository.open(str(dst2)))
    assert r.copied == [] and r.retired_files == []
    assert any(n.startswith("nothing retired in chain 'default' this time") for n in r.notices), r.notices
    (copy,) = [f for f in live_files(dst2) if merged.point_id[:8] in f]
    flip_in_payloads(dst2 / copy, 256 << 10)
    r = replicate(Repository.open(str(repo2)), Repository.open(str(dst2)))
    assert r.copied == [] and r.retired_files == []
    assert any(n.startswith("withdrew point") for n in r.notices), r.notices
    assert restorable(tmp_path, dst2, states) == {0, 1, 2}
    r = replicate(Repository.open(str(repo2)), Repository.open(str(dst2)))
    assert r.copied == [merged.point_id] and len(r.retired_files) == 3
    assert restorable(tmp_path, dst2, states) == {2}
