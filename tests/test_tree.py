"""Chains as trees: forks from copied repositories, selectors along one lineage, generations decided by
links rather than clocks; and the housekeeping around them (crash windows, the map cache, lineage proofs,
threads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import blake3
import pytest

from imagechain import mapcache
from imagechain.address import _time_limit, open_point
from imagechain.engine import backup as backup_mod
from imagechain.engine.backup import backup
from imagechain.engine.restore import restore
from imagechain.engine.verify import verify
from imagechain.errors import AmbiguousPointError, IntegrityError, RepositoryError
from imagechain.format.reader import PointReader
from imagechain.repository import Repository

from .conftest import exe, write_volume

MiB = 1 << 20


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def restored(repo: Path, address: str, tmp: Path) -> bytes:
    res = open_point(f"{repo}::{address}")
    out = tmp / "restored.img"
    restore(res.repo, res.point, str(out), cat=res.catalog)
    try:
        return b3(out.read_bytes())
    finally:
        out.unlink()


def change(vol: Path, data: bytearray, at: int, seed: int) -> None:
    data[at : at + 100_000] = os.urandom(100_000) if seed else bytes(100_000)
    vol.write_bytes(data)


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def forked(tmp_path: Path, repo: Path) -> dict[str, object]:
    """A chain continued in a copy of its repository and in the original, the copy's files merged back:
    trunk r0 <- r1, branch A: a2, branch B: b2 <- b3."""
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 3 * MiB, seed=5))
    content: dict[str, bytes] = {}
    ids: dict[str, str] = {}
    for key, at in (("r0", None), ("r1", 10_000)):
        if at is not None:
            change(vol, data, at, 1)
        ids[key] = backup(str(vol), str(repo)).point_id
        content[ids[key]] = b3(bytes(data))
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    trunk = bytes(data)
    change(vol, data, 1_000_000, 1)
    ids["a2"] = backup(str(vol), str(repo)).point_id
    content[ids["a2"]] = b3(bytes(data))
    data[:] = trunk
    for key, at in (("b2", 2_000_000), ("b3", 2_500_000)):
        change(vol, data, at, 1)
        ids[key] = backup(str(vol), str(copy)).point_id
        content[ids[key]] = b3(bytes(data))
    for f in copy.rglob("*.icimg"):  # bring the copy's new files home, into a folder of their own
        rel = f.relative_to(copy)
        if not (repo / rel).exists():
            (repo / "from-copy").mkdir(exist_ok=True)
            shutil.copy2(f, repo / "from-copy" / f.name)
    return {"vol": vol, "data": data, "ids": ids, "content": content}


def test_fork_is_a_tree_and_selectors_walk_one_lineage(tmp_path: Path, repo: Path, forked: dict[str, object]) -> None:
    ids: dict[str, str] = forked["ids"]  # type: ignore[assignment]
    content: dict[str, bytes] = forked["content"]  # type: ignore[assignment]
    cat = Repository.open(str(repo)).catalog()
    (gen,) = cat.generations().values()
    assert {str(t.point_id) for t in cat.tips(gen)} == {ids["a2"], ids["b3"]}
    ((parent, kids),) = cat.forks(gen)
    assert str(parent.point_id) == ids["r1"] and {str(k.point_id) for k in kids} == {ids["a2"], ids["b2"]}

    def sel(s: str) -> str:
        return str(open_point(f"{repo}::{s}").point.point_id)

    # one answer on every branch: fine; different answers: an error naming the candidates
    assert sel("default@1") == ids["r1"] and sel("default@full") == ids["r0"] and sel("default@0") == ids["r0"]
    for ambiguous, cands in (("default", ("a2", "b3")), ("default@-1", ("r1", "b2")), ("default@2", ("a2", "b2"))):
        with pytest.raises(AmbiguousPointError) as e:
            sel(ambiguous)
        assert all(ids[c][:8] in str(e.value) for c in cands), str(e.value)
    # a tip's own lineage
    assert sel(f"{ids['b3'][:8]}@-1") == ids["b2"] and sel(f"{ids['b3'][:8]}@-2") == ids["r1"]
    assert sel(f"{ids['a2'][:8]}@-1") == ids["r1"] and sel(f"{ids['b3'][:8]}@full") == ids["r0"]
    # times: a moment on the trunk is one point on both branches
    r1 = cat.points[next(p for p in cat.points if str(p) == ids["r1"])]
    t = datetime.fromtimestamp(r1.header.created_us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    assert sel(f"default@{t}Z") == ids["r1"]
    with pytest.raises(AmbiguousPointError):
        sel("default@2099-01-01Z")
    # every point restores bit-exact
    for pid, digest in content.items():
        assert restored(repo, pid[:8], tmp_path) == digest, pid
    # verify: all sound, the fork is a notice
    rep = verify(Repository.open(str(repo)))
    assert rep.ok and len(rep.points) == 5
    assert any("forks at" in n and ids["r1"][:8] in n for n in rep.notices), rep.notices


def test_backup_of_a_forked_chain_asks_for_parent(tmp_path: Path, repo: Path, forked: dict[str, object]) -> None:
    ids: dict[str, str] = forked["ids"]  # type: ignore[assignment]
    vol: Path = forked["vol"]  # type: ignore[assignment]
    before = sorted(p.name for p in repo.rglob("*.icimg"))
    p = cli("backup", vol, repo)
    assert p.returncode == 6 and "Traceback" not in p.stderr, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "--parent" in line and ids["a2"][:8] in line and ids["b3"][:8] in line, line
    assert sorted(p.name for p in repo.rglob("*.icimg")) == before
    res = backup(str(vol), str(repo), parent=ids["b3"][:8])
    assert res.parent_id == ids["b3"] and res.kind == "incremental"
    assert restored(repo, res.point_id[:8], tmp_path) == b3(vol.read_bytes())
    # list shows the fork and the tips
    listing = cli("list", repo)
    assert listing.returncode == 0 and "fork: 2 branches" in listing.stdout and "tips" in listing.stdout


def test_list_json_has_the_tree(repo: Path, forked: dict[str, object]) -> None:
    ids: dict[str, str] = forked["ids"]  # type: ignore[assignment]
    import json

    p = cli("list", repo, "--json")
    data = json.loads(p.stdout)
    rows = {r["point_id"]: r for chain in data["chains"] for r in chain}
    assert rows[ids["b2"]]["parent_id"] == ids["r1"] and rows[ids["b3"]]["tip"]
    assert set(rows[ids["r1"]]["children"]) == {ids["a2"], ids["b2"]}
    assert set(data["tips"][0]) == {ids["a2"], ids["b3"]}


def test_time_selectors_are_utc_with_z() -> None:
    end_of_day = datetime(2026, 11, 24, 23, 59, 59, 999999, tzinfo=UTC)
    assert _time_limit("2026-11-24Z") == int(end_of_day.timestamp() * 1_000_000)
    assert _time_limit("2026-11-24T10Z") == int(datetime(2026, 11, 24, 10, 59, 59, 999999, tzinfo=UTC)
                                                .timestamp() * 1_000_000)  # fmt: skip
    assert _time_limit("2026-11-24T10:00:00+02:00") == int(datetime(2026, 11, 24, 8, 0, 0, 999999, tzinfo=UTC)
                                                           .timestamp() * 1_000_000)  # fmt: skip


def test_local_time_selectors_follow_the_wall_clock(berlin: None) -> None:
    def limit(sel: str) -> str:
        return datetime.fromtimestamp((_time_limit(sel) + 1) / 1e6).astimezone().isoformat()

    # a date is a day of the wall clock: 25 hours when the clocks go back (the last hour was left out), 23
    # when they go forward (the first hour of the next day was taken in)
    assert limit("2026-10-25") == "2026-10-26T00:00:00+01:00"
    assert limit("2026-03-29") == "2026-03-30T00:00:00+02:00"
    assert limit("2026-11-24") == "2026-11-25T00:00:00+01:00"
    # the hour the clock passes twice: both passes; a minute in it: up to its second pass
    assert limit("2026-10-25T02") == "2026-10-25T03:00:00+01:00"
    assert limit("2026-10-25T02:30") == "2026-10-25T02:31:00+01:00"
    assert limit("2026-11-24T10:15:30") == "2026-11-24T10:15:31+01:00"
    # UTC and offsets are not local time
    assert limit("2026-10-25Z") == "2026-10-26T01:00:00+01:00"
    # the ends of the calendar: everything, or nothing (the day after 9999-12-31 overflowed)
    assert _time_limit("9999-12-31") == _time_limit("9999-12-31T23:59:59.999999Z") > _time_limit("2026-11-24")
    assert _time_limit("9999-12-31T23:59:59+14:00") > _time_limit("2026-11-24")
    assert _time_limit("0001-01-01T00:00:00+14:00") < 0 and _time_limit("0001-01-01T00:00") < 0


def test_clock_set_back_does_not_hide_a_newer_full_generation(tmp_path: Path, repo: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 2 * MiB, seed=2))
    first = backup(str(vol), str(repo))
    backup(str(vol), str(repo))
    real = backup_mod.time.time_ns
    with monkeypatch.context() as m:
        m.setattr(backup_mod.time, "time_ns", lambda: real() - 86_400 * 10**9 * 30)  # a month back
        new = backup(str(vol), str(repo), full=True)
    assert new.chain_id != first.chain_id
    change(vol, data, 0, 1)
    nxt = backup(str(vol), str(repo))
    assert nxt.chain_id == new.chain_id and nxt.parent_id == new.point_id
    assert str(open_point(f"{repo}::default").point.point_id) == nxt.point_id


# -- crash windows and housekeeping ------------------------------------------------------------------

CRASH_BETWEEN_RENAMES = """
import os, sys
from imagechain.format import writer as W
from imagechain.stores import local as L
orig_finish, orig_commit = W.ImageWriter.finish, L._LocalWriter.commit
def finish(self, *a, **k):
    def commit(seg):
        if seg is self.segments[-1]:
            os._exit(9)  # killed after every other segment was renamed, before the footer's
        return orig_commit(seg)
    L._LocalWriter.commit = commit
    return orig_finish(self, *a, **k)
W.ImageWriter.finish = finish
from imagechain.engine.backup import backup
backup(sys.argv[1], sys.argv[2], split_size=1 << 20)
"""


def test_a_point_killed_between_renames_is_published_by_the_next_run(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(4 * MiB))
    p = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(vol), str(repo)], capture_output=True,
                       text=True, env=dict(os.environ), timeout=120)  # fmt: skip
    assert p.returncode == 9, p.stderr
    temps = [f for f in repo.rglob("*") if ".tmp-" in f.name and f.suffix != ".lock"]
    assert len(temps) == 1 and list(repo.rglob("*.s001.icimg")), temps
    assert not Repository.open(str(repo)).catalog().points  # not a point yet
    res = backup(str(vol), str(repo))
    assert any("published point" in n for n in res.notices), res.notices
    assert res.kind == "incremental" and res.changed_blocks == 0  # it continues the recovered point
    cat = Repository.open(str(repo)).catalog()
    assert len(cat.points) == 2 and not cat.leftovers
    recovered = next(p for p in cat.points.values() if p.header.parent_id is None)
    assert restored(repo, recovered.point_id.hex[:8], tmp_path) == b3(vol.read_bytes())


def test_cache_keeps_only_tip_maps(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Path(os.environ["IMAGECHAIN_CACHE"])
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 2 * MiB, seed=3))
    for i in range(4):
        change(vol, data, i * 300_000, 1)
        a = backup(str(vol), str(repo), chain="a")
        b = backup(str(vol), str(repo), chain="b")
    maps = sorted(f.name for f in cache.glob("*.map"))
    assert maps == sorted(f"{x.point_id.replace('-', '')}-{x.state_digest[:32]}.map" for x in (a, b)), maps
    monkeypatch.setattr(mapcache, "KEEP_MAPS", 1)
    monkeypatch.setattr(mapcache.prune, "__defaults__", (1,))
    c = backup(str(vol), str(repo), chain="c")
    assert [f.name for f in cache.glob("*.map")] == [f"{c.point_id.replace('-', '')}-{c.state_digest[:32]}.map"]


def test_a_rotted_parent_index_fails_the_backup_even_with_a_warm_cache(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 2 * MiB, seed=4))
    r0 = backup(str(vol), str(repo))
    cat = Repository.open(str(repo)).catalog()
    (p,) = cat.points.values()
    seg = p.segments[-1]
    path = repo / seg.name
    raw = bytearray(path.read_bytes())
    at = 64 + p.footer.index_offset - seg.seg.logical_offset + 5
    raw[at] ^= 0x40
    path.write_bytes(raw)
    assert list(Path(os.environ["IMAGECHAIN_CACHE"]).glob(f"{r0.point_id.replace('-', '')}*.map"))  # warm
    change(vol, data, 0, 1)
    before = sorted(f.name for f in repo.rglob("*.icimg"))
    q = cli("backup", vol, repo)
    assert q.returncode == 7 and "index checksum" in q.stderr and "--full" in q.stderr, q.stderr
    assert sorted(f.name for f in repo.rglob("*.icimg")) == before


class Boom(Exception):
    pass


class Exploding:
    """A progress sink that raises after a few advances: an error in the middle of the pipeline."""

    def __init__(self, after: int, exc: BaseException) -> None:
        self.n, self.after, self.exc = 0, after, exc

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        self.n += 1
        if self.n >= self.after:
            raise self.exc

    def stop(self) -> None:
        pass

    def notice(self, message: str) -> None:
        pass


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("prefetch", "work"))]


@pytest.mark.parametrize("exc", [Boom("x"), KeyboardInterrupt()])
def test_no_pipeline_thread_outlives_backup_or_restore(tmp_path: Path, repo: Path, exc: BaseException) -> None:
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(40 * MiB))
    with pytest.raises(type(exc)):
        backup(str(vol), str(repo), progress=Exploding(2, exc))  # type: ignore[arg-type]
    assert pipeline_threads() == []
    backup(str(vol), str(repo))
    res = open_point(f"{repo}::default")
    with pytest.raises(type(exc)):
        restore(res.repo, res.point, str(tmp_path / "out.img"), progress=Exploding(2, exc))  # type: ignore[arg-type]
    assert pipeline_threads() == [] and not (tmp_path / "out.img").exists()


def test_a_repository_read_error_is_reported_as_such(tmp_path: Path, repo: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import errno

    from imagechain.stores import local

    vol = tmp_path / "vol.img"
    write_volume(vol, 2 * MiB, seed=6)
    backup(str(vol), str(repo))
    res = open_point(f"{repo}::default")

    def eio(self: object, offset: int, length: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(local._LocalReader, "pread", eio)
    with pytest.raises(RepositoryError) as e:
        restore(res.repo, res.point, str(tmp_path / "out.img"), cat=res.catalog)
    assert "Input/output error" in str(e.value) and ".icimg" in str(e.value)
    assert not (tmp_path / "out.img").exists()


def test_many_frames_and_small_windows_restore_bit_exact(tmp_path: Path, repo: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Index frames of 3 entries, map windows of 5 blocks, chunks of 2 blocks: every boundary is crossed."""
    from imagechain import chain
    from imagechain.format import writer

    monkeypatch.setattr(writer, "INDEX_FRAME_ENTRIES", 3)
    monkeypatch.setattr(chain, "WINDOW_BLOCKS", 5)
    monkeypatch.setattr(backup_mod, "CHUNK_BYTES", 2 * 64 << 10)
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 3 * MiB + 12_345, seed=8))
    digests = {}
    r = backup(str(vol), str(repo))
    digests[r.point_id] = b3(bytes(data))
    for i in range(3):
        change(vol, data, 200_000 * (i + 1) + 70_000 * i, i % 2)
        r = backup(str(vol), str(repo))
        digests[r.point_id] = b3(bytes(data))
    vol.write_bytes(bytes(data[: 2 * MiB + 5]))  # shrink
    r = backup(str(vol), str(repo))
    digests[r.point_id] = b3(bytes(data[: 2 * MiB + 5]))
    vol.write_bytes(bytes(data) + os.urandom(MiB))  # grow
    r = backup(str(vol), str(repo))
    digests[r.point_id] = b3(vol.read_bytes())
    cat = Repository.open(str(repo)).catalog()
    with PointReader(Repository.open(str(repo)).store, cat.points[next(iter(cat.points))]) as rd:
        d = rd.directory()
        assert d is not None and len(d) > 3
    assert verify(Repository.open(str(repo))).ok
    for pid, digest in digests.items():
        assert restored(repo, pid[:8], tmp_path) == digest


def test_integrity_error_is_one_line(repo: Path) -> None:
    assert issubclass(IntegrityError, Exception)
