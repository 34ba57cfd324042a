"""Portable repositories on real exFAT, FAT32 and NTFS filesystems (Debian FUSE drivers over loop
devices): shared disks that move between machines and mount points, split images, hostile names,
cloned machines and chain locks."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imagechain.address import open_point
from imagechain.codec import CodecParams
from imagechain.engine.backup import FAT_SPLIT, BackupResult, backup
from imagechain.engine.restore import restore
from imagechain.engine.verify import verify
from imagechain.errors import IntegrityError, LockedError
from imagechain.identity import local_host
from imagechain.lock import STALE_AFTER, proc_start
from imagechain.names import case_collisions, portability_problems
from imagechain.repository import Repository
from imagechain.sources import open_source
from imagechain.stores.local import filesystem_of

from .conftest import assert_portable, exe, need_tool, restore_as_target_appears, write_volume
from .fsimages import KINDS, fuse_disk

BS = 64 << 10  # the default block size
EXE = Path(sys.executable).parent / "imagechain"


# -- helpers ----------------------------------------------------------------------------------------
def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-c", "from imagechain.cli import main; main()"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def shell(command: str) -> subprocess.CompletedProcess[str]:
    """Run a command line as a user pastes it into a shell, with the venv's imagechain on PATH."""
    env = {**os.environ, "PATH": f"{EXE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=env)


def stamp_ext4(data: bytearray, uuid: bytes) -> bytearray:
    """Make the volume look like ext4 with a fixed UUID, so identical copies share a source identity."""
    data[1024:2048] = bytes(1024)
    data[1024 + 56 : 1024 + 58] = b"\x53\xef"
    data[1024 + 104 : 1024 + 120] = uuid
    return data


def mutate(data: bytes, blocks: list[int], seed: int) -> bytes:
    """The volume with a few bytes of each listed block replaced by random ones."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for b in blocks:
        out[b * BS + 4000 : b * BS + 4000 + 777] = rng.bytes(777)
    assert bytes(out) != data
    return bytes(out)


def restored(tmp_path: Path, address: str, tag: str) -> bytes:
    res = open_point(address)
    out = tmp_path / f"restored-{tag}.img"
    if out.exists():
        out.unlink()
    restore(res.repo, res.point, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def repo_files(repo: Path) -> dict[str, int]:
    return {p.relative_to(repo).as_posix(): p.stat().st_size for p in repo.rglob("*") if p.is_file()}


# -- 1. two machines, one disk, moved to another mount point ---------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("kind", KINDS)
def test_two_machines_share_a_disk_that_moves(tmp_path: Path, kind: str) -> None:
    base = bytes(stamp_ext4(bytearray(write_volume(tmp_path / "seed.img", 4 << 20, seed=11)), b"\x5a" * 16))
    names = ("alpha", "beta")
    vols = {n: tmp_path / n / "disk.img" for n in names}
    hosts = {n: local_host(n) for n in names}
    caches = {"alpha": "", "beta": None}  # beta never has a block-map cache: parents come from the disk
    want: dict[str, list[bytes]] = {n: [] for n in names}
    got: dict[str, list[BackupResult]] = {n: [] for n in names}
    # blocks each machine changes at each later step: different on the two machines
    changes = {"alpha": [[3], [7, 8], [60]], "beta": [[40], [41], [2, 30, 63]]}

    def step(n: str, repo: Path, data: bytes) -> BackupResult:
        vols[n].write_bytes(data)
        want[n].append(data)
        r = backup(str(vols[n]), str(repo), init=True, host=hosts[n], source_name="disk", cache_dir=caches[n])
        got[n].append(r)
        return r

    with fuse_disk(tmp_path, kind) as disk:
        mnt = disk.mount(tmp_path / "media" / "usb")
        repo = mnt / "imagechain"
        for n in names:
            vols[n].parent.mkdir()
            r = step(n, repo, base)
            assert r.kind == "full" and r.sequence == 0 and r.host == n
        assert open_source(str(vols["alpha"])).source_id == open_source(str(vols["beta"])).source_id
        assert got["alpha"][0].chain_id != got["beta"][0].chain_id
        for n in names:
            r = step(n, repo, mutate(want[n][-1], changes[n][0], seed=len(n)))
            assert (r.kind, r.sequence, r.chain_id) == ("incremental", 1, got[n][0].chain_id)
            assert r.changed_blocks == len(changes[n][0])

        # the disk goes to another machine, where it is mounted somewhere else
        disk.unmount()
        assert not (repo / "imagechain.json").exists()
        mnt2 = disk.mount(tmp_path / "run" / "media" / "someone" / "BACKUP DISK")
        repo2 = mnt2 / "imagechain"
        assert filesystem_of(str(repo2)) == kind
        for i in (1, 2):
            for n in names:
                r = step(n, repo2, mutate(want[n][-1], changes[n][i], seed=10 * i + len(n)))
                assert (r.kind, r.sequence, r.chain_id) == ("incremental", i + 1, got[n][0].chain_id), r
                assert r.changed_blocks == len(changes[n][i]), r
                assert r.stored_bytes <= len(changes[n][i]) * BS

        cat = Repository.open(str(repo2)).catalog()
        assert not cat.problems and not cat.leftovers
        assert len(cat.generations()) == 2
        for n in names:
            for seq, data in enumerate(want[n]):
                res = open_point(f"{repo2}::{n}/disk/default@{seq}")
                assert str(res.point.point_id) == got[n][seq].point_id
                assert restored(tmp_path, f"{repo2}::{n}/disk/default@{seq}", f"{n}{seq}") == data, (n, seq)
        assert want["alpha"][-1] != want["beta"][-1]
        report = verify(Repository.open(str(repo2)))
        assert report.ok and len(report.points) == 8, report.as_dict()
        assert_portable(repo2)


# -- 2. FAT32 with segments smaller than a point ---------------------------------------------------
def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swapping")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _move_data(src: Path, dst: Path) -> None:
    """Move a file across filesystems, contents only (fusefat implements no chmod: shutil.move fails)."""
    shutil.copyfile(src, dst)
    src.unlink()


def _refused(tmp_path: Path, repo: Path, point_id: str, first_segment: Path, named: list[str]) -> None:
    """The point is reported as unusable, naming the files in `named`, and nothing restores it."""
    cat = Repository.open(str(repo)).catalog()
    whys = [why for _files, why in [*cat.problems, *cat.damaged.values()] if point_id[:8] in why]
    assert len(whys) == 1, (cat.problems, cat.damaged)
    for name in named:
        assert name in whys[0], whys[0]
    report = verify(Repository.open(str(repo)))
    assert not report.ok
    assert not [p for p in report.points if p.point_id == point_id]  # not checked as if it were whole
    assert any(whys[0] in line for line in report.incomplete), report.incomplete
    v = cli("verify", str(repo))
    assert v.returncode == 7, v
    for name in named:
        assert name in v.stdout, v.stdout

    # a footer was written once: the point is damaged (exit 7), by its id and by any of its files
    with pytest.raises(IntegrityError) as ei:
        open_point(f"{repo}::{point_id[:8]}")
    assert "damaged" in str(ei.value)
    with pytest.raises(IntegrityError) as ei:
        open_point(str(first_segment))
    for name in named:
        assert name in str(ei.value)

    fresh = tmp_path / "must-not-exist.img"
    r = cli("restore", str(first_segment), str(fresh))
    assert r.returncode != 0 and not fresh.exists(), r
    assert named[0] in r.stderr, r.stderr
    existing = tmp_path / "existing.img"
    existing.write_bytes(b"precious" * 1000)
    r = cli("restore", "--force", f"{repo}::alpha/disk/default", str(existing))
    assert r.returncode != 0 and existing.read_bytes() == b"precious" * 1000, r
    existing.unlink()


@pytest.mark.root
def test_fat32_split_points(tmp_path: Path) -> None:
    split = 1 << 20
    data = np.random.default_rng(5).bytes(6 << 20)  # incompressible: the point is bigger than the volume
    vol = tmp_path / "disk.img"
    vol.write_bytes(data)
    with fuse_disk(tmp_path, "vfat") as disk:
        mnt = disk.mount(tmp_path / "usb")
        repo = mnt / "repo"
        r = backup(str(vol), str(repo), init=True, split_size=split, codec=CodecParams.parse("none"),
                   host=local_host("alpha"), source_name="disk")  # fmt: skip
        assert len(r.files) >= 7, r.files
        sizes = repo_files(repo)
        assert max(sizes.values()) <= split, sizes
        assert sum(sizes[f] for f in r.files) > len(data)
        segs = [repo / f for f in r.files]
        assert open_point(f"{repo}::{r.point_id[:8]}").point.header.split_size == split
        assert restored(tmp_path, f"{repo}::alpha/disk/default", "whole") == data

        # any segment file addresses the point, through the library and the CLI
        for i in (0, 3, len(segs) - 1):
            assert str(open_point(str(segs[i])).point.point_id) == r.point_id
        out = tmp_path / "from-segment-3.img"
        res = cli("restore", str(segs[3]), str(out))
        assert res.returncode == 0, res
        assert out.read_bytes() == data
        out.unlink()

        # segments moved to another folder of the repository are still found
        elsewhere = repo / "elsewhere"
        elsewhere.mkdir()
        moved = [segs[1], segs[4], segs[-1]]  # the last one holds the footer
        for p in moved:
            p.rename(elsewhere / p.name)
        assert str(open_point(str(elsewhere / segs[4].name)).point.point_id) == r.point_id
        assert str(open_point(str(segs[0])).point.point_id) == r.point_id
        assert verify(Repository.open(str(repo))).ok
        assert restored(tmp_path, f"{repo}::{r.point_id[:8]}", "moved") == data
        for p in moved:
            (elsewhere / p.name).rename(p)

        # a missing segment is named, and nothing restores
        stash = tmp_path / segs[3].name
        _move_data(segs[3], stash)
        _refused(tmp_path, repo, r.point_id, segs[0], [segs[3].name])
        _move_data(stash, segs[3])
        assert verify(Repository.open(str(repo))).ok

        # two segments swapped (each file under the other's name): assembled by their headers, the
        # names reported as wrong
        _swap(segs[2], segs[3])
        cat = Repository.open(str(repo)).catalog()
        wrong = [n for n in cat.notices if "misnamed" in n]
        assert len(wrong) == 2 and all(any(s.name in n for n in wrong) for s in segs[2:4]), cat.notices
        assert restored(tmp_path, f"{repo}::{r.point_id[:8]}", "swapped") == data
        listing = subprocess.run([exe(), "list", str(repo)], capture_output=True, text=True)
        assert "misnamed" in listing.stderr, listing.stderr
        _swap(segs[2], segs[3])
        assert verify(Repository.open(str(repo))).ok
        assert restored(tmp_path, f"{repo}::{r.point_id[:8]}", "after") == data
        assert_portable(repo)


# -- 3. which filesystem, and automatic splitting on FAT ------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("kind", KINDS)
def test_filesystem_detection_and_automatic_split(tmp_path: Path, kind: str) -> None:
    vol = tmp_path / "disk.img"
    data = write_volume(vol, 1 << 20, seed=3)
    with fuse_disk(tmp_path, kind) as disk:
        mnt = disk.mount(tmp_path / "My Passport")  # mountinfo escapes the space
        repo = mnt / "repo"
        assert filesystem_of(str(mnt)) == kind
        assert filesystem_of(str(repo / "not" / "yet")) == kind
        assert filesystem_of(str(tmp_path)) not in KINDS
        auto = FAT_SPLIT if kind == "vfat" else 0
        host = local_host("alpha")

        def split_of(r: BackupResult) -> int:
            return open_point(f"{repo}::{r.point_id[:8]}").point.header.split_size

        r0 = backup(str(vol), str(repo), init=True, host=host)
        assert Repository.open(str(repo)).store.filesystem() == kind
        assert split_of(r0) == auto
        r1 = backup(str(vol), str(repo), init=True, host=host)
        assert r1.kind == "incremental" and split_of(r1) == auto
        assert split_of(backup(str(vol), str(repo), init=True, host=host, chain="zero", split_size=0)) == auto
        huge = 8 << 30
        assert split_of(backup(str(vol), str(repo), init=True, host=host, chain="huge", split_size=huge)) == (
            FAT_SPLIT if kind == "vfat" else huge
        )
        info = cli("info", "--json", f"{repo}::alpha/disk.img/default")
        assert info.returncode == 0, info
        assert json.loads(info.stdout)["split_size"] == auto
        assert restored(tmp_path, f"{repo}::alpha/disk.img/huge", "huge") == data


@pytest.mark.root
@pytest.mark.parametrize("kind", KINDS)
def test_restore_onto_the_filesystem(tmp_path: Path, kind: str) -> None:
    """A restore to a new file, a delta restore and a forced one, onto each filesystem, over the stale data of
    deleted files. fusefat refuses ftruncate, and a file it extends by a write began with a stale sector:
    the volume starts with a zero block, which a restore that trusted holes would leave stale."""
    rng = np.random.default_rng(12)
    blocks = [bytes(BS) if i in (0, 3, 4, 9, 15) else rng.bytes(BS) for i in range(16)]
    v0 = b"".join(blocks)
    v1 = mutate(v0, [1, 7, 14], seed=13)
    vol = tmp_path / "disk.img"
    repo = tmp_path / "repo"
    vol.write_bytes(v0)
    backup(str(vol), str(repo), init=True)
    vol.write_bytes(v1)
    assert backup(str(vol), str(repo)).kind == "incremental"
    with fuse_disk(tmp_path, kind) as disk:
        mnt = disk.mount(tmp_path / "usb")
        with open(mnt / "deleted", "wb") as f:
            f.write(b"\xaa" * (24 << 20))
            os.fsync(f.fileno())
        (mnt / "deleted").unlink()
        out = mnt / "restored.img"
        for args, want in ((["restore", f"{repo}::default@0", str(out)], v0),
                           (["restore", f"{repo}::default", str(out), "--delta"], v1),
                           (["restore", f"{repo}::default@0", str(out), "--force"], v0)):  # fmt: skip
            res = cli(*args)
            assert res.returncode == 0, res
            assert out.read_bytes() == want, args
        os.truncate(out, 5 * BS)  # a delta restore onto a shorter file extends it first
        res = cli("restore", f"{repo}::default", str(out), "--delta")
        assert res.returncode == 0, res
        assert out.read_bytes() == v1
        assert sorted(p.name for p in mnt.iterdir()) == ["restored.img"]

        # a target that appears while restoring is never replaced (FAT and exFAT have no hard links)
        _error, kept = restore_as_target_appears(f"{repo}::default@0", mnt / "late.img")
        assert kept.read_bytes() == v0


@pytest.mark.root
def test_a_volume_too_big_for_fat32_is_refused_before_a_byte_is_written(tmp_path: Path) -> None:
    """fusefat would fail the first write past 4 GiB with a bare EPERM; said at once instead."""
    need_tool("qemu-img")
    vol = tmp_path / "big.img"
    with open(vol, "wb") as f:  # 5 GiB, nearly all hole: backed up in a moment
        f.truncate(5 << 30)
        for at in (0, 3 << 30, (5 << 30) - BS):
            f.seek(at)
            f.write(os.urandom(BS))
    repo = tmp_path / "repo"
    backup(str(vol), str(repo), init=True)
    vol.unlink()
    with fuse_disk(tmp_path, "vfat") as disk:
        mnt = disk.mount(tmp_path / "usb")
        (mnt / "existing.img").write_bytes(b"x" * 4096)
        for name, extra in (("new.img", []), ("existing.img", ["--force"])):
            res = cli("restore", f"{repo}::default", str(mnt / name), *extra)
            assert res.returncode == 8, res
            assert res.stderr.strip() == (f"imagechain: error: restore target {mnt / name} is on a FAT filesystem, "
                                          f"whose files hold at most 4 GiB - 1 byte; the volume is 5.0 GiB: restore "
                                          f"to another filesystem (exFAT and NTFS have no such limit)"), res.stderr
        # a raw export is as big as the volume; the other formats are not refused
        res = cli("export", f"{repo}::default", str(mnt / "big.raw"), "--format", "raw")
        assert res.returncode == 8 and "is on a FAT filesystem" in res.stderr and "as qcow2" in res.stderr, res
        assert sorted(p.name for p in mnt.iterdir()) == ["existing.img"]
        assert (mnt / "existing.img").read_bytes() == b"x" * 4096


# -- 4. hostile names ------------------------------------------------------------------------------
LONG = ("Łong name, " * 30)[:300]
EMOJI = "💾 Ünïcødé 🦆"


@pytest.mark.root
@pytest.mark.parametrize("kind", KINDS)
def test_hostile_names(tmp_path: Path, kind: str) -> None:
    assert len(LONG) == 300
    combos = [  # (host, source, chain); each of these names in each role it may take
        ("C:\\x", "a\\b", "Daily"),
        ("C:\\x", "a\\b", "daily"),
        ("...", "NUL.txt", "..."),
        ("con", EMOJI, "con"),
        ("Alpha", LONG, "a\\b"),
        ("alpha", LONG, "a\\b"),
        (LONG, "...", EMOJI),
        ("NUL.txt", "C:\\x", "NUL.txt"),
        (EMOJI, "con", "C:\\x"),
        ("x", "y", LONG),
    ]
    vol = tmp_path / "vol.img"
    first = write_volume(vol, 256 << 10, seed=8)
    with fuse_disk(tmp_path, kind) as disk:
        repo = disk.mount(tmp_path / "usb") / "repo"
        results = {}
        for h, s, c in combos:
            r = backup(str(vol), str(repo), init=True, host=local_host(h), source_name=s, chain=c)
            assert r.kind == "full" and (r.host, r.source, r.chain) == (h, s, c)
            results[(h, s, c)] = r
        # case variants are separate chains, in separate folders
        daily, Daily = results[("C:\\x", "a\\b", "daily")], results[("C:\\x", "a\\b", "Daily")]
        assert daily.chain_id != Daily.chain_id
        assert os.path.dirname(daily.files[0]) != os.path.dirname(Daily.files[0])
        alpha, Alpha = results[("alpha", LONG, "a\\b")], results[("Alpha", LONG, "a\\b")]
        assert alpha.chain_id != Alpha.chain_id
        assert alpha.files[0].split("/")[0] != Alpha.files[0].split("/")[0]

        # each continues its own chain: a change backed up into "Daily" only
        second = mutate(first, [1], seed=1)
        vol.write_bytes(second)
        r = backup(str(vol), str(repo), init=True, host=local_host("C:\\x"), source_name="a\\b", chain="Daily")
        assert (r.kind, r.chain_id, r.changed_blocks) == ("incremental", Daily.chain_id, 1)
        r = backup(str(vol), str(repo), init=True, host=local_host("alpha"), source_name=LONG, chain="a\\b")
        assert (r.kind, r.chain_id) == ("incremental", alpha.chain_id)

        rels = list(repo_files(repo))
        for rel in rels:
            assert not portability_problems(rel), (rel, portability_problems(rel))
        assert not case_collisions(rels)
        assert_portable(repo)

        listed = cli("list", str(repo), "--json")
        assert listed.returncode == 0, listed
        doc = json.loads(listed.stdout)
        assert not doc["incomplete"] and not doc["leftovers"]
        chains = {(p[0]["host"], p[0]["source"], p[0]["chain"]): [q["point_id"] for q in p] for p in doc["chains"]}
        assert set(chains) == set(combos)
        assert chains[("C:\\x", "a\\b", "Daily")] == [Daily.point_id, chains[("C:\\x", "a\\b", "Daily")][1]]
        assert chains[("C:\\x", "a\\b", "daily")] == [daily.point_id]
        assert len(chains[("alpha", LONG, "a\\b")]) == 2 and len(chains[("Alpha", LONG, "a\\b")]) == 1

        for key, r0 in results.items():
            assert restored(tmp_path, f"{repo}::{r0.point_id[:8]}", "p") == first, key
        daily_1 = chains[("C:\\x", "a\\b", "Daily")][1]
        assert restored(tmp_path, f"{repo}::{daily_1[:8]}", "d1") == second


# -- 5. cloned machines ----------------------------------------------------------------------------
def test_cloned_machines_keep_separate_chains(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the same disk at the same path with the same content, the same host name: only the machine differs
    vol = tmp_path / "vda.img"
    v0 = bytes(stamp_ext4(bytearray(write_volume(vol, 2 << 20, seed=21)), b"\x11" * 16))
    vol.write_bytes(v0)

    def as_machine(mid: str, data: bytes) -> BackupResult:
        monkeypatch.setenv("IMAGECHAIN_MACHINE_ID", mid)
        vol.write_bytes(data)
        return backup(str(vol), str(repo), init=True)

    a0 = as_machine("clone-a", v0)
    b0 = as_machine("clone-b", v0)
    assert a0.kind == "full" and b0.kind == "full", (a0, b0)
    assert a0.host == b0.host  # the same host name
    assert a0.chain_id != b0.chain_id
    a1_data, b1_data = mutate(v0, [4], seed=1), mutate(v0, [20, 21], seed=2)
    b1 = as_machine("clone-b", b1_data)
    a1 = as_machine("clone-a", a1_data)
    assert (b1.kind, b1.chain_id, b1.sequence, b1.changed_blocks) == ("incremental", b0.chain_id, 1, 2)
    assert (a1.kind, a1.chain_id, a1.sequence, a1.changed_blocks) == ("incremental", a0.chain_id, 1, 1)
    cat = Repository.open(str(repo)).catalog()
    assert len(cat.generations()) == 2
    ids = {}
    for mid in ("clone-a", "clone-b"):
        monkeypatch.setenv("IMAGECHAIN_MACHINE_ID", mid)
        ids[mid] = local_host().host_id
    assert ids["clone-a"] != ids["clone-b"]
    by_chain = {str(pts[0].header.chain_id): {p.header.host_id for p in pts} for pts in cat.generations().values()}
    assert by_chain == {a0.chain_id: {ids["clone-a"]}, b0.chain_id: {ids["clone-b"]}}
    for r, data in ((a0, v0), (b0, v0), (a1, a1_data), (b1, b1_data)):
        assert restored(tmp_path, f"{repo}::{r.point_id[:8]}", r.point_id[:8]) == data


# -- 6. locks --------------------------------------------------------------------------------------
HOLDER = r"""
import sys, time
from imagechain.engine.backup import backup
from imagechain.identity import local_host

class Hold:  # stops the backup in the middle, with the chain lock held and a temporary file written
    def start(self, label, total):
        print("holding", flush=True)
        time.sleep(600)
    def advance(self, n): pass
    def stop(self): pass
    def notice(self, m): pass

backup(sys.argv[1], sys.argv[2], init=True, host=local_host("alpha"), progress=Hold())
"""


def _wait_line(proc: subprocess.Popen[str], want: str, timeout: float = 60) -> None:
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError(f"the holder did not start in {timeout} s")
    line = proc.stdout.readline()
    assert line.strip() == want, (line, proc.stderr.read() if proc.stderr else "")


def _lock_files(repo: Path) -> list[Path]:
    return sorted((repo / "locks").glob("*.lock"))


@pytest.mark.root
def test_lock_of_a_killed_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = tmp_path / "disk.img"
    data = write_volume(vol, 2 << 20, seed=4)
    with fuse_disk(tmp_path, "vfat") as disk:
        repo = disk.mount(tmp_path / "USB DISK") / "my repo"  # a path that needs quoting in a shell
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(vol), str(repo)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            _wait_line(proc, "holding")
            locks = _lock_files(repo)
            assert len(locks) == 1
            held = json.loads(locks[0].read_text())
            assert held["pid"] == proc.pid and held["machine"] == "test-machine-0"
            assert set(held) >= {"host", "machine", "pid", "pid_start", "since", "refreshed_unix", "what", "command"}

            # live: refused, and the lock stays
            r = cli("backup", str(vol), str(repo), "--host", "alpha")
            assert r.returncode == 9, r
            assert "break-lock" not in r.stderr, r.stderr
            lock_id = locks[0].stem
            r = cli("break-lock", str(repo), lock_id)
            assert r.returncode != 0, r
            assert locks[0].exists()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()

        # the process is gone: the next backup removes its lock without asking, says so, and goes on
        r = cli("backup", str(vol), str(repo), "--host", "alpha", "--json")
        assert r.returncode == 0, r
        res = json.loads(r.stdout)
        removed = [n for n in res["notices"] if n.startswith("removed a stale lock")]
        assert len(removed) == 1 and f"left by pid {proc.pid} on " in removed[0], res["notices"]
        assert res["kind"] == "full"  # the killed backup published nothing
        assert "interrupted" in r.stderr  # and its temporary file was cleaned up
        assert not _lock_files(repo)

        # a lock of another machine, unchanged for STALE_AFTER as seen from here, is reported with a command
        # that works as pasted into a shell, on this path too
        monkeypatch.setenv("IMAGECHAIN_LOCK_STALE_AFTER", "0.5")
        locks[0].write_text(json.dumps({"host": "beta", "machine": "other-machine", "pid": 1, "refresh": 7}))
        r = cli("backup", str(vol), str(repo), "--host", "alpha")
        assert r.returncode == 9 and "break-lock" not in r.stderr, r  # first sight: live
        time.sleep(0.6)
        r = cli("backup", str(vol), str(repo), "--host", "alpha")
        assert r.returncode == 9 and "stale lock" in r.stderr, r
        assert locks[0].exists()
        command = re.search(r"imagechain break-lock .*$", r.stderr.strip())  # as the user sees it
        assert command is not None and lock_id in command.group(0), r.stderr
        r = shell(command.group(0))
        assert r.returncode == 0, (command.group(0), r)
        assert not locks[0].exists()
        cat = Repository.open(str(repo)).catalog()
        assert not cat.leftovers and not cat.problems and len(cat.points) == 1
        assert not _lock_files(repo)
        assert restored(tmp_path, f"{repo}::alpha/disk.img/default", "after-lock") == data


def _write_lock(repo: Path, vol: Path, **info: object) -> Path:
    name = Repository.lock_name(local_host("alpha").host_id, open_source(str(vol)).source_id, "default")
    path = repo / name
    path.parent.mkdir(exist_ok=True)
    body = {"host": "alpha", "machine": "test-machine-0", "pid": 0, "pid_start": "",
            "since": "2026-01-01T00:00:00+00:00", "refreshed_unix": time.time(),
            "what": "chain 'default' of disk.img on alpha", "command": "imagechain backup"} | info  # fmt: skip
    path.write_text(json.dumps(body))
    return path


def _expect_live(repo: Path, vol: Path, lock: Path) -> None:
    before = lock.read_bytes()
    r = cli("backup", str(vol), str(repo), "--host", "alpha")
    assert r.returncode == 9, r
    assert "break-lock" not in r.stderr
    r = cli("break-lock", str(repo), lock.stem)
    assert r.returncode != 0 and "live" in r.stderr, r
    assert lock.read_bytes() == before


def _expect_stale(repo: Path, vol: Path, lock: Path) -> None:
    with pytest.raises(LockedError) as ei:
        backup(str(vol), str(repo), init=True, host=local_host("alpha"))
    assert lock.exists()
    command = re.search(r"imagechain break-lock .*$", str(ei.value))
    assert command is not None and lock.stem in command.group(0), str(ei.value)
    r = shell(command.group(0))
    assert r.returncode == 0, r
    assert not lock.exists()


def test_live_and_stale_locks(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = tmp_path / "disk.img"
    write_volume(vol, 1 << 20, seed=6)
    assert backup(str(vol), str(repo), init=True, host=local_host("alpha")).kind == "full"

    # a live process of this machine
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        lock = _write_lock(repo, vol, pid=sleeper.pid, pid_start=proc_start(sleeper.pid))
        _expect_live(repo, vol, lock)
        r = cli("break-lock", str(repo))  # lists locks
        assert r.returncode == 0 and f"{lock.stem}: live" in r.stdout, r
    finally:
        sleeper.kill()
        sleeper.wait()
    # ...which has ended: stale, without --force
    _expect_stale(repo, vol, lock)

    # a dead process of this machine
    gone = subprocess.Popen(["true"])
    gone.wait()
    _expect_stale(repo, vol, _write_lock(repo, vol, pid=gone.pid, pid_start=""))
    # our pid, but started at another time: a reused pid
    _expect_stale(repo, vol, _write_lock(repo, vol, pid=os.getpid(), pid_start="1"))

    # another machine: its pid means nothing here, only how recently it refreshed the lock
    other = {"machine": "other-machine", "host": "alpha"}
    lock = _write_lock(repo, vol, pid=gone.pid, refreshed_unix=time.time() - 30, **other)
    _expect_live(repo, vol, lock)
    lock = _write_lock(repo, vol, pid=gone.pid, refreshed_unix=time.time() - STALE_AFTER - 300, **other)
    _expect_live(repo, vol, lock)  # its clock is not ours: an old refresh time says nothing on first sight
    r = cli("break-lock", "--force", str(repo), lock.stem)
    assert r.returncode == 0 and not lock.exists(), r
    # stale once it has not changed for STALE_AFTER as seen from here
    monkeypatch.setenv("IMAGECHAIN_LOCK_STALE_AFTER", "3")
    lock = _write_lock(repo, vol, pid=os.getpid(), **other)
    _expect_live(repo, vol, lock)  # two looks (backup, break-lock) well within 3 s
    time.sleep(3.1)
    _expect_stale(repo, vol, lock)

    r = backup(str(vol), str(repo), init=True, host=local_host("alpha"))
    assert r.kind == "incremental" and r.sequence == 1
    assert not _lock_files(repo)
