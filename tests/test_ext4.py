"""Round trip of a real ext4 filesystem with every block kept (--all-blocks; used-block maps are tested in
test_usedblocks.py): back up, change files, back up again, and restore every point
to new image files, onto a loop block device and, with --delta, onto the changed image; each result
must be bit-exact, pass e2fsck, and hold the files (by checksum) that were there at that point."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagechain.address import open_point
from imagechain.engine.backup import backup
from imagechain.engine.restore import restore
from imagechain.errors import TargetError

from .conftest import loop_device, need_root, need_tool
from .fsfill import content, sha256_file, tree

pytestmark = pytest.mark.root

VOLUME = 64 << 20
Files = dict[str, str]  # path inside the filesystem -> sha256 of its content


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def mounted(what: Path | str, mnt: Path, readonly: bool = False) -> Iterator[Path]:
    """Mount an image file (through a loop device of its own) or a block device; always unmounted."""
    mnt.mkdir(exist_ok=True)
    opts = ["ro"] if readonly else []
    if not str(what).startswith("/dev/"):
        opts.append("loop")
    run("mount", "-t", "ext4", "-o", ",".join(opts), str(what), str(mnt))
    try:
        yield mnt
    finally:
        # `-o loop` devices have autoclear set: unmounting detaches them
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def file_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.randint(0, 4096)
    if r < 0.93:
        return rng.randint(4096, 256 << 10)
    return rng.randint(256 << 10, 1 << 20)


def put(mnt: Path, rel: str, data: bytes, files: Files) -> None:
    p = mnt / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    files[rel] = hashlib.sha256(data).hexdigest()


def populate(mnt: Path, rng: random.Random, count: int) -> Files:
    files: Files = {}
    dirs = ["", "etc", "home/user", "home/user/docs", "var/log", "srv/data/a", "srv/data/b"]
    for i in range(count):
        put(mnt, f"{rng.choice(dirs)}/f{i:04d}.bin".lstrip("/"), content(rng, file_size(rng)), files)
    return files


def modify(mnt: Path, rng: random.Random, files: Files) -> tuple[Files, int]:
    """Change, delete, rename and add files; returns the new file set and the random bytes written."""
    files = dict(files)
    names = sorted(files)
    rng.shuffle(names)
    fresh = 0
    for rel in names[:25]:  # change: rewrite a range in place, or replace the whole file
        p = mnt / rel
        size = p.stat().st_size
        if size and rng.random() < 0.6:
            off = rng.randrange(size)
            patch = rng.randbytes(min(size - off, rng.randint(1, 64 << 10)))
            with open(p, "r+b") as f:
                f.seek(off)
                f.write(patch)
            fresh += len(patch)
            files[rel] = sha256_file(p)
        else:
            data = rng.randbytes(file_size(rng))
            put(mnt, rel, data, files)
            fresh += len(data)
    for rel in names[25:45]:  # delete
        (mnt / rel).unlink()
        del files[rel]
    for rel in names[45:50]:  # rename
        new = f"renamed/{Path(rel).name}"
        (mnt / "renamed").mkdir(exist_ok=True)
        (mnt / rel).rename(mnt / new)
        files[new] = files.pop(rel)
    for i in range(30):  # add
        data = rng.randbytes(file_size(rng))
        put(mnt, f"new/n{i:03d}.bin", data, files)
        fresh += len(data)
    return files, fresh


def fsck_clean(what: Path | str) -> None:
    r = subprocess.run(["e2fsck", "-fn", str(what)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"e2fsck -fn {what} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"


def test_ext4_chain_roundtrip(tmp_path: Path, repo: Path) -> None:
    need_root()
    need_tool("mkfs.ext4", "e2fsck", "mount", "umount", "losetup")
    rng = random.Random(20240611)
    vol, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    with open(vol, "wb") as f:
        f.truncate(VOLUME)
    # no lazy init: a kernel thread would otherwise keep zeroing inode tables while mounted
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-L", "ictest", str(vol))

    with mounted(vol, mnt):
        files0 = populate(mnt, rng, 320)
        assert tree(mnt) == files0
    image0 = sha256_file(vol)
    r0 = backup(str(vol), str(repo), all_blocks=True)
    assert r0.kind == "full" and r0.volume_size == VOLUME

    with mounted(vol, mnt):
        files1, fresh = modify(mnt, rng, files0)
        assert tree(mnt) == files1
    image1 = sha256_file(vol)
    assert image1 != image0
    r1 = backup(str(vol), str(repo), all_blocks=True)
    assert r1.kind == "incremental" and r1.chain_id == r0.chain_id and r1.sequence == 1
    assert r1.read_bytes == VOLUME
    # every byte of new random file content lies in a changed block, yet most of the volume did not change
    assert fresh <= r1.changed_bytes < VOLUME // 4, (fresh, r1.changed_bytes)
    assert r1.changed_blocks * r1.block_size >= r1.changed_bytes

    states = [(files0, image0), (files1, image1)]

    # every point to a new image file
    restored = []
    for seq, (want_files, want_image) in enumerate(states):
        res = open_point(f"{repo}::default@{seq}")
        out = tmp_path / f"restored{seq}.img"
        restore(res.repo, res.point, str(out))
        assert out.stat().st_size == VOLUME
        assert sha256_file(out) == want_image, f"point {seq} is not bit-exact"
        fsck_clean(out)
        with mounted(out, mnt, readonly=True):
            assert tree(mnt) == want_files
        restored.append(out)

    # the latest point onto a loop block device larger than the volume
    target = tmp_path / "device.img"
    with open(target, "wb") as f:
        f.truncate(VOLUME + (4 << 20))
    res = open_point(f"{repo}::default@latest")
    with loop_device(target) as dev:
        with pytest.raises(TargetError):
            restore(res.repo, res.point, dev)  # a device is overwritten only with force
        rr = restore(res.repo, res.point, dev, force=True)
        assert rr.volume_size == VOLUME
        fsck_clean(dev)
        with mounted(dev, mnt, readonly=True):
            assert tree(mnt) == files1
    assert target.stat().st_size == VOLUME + (4 << 20)  # a device is never truncated
    with open(target, "rb") as f:
        assert hashlib.sha256(f.read(VOLUME)).hexdigest() == image1

    # --delta: point 0 onto the changed image writes back exactly the blocks the incremental found changed
    current = tmp_path / "current.img"
    shutil.copyfile(vol, current)
    res = open_point(f"{repo}::default@0")
    rd = restore(res.repo, res.point, str(current), delta=True)
    assert rd.delta
    assert rd.written_blocks == r1.changed_blocks
    assert 0 < rd.written_bytes < VOLUME // 4
    assert sha256_file(current) == image0
    fsck_clean(current)
    with mounted(current, mnt, readonly=True):
        assert tree(mnt) == files0
    again = restore(res.repo, res.point, str(current), delta=True)
    assert again.written_blocks == 0
    for p in [*restored, current, target]:
        os.unlink(p)
