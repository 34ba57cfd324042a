"""The ext2/3/4 used-block parser against real filesystems: its block view must equal what dumpe2fs
reports (libext2fs's own reading of the bitmaps), a copy with every block it calls unused zeroed must
still check clean and hold the same files, and damaged or dirty filesystems must be refused."""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from imagechain.usedmap import Area, Unusable, UsedMap, ext4
from imagechain.usedmap.crc import crc32c_raw

from .conftest import need_tool
from .fsfill import check_fs, fill, mounted_fs, need_kind, tree, zero_unused

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class Config:
    mkfs: tuple[str, ...]
    size: int  # image bytes
    mount: str = "ext4"  # fsfill kind: its mount type and checker
    fs_size: str = ""  # mkfs's size argument: a filesystem smaller than its image
    small: bool = True  # a light fill (the image is 32-128 MiB)
    uninit: bool = False  # mkfs leaves BLOCK_UNINIT groups that must still be there after the fill


CONFIGS = {
    # 4 KiB blocks, 5 groups (the last short), flex_bg, 64bit, metadata_csum, lazy init: BLOCK_UNINIT groups
    "ext4-600M": Config(("mkfs.ext4", "-q", "-F"), 600 << 20, small=False, uninit=True),
    "ext4-1k": Config(("mkfs.ext4", "-q", "-F", "-b", "1024"), 64 << 20),
    "ext4-noflex-32bit": Config(("mkfs.ext4", "-q", "-F", "-b", "1024", "-O", "^flex_bg,^64bit"), 64 << 20),
    "ext4-2k-gdtcsum": Config(
        ("mkfs.ext4", "-q", "-F", "-b", "2048", "-g", "4096", "-O", "^metadata_csum,uninit_bg"), 64 << 20
    ),
    "ext4-bigalloc": Config(("mkfs.ext4", "-q", "-F", "-O", "bigalloc", "-C", "16384"), 128 << 20),
    # 64 groups of 1 MiB: four meta_bg metagroups, descriptor blocks in groups 0/1/15, 16/17/31, ...
    "ext4-meta_bg": Config(
        ("mkfs.ext4", "-q", "-F", "-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode"), 64 << 20
    ),
    "ext4-sparse_super2": Config(("mkfs.ext4", "-q", "-F", "-b", "1024", "-O", "sparse_super2"), 64 << 20),
    "ext3-short": Config(("mkfs.ext3", "-q", "-F"), 64 << 20, fs_size="60M"),
    "ext2": Config(("mkfs.ext2", "-q", "-F"), 32 << 20, mount="ext2"),
    "ext2-nosparse": Config(("mkfs.ext2", "-q", "-F", "-O", "^sparse_super,^resize_inode"), 32 << 20, mount="ext2"),
}
CASES = [("ext4-600M", 1), ("ext4-600M", 2), ("ext4-1k", 1), ("ext4-1k", 2), ("ext4-1k", 3),
         ("ext4-noflex-32bit", 1), ("ext4-noflex-32bit", 2), ("ext4-2k-gdtcsum", 1), ("ext4-bigalloc", 1),
         ("ext4-meta_bg", 1), ("ext4-sparse_super2", 1), ("ext3-short", 1), ("ext2", 1), ("ext2", 2),
         ("ext2-nosparse", 1)]  # fmt: skip


def make(folder: Path, cfg: Config, name: str) -> Path:
    need_kind(cfg.mount)
    img = folder / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(cfg.size)
    subprocess.run([*cfg.mkfs, str(img), *([cfg.fs_size] if cfg.fs_size else [])], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    return img


def run_parse(img: Path, block_size: int) -> tuple[str, np.ndarray]:
    """The parser's description and its used mask at `block_size`."""
    size = img.stat().st_size
    m = UsedMap(size, block_size)
    with open(img, "rb") as f:
        desc = ext4.parse(Area(0, size, lambda o, n: os.pread(f.fileno(), n, o), m))
    return desc, m.used


def parser_blocks(img: Path) -> np.ndarray:
    size = img.stat().st_size
    with open(img, "rb") as f:
        return ext4.used_blocks(Area(0, size, lambda o, n: os.pread(f.fileno(), n, o), UsedMap(size, 4096)))


def refused(img: Path) -> str:
    with pytest.raises(Unusable) as e:
        run_parse(img, 4096)
    return str(e.value)


@dataclass
class ToolView:
    used: np.ndarray  # per block: not listed free by dumpe2fs
    groups: list[tuple[int, int, bool]]  # first block, last block, BLOCK_UNINIT


def dumpe2fs(img: Path) -> ToolView:
    out = subprocess.run(["dumpe2fs", str(img)], check=True, capture_output=True, text=True).stdout

    def header(name: str) -> int:
        m = re.search(rf"^{name}:\s+(\d+)", out, re.M)
        return int(m[1]) if m else 0

    blocks = header("Block count")
    # With bigalloc a free range "a-b" names clusters by their first blocks: b is the last free cluster's first.
    ratio = max(1, header("Cluster size") // header("Block size"))
    used = np.ones(blocks, bool)
    groups: list[tuple[int, int, bool]] = []
    for line in out.splitlines():
        if m := re.match(r"Group \d+: \(Blocks (\d+)-(\d+)\)(.*)", line):
            groups.append((int(m[1]), int(m[2]), "BLOCK_UNINIT" in m[3]))
        elif (m := re.match(r"\s+Free blocks: (.*)", line)) and m[1].strip():
            for part in m[1].split(","):
                a, _, b = part.strip().partition("-")
                used[int(a) // ratio * ratio : (int(b or a) // ratio + 1) * ratio] = False
    return ToolView(used, groups)


Filled = tuple[Path, dict[str, str], Config]


@pytest.fixture(scope="module", params=CASES, ids=[f"{c}-seed{s}" for c, s in CASES])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Filled:
    """A filesystem filled (files written, a third deleted, stale data left in free space), unmounted."""
    name, seed = request.param
    cfg = CONFIGS[name]
    need_tool("dumpe2fs")
    folder = tmp_path_factory.mktemp(f"{name}-{seed}")
    img = make(folder, cfg, name)
    rng = random.Random(seed)
    with mounted_fs(img, cfg.mount, folder / "m") as m:
        files = fill(m, rng, count=60, big=1 << 20, stale=4 << 20) if cfg.small else fill(m, rng)
    check_fs(img, cfg.mount)
    return img, files, cfg


def test_matches_dumpe2fs(filled: Filled) -> None:
    """Per group: initialised groups exactly as dumpe2fs; BLOCK_UNINIT groups at least its view (libext2fs
    computes their metadata as the parser does, so they are equal too)."""
    img, _, cfg = filled
    mine = parser_blocks(img)
    tool = dumpe2fs(img)
    assert len(mine) == len(tool.used)
    uninit = 0
    for first, last, is_uninit in tool.groups:
        a, b = mine[first : last + 1], tool.used[first : last + 1]
        assert not (b & ~a).any(), f"blocks dumpe2fs says used, parser says free: {np.flatnonzero(b & ~a) + first}"
        extra = np.flatnonzero(a & ~b) + first
        if is_uninit:
            uninit += 1
        assert not len(extra), f"group at {first}: parser marks free blocks used: {extra[:20]}"
    if cfg.uninit:
        assert uninit, "mkfs left no BLOCK_UNINIT group: the case is not tested"
    first_group = tool.groups[0][0]
    assert mine[:first_group].all()  # block 0 of a 1 KiB filesystem: boot area
    print(f"\n{img.name}: dumpe2fs used {int(tool.used.sum())}, parser used {int(mine.sum())} "
          f"of {len(mine)} blocks; {uninit} BLOCK_UNINIT groups")  # fmt: skip


@pytest.mark.parametrize("block_size", [4096, 65536])
def test_zero_unused_keeps_files(filled: Filled, block_size: int, tmp_path: Path) -> None:
    img, files, cfg = filled
    desc, used = run_parse(img, block_size)
    assert desc.startswith(("ext2", "ext3", "ext4"))
    assert used.mean() < 0.8, f"{desc}: {used.mean():.0%} used after a light fill"
    fs_end = ext4_size(img)
    if fs_end < img.stat().st_size:
        assert used[fs_end // block_size :].all(), "bytes past the filesystem's end must count as used"
    out = zero_unused(img, used, block_size, tmp_path / "zeroed.img")
    check_fs(out, cfg.mount)
    with mounted_fs(out, cfg.mount, tmp_path / "m", readonly=True) as m:
        assert tree(m) == files
    # Stale data sat in the blocks called unused, and is gone from the copy.
    stale = changed = 0
    with open(img, "rb") as a, open(out, "rb") as b:
        for blk in np.flatnonzero(~used & written(img, block_size)).tolist():
            data = os.pread(a.fileno(), block_size, blk * block_size)
            if data.count(0) != len(data):
                stale += 1
                changed += os.pread(b.fileno(), block_size, blk * block_size) != data
    assert stale > 0 and changed == stale
    print(f"\n{desc}: {int(used.sum())} of {len(used)} blocks of {block_size} used; {stale} unused held stale data")


def written(img: Path, block_size: int) -> np.ndarray:
    """Per block: does the (sparse) image file hold data there? Skips the holes when looking for stale data."""
    size = img.stat().st_size
    out = np.zeros(-(-size // block_size), bool)
    with open(img, "rb") as f:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # no data after pos
                break
            pos = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out[start // block_size : -(-pos // block_size)] = True
    return out


def ext4_size(img: Path) -> int:
    with open(img, "rb") as f:
        sb = os.pread(f.fileno(), 1024, 1024)
    return int(struct.unpack_from("<I", sb, 4)[0]) * (1024 << struct.unpack_from("<I", sb, 0x18)[0])


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fresh, small filesystems to damage copies of."""
    folder = tmp_path_factory.mktemp("pristine")
    return {n: make(folder, CONFIGS[n], n) for n in ("ext4-1k", "ext4-2k-gdtcsum", "ext2")}


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def poke(img: Path, offset: int, fmt: str, value: int, fix_sb: bool = False) -> None:
    """Write a little-endian field; with fix_sb, recompute the superblock's crc32c so only the field counts."""
    with open(img, "r+b") as f:
        os.pwrite(f.fileno(), struct.pack(fmt, value), offset)
        if fix_sb:
            sb = os.pread(f.fileno(), 1024, 1024)
            os.pwrite(f.fileno(), struct.pack("<I", crc32c_raw(0xFFFFFFFF, sb[:0x3FC])), 1024 + 0x3FC)


def geometry(img: Path) -> ext4.Geometry:
    size = img.stat().st_size
    with open(img, "rb") as f:
        return ext4.superblock(Area(0, size, lambda o, n: os.pread(f.fileno(), n, o), UsedMap(size, 4096)))


def descriptor(img: Path, group: int) -> int:
    """Byte offset of a group's descriptor (in the classic table after the superblock)."""
    g = geometry(img)
    return (g.sb_block + 1) * g.block_size + group * g.desc_size


def bitmap_block(img: Path, group: int) -> int:
    g = geometry(img)
    with open(img, "rb") as f:
        return int(struct.unpack_from("<I", os.pread(f.fileno(), 4, descriptor(img, group)))[0]) * g.block_size


def test_pristine_parse(pristine: dict[str, Path]) -> None:
    for img in pristine.values():
        desc, used = run_parse(img, 4096)
        assert used.mean() < 0.5, desc


def test_bad_magic(pristine: dict[str, Path], tmp_path: Path) -> None:
    img = copy(pristine["ext2"], tmp_path / "x.img")
    poke(img, 1024 + 0x38, "<H", 0x1234)
    assert "bad magic" in refused(img)


def test_superblock_checksum(pristine: dict[str, Path], tmp_path: Path) -> None:
    img = copy(pristine["ext4-1k"], tmp_path / "x.img")
    poke(img, 1024 + 0x34, "<H", 7)  # s_mnt_count, checksum left stale
    assert "superblock checksum" in refused(img)


def test_descriptor_checksum_crc32c(pristine: dict[str, Path], tmp_path: Path) -> None:
    img = copy(pristine["ext4-1k"], tmp_path / "x.img")
    poke(img, descriptor(img, 3) + 0x1C, "<H", 5)  # bg_itable_unused
    assert "group descriptor checksum (crc32c) mismatch in group 3" in refused(img)


def test_descriptor_checksum_crc16(pristine: dict[str, Path], tmp_path: Path) -> None:
    img = copy(pristine["ext4-2k-gdtcsum"], tmp_path / "x.img")
    poke(img, descriptor(img, 6) + 0x1C, "<H", 5)
    assert "group descriptor checksum (crc16) mismatch in group 6" in refused(img)


def test_block_bitmap_checksum(pristine: dict[str, Path], tmp_path: Path) -> None:
    img = copy(pristine["ext4-1k"], tmp_path / "x.img")
    at = bitmap_block(img, 0) + 500  # a free part of group 0
    poke(img, at, "<B", 0x01)
    assert "block bitmap checksum mismatch in group 0" in refused(img)


def test_free_count_disagrees(pristine: dict[str, Path], tmp_path: Path) -> None:
    img = copy(pristine["ext2"], tmp_path / "x.img")
    poke(img, bitmap_block(img, 1) + 600, "<B", 0x10)  # one more used block than the descriptor says
    msg = refused(img)
    assert "group 1's block bitmap has" in msg and "its descriptor says" in msg
    img = copy(pristine["ext2"], tmp_path / "y.img")
    poke(img, descriptor(img, 2) + 0xC, "<H", 17)  # bg_free_blocks_count
    assert "its descriptor says 17" in refused(img)


def test_pointer_outside(pristine: dict[str, Path], tmp_path: Path) -> None:
    img = copy(pristine["ext2"], tmp_path / "x.img")
    poke(img, descriptor(img, 1) + 0x8, "<I", geometry(img).blocks - 3)  # inode table runs past the end
    assert "group 1's inode table" in refused(img)


def test_truncated(pristine: dict[str, Path], tmp_path: Path) -> None:
    img = copy(pristine["ext4-1k"], tmp_path / "x.img")
    os.truncate(img, img.stat().st_size // 2)
    assert "larger than its area" in refused(img)


def test_state_and_features(pristine: dict[str, Path], tmp_path: Path) -> None:
    img = copy(pristine["ext4-1k"], tmp_path / "x.img")
    poke(img, 1024 + 0x3A, "<H", 3, fix_sb=True)
    assert "has errors" in refused(img)
    poke(img, 1024 + 0x3A, "<H", 0, fix_sb=True)
    assert "not cleanly unmounted" in refused(img)
    poke(img, 1024 + 0x3A, "<H", 1, fix_sb=True)
    run_parse(img, 4096)  # the poking itself is sound
    incompat = geometry(img).incompat
    poke(img, 1024 + 0x60, "<I", incompat | 0x80000000, fix_sb=True)
    assert "unknown incompatible feature bits 0x80000000" in refused(img)
    poke(img, 1024 + 0x60, "<I", incompat | 0x4, fix_sb=True)
    assert "needs replaying" in refused(img)
    poke(img, 1024 + 0x60, "<I", incompat, fix_sb=True)
    poke(img, 1024 + 0x64, "<I", geometry(img).ro_compat | 0x80, fix_sb=True)  # has_snapshot
    assert "read-only-compatible feature bits 0x80" in refused(img)


def test_journal_device(tmp_path: Path) -> None:
    need_kind("ext4")
    img = tmp_path / "j.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "journal_dev", str(img)], check=True, capture_output=True)
    assert "external journal" in refused(img)


@pytest.mark.parametrize("name", ["ext4-1k", "ext2"])
def test_copied_while_mounted(pristine: dict[str, Path], name: str, tmp_path: Path) -> None:
    """A copy taken while the filesystem is mounted and written: ext4's journal needs replaying; ext2
    (no journal) is marked not clean."""
    img = copy(pristine[name], tmp_path / "live.img")
    snap = tmp_path / "snap.img"
    with mounted_fs(img, CONFIGS[name].mount, tmp_path / "m") as m:
        (m / "new.bin").write_bytes(os.urandom(300_000))
        os.sync()
        subprocess.run(["cp", "--sparse=always", str(img), str(snap)], check=True)
    msg = refused(snap)
    assert ("needs replaying" if name == "ext4-1k" else "not cleanly unmounted") in msg, msg
    run_parse(img, 4096)  # unmounted again: clean


def test_crc_reference_values() -> None:
    """The table CRCs against the published check values of CRC-32C and CRC-16/ARC ("123456789")."""
    assert crc32c_raw(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    data = np.frombuffer(b"123456789", np.uint8)[None, :]
    assert int(ext4.crc_update(ext4.CRC16, np.array([0], np.uint32), data)[0]) == 0xBB3D


def test_one_tib_parses_fast(tmp_path: Path) -> None:
    """A sparse 1 TiB ext4 (8192 groups, lazily initialised): parsed in seconds, nearly all of it unused."""
    need_kind("ext4")
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(1 << 40)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_journal_init=1", str(img)], check=True, capture_output=True)
    t = time.monotonic()
    desc, used = run_parse(img, 65536)
    took = time.monotonic() - t
    assert took < 15, f"{desc}: {took:.1f}s"
    assert used.mean() < 0.03, desc
    print(f"\n{desc}: parsed in {took:.2f}s, {used.mean():.2%} of 64 KiB blocks used")


def test_crc32c_is_castagnolis_and_loads_without_the_packages_start_up() -> None:
    """The C extension is loaded alone (usedmap/crc.py): the check value of CRC-32C, and a process that
    needed it did not pay for importlib.metadata (the package's __init__ looks its version up with it)."""
    import sys

    code = ("import sys; from imagechain.usedmap import crc; "
            "print(hex(crc.crc32c(b'123456789')), hex(crc.crc32c_raw(0, b'')), 'importlib.metadata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["0xe3069283", "0x0", "False"], out


def test_only_the_parser_of_the_filesystem_found_is_loaded() -> None:
    """Each kind fsprobe reports has its parser; asking for ext4's loads no other parser module (their
    start-up is paid by the backups that need them)."""
    import sys

    from imagechain import usedmap
    from imagechain.usedmap import exfat, ext4, fat, ntfs, xfs

    want = {"ext4": ext4.parse, "xfs": xfs.parse, "ntfs": ntfs.parse, "vfat": fat.parse, "exfat": exfat.parse}
    assert {k: usedmap.parser(k) for k in want} == want
    assert usedmap.parser("btrfs") is None and usedmap.parser("") is None
    parsers = [f"imagechain.usedmap.{m}" for m in ("ext4", "xfs", "ntfs", "fat", "exfat")]
    code = ("import sys; from imagechain.usedmap import parser; p = parser('ext4'); "
            f"print(p.__module__, *[m for m in {parsers!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["imagechain.usedmap.ext4", "imagechain.usedmap.ext4"], out
