"""The FAT12/16/32 and exFAT used-cluster parsers against real filesystems made, filled and checked by the
Debian tools: the clusters they call used agree with fsck.fat / mtools / dump.exfat, a copy with every
unused block zeroed still checks clean and holds the same files, and damaged or contradictory structures
raise Unusable."""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from imagechain.usedmap import Area, Unusable, UsedMap, exfat, fat

from .conftest import need_tool
from .fsfill import check_fs, fill, make_fs, mounted_fs, need_kind, tree, zero_unused

pytestmark = pytest.mark.root

SEEDS = (1, 2, 3)
# mkfs variants: name -> (kind for fsfill's mount/check, extra mkfs options)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fat12": ("fat12", ()),
    "fat16": ("fat16", ()),
    "fat32": ("fat32", ()),
    "exfat": ("exfat", ()),
    "exfat128k": ("exfat", ("-c", "128K")),
}
FAT_VARIANTS = ("fat12", "fat16", "fat32")
Filled = Callable[[str, int], tuple[Path, dict[str, str]]]
EXFAT_VARIANTS = ("exfat", "exfat128k")


def _fill_args(variant: str) -> dict[str, int]:
    """FAT12 is 8 MiB: fewer, smaller files and less stale data so that it does not run full. fusefat
    writes FAT32's 512-byte clusters slowly: fewer, smaller files keep the module near 30 s."""
    return {"fat12": {"count": 40, "big": 512 << 10, "stale": 2 << 20},
            "fat32": {"count": 80, "big": 1 << 20, "stale": 4 << 20}}.get(variant, {})  # fmt: skip


def new_fs(folder: Path, variant: str, name: str = "") -> Path:
    kind, extra = VARIANTS[variant]
    if not extra:
        return make_fs(folder, kind, name=name or variant)
    k = need_kind(kind)
    img = folder / f"{name or variant}.fsimg"
    with open(img, "wb") as f:
        f.truncate(k.size)
    subprocess.run([k.mkfs[0], *extra, *k.mkfs[1:], str(img)], check=True, capture_output=True, timeout=120)
    return img


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    """(variant, seed) -> a filled image and its files, made once for the module's tests that share it."""
    cache: dict[tuple[str, int], tuple[Path, dict[str, str]]] = {}
    root = tmp_path_factory.mktemp("filled")

    def get(variant: str, seed: int) -> tuple[Path, dict[str, str]]:
        if (variant, seed) not in cache:
            folder = root / f"{variant}-{seed}"
            folder.mkdir()
            img = new_fs(folder, variant)
            with mounted_fs(img, VARIANTS[variant][0], folder / "m") as m:
                files = fill(m, random.Random(seed), **_fill_args(variant))
            cache[variant, seed] = img, files
        return cache[variant, seed]

    yield get


def run_parse(img: Path, parse: Callable[[Area], str], block_size: int = 4096, size: int | None = None
              ) -> tuple[str, np.ndarray]:  # fmt: skip
    """The parser's description and block mask over the image (or its first `size` bytes)."""
    size = os.path.getsize(img) if size is None else size
    m = UsedMap(size, block_size)
    with open(img, "rb") as f:
        desc = parse(Area(0, size, lambda o, n: os.pread(f.fileno(), n, o), m))
    return desc, m.used


def usage(img: Path, mod: Callable[[Area], object]) -> object:
    size = os.path.getsize(img)
    with open(img, "rb") as f:
        return mod(Area(0, size, lambda o, n: os.pread(f.fileno(), n, o), UsedMap(size, 4096)))


def fat_usage(img: Path) -> fat.FatUsage:
    u = usage(img, fat.cluster_usage)
    assert isinstance(u, fat.FatUsage)
    return u


def exfat_usage(img: Path) -> exfat.ExfatUsage:
    u = usage(img, exfat.cluster_usage)
    assert isinstance(u, exfat.ExfatUsage)
    return u


# ---- the tools' own view ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", FAT_VARIANTS)
def test_fat_counts_match_fsck(variant: str, seed: int, filled: Filled) -> None:
    """fsck.fat counts a cluster used when a file owns it (or it is bad): on a clean volume that is
    exactly the clusters with non-zero entries, so the counts must be equal."""
    need_tool("fsck.fat")
    img, _ = filled(variant, seed)
    out = subprocess.run(["fsck.fat", "-n", "-v", str(img)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) files, (\d+)/(\d+) clusters", out)
    assert m, out
    u = fat_usage(img)
    assert u.layout.bits == int(variant[3:])
    assert (int(m[2]), int(m[3])) == (int(u.used.sum()), u.layout.clusters)
    assert not u.disagree and not u.dirty
    desc, _ = run_parse(img, fat.parse)
    size = f"{u.layout.cluster >> 10} KiB" if u.layout.cluster >= 1024 else f"{u.layout.cluster} B"
    assert desc == f"FAT{u.layout.bits}, {size} clusters, {m[2]} of {m[3]} in use"


@pytest.mark.parametrize("variant", FAT_VARIANTS)
def test_fat_clusters_match_mtools(variant: str, filled: Filled) -> None:
    """Per cluster: every cluster of every file and folder (mshowfat) is used, and nothing else is."""
    need_tool("mdir", "mshowfat")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for seed in SEEDS:
        img, _ = filled(variant, seed)
        paths = subprocess.run(["mdir", "-/", "-b", "-i", str(img), "::"], capture_output=True, text=True,
                               check=True, env=env).stdout.split("\n")  # fmt: skip
        paths = [p for p in paths if p] + (["::/"] if variant == "fat32" else [])
        out = subprocess.run(["mshowfat", "-i", str(img), *paths], capture_output=True, text=True, check=True,
                             env=env).stdout  # fmt: skip
        tool = np.zeros(fat_usage(img).layout.clusters, bool)
        for a, b in re.findall(r"<(\d+)(?:-(\d+))?>", out):
            tool[int(a) - 2 : int(b or a) - 1] = True
        used = fat_usage(img).used
        assert not (tool & ~used).any(), f"seed {seed}: clusters of files marked free"
        assert (used == tool).all(), f"seed {seed}: {int((used & ~tool).sum())} clusters used by no file"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", EXFAT_VARIANTS)
def test_exfat_counts_match_dump(variant: str, seed: int, filled: Filled) -> None:
    """dump.exfat counts the bits of the same allocation bitmap: the counts must be equal."""
    need_tool("dump.exfat")
    img, _ = filled(variant, seed)
    out = subprocess.run(["dump.exfat", str(img)], capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"Total Clusters:\s+(\d+)", out)[1])  # type: ignore[index]
    free = int(re.search(r"Free Clusters:\s+(\d+)", out)[1])  # type: ignore[index]
    csize = int(re.search(r"Cluster size:\s+(\d+)", out)[1])  # type: ignore[index]
    u = exfat_usage(img)
    assert (u.layout.clusters, u.layout.cluster) == (total, csize)
    assert int(u.used.sum()) == total - free
    assert not u.dirty
    desc, _ = run_parse(img, exfat.parse)
    assert desc == f"exFAT, {csize >> 10} KiB clusters, {total - free} of {total} in use"


# ---- zeroing what the parser calls unused loses nothing --------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zeroed_unused_blocks_keep_every_file(variant: str, tmp_path: Path, filled: Filled) -> None:
    kind = VARIANTS[variant][0]
    img, files = filled(variant, SEEDS[0])
    parse = exfat.parse if kind == "exfat" else fat.parse
    original = np.fromfile(img, np.uint8)
    for bs in (4096, 65536):
        _, used = run_parse(img, parse, bs)
        if bs == 4096:
            assert used.mean() < 0.8, f"{used.mean():.0%} of the volume marked used"
        out = zero_unused(img, used, bs, tmp_path / f"zeroed-{bs}.img")
        check_fs(out, kind)
        with mounted_fs(out, kind, tmp_path / f"m{bs}", readonly=True) as m:
            assert tree(m) == files
        unused = ~np.repeat(used, bs)[: len(original)]
        assert original[unused].any(), "the free space held no stale data: the test proves nothing"
        assert not np.fromfile(out, np.uint8)[unused].any()


# ---- damaged, contradictory and dirty volumes ------------------------------------------------------------


@pytest.fixture(scope="module")
def blank(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """variant -> a fresh, empty image of it holding one small file; each test damages its own copy."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("blank")

    def get(variant: str) -> Path:
        if variant not in cache:
            img = new_fs(root, variant)
            with mounted_fs(img, VARIANTS[variant][0], root / f"m-{variant}") as m:
                (m / "hello.txt").write_bytes(b"hello\n" * 2000)
            cache[variant] = img
        return cache[variant]

    return get


def sparse_copy(src: Path, dst: Path) -> None:
    """The images are mostly zeros: a sparse copy writes a few MiB instead of 64."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def damaged(blank: Callable[[str], Path], tmp_path: Path, variant: str, edits: dict[int, bytes]) -> Path:
    out = tmp_path / f"{variant}-damaged.img"
    sparse_copy(blank(variant), out)
    with open(out, "r+b") as f:
        for off, data in edits.items():
            f.seek(off)
            f.write(data)
    return out


def unusable(img: Path, parse: Callable[[Area], str], size: int | None = None) -> str:
    with pytest.raises(Unusable) as e:
        run_parse(img, parse, size=size)
    return str(e.value)


def fat_entry(img: Path, bits: int, cluster: int, value: int, copies: tuple[int, ...] = (0, 1)) -> dict[int, bytes]:
    """Edits that set a cluster's FAT entry in the given FAT copies, located from the BPB (independently)."""
    raw = img.read_bytes()
    bps, rsvd, nfats, fatsz16 = struct.unpack_from("<H", raw, 11)[0], *struct.unpack_from("<HBxxxxxH", raw, 14)
    fatsz = fatsz16 or struct.unpack_from("<I", raw, 36)[0]
    edits = {}
    for i in copies:
        assert i < nfats
        base = (rsvd + i * fatsz) * bps
        if bits == 12:  # two bytes around the 12-bit entry, the other entry's nibble kept
            off = base + cluster * 3 // 2
            old = int.from_bytes(raw[off : off + 2], "little")
            new = (old & 0xF000 | value) if cluster % 2 == 0 else (old & 0x000F | value << 4)
            edits[off] = new.to_bytes(2, "little")
        else:
            edits[base + cluster * bits // 8] = value.to_bytes(bits // 8, "little")
    return edits


@pytest.mark.parametrize("variant", FAT_VARIANTS)
def test_fat_bpb_damage(variant: str, blank: Callable[[str], Path], tmp_path: Path) -> None:
    need_kind(VARIANTS[variant][0])
    assert "bytes per sector 768" in unusable(damaged(blank, tmp_path, variant, {11: struct.pack("<H", 768)}),
                                               fat.parse)  # fmt: skip
    assert "sectors per cluster 3" in unusable(damaged(blank, tmp_path, variant, {13: b"\x03"}), fat.parse)
    assert "0 FATs" in unusable(damaged(blank, tmp_path, variant, {16: b"\x00"}), fat.parse)
    assert "0x55AA" in unusable(damaged(blank, tmp_path, variant, {510: b"\x00\x00"}), fat.parse)
    assert "media byte 0x12" in unusable(damaged(blank, tmp_path, variant, {21: b"\x12"}), fat.parse)
    # the volume passes the end of the area
    img = blank(variant)
    assert "larger than its area" in unusable(img, fat.parse, size=os.path.getsize(img) - 4096)
    # the type comes from the cluster count, not the label
    relabelled = damaged(blank, tmp_path, variant, {54: b"FAT32   ", 82: b"FAT12   "})
    assert run_parse(relabelled, fat.parse)[0] == run_parse(img, fat.parse)[0]


@pytest.mark.parametrize("variant", FAT_VARIANTS)
def test_fat_entries(variant: str, blank: Callable[[str], Path], tmp_path: Path) -> None:
    img = blank(variant)
    bits = int(variant[3:])
    u = fat_usage(img)
    free = int(np.flatnonzero(~u.used)[-1]) + 2  # an odd and an even cluster: both FAT12 nibble layouts
    beyond = u.layout.clusters + 5  # past the last cluster (2 .. clusters + 1)
    for c in (free, free - 1):
        # a pointer past the last cluster, written to every copy (on this FAT12 every value past the last
        # cluster is a reserved one, 0xFF0 and up, which counts as used: value 1 is the invalid pointer left)
        if beyond < (1 << min(bits, 28)) - 16:
            msg = unusable(damaged(blank, tmp_path, variant, fat_entry(img, bits, c, beyond)), fat.parse)
            assert f"cluster {c} points to cluster {beyond}" in msg
        # pointer value 1 is never valid
        msg = unusable(damaged(blank, tmp_path, variant, fat_entry(img, bits, c, 1)), fat.parse)
        assert f"cluster {c} points to cluster 1," in msg
        # a bad-cluster mark and a reserved value count as used, without complaint
        for value in (0xFF7, 0xFF0):
            value |= (1 << bits) - 1 & ~0xFFF if bits < 32 else 0x0FFFF000
            desc, _ = run_parse(damaged(blank, tmp_path, variant, fat_entry(img, bits, c, value)), fat.parse)
            assert f", {int(u.used.sum()) + 1} of" in desc
    # FAT[0] disagreeing with the BPB media byte
    base = min(fat_entry(img, bits, 0, 0))
    media = damaged(blank, tmp_path, variant, {base: b"\xf0"})
    assert "differs from the BPB" in unusable(media, fat.parse)


@pytest.mark.parametrize("variant", FAT_VARIANTS)
def test_fat_copies_disagree_union_is_kept(variant: str, blank: Callable[[str], Path], tmp_path: Path) -> None:
    """Chosen behaviour: a cluster used in any FAT copy is used (not Unusable), and the description says so."""
    img = blank(variant)
    bits = int(variant[3:])
    u = fat_usage(img)
    free = int(np.flatnonzero(~u.used)[-1]) + 2
    used = int(np.flatnonzero(u.used)[-1]) + 2
    eoc = (1 << min(bits, 28)) - 1
    for copy in (1, 0):  # used only in the second copy, used only in the first
        d = damaged(blank, tmp_path, variant, fat_entry(img, bits, free, eoc, (copy,)))
        du = fat_usage(d)
        assert du.used[free - 2] and du.disagree == 1
        assert "FAT copies differ on 1 clusters (kept as used)" in run_parse(d, fat.parse)[0]
    # a used cluster freed in the second copy only stays used
    d = damaged(blank, tmp_path, variant, fat_entry(img, bits, used, 0, (1,)))
    assert fat_usage(d).used[used - 2] and fat_usage(d).disagree == 1


@pytest.mark.parametrize("variant", ("fat16", "fat32"))
def test_fat_dirty_is_parsed_and_said(variant: str, blank: Callable[[str], Path], tmp_path: Path) -> None:
    img = blank(variant)
    off = min(fat_entry(img, int(variant[3:]), 1, 0))
    raw = img.read_bytes()
    if variant == "fat16":
        entry = struct.pack("<H", struct.unpack_from("<H", raw, off)[0] & ~0x8000)
    else:
        entry = struct.pack("<I", struct.unpack_from("<I", raw, off)[0] & ~0x08000000)
    clean, clean_used = run_parse(img, fat.parse)
    for edits in ({off: entry}, {37 if variant == "fat16" else 65: b"\x01"}):  # FAT[1], boot sector state
        desc, used = run_parse(damaged(blank, tmp_path, variant, edits), fat.parse)
        assert desc == clean + " (dirty)"
        assert (used == clean_used).all()


@pytest.mark.parametrize(("variant", "parse"), [("fat16", fat.parse), ("exfat", exfat.parse)])
def test_area_larger_than_volume_is_used(blank: Callable[[str], Path], tmp_path: Path, variant: str,
                                         parse: Callable[[Area], str]) -> None:  # fmt: skip
    padded = tmp_path / "padded.img"
    sparse_copy(blank(variant), padded)
    size = os.path.getsize(padded)
    with open(padded, "r+b") as f:
        f.truncate(size + (1 << 20))
    _, used = run_parse(padded, parse)
    assert used[size // 4096 :].all() and not used.all()


def test_fat32_root_cluster_free(blank: Callable[[str], Path], tmp_path: Path) -> None:
    img = blank("fat32")
    root = struct.unpack_from("<I", img.read_bytes(), 44)[0]
    d = damaged(blank, tmp_path, "fat32", fat_entry(img, 32, root, 0))
    assert "root directory's cluster" in unusable(d, fat.parse)


def exfat_geometry(img: Path) -> tuple[int, int, int, int]:
    """(sector, cluster, heap offset, root cluster) in bytes/clusters, read from the boot sector directly."""
    b = img.read_bytes()[:512]
    heap, _count, root = struct.unpack_from("<III", b, 88)
    bps, spc = 1 << b[108], 1 << b[109]
    return bps, bps * spc, heap * bps, root


def bitmap_entry(img: Path) -> int:
    """Byte offset of the Allocation Bitmap entry in the root directory's first cluster."""
    _, cluster, heap, root = exfat_geometry(img)
    start = heap + (root - 2) * cluster
    data = img.read_bytes()[start : start + cluster]
    return start + next(i for i in range(0, cluster, 32) if data[i] == 0x81)


def reseal(img: Path) -> None:
    """Rewrite the main boot region's checksum sector after an edit (to test the other checks)."""
    bps = exfat_geometry(img)[0]
    with open(img, "r+b") as f:
        region = f.read(11 * bps)
        f.write(struct.pack("<I", exfat.boot_checksum(region, bps)) * (bps // 4))


def test_exfat_damage(blank: Callable[[str], Path], tmp_path: Path) -> None:
    img = blank("exfat")
    bps, cluster, heap, root = exfat_geometry(img)
    # boot code and then a field covered by the checksum
    assert "checksum" in unusable(damaged(blank, tmp_path, "exfat", {300: b"\x90"}), exfat.parse)
    assert "checksum" in unusable(damaged(blank, tmp_path, "exfat", {3 * bps + 7: b"\x01"}), exfat.parse)
    assert "checksum" in unusable(damaged(blank, tmp_path, "exfat", {11 * bps: b"\0\0\0\0"}), exfat.parse)
    assert "no main boot sector" in unusable(damaged(blank, tmp_path, "exfat", {3: b"NTFS    "}), exfat.parse)
    # the bitmap entry removed (marked deleted)
    e = bitmap_entry(img)
    assert "0 allocation bitmap entries" in unusable(damaged(blank, tmp_path, "exfat", {e: b"\x01"}), exfat.parse)
    # the bitmap too short for ClusterCount
    count = struct.unpack_from("<I", img.read_bytes(), 92)[0]
    short = damaged(blank, tmp_path, "exfat", {e + 24: struct.pack("<Q", count // 8 - 1)})
    assert "needed for" in unusable(short, exfat.parse)
    # ClusterCount past the volume, with a valid checksum
    big = damaged(blank, tmp_path, "exfat", {92: struct.pack("<I", count + 100)})
    reseal(big)
    assert "do not fit" in unusable(big, exfat.parse)
    # the root directory marked free in the bitmap
    bitmap_first = struct.unpack_from("<I", img.read_bytes(), e + 20)[0]
    at = heap + (bitmap_first - 2) * cluster + (root - 2) // 8
    byte = img.read_bytes()[at] & ~(1 << ((root - 2) % 8))
    assert "root directory's cluster" in unusable(damaged(blank, tmp_path, "exfat", {at: bytes([byte])}), exfat.parse)
    # the root directory's chain pointing outside the heap
    fat_off = struct.unpack_from("<I", img.read_bytes(), 80)[0] * bps
    chain = damaged(blank, tmp_path, "exfat", {fat_off + root * 4: struct.pack("<I", count + 10)})
    assert f"reaches cluster {count + 10}" in unusable(chain, exfat.parse)
    # the volume larger than the area
    assert "larger than its area" in unusable(img, exfat.parse, size=os.path.getsize(img) - bps)


def test_exfat_dirty_is_parsed_and_said(blank: Callable[[str], Path], tmp_path: Path) -> None:
    """VolumeDirty is excluded from the checksum: setting it alone leaves a valid boot region."""
    img = blank("exfat")
    clean, clean_used = run_parse(img, exfat.parse)
    flags = struct.unpack_from("<H", img.read_bytes(), 106)[0]
    desc, used = run_parse(damaged(blank, tmp_path, "exfat", {106: struct.pack("<H", flags | 2)}), exfat.parse)
    assert desc == clean + " (dirty)"
    assert (used == clean_used).all()


def test_exfat_texfat_two_bitmaps_union(blank: Callable[[str], Path], tmp_path: Path) -> None:
    """TexFAT (two FATs, two bitmaps) is made by hand from a plain volume: a second FAT copied from the
    first, a second bitmap at a free cluster that also marks one more cluster: both count as used."""
    img = blank("exfat")
    bps, cluster, heap, _ = exfat_geometry(img)
    raw = img.read_bytes()
    fat_off, fat_len = (v * bps for v in struct.unpack_from("<II", raw, 80))
    assert fat_off + 2 * fat_len <= heap
    e = bitmap_entry(img)
    first, length = struct.unpack_from("<IQ", raw, e + 20)
    plain = exfat_usage(img)
    x = int(np.flatnonzero(~plain.used)[-1]) + 2  # the second bitmap's cluster
    bitmap = bytearray(raw[heap + (first - 2) * cluster : heap + (first - 2) * cluster + length])
    for c in (x, x - 1):
        bitmap[(c - 2) // 8] |= 1 << ((c - 2) % 8)
    slot = next(i for i in range(e, e + cluster, 32) if raw[i] == 0)  # the first unused root entry
    entry = bytes([0x81, 1]) + bytes(18) + struct.pack("<IQ", x, length)
    edits = {110: b"\x02", fat_off + fat_len: raw[fat_off : fat_off + fat_len],
             heap + (x - 2) * cluster: bytes(bitmap), slot: entry}  # fmt: skip
    for active in (0, 1):
        d = damaged(blank, tmp_path, "exfat", {**edits, 106: struct.pack("<H", active)})
        reseal(d)
        u = exfat_usage(d)
        assert u.layout.fats == 2 and u.layout.active == active
        expected = plain.used.copy()
        expected[[x - 2, x - 3]] = True  # clusters x and x - 1
        assert (u.used == expected).all()
    # a second bitmap entry without the second FAT
    d = damaged(blank, tmp_path, "exfat", {slot: entry})
    assert "unexpected allocation bitmap entry 1" in unusable(d, exfat.parse)
