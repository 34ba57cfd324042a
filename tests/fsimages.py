"""Real exFAT, FAT32 and NTFS filesystems for tests: a sparse image file, formatted with the
Debian mkfs tool and mounted through the Debian FUSE driver (the kernel here has no vfat, exfat
or ntfs3 driver), on a loop device.

    with fuse_disk(tmp_path, "vfat") as disk:
        mnt = disk.mount(tmp_path / "usb")      # mounted; unmount(), then mount() elsewhere
        ...

Every mount is unmounted, its driver process waited for, and the loop device detached, however
the test ends: a leaked FUSE mount breaks the rest of the suite."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import loop_device, need_root, need_tool

KINDS = ("exfat", "vfat", "ntfs")


@dataclass(frozen=True)
class FsKind:
    kind: str  # what imagechain.stores.local.filesystem_of should report
    mkfs: tuple[str, ...]  # the image or device path is appended
    mkfs_on_device: bool  # format the loop device (True) or the image file (False)
    driver: tuple[str, ...]  # the device and the mount point are appended
    size: int


FS: dict[str, FsKind] = {
    "exfat": FsKind("exfat", ("mkfs.exfat",), True, ("mount.exfat-fuse",), 64 << 20),
    # FAT32 needs 65525 clusters: 64 MiB with 512-byte clusters is about the smallest image that works
    "vfat": FsKind("vfat", ("mkfs.vfat", "-F", "32"), False, ("fusefat", "-o", "rw+"), 64 << 20),
    "ntfs": FsKind("ntfs", ("mkntfs", "-F", "-Q"), False, ("ntfs-3g", "-o", "windows_names"), 64 << 20),
}


def need_fs(kind: str) -> FsKind:
    """Skip (naming what is missing) unless this filesystem can be made and mounted here."""
    need_root()
    fs = FS[kind]
    need_tool(fs.mkfs[0], fs.driver[0], "losetup", "umount")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: FUSE is not available")
    return fs


def _daemons(mnt: str) -> list[int]:
    """Pids of live processes whose command line names the mount point: the FUSE driver."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{d}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if os.fsencode(mnt) in args and state != b"Z":
            out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mnt == real:
                return True
    return False


class FuseDisk:
    """One formatted image on a loop device; mounted at most once at a time."""

    def __init__(self, fs: FsKind, image: Path, dev: str) -> None:
        self.fs, self.image, self.dev = fs, image, dev
        self.mountpoint: Path | None = None
        self._pids: list[int] = []

    def mount(self, mnt: Path) -> Path:
        assert self.mountpoint is None, "already mounted"
        mnt.mkdir(parents=True, exist_ok=True)
        mnt = Path(os.path.realpath(mnt))
        r = subprocess.run([*self.fs.driver, self.dev, str(mnt)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or not is_mounted(mnt):
            raise RuntimeError(f"{self.fs.driver[0]} {self.dev} {mnt} failed ({r.returncode}): {r.stderr.strip()}")
        self.mountpoint = mnt
        self._pids = _daemons(str(mnt))
        return mnt

    def unmount(self) -> None:
        mnt = self.mountpoint
        if mnt is None:
            return
        os.sync()
        for cmd in (["fusermount", "-u", str(mnt)], ["umount", str(mnt)], ["umount", "-l", str(mnt)]):
            if not is_mounted(mnt):
                break
            with contextlib.suppress(FileNotFoundError, subprocess.TimeoutExpired):
                subprocess.run(cmd, capture_output=True, timeout=60)
        # a FUSE driver may still be flushing after the mount is gone (fusefat, a plain fuse mount,
        # returns from umount at once): wait for it before anyone touches the device again
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in self._pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.mountpoint = None
        if is_mounted(mnt):
            raise RuntimeError(f"could not unmount {mnt}")


@contextlib.contextmanager
def fuse_disk(tmp_path: Path, kind: str, name: str = "disk") -> Iterator[FuseDisk]:
    """A freshly formatted filesystem of `kind` on a loop device, unmounted; cleaned up on exit."""
    fs = need_fs(kind)
    image = tmp_path / f"{name}-{kind}.fsimg"
    with open(image, "wb") as f:
        f.truncate(fs.size)
    if not fs.mkfs_on_device:
        subprocess.run([*fs.mkfs, str(image)], check=True, capture_output=True, timeout=120)
    with loop_device(image) as dev:
        if fs.mkfs_on_device:
            subprocess.run([*fs.mkfs, dev], check=True, capture_output=True, timeout=120)
        disk = FuseDisk(fs, image, dev)
        try:
            yield disk
        finally:
            disk.unmount()
