"""Real filesystems of every kind the used-block parsers know, made by the Debian tools, filled with
files, some deleted, and the free space then filled with stale data (so that an unused block that was
restored as zeros, or a used one that was not, shows).

    img = make_fs(tmp_path, "xfs")                   # a formatted image file
    with mounted_fs(img, "xfs", tmp_path / "m") as m:  # kernel mount (ext4, xfs) or FUSE (ntfs, vfat, exfat)
        files = fill(m, rng)                         # {relative path: sha256}
    check_fs(img, "xfs")                             # the real checker, read-only; asserts it is clean

Every mount is undone, its loop device detached and its FUSE driver waited for, however a test ends."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import loop_device, need_root, need_tool
from .fsimages import FsKind, FuseDisk


@dataclass(frozen=True)
class Kind:
    mkfs: tuple[str, ...]  # the image path is appended
    size: int  # image bytes
    fuse: tuple[str, ...] = ()  # FUSE driver (device, mount point appended); empty: the kernel mounts it
    fstype: str = ""  # for the kernel's mount -t
    check: tuple[str, ...] = ()  # read-only checker; the image path is appended
    mkfs_on_device: bool = False


KINDS: dict[str, Kind] = {
    "ext4": Kind(("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"), 64 << 20,
                 fstype="ext4", check=("e2fsck", "-fn")),
    "ext2": Kind(("mkfs.ext2", "-q", "-F"), 32 << 20, fstype="ext2", check=("e2fsck", "-fn")),
    "xfs": Kind(("mkfs.xfs", "-q", "-f"), 320 << 20, fstype="xfs", check=("xfs_repair", "-n")),
    "ntfs": Kind(("mkntfs", "-F", "-Q"), 64 << 20, fuse=("ntfs-3g",), check=("ntfsfix", "-n")),
    "fat12": Kind(("mkfs.vfat", "-F", "12"), 8 << 20, fuse=("fusefat", "-o", "rw+"), check=("fsck.vfat", "-n")),
    "fat16": Kind(("mkfs.vfat", "-F", "16"), 64 << 20, fuse=("fusefat", "-o", "rw+"), check=("fsck.vfat", "-n")),
    "fat32": Kind(("mkfs.vfat", "-F", "32"), 64 << 20, fuse=("fusefat", "-o", "rw+"), check=("fsck.vfat", "-n")),
    "exfat": Kind(("mkfs.exfat",), 64 << 20, fuse=("mount.exfat-fuse",), check=("fsck.exfat", "-n")),
}


def need_kind(kind: str) -> Kind:
    """Skip, naming what is missing, unless this filesystem can be made, mounted and checked here."""
    need_root()
    k = KINDS[kind]
    need_tool(k.mkfs[0], k.check[0], "losetup", "mount", "umount", *(k.fuse[:1]))
    if k.fuse and not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: FUSE is not available")
    return k


def make_fs(folder: Path, kind: str, size: int | None = None, name: str = "") -> Path:
    k = need_kind(kind)
    img = folder / f"{name or kind}.fsimg"
    with open(img, "wb") as f:
        f.truncate(size or k.size)
    subprocess.run([*k.mkfs, str(img)], check=True, capture_output=True, timeout=120)
    return img


@contextlib.contextmanager
def mounted_fs(what: Path | str, kind: str, mnt: Path, readonly: bool = False) -> Iterator[Path]:
    """Mount an image file (through a loop device) or a block device; always unmounted again."""
    k = need_kind(kind)
    mnt.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        dev = str(what) if str(what).startswith("/dev/") else stack.enter_context(loop_device(Path(what)))
        if k.fuse:
            driver = (*k.fuse, *(("-o", "ro") if readonly else ()))
            disk = FuseDisk(FsKind(kind, (), False, driver, 0), Path(what), dev)
            stack.callback(disk.unmount)
            yield disk.mount(mnt)
        else:
            opts = "ro,norecovery" if readonly and kind == "xfs" else ("ro" if readonly else "rw")
            subprocess.run(["mount", "-t", k.fstype, "-o", opts, dev, str(mnt)], check=True, capture_output=True)
            try:
                yield mnt
            finally:
                os.sync()
                if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
                    subprocess.run(["umount", "-l", str(mnt)], check=False)


def check_fs(what: Path | str, kind: str) -> None:
    k = KINDS[kind]
    r = subprocess.run([*k.check, str(what)], capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0, f"{' '.join(k.check)} {what} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree(mnt: Path) -> dict[str, str]:
    """Every regular file under a mount point (system folders aside) with its sha256."""
    out = {}
    for p in mnt.rglob("*"):
        rel = p.relative_to(mnt).as_posix()
        if rel.startswith(("lost+found", "System Volume Information", "$")):
            continue
        if p.is_file() and not p.is_symlink():
            out[rel] = sha256_file(p)
    return out


def content(rng: random.Random, size: int) -> bytes:
    """Random (incompressible) or text-like (compressible) bytes."""
    if rng.random() < 0.5:
        return rng.randbytes(size)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(50)]
    return b" ".join(rng.choices(words, k=size // 4 + 1))[:size]


def _size(rng: random.Random, big: int) -> int:
    """Half small files, most of the rest up to 200 KiB (or `big`), a tenth up to `big`."""
    r = rng.random()
    mid = min(200 << 10, big)
    if r < 0.5:
        return rng.randint(0, min(6000, big))
    if r < 0.9:
        return rng.randint(min(6000, mid), mid)
    return rng.randint(mid, big)


def fill(mnt: Path, rng: random.Random, count: int = 120, big: int = 2 << 20, stale: int = 8 << 20) -> dict[str, str]:
    """Write `count` files in a few folders, delete about a third of them, then write `stale` bytes of
    random data to a file that is deleted again: free space now holds data no file uses. Returns the
    files that remain, {path: sha256}."""
    files: dict[str, str] = {}
    dirs = ["", "docs", "docs/old", "data/a", "data/b"]
    for i in range(count):
        rel = f"{rng.choice(dirs)}/f{i:04d}.bin".lstrip("/")
        data = content(rng, _size(rng, big))
        (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
        (mnt / rel).write_bytes(data)
        files[rel] = hashlib.sha256(data).hexdigest()
    for rel in rng.sample(sorted(files), len(files) // 3):
        (mnt / rel).unlink()
        del files[rel]
    if stale:
        with open(mnt / "stale.tmp", "wb") as f:
            for _ in range(stale // (1 << 20)):
                f.write(rng.randbytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        (mnt / "stale.tmp").unlink()
    return files


def change(mnt: Path, rng: random.Random, files: dict[str, str], big: int = 1 << 20) -> dict[str, str]:
    """Rewrite some files in place, delete some, add new ones; returns the new file set."""
    files = dict(files)
    names = sorted(files)
    rng.shuffle(names)
    for rel in names[:10]:
        p = mnt / rel
        size = p.stat().st_size
        if size:
            with open(p, "r+b") as f:
                f.seek(rng.randrange(size))
                f.write(rng.randbytes(min(4096, size)))
            files[rel] = sha256_file(p)
    for rel in names[10:20]:
        (mnt / rel).unlink()
        del files[rel]
    for i in range(15):
        data = content(rng, _size(rng, big))
        rel = f"new/n{i:03d}.bin"
        (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
        (mnt / rel).write_bytes(data)
        files[rel] = hashlib.sha256(data).hexdigest()
    return files


def zero_unused(image: Path, used: object, block_size: int, out: Path) -> Path:
    """A copy of `image` in which every block the mask (numpy bool per block) says is unused is zeros:
    what a restore of a used-blocks-only point gives. A filesystem that still checks clean and holds the
    same files proves the mask kept every block that matters."""
    import numpy as np

    mask = np.asarray(used, bool)
    with open(image, "rb") as src, open(out, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        for b in np.flatnonzero(mask).tolist():
            src.seek(b * block_size)
            dst.seek(b * block_size)
            dst.write(src.read(block_size))
    return out
