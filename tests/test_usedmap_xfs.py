"""The XFS used-block parser against real filesystems made by mkfs.xfs and filled through the kernel: its
view must be exactly xfs_db's free-space view (the AGFL aside, which it keeps), a copy with its unused
blocks zeroed must check clean and hold the same files, and damaged or dirty filesystems are refused."""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from imagechain.usedmap import Area, Unusable, UsedMap, xfs
from imagechain.usedmap.crc import crc32c

from .conftest import need_tool
from .fsfill import check_fs, fill, mounted_fs, need_kind, tree, zero_unused

pytestmark = pytest.mark.root

MiB = 1 << 20


def _mkfs(tmp: Path, name: str, size: int, *opts: str) -> Path:
    need_kind("xfs")
    img = tmp / f"{name}.fsimg"
    with open(img, "wb") as f:
        f.truncate(size)
    r = subprocess.run(["mkfs.xfs", "-q", "-f", *opts, str(img)], capture_output=True, text=True, timeout=120)
    if r.returncode:
        pytest.skip(f"mkfs.xfs {' '.join(opts)} refused: {r.stderr.strip().splitlines()[:1]}")
    return img


def _area(img: Path, bs: int = 65536, size: int | None = None,
          patches: dict[int, bytes] | None = None) -> tuple[Area, UsedMap]:  # fmt: skip
    """An Area over an image file, optionally with some bytes replaced (damage without copying the image)."""
    size = os.path.getsize(img) if size is None else size

    def read(off: int, n: int) -> bytes:
        with open(img, "rb") as f:
            buf = bytearray(os.pread(f.fileno(), n, off))
        for p_off, p in (patches or {}).items():
            lo, hi = max(off, p_off), min(off + n, p_off + len(p))
            if lo < hi:
                buf[lo - off : hi - off] = p[lo - p_off : hi - p_off]
        return bytes(buf)

    m = UsedMap(size, bs)
    return Area(0, size, read, m), m


def _parse(img: Path, bs: int = 65536, size: int | None = None,
           patches: dict[int, bytes] | None = None) -> tuple[str, np.ndarray]:  # fmt: skip
    area, m = _area(img, bs, size, patches)
    return xfs.parse(area), m.used


def _xfs_db(img: Path, *cmds: str) -> str:
    args = [a for c in cmds for a in ("-c", c)]
    return subprocess.run(["xfs_db", "-r", *args, str(img)], capture_output=True, text=True, check=True).stdout


def _tool_free(img: Path, g: xfs.Geometry) -> np.ndarray:
    """Free blocks as xfs_db's freesp -d lists them (agno, agbno, len): the bnobt plus the AGFL."""
    free = np.zeros(g.dblocks, bool)
    for line in _xfs_db(img, "freesp -d").splitlines():
        if "from" in line:
            break
        if re.fullmatch(r"\s*\d+\s+\d+\s+\d+\s*", line):
            agno, agbno, n = map(int, line.split())
            start = agno * g.agblocks + agbno
            assert not free[start : start + n].any()
            free[start : start + n] = True
    return free


def _agfl_blocks(img: Path, g: xfs.Geometry) -> np.ndarray:
    """Blocks on each AG's free list (flfirst..fllast, circular), read with xfs_db."""
    out = np.zeros(g.dblocks, bool)
    for agno in range(g.agcount):
        text = _xfs_db(img, f"agf {agno}", "print flfirst fllast flcount", f"agfl {agno}", "print bno")
        first, last, count = (int(re.search(rf"^{k} = (\d+)", text, re.M).group(1))  # type: ignore[union-attr]
                              for k in ("flfirst", "fllast", "flcount"))  # fmt: skip
        slots = {int(i): v for i, v in re.findall(r"(\d+):(\w+)", text.split("bno[", 1)[1])}
        idx = [(first + i) % len(slots) for i in range(count)]
        assert count == 0 or idx[-1] == last
        for i in idx:
            out[agno * g.agblocks + int(slots[i])] = True
    return out


def _nonzero_blocks(img: Path, bs: int) -> np.ndarray:
    """Per block of `bs` bytes: does it hold any non-zero byte? (Read in chunks: images are hundreds of MiB.)"""
    out = []
    with open(img, "rb") as f:
        while chunk := f.read(16 * MiB):
            out.append(np.frombuffer(chunk, np.uint64).reshape(-1, bs // 8).any(axis=1))
    return np.concatenate(out)


def _log_state(img: Path) -> str:
    r = subprocess.run(["xfs_logprint", "-t", str(img)], capture_output=True, text=True, check=False)
    m = re.search(r"state: <(\w+)>", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1)


def _compare_with_xfs_db(img: Path) -> tuple[int, int, int]:
    """Every block xfs_db calls used is used here; the only extra ones are the AGFL's.
    Returns (blocks, used per xfs_db, used here)."""
    area, _ = _area(img)
    g = xfs.read_superblock(area)
    mine = xfs.used_blocks(area)
    tool_used = ~_tool_free(img, g)
    agfl = _agfl_blocks(img, g)
    assert not (tool_used & ~mine).any(), "blocks xfs_db calls used are marked unused"
    assert np.array_equal(mine & ~tool_used, agfl), "extra used blocks are not exactly the AGFL"
    return g.dblocks, int(tool_used.sum()), int(mine.sum())


VARIANTS = {
    "default-1": (320 * MiB, ()),
    "default-2": (320 * MiB, ()),
    "agcount8-stripe-4ksect": (640 * MiB, ("-d", "agcount=8,su=64k,sw=2", "-l", "su=32k", "-s", "size=4096")),
    "1k-blocks": (320 * MiB, ("-b", "size=1024", "-l", "size=64m")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_filled_fs_matches_xfs_db_and_zeroed_copy_keeps_files(tmp_path: Path, variant: str) -> None:
    need_tool("xfs_db", "xfs_logprint")
    size, opts = VARIANTS[variant]
    rng = random.Random(f"xfs-{variant}")
    img = _mkfs(tmp_path, "fs", size, *opts)
    with mounted_fs(img, "xfs", tmp_path / "m") as m:
        files = fill(m, rng)
    check_fs(img, "xfs")
    assert _log_state(img) == "CLEAN"
    blocks, tool_used, mine = _compare_with_xfs_db(img)
    print(f"{variant}: {blocks} blocks, xfs_db used {tool_used}, parser used {mine} (+{mine - tool_used} AGFL)")
    for bs in (4096, 65536):
        desc, used = _parse(img, bs)
        assert desc.startswith("xfs v5") and used.mean() < 0.8, (desc, used.mean())
        out = zero_unused(img, used, bs, tmp_path / f"zeroed-{bs}.fsimg")
        check_fs(out, "xfs")
        with mounted_fs(out, "xfs", tmp_path / f"z{bs}", readonly=True) as zm:
            assert tree(zm) == files
        stale = _nonzero_blocks(img, bs) & ~used
        assert stale.sum() * bs > 4 * MiB, "the original held no stale data in the unused blocks"
        assert not (_nonzero_blocks(out, bs) & ~used).any()


def test_v4_fs(tmp_path: Path) -> None:
    """The kernel here may not mount v4 (deprecated), so mkfs populates it from a prototype file and the
    files are checked block by block through xfs_db's extent maps."""
    need_tool("xfs_db")
    rng = random.Random(44)
    src = tmp_path / "src"
    src.mkdir()
    contents = {f"f{i}": rng.randbytes(rng.randint(1, 3 * MiB)) for i in range(6)}
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    for name, data in contents.items():
        (src / name).write_bytes(data)
        lines.append(f"{name} ---644 0 0 {src / name}")
    (tmp_path / "proto").write_text("\n".join([*lines, "$", ""]))
    img = _mkfs(tmp_path, "v4", 320 * MiB, "-m", "crc=0", "-p", str(tmp_path / "proto"))
    check_fs(img, "xfs")
    blocks, tool_used, mine = _compare_with_xfs_db(img)
    print(f"v4: {blocks} blocks, xfs_db used {tool_used}, parser used {mine}")
    desc, used = _parse(img, 65536)
    assert desc.startswith("xfs v4"), desc
    out = zero_unused(img, used, 65536, tmp_path / "zeroed.fsimg")
    check_fs(out, "xfs")
    g = xfs.read_superblock(_area(img)[0])
    listing = _xfs_db(out, "ls /")
    with open(out, "rb") as f:
        for name, data in contents.items():
            ino = int(re.search(rf"^\d+\s+(\d+)\s+regular\s.*\s{name} ", listing, re.M).group(1))  # type: ignore[union-attr]
            got = bytearray()
            for off, agno, agbno, n in re.findall(r"offset (\d+) startblock \d+ \((\d+)/(\d+)\) count (\d+)",
                                                   _xfs_db(out, f"inode {ino}", "bmap")):  # fmt: skip
                assert int(off) * g.blocksize == len(got)
                got += os.pread(f.fileno(), int(n) * g.blocksize, g.ag_offset(int(agno), int(agbno)))
            assert bytes(got[: len(data)]) == data, name


# --- damage ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_img(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("xfs-clean")
    return _mkfs(tmp, "clean", 320 * MiB)


def _with_crc(buf: bytes, changes: dict[int, bytes], crc_off: int | None) -> bytes:
    b = bytearray(buf)
    for off, v in changes.items():
        b[off : off + len(v)] = v
    if crc_off is not None:
        b[crc_off : crc_off + 4] = b"\0\0\0\0"
        b[crc_off : crc_off + 4] = crc32c(bytes(b)).to_bytes(4, "little")
    return bytes(b)


def _bnobt_root(img: Path, agno: int) -> tuple[int, bytes]:
    area, _ = _area(img)
    g = xfs.read_superblock(area)
    agf = area.read(g.ag_offset(agno) + g.sectsize, g.sectsize)
    (root,) = struct.unpack_from(">I", agf, 16)
    off = g.ag_offset(agno, root)
    return off, area.read(off, g.blocksize)


Damage = Callable[[Path], dict[int, bytes]]


def _sb(changes: dict[int, bytes], fix_crc: bool = True) -> Damage:
    return lambda img: {0: _with_crc(_head(img, 0, 512), changes, 224 if fix_crc else None)}


def _head(img: Path, off: int, n: int) -> bytes:
    with open(img, "rb") as f:
        return os.pread(f.fileno(), n, off)


def _agf(agno: int, changes: dict[int, bytes], fix_crc: bool = True) -> Damage:
    def damage(img: Path) -> dict[int, bytes]:
        g = xfs.read_superblock(_area(img)[0])
        off = g.ag_offset(agno) + g.sectsize
        return {off: _with_crc(_head(img, off, g.sectsize), changes, 216 if fix_crc else None)}

    return damage


def _bno(changes: Callable[[bytes], dict[int, bytes]], fix_crc: bool = True) -> Damage:
    def damage(img: Path) -> dict[int, bytes]:
        off, buf = _bnobt_root(img, 0)
        return {off: _with_crc(buf, changes(buf), 52 if fix_crc else None)}

    return damage


def _rec(buf: bytes, i: int) -> bytes:
    return buf[56 + 8 * i : 64 + 8 * i]


def _nrecs(buf: bytes) -> int:
    return int(struct.unpack_from(">H", buf, 6)[0])


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


DAMAGE: dict[str, tuple[Damage, str]] = {
    "sb magic": (_sb({0: b"XFSC"}), "superblock: bad magic"),
    "sb checksum": (_sb({108: b"x"}, fix_crc=False), "superblock: checksum mismatch"),
    "sb realtime": (_sb({16: (1000).to_bytes(8, "big")}), "realtime section not supported"),
    "sb unknown incompat": (_sb({216: _u32(0x8000_000B)}), "unknown incompatible features"),
    "sb needsrepair": (_sb({216: _u32(0x1B)}), "needing repair"),
    "sb log incompat": (_sb({220: _u32(1)}), "log is dirty"),
    "sb agcount": (_sb({88: _u32(3)}), "do not fit"),
    "agf magic": (_agf(1, {0: b"XAGX"}), "AG 1 AGF: bad magic"),
    "agf checksum": (_agf(1, {100: b"x"}, fix_crc=False), "AG 1 AGF: checksum mismatch"),
    "agf freeblks": (_agf(1, {52: _u32(20471)}), "AG 1: free extents sum to"),
    "agf longest": (_agf(1, {56: _u32(20000)}), "AG 1: longest free extent"),
    "agf root outside": (_agf(1, {16: _u32(30000)}), "bad free-space btree root"),
    "agfl magic": (lambda img: {3 * 512: b"XAFX"}, "AGFL: bad magic"),
    "bnobt magic": (_bno(lambda b: {0: b"AB3C"}), "bad magic"),
    "bnobt checksum": (_bno(lambda b: {60: b"\x77"}, fix_crc=False), "checksum mismatch"),
    "bnobt level": (_bno(lambda b: {4: b"\0\1"}), "level or sibling links"),
    "bnobt swapped records": (_bno(lambda b: {56: _rec(b, 1) + _rec(b, 0)}), "out of order or overlapping"),
    "bnobt overlap": (_bno(lambda b: {60: _u32(20)}), "out of order or overlapping"),
    "bnobt extra record": (_bno(lambda b: {6: (_nrecs(b) + 1).to_bytes(2, "big")}), "empty or lies outside"),
    "bnobt beyond ag": (_bno(lambda b: {56 + 8 * (_nrecs(b) - 1) + 4: _u32(30000)}), "outside the AG"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_refused(clean_img: Path, case: str) -> None:
    damage, message = DAMAGE[case]
    with pytest.raises(Unusable, match=message):
        _parse(clean_img, patches=damage(clean_img))


def test_clean_and_truncated(clean_img: Path) -> None:
    assert _log_state(clean_img) == "CLEAN"
    size = os.path.getsize(clean_img)
    desc, used = _parse(clean_img, 65536, size=size + 5 * MiB)  # a partition larger than the fs: the rest is raw
    assert used[-80:].all() and used.mean() < 0.3, desc
    with pytest.raises(Unusable, match="claims"):
        _parse(clean_img, size=size - 4096)


def test_dirty_and_frozen_logs_are_refused(tmp_path: Path) -> None:
    """A live copy after fsync, a copy of a frozen fs (its log is covered, not unmounted) and a fs shut down
    without flushing all have log records the btrees may lag: xfs_logprint calls them dirty, and so do we."""
    need_tool("xfs_io", "xfs_freeze", "xfs_logprint")
    img = _mkfs(tmp_path, "fs", 320 * MiB)
    rng = random.Random(7)
    copies = {}
    with mounted_fs(img, "xfs", tmp_path / "m") as m:
        fill(m, rng, count=20, stale=0)
        subprocess.run(["xfs_io", "-c", "fsync", str(m / "f0001.bin")], check=False)
        os.sync()
        copies["live"] = tmp_path / "live.fsimg"
        subprocess.run(["cp", "--sparse=always", str(img), str(copies["live"])], check=True)
        subprocess.run(["xfs_freeze", "-f", str(m)], check=True)
        try:
            copies["frozen"] = tmp_path / "frozen.fsimg"
            subprocess.run(["cp", "--sparse=always", str(img), str(copies["frozen"])], check=True)
        finally:
            subprocess.run(["xfs_freeze", "-u", str(m)], check=True)
        (m / "more.bin").write_bytes(rng.randbytes(300_000))
        subprocess.run(["xfs_io", "-c", "fsync", str(m / "more.bin")], check=True)
        subprocess.run(["xfs_io", "-x", "-c", "shutdown", str(m)], check=True)
    copies["shutdown"] = img
    for what, path in copies.items():
        assert _log_state(path) == "DIRTY", what
        with pytest.raises(Unusable, match=r"xfs log is dirty \(not cleanly unmounted\)"):
            _parse(path)
    # mounting replays the log; a clean unmount then makes the filesystem usable again
    shutil.copyfile(img, tmp_path / "replayed.fsimg")
    with mounted_fs(tmp_path / "replayed.fsimg", "xfs", tmp_path / "m2"):
        pass
    assert _log_state(tmp_path / "replayed.fsimg") == "CLEAN"
    _compare_with_xfs_db(tmp_path / "replayed.fsimg")
