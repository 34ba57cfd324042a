"""Safe to operate: names that stay addressable, cloned disks, sources that change while read, the newest
point damaged, restores that cannot destroy the backup they read, errors a script can parse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imagechain.address import open_point
from imagechain.engine.backup import backup
from imagechain.engine.restore import restore
from imagechain.errors import SourceError, TargetError, UsageError
from imagechain.repository import Repository

from .conftest import error_lines, exe, write_volume

MiB = 1 << 20


def ic(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, timeout=120, env=dict(os.environ))


def one_line(p: subprocess.CompletedProcess[str], code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    (line,) = error_lines(p.stderr)
    return line


@pytest.mark.parametrize(("option", "value"), [("--chain", "a/b"), ("--chain", "x@-1"), ("--chain", ""),
                                               ("--host", ""), ("--source-name", "a::b"), ("--chain", "..")])
def test_names_that_cannot_be_addressed_are_refused(tmp_path: Path, repo: Path, option: str, value: str) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, MiB, seed=1)
    line = one_line(ic("backup", vol, repo, option, value), 2)
    assert "name" in line and "without '/', '@', '::'" in line, line
    assert not list(repo.rglob("*.icimg")) if repo.exists() else True


def test_a_cloned_disk_does_not_continue_the_original_chain(tmp_path: Path, repo: Path) -> None:
    vol, clone = tmp_path / "vol.img", tmp_path / "clone.img"
    data = bytearray(write_volume(vol, 2 * MiB, seed=2))
    data[1024 + 56 : 1024 + 58] = b"\x53\xef"  # an ext4 superblock magic and UUID: the filesystem identity
    data[1024 + 104 : 1024 + 120] = bytes(range(16))
    vol.write_bytes(data)
    first = backup(str(vol), str(repo))
    shutil.copyfile(vol, clone)
    with open(clone, "r+b") as f:  # the clone then lives its own life
        f.seek(MiB)
        f.write(os.urandom(70_000))
    line = one_line(ic("backup", clone, repo), 3)
    assert "--source-name" in line and "--source-moved" in line and "clone" in line, line
    own = json.loads(ic("backup", clone, repo, "--source-name", "clone", "--json").stdout)
    assert own["kind"] == "full" and own["chain_id"] != first.chain_id
    # the original still continues its own chain, and a rename of the file changes nothing
    moved = tmp_path / "renamed.img"
    vol.rename(moved)
    r = backup(str(moved), str(repo))
    assert r.kind == "incremental" and r.chain_id == first.chain_id
    # the same volume copied into place (say, restored from elsewhere) continues only when told so
    shutil.copyfile(moved, vol)
    with pytest.raises(SourceError):
        backup(str(vol), str(repo))
    r = backup(str(vol), str(repo), source_moved=True)
    assert r.kind == "incremental" and r.chain_id == first.chain_id and r.changed_blocks == 0
    assert backup(str(vol), str(repo)).kind == "incremental"  # the new identity is the chain's now


def test_a_source_that_changes_size_while_read_publishes_nothing(tmp_path: Path, repo: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from imagechain.engine import backup as backup_mod

    vol = tmp_path / "vol.img"
    write_volume(vol, 4 * MiB, seed=3)
    orig = backup_mod._run

    def growing(*a: object, **k: object) -> object:
        out = orig(*a, **k)  # type: ignore[arg-type]
        with open(vol, "ab") as f:
            f.write(b"x" * 4096)
        return out

    monkeypatch.setattr(backup_mod, "_run", growing)
    with pytest.raises(SourceError) as e:
        backup(str(vol), str(repo))
    assert e.value.exit_code == 3 and "changed size while being read" in str(e.value)
    assert not list(repo.rglob("*.icimg")) and not list(repo.rglob("*.tmp-*"))


def test_a_source_written_while_read_is_flagged_in_the_point(tmp_path: Path, repo: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from imagechain.engine import backup as backup_mod

    vol = tmp_path / "vol.img"
    write_volume(vol, 4 * MiB, seed=4)
    orig = backup_mod._run

    def written(*a: object, **k: object) -> object:
        out = orig(*a, **k)  # type: ignore[arg-type]
        with open(vol, "r+b") as f:
            f.write(b"changed")
        return out

    monkeypatch.setattr(backup_mod, "_run", written)
    r = backup(str(vol), str(repo))
    assert any("modified while being read" in n for n in r.notices), r.notices
    info = json.loads(ic("info", f"{repo}::{r.point_id[:8]}", "--json").stdout)
    assert any("use a snapshot" in w for w in info["summary"]["warnings"]), info["summary"]


def test_restore_never_falls_back_silently_when_the_newest_point_is_damaged(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 2 * MiB, seed=5))
    r0 = backup(str(vol), str(repo))
    data[:100] = os.urandom(100)
    vol.write_bytes(data)
    r1 = backup(str(vol), str(repo))
    newest = repo / r1.files[0]
    raw = bytearray(newest.read_bytes())
    raw[64 + 200] ^= 1  # inside the point header's metadata: its checksum fails
    newest.write_bytes(raw)
    out = tmp_path / "out.img"
    line = one_line(ic("restore", f"{repo}::default", out), 7)
    assert newest.name in line and "damaged" in line and r0.point_id[:8] in line, line
    assert not out.exists()
    line = one_line(ic("restore", f"{repo}::default@-1", out), 7)  # counting from the newest too
    assert newest.name in line, line
    # the last sound point, asked for by its id, restores
    assert ic("restore", f"{repo}::{r0.point_id[:8]}", out).returncode == 0


def test_restore_refuses_to_overwrite_the_repository(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, 2 * MiB, seed=6)
    r = backup(str(vol), str(repo))
    own = repo / r.files[0]
    before = own.read_bytes()
    res = open_point(f"{repo}::default")
    with pytest.raises(TargetError) as e:
        restore(res.repo, res.point, str(own), force=True)
    assert "repository" in str(e.value)
    link = tmp_path / "elsewhere.icimg"
    os.link(own, link)  # the same file under another name, outside the repository
    line = one_line(ic("restore", f"{repo}::default", link, "--force"), 8)
    assert "repository file" in line, line
    assert own.read_bytes() == before
    line = one_line(ic("restore", f"{repo}::default", repo / "restored.img"), 8)  # nor a new file in it
    assert "inside the repository" in line and not (repo / "restored.img").exists(), line


def test_json_errors_are_json_on_stdout(tmp_path: Path, repo: Path) -> None:
    p = ic("restore", f"{tmp_path}/nowhere::default", tmp_path / "x.img", "--json")
    assert p.returncode in (4, 5) and p.stderr.strip().startswith("imagechain: error:")
    doc = json.loads(p.stdout)["error"]
    assert doc["exit_code"] == p.returncode and doc["message"] in p.stderr and doc["kind"].endswith("Error")


def test_a_bad_name_is_refused_before_anything_is_opened(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        backup(str(tmp_path / "missing.img"), str(tmp_path / "r"), chain="a/b")  # not "source not found"
    assert not (tmp_path / "r").exists()


# -- mounted volumes are never imaged or overwritten silently (real loop devices and ext4 mounts) ------


def test_a_mounted_read_write_source_is_refused_without_a_snapshot_unless_allowed(tmp_path: Path, repo: Path) -> None:
    from .conftest import loop_device
    from .test_mounts import ext4_image, mounted

    img = ext4_image(tmp_path / "fs.img", 8 * MiB)
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt") as umount:
        (tmp_path / "mnt" / "file").write_bytes(os.urandom(100_000))
        for source in (img, dev):  # the image file behind the mounted loop device, and the device itself
            line = one_line(ic("backup", source, repo, "--snapshot", "none"), 3)
            assert "mounted read-write" in line and "--allow-mounted" in line and "--snapshot auto" in line, line
        assert not list(repo.rglob("*.icimg")) if repo.exists() else True
        r = json.loads(ic("backup", dev, repo, "--snapshot", "none", "--allow-mounted", "--json").stdout)
        assert any("may not be consistent" in n for n in r["notices"]) or r["kind"] == "full"
        info = json.loads(ic("info", f"{repo}::{r['point_id'][:8]}", "--json").stdout)
        assert any("mounted read-write while it was read" in w for w in info["warnings"]), info["warnings"]
        text = ic("info", f"{repo}::{r['point_id'][:8]}").stdout
        assert "mounted read-write while it was read" in text
        umount()
        subprocess.run(["mount", "-o", "ro", dev, str(tmp_path / "mnt")], check=True)
        try:  # read-only: nothing changes while it is read, so it is fine
            ok = ic("backup", dev, repo, "--json")
            assert ok.returncode == 0, ok.stderr
        finally:
            subprocess.run(["umount", str(tmp_path / "mnt")], check=False)


def test_restore_onto_a_mounted_target_is_refused_even_with_force(tmp_path: Path, repo: Path) -> None:
    from .conftest import loop_device
    from .test_mounts import ext4_image, mounted

    img = ext4_image(tmp_path / "fs.img", 8 * MiB)
    src = tmp_path / "src.img"
    write_volume(src, 8 * MiB, seed=9)
    backup(str(src), str(repo))
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt", "-o", "ro"):
        before = img.read_bytes()
        for target in (dev, img):  # the mounted device, and the file behind it
            for flags in (["--force"], ["--delta"], ["--force", "--delta"]):
                line = one_line(ic("restore", f"{repo}::default", target, *flags), 8)
                assert "is in use" in line and "--overwrite-mounted" in line, line
        assert img.read_bytes() == before
    # unmounted: a plain --force restore goes through
    with loop_device(img) as dev:
        ok = ic("restore", f"{repo}::default", dev, "--force")
        assert ok.returncode == 0, ok.stderr


# -- repositories are what they claim to be; errors name their cause ---------------------------------


def test_verify_and_list_of_a_folder_that_is_no_repository(tmp_path: Path) -> None:
    empty = tmp_path / "mnt"
    empty.mkdir()
    for cmd in (("verify", empty), ("list", empty), ("restore", f"{empty}::default", tmp_path / "o.img")):
        line = one_line(ic(*cmd), 4)
        assert "not an imagechain repository" in line and "mounted" in line, line


def test_break_lock_takes_only_lock_ids(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, MiB, seed=10)
    backup(str(vol), str(repo))
    victim = tmp_path / "victim.lock"
    victim.write_text("precious")
    for bad in ("../../victim", "../victim", "x", "0123abcd-0123abcd-0123abc/"):
        line = one_line(ic("break-lock", repo, bad), 2)
        assert "not a lock id" in line, line
    assert victim.read_text() == "precious"


def test_unfinished_published_segments_are_cleared_by_the_next_backup(tmp_path: Path, repo: Path) -> None:
    """Segments renamed into place whose point never got its footer segment (the temporary is gone too):
    verify fails on them; the next backup of the chain removes them, says so, and verify is clean again."""
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(4 * MiB))
    r = backup(str(vol), str(repo), split_size=MiB)
    assert len(r.files) >= 4
    for name in r.files:  # make it look like a point whose last rename never happened, temporaries lost
        if name == r.files[-1]:
            (repo / name).unlink()
    for name in r.files[:-1]:
        os.rename(repo / name, repo / name.replace(r.point_id[:8], "feedf00d"))
    fake = [n.replace(r.point_id[:8], "feedf00d") for n in r.files[:-1]]
    p = ic("verify", repo)
    assert p.returncode == 7, p.stdout
    res = json.loads(ic("backup", vol, repo, "--json").stdout)
    assert any("never finished" in n and all(f in n for f in fake) for n in res["notices"]), res["notices"]
    assert not any((repo / f).exists() for f in fake)
    assert ic("verify", repo).returncode == 0


def test_a_repository_whose_disk_went_away_is_a_repository_error(tmp_path: Path) -> None:
    import signal as sig

    from .fsimages import _daemons, fuse_disk

    vol = tmp_path / "vol.img"
    write_volume(vol, MiB, seed=11)
    with fuse_disk(tmp_path, "exfat") as disk:
        mnt = disk.mount(tmp_path / "usb")
        repo = mnt / "repo"
        assert ic("backup", vol, repo, "--init").returncode == 0
        for pid in _daemons(str(mnt)):  # the FUSE driver dies: "Transport endpoint is not connected"
            os.kill(pid, sig.SIGKILL)
        for cmd in (("list", repo), ("verify", repo), ("backup", vol, repo)):
            line = one_line(ic(*cmd), 4)
            assert str(mnt) in line or "repository" in line, line
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        disk.mountpoint = None


def test_a_write_refused_at_a_size_cap_starts_a_new_segment(tmp_path: Path, repo: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """fusefat answers EPERM at 2 GiB: such a refusal at a known cap continues in a new segment (a cap of
    3 MiB stands in for 2 GiB here); the same error elsewhere is still an error."""
    import errno

    from imagechain.stores import local

    cap = 3 * MiB
    monkeypatch.setattr(local, "SIZE_CAPS", (cap,))
    real_write = os.write

    def capped(fd: int, data: bytes | memoryview) -> int:
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        if os.fstat(fd).st_size and pos + len(data) > cap and "icimg" in os.readlink(f"/proc/self/fd/{fd}"):
            if pos >= cap:
                raise OSError(errno.EPERM, "Operation not permitted")
            data = memoryview(data)[: cap - pos]
        return real_write(fd, data)

    monkeypatch.setattr(local.os, "write", capped)
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(8 * MiB))
    r = backup(str(vol), str(repo))
    assert len(r.files) >= 3 and all((repo / f).stat().st_size <= cap for f in r.files)
    res = open_point(f"{repo}::default")
    out = tmp_path / "out.img"
    restore(res.repo, res.point, str(out))
    assert out.read_bytes() == vol.read_bytes()
    assert local.size_limit_reached(errno.EPERM, cap - 10, 100)
    assert not local.size_limit_reached(errno.EPERM, 10, 100)  # far from a cap: a real permission error


def test_creating_a_repository_is_explicit(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, MiB, seed=12)
    mountpoint = tmp_path / "media" / "usb"  # a mount point whose disk is not mounted: an empty folder
    mountpoint.mkdir(parents=True)
    line = one_line(ic("backup", vol, mountpoint), 4)
    assert "not an imagechain repository" in line and "mounted" in line and "imagechain init" in line, line
    assert not list(mountpoint.iterdir())  # nothing was written there
    line = one_line(ic("backup", vol, tmp_path / "missing"), 4)
    assert "not found" in line and not (tmp_path / "missing").exists(), line
    assert ic("init", mountpoint).returncode == 0 and (mountpoint / "imagechain.json").exists()
    assert ic("init", mountpoint).returncode == 0  # once more: harmless
    assert ic("backup", vol, mountpoint).returncode == 0
    assert ic("backup", vol, tmp_path / "new" / "repo", "--init").returncode == 0


def test_no_repository_is_made_inside_or_around_another(tmp_path: Path) -> None:
    """Every image file below a repository's folder is its own: a repository made inside another would be
    listed, pruned and locked by both."""
    vol = tmp_path / "vol.img"
    write_volume(vol, MiB, seed=14)
    outer = tmp_path / "outer"
    assert ic("backup", vol, outer, "--init").returncode == 0
    before = sorted(str(p.relative_to(outer)) for p in outer.rglob("*"))
    for argv in (["init", outer / "inner"], ["backup", vol, outer / "a" / "b", "--init"],
                 ["replicate", outer, outer / "copy", "--init"]):  # fmt: skip
        line = one_line(ic(*argv), 4)
        assert f"lies inside the repository {outer}" in line, line
    assert sorted(str(p.relative_to(outer)) for p in outer.rglob("*")) == before  # nothing made in it
    around = tmp_path / "around"
    (around / "old").mkdir(parents=True)
    shutil.copytree(outer, around / "old" / "repo")
    line = one_line(ic("init", around), 4)
    assert f"holds the repository {around}/old/repo" in line, line
    assert not (around / "imagechain.json").exists()
    # a folder of image files without a marker (copied there by hand) may still become one
    plain = tmp_path / "plain"
    shutil.copytree(outer, plain, ignore=shutil.ignore_patterns("imagechain.json", "locks"))
    assert ic("init", plain).returncode == 0
    assert ic("restore", f"{plain}::default", tmp_path / "out.img").returncode == 0
    assert (tmp_path / "out.img").read_bytes() == vol.read_bytes()
    assert ic("init", outer).returncode == 0  # an existing repository: nothing is made, nothing refused


def test_first_backups_racing_to_create_one_repository_all_succeed(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, MiB, seed=13)
    repo = tmp_path / "fresh"
    procs = [subprocess.Popen([exe(), "backup", str(vol), str(repo), "--init", "--chain", f"c{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for i in range(4)]  # fmt: skip
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert len(Repository.open(str(repo)).catalog().points) == 4


def test_list_tells_machines_apart_and_host_slash_chain(tmp_path: Path, repo: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    vol = tmp_path / "vol.img"
    write_volume(vol, MiB, seed=14)
    ids = []
    for machine in ("machine-a", "machine-b"):  # the same host name ("vm"), two machines
        monkeypatch.setenv("IMAGECHAIN_MACHINE_ID", machine)
        ids.append(backup(str(vol), str(repo)).point_id)
    out = ic("list", repo).stdout
    titles = [ln for ln in out.splitlines() if " / " in ln]
    assert len(titles) == 2 and len({t.split("(")[1].split(")")[0] for t in titles}) == 2, out
    assert all("1 point(s)" in t for t in titles), titles
    from imagechain.identity import local_host

    r = backup(str(vol), str(repo), host=local_host("alpha"), chain="daily")
    assert str(open_point(f"{repo}::alpha/daily").point.point_id) == r.point_id  # HOST/CHAIN
    assert str(open_point(f"{repo}::alpha/vol.img/daily").point.point_id) == r.point_id


def test_continuing_a_chain_from_another_machine_is_explicit(tmp_path: Path, repo: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A reinstalled PC (new machine id, same disk): the first backup says that the chain exists under
    the old host and how to continue it; with --parent it continues it, and the next ones follow."""
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 2 * MiB, seed=15))
    monkeypatch.setenv("IMAGECHAIN_MACHINE_ID", "old-install")
    old = backup(str(vol), str(repo))
    monkeypatch.setenv("IMAGECHAIN_MACHINE_ID", "new-install")
    fresh = backup(str(vol), str(repo), chain="other")  # another chain name: nothing to say
    assert not any("exists under host" in n for n in fresh.notices), fresh.notices
    p = ic("backup", vol, repo, "--json")
    res = json.loads(p.stdout)
    assert res["kind"] == "full" and res["chain_id"] != old.chain_id
    (said,) = [n for n in res["notices"] if "exists under host" in n]
    assert f"--parent {old.point_id[:8]}" in said and "notice:" in p.stderr, said
    data[:5000] = os.urandom(5000)
    vol.write_bytes(data)
    cont = backup(str(vol), str(repo), parent=old.point_id[:8])
    assert cont.kind == "incremental" and cont.chain_id == old.chain_id and cont.parent_id == old.point_id
    data[9000:9500] = os.urandom(500)
    vol.write_bytes(data)
    nxt = backup(str(vol), str(repo))  # no --parent: the continued chain is this host's now
    assert nxt.chain_id == old.chain_id and nxt.parent_id == cont.point_id
    res = open_point(f"{repo}::{nxt.point_id[:8]}")
    out = tmp_path / "out.img"
    restore(res.repo, res.point, str(out), cat=res.catalog)
    assert out.read_bytes() == bytes(data)


HOLDING_BACKUP = """
import sys, time
from imagechain.engine.backup import backup

class Hold:  # the backup waits with its lock held until told to go on
    def start(self, label, total):
        print("holding", flush=True)
        while not __import__("os").path.exists(sys.argv[3]):
            time.sleep(0.02)
    def advance(self, n): pass
    def stop(self): pass
    def notice(self, m): pass

backup(sys.argv[1], sys.argv[2], progress=Hold())
"""


def test_restore_refuses_the_source_of_a_running_backup(tmp_path: Path, repo: Path) -> None:
    import sys

    vol = tmp_path / "vol.img"
    data = write_volume(vol, 2 * MiB, seed=16)
    backup(str(vol), str(repo), chain="earlier")
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", HOLDING_BACKUP, str(vol), str(repo), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        line = one_line(ic("restore", f"{repo}::earlier", vol, "--force"), 8)
        assert "source of a backup running now" in line, line
        assert vol.read_bytes() == data
        other = tmp_path / "other.img"
        other.write_bytes(b"x")
        assert ic("restore", f"{repo}::earlier", other, "--force").returncode == 0  # anything else: fine
    finally:
        go.touch()
        proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert ic("restore", f"{repo}::earlier", vol, "--force").returncode == 0  # done: no longer refused


def test_a_point_damaged_only_in_its_header_is_salvaged_by_its_proof(tmp_path: Path, repo: Path) -> None:
    """Bytes that carry no data (here the header's metadata) cost the header's checksum; verify says the
    data is intact, and restore --salvage restores it, proven by every block digest and the state digest."""
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 2 * MiB, seed=17))
    backup(str(vol), str(repo))
    data[:3000] = os.urandom(3000)
    vol.write_bytes(data)
    r1 = backup(str(vol), str(repo))
    f = repo / r1.files[0]
    raw = bytearray(f.read_bytes())
    raw[64 + 256 + 10] ^= 0x20  # inside the metadata JSON: the header MAC fails
    f.write_bytes(raw)
    v = ic("verify", repo)
    assert v.returncode == 7 and "data is intact" in v.stdout and "--salvage" in v.stdout, v.stdout
    out = tmp_path / "out.img"
    line = one_line(ic("restore", f"{repo}::{r1.point_id[:8]}", out), 7)
    assert "damaged" in line, line
    p = ic("restore", f"{repo}::{r1.point_id[:8]}", out, "--salvage")
    assert p.returncode == 0 and "--salvage" in p.stderr, p.stderr
    assert out.read_bytes() == bytes(data)
    out.unlink()
    # damage to its data as well: no longer intact, and salvage refuses with the proof's verdict
    from imagechain.format.reader import PointReader

    res = open_point(f"{repo}::{r1.point_id[:8]}", salvage=True)
    with PointReader(res.repo.store, res.point) as rd:
        e = next(e for e in rd.index() if e["kind"] == 1)
    raw = bytearray(f.read_bytes())
    raw[64 + int(e["offset"]) + 3] ^= 0x01
    f.write_bytes(raw)
    v = ic("verify", repo)
    assert v.returncode == 7 and "data is intact" not in v.stdout, v.stdout
    p = ic("restore", f"{repo}::{r1.point_id[:8]}", out, "--salvage")
    notice, line = p.stderr.strip().splitlines()  # the salvage notice, then the one error line
    assert p.returncode == 7 and notice.startswith("notice:") and "corrupt" in line and not out.exists(), p.stderr


def test_a_flipped_segment_flag_costs_nothing_but_a_salvage(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(3 * MiB))
    r = backup(str(vol), str(repo), split_size=MiB)
    second = repo / r.files[1]
    raw = bytearray(second.read_bytes())
    raw[10] ^= 0x04  # the segment header's flags: they carry nothing, yet its checksum fails
    second.write_bytes(raw)
    v = ic("verify", repo)
    assert v.returncode == 7 and "segment header checksum" in v.stdout and "data is intact" in v.stdout, v.stdout
    out = tmp_path / "out.img"
    one_line(ic("restore", f"{repo}::{r.point_id[:8]}", out), 7)
    p = ic("restore", f"{repo}::{r.point_id[:8]}", out, "--salvage")
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == vol.read_bytes()


def test_a_hex_chain_name_that_is_also_an_id_prefix_is_ambiguous(tmp_path: Path, repo: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import uuid

    vol = tmp_path / "vol.img"
    write_volume(vol, MiB, seed=18)
    with monkeypatch.context() as m:
        m.setattr(uuid, "uuid4", lambda: uuid.UUID("e543" + os.urandom(14).hex()))  # a point id starting e543
        other = backup(str(vol), str(repo), chain="other")
    named = backup(str(vol), str(repo), chain="e543")  # a chain whose name is made of hex digits
    line = one_line(ic("restore", f"{repo}::e543", tmp_path / "out.img"), 6)
    assert other.point_id[:8] in line and "e543" in line and "chain" in line, line
    assert str(open_point(f"{repo}::{named.point_id[:8]}").point.point_id) == named.point_id  # by id: fine
