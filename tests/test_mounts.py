"""imagechain.mounts against real mounts: ext4 on loop devices (files, partitions, loops on loops), read-only and
read-write, other mount namespaces; plus the mountinfo parsing and the one-line evidence."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagechain.mounts import MountUse, _parse_mountinfo, describe, exclusive_open, mounted_uses, read_write

from .conftest import loop_device, need_root, need_tool

MiB = 1024 * 1024
PART_START = 1 * MiB  # the one partition of a partitioned image: from 1 MiB to the end


def _run(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout.strip()


def ext4_image(path: Path, size: int = 4 * MiB) -> Path:
    need_tool("mkfs.ext4")
    with open(path, "wb") as f:
        f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", str(path))
    return path


@contextlib.contextmanager
def mounted(dev: str, where: Path, *options: str) -> Iterator[Callable[[], None]]:
    """Mount for the block; yields an umount function, and unmounts in any case on the way out."""
    need_root()
    need_tool("mount", "umount")
    where.mkdir(parents=True, exist_ok=True)
    _run("mount", *options, dev, str(where))
    state = {"mounted": True}

    def umount() -> None:
        _run("umount", str(where))
        state["mounted"] = False

    try:
        yield umount
    finally:
        if state["mounted"]:
            subprocess.run(["umount", str(where)], check=False, capture_output=True)


def write_mbr(image: Path, size: int) -> None:
    """An image with an MBR holding one Linux partition from 1 MiB (what `sfdisk` would write; no tool needed)."""
    with open(image, "wb") as f:
        f.truncate(size)
        entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\xfe\xff\xff", PART_START // 512,
                            (size - PART_START) // 512)  # fmt: skip
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")


class _BlkpgPartition(ctypes.Structure):
    _fields_ = [("start", ctypes.c_longlong), ("length", ctypes.c_longlong), ("pno", ctypes.c_int),
                ("devname", ctypes.c_char * 64), ("volname", ctypes.c_char * 64)]  # fmt: skip


class _BlkpgIoctlArg(ctypes.Structure):
    _fields_ = [("op", ctypes.c_int), ("flags", ctypes.c_int), ("datalen", ctypes.c_int), ("data", ctypes.c_void_p)]


def add_partition(dev: str, number: int, start: int, length: int) -> None:
    """Register a partition with the kernel (BLKPG_ADD_PARTITION, what `partx -a` does): works on kernels built
    without partition-table parsers, where `losetup -P` finds no partition."""
    part = _BlkpgPartition(start, length, number, b"", b"")
    arg = _BlkpgIoctlArg(1, 0, ctypes.sizeof(part), ctypes.addressof(part))
    fd = os.open(dev, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x1269, bytes(arg))  # BLKPG
    finally:
        os.close(fd)


def _appears(path: str, seconds: float = 2.0) -> bool:
    end = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@contextlib.contextmanager
def partitioned_loop(image: Path, size: int) -> Iterator[tuple[str, str]]:
    """A loop device with partition scanning and its first partition (loopNp1), detached on the way out."""
    need_root()
    need_tool("losetup")
    dev = _run("losetup", "-f", "--show", "-P", str(image))
    try:
        part = dev + "p1"
        if not _appears(part, 0.5):
            add_partition(dev, 1, PART_START, size - PART_START)
            assert _appears(part), f"{part} did not appear"
        yield dev, part
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _real(p: Path) -> str:
    return os.path.realpath(p)


def _check_one_line(use: MountUse) -> str:
    line = describe(use)
    assert "\n" not in line and line.isprintable(), line
    return line


# ---- real mounts


def test_image_file_mounted_read_write(tmp_path: Path) -> None:
    image = ext4_image(tmp_path / "vol.img")
    mnt = tmp_path / "mnt"
    with loop_device(image) as dev, mounted(dev, mnt) as umount:
        uses = mounted_uses(str(image))
        assert len(uses) == 1, uses
        u = uses[0]
        assert (u.device, u.mountpoint, u.fstype, u.read_only) == (dev, _real(mnt), "ext4", False)
        assert u.via == f"loop device {dev} backed by it"
        assert read_write(uses) == uses
        line = _check_one_line(u)
        assert line == f"{dev} (ext4) is mounted read-write at {_real(mnt)} (loop device {dev} backed by it)"

        [d] = mounted_uses(dev)
        assert (d.device, d.mountpoint, d.via, d.read_only) == (dev, _real(mnt), "the device itself", False)

        assert exclusive_open(dev, os.O_RDONLY) is None  # the mount holds it
        umount()
        assert mounted_uses(str(image)) == [] and mounted_uses(dev) == []
        fd = exclusive_open(dev, os.O_RDONLY)
        assert fd is not None
        try:
            assert exclusive_open(dev, os.O_RDONLY) is None  # another exclusive opener (us) holds it now
        finally:
            os.close(fd)


def test_mounted_read_only(tmp_path: Path) -> None:
    image = ext4_image(tmp_path / "vol.img")
    with loop_device(image) as dev, mounted(dev, tmp_path / "mnt", "-o", "ro"):
        uses = mounted_uses(str(image))
        assert [(u.device, u.read_only, u.mount_read_only) for u in uses] == [(dev, True, True)]
        assert read_write(uses) == []
        assert "is mounted read-only at" in _check_one_line(uses[0])
        assert [u.read_only for u in mounted_uses(dev)] == [True]


def test_read_only_bind_of_a_writable_filesystem_counts_as_read_write(tmp_path: Path) -> None:
    """A "ro" bind mount of a filesystem whose superblock is rw: the filesystem (and the kernel: journal, lazy inode
    table init) still writes, so the image would be torn."""
    image = ext4_image(tmp_path / "vol.img")
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    with loop_device(image) as dev, mounted(dev, rw) as umount_rw:
        ro.mkdir()
        _run("mount", "--bind", str(rw), str(ro))
        try:
            _run("mount", "-o", "remount,bind,ro", str(ro))
            umount_rw()
            [u] = mounted_uses(dev)
            assert (u.mountpoint, u.mount_read_only, u.read_only) == (_real(ro), True, False)
            assert read_write([u]) == [u]
            assert "but its filesystem is read-write" in _check_one_line(u)
        finally:
            subprocess.run(["umount", str(ro)], check=False, capture_output=True)


def test_partition_of_a_loop_device(tmp_path: Path) -> None:
    size = 8 * MiB
    image = tmp_path / "disk.img"
    write_mbr(image, size)
    need_tool("mkfs.ext4")
    mnt = tmp_path / "mnt"
    with partitioned_loop(image, size) as (dev, part):
        _run("mkfs.ext4", "-q", "-F", part)
        assert mounted_uses(dev) == [] and mounted_uses(str(image)) == []
        with mounted(part, mnt):
            [u] = mounted_uses(dev)
            assert (u.device, u.mountpoint, u.read_only) == (part, _real(mnt), False)
            assert u.via == f"partition {part} of it"
            [f] = mounted_uses(str(image))
            assert (f.device, f.via) == (part, f"partition {part} of loop device {dev} backed by it")
            [p] = mounted_uses(part)
            assert p.via == "the device itself"
            _check_one_line(f)
            # the kernel's own answer: a whole disk with a mounted partition cannot be opened exclusively
            assert exclusive_open(dev, os.O_RDONLY) is None
            assert exclusive_open(part, os.O_RDONLY) is None
        assert mounted_uses(dev) == [] and mounted_uses(str(image)) == []


def test_loop_device_on_a_partition(tmp_path: Path) -> None:
    """Case 4: a loop device whose backing is a partition of the path; the kernel does not see this one."""
    size = 8 * MiB
    image = tmp_path / "disk.img"
    write_mbr(image, size)
    need_tool("mkfs.ext4")
    with partitioned_loop(image, size) as (dev, part), loop_device(Path(part)) as inner:
        _run("mkfs.ext4", "-q", "-F", inner)
        with mounted(inner, tmp_path / "mnt"):
            [u] = mounted_uses(dev)
            assert (u.device, u.via) == (inner, f"loop device {inner} on partition {part} of it")
            [p] = mounted_uses(part)
            assert (p.device, p.via) == (inner, f"loop device {inner} on it")
            [f] = mounted_uses(str(image))
            assert f.via == f"loop device {inner} on partition {part} of loop device {dev} backed by it"
            # loop does not claim its backing device: O_EXCL succeeds here, only the mount table shows the use
            fd = exclusive_open(part, os.O_RDONLY)
            print(f"O_EXCL on {part} under a mounted loop device: {'EBUSY' if fd is None else 'opened'}")
            if fd is not None:
                os.close(fd)


def test_partition_of_a_mounted_whole_disk(tmp_path: Path) -> None:
    """A filesystem on the whole disk is mounted: writing a partition of it writes into that filesystem."""
    size = 8 * MiB
    image = ext4_image(tmp_path / "whole.img", size)
    with partitioned_loop(image, size) as (dev, part), mounted(dev, tmp_path / "mnt"):
        [u] = mounted_uses(part)
        assert (u.device, u.via) == (dev, f"whole disk {dev} containing it")


def test_attached_but_not_mounted(tmp_path: Path) -> None:
    image = ext4_image(tmp_path / "vol.img")
    with loop_device(image) as dev:
        assert mounted_uses(str(image)) == [] and mounted_uses(dev) == []
        fd = exclusive_open(dev, os.O_RDONLY)
        assert fd is not None
        os.close(fd)
    assert mounted_uses(str(image)) == []


def test_mount_point_with_space_tab_and_backslash(tmp_path: Path) -> None:
    image = ext4_image(tmp_path / "vol.img")
    mnt = tmp_path / "mount point\twith\\odd name"
    with loop_device(image) as dev, mounted(dev, mnt):
        [u] = mounted_uses(str(image))
        assert u.mountpoint == _real(mnt)
        line = _check_one_line(u)
        assert "mount point\\twith\\odd name" in line  # the tab is escaped so the evidence stays one line


def test_mount_in_another_namespace(tmp_path: Path) -> None:
    """A mount only a container (a private mount namespace) sees still makes the image torn."""
    need_tool("unshare")
    image = ext4_image(tmp_path / "vol.img")
    mnt = tmp_path / "private"
    mnt.mkdir()
    with loop_device(image) as dev:
        proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f'mount "{dev}" "{mnt}" && echo ready && exec sleep 60'],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            assert not os.path.ismount(mnt)  # not in our namespace
            [u] = mounted_uses(str(image))
            assert (u.device, u.mountpoint, u.pid, u.read_only) == (dev, _real(mnt), proc.pid, False)
            assert f"in the mount namespace of process {proc.pid}" in _check_one_line(u)
        finally:
            proc.kill()
            proc.wait()
        for _ in range(100):  # the namespace, and with it the mount, goes away with its last process
            if mounted_uses(dev) == []:
                break
            time.sleep(0.02)
        assert mounted_uses(dev) == []


def test_neither_file_nor_device(tmp_path: Path) -> None:
    assert mounted_uses(str(tmp_path)) == []  # a folder
    assert mounted_uses("/dev/null") == []  # a character device
    assert mounted_uses(str(tmp_path / "missing")) == []
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * 4096)
    assert mounted_uses(str(plain)) == []
    fd = exclusive_open(str(plain), os.O_RDONLY)
    assert fd is not None
    os.close(fd)
    with pytest.raises(FileNotFoundError):
        exclusive_open(str(tmp_path / "missing"), os.O_RDONLY)
    fd = exclusive_open(str(tmp_path / "new.img"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # a new restore target
    assert fd is not None
    os.close(fd)


# ---- no root needed


def test_parse_mountinfo_escapes_and_optional_fields() -> None:
    table = (
        b"36 35 98:0 /mnt1 /mnt/with\\040space\\011tab\\012nl\\134bs rw,noatime master:1 shared:2 - ext3 /dev/root"
        b" rw,errors=continue\n"
        b"40 27 7:3 / /srv/data ro,relatime - ext4 /dev/loop3 ro\n"
        b"41 27 0:44 / /srv/\\303\\251t\\351 rw - fuseblk /dev/sdb1 rw,user_id=0\n"
        b"garbage line\n"
    )
    a, b, c = list(_parse_mountinfo(table))
    assert a.mountpoint == "/mnt/with space\ttab\nnl\\bs"
    assert (a.dev, a.fstype, a.source, a.mount_ro, a.super_ro) == (os.makedev(98, 0), "ext3", "/dev/root", False, False)
    assert (b.dev, b.mount_ro, b.super_ro) == (os.makedev(7, 3), True, True)
    assert c.mountpoint == os.fsdecode(b"/srv/\xc3\xa9t\xe9")  # UTF-8 "é" then a lone Latin-1 byte
    assert (c.fstype, c.source) == ("fuseblk", "/dev/sdb1")


def test_describe_stays_one_line() -> None:
    u = MountUse(os.fsdecode(b"/mnt/a\nb\xff"), "/dev/sdb1", "ext4", False, "partition /dev/sdb1 of it")
    assert describe(u) == "/dev/sdb1 (ext4) is mounted read-write at /mnt/a\\nb\\xff (partition /dev/sdb1 of it)"
    ro = MountUse("/mnt", "/dev/loop3", "ext4", True, "the device itself", mount_read_only=True)
    assert describe(ro) == "/dev/loop3 (ext4) is mounted read-only at /mnt (the device itself)"
    assert read_write([u, ro]) == [u]


def test_backing_file_renamed_away_is_found_by_inode(tmp_path: Path) -> None:
    """sysfs shows the loop's backing file as "<old name> (deleted)" once that name is unlinked; another link to
    the same inode is still the same storage, and is found through the kernel's device and inode numbers."""
    image = ext4_image(tmp_path / "vol.img")
    other = tmp_path / "other-name.img"
    with loop_device(image) as dev, mounted(dev, tmp_path / "mnt"):
        os.link(image, other)
        image.unlink()
        backing = Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip()
        assert backing.endswith(" (deleted)"), backing
        [u] = mounted_uses(str(other))
        assert (u.device, u.via) == (dev, f"loop device {dev} backed by it")


def test_backing_file_text_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the loop device node cannot be opened (no ioctl answer), sysfs's backing_file text is used."""
    import imagechain.mounts as mounts

    image = ext4_image(tmp_path / "vol.img")
    monkeypatch.setattr(mounts, "_loop_status", lambda dev: None)
    with loop_device(image) as dev, mounted(dev, tmp_path / "mnt"):
        [u] = mounted_uses(str(image))
        assert (u.device, u.via) == (dev, f"loop device {dev} backed by it")
        assert [x.via for x in mounted_uses(dev)] == ["the device itself"]
