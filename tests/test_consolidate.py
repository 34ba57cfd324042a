"""Consolidation: a run of points merged into one, payloads copied as stored; every point that was
restorable before stays restorable (bit for bit), also when the consolidation is killed at any moment,
and later points and later backups go on from the merged point."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from imagechain.address import open_point
from imagechain.engine.backup import backup
from imagechain.engine.consolidate import consolidate
from imagechain.engine.restore import restore
from imagechain.errors import ImagechainError, UsageError
from imagechain.keyring import Keyring
from imagechain.repository import Repository

from .conftest import exe, write_volume

MiB = 1 << 20


def make_chain(tmp_path: Path, repo: Path, n: int, size: int = 8 * MiB, seed: int = 1) -> dict[int, str]:
    """A chain of n points, each changing the volume; sha256 of the volume at each sequence number."""
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, size, seed=seed))
    rng = random.Random(seed)
    states = {}
    for seq in range(n):
        if seq:
            for _ in range(12):
                at = rng.randrange(size - 70000)
                data[at : at + 70000] = os.urandom(70000) if rng.random() < 0.7 else bytes(70000)
            vol.write_bytes(data)
        r = backup(str(vol), str(repo), cache_dir=None)
        assert r.sequence == seq
        states[seq] = hashlib.sha256(data).hexdigest()
    return states


def live_files(repo: Path) -> set[str]:
    """Image files of the repository outside retired/ (relative names)."""
    return {p.relative_to(repo).as_posix() for p in repo.rglob("*.icimg") if p.relative_to(repo).parts[0] != "retired"}


def restorable(tmp_path: Path, repo: Path, states: dict[int, str], ring: Keyring | None = None) -> set[int]:
    """Restore every point in the repository; each must equal the volume at its sequence number."""
    r = Repository.open(str(repo))
    cat = r.catalog()
    seen = set()
    for p in cat.points.values():
        out = tmp_path / f"restored-{p.point_id.hex[:8]}.img"
        restore(r, p, str(out), cat=cat, keyring=ring)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == states[p.header.sequence], p.header.sequence
        out.unlink()
        seen.add(p.header.sequence)
    gens = list(cat.generations().values())
    assert len(gens) == 1 and len(cat.tips(gens[0])) == 1, "a consolidation must never look like a fork"
    return seen


def test_merging_from_the_full_point_makes_a_synthetic_full_and_later_points_go_on(tmp_path: Path, repo: Path) -> None:
    states = make_chain(tmp_path, repo, 5)
    res = open_point(f"{repo}::default@2")
    files_before = live_files(repo)
    r = consolidate(res.repo, res.point, cat=res.catalog)
    assert r.kind == "full" and len(r.replaced) == 3 and r.copied_payloads > 0
    assert len(r.retired_files) == 3 and not (set(r.retired_files) & live_files(repo))
    assert len(files_before) - 3 + 1 == len(live_files(repo))
    assert len(list((repo / "retired").rglob("*.icimg"))) == 3  # kept a while for readers that listed them
    assert restorable(tmp_path, repo, states) == {2, 3, 4}
    # the merged point holds each block once: no bigger than the three it replaced together
    again = backup(str(tmp_path / "vol.img"), str(repo), cache_dir=None)  # the chain goes on
    assert again.kind == "incremental" and again.sequence == 5
    states[5] = states[4]
    p = subprocess.run([exe(), "verify", str(repo)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_merging_a_run_inside_the_chain_and_merging_again(tmp_path: Path, repo: Path) -> None:
    states = make_chain(tmp_path, repo, 6, seed=2)
    res = open_point(f"{repo}::default@3")
    r = consolidate(res.repo, res.point, cat=res.catalog, from_address="default@1")
    assert r.kind == "incremental" and len(r.replaced) == 3
    assert restorable(tmp_path, repo, states) == {0, 3, 4, 5}
    res = open_point(f"{repo}::default@latest")
    r2 = consolidate(res.repo, res.point, cat=res.catalog)  # full + merged + 4 + 5: merged of a merged point
    assert r2.kind == "full" and len(r2.replaced) == 4
    assert restorable(tmp_path, repo, states) == {5}
    with pytest.raises(UsageError, match="nothing to merge"):
        res = open_point(f"{repo}::default@latest")
        consolidate(res.repo, res.point, cat=res.catalog)


def test_stopped_before_retiring_no_fork_and_a_rerun_finishes(tmp_path: Path, repo: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import imagechain.engine.consolidate as mod

    states = make_chain(tmp_path, repo, 4, seed=3)
    real = mod.retire_replaced
    monkeypatch.setattr(mod, "retire_replaced", lambda *a, **k: ([], []))
    res = open_point(f"{repo}::default@2")
    consolidate(res.repo, res.point, cat=res.catalog)
    cat = Repository.open(str(repo)).catalog()
    assert len(cat.superseded) == 3  # the old files are still there, out of the tree
    assert restorable(tmp_path, repo, states) == {2, 3}
    monkeypatch.setattr(mod, "retire_replaced", real)
    res = open_point(f"{repo}::default@2")
    r = consolidate(res.repo, res.point, cat=res.catalog)  # nothing more to merge: it only finishes the job
    assert len(r.retired_files) == 3 and any("retired" in n for n in r.notices)
    assert not Repository.open(str(repo)).catalog().superseded


def flip_in_payloads(path: Path, span: int = 1) -> None:
    """Invert `span` bytes from a third into the file (its payloads). One byte of a group's frame may fall
    on a member no map entry uses any more: zstd frames carry no checksum, so only a span is sure to hit."""
    data = bytearray(path.read_bytes())
    at = len(data) // 3
    data[at : at + span] = bytes(b ^ 0xFF for b in data[at : at + span])
    path.write_bytes(data)


def test_a_merged_point_that_does_not_verify_is_withdrawn(tmp_path: Path, repo: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """It stayed published and hid the intact points it was made from behind its damage, and the next
    consolidation retired them; the error said they were kept."""
    import imagechain.engine.consolidate as mod

    states = make_chain(tmp_path, repo, 4, seed=5)
    before = live_files(repo)
    real = mod.verify

    def damaged_on_disk(r: Repository, m: object, **kw: object) -> object:
        flip_in_payloads(repo / m.segments[0].name)  # type: ignore[attr-defined]
        return real(r, m, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(mod, "verify", damaged_on_disk)
    res = open_point(f"{repo}::default@2")
    with pytest.raises(ImagechainError, match="withdrawn to retired/, and the points it was made from stand"):
        consolidate(res.repo, res.point, cat=res.catalog)
    assert live_files(repo) == before
    assert restorable(tmp_path, repo, states) == {0, 1, 2, 3}
    monkeypatch.setattr(mod, "verify", real)
    res = open_point(f"{repo}::default@2")
    consolidate(res.repo, res.point, cat=res.catalog)  # and merging again works
    assert restorable(tmp_path, repo, states) == {2, 3}


def test_a_stopped_consolidation_s_merged_point_is_verified_before_it_retires_anything(
        tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Stopped between publishing the merged point and verifying it, with the point damaged: the next
    consolidation of the chain verifies it before retiring what it replaced, withdraws it, and merges anew."""
    import imagechain.engine.consolidate as mod

    states = make_chain(tmp_path, repo, 4, seed=6)
    real = mod.verify

    def damaged_then_stopped(r: Repository, m: object, **kw: object) -> object:
        flip_in_payloads(repo / m.segments[0].name)  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "verify", damaged_then_stopped)
    res = open_point(f"{repo}::default@2")
    with pytest.raises(KeyboardInterrupt):
        consolidate(res.repo, res.point, cat=res.catalog)
    assert len(Repository.open(str(repo)).catalog().superseded) == 3  # the merged point hides them
    monkeypatch.setattr(mod, "verify", real)
    res = open_point(f"{repo}::default@2")
    r = consolidate(res.repo, res.point, cat=res.catalog)
    assert any(n.startswith("withdrew point") and "does not verify" in n for n in r.notices), r.notices
    assert r.kind == "full" and len(r.replaced) == 3
    assert restorable(tmp_path, repo, states) == {2, 3}


def test_a_consolidation_retires_only_its_own_chain_s_points(tmp_path: Path, repo: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Another chain's merged point may be published and not yet verified (its consolidation runs, under
    its own lock, or was stopped): what it replaced is that consolidation's to retire, after verifying."""
    import imagechain.engine.consolidate as mod

    states = make_chain(tmp_path, repo, 3, seed=7)
    vol = tmp_path / "vol.img"
    for _ in range(3):
        backup(str(vol), str(repo), chain="other", cache_dir=None)
    real = mod.verify

    def stopped(r: Repository, m: object, **kw: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "verify", stopped)
    res = open_point(f"{repo}::other@latest")
    with pytest.raises(KeyboardInterrupt):
        consolidate(res.repo, res.point, cat=res.catalog)
    monkeypatch.setattr(mod, "verify", real)
    others = {p.name for p in Repository.open(str(repo)).catalog().superseded.values()}
    assert len(others) == 3
    res = open_point(f"{repo}::default@latest")
    r = consolidate(res.repo, res.point, cat=res.catalog)
    assert len(r.retired_files) == 3 and not others & set(r.retired_files)
    assert others <= live_files(repo)  # still in place, out of the tree
    res = open_point(f"{repo}::other@latest")
    r = consolidate(res.repo, res.point, cat=res.catalog)  # its own consolidation verifies and retires them
    assert set(r.retired_files) == others
    assert hashlib.sha256(vol.read_bytes()).hexdigest() == states[2]


def test_killed_at_any_moment_every_point_stays_restorable(tmp_path: Path) -> None:
    """kill -9 injected by strace at the Nth write, rename or unlink of a consolidation (writing the
    merged point, publishing it, retiring the old files): every point that was restorable stays so (the
    old ones, or the merged point for the last of them), the chain never forks, and the next run finishes."""
    import shutil

    from .conftest import need_tool

    need_tool("strace")
    pristine = tmp_path / "pristine"
    Repository.open(str(pristine), create=True)
    states = make_chain(tmp_path, pristine, 5, size=24 * MiB, seed=4)
    moments = [("write,pwrite64", n) for n in (2, 6, 12)] + [("rename,renameat,renameat2", 1)] + \
        [("unlink,unlinkat", n) for n in (1, 2, 3, 4)]  # fmt: skip
    outcomes = []
    for calls, n in moments:
        repo = tmp_path / "repo"
        shutil.copytree(pristine, repo)
        inject = ["strace", "-f", "-o", "/dev/null", "-e", f"trace={calls}", "-e",
                  f"inject={calls}:signal=KILL:when={n}"]
        killed = subprocess.run([*inject, exe(), "consolidate", f"{repo}::default@latest"], capture_output=True,
                                text=True, check=False)  # fmt: skip
        after = restorable(tmp_path, repo, states)
        assert after in ({0, 1, 2, 3, 4}, {4}), (calls, n, after)
        outcomes.append((calls.split(",")[0], n, killed.returncode, sorted(after)))
        done = subprocess.run([exe(), "consolidate", f"{repo}::default@latest"], capture_output=True, text=True,
                              check=False)  # fmt: skip
        assert done.returncode == 0 or "nothing to merge" in done.stderr, (calls, n, done.stderr)
        assert restorable(tmp_path, repo, states) == {4}
        assert not list(repo.rglob("*.tmp-*")), (calls, n, list(repo.rglob("*.tmp-*")), done.stderr)
        assert not Repository.open(str(repo)).catalog().superseded
        shutil.rmtree(repo)
    print("killed consolidations (syscall, nth, exit, restorable sequences):", outcomes)
    assert sum(code == -signal.SIGKILL or code == 137 for _, _, code, _ in outcomes) >= len(moments) - 2
    assert any(after == [4] for *_, after in outcomes) and any(len(after) == 5 for *_, after in outcomes)


def test_split_points_merge_into_a_split_point(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = bytearray(os.urandom(6 * MiB))
    vol.write_bytes(data)
    states = {0: hashlib.sha256(data).hexdigest()}
    backup(str(vol), str(repo), split_size=MiB, cache_dir=None)
    data[MiB : 3 * MiB] = os.urandom(2 * MiB)
    vol.write_bytes(data)
    backup(str(vol), str(repo), cache_dir=None)
    states[1] = hashlib.sha256(data).hexdigest()
    res = open_point(f"{repo}::default@latest")
    r = consolidate(res.repo, res.point, cat=res.catalog)
    assert len(r.files) >= 6 and all(f.endswith(".icimg") for f in r.files)  # segments of at most 1 MiB
    assert restorable(tmp_path, repo, states) == {1}


def test_stopped_while_retiring_a_split_point_the_rest_is_no_damage_and_goes_next_time(
        tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A point of several segments (any point on FAT) retired file by file, stopped (a power cut, an
    unplugged disk) after some of them: what was left counted as a damaged point, verify failed with exit 7
    for ever, and no consolidation removed it."""
    import imagechain.stores.local as local

    vol = tmp_path / "vol.img"
    data = bytearray(os.urandom(6 * MiB))
    vol.write_bytes(data)
    backup(str(vol), str(repo), split_size=MiB, cache_dir=None)
    data[MiB : 2 * MiB] = os.urandom(MiB)
    vol.write_bytes(data)
    backup(str(vol), str(repo), cache_dir=None)
    states = {1: hashlib.sha256(data).hexdigest()}
    real, moved = local.LocalStore.rename, []

    def stopped_inside_the_full(store: local.LocalStore, name: str, new: str) -> None:
        if new.startswith("retired/") and "-full-" in name and ".s002." in name:  # its first two moved already
            raise KeyboardInterrupt
        if new.startswith("retired/"):
            moved.append(name)
        real(store, name, new)

    monkeypatch.setattr(local.LocalStore, "rename", stopped_inside_the_full)
    res = open_point(f"{repo}::default@latest")
    with pytest.raises(KeyboardInterrupt):
        consolidate(res.repo, res.point, cat=res.catalog)
    monkeypatch.setattr(local.LocalStore, "rename", real)
    cat = Repository.open(str(repo)).catalog()
    assert not cat.damaged and not cat.problems and len(cat.remnants) == 1, (moved, cat.damaged, cat.problems,
                                                                            cat.superseded, cat.incomplete)
    assert any("left of point" in n and "retiring was stopped part-way" in n for n in cat.notices)
    v = subprocess.run([exe(), "verify", str(repo)], capture_output=True, text=True, check=False)
    assert v.returncode == 0, v.stdout + v.stderr
    res = open_point(f"{repo}::default@latest")
    r = consolidate(res.repo, res.point, cat=res.catalog)  # nothing to merge: it finishes the retiring
    assert any(n.startswith("retired the rest of point") for n in r.notices), r.notices
    cat = Repository.open(str(repo)).catalog()
    assert not cat.remnants and not cat.superseded and not cat.notices
    assert restorable(tmp_path, repo, states) == {1}


def test_a_reader_that_listed_the_old_points_still_reads_them_and_retired_files_go_later(
        tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A restore that resolved its point before a consolidation retired it opens the files afterwards
    (from retired/); the files go for good once the grace period has passed."""
    import imagechain.engine.consolidate as mod

    states = make_chain(tmp_path, repo, 3, seed=7)
    before = open_point(f"{repo}::default@1")  # a reader lists the repository: point 1 and its lineage
    res = open_point(f"{repo}::default@2")
    consolidate(res.repo, res.point, cat=res.catalog)
    assert 1 not in restorable(tmp_path, repo, states)  # merged away for new readers
    out = tmp_path / "late.img"
    restore(before.repo, before.point, str(out), cat=before.catalog)  # opens its files only now
    assert hashlib.sha256(out.read_bytes()).hexdigest() == states[1]
    monkeypatch.setattr(mod, "RETIRED_GRACE_S", -1)
    backup(str(tmp_path / "vol.img"), str(repo), cache_dir=None)
    backup(str(tmp_path / "vol.img"), str(repo), cache_dir=None)
    res = open_point(f"{repo}::default@latest")
    consolidate(res.repo, res.point, cat=res.catalog, from_address="default@-1")
    assert not list((repo / "retired").rglob("*.icimg"))
