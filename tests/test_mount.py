"""Browsing points through FUSE, with the real kernel, loop devices and filesystem drivers: `disk.img` (and
one `part<N>.img` per partition of a disk point) holds exactly the volume's bytes; `--files` shows the
filesystems inside, read-only, without replaying an ext4 journal or an XFS log; `imagechain umount` leaves
no mount, loop device or record behind, also after the server was killed with SIGKILL, and refuses (exit 13,
mount still working) while a process uses the mount; a corrupt block fails only the reads that cover it;
encrypted chains mount with their passphrase; restore-files copies files and folders out with owner, mode,
times, extended attributes and symlinks, and never follows a link out of the point."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagechain.address import open_point
from imagechain.crypto import Passphrase
from imagechain.engine.backup import backup
from imagechain.errors import IntegrityError
from imagechain.mount import state, system
from imagechain.sizes import human
from imagechain.view import PointView

from .conftest import error_lines, exe, need_root, need_tool, write_volume
from .fsfill import check_fs, content, make_fs, mounted_fs, need_kind, sha256_file, tree

pytestmark = pytest.mark.root
MiB = 1 << 20
MTIME_NS = 1_600_000_000_123_456_789


def need_fuse() -> None:
    need_root()
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: FUSE is not available here, so nothing can be mounted")
    need_tool("fusermount3", "losetup", "mount", "umount", "cp")


def ic(*args: object, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})  # fmt: skip


def leftovers(mnt: Path) -> list[str]:
    """Mounts, loop devices and records that a mount at `mnt` could have left behind."""
    real = os.path.realpath(mnt)
    out = [f"mount {m.mountpoint} ({m.fstype})" for m in system.mounts_at_or_under(real)]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    out += [f"loop {line}" for line in loops.splitlines() if real + "/" in line]
    if os.path.exists(state.state_path(real)):
        out.append(f"record {state.state_path(real)}")
    return out


@contextlib.contextmanager
def mounted(address: str, mnt: Path, *options: object) -> Iterator[Path]:
    """`imagechain mount`; whatever the test does, nothing is left mounted afterwards."""
    mnt.mkdir(parents=True, exist_ok=True)
    r = ic("mount", address, mnt, *options)
    assert r.returncode == 0, r.stderr
    try:
        yield mnt
    finally:
        if leftovers(mnt):
            done = ic("umount", mnt)
            if done.returncode:  # the test failed half-way: take it down regardless
                with contextlib.suppress(Exception):
                    state.take_down(str(mnt), state.load(str(mnt)), lazy=True)


def digest(path: Path | str, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length if length is not None else 1 << 62
        while left > 0 and (chunk := f.read(min(left, 4 * MiB))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def populate(mnt: Path, rng: random.Random, count: int) -> dict[str, str]:
    """Files in a few folders, none deleted: the free space stays zeros, so a used-blocks point restores
    (and shows) the volume bit for bit."""
    files = {}
    for i in range(count):
        rel = f"{rng.choice(['', 'docs', 'data/a', 'data/b'])}/f{i:03d}.bin".lstrip("/")
        (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
        data = content(rng, rng.randint(0, 300_000))
        (mnt / rel).write_bytes(data)
        files[rel] = hashlib.sha256(data).hexdigest()
    return files


def state_pid(mnt: Path) -> int:
    rec = state.load(str(mnt))
    assert rec is not None
    return rec.pid


# ---------------------------------------------------------------- an ext4 volume, shared by several tests


@pytest.fixture(scope="module")
def ext4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """An ext4 volume (256-byte inodes: nanosecond times) with files, a folder of known metadata (owner,
    mode, time, user.* xattr, symlinks) and links pointing out of it; backed up once (used blocks only).
    (volume, repository, {path: sha256})."""
    need_fuse()
    need_kind("ext4")
    tmp = tmp_path_factory.mktemp("ext4")
    img = tmp / "vol.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "256", str(img)], check=True, capture_output=True)
    with mounted_fs(img, "ext4", tmp / "m") as m:
        files = populate(m, random.Random(1), 40)
        keep = m / "keep"
        (keep / "sub").mkdir(parents=True)
        (keep / "data.txt").write_bytes(b"kept with its metadata\n")
        (keep / "sub" / "deep.txt").write_bytes(b"deeper\n")
        os.symlink("data.txt", keep / "link")
        os.symlink("/keep", m / "abs")  # absolute: inside the volume it means the volume's /keep
        os.symlink("/etc", m / "escape")  # the volume has no /etc: must never reach the host's
        os.setxattr(keep / "data.txt", "user.comment", b"kept")
        for p, mode in ((keep / "data.txt", 0o640), (keep / "sub", 0o710), (keep, 0o750)):
            os.chown(p, 1234, 5678)
            os.chmod(p, mode)
            os.utime(p, ns=(MTIME_NS, MTIME_NS))
        os.chown(keep / "link", 1234, 5678, follow_symlinks=False)
        files.update({"keep/data.txt": sha256_file(keep / "data.txt"), "keep/sub/deep.txt": sha256_file(
            keep / "sub" / "deep.txt")})  # fmt: skip
    repo = tmp / "repo"
    backup(str(img), str(repo), init=True, cache_dir=str(tmp / "cache"))
    return img, repo, files


def test_disk_img_and_files(ext4: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    img, repo, files = ext4
    mnt = tmp_path / "mnt"
    with mounted(f"{repo}::default", mnt, "--files"):
        assert sorted(os.listdir(mnt)) == ["disk.img", "files"]
        assert (mnt / "disk.img").stat().st_size == img.stat().st_size
        assert digest(mnt / "disk.img") == digest(img)
        assert subprocess.run(["cmp", str(img), str(mnt / "disk.img")]).returncode == 0
        assert tree(mnt / "files") == files
        assert os.readlink(mnt / "files" / "keep" / "link") == "data.txt"
        # read-only all the way down
        with pytest.raises(OSError) as e:
            (mnt / "files" / "new").write_text("x")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError):
            open(mnt / "disk.img", "r+b")  # noqa: SIM115
        # the mount point is taken: a second mount is refused, and so is a folder that is not empty
        again = ic("mount", f"{repo}::default", mnt)
        assert again.returncode == 13 and "umount" in again.stderr, again.stderr
        full = tmp_path / "full"
        (full / "x").mkdir(parents=True)
        r = ic("mount", f"{repo}::default", full)
        assert r.returncode == 13 and error_lines(r.stderr) == [f"imagechain: error: mount point {full} is not empty"]
        inside = repo / "mnt"  # what a mount shows there would be read as part of the repository
        inside.mkdir()
        for how in ((), ("--foreground",)):
            r = ic("mount", f"{repo}::default", inside, *how)
            assert r.returncode == 13 and error_lines(r.stderr) == [
                f"imagechain: error: mount point {inside} is inside the repository being read ({repo}): what it "
                f"shows would be read as part of it; mount it elsewhere"], r.stderr  # fmt: skip
        inside.rmdir()
        rec = state.load(str(mnt))
        assert rec is not None and len(rec.loops) == 1 and [m.kind for m in rec.mounts] == ["ext4"]
        r = ic("umount", mnt)
        assert r.returncode == 0, r.stderr
    assert leftovers(mnt) == [] and os.listdir(mnt) == []
    r = ic("umount", mnt)
    assert r.returncode == 13 and "nothing of imagechain is mounted" in r.stderr


def test_foreground_until_a_stop_signal(ext4: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    _, repo, _ = ext4
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([exe(), "mount", f"{repo}::default", str(mnt), "--foreground", "--files"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("mounted point ")  # said once the mount is ready
        assert (mnt / "files" / "keep" / "data.txt").read_bytes() == b"kept with its metadata\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert f"imagechain: interrupted (SIGTERM); {mnt} was unmounted" in err
    assert leftovers(mnt) == []


def test_umount_after_kill_9(ext4: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    _, repo, _ = ext4
    mnt = tmp_path / "mnt"
    with mounted(f"{repo}::default", mnt, "--files"):
        assert (mnt / "files" / "keep" / "data.txt").read_bytes() == b"kept with its metadata\n"
        pid = state_pid(mnt)
        os.kill(pid, signal.SIGKILL)
        assert system.wait_gone(pid, None, 10)
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # "Transport endpoint is not connected"
        r = ic("umount", mnt)
        assert r.returncode == 0, r.stderr
        assert leftovers(mnt) == []


def test_busy_umount_is_refused_and_the_mount_keeps_working(ext4: tuple[Path, Path, dict[str, str]],
                                                             tmp_path: Path) -> None:  # fmt: skip
    _, repo, files = ext4
    mnt = tmp_path / "mnt"
    with mounted(f"{repo}::default", mnt, "--files"):
        inside = mnt / "files" / "keep"
        sleeper = subprocess.Popen(["sleep", "60"], cwd=inside)
        try:
            r = ic("umount", mnt)
            assert r.returncode == 13
            assert error_lines(r.stderr) == [
                f"imagechain: error: {mnt}/files is busy: a process has files open in it (sleep, pid "
                f"{sleeper.pid}; `fuser -vm {mnt}/files` lists them); close them and retry"]  # fmt: skip
            assert tree(mnt / "files") == files  # still mounted, still reading
        finally:
            sleeper.kill()
            sleeper.wait()
        with open(mnt / "disk.img", "rb") as held:  # an open file of the FUSE filesystem itself
            r = ic("umount", mnt)
            assert r.returncode == 13 and f"{mnt} is busy" in r.stderr, r.stderr
            assert held.read(4096) == (mnt / "disk.img").read_bytes()[:4096]
        r = ic("umount", mnt)
        assert r.returncode == 0, r.stderr
    assert leftovers(mnt) == []


def test_restore_files_keeps_metadata(ext4: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    _, repo, files = ext4
    dest = tmp_path / "out" / "new"  # created
    r = ic("restore-files", f"{repo}::default", "/keep/data.txt", "keep", "abs/link", dest)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("restored 3 paths (5 files, 53 B) from point "), r.stdout
    for p in (dest / "data.txt", dest / "keep" / "data.txt"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (1234, 5678, 0o640, MTIME_NS)
        assert os.getxattr(p, "user.comment") == b"kept"
        assert p.read_bytes() == b"kept with its metadata\n"
    for p, mode in ((dest / "keep", 0o750), (dest / "keep" / "sub", 0o710)):
        st = p.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (1234, 5678, mode, MTIME_NS)
    for link in (dest / "keep" / "link", dest / "link"):  # "abs/link": abs is followed (inside), link is not
        assert link.is_symlink() and os.readlink(link) == "data.txt"
        assert link.lstat().st_uid == 1234
    assert sha256_file(dest / "keep" / "sub" / "deep.txt") == files["keep/sub/deep.txt"]

    # a second copy onto the same names needs --force
    again = ic("restore-files", f"{repo}::default", "keep/data.txt", dest)
    assert again.returncode == 8 and "exists (use --force" in again.stderr
    assert ic("restore-files", f"{repo}::default", "keep/data.txt", dest, "--force").returncode == 0
    # a missing path, and one that a link would take out of the point (to the host's /etc), are named
    for missing in ("/keep/nope", "escape/hostname"):
        r = ic("restore-files", f"{repo}::default", missing, tmp_path / "x")
        assert r.returncode == 2, r.stderr
        assert error_lines(r.stderr) == [f"imagechain: error: {missing}: no such file or folder in the point"]
    assert not (tmp_path / "x" / "hostname").exists()
    # every private mount went away with its command
    assert private_leftovers() == []


def private_leftovers() -> list[str]:
    tops = [f"/tmp/{p}" for p in os.listdir("/tmp") if p.startswith("imagechain-files-")]
    return tops + [m.mountpoint for m in system.mount_table() if "/imagechain-files-" in m.mountpoint] + \
        [d for top in tops for d in system.loops_under(top)]  # fmt: skip


def stalled_restore_files(tmp_path: Path, repo: Path, dest: Path, *paths: str,
                          then: str = "") -> tuple[subprocess.Popen[str], int]:  # fmt: skip
    """A restore-files whose cp (a stand-in around the real one) has copied everything, then runs the shell
    command `then` and waits instead of exiting (or exits, when `then` is given): (the restore-files, the
    stand-in's pid, 0 when it exits)."""
    real = shutil.which("cp")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    done = tmp_path / "copied"
    with contextlib.suppress(FileNotFoundError):
        done.unlink()
    stall = f'echo $$ > "{done}.tmp"\nmv "{done}.tmp" "{done}"\nexec sleep 60\n'
    (bin_dir / "cp").write_text(f'#!/bin/sh\n"{real}" "$@" || exit $?\n{then or stall}\n')
    (bin_dir / "cp").chmod(0o755)
    proc = subprocess.Popen([exe(), "restore-files", f"{repo}::default", *paths, str(dest)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})  # fmt: skip
    deadline = time.monotonic() + 60
    while not then and not done.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    return proc, int(done.read_text()) if not then else 0


def staged(dest: Path) -> list[Path]:
    return sorted(p for p in dest.iterdir() if p.name.startswith(".imagechain-files.tmp-"))


def wait_dead(pid: int) -> None:
    """Until pid is gone or a zombie (whose parent died: init reaps it)."""
    for _ in range(500):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} is still running")


def test_restore_files_stopped_or_killed(ext4: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    """The whole copy made, its cp not yet exited: a stop signal takes the private mount down and leaves
    DEST as it was. After a SIGKILL the copy's staging folder stays while its cp lives (the cp holds its
    lock), and the next restore-files removes it, with a notice, once the cp is gone."""
    _, repo, _ = ext4
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine.txt").write_text("mine\n")
    proc, cp = stalled_restore_files(tmp_path, repo, dest, "keep")
    (stage,) = staged(dest)
    assert (stage / "keep" / "data.txt").read_bytes() == b"kept with its metadata\n"  # copied, not published
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert error_lines(err) == [f"imagechain: interrupted (SIGTERM); the private mount was taken down; nothing "
                                f"was copied to {dest}"]  # fmt: skip
    assert sorted(os.listdir(dest)) == ["mine.txt"]
    assert private_leftovers() == []
    wait_dead(cp)  # the copy was ended too

    proc, cp = stalled_restore_files(tmp_path, repo, dest, "keep")
    proc.kill()  # nothing can clean up after this
    proc.wait()
    (stage,) = staged(dest)
    assert private_leftovers(), "a SIGKILL leaves the private mount"
    r = ic("restore-files", f"{repo}::default", "keep/sub", dest)
    assert r.returncode == 0, r.stderr
    assert "notice: took down the private mount" in r.stderr and "left by a killed restore-files" in r.stderr
    assert staged(dest) == [stage], "a staging folder whose cp still runs is not removed"
    os.kill(cp, signal.SIGKILL)
    wait_dead(cp)
    size = sum(p.lstat().st_size for p in stage.rglob("*") if not p.is_dir())
    r = ic("restore-files", f"{repo}::default", "keep/data.txt", dest)
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("notice:")] == [
        f"notice: removed {stage} ({human(size)}), left by a restore-files that did not finish"]
    assert sorted(os.listdir(dest)) == ["data.txt", "mine.txt", "sub"]
    assert (dest / "data.txt").read_bytes() == b"kept with its metadata\n"
    assert private_leftovers() == []


def test_restore_files_is_all_or_nothing(ext4: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    """A copy that fails half-way (its filesystem fills up) or finds a name taken when it is done leaves
    DEST as it was: no part-written file, and files --force would replace keep their content. --force
    replaces a file in one step (a whole new file renamed over it: cp truncated it and wrote into it), merges
    folders, and never replaces a folder with a file."""
    _, repo, files = ext4
    need_tool("mount")

    def as_before(dest: Path, before: dict[str, bytes]) -> None:
        now = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
        assert now == before

    usb = tmp_path / "usb"
    usb.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(usb)], check=True)
    try:
        dest = usb / "out"
        (dest / "keep").mkdir(parents=True)
        (dest / "keep" / "data.txt").write_bytes(b"old\n")
        (dest / "keep" / "mine.txt").write_bytes(b"mine\n")
        before = {"keep/data.txt": b"old\n", "keep/mine.txt": b"mine\n"}
        free = os.statvfs(usb).f_bfree
        r = ic("restore-files", f"{repo}::default", "/", dest, "--force")  # about 6 MiB onto 3 MiB
        assert r.returncode == 10, r.stderr
        (line,) = error_lines(r.stderr)
        assert line.startswith(f"imagechain: error: copying to {dest} failed: cp: ") and line.endswith(
            "No space left on device; nothing was copied"), line  # fmt: skip
        assert f"{dest}/" in line and ".imagechain-files" not in line, line  # named as in DEST
        as_before(dest, before)
        assert staged(dest) == [] and os.statvfs(usb).f_bfree == free
        subprocess.run(["mount", "-o", "remount,ro", str(usb)], check=True)
        r = ic("restore-files", f"{repo}::default", "keep", dest, "--force")
        assert r.returncode == 8, r.stderr
        assert error_lines(r.stderr) == [f"imagechain: error: cannot write into {dest}: Read-only file system"]
    finally:
        subprocess.run(["umount", "-l", str(usb)], check=False)

    dest = tmp_path / "out"
    (dest / "keep").mkdir(parents=True)
    (dest / "keep" / "data.txt").write_bytes(b"old\n")
    (dest / "keep" / "mine.txt").write_bytes(b"mine\n")
    # a name taken while the copy ran: found when it is done, before anything is moved
    proc, _ = stalled_restore_files(tmp_path, repo, dest, "docs", then=f'echo late > "{dest}/docs"')
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 8, err
    assert error_lines(err) == [f"imagechain: error: {dest}/docs appeared while copying; nothing was copied"]
    (dest / "docs").unlink()
    as_before(dest, before)
    assert staged(dest) == []
    # a folder where the point has a file: refused before copying
    (dest / "keep" / "data.txt").rename(tmp_path / "old.txt")
    (dest / "keep" / "data.txt").mkdir()
    (dest / "keep" / "data.txt" / "inside").write_bytes(b"inside\n")
    r = ic("restore-files", f"{repo}::default", "keep", dest, "--force")
    assert r.returncode == 8, r.stderr
    assert error_lines(r.stderr) == [f"imagechain: error: {dest}/keep/data.txt is a folder, and the point has a "
                                     f"file there: --force replaces files, never folders; move it away first"]
    assert (dest / "keep" / "data.txt" / "inside").read_bytes() == b"inside\n" and staged(dest) == []
    shutil.rmtree(dest / "keep" / "data.txt")
    (tmp_path / "old.txt").rename(dest / "keep" / "data.txt")
    # another filesystem mounted where the point has a folder: files cannot be renamed into it
    (dest / "keep" / "sub").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dest / "keep" / "sub")], check=True)
    try:
        r = ic("restore-files", f"{repo}::default", "keep", dest, "--force")
        assert r.returncode == 8, r.stderr
        assert error_lines(r.stderr) == [f"imagechain: error: {dest}/keep/sub is another filesystem, mounted there: "
                                         f"restore its part into it on its own (as DEST)"]  # fmt: skip
        assert os.listdir(dest / "keep" / "sub") == [] and staged(dest) == []
    finally:
        subprocess.run(["umount", str(dest / "keep" / "sub")], check=True)
    (dest / "keep" / "sub").rmdir()
    # done: the file replaced whole, the folder merged and given the point's owner, mode and times
    old = (dest / "keep" / "data.txt").stat()
    assert old.st_nlink == 1  # cp wrote into such a file in place
    r = ic("restore-files", f"{repo}::default", "keep", dest, "--force")
    assert r.returncode == 0, r.stderr
    assert (dest / "keep" / "data.txt").read_bytes() == b"kept with its metadata\n"
    assert (dest / "keep" / "data.txt").stat().st_ino != old.st_ino
    assert (dest / "keep" / "mine.txt").read_bytes() == b"mine\n"
    assert sha256_file(dest / "keep" / "sub" / "deep.txt") == files["keep/sub/deep.txt"]
    assert os.readlink(dest / "keep" / "link") == "data.txt"
    st = (dest / "keep").lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (1234, 5678, 0o750, MTIME_NS)
    assert os.getxattr(dest / "keep" / "data.txt", "user.comment") == b"kept" and staged(dest) == []
    # never into the repository being read: what lands there would be read as part of it
    r = ic("restore-files", f"{repo}::default", "keep", repo / "restored")
    assert r.returncode == 8 and error_lines(r.stderr) == [
        f"imagechain: error: {repo}/restored is inside the repository being read ({repo}): what is copied there "
        f"would be read as part of it"], r.stderr  # fmt: skip
    assert not (repo / "restored").exists()


def drop_caches() -> None:
    """Forget cached inodes, so that a FUSE driver is asked afresh for what it stored."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


@pytest.mark.parametrize("kind", ["fat32", "exfat"])
def test_restore_files_onto_fat(ext4: tuple[Path, Path, dict[str, str]], tmp_path: Path, kind: str) -> None:
    """FAT and exFAT hold no owners, modes, links or xattrs: files and folders are copied without them (with
    their times), not failed for them; symlinks are left out, with a notice. A full stick keeps nothing."""
    _, repo, files = ext4
    img = make_fs(tmp_path, kind)
    with mounted_fs(img, kind, tmp_path / "m") as m:
        dest = m / "restored"
        r = ic("restore-files", f"{repo}::default", "data", "keep/sub", "keep/data.txt", dest)
        assert r.returncode == 0, r.stderr
        got = {str(p.relative_to(dest)): sha256_file(p) for p in dest.rglob("*") if p.is_file()}
        want = {k: v for k, v in files.items() if k.startswith("data/")}
        want.update({"sub/deep.txt": files["keep/sub/deep.txt"], "data.txt": files["keep/data.txt"]})
        assert got == want
        os.sync()
        drop_caches()  # what the driver keeps, not what the kernel remembers it was told
        assert (dest / "data.txt").stat().st_mtime_ns // 10**9 in (MTIME_NS // 10**9, MTIME_NS // 10**9 - 1)
        # a symlink cannot be held there: left out, said, and the rest copied
        r = ic("restore-files", f"{repo}::default", "keep", dest / "with-link")
        assert r.returncode == 0 and r.stdout.startswith("restored 1 path (2 files, 30 B) "), (r.stdout, r.stderr)
        fs = "vfat" if kind == "fat32" else kind
        assert [ln for ln in r.stderr.splitlines() if ln.startswith("notice:")] == [
            f"notice: 1 symbolic link(s) or special file(s) not copied: {fs} cannot hold them (/keep/link)"]
        assert sorted(str(p.relative_to(dest / "with-link")) for p in (dest / "with-link").rglob("*")) == [
            "keep", "keep/data.txt", "keep/sub", "keep/sub/deep.txt"]  # fmt: skip
        assert staged(dest) == [] and staged(dest / "with-link") == []
        # a full stick: nothing is left of the copy
        (m / "filler").mkdir()
        with contextlib.suppress(OSError):  # (fusefat's statfs says nothing useful: fill it until it is full)
            for i in range(1000):
                (m / "filler" / str(i)).write_bytes(bytes(1 << 20))
        (m / "filler" / "0").unlink()  # about 1 MiB free, for a copy of more
        r = ic("restore-files", f"{repo}::default", "data", dest / "full")
        (line,) = error_lines(r.stderr)
        assert line.startswith(f"imagechain: error: copying to {dest}/full failed: /data/"), line
        if kind == "fat32":  # fusefat answers a full disk with EPERM
            assert r.returncode == 8 and line.endswith(
                ": Operation not permitted (fusefat says so for a full disk too); nothing was copied"), line
        else:
            assert r.returncode == 10 and line.endswith(": No space left on device; nothing was copied"), line
        assert not (dest / "full").exists()
        shutil.rmtree(m / "filler")
    check_fs(img, kind)


# ---------------------------------------------------------------- XFS with a dirty log


def test_xfs_with_a_dirty_log(tmp_path: Path, repo: Path) -> None:
    """A volume imaged with its log not written back (as a live one can be): --files mounts it as its last
    checkpoint left it (norecovery), where a plain read-only mount would have to replay the log."""
    need_fuse()
    need_kind("xfs")
    need_tool("xfs_io", "fsfreeze")
    img = tmp_path / "xfs.img"
    with open(img, "wb") as f:
        f.truncate(320 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(img)], check=True, capture_output=True)
    with mounted_fs(img, "xfs", tmp_path / "m") as m:
        files = populate(m, random.Random(2), 30)
        subprocess.run(["fsfreeze", "-f", str(m)], check=True)  # a checkpoint: all of that is written home
        subprocess.run(["fsfreeze", "-u", str(m)], check=True)
        (m / "after.txt").write_text("only in the log\n")
        os.sync()
        subprocess.run(["xfs_io", "-x", "-c", "shutdown", str(m)], check=True)  # the log stays dirty
    log = subprocess.run(["xfs_logprint", "-t", str(img)], capture_output=True, text=True).stdout
    assert "DIRTY" in log, log
    backup(str(img), str(repo))
    mnt = tmp_path / "mnt"
    with mounted(f"{repo}::default", mnt, "--files"):
        assert digest(mnt / "disk.img") == digest(img)
        got = tree(mnt / "files")
        assert {k: v for k, v in got.items() if k != "after.txt"} == files
        assert next(m for m in system.mount_table() if m.mountpoint == f"{mnt}/files").fstype == "xfs"
    assert leftovers(mnt) == []


# ---------------------------------------------------------------- a GPT disk with ext4 and exFAT partitions


def test_gpt_disk_with_two_filesystems(tmp_path: Path, repo: Path) -> None:
    need_fuse()
    need_kind("ext4")
    need_kind("exfat")
    need_tool("sfdisk")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(60 * MiB)
    script = "label: gpt\nsize=32MiB, type=linux\nsize=24MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=script, text=True, check=True, capture_output=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]  # fmt: skip
    parts = [(int(p["start"]) * 512, int(p["size"]) * 512) for p in table["partitions"]]
    files: dict[int, dict[str, str]] = {}
    for n, ((start, size), kind) in enumerate(zip(parts, ["ext4", "exfat"], strict=True), 1):
        dev = subprocess.run(["losetup", "-f", "--show", "-o", str(start), "--sizelimit", str(size), str(disk)],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
        try:
            mkfs = ["mkfs.ext4", "-q", "-F"] if kind == "ext4" else ["mkfs.exfat"]
            subprocess.run([*mkfs, dev], check=True, capture_output=True)
            with mounted_fs(dev, kind, tmp_path / f"m{n}") as m:
                files[n] = populate(m, random.Random(n), 15)
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)
    backup(str(disk), str(repo))
    mnt = tmp_path / "mnt"
    with mounted(f"{repo}::default", mnt, "--files"):
        assert sorted(os.listdir(mnt)) == ["disk.img", "files", "part1.img", "part2.img"]
        assert sorted(os.listdir(mnt / "files")) == ["part1", "part2"]
        assert digest(mnt / "disk.img") == digest(disk)
        for n, (start, size) in enumerate(parts, 1):
            assert (mnt / f"part{n}.img").stat().st_size == size
            assert digest(mnt / f"part{n}.img") == digest(disk, start, size), f"partition {n}"
            assert tree(mnt / "files" / f"part{n}") == files[n], f"partition {n}"
        kinds = {m.mountpoint: m.fstype for m in system.mount_table()}
        assert kinds[f"{mnt}/files/part1"] == "ext4" and kinds[f"{mnt}/files/part2"] == "fuseblk"
        rec = state.load(str(mnt))
        assert rec is not None and rec.mounts[1].driver_pid is not None  # exfat-fuse, waited for on umount
    assert leftovers(mnt) == []
    assert system.start_time(rec.mounts[1].driver_pid) is None

    # restore-files must be told which filesystem; then it copies from that one
    r = ic("restore-files", f"{repo}::default", "docs", tmp_path / "out")
    assert r.returncode == 2 and "partitions 1 (ext4), 2 (exfat): choose one with --partition N" in r.stderr
    name = sorted(files[2])[0]
    r = ic("restore-files", f"{repo}::default", name, tmp_path / "out", "--partition", "2")
    assert r.returncode == 0 and "partition 2, exfat" in r.stdout, r.stderr
    assert sha256_file(tmp_path / "out" / os.path.basename(name)) == files[2][name]
    r = ic("restore-files", f"{repo}::default", name, tmp_path / "out", "--partition", "7")
    assert r.returncode == 8 and "has no partition 7 (it has: 1, 2)" in r.stderr


@pytest.mark.parametrize("kind", ["ntfs", "fat32"])
def test_files_through_a_fuse_driver(kind: str, tmp_path: Path, repo: Path) -> None:
    """NTFS and FAT have no kernel driver here: ntfs-3g and fusefat serve them, read-only, over the loop
    device, and are waited for when unmounting (the loop device is only free once they end)."""
    need_fuse()
    img = make_fs(tmp_path, kind)
    with mounted_fs(img, kind, tmp_path / "m") as m:
        files = populate(m, random.Random(kind), 12)
    backup(str(img), str(repo))
    mnt = tmp_path / "mnt"
    with mounted(f"{repo}::default", mnt, "--files"):
        assert tree(mnt / "files") == files
        rec = state.load(str(mnt))
        assert rec is not None and rec.mounts[0].driver_pid is not None
        with pytest.raises(OSError):
            (mnt / "files" / "new").write_text("x")
    assert leftovers(mnt) == [] and system.start_time(rec.mounts[0].driver_pid) is None


# ---------------------------------------------------------------- corrupt blocks, raw volumes, encryption


def test_a_corrupt_block_fails_only_its_reads(tmp_path: Path, repo: Path) -> None:
    need_fuse()
    vol = tmp_path / "raw.img"
    data = write_volume(vol, 8 * MiB, seed=5, zero_fraction=0.0)
    backup(str(vol), str(repo))
    res = open_point(f"{repo}::default")
    (path,) = repo.rglob("*.icimg")
    with open(path, "r+b") as f:  # random bytes over a stretch of payloads in the middle of the file
        f.seek(path.stat().st_size // 2)
        f.write(random.Random(9).randbytes(256))
    bs = res.point.header.block_size
    bad = []
    with PointView(res.repo, res.point) as view:
        for b in range(len(data) // bs):
            try:
                assert view.read(b * bs, bs) == data[b * bs : (b + 1) * bs]
            except IntegrityError:
                bad.append(b)
    assert 1 <= len(bad) <= 3, bad
    mnt = tmp_path / "mnt"
    with mounted(f"{repo}::default", mnt, "--files") as m:
        fd = os.open(m / "disk.img", os.O_RDONLY)
        try:
            for b in range(len(data) // bs):
                if b in bad:
                    for _ in range(2):  # asked again: failed again, said once
                        with pytest.raises(OSError) as e:
                            os.pread(fd, bs, b * bs)
                        assert e.value.errno == errno.EIO
                else:
                    assert os.pread(fd, bs, b * bs) == data[b * bs : (b + 1) * bs], f"block {b}"
        finally:
            os.close(fd)
        rec = state.load(str(m))
        assert rec is not None and rec.log is not None
        said = [ln for ln in Path(rec.log).read_text().splitlines() if "unreadable (answered EIO)" in ln]
        assert len(said) == len(set(said)) and any(f"block {bad[0]} is corrupt" in ln for ln in said), said
        r = ic("umount", m)
        assert r.returncode == 0 and f"message(s), kept in {rec.log}" in r.stderr, r.stderr
    assert leftovers(mnt) == []
    os.unlink(rec.log)  # kept because it said something; a clean mount's log goes with it


def test_restore_files_of_a_corrupt_file(tmp_path: Path, repo: Path) -> None:
    """A file whose blocks are damaged in the image fails its copy (exit 7, cp's own line, the damaged block
    named); other files of the point still copy."""
    need_fuse()
    need_kind("ext4")
    need_tool("debugfs")
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    with mounted_fs(img, "ext4", tmp_path / "m") as m:
        (m / "big.bin").write_bytes(random.Random(3).randbytes(40 * MiB))  # most of what the image stores
        (m / "small.txt").write_text("still fine\n")
    backup(str(img), str(repo))
    (path,) = repo.rglob("*.icimg")
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(random.Random(4).randbytes(256))
    res = open_point(f"{repo}::default")
    bs = res.point.header.block_size
    with PointView(res.repo, res.point) as view:
        bad = [b for b in range(view.blocks) if not _readable(view, b * bs, bs)]
    header = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True).stdout
    found = re.search(r"Block size:\s+(\d+)", header)
    assert found, header
    fs_bs = int(found.group(1))
    blocks = subprocess.run(["debugfs", "-R", "blocks /big.bin", str(img)], capture_output=True, text=True).stdout
    held = {int(b) * fs_bs // bs for b in blocks.split()}
    assert bad and set(bad) <= held, (bad, "the damage should lie in big.bin")
    r = ic("restore-files", f"{repo}::default", "big.bin", tmp_path / "out")
    assert r.returncode == 7, r.stderr
    last = error_lines(r.stderr)[-1]
    assert last.startswith(f"imagechain: error: copying to {tmp_path}/out failed: cp: error reading '/big.bin': "
                           f"Input/output error (a block of the point is corrupt: see above)"), r.stderr  # fmt: skip
    assert any(f"block {bad[0]} is corrupt" in ln for ln in r.stderr.splitlines()), r.stderr
    r = ic("restore-files", f"{repo}::default", "small.txt", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "small.txt").read_text() == "still fine\n"
    assert private_leftovers() == []


def _readable(view: PointView, offset: int, length: int) -> bool:
    try:
        view.read(offset, length)
        return True
    except IntegrityError:
        return False


def test_files_on_a_volume_without_a_filesystem(tmp_path: Path, repo: Path) -> None:
    need_fuse()
    vol = tmp_path / "raw.img"
    write_volume(vol, 2 * MiB, seed=6)
    backup(str(vol), str(repo))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = ic("mount", f"{repo}::default", mnt, "--files")
    try:
        assert r.returncode == 0, r.stderr
        assert "notice: the volume holds no filesystem imagechain recognises; not mounted (--files mounts " \
            "ext2/3/4, XFS, NTFS, FAT and exFAT)" in r.stderr  # fmt: skip
        assert os.listdir(mnt) == ["disk.img"] and digest(mnt / "disk.img") == digest(vol)
    finally:
        assert ic("umount", mnt).returncode == 0
    assert leftovers(mnt) == []


def test_encrypted_chain(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_fuse()
    monkeypatch.setenv("IMAGECHAIN_KEYSTORE", str(tmp_path / "keystore"))
    monkeypatch.delenv("IMAGECHAIN_PASSPHRASE", raising=False)
    vol = tmp_path / "vol.img"
    write_volume(vol, 4 * MiB, seed=7)
    backup(str(vol), str(repo), encrypt=Passphrase(b"mount me"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = ic("mount", f"{repo}::default", mnt)  # no passphrase, no terminal to ask on
    assert r.returncode == 11 and "passphrase is needed" in r.stderr, r.stderr
    assert leftovers(mnt) == []
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    r = ic("mount", f"{repo}::default", mnt, "--passphrase-file", wrong)  # said by the serving child
    assert r.returncode == 11 and "wrong passphrase" in r.stderr, r.stderr
    assert leftovers(mnt) == []
    pw = tmp_path / "pw"
    pw.write_text("mount me\n")
    with mounted(f"{repo}::default", mnt, "--passphrase-file", pw):
        assert digest(mnt / "disk.img") == digest(vol)
    assert leftovers(mnt) == []
    # asked on a terminal: it reaches the background server through a pipe, never its command line
    out = on_a_terminal([exe(), "mount", f"{repo}::default", str(mnt)], answer=b"mount me\n")
    try:
        assert "mounted point" in out, out
        assert digest(mnt / "disk.img") == digest(vol)
        with open(f"/proc/{state_pid(mnt)}/cmdline", "rb") as f:
            assert b"mount me" not in f.read()
    finally:
        assert ic("umount", mnt).returncode == 0
    assert leftovers(mnt) == []


def on_a_terminal(argv: list[str], answer: bytes) -> str:
    """Run a command on a pseudo-terminal of its own; answer its passphrase prompt. Its output."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once (nothing else may run in a forked copy of pytest)
        os.execv(argv[0], argv)
    out = b""
    try:
        while b"passphrase:" not in out:
            out += os.read(fd, 1024)
        os.write(fd, answer)
        with contextlib.suppress(OSError):  # EIO once the child is gone
            while chunk := os.read(fd, 1024):
                out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out.decode(errors="replace")


def test_mount_needs_an_existing_point_and_folder(tmp_path: Path, repo: Path) -> None:
    need_fuse()
    r = ic("mount", f"{repo}::default", tmp_path / "nowhere")
    assert r.returncode == 13 and "does not exist" in r.stderr
    (tmp_path / "mnt").mkdir()
    r = ic("mount", f"{repo}::nope", tmp_path / "mnt")
    assert r.returncode == 5 and "Traceback" not in r.stderr, r.stderr
    assert leftovers(tmp_path / "mnt") == []
    # umount leaves alone what it did not mount
    subprocess.run(["mount", "-t", "tmpfs", "none", str(tmp_path / "mnt")], check=True)
    try:
        r = ic("umount", tmp_path / "mnt")
        said = f"imagechain: error: {tmp_path}/mnt is not an imagechain mount (tmpfs of none is mounted there)"
        assert r.returncode == 13 and error_lines(r.stderr) == [said]
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)


def test_allow_other(tmp_path: Path, repo: Path) -> None:
    """Only the user who mounted reads the point, unless --allow-other (then each file's mode decides)."""
    need_fuse()
    need_tool("setpriv")
    vol = tmp_path / "vol.img"
    data = write_volume(vol, 1 * MiB, seed=8)
    backup(str(vol), str(repo))
    top = Path(tempfile.mkdtemp(prefix="imagechain-test-", dir="/tmp"))  # a path another user can walk
    top.chmod(0o755)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "head", "-c", "100"]
    try:
        for options, readable in (((), False), (("--allow-other",), True)):
            with mounted(f"{repo}::default", top / "mnt", *options) as m:
                r = subprocess.run([*nobody, str(m / "disk.img")], capture_output=True, timeout=30)
                assert (r.returncode == 0 and r.stdout == data[:100]) == readable, r.stderr
            assert leftovers(top / "mnt") == []
    finally:
        (top / "mnt").rmdir()
        top.rmdir()
