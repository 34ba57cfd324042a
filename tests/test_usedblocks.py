"""Used-block maps end to end, with the real tools: every filesystem kind is made by its mkfs, filled,
thinned out and its free space filled with stale data; backed up (only used blocks are read and stored),
changed, backed up again (freed blocks become UNUSED); every point restores to a filesystem that its
own checker passes and that holds exactly the files of that moment. Whole disks (GPT and MBR, with ext4,
FAT32 and NTFS partitions): one point per disk, a partition restores on its own, a disk restores onto a
larger device with its backup GPT moved to the new end."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imagechain.address import open_point
from imagechain.engine.backup import backup
from imagechain.engine.restore import partition_window, restore
from imagechain.errors import TargetError
from imagechain.usage import volume_usage

from .conftest import exe, loop_device, need_tool
from .fsfill import change, check_fs, fill, make_fs, mounted_fs, need_kind, tree

pytestmark = pytest.mark.root
BS = 64 << 10


def used_mask(image: Path, block_size: int = BS) -> np.ndarray:
    """The used map of an image as a backup computes it."""
    with open(image, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        u = volume_usage(lambda o, n: os.pread(f.fileno(), n, o), size, block_size)
    assert u.used is not None, u.method
    return u.used


def blocks(path: Path, mask: np.ndarray, bs: int = BS) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for b in np.flatnonzero(mask).tolist():
            f.seek(b * bs)
            yield b, f.read(bs)


def assert_restored(restored: Path, original: Path, used: np.ndarray) -> None:
    """Used blocks are the original's, bit for bit; unused ones read as zeros."""
    for (b, got), (_, want) in zip(blocks(restored, used), blocks(original, used), strict=True):
        assert got == want, f"used block {b} differs"
    for b, got in blocks(restored, ~used):
        assert not any(got), f"unused block {b} is not zero"


def stale_in_unused(image: Path, used: np.ndarray) -> int:
    """Bytes of non-zero data the original holds in blocks its filesystem does not use."""
    return sum(1 for _, data in blocks(image, ~used) if any(data))


@pytest.mark.parametrize("kind", ["ext4", "xfs", "ntfs", "fat12", "fat16", "fat32", "exfat"])
def test_used_blocks_roundtrip(kind: str, tmp_path: Path, repo: Path) -> None:
    need_kind(kind)
    rng = random.Random(f"used-{kind}")
    img = make_fs(tmp_path, kind)
    size = img.stat().st_size
    mnt = tmp_path / "mnt"
    with mounted_fs(img, kind, mnt) as m:
        files0 = fill(m, rng, count=60 if kind == "fat12" else 100, big=(256 << 10) if kind == "fat12" else 2 << 20,
                      stale=(1 << 20) if kind == "fat12" else 8 << 20)  # fmt: skip
    snap0 = tmp_path / "at0.img"
    shutil.copyfile(img, snap0)
    used0 = used_mask(snap0)
    assert stale_in_unused(snap0, used0) > 0, "the test must leave stale data in free space"

    r0 = backup(str(img), str(repo))
    assert r0.kind == "full" and r0.used_map.lower().startswith(("ext", "xfs", "ntfs", "fat", "exfat")), r0.used_map
    assert r0.unused_blocks == int((~used0).sum()) > 0
    assert r0.read_bytes <= int(used0.sum()) * BS < size

    with mounted_fs(img, kind, mnt) as m:
        files1 = change(m, rng, files0, big=(128 << 10) if kind == "fat12" else 1 << 20)
    snap1 = tmp_path / "at1.img"
    shutil.copyfile(img, snap1)
    used1 = used_mask(snap1)
    r1 = backup(str(img), str(repo))
    assert r1.kind == "incremental" and r1.unused_blocks == int((~used1).sum())
    freed = used0 & ~used1
    if freed.any():  # blocks freed by the deletions are recorded as UNUSED by the incremental
        assert r1.changed_blocks >= int(freed.sum())

    for seq, (snap, used, files) in enumerate([(snap0, used0, files0), (snap1, used1, files1)]):
        res = open_point(f"{repo}::default@{seq}")
        out = tmp_path / f"restored{seq}.img"
        rr = restore(res.repo, res.point, str(out))
        assert out.stat().st_size == size
        assert rr.written_bytes <= int(used.sum()) * BS
        assert_restored(out, snap, used)
        check_fs(out, kind)
        with mounted_fs(out, kind, mnt, readonly=True) as m:
            assert tree(m) == files, f"point {seq}: files differ"
        out.unlink()

    # --delta from the newest state back to point 0: unused blocks are left alone, the files come back
    res = open_point(f"{repo}::default@0")
    rd = restore(res.repo, res.point, str(img), delta=True)
    assert rd.written_blocks > 0
    check_fs(img, kind)
    with mounted_fs(img, kind, mnt, readonly=True) as m:
        assert tree(m) == files0


def test_all_blocks_and_unknown_filesystems(tmp_path: Path, repo: Path) -> None:
    """--all-blocks reads and keeps everything; a volume no parser knows is read whole, with a notice; a
    damaged filesystem falls back to every block and says why."""
    img = make_fs(tmp_path, "ext4")
    with mounted_fs(img, "ext4", tmp_path / "m") as m:
        fill(m, random.Random(3), count=40)
    size = img.stat().st_size
    r = backup(str(img), str(repo), chain="all", all_blocks=True)
    assert r.unused_blocks == 0 and r.used_map == "all blocks (--all-blocks)"
    out = tmp_path / "all.img"
    res = open_point(f"{repo}::all")
    restore(res.repo, res.point, str(out))
    assert out.read_bytes() == img.read_bytes()  # bit-exact, stale data included

    raw = tmp_path / "raw.img"
    raw.write_bytes(random.Random(4).randbytes(4 << 20))
    r = backup(str(raw), str(repo), chain="raw")
    assert r.unused_blocks == 0 and r.read_bytes == 4 << 20
    assert any("no filesystem recognised" in n for n in r.notices), r.notices

    bad = tmp_path / "bad.img"
    shutil.copyfile(img, bad)
    with open(bad, "r+b") as f:  # the journal "needs recovery": the bitmaps may not say what is in use
        f.seek(1024 + 0x60)
        incompat = int.from_bytes(f.read(4), "little")
        f.seek(1024 + 0x60)
        f.write((incompat | 0x4).to_bytes(4, "little"))
    r = backup(str(bad), str(repo), chain="bad", source_name="bad")
    assert r.unused_blocks == 0 and r.used_map.startswith("all blocks (ext4:"), r.used_map
    assert any("used-block map not used" in n for n in r.notices), r.notices
    assert r.read_bytes <= size


def test_holes_are_skipped_even_where_the_kernel_read_ahead_into_them(tmp_path: Path, repo: Path) -> None:
    """An image file's holes are found before it is read. An unwritten extent (fallocate) is a hole to
    SEEK_DATA only until readahead from the data before it puts pages there; asked chunk by chunk during
    the pass, it then looked like data and was read in full."""
    need_tool("fallocate")
    MiB = 1 << 20
    img = tmp_path / "v.img"
    rng = random.Random(5)
    with open(img, "wb") as f:
        f.write(rng.randbytes(24 * MiB))
        f.seek(40 * MiB)
        f.write(rng.randbytes(24 * MiB))
    subprocess.run(["fallocate", "-o", str(24 * MiB), "-l", str(16 * MiB), str(img)], check=True)
    fd = os.open(img, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if os.lseek(fd, 24 * MiB, os.SEEK_DATA) != 40 * MiB:
            pytest.skip("the filesystem of the test folder shows no unwritten extent as a hole to SEEK_DATA")
    finally:
        os.close(fd)
    r = backup(str(img), str(repo))
    assert r.read_bytes == 48 * MiB  # the 16 MiB extent was planned as a hole and never read
    if shutil.which("fincore"):  # and what the kernel read ahead into it was dropped with the rest
        cached = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(img)],
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert int(cached.split()[0]) < 4 * MiB
    out = tmp_path / "out.img"
    res = open_point(f"{repo}::default")
    restore(res.repo, res.point, str(out))
    assert out.read_bytes() == img.read_bytes()


def test_restore_zeroes_device_without_writing_zeros(tmp_path: Path, repo: Path) -> None:
    """Restoring with --force over a device full of other data: unused blocks read as zeros afterwards
    (zeroed by the device, not written as buffers), used blocks are the point's, the filesystem checks."""
    img = make_fs(tmp_path, "ext4")
    with mounted_fs(img, "ext4", tmp_path / "m") as m:
        files = fill(m, random.Random(5), count=60)
    used = used_mask(img)
    backup(str(img), str(repo))
    target = tmp_path / "dev.img"
    target.write_bytes(random.Random(6).randbytes(img.stat().st_size + (1 << 20)))
    res = open_point(f"{repo}::default")
    with loop_device(target) as dev:
        rr = restore(res.repo, res.point, dev, force=True)
        assert rr.zeroed_bytes >= int((~used).sum()) * BS - BS
        assert rr.written_bytes - rr.zeroed_bytes <= int(used.sum()) * BS  # data: used blocks only
    restored = tmp_path / "cut.img"
    with open(target, "rb") as f, open(restored, "wb") as g:
        g.write(f.read(img.stat().st_size))
    assert_restored(restored, img, used)
    check_fs(restored, "ext4")
    with mounted_fs(restored, "ext4", tmp_path / "m2", readonly=True) as m:
        assert tree(m) == files


# --- whole disks ------------------------------------------------------------------------------------------

PARTS = [("ext4", 48), ("fat32", 64), ("ntfs", 40)]  # MiB


@contextlib.contextmanager
def part_device(disk: Path, start: int, size: int) -> Iterator[str]:
    dev = subprocess.run(["losetup", "-f", "--show", "-o", str(start), "--sizelimit", str(size), str(disk)],
                         check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def sfdisk_json(what: Path | str) -> dict[str, object]:
    out = subprocess.run(["sfdisk", "--json", str(what)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["partitiontable"]  # type: ignore[no-any-return]


def make_disk(tmp_path: Path, label: str) -> tuple[Path, list[tuple[int, int, str]], dict[int, dict[str, str]]]:
    """A disk image with a partition table of `label` and PARTS formatted and filled. Returns the disk,
    [(start, size, kind)] per partition number 1.. and the files of each partition."""
    for k, _ in PARTS:
        need_kind(k)
    need_tool("sfdisk")
    disk = tmp_path / f"disk-{label}.img"
    with open(disk, "wb") as f:
        f.truncate((sum(s for _, s in PARTS) + 4) << 20)
    types = {"gpt": {"ext4": "linux", "fat32": "uefi", "ntfs": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"},
             "dos": {"ext4": "83", "fat32": "c", "ntfs": "7"}}[label]  # fmt: skip
    script = f"label: {label}\n" + "".join(f"size={s}MiB, type={types[k]}\n" for k, s in PARTS)
    subprocess.run(["sfdisk", "-q", str(disk)], input=script, text=True, check=True, capture_output=True)
    table = sfdisk_json(disk)
    sector = int(table.get("sectorsize", 512))  # type: ignore[call-overload]
    parts = [(int(p["start"]) * sector, int(p["size"]) * sector, PARTS[i][0])  # type: ignore[index]
             for i, p in enumerate(table["partitions"])]  # type: ignore[arg-type]
    files: dict[int, dict[str, str]] = {}
    rng = random.Random(label)
    for n, (start, size, kind) in enumerate(parts, 1):
        with part_device(disk, start, size) as dev:
            mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "fat32": ["mkfs.vfat", "-F", "32"],
                    "ntfs": ["mkntfs", "-F", "-Q"]}[kind]  # fmt: skip
            subprocess.run([*mkfs, dev], check=True, capture_output=True)
            with mounted_fs(dev, kind, tmp_path / f"m{n}") as m:
                files[n] = fill(m, rng, count=30, big=1 << 20, stale=4 << 20)
    return disk, parts, files


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_whole_disk(label: str, tmp_path: Path, repo: Path) -> None:
    disk, parts, files = make_disk(tmp_path, label)
    size = disk.stat().st_size
    r = backup(str(disk), str(repo))
    assert r.used_map.startswith(("gpt", "mbr")) and r.unused_blocks > 0, r.used_map
    res = open_point(f"{repo}::default")
    layout = res.point.header.metadata["layout"]
    assert isinstance(layout, dict)
    assert [(p["start"], p["size"]) for p in layout["partitions"]] == [(s, z) for s, z, _ in parts]
    assert [v["fs"] for v in layout["volumes"]] == [{"fat32": "vfat"}.get(k, k) for _, _, k in parts]
    shown = subprocess.run([exe(), "info", f"{repo}::default"], capture_output=True, text=True, check=True).stdout
    assert "partition table" in shown and all(f"partition {n}" in shown for n in range(1, len(parts) + 1)), shown

    # one partition on its own, to a new file: its filesystem checks and holds its files
    for n, (start, psize, kind) in enumerate(parts, 1):
        assert partition_window(res.point.header, n) == (start, psize)
        out = tmp_path / f"p{n}.img"
        restore(res.repo, res.point, str(out), window=partition_window(res.point.header, n))
        assert out.stat().st_size == psize
        check_fs(out, kind)
        with mounted_fs(out, kind, tmp_path / f"r{n}", readonly=True) as m:
            assert tree(m) == files[n], f"partition {n}"
        out.unlink()
    with pytest.raises(TargetError, match="no partition 9"):
        partition_window(res.point.header, 9)
    cli = subprocess.run([exe(), "restore", f"{repo}::default", str(tmp_path / "x.img"), "--partition", "9"],
                         capture_output=True, text=True)  # fmt: skip
    assert cli.returncode == 8 and "no partition 9" in cli.stderr and "Traceback" not in cli.stderr

    # the whole disk onto a larger device: the table reads back the same, the GPT's backup at the new end
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(size + (32 << 20))
    with loop_device(big) as dev:
        rr = restore(res.repo, res.point, dev, force=True)
        assert any("backup GPT" in n for n in rr.notices) == (label == "gpt"), rr.notices
        verify = subprocess.run(["sfdisk", "--verify", dev], capture_output=True, text=True)
        assert verify.returncode == 0 and "No errors detected" in verify.stdout, verify.stdout + verify.stderr
        after = sfdisk_json(dev)
    before = sfdisk_json(disk)
    assert [(p["start"], p["size"]) for p in after["partitions"]] == \
        [(p["start"], p["size"]) for p in before["partitions"]]  # type: ignore[index,union-attr]  # fmt: skip
    if label == "gpt":
        assert after["lastlba"] > before["lastlba"]  # type: ignore[operator]


@pytest.mark.parametrize("kind", ["ext4", "xfs", "ntfs", "fat16", "fat32", "exfat"])
def test_hostile_structures_never_break_a_backup(kind: str, tmp_path: Path) -> None:
    """Random bytes written over a filesystem's first MiB (superblocks, boot sectors, descriptors,
    tables): the map is made, or the volume is read whole with a notice saying why; never an exception.
    200 mutations per kind."""
    img = make_fs(tmp_path, kind)
    with mounted_fs(img, kind, tmp_path / "m") as m:
        fill(m, random.Random(1), count=20, stale=0)
    size = img.stat().st_size
    fd = os.open(img, os.O_RDONLY)
    original = os.pread(fd, 1 << 20, 0)
    rng = random.Random(f"hostile-{kind}")
    fallbacks = 0
    try:
        for _ in range(200):
            head = bytearray(original)
            for _ in range(rng.randint(1, 8)):
                at = rng.randrange(0, 8192 if rng.random() < 0.6 else len(head))
                head[at : at + rng.randint(1, 8)] = rng.randbytes(rng.randint(1, 8))

            def read(o: int, n: int, head: bytearray = head) -> bytes:
                data = bytearray(os.pread(fd, n, o))
                if o < len(head):
                    part = head[o : o + n]
                    data[: len(part)] = part
                return bytes(data)

            u = volume_usage(read, size, BS)
            if u.used is None:
                fallbacks += 1
                assert u.method.startswith("all blocks") and u.notices, u
    finally:
        os.close(fd)
    assert 0 < fallbacks < 200  # the mutations reached what the parser checks, and some left it intact
